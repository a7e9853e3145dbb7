# Copyright 2026 the TTT-LM PyTorch authors. MIT License.
"""The recomputing scans of ttt.py's TTT layers: the scan over n full mini-batches keeping only the inner weights at
every mini-batch start, with a hand-written backward that recomputes the rest, registered as PyTorch operators
(ttt::linear_scan, ttt::mlp_scan and their backwards) that run on the Triton kernels of ttt_kernels.py where those
run. ttt.py holds the readable reference (TTTBase.loop_scan, the mini-batch steps) and picks the scan
(config.scan_implementation); tests check these against it. Same notation as ttt.py.
"""

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Top-level modules in this repository; relative ones in a saved model folder (see the imports of ttt.py).
try:
    from . import ttt_math
except ImportError:
    if __package__:
        raise
    import ttt_math

try:  # Triton kernels for the scans, used on CUDA tensors
    try:
        # first: a missing file is then a ModuleNotFoundError (`from . import` raises a plain ImportError); this
        # `from .x import` form also names the file for transformers to copy
        from .ttt_kernels import supports  # noqa: F401, I001
        from . import ttt_kernels
    except ImportError:
        if __package__:
            raise
        import ttt_kernels
except ModuleNotFoundError as error:  # no Triton (CPU-only installs): the PyTorch scans serve
    if not (error.name or "").endswith(("triton", "ttt_kernels")):
        raise
    ttt_kernels = None


def why_not_triton(q, dtype, inner: str) -> str | None:
    """None when the Triton kernels run the scan, in `dtype`, of stacked mini-batches q (B, H, n, K, f) of a
    TTT-Linear or TTT-MLP layer ("linear", "mlp"); else why not, in words."""
    if ttt_kernels is None:
        return "Triton is not installed"
    if dtype != torch.float32:
        return f"the kernels compute in float32, the scan is in {str(dtype).removeprefix('torch.')}"
    if ttt_kernels.supports(q, inner):
        return None
    if not q.is_cuda:
        return "the tensors are not on a CUDA GPU"
    return (f"no kernel for mini_batch_size {q.shape[-2]} and head dim {q.shape[-1]} of TTT-{inner} on this GPU "
            f"(see ttt_kernels.supports)")


# ----------------------------------------------------------------------------------------------------------------
# Recomputing scans: the scan over n full mini-batches keeping only the inner weights at every mini-batch start,
# with a hand-written backward that recomputes the rest (memory grows with n only through those weights)

# A backward recomputes the forward quantities of a span of consecutive mini-batches at once: batched operations
# on tensors of up to about SPAN_ELEMENTS floats, a working set bounded by the span rather than by n. On a CPU,
# operations on tensors of every mini-batch at once ran slower (fresh memory from the OS for each), and TTT-MLP's
# inner-loop backward at B=4, 12 heads, ran 15 to 20% faster with spans of 2 or 4 mini-batches than of 16.
MAX_SPAN = 16
SPAN_ELEMENTS = 2**20


def mini_batches_per_span(q, params):
    """For stacked mini-batches q (B, H, n, K, f) and inner weights params, whose first is (., ., f, width)."""
    B, H, _, K, _ = q.shape
    return max(1, min(MAX_SPAN, SPAN_ELEMENTS // (B * H * K * params[0].shape[-1])))


def stacked_per_span(starts, span):
    """[the inner weights at each mini-batch start] -> each weight stacked on dim 2 per `span` mini-batches,
    [W1 of the first span, b1 of the first span, ..., W1 of the second span, ...], so that the backward reads a
    span's weights contiguously."""
    return [torch.stack(p, 2) for i in range(0, len(starts), span) for p in zip(*starts[i:i + span])]


def backward_by_spans(backward_through, fields, starts, d_out, gamma, beta, d_params):
    """The backward of a scan, one span of mini-batches at a time from the last: backward_through(*fields of the
    span, *its starting weights, its d_out, gamma, beta, d_params after it) returns the span's field gradients,
    d_params before it, and its share of d_gamma, d_beta. Returns the fields', initial weights', gamma's and
    beta's gradients."""
    d_fields, d_gamma, d_beta, size = [], 0, 0, starts[0].shape[2]  # all spans but the last have this size
    for span_start in reversed(range(0, d_out.shape[2], size)):
        span = slice(span_start, span_start + size)
        span_starts = starts[len(d_params) * (span_start // size):][:len(d_params)]
        d_span, d_params, (d_gamma_span, d_beta_span) = backward_through(
            *(t[:, :, span] for t in fields), *span_starts, d_out[:, :, span], gamma, beta, d_params)
        d_fields.append(d_span)
        d_gamma, d_beta = d_gamma + d_gamma_span, d_beta + d_beta_span
    return (*(torch.cat(d[::-1], 2) for d in zip(*d_fields)), *d_params, d_gamma, d_beta)


def target_and_norm_gradients(d_g, x_hat, target, gamma, beta):
    """The gradients of target (B, H, m, K, f) and of gamma and beta (H, 1, f) from d_g, the gradient of
    g = (gamma x_hat + beta - target) gamma over m stacked mini-batches (gamma, beta as (H, 1, 1, f))."""
    d_gamma = (d_g * (2 * gamma * x_hat + beta - target)).sum((0, 2, 3)).unsqueeze(1)
    return -d_g * gamma, d_gamma, (d_g * gamma).sum((0, 2, 3)).unsqueeze(1)


def linear_scan_forward(q, k, target, eta_qk, e, W0, b0, gamma, beta, keep_starts):
    """The TTT-Linear scan over n full mini-batches, in PyTorch (the body of the operator ttt::linear_scan).

    Inputs (stacked on dim 2): q, k, target (B, H, n, K, f); eta_qk (B, H, n, K, K); e (B, H, n, K, 1), the last
    row of eta (c_{K-1} lr_j), which moves the inner weights; W0 (B, H, f, f), b0 (B, H, 1, f); gamma, beta
    (H, 1, f). Returns Z_bar (B, H, n, K, f), the final W and b, and what the backward reads: the weights at
    every mini-batch start, stacked per span (stacked_per_span; [] when keep_starts is False: no backward will
    run)."""
    W, b = W0, b0
    starts, outputs = [], []
    for q_i, k_i, t_i, p_i, e_i in zip(*(x.unbind(2) for x in (q, k, target, eta_qk, e))):
        grad = ttt_math.ln_reconstruction_grad(k_i @ W + b, t_i, gamma, beta)
        outputs.append(q_i @ W + b - p_i @ grad)
        if keep_starts:
            starts.append((W, b))
        e_grad = e_i * grad
        W, b = W - k_i.transpose(-1, -2) @ e_grad, b - e_grad.sum(-2, keepdim=True)
    return torch.stack(outputs, 2), W, b, stacked_per_span(starts, mini_batches_per_span(q, (W0,)))


def linear_backward_through(q, k, target, eta_qk, e, W_starts, b_starts, d_out, gamma, beta, d_params):
    """The backward of linear_scan_forward over m consecutive mini-batches (inputs stacked on dim 2, W_starts
    (B, H, m, f, f) and b_starts the saved starting weights), given the gradient of the weights after the last:
    recomputes their forward quantities at once, walks them backwards carrying the inner weights' gradient,
    then finishes the input gradients at once. Returns the gradients of q, k, target, eta_qk and e, of the
    weights before the first mini-batch, and of gamma and beta."""
    d_W, d_b = d_params
    gamma_, beta_ = gamma.unsqueeze(1), beta.unsqueeze(1)  # (H, 1, 1, f) against (B, H, m, K, f)
    x_hat, std, g, grad = ttt_math.ln_reconstruction_parts(k @ W_starts + b_starts, target, gamma_, beta_)
    e_grad = e * grad

    m = q.shape[2]
    d_e_grads, d_k_updates, d_zs, d_gs = ([None] * m for _ in range(4))
    for i in reversed(range(m)):
        # W_after = W_i - k^T (e * G), b_after = b_i - sum(e * G); Z_bar = q W_i + b_i - P G; z = k W_i + b_i
        d_e_grads[i] = d_e_grad = -(k[:, :, i] @ d_W + d_b)  # gradient of e * G
        d_k_updates[i] = e_grad[:, :, i] @ d_W.transpose(-1, -2)
        d_grad = e[:, :, i] * d_e_grad - eta_qk[:, :, i].transpose(-1, -2) @ d_out[:, :, i]
        d_zs[i], d_gs[i] = d_z, _ = ttt_math.ln_reconstruction_grad_vjp(
            d_grad, x_hat[:, :, i], std[:, :, i], g[:, :, i], grad[:, :, i], gamma)
        d_W = d_W + q[:, :, i].transpose(-1, -2) @ d_out[:, :, i] + k[:, :, i].transpose(-1, -2) @ d_z
        d_b = d_b + (d_out[:, :, i] + d_z).sum(-2, keepdim=True)
    d_e_grad, d_k_update, d_z, d_g = (torch.stack(d, 2) for d in (d_e_grads, d_k_updates, d_zs, d_gs))

    d_q = d_out @ W_starts.transpose(-1, -2)
    d_eta_qk = -d_out @ grad.transpose(-1, -2)
    d_e = (d_e_grad * grad).sum(-1, keepdim=True)
    d_k = d_z @ W_starts.transpose(-1, -2) - d_k_update
    d_target, d_gamma, d_beta = target_and_norm_gradients(d_g, x_hat, target, gamma_, beta_)
    return (d_q, d_k, d_target, d_eta_qk, d_e), (d_W, d_b), (d_gamma, d_beta)


def mlp_scan_forward(q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta, keep_starts):
    """The TTT-MLP scan over n full mini-batches, in PyTorch (the body of the operator ttt::mlp_scan).

    Inputs (stacked on dim 2): q, k, target (B, H, n, K, f); eta, eta_qk (B, H, n, K, K); e (B, H, n, K, 1), the
    last row of eta; W1 (B, H, f, 4f), b1 (B, H, 1, 4f), W2 (B, H, 4f, f), b2 (B, H, 1, f); gamma, beta
    (H, 1, f). Returns Z_bar (B, H, n, K, f), the final W1, b1, W2, b2, and what the backward reads: the weights
    at every mini-batch start (n x (8 f^2 + 5 f) per head), stacked per span (stacked_per_span; [] when
    keep_starts is False)."""
    params, starts, outputs = (W1, b1, W2, b2), [], []
    for q_i, k_i, t_i, eta_i, p_i, e_i in zip(*(x.unbind(2) for x in (q, k, target, eta, eta_qk, e))):
        W1, b1, W2, b2 = params
        z1 = k_i @ W1 + b1
        x2 = F.gelu(z1, approximate="tanh")
        grad_z2 = ttt_math.ln_reconstruction_grad(x2 @ W2 + b2, t_i, gamma, beta)
        grad_z1 = (grad_z2 @ W2.transpose(-1, -2)) * ttt_math.gelu_tanh_grad(z1)
        x2_bar = F.gelu(q_i @ W1 + b1 - p_i @ grad_z1, approximate="tanh")
        outputs.append(x2_bar @ W2 + b2 - (eta_i * (x2_bar @ x2.transpose(-1, -2) + 1)) @ grad_z2)
        if keep_starts:
            starts.append(params)
        e_grad_z1, e_grad_z2 = e_i * grad_z1, e_i * grad_z2
        params = (W1 - k_i.transpose(-1, -2) @ e_grad_z1, b1 - e_grad_z1.sum(-2, keepdim=True),
                  W2 - x2.transpose(-1, -2) @ e_grad_z2, b2 - e_grad_z2.sum(-2, keepdim=True))
    return torch.stack(outputs, 2), *params, stacked_per_span(starts, mini_batches_per_span(q, (W1,)))


class MLPWalkBack(NamedTuple):
    """What the walk back through m TTT-MLP mini-batches reads, stacked on dim 2: the inputs, forward quantities
    and output gradients of mlp_backward_through (out_d_*: the parts of a gradient that come from the outputs),
    and W2 (B, H, m, 4f, f) at each mini-batch start."""

    q: torch.Tensor  # (B, H, m, K, f)
    k: torch.Tensor
    e: torch.Tensor  # (B, H, m, K, 1)
    x2: torch.Tensor  # (B, H, m, K, 4f)
    gelu_z1: torch.Tensor
    e_grad_z1: torch.Tensor
    e_grad_z2: torch.Tensor  # (B, H, m, K, f)
    grad_z2: torch.Tensor
    out_d_grad_z1: torch.Tensor  # (B, H, m, K, 4f)
    out_d_grad_z2: torch.Tensor  # (B, H, m, K, f)
    out_d_x2: torch.Tensor  # (B, H, m, K, 4f)
    curvature_z1: torch.Tensor
    d_z1_bar: torch.Tensor
    x2_bar: torch.Tensor
    d_out: torch.Tensor  # (B, H, m, K, f)
    x_hat: torch.Tensor
    std: torch.Tensor  # (B, H, m, K, 1)
    g: torch.Tensor  # (B, H, m, K, f)
    W2: torch.Tensor


def mlp_walk_back(walk: MLPWalkBack, gamma, d_params):
    """Backwards through the m updates theta_after = theta - (k or x2)^T (e G) from the last, carrying
    d theta_after = d_params (the gradients of W1, b1, W2, b2 after the last mini-batch). Returns the gradients of
    e * G1, e * G2, z1 and g, the update's share of k's, each stacked on dim 2, and d_params before the first."""
    T = lambda t: t.transpose(-1, -2)
    w = MLPWalkBack(*(t.unbind(2) for t in walk))
    m = walk.q.shape[2]
    d_e_grads_z1, d_e_grads_z2, d_zs1, d_gs, d_ks = ([None] * m for _ in range(5))
    for i in reversed(range(m)):
        d_W1, d_b1, d_W2, d_b2 = d_params
        d_e_grads_z1[i] = d_e_grad_z1 = -(w.k[i] @ d_W1 + d_b1)
        d_e_grads_z2[i] = d_e_grad_z2 = -(w.x2[i] @ d_W2 + d_b2)
        d_grad_z1 = w.out_d_grad_z1[i] + w.e[i] * d_e_grad_z1
        d_back_z2 = d_grad_z1 * w.gelu_z1[i]
        d_grad_z2 = w.out_d_grad_z2[i] + w.e[i] * d_e_grad_z2 + d_back_z2 @ w.W2[i]
        d_z2, d_gs[i] = ttt_math.ln_reconstruction_grad_vjp(d_grad_z2, w.x_hat[i], w.std[i], w.g[i], w.grad_z2[i],
                                                             gamma)
        d_x2 = w.out_d_x2[i] - w.e_grad_z2[i] @ T(d_W2) + d_z2 @ T(w.W2[i])
        d_zs1[i] = d_z1 = d_grad_z1 * w.curvature_z1[i] + d_x2 * w.gelu_z1[i]
        d_ks[i] = w.e_grad_z1[i] @ T(d_W1)
        # one product per weight over the rows of its three uses (W1: z1_bar, z1; W2: Z_bar, back_z2, z2)
        d_params = (d_W1 + T(torch.cat([w.q[i], w.k[i]], -2)) @ torch.cat([w.d_z1_bar[i], d_z1], -2),
                    d_b1 + (w.d_z1_bar[i] + d_z1).sum(-2, keepdim=True),
                    d_W2 + T(torch.cat([w.x2_bar[i], d_back_z2, w.x2[i]], -2))
                    @ torch.cat([w.d_out[i], w.grad_z2[i], d_z2], -2),
                    d_b2 + (w.d_out[i] + d_z2).sum(-2, keepdim=True))
    return tuple(torch.stack(d, 2) for d in (d_e_grads_z1, d_e_grads_z2, d_zs1, d_gs, d_ks)), d_params


def mlp_backward_through(q, k, target, eta, eta_qk, e, W1, b1, W2, b2, d_out, gamma, beta, d_params,
                         walk_back=mlp_walk_back):
    """The backward of mlp_scan_forward over m consecutive mini-batches (inputs stacked on dim 2, W1 etc. the
    saved starting weights (B, H, m, ., .)), given the gradient of the weights after the last: recomputes their
    forward quantities and the gradients that do not depend on later mini-batches at once, walks them backwards
    carrying the inner weights' gradient (walk_back: mlp_walk_back, or its Triton kernel), then finishes the input
    gradients at once. Returns the gradients of q, k, target, eta, eta_qk and e, of the weights before the first
    mini-batch, and of gamma and beta."""
    T = lambda t: t.transpose(-1, -2)
    # the forward quantities of every mini-batch at once
    gamma_, beta_ = gamma.unsqueeze(1), beta.unsqueeze(1)  # (H, 1, 1, f) against (B, H, m, K, f)
    z1 = k @ W1 + b1
    x2 = F.gelu(z1, approximate="tanh")
    x_hat, std, g, grad_z2 = ttt_math.ln_reconstruction_parts(x2 @ W2 + b2, target, gamma_, beta_)
    gelu_z1 = ttt_math.gelu_tanh_grad(z1)
    back_z2 = grad_z2 @ T(W2)
    grad_z1 = back_z2 * gelu_z1
    z1_bar = q @ W1 + b1 - eta_qk @ grad_z1
    x2_bar = F.gelu(z1_bar, approximate="tanh")
    mix = x2_bar @ T(x2) + 1  # Z_bar = x2_bar W2 + b2 - (eta * mix) G2

    # the output's own gradients, which do not depend on later mini-batches
    d_eta_mix = -(d_out @ T(grad_z2))
    d_mix = d_eta_mix * eta
    d_z1_bar = (d_out @ T(W2) + d_mix @ x2) * ttt_math.gelu_tanh_grad(z1_bar)
    out_d_grad_z1 = -T(eta_qk) @ d_z1_bar
    out_d_grad_z2 = -T(eta * mix) @ d_out
    out_d_x2 = T(d_mix) @ x2_bar
    curvature_z1 = back_z2 * ttt_math.gelu_tanh_second_derivative(z1)

    walk = MLPWalkBack(q, k, e, x2, gelu_z1, e * grad_z1, e * grad_z2, grad_z2, out_d_grad_z1, out_d_grad_z2,
                       out_d_x2, curvature_z1, d_z1_bar, x2_bar, d_out, x_hat, std, g, W2)
    (d_e_grad_z1, d_e_grad_z2, d_z1, d_g, d_k_update), d_params = walk_back(walk, gamma, d_params)

    d_q = d_z1_bar @ T(W1)
    d_k = d_z1 @ T(W1) - d_k_update
    d_e = (d_e_grad_z1 * grad_z1).sum(-1, keepdim=True) + (d_e_grad_z2 * grad_z2).sum(-1, keepdim=True)
    d_eta = d_eta_mix * mix
    d_eta_qk = -d_z1_bar @ T(grad_z1)
    d_target, d_gamma, d_beta = target_and_norm_gradients(d_g, x_hat, target, gamma_, beta_)
    return (d_q, d_k, d_target, d_eta, d_eta_qk, d_e), d_params, (d_gamma, d_beta)


# ----------------------------------------------------------------------------------------------------------------
# The recomputing scans as PyTorch operators (torch.library): torch.compile keeps each as one node of its graph,
# with its hand-written backward, instead of unrolling the loop over mini-batches or breaking the graph there.

Tensor = torch.Tensor


def span_starts_like(q, params, keep_starts, triton):
    """Empty tensors shaped as a scan's starting weights for stacked mini-batches q and inner weights params:
    stacked_per_span's result, or the Triton kernels' one span of n."""
    B, H, n = q.shape[:3]
    span = n if triton else mini_batches_per_span(q, params)
    spans = [min(span, n - i) for i in range(0, n, span)] if keep_starts else []
    return [q.new_empty(B, H, m, *p.shape[-2:]) for m in spans for p in params]


def split_into_spans(q, starts):
    """The Triton kernels' starting weights, one span of n, as views per span of the PyTorch backward's size."""
    span = mini_batches_per_span(q, starts)
    return [p[:, :, i:i + span] for i in range(0, q.shape[2], span) for p in starts]


def _keep_for_backward(ctx, inputs, params, starts):
    """setup_context of both scans: keeps the inputs their backward reads and the weights at the mini-batch
    starts (outputs without a gradient of their own), and the shapes of the final weights, whose gradients stay
    None where none reached them."""
    ctx.mark_non_differentiable(*starts)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, *starts)
    ctx.num_inputs = len(inputs)
    ctx.param_shapes = [(*inputs[0].shape[:2], *p.shape[-2:]) for p in params]


def _kept_and_gradients(ctx, d_out, d_params):
    """What _keep_for_backward kept, (inputs, starts), and the gradients of Z_bar and of the final weights, zeros
    where none reached them."""
    saved = ctx.saved_tensors  # once: activation checkpointing allows a single unpack
    inputs, starts = saved[:ctx.num_inputs], list(saved[ctx.num_inputs:])
    if not starts:
        raise RuntimeError("a backward through a TTT scan that ran with keep_starts=False (without gradients)")
    q = inputs[0]
    d_out = torch.zeros_like(q) if d_out is None else d_out
    d_params = [q.new_zeros(shape) if d is None else d for d, shape in zip(d_params, ctx.param_shapes)]
    return inputs, starts, d_out, d_params


@torch.library.custom_op("ttt::linear_scan", mutates_args=())
def linear_scan_op(q: Tensor, k: Tensor, target: Tensor, eta_qk: Tensor, e: Tensor, W0: Tensor, b0: Tensor,
                   gamma: Tensor, beta: Tensor, keep_starts: bool, triton: bool
                   ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """linear_scan_forward, or its Triton kernels (ttt_kernels.py) when `triton`, whose starting weights come
    as one span of n."""
    if triton:
        out, W, b, W_starts, b_starts = ttt_kernels.linear_scan_forward(
            q, k, target, eta_qk, e, W0, b0, gamma, beta, ttt_math.TTT_NORM_EPS, keep_starts)
        return out, W, b, [W_starts, b_starts] if keep_starts else []
    return linear_scan_forward(q, k, target, eta_qk, e, W0, b0, gamma, beta, keep_starts)


@linear_scan_op.register_fake
def _(q, k, target, eta_qk, e, W0, b0, gamma, beta, keep_starts, triton):
    final = [q.new_empty(*q.shape[:2], *p.shape[-2:]) for p in (W0, b0)]
    return q.new_empty(q.shape), *final, span_starts_like(q, (W0, b0), keep_starts, triton)


@torch.library.custom_op("ttt::linear_scan_backward", mutates_args=())
def linear_scan_backward_op(q: Tensor, k: Tensor, target: Tensor, eta_qk: Tensor, e: Tensor, gamma: Tensor,
                            beta: Tensor, starts: list[Tensor], d_out: Tensor, d_W: Tensor, d_b: Tensor,
                            triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                   Tensor]:
    """The gradients of q, k, target, eta_qk, e, W0, b0, gamma and beta: by spans through linear_backward_through,
    or the Triton kernels when `triton`."""
    if triton:
        return ttt_kernels.linear_scan_backward(q, k, target, eta_qk, e, gamma, beta, *starts, d_out, d_W, d_b,
                                                ttt_math.TTT_NORM_EPS)
    return backward_by_spans(linear_backward_through, (q, k, target, eta_qk, e), starts, d_out, gamma, beta,
                             (d_W, d_b))


@linear_scan_backward_op.register_fake
def _(q, k, target, eta_qk, e, gamma, beta, starts, d_out, d_W, d_b, triton):
    return tuple(t.new_empty(t.shape) for t in (q, k, target, eta_qk, e, d_W, d_b, gamma, beta))


def _linear_scan_setup_context(ctx, inputs, output):
    q, k, target, eta_qk, e, W0, b0, gamma, beta, _, triton = inputs
    _keep_for_backward(ctx, (q, k, target, eta_qk, e, gamma, beta), (W0, b0), output[3])
    ctx.triton = triton


def _linear_scan_backward(ctx, d_out, d_W, d_b, _):
    inputs, starts, d_out, d_params = _kept_and_gradients(ctx, d_out, (d_W, d_b))
    return (*linear_scan_backward_op(*inputs, starts, d_out, *d_params, ctx.triton), None, None)


linear_scan_op.register_autograd(_linear_scan_backward, setup_context=_linear_scan_setup_context)


@torch.library.custom_op("ttt::mlp_scan", mutates_args=())
def mlp_scan_op(q: Tensor, k: Tensor, target: Tensor, eta: Tensor, eta_qk: Tensor, e: Tensor, W1: Tensor,
                b1: Tensor, W2: Tensor, b2: Tensor, gamma: Tensor, beta: Tensor, keep_starts: bool, triton: bool
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """mlp_scan_forward, or its Triton kernel (ttt_kernels.py) when `triton`, whose starting weights come as one
    span of n."""
    if triton:
        return ttt_kernels.mlp_scan_forward(q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta,
                                            ttt_math.TTT_NORM_EPS, keep_starts)
    return mlp_scan_forward(q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta, keep_starts)


@mlp_scan_op.register_fake
def _(q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta, keep_starts, triton):
    params = (W1, b1, W2, b2)
    final = [q.new_empty(*q.shape[:2], *p.shape[-2:]) for p in params]
    return q.new_empty(q.shape), *final, span_starts_like(q, params, keep_starts, triton)


@torch.library.custom_op("ttt::mlp_scan_backward", mutates_args=())
def mlp_scan_backward_op(q: Tensor, k: Tensor, target: Tensor, eta: Tensor, eta_qk: Tensor, e: Tensor,
                         gamma: Tensor, beta: Tensor, starts: list[Tensor], d_out: Tensor, d_W1: Tensor,
                         d_b1: Tensor, d_W2: Tensor, d_b2: Tensor, triton: bool
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                    Tensor, Tensor]:
    """The gradients of q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma and beta, by spans through
    mlp_backward_through, walking back through each span in a Triton kernel when `triton`."""
    backward_through = mlp_backward_through
    if triton:
        starts = split_into_spans(q, starts)
        backward_through = functools.partial(mlp_backward_through, walk_back=ttt_kernels.mlp_walk_back)
    return backward_by_spans(backward_through, (q, k, target, eta, eta_qk, e), starts, d_out, gamma, beta,
                             (d_W1, d_b1, d_W2, d_b2))


@mlp_scan_backward_op.register_fake
def _(q, k, target, eta, eta_qk, e, gamma, beta, starts, d_out, d_W1, d_b1, d_W2, d_b2, triton):
    return tuple(t.new_empty(t.shape) for t in (q, k, target, eta, eta_qk, e, d_W1, d_b1, d_W2, d_b2, gamma, beta))


def _mlp_scan_setup_context(ctx, inputs, output):
    q, k, target, eta, eta_qk, e, W1, b1, W2, b2, gamma, beta, _, triton = inputs
    _keep_for_backward(ctx, (q, k, target, eta, eta_qk, e, gamma, beta), (W1, b1, W2, b2), output[5])
    ctx.triton = triton


def _mlp_scan_backward(ctx, d_out, d_W1, d_b1, d_W2, d_b2, _):
    inputs, starts, d_out, d_params = _kept_and_gradients(ctx, d_out, (d_W1, d_b1, d_W2, d_b2))
    return (*mlp_scan_backward_op(*inputs, starts, d_out, *d_params, ctx.triton), None, None)


mlp_scan_op.register_autograd(_mlp_scan_backward, setup_context=_mlp_scan_setup_context)
