# Copyright 2026 the TTT-LM PyTorch authors. MIT License.
"""TTT-Linear and TTT-MLP language models (Sun et al., "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States", arXiv 2407.04620) as a Hugging Face causal LM.

The hidden state of each TTT layer is a small inner model f_W (linear, or a 2-layer MLP) trained by
gradient descent on a self-supervised reconstruction loss while the sequence is read. Parameter names,
shapes, initialisation and numerics follow the official PyTorch implementation
(test-time-training/ttt-lm-pytorch, commit cd831db), so its checkpoints load here and give the same logits.

Notation in comments: B batch, T length, C hidden size, H heads, f = C / H head dim, K mini-batch size,
n full mini-batches, k length of one mini-batch segment (k <= K).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

# The modules beside this file: top-level modules in this repository (or where pip installed it); relative ones in
# a saved model folder, which transformers imports as a package (auto_map, trust_remote_code=True). The `from .x`
# form is also how transformers finds the files a model needs (save_pretrained copies them beside the weights).
try:
    from .ttt_math import TTT_NORM_EPS, gelu_tanh_grad, ln_fwd, ln_reconstruction_grad  # shared with ttt_scan.py
except ImportError:
    if __package__:
        raise
    from ttt_math import TTT_NORM_EPS, gelu_tanh_grad, ln_fwd, ln_reconstruction_grad

try:  # the recomputing scans (and through them the Triton kernels); without ttt_scan.py: the loop scan
    try:
        from .ttt_scan import linear_scan_op, mlp_scan_op, why_not_triton
    except ImportError:
        if __package__:
            raise
        from ttt_scan import linear_scan_op, mlp_scan_op, why_not_triton
    HAS_SCANS = True
except ModuleNotFoundError as error:
    if not (error.name or "").endswith("ttt_scan"):
        raise
    HAS_SCANS = False

logger = logging.get_logger(__name__)

TTT_LAYER_TYPES = ("linear", "mlp")
SCAN_IMPLEMENTATIONS = ("auto", "triton", "recomputing", "loop")  # see TTTConfig.scan_implementation

# The name under which the installed transformers hands the decoding state to forward() and reads it back from
# the outputs: `cache` since its 5.x rename, `past_key_values` before. The model takes either.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# The paper's sizes (Table 3 / the official TTT_STANDARD_CONFIGS) plus `tiny`, which trains on a laptop CPU.
TTT_STANDARD_CONFIGS = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "1b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=32),
}

# The official code hard-codes eps=1e-6 for the TTT LayerNorms and std=0.02 for W1/W2/the lr gate.
INNER_INIT_STD = 0.02


class TTTConfig(PreTrainedConfig):
    r"""Configuration of a TTT language model. Defaults are the official ones (the 1b size, Transformer backbone).

    ttt_layer_type: `"linear"` (TTT-Linear) or `"mlp"` (TTT-MLP, inner MLP of width 4f).
    ttt_base_lr: eta_base of the per-token inner learning rate eta(x) = eta_base * sigmoid(theta_lr . x) / f.
    mini_batch_size: K, the number of tokens whose gradients are taken at the same inner weights.
    pre_conv / conv_kernel / share_qk / use_gate: the Mamba-backbone options of the paper (all three on =
        the paper's "Mamba backbone"; all off = its "Transformer backbone").
    scan_implementation: how a TTT layer runs its full mini-batches (the outputs are the same to rounding):
        `"loop"`, the loop over mini-batches through autograd (TTTBase.loop_scan, the
        readable reference); `"recomputing"`, the scan of ttt_scan.py that keeps only the inner weights at each
        mini-batch start and recomputes the rest in a hand-written backward, in PyTorch; `"triton"`, that scan on
        the Triton kernels of ttt_kernels.py (CUDA, float32, the shapes they support; an error elsewhere);
        `"auto"` (default), Triton where it runs, else recomputing (saying once why, on a GPU). Saved in
        config.json like any field; any checkpoint runs under any of them.
    scan_checkpoint_group_size: when > 0, the loop scan under activation checkpointing in groups of this many
        mini-batches (as JAX's `remat_mini_batch_group_size`; the official PyTorch file reads it as a number of
        groups), whatever scan_implementation says. Gradients are unchanged.
    """

    model_type = "ttt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pretraining_tp: int = 1
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    use_gate: bool = False
    share_qk: bool = False
    ttt_layer_type: str = "linear"
    ttt_base_lr: float = 1.0
    mini_batch_size: int = 16
    pre_conv: bool = False
    conv_kernel: int = 4
    scan_checkpoint_group_size: int = 0
    scan_implementation: str = "auto"

    def __post_init__(self, **kwargs):
        if self.ttt_layer_type not in TTT_LAYER_TYPES:
            raise ValueError(f"ttt_layer_type must be one of {TTT_LAYER_TYPES}, got {self.ttt_layer_type!r}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "mini_batch_size", "conv_kernel"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer (>= 1), got {value!r}")
        for field in ("ttt_base_lr", "rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{field} must be a finite number > 0, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"hidden_size / num_attention_heads must be even for RoPE, got "
                f"{self.hidden_size // self.num_attention_heads}"
            )
        if self.scan_implementation not in SCAN_IMPLEMENTATIONS:
            raise ValueError(f"scan_implementation must be one of {SCAN_IMPLEMENTATIONS}, "
                             f"got {self.scan_implementation!r}")
        group = self.scan_checkpoint_group_size
        if not isinstance(group, int) or isinstance(group, bool) or group < 0:
            raise ValueError(f"scan_checkpoint_group_size must be an integer >= 0 (0 disables it), got {group!r}")
        super().__post_init__(**kwargs)

    @classmethod
    def from_size(cls, size: str, **kwargs) -> "TTTConfig":
        """A standard size (`tiny`, `125m`, `350m`, `760m`, `1b`) with any field overridden by `kwargs`."""
        if size not in TTT_STANDARD_CONFIGS:
            raise ValueError(f"model size must be one of {list(TTT_STANDARD_CONFIGS)}, got {size!r}")
        return cls(**{**TTT_STANDARD_CONFIGS[size], **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# Backbone pieces


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        # Normalised in float32 and cast back *before* the weight, as the official model does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGluMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def causal_depthwise_conv(conv: nn.Conv1d, x, state=None):
    """y_t = bias + sum_j w_j x_{t-k+1+j} per channel. x: (B, T, C); state: (B, C, k-1) previous inputs or None
    (zeros). Returns y (B, T, C) and the new state (the last k-1 inputs), so any chunking gives the same y."""
    k = conv.kernel_size[0]
    x = x.transpose(1, 2)  # (B, C, T)
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], k - 1)
    x = torch.cat([state.to(x.dtype), x], dim=-1)
    y = F.conv1d(x, conv.weight, conv.bias, groups=conv.groups)
    return y.transpose(1, 2), x[..., x.shape[-1] - (k - 1):]


class Conv(nn.Module):
    """The Mamba backbone's residual temporal convolution before the TTT layer (`pre_conv`)."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, config.conv_kernel,
                              groups=config.hidden_size, padding=config.conv_kernel - 1)

    def forward(self, hidden_states, cache=None, layer_idx=None):
        state = cache.conv_state(layer_idx, "pre_conv") if cache is not None else None
        out, state = causal_depthwise_conv(self.conv, self.norm(hidden_states), state)
        if cache is not None:
            cache.set_conv_state(layer_idx, "pre_conv", state)
        return out


def rotate_interleaved(x, cos, sin):
    """RoPE on adjacent pairs (x[2i], x[2i+1]), as in the JAX code. x: (B, H, T, f); cos, sin: (T, f/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------------------------
# Mini-batch TTT


class MiniBatch(NamedTuple):
    """One mini-batch segment (or n of them stacked on dim 2). k <= K tokens that all take their inner gradient
    at the weights the mini-batch started with."""

    q: torch.Tensor  # (B, H, k, f) test view
    k: torch.Tensor  # (B, H, k, f) training view
    target: torch.Tensor  # (B, H, k, f) reconstruction target v - k
    lr: torch.Tensor  # (B, H, k, 1) per-token inner learning rate eta_base * sigmoid(.) / f
    c: torch.Tensor  # (k, 1) position factor c_i = max(0, 1/(i+1) + tau_i) of each row
    eta: torch.Tensor  # (B, H, k, k) eta_ij = c_i lr_j for j <= i, else 0
    eta_qk: torch.Tensor  # (B, H, k, k) eta_ij (q_i . k_j + 1): the dual form's first-layer mixing matrix
    ends_mini_batch: bool  # whether the last row is position K-1, after which the weights move


class InnerState(NamedTuple):
    """The TTT hidden state: the inner weights at the start of the current mini-batch, and for a partly read
    mini-batch the sums over its tokens so far of lr_j * grad l_j (None when at a mini-batch boundary)."""

    params: tuple  # linear: (W1 (B,H,f,f), b1 (B,H,1,f)); mlp: (W1, b1, W2, b2)
    grad_sums: tuple | None

    def advance(self, grad_sums, mb: MiniBatch):
        """theta_{K-1} = theta_0 - c_{K-1} * sum_j lr_j grad l_j(theta_0) when the mini-batch is complete."""
        if self.grad_sums is not None:
            grad_sums = tuple(s + g for s, g in zip(self.grad_sums, grad_sums))
        if not mb.ends_mini_batch:
            return InnerState(self.params, grad_sums)
        c_last = mb.c[-1]
        return InnerState(tuple(p - c_last * s for p, s in zip(self.params, grad_sums)), None)


def dense_at_row_weights(x, weight, bias, weight_sum, bias_sum, c):
    """x_i W_i + b_i for the weights before this segment's own steps, W_i = W0 - c_i * weight_sum."""
    out = x @ weight + bias
    if weight_sum is not None:
        out = out - c * (x @ weight_sum + bias_sum)
    return out


class LinearInnerModel:
    """TTT-Linear's inner model f(x) = x W1 + b1, per head: its parameters (the layer's W1, b1, the learnable
    initial hidden state), f itself, and one mini-batch of TTT in the dual form. A mixin of the TTT layer."""

    def init_inner_params(self, H, f):
        self.W1 = nn.Parameter(torch.normal(0, INNER_INIT_STD, size=(H, f, f)))
        self.b1 = nn.Parameter(torch.zeros(H, 1, f))

    def initial_params(self):
        return (self.W1, self.b1)

    def recomputing_scan_of(self, q, k, target, eta, eta_qk, e, W1, b1, gamma, beta, *, keep_starts, triton):
        # eta is unused: TTT-Linear's dual form needs only eta_qk
        return linear_scan_op(q, k, target, eta_qk, e, W1, b1, gamma, beta, keep_starts, triton)[:3]

    def inner_forward(self, params, x):
        W1, b1 = params
        return x @ W1 + b1

    def mini_batch_step(self, state, mb):
        W1, b1 = state.params
        sums = state.grad_sums or (None, None)
        gamma, beta = self.ttt_norm_weight.unsqueeze(1), self.ttt_norm_bias.unsqueeze(1)
        # gradients of every token at the mini-batch's starting weights
        z1 = mb.k @ W1 + b1
        grad_z1 = ln_reconstruction_grad(z1, mb.target, gamma, beta)
        # dual form: Z_bar = Q W_0 + b_0 - (eta * (Q K^T + 1)) G, never materialising each token's W_i
        z_bar = dense_at_row_weights(mb.q, W1, b1, *sums, mb.c) - mb.eta_qk @ grad_z1
        lr_grad = mb.lr * grad_z1
        grad_sums = (mb.k.transpose(-1, -2) @ lr_grad, lr_grad.sum(-2, keepdim=True))
        return z_bar, state.advance(grad_sums, mb)


class MLPInnerModel:
    """TTT-MLP's inner model f(x) = GELU(x W1 + b1) W2 + b2 with hidden width 4f, per head: its parameters, f
    itself, and one mini-batch of TTT in the dual form, layer by layer. A mixin of the TTT layer."""

    def init_inner_params(self, H, f):
        self.W1 = nn.Parameter(torch.normal(0, INNER_INIT_STD, size=(H, f, 4 * f)))
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * f))
        self.W2 = nn.Parameter(torch.normal(0, INNER_INIT_STD, size=(H, 4 * f, f)))
        self.b2 = nn.Parameter(torch.zeros(H, 1, f))

    def initial_params(self):
        return (self.W1, self.b1, self.W2, self.b2)

    def recomputing_scan_of(self, *inputs, keep_starts, triton):
        return mlp_scan_op(*inputs, keep_starts, triton)[:5]

    def inner_forward(self, params, x):
        W1, b1, W2, b2 = params
        return F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2

    def mini_batch_step(self, state, mb):
        W1, b1, W2, b2 = state.params
        sums = state.grad_sums or (None,) * 4
        gamma, beta = self.ttt_norm_weight.unsqueeze(1), self.ttt_norm_bias.unsqueeze(1)
        # forward and backward of the inner MLP on the training view, at the starting weights
        z1 = mb.k @ W1 + b1
        x2 = F.gelu(z1, approximate="tanh")
        z2 = x2 @ W2 + b2
        grad_z2 = ln_reconstruction_grad(z2, mb.target, gamma, beta)
        grad_z1 = (grad_z2 @ W2.transpose(-1, -2)) * gelu_tanh_grad(z1)
        # dual form, layer by layer, on the test view
        z1_bar = dense_at_row_weights(mb.q, W1, b1, sums[0], sums[1], mb.c) - mb.eta_qk @ grad_z1
        x2_bar = F.gelu(z1_bar, approximate="tanh")
        eta_x2 = mb.eta * (x2_bar @ x2.transpose(-1, -2) + 1)
        z2_bar = dense_at_row_weights(x2_bar, W2, b2, sums[2], sums[3], mb.c) - eta_x2 @ grad_z2
        lr_grad_z1, lr_grad_z2 = mb.lr * grad_z1, mb.lr * grad_z2
        grad_sums = (mb.k.transpose(-1, -2) @ lr_grad_z1, lr_grad_z1.sum(-2, keepdim=True),
                     x2.transpose(-1, -2) @ lr_grad_z2, lr_grad_z2.sum(-2, keepdim=True))
        return z2_bar, state.advance(grad_sums, mb)


# ----------------------------------------------------------------------------------------------------------------
# The TTT layer


class TTTBase(nn.Module):
    """A TTT layer: projections to the training view k, test view q and label view v, the per-token inner learning
    rate eta, RoPE inside each mini-batch, the inner model's mini-batch scan, post LayerNorm, optional gate, o_proj.

    The inner model comes as a mixin (LinearInnerModel, MLPInnerModel): `init_inner_params(H, f)` makes its
    parameters, `initial_params()` gives theta_0 (the learnable initial hidden state),
    `inner_forward(params, x)` is f_W(x), `mini_batch_step(state, mb)` returns Z_bar, the pre-LayerNorm
    outputs f_{W_i}(q_i) of every row of one mini-batch in the dual form, and the next InnerState, and
    `recomputing_scan_of(q, k, target, eta, eta_qk, e, *params, gamma, beta, keep_starts=, triton=)` runs the
    recomputing scan of ttt_scan.py over stacked full mini-batches, returning Z_bar and the final params."""

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.width = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.mini_batch_size = config.mini_batch_size
        C, H, f, K = self.width, self.num_heads, self.head_dim, self.mini_batch_size

        # tau, the learnable offset of the position factor c_i = 1/(i+1) + tau_i
        self.learnable_token_idx = nn.Parameter(torch.zeros(K))
        # theta_lr: eta(x) = eta_base * sigmoid(x . w_h + b_h) / f, per head, from the layer input
        self.learnable_ttt_lr_weight = nn.Parameter(torch.normal(0, INNER_INIT_STD, size=(H, 1, C)))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        # the inner model's LayerNorm (part of f, and of the layer's output q + LN(f(q)))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, f))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, f))

        self.q_proj = nn.Linear(C, C, bias=False)
        if not config.share_qk:
            self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)
        if config.share_qk:
            self.conv_q = nn.Conv1d(C, C, config.conv_kernel, groups=C, padding=config.conv_kernel - 1)
            self.conv_k = nn.Conv1d(C, C, config.conv_kernel, groups=C, padding=config.conv_kernel - 1)
        if config.use_gate:
            self.g_proj = nn.Linear(C, C, bias=False)
        self.post_norm = nn.LayerNorm(C, eps=TTT_NORM_EPS)
        self.statistics = None  # a list while TTTForCausalLM.ttt_statistics records the inner losses
        self.init_inner_params(H, f)  # the inner model's, registered last as in the official model

    # -- views, learning rate, RoPE
    def views(self, x, cache):
        """q, k, v of shape (B, H, T, f) from the layer input x (B, T, C)."""
        if self.config.share_qk:
            shared = self.q_proj(x)
            q, q_state = causal_depthwise_conv(self.conv_q, shared, self._conv_state(cache, "conv_q"))
            k, k_state = causal_depthwise_conv(self.conv_k, shared, self._conv_state(cache, "conv_k"))
            if cache is not None:
                cache.set_conv_state(self.layer_idx, "conv_q", q_state)
                cache.set_conv_state(self.layer_idx, "conv_k", k_state)
        else:
            q, k = self.q_proj(x), self.k_proj(x)
        v = self.v_proj(x)
        B, T, _ = x.shape
        return [t.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]

    def _conv_state(self, cache, name):
        return cache.conv_state(self.layer_idx, name) if cache is not None else None

    def inner_lr(self, x):
        """lr_t = eta_base * sigmoid(x_t . w_h + b_h) / f: (B, H, T, 1)."""
        logits = torch.einsum("btc,hc->bht", x, self.learnable_ttt_lr_weight.squeeze(1))
        logits = logits + self.learnable_ttt_lr_bias
        return (self.config.ttt_base_lr * torch.sigmoid(logits) / self.head_dim).unsqueeze(-1)

    def rope(self, positions, dtype):
        """cos, sin (T, f/2) for in-mini-batch positions t mod K, frequencies theta^(-2i/f)."""
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim))
        angles = positions.float()[:, None] * inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def position_factor(self, device):
        """c_i = max(0, 1/(i+1) + tau_i), i = 0..K-1 (turns the sum over the mini-batch into a running mean)."""
        base = 1.0 / torch.arange(1, self.mini_batch_size + 1, dtype=torch.float32, device=device)
        return F.relu(base.to(self.learnable_token_idx.dtype) + self.learnable_token_idx)

    def make_mini_batch(self, q, k, target, lr, c, ends_mini_batch):
        """Dual-form inputs for one segment (dims (..., k, f)) or n stacked full mini-batches ((B, H, n, K, f))."""
        size = q.shape[-2]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        eta = torch.where(causal, c * lr.transpose(-1, -2), 0.0)  # eta_ij = c_i lr_j, j <= i
        eta_qk = eta * (q @ k.transpose(-1, -2) + 1)
        return MiniBatch(q, k, target, lr, c, eta, eta_qk, ends_mini_batch)

    # -- the layer
    def forward(self, x, cache=None):
        B, T, C = x.shape
        K = self.mini_batch_size
        offset = cache.seqlen_offset if cache is not None else 0
        in_batch = (offset + torch.arange(T, device=x.device)) % K  # position inside the mini-batch

        q, k, v = self.views(x, cache)
        cos, sin = self.rope(in_batch, q.dtype)
        q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)
        target = v - k  # the inner model learns k -> v - k; with its residual, k -> v
        lr = self.inner_lr(x)
        c = self.position_factor(x.device)[in_batch].unsqueeze(-1)  # (T, 1)

        state = cache.inner_state(self.layer_idx) if cache is not None else None
        if state is None:
            state = InnerState(tuple(p.unsqueeze(0).expand(B, *p.shape) for p in self.initial_params()), None)

        # Segments: the rest of a partly read mini-batch, the full mini-batches (one batched scan), the remainder.
        head = min(T, (K - offset % K) % K)
        n = (T - head) // K
        outputs = []
        if head:
            out, state = self.mini_batch_step(state, self.make_mini_batch(
                q[:, :, :head], k[:, :, :head], target[:, :, :head], lr[:, :, :head], c[:head],
                offset % K + head == K))
            outputs.append(out)
        if n:
            span = slice(head, head + n * K)
            stacked = [t[:, :, span].reshape(B, self.num_heads, n, K, -1) for t in (q, k, target, lr)]
            out, state = self.scan(state, self.make_mini_batch(*stacked, c[head:head + K], True))
            outputs.append(out)
        if head + n * K < T:
            rest = slice(head + n * K, T)
            out, state = self.mini_batch_step(state, self.make_mini_batch(
                q[:, :, rest], k[:, :, rest], target[:, :, rest], lr[:, :, rest], c[rest], False))
            outputs.append(out)
        if cache is not None:
            cache.set_inner_state(self.layer_idx, state)

        z_bar = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]  # (B, H, T, f)
        out = q + ln_fwd(z_bar, self.ttt_norm_weight.unsqueeze(1), self.ttt_norm_bias.unsqueeze(1))
        out = self.post_norm(out.transpose(1, 2).reshape(B, T, C))
        if self.config.use_gate:
            out = out * F.gelu(self.g_proj(x), approximate="tanh")
        return self.o_proj(out)

    def scan_implementation(self, q, dtype) -> str:
        """Which scan runs the stacked mini-batches q (B, H, n, K, f) in `dtype`: config.scan_implementation, with
        "auto" the Triton kernels where they run, else the recomputing scan in PyTorch. The statistics (per
        mini-batch values) and scan_checkpoint_group_size need the loop."""
        requested = self.config.scan_implementation
        if self.statistics is not None or self.config.scan_checkpoint_group_size or requested == "loop":
            return "loop"
        if not HAS_SCANS:  # ttt.py copied without ttt_scan.py
            if requested != "auto":
                raise RuntimeError(f"scan_implementation={requested!r} needs ttt_scan.py beside ttt.py")
            if not torch.compiler.is_compiling():
                logger.warning_once("ttt_scan.py is not beside ttt.py: TTT layers run the loop scan (slower)")
            return "loop"
        if requested == "recomputing":
            return "recomputing"
        why_not = why_not_triton(q, dtype, self.config.ttt_layer_type)
        if why_not is None:
            return "triton"
        if requested == "triton":
            raise ValueError(f"scan_implementation='triton' cannot run here: {why_not}")
        if q.is_cuda and not torch.compiler.is_compiling():  # on a CPU the recomputing scan is the fastest
            logger.warning_once(f"TTT scan: the Triton kernels cannot run ({why_not}); using the recomputing scan "
                                f"in PyTorch (slower on a GPU)")
        return "recomputing"

    def scan(self, state: InnerState, stacked: MiniBatch):
        """Runs mini_batch_step over n full mini-batches stacked on dim 2; outputs (B, H, n*K, f)."""
        gamma, beta = self.ttt_norm_weight.unsqueeze(1), self.ttt_norm_bias.unsqueeze(1)
        # the inner state in float32 at least, never below the inputs (a float64 model scans in float64)
        scan_dtype = torch.promote_types(torch.promote_types(stacked.q.dtype, state.params[0].dtype), torch.float32)
        implementation = self.scan_implementation(stacked.q, scan_dtype)
        if implementation == "loop":
            return self.loop_scan(state, stacked)
        e = stacked.lr * stacked.c[-1]  # the last row of eta, c_{K-1} lr_j: it moves the inner weights
        with torch.autocast(stacked.q.device.type, enabled=False):
            inputs = [t.to(scan_dtype) for t in (stacked.q, stacked.k, stacked.target, stacked.eta, stacked.eta_qk,
                                                 e, *state.params, gamma, beta)]
            # only a backward reads the weights at each mini-batch start: no need to keep them without one
            keep_starts = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
            out, *params = self.recomputing_scan_of(*inputs, keep_starts=keep_starts,
                                                    triton=implementation == "triton")
        dtype = state.params[0].dtype
        return out.flatten(2, 3).to(stacked.q.dtype), InnerState(tuple(p.to(dtype) for p in params), None)

    def loop_scan(self, state: InnerState, stacked: MiniBatch):
        n = stacked.q.shape[2]
        # unbind, not indexing: the backward of t[:, :, i] writes a full-size zero gradient per mini-batch, O(n^2)
        fields = ("q", "k", "target", "lr", "eta", "eta_qk")
        slices = {name: getattr(stacked, name).unbind(2) for name in fields}
        per_mini_batch = [stacked._replace(**{name: slices[name][i] for name in fields}) for i in range(n)]
        group = self.config.scan_checkpoint_group_size
        outputs = []
        if group and self.training and torch.is_grad_enabled():
            for start in range(0, n, group):
                params, outs = torch.utils.checkpoint.checkpoint(
                    self._run_group, state, per_mini_batch[start:start + group], use_reentrant=False)
                state = InnerState(params, None)
                outputs.extend(outs)
        else:
            initial = state
            for mb in per_mini_batch:
                out, next_state = self.mini_batch_step(state, mb)
                if self.statistics is not None:
                    self.statistics.append([self.reconstruction_error(s.params, mb)
                                            for s in (initial, state, next_state)])
                state = next_state
                outputs.append(out)
        return torch.cat(outputs, dim=2), state

    def reconstruction_error(self, params, mb: MiniBatch) -> float:
        """The inner loss of a mini-batch's last token as the JAX code logs it: mean over the f features of
        (LN(f(k)) - (v - k))^2 under the inner weights `params`, averaged over batch and heads."""
        gamma, beta = self.ttt_norm_weight.unsqueeze(1), self.ttt_norm_bias.unsqueeze(1)
        prediction = ln_fwd(self.inner_forward(params, mb.k[:, :, -1:]), gamma, beta)
        return (prediction - mb.target[:, :, -1:]).pow(2).mean().item()

    def _run_group(self, state, mini_batches):
        outs = []
        for mb in mini_batches:
            out, state = self.mini_batch_step(state, mb)
            outs.append(out)
        return state.params, outs


class TTTLinear(LinearInnerModel, TTTBase):
    """TTT-Linear: the TTT layer whose hidden state is a linear model."""


class TTTMLP(MLPInnerModel, TTTBase):
    """TTT-MLP: the TTT layer whose hidden state is a two-layer MLP."""


TTT_LAYER_CLASSES = {"linear": TTTLinear, "mlp": TTTMLP}


# ----------------------------------------------------------------------------------------------------------------
# Block


class Block(GradientCheckpointingLayer):
    """[h += Conv(RMSNorm(h))] ; h += TTT(RMSNorm(h)) ; h += SwiGLU(RMSNorm(h))."""

    def __init__(self, config: TTTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        if config.pre_conv:
            self.conv = Conv(config)
        self.seq_modeling_block = TTT_LAYER_CLASSES[config.ttt_layer_type](config, layer_idx)
        self.mlp = SwiGluMLP(config)
        self.seq_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cache=None):
        if hasattr(self, "conv"):
            hidden_states = hidden_states + self.conv(hidden_states, cache, self.layer_idx)
        hidden_states = hidden_states + self.seq_modeling_block(self.seq_norm(hidden_states), cache)
        return hidden_states + self.mlp(self.ffn_norm(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Cache


class TTTCache:
    """Decoding state of a TTT model. Per layer: the inner weights at the start of the current mini-batch and the
    running sums of lr-weighted gradients of its tokens so far, and the last k-1 inputs of each causal conv.
    Its size does not depend on how many tokens were read. States are created by the first call."""

    # What generate() asks of a cache: not compilable, not croppable (a recurrent state cannot be rolled back), and
    # not "linear" in transformers' sense, because it counts the tokens it has read (get_seq_length): generate()
    # then feeds only the tokens it has not read, as with a KV cache, when a sequence is continued with a cache.
    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.seqlen_offset = 0
        self.inner_states: list[InnerState | None] = [None] * num_layers
        self.conv_states: list[dict] = [{} for _ in range(num_layers)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seqlen_offset

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    def inner_state(self, layer_idx):
        return self.inner_states[layer_idx]

    def set_inner_state(self, layer_idx, state: InnerState):
        self.inner_states[layer_idx] = state

    def conv_state(self, layer_idx, name):
        return self.conv_states[layer_idx].get(name)

    def set_conv_state(self, layer_idx, name, state):
        self.conv_states[layer_idx][name] = state

    def tensors(self):
        for state in self.inner_states:
            if state is not None:
                yield from state.params
                yield from state.grad_sums or ()
        for convs in self.conv_states:
            yield from convs.values()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Select batch rows (beam search)."""
        pick = lambda t: t.index_select(0, beam_idx.to(t.device))
        self.inner_states = [
            None if s is None else InnerState(tuple(map(pick, s.params)),
                                              None if s.grad_sums is None else tuple(map(pick, s.grad_sums)))
            for s in self.inner_states
        ]
        self.conv_states = [{name: pick(t) for name, t in convs.items()} for convs in self.conv_states]


def decoding_state(cache, past_key_values, cache_class: type | None = None):
    """The decoding state passed under either name (transformers 5.x renamed `past_key_values` to `cache`), which
    must be a `cache_class` (default TTTCache; ttt_e2e.py passes its E2ECache)."""
    cache_class = cache_class or TTTCache
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise TypeError("pass the decoding state once, as `cache` or as `past_key_values`, not both")
    state = cache if cache is not None else past_key_values
    if state is not None and not isinstance(state, cache_class):
        raise TypeError(f"this model decodes through a {cache_class.__name__}, got {type(state).__name__}")
    return state


# ----------------------------------------------------------------------------------------------------------------
# The loss without whole-sequence logits

LOSS_BLOCK = 1024  # positions whose logits exist at once in a loss: [B, 1024, V] in float32


def token_cross_entropy(logits, targets):
    """[B, T] cross-entropy of logits [B, T, V] (in float32, float64 for a float64 model) against targets, 0 where
    the target is -100."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none") * (targets != -100)


def token_nll(hidden_states, head, targets, block: int = LOSS_BLOCK):
    """[B, T] cross-entropy of head(hidden_states[:, t]) (in float32, float64 for a float64 model) against
    targets[:, t], 0 where the target is -100. One block of positions at a time, each block's logits recomputed
    in the backward: neither pass holds the [B, T, V] logits (with a 128K vocabulary those are 4 GB per 8K
    tokens). The blocks are a split, not slices, whose backward would add each block's gradient into a zero tensor
    of the whole sequence (quadratic in T)."""
    def block_nll(h, t):
        return token_cross_entropy(head(h), t)

    pieces = []
    for h, t in zip(hidden_states.split(block, 1), targets.split(block, 1), strict=True):  # split: see the docstring
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            pieces.append(torch.utils.checkpoint.checkpoint(block_nll, h, t, use_reentrant=False))
        else:
            pieces.append(block_nll(h, t))
    return torch.cat(pieces, 1)


def next_token_targets(labels):
    """targets[:, t] = labels[:, t + 1] (the token position t predicts); the last position has none (-100)."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


# ----------------------------------------------------------------------------------------------------------------
# Models


class TTTPreTrainedModel(PreTrainedModel):
    config_class = TTTConfig
    config: TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Conv1d):
            # PyTorch's default Conv1d init, as in the official model (U(+-1/sqrt(k)) for weight and bias)
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.weight.shape[1] * module.weight.shape[2])
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TTTBase):
            init.zeros_(module.learnable_token_idx)
            init.normal_(module.learnable_ttt_lr_weight, mean=0.0, std=INNER_INIT_STD)
            init.zeros_(module.learnable_ttt_lr_bias)
            init.ones_(module.ttt_norm_weight)
            init.zeros_(module.ttt_norm_bias)
            for name in ("W1", "W2"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name), mean=0.0, std=INNER_INIT_STD)
            for name in ("b1", "b2"):
                if hasattr(module, name):
                    init.zeros_(getattr(module, name))

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a KV cache; forward creates a TTTCache


class TTTModel(TTTPreTrainedModel):
    def __init__(self, config: TTTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, cache: TTTCache | None = None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, past_key_values: TTTCache | None = None,
                cache_position=None):
        """`cache` (`past_key_values` in transformers before 5.x's rename; either name is taken) is the decoding
        state; `cache_position`, passed by older generate(), is implied by it and not read. Any other keyword
        argument is a TypeError: nothing a caller passes is dropped unread."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"expected a (batch, length) input with length >= 1, got shape {tuple(tokens.shape)}")
        if input_ids is not None and not torch.compiler.is_compiling():  # a compiled graph does not sync here
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one synchronisation, not two
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("TTT models read every token in order and do not support padding "
                             "(attention_mask has zeros); pass unpadded sequences of equal length")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        cache = decoding_state(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = TTTCache(self.config.num_hidden_layers)
        cache = cache if use_cache else None

        hidden_states = inputs_embeds
        all_hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if cache is not None:
            cache.seqlen_offset += inputs_embeds.shape[1]
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_FIELD: cache},
        )
        return output if return_dict is not False else output.to_tuple()


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        self.model = TTTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def generate(self, *args, use_cache=True, **kwargs):
        """GenerationMixin.generate, decoding through the TTTCache unless use_cache=False: config.use_cache (False,
        the official default, also in configs without a generation_config.json) is about forward()."""
        return super().generate(*args, use_cache=use_cache, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, cache: TTTCache | None = None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep: int = 0,
                past_key_values: TTTCache | None = None, cache_position=None, num_items_in_batch=None,
                output_attentions=None, return_logits: bool | None = None):
        """TTTModel.forward's arguments, and `labels` (the loss is the mean cross-entropy of logits[:, :-1]
        against labels[:, 1:], ignore_index -100, or a sum over `num_items_in_batch` tokens as HF's Trainer
        asks under gradient accumulation), computed block by block (`token_nll`): with labels the logits are
        returned only when asked (`return_logits=True` or `logits_to_keep`), so a training step never holds
        [B, T, V]. `output_attentions` (which peft passes) must be falsy: a TTT layer has no attention weights."""
        if output_attentions:
            raise ValueError("TTT models have no attention weights (output_attentions=True)")
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, past_key_values=past_key_values,
                             output_hidden_states=output_hidden_states, return_dict=True)
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if labels is not None:
            nll = token_nll(hidden_states, self.lm_head, next_token_targets(labels))
            targets = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
            loss = nll.sum() / targets
        if return_logits or (return_logits is None and (labels is None or logits_to_keep)):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
            logits = self.lm_head(kept)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32; float64 stays
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
        return output if return_dict is not False else output.to_tuple()

    def next_token_losses(self, input_ids, block: int = LOSS_BLOCK):
        """[B, T] the cross-entropy of each position's prediction of the next token (0 at the last position),
        `block` positions at a time, without the [B, T, V] logits (evaluation by position at long context)."""
        hidden_states = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return token_nll(hidden_states, self.lm_head, next_token_targets(input_ids), block)

    @torch.no_grad()
    def ttt_statistics(self, input_ids) -> list:
        """Per layer, the inner reconstruction error of each full mini-batch's last token (the JAX code's "TTT
        statistics", as in the paper's Fig. 14): under the sequence's initial inner weights W_0 (`initial`), the
        weights at the start of its mini-batch (`before`), and after that mini-batch's update (`after`); and
        `update_factor`, c_{K-1}: the position factor of a mini-batch's last token, which scales the update the
        next mini-batch starts from (0 when the learned offset tau_{K-1} <= -1/K clamps it: then the inner
        weights carry nothing from one mini-batch to the next, as in the official formula).
        Returns [{"initial": [...], "before": [...], "after": [...], "update_factor": [c]} per layer], one value
        per mini-batch."""
        layers = [block.seq_modeling_block for block in self.model.layers]
        for layer in layers:
            layer.statistics = []
        try:
            self.model(input_ids=input_ids, use_cache=False)
            return [{**dict(zip(("initial", "before", "after"), map(list, zip(*layer.statistics)))),
                     "update_factor": [layer.position_factor(input_ids.device)[-1].item()]} for layer in layers]
        finally:
            for layer in layers:
                layer.statistics = None


AutoConfig.register("ttt", TTTConfig, exist_ok=True)
AutoModel.register(TTTConfig, TTTModel, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)
# save_pretrained writes this file and the ones it imports beside the weights, and an auto_map in config.json: the
# folder then loads in any process with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
TTTConfig.register_for_auto_class()
TTTModel.register_for_auto_class("AutoModel")
TTTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["TTTConfig", "TTTModel", "TTTForCausalLM", "TTTCache", "TTT_STANDARD_CONFIGS"]
