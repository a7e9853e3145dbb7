"""Triton kernels for the TTT-Linear and TTT-MLP scans (optional: `ttt_scan.py` runs them on CUDA tensors when Triton
imports).

One program per (batch, head) walks the mini-batches in order and keeps the inner weights in registers, so a
whole layer's scan is one launch forward instead of a dozen kernels per mini-batch. TTT-Linear's backward is two
launches: the sequential walk back carrying the weights' gradient (the least work per mini-batch that the carry
needs), then every mini-batch's input gradients in parallel. The arithmetic is that of `linear_scan_forward` and
`linear_backward_through` in `ttt_scan.py`, written per mini-batch:

    forward   z = k W + b,  G = dl/dz of l = 1/2 ||LN(z) - target||^2,  Z_bar = q W + b - eta_qk G,
              W <- W - k^T (e * G),  b <- b - sum_rows(e * G)
    backward  the same mini-batches in reverse, from the W, b saved at each mini-batch start, carrying dW, db.

TTT-MLP's forward is `mlp_scan_forward` per mini-batch; its backward keeps `mlp_backward_through`'s batched
PyTorch operations and replaces only their sequential loop, `mlp_walk_back`, by one launch per span.

Everything is float32. Matrix products use TF32 tensor cores when PyTorch's float32 matmul precision allows
it (`torch.set_float32_matmul_precision("high")`, or the trainer's --tf32), else full float32.
With TRITON_INTERPRET=1 set before Triton is first imported, the kernels also run on CPU tensors, slowly,
through Triton's interpreter (the tests do this).
"""

import functools

import torch
import triton
import triton.language as tl

# per program, which holds W and, backward, dW (f x f float32 each) in registers; one layer's scan forward +
# backward on an H100, 12 heads of 64, T=2048, B=1 / B=4: 0.94 / 1.11 ms with 4 warps, 1.17 / 1.44 ms with 8,
# 1.94 / 2.31 ms with 2 (2026-11-23; bench/scan_kernels.py times the same)
NUM_WARPS = 4


# TTT-MLP's programs hold W1 and W2 (f x 4f float32 each) and, backward, their gradients: at f=64 more than
# the registers, the rest spilled. Launched without software pipelining (num_stages=1), whose buffers for the
# per-mini-batch loads would need more than an H100's 227 KB of shared memory (the walk back: 364 KB). Compiled
# for sm_90 with 8 warps (Triton 3.9), K=16, f=64: forward 255 registers + 1.1 KB spilled per thread, 84 KB of
# shared memory; walk back 255 + 0.8 KB, 128 KB (4 warps: 96 KB, but 2.9 KB spilled); bench/kernel_resources.py
# reports these. Not yet timed on a GPU.
MLP_NUM_WARPS = 8
MLP_NUM_STAGES = 1
# Shared memory the TTT-MLP walk back (the larger of its two kernels) needs per head dim f, in bytes, as above.
MLP_SHARED_MEMORY = {16: 9216, 32: 32768, 64: 131072}


def block_shapes_fit(q: torch.Tensor, inner: str = "linear") -> bool:
    """K and f of stacked mini-batches q (B, H, n, K, f) are powers of two, as Triton's block shapes must be (a
    head dim of 96, as in the 760m size, is not): from 16 to 128 for TTT-Linear; for TTT-MLP, whose inner
    weights are 8 f^2 floats per program, K=16 (the paper's) and f up to 64."""
    K, f = q.shape[-2:]
    if inner == "mlp":
        return K == 16 and f in MLP_SHARED_MEMORY
    return K in (16, 32, 64, 128) and f in (16, 32, 64, 128)


def mlp_fits(f: int, capability: tuple, shared_memory: int) -> bool:
    """Whether the TTT-MLP kernels for head dim f suit a GPU of compute `capability` with `shared_memory` bytes per
    block: they need MLP_SHARED_MEMORY[f] (sm_86 and sm_89 have 99 KB) and Hopper or later (for sm_80, Triton 3.9
    builds them with their state in local memory: 32 registers and 20 to 27 KB of stack per thread). TTT-Linear's
    kernels suit every GPU Triton supports (at f=64 at most 90 KB of shared memory on sm_90, 74 on sm_80, 41 on
    sm_75: bench/kernel_resources.py)."""
    return capability >= (9, 0) and MLP_SHARED_MEMORY[f] <= shared_memory


@functools.cache  # asked at every TTT-MLP layer's forward; a device's answer does not change
def _device_limits(device_index: int) -> tuple:
    """(compute capability, shared memory per block in bytes) of a CUDA device."""
    shared_memory = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return torch.cuda.get_device_capability(device_index), shared_memory


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant instead of tracing the query
def _mlp_fits_device(device_index: int, f: int) -> bool:
    return mlp_fits(f, *_device_limits(device_index))


def supports(q: torch.Tensor, inner: str = "linear") -> bool:
    """Whether ttt_scan.py runs the scan of stacked mini-batches q of a TTT-Linear or TTT-MLP ("linear", "mlp") layer
    through these kernels."""
    if not (q.is_cuda and block_shapes_fit(q, inner)):
        return False
    return inner == "linear" or _mlp_fits_device(q.device.index, q.shape[-1])


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
def _load_weights(w_ptr, b_ptr, index, offsets, cols, SIZE: tl.constexpr, WIDTH: tl.constexpr):
    """The index-th weight (SIZE elements at row-major `offsets`) and (1, WIDTH) bias (at `cols`) of stacks of
    them (or of their gradients)."""
    return tl.load(w_ptr + index * SIZE + offsets), tl.load(b_ptr + index * WIDTH + cols)[None, :]


@triton.jit
def _store_weights(w_ptr, b_ptr, index, W, b, offsets, cols, SIZE: tl.constexpr, WIDTH: tl.constexpr):
    tl.store(w_ptr + index * SIZE + offsets, W)
    tl.store(b_ptr + index * WIDTH + cols[None, :], b)


@triton.jit
def _ln_reconstruction(z, target, gamma, beta, eps, F: tl.constexpr):
    """x_hat, std, g = (LN(z) - target) * gamma and G = dl/dz, row-wise over the F features (ln_reconstruction_parts
    in ttt_math.py)."""
    mean = tl.sum(z, 1)[:, None] / F
    centered = z - mean
    std = tl.sqrt(tl.sum(centered * centered, 1)[:, None] / F + eps)
    x_hat = centered / std
    g = (gamma * x_hat + beta - target) * gamma
    grad = (F * g - tl.sum(g, 1)[:, None] - x_hat * tl.sum(g * x_hat, 1)[:, None]) / (F * std)
    return x_hat, std, g, grad


@triton.jit
def _ln_reconstruction_vjp(u, x_hat, std, g, grad, gamma, F: tl.constexpr):
    """d_z and d_g for an upstream gradient u of G, the LN-reconstruction gradient of z (ln_reconstruction_grad_vjp
    in ttt_math.py)."""
    u_xhat = tl.sum(u * x_hat, 1)[:, None] / F
    d_g = (u - tl.sum(u, 1)[:, None] / F - x_hat * u_xhat) / std
    d_xhat = d_g * gamma * gamma - (u * (tl.sum(g * x_hat, 1)[:, None] / F) + g * u_xhat) / std
    d_std = -tl.sum(u * grad, 1)[:, None] / std
    d_z = ((d_xhat - tl.sum(d_xhat, 1)[:, None] / F - x_hat * (tl.sum(d_xhat * x_hat, 1)[:, None] / F)) / std
           + d_std * x_hat / F)
    return d_z, d_g


@triton.jit
def _scan_forward(q_ptr, k_ptr, target_ptr, eta_qk_ptr, e_ptr, w0_ptr, b0_ptr, gamma_ptr, beta_ptr,
                  out_ptr, w_starts_ptr, b_starts_ptr, w_last_ptr, b_last_ptr, n, H, eps,
                  K: tl.constexpr, F: tl.constexpr, PRECISION: tl.constexpr, KEEP_STARTS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rows, cols, kf, kk, ff = _tile_offsets(K, F)
    gamma, beta = _load_norm(gamma_ptr, beta_ptr, bh % H, cols, F)
    W, b = _load_weights(w0_ptr, b0_ptr, bh, ff, cols, F * F, F)
    for i in range(n):
        mb = bh * n + i
        q = tl.load(q_ptr + mb * K * F + kf)
        k = tl.load(k_ptr + mb * K * F + kf)
        target = tl.load(target_ptr + mb * K * F + kf)
        eta_qk = tl.load(eta_qk_ptr + mb * K * K + kk)
        e = tl.load(e_ptr + mb * K + rows)[:, None]
        if KEEP_STARTS:  # for the backward
            _store_weights(w_starts_ptr, b_starts_ptr, mb, W, b, ff, cols, F * F, F)

        z = tl.dot(k, W, input_precision=PRECISION) + b
        _, _, _, grad = _ln_reconstruction(z, target, gamma, beta, eps, F)
        out = tl.dot(q, W, input_precision=PRECISION) + b - tl.dot(eta_qk, grad, input_precision=PRECISION)
        tl.store(out_ptr + mb * K * F + kf, out)

        e_grad = e * grad
        W -= tl.dot(tl.trans(k), e_grad, input_precision=PRECISION)
        b -= tl.sum(e_grad, 0)[None, :]
    _store_weights(w_last_ptr, b_last_ptr, bh, W, b, ff, cols, F * F, F)


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
    d_z, d_g = _ln_reconstruction_vjp(d_grad, x_hat, std, g, grad, gamma, F)
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
    dW, db = _load_weights(d_w_last_ptr, d_b_last_ptr, bh, ff, cols, F * F, F)
    for j in range(n):
        mb = bh * n + (n - 1 - j)
        q = tl.load(q_ptr + mb * K * F + kf)
        k = tl.load(k_ptr + mb * K * F + kf)
        d_out = tl.load(d_out_ptr + mb * K * F + kf)
        W, b = _load_weights(w_starts_ptr, b_starts_ptr, mb, ff, cols, F * F, F)
        _, _, _, _, d_z = _mini_batch_backward(
            q, k, tl.load(target_ptr + mb * K * F + kf), tl.load(eta_qk_ptr + mb * K * K + kk),
            tl.load(e_ptr + mb * K + rows)[:, None], W, b, d_out, dW, db, gamma, beta, eps, F, PRECISION)
        _store_weights(d_w_afters_ptr, d_b_afters_ptr, mb, dW, db, ff, cols, F * F, F)
        dW += tl.dot(tl.trans(q), d_out, input_precision=PRECISION) + tl.dot(tl.trans(k), d_z,
                                                                                input_precision=PRECISION)
        db += tl.sum(d_out, 0)[None, :] + tl.sum(d_z, 0)[None, :]
    _store_weights(d_w0_ptr, d_b0_ptr, bh, dW, db, ff, cols, F * F, F)


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
    W, b = _load_weights(w_starts_ptr, b_starts_ptr, mb, ff, cols, F * F, F)
    d_out = tl.load(d_out_ptr + mb * K * F + kf)
    dW, db = _load_weights(d_w_afters_ptr, d_b_afters_ptr, mb, ff, cols, F * F, F)
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


@triton.jit
def _gelu_tanh(x):
    """GELU(x) (tanh approximation) and its derivative (gelu_tanh_grad in ttt_math.py), from one tanh written with exp:
    tanh(u) = 2 / (1 + exp(-2u)) - 1."""
    tanh_out = 2 / (1 + tl.exp(-1.59576912 * x * (1 + 0.044715 * x * x))) - 1
    grad = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
    return 0.5 * x * (1 + tanh_out), grad


@triton.jit
def _mlp_offsets(K: tl.constexpr, F: tl.constexpr, D: tl.constexpr):
    """Hidden indices and the element offsets of a (K, D), an (F, D) and a (D, F) row-major tile."""
    rows, cols, hidden = tl.arange(0, K), tl.arange(0, F), tl.arange(0, D)
    return (hidden, rows[:, None] * D + hidden[None, :], cols[:, None] * D + hidden[None, :],
            hidden[:, None] * F + cols[None, :])


@triton.jit
def _mlp_scan_forward(q_ptr, k_ptr, target_ptr, eta_ptr, eta_qk_ptr, e_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                      gamma_ptr, beta_ptr, out_ptr, w1_starts_ptr, b1_starts_ptr, w2_starts_ptr, b2_starts_ptr,
                      w1_last_ptr, b1_last_ptr, w2_last_ptr, b2_last_ptr, n, H, eps, K: tl.constexpr,
                      F: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr, KEEP_STARTS: tl.constexpr):
    """mlp_scan_forward of ttt_scan.py, one program per (batch, head) holding W1 (F, D), b1, W2 (D, F), b2."""
    bh = tl.program_id(0).to(tl.int64)
    rows, cols, kf, kk, _ = _tile_offsets(K, F)
    hidden, kd, fd, df = _mlp_offsets(K, F, D)
    gamma, beta = _load_norm(gamma_ptr, beta_ptr, bh % H, cols, F)
    W1, b1 = _load_weights(w1_ptr, b1_ptr, bh, fd, hidden, F * D, D)
    W2, b2 = _load_weights(w2_ptr, b2_ptr, bh, df, cols, D * F, F)
    for i in range(n):
        mb = bh * n + i
        q = tl.load(q_ptr + mb * K * F + kf)
        k = tl.load(k_ptr + mb * K * F + kf)
        e = tl.load(e_ptr + mb * K + rows)[:, None]
        if KEEP_STARTS:  # for the backward
            _store_weights(w1_starts_ptr, b1_starts_ptr, mb, W1, b1, fd, hidden, F * D, D)
            _store_weights(w2_starts_ptr, b2_starts_ptr, mb, W2, b2, df, cols, D * F, F)

        z1 = tl.dot(k, W1, input_precision=PRECISION) + b1
        q_W1 = tl.dot(q, W1, input_precision=PRECISION) + b1
        x2, gelu_z1 = _gelu_tanh(z1)
        z2 = tl.dot(x2, W2, input_precision=PRECISION) + b2
        grad_z2 = _ln_reconstruction(z2, tl.load(target_ptr + mb * K * F + kf), gamma, beta, eps, F)[3]
        grad_z1 = tl.dot(grad_z2, tl.trans(W2), input_precision=PRECISION) * gelu_z1
        # dual form, layer by layer: Z1_bar = q W1 + b1 - eta_qk G1, Z_bar = X2_bar W2 + b2 - eta (X2_bar X2^T + 1) G2
        z1_bar = q_W1 - tl.dot(tl.load(eta_qk_ptr + mb * K * K + kk), grad_z1, input_precision=PRECISION)
        x2_bar = _gelu_tanh(z1_bar)[0]
        mix = tl.load(eta_ptr + mb * K * K + kk) * (tl.dot(x2_bar, tl.trans(x2), input_precision=PRECISION) + 1)
        out = (tl.dot(x2_bar, W2, input_precision=PRECISION) + b2
               - tl.dot(mix, grad_z2, input_precision=PRECISION))
        tl.store(out_ptr + mb * K * F + kf, out)

        e_grad_z1, e_grad_z2 = e * grad_z1, e * grad_z2
        W1 -= tl.dot(tl.trans(k), e_grad_z1, input_precision=PRECISION)
        b1 -= tl.sum(e_grad_z1, 0)[None, :]
        W2 -= tl.dot(tl.trans(x2), e_grad_z2, input_precision=PRECISION)
        b2 -= tl.sum(e_grad_z2, 0)[None, :]
    _store_weights(w1_last_ptr, b1_last_ptr, bh, W1, b1, fd, hidden, F * D, D)
    _store_weights(w2_last_ptr, b2_last_ptr, bh, W2, b2, df, cols, D * F, F)


@triton.jit
def _mlp_walk_back(q_ptr, k_ptr, e_ptr, x2_ptr, gelu_z1_ptr, e_grad_z1_ptr, e_grad_z2_ptr, grad_z2_ptr,
                   out_d_grad_z1_ptr, out_d_grad_z2_ptr, out_d_x2_ptr, curvature_z1_ptr, d_z1_bar_ptr, x2_bar_ptr,
                   d_out_ptr, x_hat_ptr, std_ptr, g_ptr, w2_ptr, gamma_ptr, d_w1_ptr, d_b1_ptr, d_w2_ptr, d_b2_ptr,
                   d_e_grad_z1_ptr, d_e_grad_z2_ptr, d_z1_ptr, d_g_ptr, d_k_update_ptr,
                   d_w1_out_ptr, d_b1_out_ptr, d_w2_out_ptr, d_b2_out_ptr,
                   m, H, K: tl.constexpr, F: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """mlp_walk_back of ttt_scan.py over m mini-batches, one program per (batch, head): walks them in reverse carrying
    dW1, db1, dW2, db2."""
    bh = tl.program_id(0).to(tl.int64)
    rows, cols, kf, _, _ = _tile_offsets(K, F)
    hidden, kd, fd, df = _mlp_offsets(K, F, D)
    gamma = tl.load(gamma_ptr + (bh % H) * F + cols)[None, :]
    dW1, db1 = _load_weights(d_w1_ptr, d_b1_ptr, bh, fd, hidden, F * D, D)
    dW2, db2 = _load_weights(d_w2_ptr, d_b2_ptr, bh, df, cols, D * F, F)
    for j in range(m):
        mb = bh * m + (m - 1 - j)
        k = tl.load(k_ptr + mb * K * F + kf)
        x2 = tl.load(x2_ptr + mb * K * D + kd)
        e = tl.load(e_ptr + mb * K + rows)[:, None]
        # every product with dW1, then with dW2, then with W2: one (F, D) matrix at a time in shared memory
        # through W1_after = W1 - k^T (e G1), b1_after = b1 - sum(e G1), and the same for W2 with x2 and G2
        d_e_grad_z1 = -(tl.dot(k, dW1, input_precision=PRECISION) + db1)
        tl.store(d_k_update_ptr + mb * K * F + kf,
                 tl.dot(tl.load(e_grad_z1_ptr + mb * K * D + kd), tl.trans(dW1), input_precision=PRECISION))
        d_e_grad_z2 = -(tl.dot(x2, dW2, input_precision=PRECISION) + db2)
        e_grad_z2_dW2 = tl.dot(tl.load(e_grad_z2_ptr + mb * K * F + kf), tl.trans(dW2), input_precision=PRECISION)
        tl.store(d_e_grad_z1_ptr + mb * K * D + kd, d_e_grad_z1)
        tl.store(d_e_grad_z2_ptr + mb * K * F + kf, d_e_grad_z2)

        gelu_z1 = tl.load(gelu_z1_ptr + mb * K * D + kd)
        W2 = tl.load(w2_ptr + mb * D * F + df)
        d_grad_z1 = tl.load(out_d_grad_z1_ptr + mb * K * D + kd) + e * d_e_grad_z1
        d_back_z2 = d_grad_z1 * gelu_z1
        d_grad_z2 = (tl.load(out_d_grad_z2_ptr + mb * K * F + kf) + e * d_e_grad_z2
                     + tl.dot(d_back_z2, W2, input_precision=PRECISION))
        grad_z2 = tl.load(grad_z2_ptr + mb * K * F + kf)
        d_z2, d_g = _ln_reconstruction_vjp(d_grad_z2, tl.load(x_hat_ptr + mb * K * F + kf),
                                           tl.load(std_ptr + mb * K + rows)[:, None], tl.load(g_ptr + mb * K * F + kf),
                                           grad_z2, gamma, F)
        tl.store(d_g_ptr + mb * K * F + kf, d_g)
        d_x2 = tl.load(out_d_x2_ptr + mb * K * D + kd) - e_grad_z2_dW2 + tl.dot(d_z2, tl.trans(W2),
                                                                                 input_precision=PRECISION)
        d_z1 = d_grad_z1 * tl.load(curvature_z1_ptr + mb * K * D + kd) + d_x2 * gelu_z1
        tl.store(d_z1_ptr + mb * K * D + kd, d_z1)

        d_z1_bar = tl.load(d_z1_bar_ptr + mb * K * D + kd)
        d_out = tl.load(d_out_ptr + mb * K * F + kf)
        dW1 += (tl.dot(tl.trans(tl.load(q_ptr + mb * K * F + kf)), d_z1_bar, input_precision=PRECISION)
                + tl.dot(tl.trans(k), d_z1, input_precision=PRECISION))
        db1 += tl.sum(d_z1_bar + d_z1, 0)[None, :]
        dW2 += (tl.dot(tl.trans(tl.load(x2_bar_ptr + mb * K * D + kd)), d_out, input_precision=PRECISION)
                + tl.dot(tl.trans(d_back_z2), grad_z2, input_precision=PRECISION)
                + tl.dot(tl.trans(x2), d_z2, input_precision=PRECISION))
        db2 += tl.sum(d_out + d_z2, 0)[None, :]
    _store_weights(d_w1_out_ptr, d_b1_out_ptr, bh, dW1, db1, fd, hidden, F * D, D)
    _store_weights(d_w2_out_ptr, d_b2_out_ptr, bh, dW2, db2, df, cols, D * F, F)


def _precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def linear_scan_forward(q, k, target, eta_qk, e, W0, b0, gamma, beta, eps, keep_starts):
    """linear_scan_forward of ttt_scan.py (same inputs, plus the LayerNorm eps) in one kernel launch; the weights at
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
    q, k, target, eta_qk, e, W0, b0, gamma and beta, as ttt_scan.py's operator ttt::linear_scan_backward returns them.
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


def mlp_scan_forward(q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta, eps, keep_starts):
    """mlp_scan_forward of ttt_scan.py (same inputs, plus the LayerNorm eps) in one kernel launch: Z_bar, the final W1,
    b1, W2, b2, and their values at every mini-batch start as one span, [W1_starts (B, H, n, f, 4f), b1_starts,
    W2_starts, b2_starts] ([] when keep_starts is False)."""
    q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta = (
        t.contiguous() for t in (q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta))
    B, H, n, K, f = q.shape
    params = (W1, b1, W2, b2)
    out = torch.empty_like(q)
    starts = [q.new_empty(B, H, n, *p.shape[-2:]) for p in params] if keep_starts else [q] * 4
    final = [torch.empty_like(p) for p in params]
    _mlp_scan_forward[(B * H,)](q, k, target, eta, eta_qk, e, *params, gamma, beta, out, *starts, *final, n, H, eps,
                                K=K, F=f, D=W1.shape[-1], PRECISION=_precision(), KEEP_STARTS=keep_starts,
                                num_warps=MLP_NUM_WARPS, num_stages=MLP_NUM_STAGES)
    return out, *final, starts if keep_starts else []


def mlp_walk_back(walk, gamma, d_params):
    """mlp_walk_back of ttt_scan.py (same arguments: an MLPWalkBack of m mini-batches, gamma, the gradients of the
    weights after the last) in one kernel launch."""
    B, H, m, K, f = walk.q.shape
    d_e_grad_z1, d_z1 = (walk.x2.new_empty(walk.x2.shape) for _ in range(2))  # contiguous, as the kernel writes
    d_e_grad_z2, d_g, d_k_update = (walk.q.new_empty(walk.q.shape) for _ in range(3))
    d_params = [d.contiguous() for d in d_params]
    d_params_before = [torch.empty_like(d) for d in d_params]
    _mlp_walk_back[(B * H,)](*(t.contiguous() for t in walk), gamma.contiguous(), *d_params, d_e_grad_z1,
                             d_e_grad_z2, d_z1, d_g, d_k_update, *d_params_before, m, H, K=K, F=f,
                             D=walk.x2.shape[-1], PRECISION=_precision(), num_warps=MLP_NUM_WARPS,
                             num_stages=MLP_NUM_STAGES)
    return (d_e_grad_z1, d_e_grad_z2, d_z1, d_g, d_k_update), d_params_before
