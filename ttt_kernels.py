"""Triton kernels for the TTT-Linear scan (optional: `ttt.py` uses them on CUDA tensors when Triton imports).

One program per (batch, head) walks the mini-batches in order and keeps the inner weights W (f x f) and b in
registers, so a whole layer's scan is one launch forward instead of a dozen kernels per mini-batch. The backward
is two launches: the sequential walk back carrying the weights' gradient (the least work per mini-batch that
the carry needs), then every mini-batch's input gradients in parallel. The arithmetic is that of
`linear_scan_forward` and `linear_backward_through` in `ttt.py`, written per mini-batch:

    forward   z = k W + b,  G = dl/dz of l = 1/2 ||LN(z) - target||^2,  Z_bar = q W + b - eta_qk G,
              W <- W - k^T (e * G),  b <- b - sum_rows(e * G)
    backward  the same mini-batches in reverse, from the W, b saved at each mini-batch start, carrying dW, db.

Everything is float32. Matrix products use TF32 tensor cores when PyTorch's float32 matmul precision allows
it (`torch.set_float32_matmul_precision("high")`, or the trainer's --tf32), else full float32.
With TRITON_INTERPRET=1 set before Triton is first imported, the kernels also run on CPU tensors, slowly,
through Triton's interpreter (the tests do this).
"""

import torch
import triton
import triton.language as tl


# per program, which holds W and, backward, dW (f x f float32 each) in registers; one layer's scan forward +
# backward on an H100, 12 heads of 64, T=2048, B=1 / B=4: 0.94 / 1.11 ms with 4 warps, 1.17 / 1.44 ms with 8,
# 1.94 / 2.31 ms with 2 (2026-11-23; bench/scan_kernels.py times the same)
NUM_WARPS = 4


def block_shapes_fit(q: torch.Tensor) -> bool:
    """K and f of stacked mini-batches q (B, H, n, K, f) are powers of two from 16 to 128, as Triton's block
    shapes must be (a head dim of 96, as in the 760m size, is not)."""
    return all(size in (16, 32, 64, 128) for size in q.shape[-2:])


def supports(q: torch.Tensor) -> bool:
    """Whether ttt.py runs the scan of stacked mini-batches q through these kernels."""
    return q.is_cuda and block_shapes_fit(q)


@triton.jit
def _tile_offsets(K: tl.constexpr, F: tl.constexpr):
    """Row and column indices and the element offsets of a (K, F), a (K, K) and an (F, F) row-major tile."""
    rows, cols = tl.arange(0, K), tl.arange(0, F)
    kf, kk = rows[:, None] * F + cols[None, :], rows[:, None] * K + rows[None, :]
    return rows, cols, kf, kk, cols[:, None] * F + cols[None, :]


@triton.jit
def _load_norm(gamma_ptr, beta_ptr, h, cols, F: tl.constexpr):
    """Head h's LayerNorm weight and bias, (1, F) each."""
    return tl.load(gamma_ptr + h * F + cols)[None, :], tl.load(beta_ptr + h * F + cols)[None, :]


@triton.jit
def _load_weights(w_ptr, b_ptr, index, ff, cols, F: tl.constexpr):
    """The index-th (F, F) weight and (1, F) bias of row-major stacks of them (or of their gradients)."""
    return tl.load(w_ptr + index * F * F + ff), tl.load(b_ptr + index * F + cols)[None, :]


@triton.jit
def _store_weights(w_ptr, b_ptr, index, W, b, ff, cols, F: tl.constexpr):
    tl.store(w_ptr + index * F * F + ff, W)
    tl.store(b_ptr + index * F + cols[None, :], b)


@triton.jit
def _ln_reconstruction(z, target, gamma, beta, eps, F: tl.constexpr):
    """x_hat, std, g = (LN(z) - target) * gamma and G = dl/dz, row-wise over the F features (ln_reconstruction_parts
    in ttt.py)."""
    mean = tl.sum(z, 1)[:, None] / F
    centered = z - mean
    std = tl.sqrt(tl.sum(centered * centered, 1)[:, None] / F + eps)
    x_hat = centered / std
    g = (gamma * x_hat + beta - target) * gamma
    grad = (F * g - tl.sum(g, 1)[:, None] - x_hat * tl.sum(g * x_hat, 1)[:, None]) / (F * std)
    return x_hat, std, g, grad


@triton.jit
def _scan_forward(q_ptr, k_ptr, target_ptr, eta_qk_ptr, e_ptr, w0_ptr, b0_ptr, gamma_ptr, beta_ptr,
                  out_ptr, w_starts_ptr, b_starts_ptr, w_last_ptr, b_last_ptr, n, H, eps,
                  K: tl.constexpr, F: tl.constexpr, PRECISION: tl.constexpr, KEEP_STARTS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows, cols, kf, kk, ff = _tile_offsets(K, F)
    gamma, beta = _load_norm(gamma_ptr, beta_ptr, bh % H, cols, F)
    W, b = _load_weights(w0_ptr, b0_ptr, bh, ff, cols, F)
    for i in range(n):
        mb = bh * n + i
        q = tl.load(q_ptr + mb * K * F + kf)
        k = tl.load(k_ptr + mb * K * F + kf)
        target = tl.load(target_ptr + mb * K * F + kf)
        eta_qk = tl.load(eta_qk_ptr + mb * K * K + kk)
        e = tl.load(e_ptr + mb * K + rows)[:, None]
        if KEEP_STARTS:  # for the backward
            _store_weights(w_starts_ptr, b_starts_ptr, mb, W, b, ff, cols, F)

        z = tl.dot(k, W, input_precision=PRECISION) + b
        _, _, _, grad = _ln_reconstruction(z, target, gamma, beta, eps, F)
        out = tl.dot(q, W, input_precision=PRECISION) + b - tl.dot(eta_qk, grad, input_precision=PRECISION)
        tl.store(out_ptr + mb * K * F + kf, out)

        e_grad = e * grad
        W -= tl.dot(tl.trans(k), e_grad, input_precision=PRECISION)
        b -= tl.sum(e_grad, 0)[None, :]
    _store_weights(w_last_ptr, b_last_ptr, bh, W, b, ff, cols, F)


@triton.jit
def _mini_batch_backward(q, k, target, eta_qk, e, W, b, d_out, dW, db, gamma, beta, eps,
                         F: tl.constexpr, PRECISION: tl.constexpr):
    """One mini-batch's backward up to z, given the gradient dW, db of the weights after it: returns x_hat, G,
    the gradient d_e_grad of e * G, d_g (of g = (LN(z) - target) * gamma) and d_z."""
    z = tl.dot(k, W, input_precision=PRECISION) + b
    x_hat, std, g, grad = _ln_reconstruction(z, target, gamma, beta, eps, F)
    # through W_after = W - k^T (e G), b_after = b - sum(e G), and Z_bar = q W + b - eta_qk G
    d_e_grad = -(tl.dot(k, dW, input_precision=PRECISION) + db)
    d_grad = e * d_e_grad - tl.dot(tl.trans(eta_qk), d_out, input_precision=PRECISION)
    # through G = LN-reconstruction gradient of z (ln_reconstruction_grad_vjp in ttt.py)
    u_xhat = tl.sum(d_grad * x_hat, 1)[:, None] / F
    d_g = (d_grad - tl.sum(d_grad, 1)[:, None] / F - x_hat * u_xhat) / std
    d_xhat = d_g * gamma * gamma - (d_grad * (tl.sum(g * x_hat, 1)[:, None] / F) + g * u_xhat) / std
    d_std = -tl.sum(d_grad * grad, 1)[:, None] / std
    d_z = ((d_xhat - tl.sum(d_xhat, 1)[:, None] / F - x_hat * (tl.sum(d_xhat * x_hat, 1)[:, None] / F)) / std
           + d_std * x_hat / F)
    return x_hat, grad, d_e_grad, d_g, d_z


@triton.jit
def _scan_backward_carry(q_ptr, k_ptr, target_ptr, eta_qk_ptr, e_ptr, gamma_ptr, beta_ptr, w_starts_ptr,
                         b_starts_ptr, d_out_ptr, d_w_last_ptr, d_b_last_ptr, d_w_afters_ptr, d_b_afters_ptr,
                         d_w0_ptr, d_b0_ptr, n, H, eps, K: tl.constexpr, F: tl.constexpr, PRECISION: tl.constexpr):
    """The sequential part of the backward, one program per (batch, head): walks the mini-batches in reverse
    carrying dW, db, and saves them as each mini-batch's d W_after, d b_after for _scan_backward_inputs."""
    bh = tl.program_id(0).to(tl.int64)
    rows, cols, kf, kk, ff = _tile_offsets(K, F)
    gamma, beta = _load_norm(gamma_ptr, beta_ptr, bh % H, cols, F)
    dW, db = _load_weights(d_w_last_ptr, d_b_last_ptr, bh, ff, cols, F)
    for j in range(n):
        mb = bh * n + (n - 1 - j)
        q = tl.load(q_ptr + mb * K * F + kf)
        k = tl.load(k_ptr + mb * K * F + kf)
        d_out = tl.load(d_out_ptr + mb * K * F + kf)
        W, b = _load_weights(w_starts_ptr, b_starts_ptr, mb, ff, cols, F)
        _, _, _, _, d_z = _mini_batch_backward(
            q, k, tl.load(target_ptr + mb * K * F + kf), tl.load(eta_qk_ptr + mb * K * K + kk),
            tl.load(e_ptr + mb * K + rows)[:, None], W, b, d_out, dW, db, gamma, beta, eps, F, PRECISION)
        _store_weights(d_w_afters_ptr, d_b_afters_ptr, mb, dW, db, ff, cols, F)
        dW += tl.dot(tl.trans(q), d_out, input_precision=PRECISION) + tl.dot(tl.trans(k), d_z,
                                                                                input_precision=PRECISION)
        db += tl.sum(d_out, 0)[None, :] + tl.sum(d_z, 0)[None, :]
    _store_weights(d_w0_ptr, d_b0_ptr, bh, dW, db, ff, cols, F)


@triton.jit
def _scan_backward_inputs(q_ptr, k_ptr, target_ptr, eta_qk_ptr, e_ptr, gamma_ptr, beta_ptr, w_starts_ptr,
                          b_starts_ptr, d_out_ptr, d_w_afters_ptr, d_b_afters_ptr,
                          d_q_ptr, d_k_ptr, d_target_ptr, d_eta_qk_ptr, d_e_ptr, d_gamma_ptr, d_beta_ptr,
                          n, H, eps, K: tl.constexpr, F: tl.constexpr, PRECISION: tl.constexpr):
    """The gradients of every mini-batch's inputs, one program per (batch, head, mini-batch), all in parallel
    once _scan_backward_carry has saved the weights' gradient after each mini-batch."""
    mb = tl.program_id(0).to(tl.int64)
    h = (mb // n) % H
    rows, cols, kf, kk, ff = _tile_offsets(K, F)
    gamma, beta = _load_norm(gamma_ptr, beta_ptr, h, cols, F)
    k = tl.load(k_ptr + mb * K * F + kf)
    target = tl.load(target_ptr + mb * K * F + kf)
    e = tl.load(e_ptr + mb * K + rows)[:, None]
    W, b = _load_weights(w_starts_ptr, b_starts_ptr, mb, ff, cols, F)
    d_out = tl.load(d_out_ptr + mb * K * F + kf)
    dW, db = _load_weights(d_w_afters_ptr, d_b_afters_ptr, mb, ff, cols, F)
    x_hat, grad, d_e_grad, d_g, d_z = _mini_batch_backward(
        tl.load(q_ptr + mb * K * F + kf), k, target, tl.load(eta_qk_ptr + mb * K * K + kk), e, W, b, d_out, dW, db,
        gamma, beta, eps, F, PRECISION)
    tl.store(d_q_ptr + mb * K * F + kf, tl.dot(d_out, tl.trans(W), input_precision=PRECISION))
    tl.store(d_eta_qk_ptr + mb * K * K + kk, -tl.dot(d_out, tl.trans(grad), input_precision=PRECISION))
    tl.store(d_e_ptr + mb * K + rows, tl.sum(d_e_grad * grad, 1))
    d_k = tl.dot(d_z, tl.trans(W), input_precision=PRECISION) - tl.dot(e * grad, tl.trans(dW),
                                                                        input_precision=PRECISION)
    tl.store(d_k_ptr + mb * K * F + kf, d_k)
    tl.store(d_target_ptr + mb * K * F + kf, -d_g * gamma)
    tl.store(d_gamma_ptr + mb * F + cols, tl.sum(d_g * (2 * gamma * x_hat + beta - target), 0))
    tl.store(d_beta_ptr + mb * F + cols, tl.sum(d_g * gamma, 0))


def _precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def linear_scan_forward(q, k, target, eta_qk, e, W0, b0, gamma, beta, eps, keep_starts):
    """linear_scan_forward of ttt.py (same inputs, plus the LayerNorm eps) in one kernel launch; the weights at
    every mini-batch start come as one span, W_starts (B, H, n, f, f) and b_starts (B, H, n, 1, f), or as empty
    tensors when keep_starts is False. Float32 inputs; matrix products in TF32 unless PyTorch's float32 matmul
    precision is "highest"."""
    q, k, target, eta_qk, e, W0, b0, gamma, beta = (
        t.contiguous() for t in (q, k, target, eta_qk, e, W0, b0, gamma, beta))
    B, H, n, K, f = q.shape
    out = torch.empty_like(q)
    W_starts, b_starts = (q.new_empty(B, H, n, f, f), q.new_empty(B, H, n, 1, f)) if keep_starts else (q, q)
    W, b = torch.empty_like(W0), torch.empty_like(b0)
    _scan_forward[(B * H,)](q, k, target, eta_qk, e, W0, b0, gamma, beta, out, W_starts, b_starts, W, b,
                            n, H, eps, K=K, F=f, PRECISION=_precision(), KEEP_STARTS=keep_starts,
                            num_warps=NUM_WARPS)
    if not keep_starts:
        W_starts, b_starts = q.new_empty(0), q.new_empty(0)
    return out, W, b, W_starts, b_starts


def linear_scan_backward(q, k, target, eta_qk, e, gamma, beta, W_starts, b_starts, d_out, d_W, d_b, eps):
    """The backward of linear_scan_forward, given the gradients of Z_bar and of the final W and b: the gradients of
    q, k, target, eta_qk, e, W0, b0, gamma and beta, as ttt.py's operator ttt::linear_scan_backward returns them.
    A sequential launch carries the weights' gradient backwards, then one parallel launch over all mini-batches
    computes the inputs'."""
    q, k, target, eta_qk, e, gamma, beta, d_out, d_W, d_b = (
        t.contiguous() for t in (q, k, target, eta_qk, e, gamma, beta, d_out, d_W, d_b))
    B, H, n, K, f = q.shape
    d_W_afters, d_b_afters = torch.empty_like(W_starts), torch.empty_like(b_starts)
    d_W0, d_b0 = torch.empty_like(d_W), torch.empty_like(d_b)
    _scan_backward_carry[(B * H,)](q, k, target, eta_qk, e, gamma, beta, W_starts, b_starts, d_out, d_W, d_b,
                                   d_W_afters, d_b_afters, d_W0, d_b0, n, H, eps, K=K, F=f,
                                   PRECISION=_precision(), num_warps=NUM_WARPS)
    d_q, d_k, d_target = torch.empty_like(q), torch.empty_like(k), torch.empty_like(target)
    d_eta_qk, d_e = torch.empty_like(eta_qk), torch.empty_like(e)
    d_gamma, d_beta = q.new_empty(B, H, n, f), q.new_empty(B, H, n, f)
    _scan_backward_inputs[(B * H * n,)](q, k, target, eta_qk, e, gamma, beta, W_starts, b_starts, d_out,
                                        d_W_afters, d_b_afters, d_q, d_k, d_target, d_eta_qk, d_e, d_gamma,
                                        d_beta, n, H, eps, K=K, F=f, PRECISION=_precision(),
                                        num_warps=NUM_WARPS)
    d_gamma, d_beta = (d.sum((0, 2)).unsqueeze(1) for d in (d_gamma, d_beta))
    return d_q, d_k, d_target, d_eta_qk, d_e, d_W0, d_b0, d_gamma, d_beta
