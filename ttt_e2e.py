# Copyright 2026 the TTT-LM PyTorch authors. MIT License.
"""TTT-E2E (Tandon, Dalal, Li, et al., "End-to-End Test-Time Training for Long Context", official JAX code
test-time-training/e2e) and its full-attention baseline, as Hugging Face causal LMs.

A Transformer with sliding-window attention whose last quarter of blocks ("suffix" blocks) carry an extra SwiGLU
MLP, the "prime" MLP, that keeps learning at test time: the sequence is read in chunks of `mini_batch_size`
tokens; each chunk is predicted with the current prime weights (the fast weights), then one step of gradient
descent on that chunk's next-token loss updates them (global-norm clip, plain SGD). Each sequence has its own fast
weights, initialised from meta-learned values. Training differentiates the mean chunk loss through the whole inner
loop, second-order terms included, into every parameter (the fast weights' initial values too).

What is computed follows the official code exactly (../shared/reference_e2e/SPEC.md and its fixture): QK-norm
before an interleaved-pair RoPE; sandwich norms around every sub-layer; the prime MLP as its own residual
sub-layer between attention and the ordinary MLP; the prefix blocks run once over the whole sequence (sliding
window, absolute positions); the suffix blocks run chunk by chunk over [the last `sliding_window` keys, the
chunk's own] with positions local to that buffer, keys cached after QK-norm and before RoPE; the inner loss masks
BOS targets; a sequence's loss is the unweighted mean of its chunk losses.

Notation in comments: B batch, T length, d hidden, H heads, f = d / H head dim, I MLP width, W window, b chunk
(mini_batch_size), s suffix blocks, V vocabulary.
"""

import bisect
import itertools
import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # ttt.py beside this file: top-level here, relative in a saved model folder (see the imports of ttt.py)
    from .ttt import CACHE_FIELD, LOSS_BLOCK, decoding_state, next_token_targets, token_cross_entropy, token_nll
except ImportError:
    if __package__:
        raise
    from ttt import CACHE_FIELD, LOSS_BLOCK, decoding_state, next_token_targets, token_cross_entropy, token_nll

TRAIN_MODES = ("meta", "pretrain")  # meta: the inner loop runs (TTT-E2E); pretrain: it does not (TTT off, or fa)

# The official sizes (configs/model/*, SPEC.md 2.1) plus `tiny`, which trains on a laptop CPU. `intermediate_size`
# is the E2E model's reduced MLP width (all blocks and the prime MLP), `fa_intermediate_size` the full-attention
# baseline's; `suffix_len` = one quarter of the blocks. The official sizes share the defaults' window (8192) and chunk
# (1024); `tiny` has its own, for contexts of a thousand tokens. The window is 4x the chunk (officially 8x): a chunk's
# inner step costs about as much as updating the fast weights, so shorter chunks cost more per token (bench/).
E2E_STANDARD_CONFIGS = {
    "tiny": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=416,
                 fa_intermediate_size=512, suffix_len=1, sliding_window=128, mini_batch_size=32),
    "125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=1664,
                 fa_intermediate_size=2048, suffix_len=3),
    "350m": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=2304,
                 fa_intermediate_size=2816, suffix_len=6),
    "760m": dict(num_hidden_layers=24, hidden_size=1536, num_attention_heads=16, intermediate_size=3328,
                 fa_intermediate_size=4096, suffix_len=6),
    "1b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, intermediate_size=4352,
               fa_intermediate_size=5376, suffix_len=6),
    "3b": dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=32, intermediate_size=5632,
               fa_intermediate_size=6912, suffix_len=8),
}
VARIANTS = ("e2e", "pretrain", "fa")  # the E2E model; the same with TTT off; the full-attention baseline
ATTENTION_BLOCK = 1024  # queries per block of sliding-window attention (at most; the window when smaller)


class E2EConfig(PreTrainedConfig):
    r"""Configuration of a TTT-E2E model or of its full-attention baseline. Defaults: the official 125m E2E model.

    sliding_window: W, the keys each query sees (itself and the W - 1 before it); None: full causal attention
        (the "fa" baseline).
    mini_batch_size: b, the tokens of one inner-loop chunk; the loss is the mean over chunks of b tokens of each
        chunk's mean loss. None: one chunk spanning the sequence (the fa baseline's loss).
    suffix_len: s, the last blocks that carry the prime MLP (0: none, the fa baseline).
    train_mode: `"meta"` runs the inner loop (training differentiates through it); `"pretrain"` uses the prime
        MLPs as ordinary fixed sub-layers (TTT off; the official pretrain mode).
    inner_lr / inner_clip: the inner SGD step size (optimizer_inner.lr) and global-norm clip (clip_gradient).
    ilr_init / ilr_warmup_steps: the inner step size's warm-up over outer training steps (`ilr_multiplier`);
        evaluation always uses the full step.
    first_order: drop the second-order terms of the outer gradient (NOT the official algorithm; off by default).
    recompute_prefix: in meta-mode training, recompute each prefix block in the backward instead of keeping its
        activations (as the official code always does; the suffix chunks are recomputed regardless). Off: faster
        by the prefix's forward, activations linear in T kept for every prefix block.
    """

    model_type = "ttt_e2e"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 128256
    hidden_size: int = 768
    intermediate_size: int = 1664
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    use_cache: bool = False
    sliding_window: int | None = 8192
    mini_batch_size: int | None = 1024
    suffix_len: int = 3
    train_mode: str = "meta"
    inner_lr: float = 1.0
    inner_clip: float = 1.0
    ilr_init: float = 1.0
    ilr_warmup_steps: int = 0
    first_order: bool = False
    recompute_prefix: bool = True

    def __post_init__(self, **kwargs):
        def integer(field, low, optional=False):
            value = getattr(self, field)
            if optional and value is None:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{field} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            integer(field, 1)
        integer("sliding_window", 1, optional=True)
        integer("mini_batch_size", 1, optional=True)
        integer("suffix_len", 0)
        integer("ilr_warmup_steps", 0)
        for field, low in (("rms_norm_eps", 0), ("rope_theta", 0), ("initializer_range", 0), ("inner_clip", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= low:
                raise ValueError(f"{field} must be a finite number > {low}, got {value!r}")
        if not (isinstance(self.inner_lr, (int, float)) and math.isfinite(self.inner_lr) and self.inner_lr >= 0):
            raise ValueError(f"inner_lr must be a finite number >= 0, got {self.inner_lr!r}")
        if not (isinstance(self.ilr_init, (int, float)) and 0 <= self.ilr_init <= 1):
            raise ValueError(f"ilr_init must be in [0, 1], got {self.ilr_init!r}")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_attention_heads}) "
                             f"must be an even integer (the head dimension, for RoPE)")
        if self.suffix_len > self.num_hidden_layers:
            raise ValueError(f"suffix_len ({self.suffix_len}) exceeds num_hidden_layers ({self.num_hidden_layers})")
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        if self.train_mode == "meta":
            if self.suffix_len < 1:
                raise ValueError("train_mode 'meta' needs suffix_len >= 1 (the blocks whose prime MLP learns)")
            if self.sliding_window is None or self.mini_batch_size is None:
                raise ValueError("train_mode 'meta' needs a sliding_window and a mini_batch_size")
        if self.sliding_window is not None and self.mini_batch_size is not None and self.suffix_len \
                and self.sliding_window < self.mini_batch_size:
            # within a chunk, tokens see each other only through attention (the fast weights hold earlier chunks)
            raise ValueError(f"sliding_window ({self.sliding_window}) is smaller than mini_batch_size "
                             f"({self.mini_batch_size}): tokens of a chunk would not all see the chunk's start")
        super().__post_init__(**kwargs)

    @classmethod
    def from_size(cls, size: str, variant: str = "e2e", **kwargs) -> "E2EConfig":
        """A standard size as the E2E model (`e2e`), the same with TTT off (`pretrain`), or the full-attention
        baseline (`fa`: no prime MLP, full causal attention, full MLP widths); any field overridden by kwargs."""
        if size not in E2E_STANDARD_CONFIGS:
            raise ValueError(f"unknown size {size!r}; choose from {sorted(E2E_STANDARD_CONFIGS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        dims = dict(E2E_STANDARD_CONFIGS[size])
        fa_width = dims.pop("fa_intermediate_size")
        if variant == "fa":
            dims |= dict(intermediate_size=fa_width, suffix_len=0, sliding_window=None, mini_batch_size=None,
                         train_mode="pretrain")
        elif variant == "pretrain":
            dims |= dict(train_mode="pretrain")
        return cls(**(dims | kwargs))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_layers(self) -> int:
        """The blocks before the suffix: the first suffix block's index."""
        return self.num_hidden_layers - self.suffix_len

    def ilr_multiplier(self, step: int) -> float:
        """The inner step size's factor at outer step `step` (0-based): ilr_init + (1 - ilr_init) *
        min(1, (step + 1) / ilr_warmup_steps), 1 without warm-up (SPEC.md 2.5)."""
        if self.ilr_warmup_steps == 0:
            return 1.0
        return self.ilr_init + (1.0 - self.ilr_init) * min(1.0, (step + 1) / self.ilr_warmup_steps)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, RoPE, softmax and the loss run in float32, or float64 for a float64 model (never below the input)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Norms, RoPE, attention masks


class E2ERMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * w, computed in float32."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.to(compute_dtype(x.dtype))
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos, sin [T, 1, f/2] of angle position * theta^(-2i/f) for the pairs i (computed in `dtype`, float32 as the
    official precompute_freqs_cis, float64 for a float64 model)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim))
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x, cos, sin):
    """The interleaved-pair (complex) RoPE of the official code: (x[2i], x[2i+1]) rotated as one complex number,
    not transformers' rotate_half layout. x [B, T, H, f]."""
    x32 = x.to(cos.dtype)
    even, odd = x32[..., 0::2], x32[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)


def window_mask(query_positions, key_positions, window: int | None):
    """[Tq, Tk] True where key j is visible to query i: 0 <= j <= i and i - j < window (absolute positions). Only
    ever built for one block of queries against its keys (never [T, T])."""
    q, k = query_positions[:, None], key_positions[None, :]
    visible = (k <= q) & (k >= 0)
    return visible & (q - k < window) if window is not None else visible


def dense_attention(q, k, v, mask, fused: bool):
    """softmax(q k^T / sqrt(f) + mask) v. q [B, H, Tq, f], k, v [B, H, Tk, f], mask [Tq, Tk] (True: visible).
    fused: PyTorch's SDPA kernels (first derivatives only); else the explicit form, which supports the double
    backward of the inner loop's second-order terms (softmax in float32 as the official XLA path)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.to(compute_dtype(scores.dtype)).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def sliding_window_attention(q, k, v, window: int | None, fused: bool = True, block_size: int | None = None):
    """Causal attention of the last Tq of Tk positions (the keys before them: a cache), query i seeing keys j with
    i - W < j <= i (window None: every j <= i). Computed block by block: each block of queries against its own
    keys and the W - 1 before them, so work and memory are O(Tq x (block + W)) and no [Tq, Tk] mask or score
    matrix exists. Full causal attention over a whole sequence uses SDPA's causal mode (no mask tensor).
    q [B, H, Tq, f], k, v [B, H, Tk, f] -> [B, H, Tq, f]. block_size: queries per block (default min(W, 1024))."""
    length, offset = q.shape[2], k.shape[2] - q.shape[2]
    if window is None or window >= k.shape[2]:
        if offset == 0 and fused:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        window = None
    block = block_size or min(window or ATTENTION_BLOCK, ATTENTION_BLOCK)
    # Split, not sliced: the backward of T / block slices would add each block's gradient into a zero tensor of
    # the whole sequence (quadratic); a split gathers them in one step. Keys: the past, then the queries' blocks.
    starts = list(range(0, length, block))
    sizes = [offset] + [min(block, length - start) for start in starts]
    ends = list(itertools.accumulate(sizes))
    bounds = [(end - size, end) for size, end in zip(sizes, ends, strict=True)]  # key rows of each piece
    k_pieces, v_pieces = k.split(sizes, 2), v.split(sizes, 2)
    outputs = []
    for i, (q_block, start) in enumerate(zip(q.split(block, 2), starts, strict=True)):
        end = start + q_block.shape[2]
        first = 0 if window is None else max(0, start + offset - window + 1)  # the first key any query here sees
        last = end + offset  # one past the last key (the last query's own): the end of piece i + 1
        pieces = [j for j in range(bisect.bisect_right(ends, first), i + 2) if bounds[j][1] > bounds[j][0]]
        keys, values = (torch.cat([t[j][:, :, max(first, bounds[j][0]) - bounds[j][0]:
                                        min(last, bounds[j][1]) - bounds[j][0]] for j in pieces], 2)
                        for t in (k_pieces, v_pieces))
        mask = window_mask(torch.arange(start + offset, last, device=q.device),
                           torch.arange(first, last, device=q.device), window)
        outputs.append(dense_attention(q_block, keys, values, mask, fused))
    return torch.cat(outputs, 2)


# ----------------------------------------------------------------------------------------------------------------
# Attention and MLPs


class E2EAttention(nn.Module):
    """Multi-head attention with QK-norm (one RMSNorm weight over the head dimension, shared by the heads, before
    RoPE), RoPE, scale 1/sqrt(f), no biases, no GQA."""

    def __init__(self, config: E2EConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm = E2ERMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = E2ERMSNorm(self.head_dim, config.rms_norm_eps)

    def qkv(self, x):
        """q, k (after QK-norm, before RoPE) and v, each [B, T, H, f]."""
        split = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))
        return self.q_norm(split(self.q_proj(x))), self.k_norm(split(self.k_proj(x))), split(self.v_proj(x))

    def rope(self, x, positions):
        cos, sin = rope_cos_sin(positions, self.head_dim, self.config.rope_theta, compute_dtype(x.dtype))
        return apply_rope(x, cos, sin)

    def merge(self, out):
        """[B, H, T, f] attention output -> heads merged, through o_proj -> [B, T, d]."""
        return self.o_proj(out.transpose(1, 2).flatten(-2))

    def sequence_attention(self, x, past=None, start: int = 0, keep: bool = True):
        """Sliding-window (or full) causal attention over a whole sequence at absolute positions start.. (the
        prefix blocks, and every block with TTT off), blockwise (`sliding_window_attention`, fused kernels).
        past: (k, v) [B, P, H, f] already rotated, of the positions just before `start` (decoding); returns
        (output, (k, v) of the last W positions to keep for the next call: a copy, not a view of the sequence's;
        None unless `keep`)."""
        q, k, v = self.qkv(x)
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], 1), torch.cat([past[1].to(v.dtype), v], 1)
        window = self.config.sliding_window
        out = sliding_window_attention(*(t.transpose(1, 2) for t in (q, k, v)), window)
        if not keep:
            return self.merge(out), None
        return self.merge(out), (k, v) if window is None else (k[:, -window:].clone(), v[:, -window:].clone())

    def chunk_attention(self, x, past_k, past_v, start: int):
        """The suffix blocks' attention over [past rows, the new rows] (keys after QK-norm, before RoPE), with RoPE
        at positions local to that buffer (the past's first row at 0, the queries after the past), as the official
        code computes it for each chunk: an explicit [n, P + n] mask, since the inner loop differentiates it twice.
        past_k, past_v [B, P, H, f] hold absolute positions start - P .. start - 1 (zeros, masked, before position
        0). Returns (output, k, v of the new rows)."""
        q, k, v = self.qkv(x)
        past, new = past_k.shape[1], x.shape[1]
        keys, values = torch.cat([past_k.to(k.dtype), k], 1), torch.cat([past_v.to(v.dtype), v], 1)
        local = torch.arange(past + new, device=x.device)
        mask = window_mask(local[past:] + start - past, local + start - past, self.config.sliding_window)
        q, keys = self.rope(q, local[past:]), self.rope(keys, local)
        out = dense_attention(*(t.transpose(1, 2) for t in (q, keys, values)), mask, fused=False)
        return self.merge(out), k, v


class E2EMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (official w2(silu(x w1) * (x w3)))."""

    def __init__(self, config: E2EConfig):
        super().__init__()
        d, width = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, width, bias=False)
        self.up_proj = nn.Linear(d, width, bias=False)
        self.down_proj = nn.Linear(width, d, bias=False)

    def forward(self, x, fast_weights: "FastWeights | None" = None):
        """fast_weights: per-sequence (gate, up, down) weights [B, out, in] used instead of the module's own."""
        if fast_weights is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up, down = fast_weights
        hidden = F.silu(x @ gate.transpose(1, 2)) * (x @ up.transpose(1, 2))  # [B, T, I]
        return hidden @ down.transpose(1, 2)

    def weights(self) -> tuple:
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight


# ----------------------------------------------------------------------------------------------------------------
# Block


class E2EBlock(nn.Module):
    """h += post(Attn(pre(h))) ; [suffix blocks: h += post'(MLP'(pre'(h)))] ; h += post(MLP(pre(h))).
    The norms carry Gemma-2's names (input_layernorm, post_attention_layernorm, pre_/post_feedforward_layernorm);
    the prime sub-layer's are pre_/post_prime_layernorm."""

    def __init__(self, config: E2EConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.layer_idx = layer_idx
        self.is_suffix = layer_idx >= config.num_prefix_layers
        self.input_layernorm, self.post_attention_layernorm = E2ERMSNorm(d, eps), E2ERMSNorm(d, eps)
        self.self_attn = E2EAttention(config)
        if self.is_suffix:
            self.pre_prime_layernorm, self.post_prime_layernorm = E2ERMSNorm(d, eps), E2ERMSNorm(d, eps)
            self.prime_mlp = E2EMLP(config)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = E2ERMSNorm(d, eps), E2ERMSNorm(d, eps)
        self.mlp = E2EMLP(config)

    def forward(self, hidden_states):
        """The block over a whole sequence at positions 0.. (sliding-window attention; the prefix blocks, and every
        block with TTT off, whose prime MLP is then a fixed sub-layer with its own weights)."""
        attention_output, _ = self.self_attn.sequence_attention(self.input_layernorm(hidden_states), keep=False)
        return self.after_attention(hidden_states, attention_output)

    def after_attention(self, hidden_states, attention_output, fast_weights: "FastWeights | None" = None):
        """The rest of the block, given its attention's output on input_layernorm(hidden_states) (the caller runs
        the attention of its kind: over a sequence, a chunk, or a cache). fast_weights: the prime MLP's
        per-sequence weights (None: its own)."""
        h = hidden_states + self.post_attention_layernorm(attention_output)
        if self.is_suffix:
            h = h + self.post_prime_layernorm(self.prime_mlp(self.pre_prime_layernorm(h), fast_weights))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


# ----------------------------------------------------------------------------------------------------------------
# Losses


def chunk_losses(logits, targets, chunk: int | None, bos_token_id: int | None = None):
    """[B, number of chunks] mean next-token loss of each chunk of `chunk` positions (None: one chunk), over the
    positions whose target is neither -100 nor BOS; a chunk without such targets has loss 0 (the official
    denominator is clamped at 1e-10). targets[b, t] is the token position t predicts. Logits in float32. The
    reference form, from whole-sequence logits; the model computes the same from `token_nll` chunk by chunk."""
    return chunk_means(token_cross_entropy(logits, targets), loss_mask(targets, bos_token_id), chunk)[0]


def loss_mask(targets, bos_token_id: int | None):
    """[B, T] True where a target counts in the loss: neither -100 nor BOS (the official loss masks BOS targets)."""
    valid = targets != -100
    return valid & (targets != bos_token_id) if bos_token_id is not None else valid


def chunk_means(nll, valid, chunk: int | None):
    """(per-chunk mean of nll over valid positions [B, n], per-chunk count of valid positions [B, n]); chunks of
    `chunk` positions (None: one), a last, shorter chunk (evaluation at any length) a chunk of its own."""
    length = nll.shape[1]
    chunk = chunk or length
    pad = -length % chunk
    nll, valid = F.pad(nll * valid, (0, pad)), F.pad(valid, (0, pad))
    counts = valid.unflatten(1, (-1, chunk)).sum(-1)
    return nll.unflatten(1, (-1, chunk)).sum(-1) / counts.clamp_min(1e-10), counts


def mean_over_chunks(per_chunk, counts):
    """The official loss: the unweighted mean of the chunk losses, over the chunks that have targets (a chunk of
    only the last token, as in a T + 1 token layout, has none and is not averaged in as a 0)."""
    has_targets = counts > 0
    return (per_chunk * has_targets).sum() / has_targets.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# The inner loop's state


class FastWeights(NamedTuple):
    """One suffix block's prime MLP as the inner loop trains it: theta = (gate, up, down), each [B, out, in]."""

    gate: torch.Tensor  # [B, I, d]
    up: torch.Tensor  # [B, I, d]
    down: torch.Tensor  # [B, d, I]


class Window(NamedTuple):
    """One suffix block's keys and values of the W positions before the current chunk (after QK-norm, before RoPE;
    zeros, masked, before position 0)."""

    k: torch.Tensor  # [B, W, H, f]
    v: torch.Tensor  # [B, W, H, f]


@dataclass
class InnerState:
    """What the inner loop carries from one chunk to the next, per suffix block: the fast weights and the window."""

    fast: list[FastWeights]
    windows: list[Window]

    def tensors(self) -> list[torch.Tensor]:
        """Flat, for autograd.Function (RecomputedChunk): every block's (gate, up, down), then every (k, v)."""
        return [t for weights in self.fast for t in weights] + [t for window in self.windows for t in window]

    @classmethod
    def from_tensors(cls, tensors) -> "InnerState":
        """The inverse of tensors(): 3 fast weights and 2 window tensors per suffix block."""
        blocks = len(tensors) // 5
        fast, windows = tensors[:3 * blocks], tensors[3 * blocks:]
        return cls([FastWeights(*fast[i:i + 3]) for i in range(0, len(fast), 3)],
                   [Window(*windows[i:i + 2]) for i in range(0, len(windows), 2)])

    def map(self, fn) -> "InnerState":
        """fn applied to every tensor (detach, select batch rows)."""
        return InnerState([FastWeights(*map(fn, w)) for w in self.fast], [Window(*map(fn, w)) for w in self.windows])


class ChunkStep(NamedTuple):
    """What one chunk of the inner loop gives (E2EInnerLoop.chunk_step)."""

    logits: torch.Tensor | None  # [B, n, V], when asked for
    nll: torch.Tensor  # [B, n] next-token losses under the chunk's fast weights (0 where there is no target)
    loss: torch.Tensor  # [B] l_c: their mean over the counted targets (BOS masked)
    grad_norm: torch.Tensor | None  # [B] the inner gradient's global norm before clipping; None without an update
    state: InnerState  # theta after the step, the window moved on by the chunk


# ----------------------------------------------------------------------------------------------------------------
# Recomputation of a chunk


class RecomputedChunk(torch.autograd.Function):
    """One chunk of the training inner loop whose forward keeps nothing but its inputs: it runs the chunk step
    detached (the inner gradient without a graph), and the backward runs it again with the graph (second order)
    and differentiates that, as the official code rematerialises each chunk. Memory per chunk is then its inputs
    (the chunk's suffix inputs, the fast weights, the W-row windows), not its activations.

    torch.utils.checkpoint does not fit here: the inner gradient taken inside the forward unpacks the tensors the
    checkpoint had dropped, which makes it recompute the chunk during the forward already and keep that copy's
    activations until the backward (measured: 15 runs of the suffix blocks in the forward of 8 chunks, 8 more in
    the backward, 1.5x to 3.3x the memory per chunk).

    apply(run, want_logits, n, *tensors, *parameters): run(keep_graph, want_logits, *tensors) is the chunk step;
    the first n tensors are its inputs, the rest the parameters it reads (their gradients come from the backward).
    Works with .backward() and torch.autograd.grad; no double backward through it."""

    @staticmethod
    def forward(ctx, run, want_logits, n, *tensors):
        ctx.run, ctx.want_logits, ctx.n = run, want_logits, n
        device = tensors[0].device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            return tuple(run(False, want_logits, *tensors[:n]))

    @staticmethod
    def backward(ctx, *output_grads):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in saved[:ctx.n]]
        parameters = saved[ctx.n:]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            outputs = ctx.run(True, ctx.want_logits, *inputs)
        pairs = [(out, grad) for out, grad in zip(outputs, output_grads, strict=True)
                 if grad is not None and out is not None and out.requires_grad]
        wrt = [t for t in (*inputs, *parameters) if t.requires_grad]
        grads = iter(torch.autograd.grad([out for out, _ in pairs], wrt, [grad for _, grad in pairs],
                                         allow_unused=True) if pairs else [None] * len(wrt))
        return (None, None, None, *(next(grads) if t.requires_grad else None for t in (*inputs, *parameters)))


# ----------------------------------------------------------------------------------------------------------------
# Decoding state


class E2ECache:
    """Decoding state of an E2E model: the sequence blocks' keys and values (the last W, rotated); in meta mode the
    inner loop's state as the full forward carries it (the suffix blocks' fast weights and windows before the
    current chunk), the current chunk's suffix keys and values so far, and its suffix inputs and tokens (its inner
    step runs when the next token, its last target, arrives). Its size does not grow with the sequence under a
    sliding window."""

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.seen = 0
        self.kv: list = [None] * num_layers  # per sequence block: (k, v) [B, <= W, H, f], rotated
        self.inner: InnerState | None = None  # meta mode: the suffix blocks' state before the current chunk
        self.chunk_kv: list = []  # per suffix block: Window of the current chunk's m rows so far, or None
        self.chunk_inputs = None  # [B, m, d] the current chunk's suffix inputs (the prefix output)
        self.chunk_ids = None  # [B, m]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Select batch rows (beam search)."""
        pick = lambda t: None if t is None else t.index_select(0, beam_idx.to(t.device))
        pair = lambda p: None if p is None else type(p)(pick(p[0]), pick(p[1]))
        self.kv, self.chunk_kv = [pair(p) for p in self.kv], [pair(p) for p in self.chunk_kv]
        self.inner = None if self.inner is None else self.inner.map(pick)
        self.chunk_inputs, self.chunk_ids = pick(self.chunk_inputs), pick(self.chunk_ids)


# ----------------------------------------------------------------------------------------------------------------
# Models


class E2EPreTrainedModel(PreTrainedModel):
    config_class = E2EConfig
    config: E2EConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["E2EBlock"]
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        # official: every linear weight and the embedding N(0, 0.02) (plain normal), norm weights 1, no biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, E2ERMSNorm):
            init.ones_(module.weight)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not hand us a KV cache; forward creates an E2ECache


class E2EModel(E2EPreTrainedModel):
    """Embedding, blocks and final norm. The inner loop needs the output layer, so it lives in E2EForCausalLM;
    this module's forward is the pass without it (every prime MLP a fixed sub-layer: train_mode 'pretrain')."""

    def __init__(self, config: E2EConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([E2EBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = E2ERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def run_sequence_blocks(self, hidden_states, blocks):
        """`blocks` over the whole sequence (sliding-window attention, absolute positions, fused kernels), each
        recomputed in the backward under gradient checkpointing, and in meta mode unless config.recompute_prefix
        is off (as the official prefix)."""
        config = self.config
        recompute = self.gradient_checkpointing or (config.recompute_prefix and config.train_mode == "meta")
        for block in blocks:
            if recompute and self.training and torch.is_grad_enabled():
                hidden_states = torch.utils.checkpoint.checkpoint(block, hidden_states, use_reentrant=False)
            else:
                hidden_states = block(hidden_states)
        return hidden_states

    def forward(self, input_ids):
        return self.norm(self.run_sequence_blocks(self.embed_tokens(input_ids), self.layers))


@dataclass
class E2ECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the inner loop's statistics (meta mode, no cache): `chunk_losses` [B, chunks],
    each chunk's inner loss under the fast weights it was predicted with, and `inner_grad_norms` [B, chunks - 1],
    the global norm of each inner gradient before clipping."""

    chunk_losses: torch.FloatTensor | None = None
    inner_grad_norms: torch.FloatTensor | None = None


class E2EInnerLoop:
    """The inner loop of TTT-E2E over the suffix blocks of `lm` (an E2EForCausalLM): chunk by chunk, the suffix
    blocks run with the fast weights theta (the prime MLPs' weights, one copy per sequence), the chunk's
    next-token loss l_c is taken, and theta <- theta - eta * clip(dl_c / dtheta). Made on demand
    (E2EForCausalLM.inner_loop): it reads the model's current modules and holds no state of its own."""

    def __init__(self, lm: "E2EForCausalLM"):
        self.lm, self.backbone, self.config = lm, lm.model, lm.config
        self.suffix_blocks = lm.suffix_blocks

    def step_size(self) -> float:
        """eta: config.inner_lr, times the warm-up factor in training forwards."""
        return self.config.inner_lr * (self.lm.inner_lr_multiplier if self.lm.training else 1.0)

    def chunk_step(self, start: int, update: bool, step_size: float, keep_graph: bool, want_logits: bool, x,
                   targets, state: InnerState) -> ChunkStep:
        """One chunk of the inner loop. x [B, n, d]: the chunk's suffix inputs (prefix output) at absolute
        positions start..; targets [B, n]; state: the fast weights theta and the windows before `start`.
        Runs the suffix blocks with theta, takes the chunk's next-token losses nll [B, n] and their mean l_c over
        the counted targets (BOS masked) and, if `update`, theta <- theta - step_size * clip(dl_c/dtheta) with
        each sequence's global-norm clip. keep_graph: the outer gradient goes through this step (second order
        unless config.first_order); otherwise the step runs detached (evaluation, decoding). The new windows are W
        rows of their own in the keys' dtype (no view of a longer buffer)."""
        config, fast, windows = self.config, state.fast, state.windows
        with torch.enable_grad():  # the inner gradient is taken even in evaluation
            if not keep_graph:  # no graph reaches back into the inputs (the outer loss does not go through here)
                x, windows = x.detach(), [Window(*(t.detach() for t in window)) for window in windows]
                fast = [FastWeights(*(w.detach().requires_grad_(update) for w in weights)) for weights in fast]
            elif update:  # theta(0) frozen (LoRA trains other weights): the inner gradient still needs a leaf
                fast = [FastWeights(*(w if w.requires_grad else w.detach().requires_grad_() for w in weights))
                        for weights in fast]
            h, new_windows = x, []
            for block, weights, window in zip(self.suffix_blocks, fast, windows, strict=True):
                out, k, v = block.self_attn.chunk_attention(block.input_layernorm(h), window.k, window.v, start)
                drop, keep = min(k.shape[1], window.k.shape[1]), config.sliding_window  # the window moves on
                new_windows.append(Window(torch.cat([window.k[:, drop:].to(k.dtype), k[:, -keep:]], 1),
                                          torch.cat([window.v[:, drop:].to(v.dtype), v[:, -keep:]], 1)))
                h = block.after_attention(h, out, weights)
            logits = self.lm.lm_head(self.backbone.norm(h))
            logits = logits.to(compute_dtype(logits.dtype))
            nll = token_cross_entropy(logits, targets)  # [B, n], 0 where there is no target
            valid = loss_mask(targets, config.bos_token_id)
            loss = (nll * valid).sum(1) / valid.sum(1).clamp_min(1e-10)  # l_c [B]
            norm = None
            if update:
                second_order = keep_graph and not config.first_order
                flat = [w for weights in fast for w in weights]
                grads = torch.autograd.grad(loss.sum(), flat, create_graph=second_order, retain_graph=keep_graph)
                # summing the sequences' losses gives each sequence its own gradient; clip by each one's norm
                squares = sum(g.pow(2).flatten(1).sum(1) for g in grads)  # [B]
                clipped = squares >= config.inner_clip ** 2
                norm = torch.where(clipped, squares, torch.ones_like(squares)).sqrt()  # no sqrt'(0) when unclipped
                scale = torch.where(clipped, config.inner_clip / norm, torch.ones_like(norm))  # optax: g if n < c
                stepped = [w - step_size * scale[:, None, None].to(g.dtype) * g
                           for w, g in zip(flat, grads, strict=True)]
                fast = [FastWeights(*stepped[i:i + 3]) for i in range(0, len(stepped), 3)]
                norm = torch.where(clipped, norm, squares.sqrt()).detach()
            new_state = InnerState(fast, new_windows)
            if not keep_graph:
                logits, nll, loss = logits.detach(), nll.detach(), loss.detach()
                new_state = new_state.map(torch.Tensor.detach)
        return ChunkStep(logits if want_logits else None, nll, loss, norm, new_state)

    def flat_chunk_step(self, start: int, update: bool, step_size: float, keep_graph: bool, want_logits: bool, x,
                        targets, *state_tensors) -> tuple:
        """chunk_step on flat tensors, as RecomputedChunk runs it: (logits, nll, l_c, norm, *state.tensors())."""
        out = self.chunk_step(start, update, step_size, keep_graph, want_logits, x, targets,
                              InnerState.from_tensors(state_tensors))
        return (*out[:4], *out.state.tensors())

    def parameters(self) -> list:
        """The trained parameters a chunk step reads: the suffix blocks' (their prime MLPs' own are unused, since
        the fast weights come in the state), the final norm's and the output layer's."""
        modules = [*self.suffix_blocks, self.backbone.norm, self.lm.lm_head]
        parameters = {id(p): p for module in modules for p in module.parameters() if p.requires_grad}
        return list(parameters.values())

    def initial_state(self, batch_size: int, reference) -> InnerState:
        """The fast weights theta(0) (the prime MLPs' own, one copy per sequence) and zero windows (in the dtype of
        `reference`; the first chunk's keys replace them in their own dtype)."""
        blocks, config = self.suffix_blocks, self.config
        fast = [FastWeights(*(w.unsqueeze(0).expand(batch_size, *w.shape) for w in block.prime_mlp.weights()))
                for block in blocks]
        shape = (batch_size, config.sliding_window, config.num_attention_heads, config.head_dim)  # [B, W, H, f]
        return InnerState(fast, [Window(reference.new_zeros(shape), reference.new_zeros(shape)) for _ in blocks])

    def prefix(self, hidden_states):
        """The prefix blocks (all but the suffix) over the whole sequence."""
        return self.backbone.run_sequence_blocks(hidden_states, self.backbone.layers[:self.config.num_prefix_layers])

    def run(self, input_ids, hidden_states, want_logits: bool = True, trace: list | None = None):
        """The inner loop over a whole sequence: the prefix blocks once, then chunk by chunk the suffix blocks with
        the current fast weights, each chunk's loss, and one inner step. Returns (logits [B, T, V] if want_logits
        else None, nll [B, T] (in the graph), inner chunk losses [B, n], inner gradient norms [B, n - 1]). `trace`:
        a list that receives the fast weights after each inner step (E2EForCausalLM.inner_loop_trace)."""
        config = self.config
        h = self.prefix(hidden_states)
        state = self.initial_state(input_ids.shape[0], h)
        # the outer gradient goes through the inner loop whenever anything trains: theta(0), or only other weights
        # (LoRA adapters on the attention and MLPs, with theta(0) frozen)
        keep_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.lm.parameters())
        step_size = self.step_size()
        targets = next_token_targets(input_ids)
        b, length = config.mini_batch_size, input_ids.shape[1]
        logits, nll, losses, norms = [], [], [], []
        parameters = self.parameters() if keep_graph else []  # what every recomputed chunk reads
        # split, not sliced: the chunks' gradients reach h in one step, not each through a zero tensor of h's size
        for start, x, chunk_targets in zip(range(0, length, b), h.split(b, 1), targets.split(b, 1), strict=True):
            update = start + b < length and step_size != 0  # the last chunk's update would reach no prediction
            if keep_graph:  # recompute the chunk in the backward: memory per chunk is its state, not activations
                inputs = (x, chunk_targets, *state.tensors())
                flat = RecomputedChunk.apply(partial(self.flat_chunk_step, start, update, step_size), want_logits,
                                             len(inputs), *inputs, *parameters)
                out = ChunkStep(*flat[:4], InnerState.from_tensors(flat[4:]))
            else:
                out = self.chunk_step(start, update, step_size, False, want_logits, x, chunk_targets, state)
            logits.append(out.logits)
            nll.append(out.nll)
            losses.append(out.loss)
            if out.grad_norm is not None:
                norms.append(out.grad_norm)
            state = out.state
            if update and trace is not None:
                trace.append([w.detach() for weights in state.fast for w in weights])
        norms = torch.stack(norms, 1) if norms else None
        return (torch.cat(logits, 1) if want_logits else None, torch.cat(nll, 1), torch.stack(losses, 1).detach(),
                norms)


class E2EDecoding:
    """Reading tokens through an E2ECache (prefill and decoding) with the model `lm`: the prefix blocks with their
    key/value windows, the suffix blocks with the cached inner-loop state, and each chunk's inner step when its
    last target arrives, exactly as in the full forward. Made per read (E2EForCausalLM.forward with a cache)."""

    def __init__(self, lm: "E2EForCausalLM"):
        self.lm, self.backbone, self.config = lm, lm.model, lm.config
        self.loop = lm.inner_loop

    def read(self, input_ids, cache: E2ECache, logits_to_keep: int = 0):
        """Logits of input_ids read after the cache's tokens (the last `logits_to_keep` only, if set), the cache
        advanced (no outer gradient). A first read (prefill) runs the prefix blocks once over the prompt and the
        inner loop's chunk steps, which give the logits too; the tokens after the last chunk whose next token has
        arrived, and every later token, are taken chunk segment by chunk segment: at a chunk boundary the
        finished chunk's inner step runs first (its last target is the new chunk's first token), exactly as in the
        full forward."""
        config, meta = self.config, self.config.train_mode == "meta"
        b, length = config.mini_batch_size, input_ids.shape[1]
        keep_from = length - logits_to_keep if logits_to_keep else 0
        logits, offset = [], 0
        if meta and cache.inner is None:
            offset = self.read_prompt(input_ids, cache, keep_from, logits)
        while offset < length:
            position = cache.seen + offset
            end = length if not meta else min(length, offset + b - position % b)
            segment = input_ids[:, offset:end]
            if meta and position % b == 0 and position > 0:
                self.finish_chunk(cache, position - b, next_token=segment[:, :1])
            segment_logits = self.cached_segment(segment, position, cache, want_logits=end > keep_from)
            if segment_logits is not None:
                logits.append(segment_logits[:, max(0, keep_from - offset):])
            offset = end
        cache.seen += length
        return torch.cat(logits, 1)

    def read_prompt(self, input_ids, cache: E2ECache, keep_from: int, logits: list) -> int:
        """The first read of a meta-mode cache: the prefix blocks once over the whole prompt (their last W keys and
        values kept), the chunk steps of every chunk whose next token is in the prompt (each chunk's suffix blocks
        run once, for its logits and its inner step together), and the suffix blocks over the rest, which opens
        the current chunk. Appends the logits from position keep_from on to `logits`; returns the tokens read."""
        config = self.config
        b, length = config.mini_batch_size, input_ids.shape[1]
        h = self.backbone.embed_tokens(input_ids)
        for i, block in enumerate(self.backbone.layers[:config.num_prefix_layers]):
            out, cache.kv[i] = block.self_attn.sequence_attention(block.input_layernorm(h))
            h = block.after_attention(h, out)
        state = self.loop.initial_state(input_ids.shape[0], h)
        step_size = self.loop.step_size()
        targets = next_token_targets(input_ids)
        done = (length - 1) // b * b  # the chunks whose last target (the next chunk's first token) is here
        for start in range(0, done, b):
            out = self.loop.chunk_step(start, step_size != 0, step_size, False, start + b > keep_from,
                                  h[:, start:start + b], targets[:, start:start + b], state)
            if out.logits is not None:
                logits.append(out.logits[:, max(0, keep_from - start):])
            state = out.state
        self.start_chunk(cache, state)
        rest = self.cached_segment(input_ids[:, done:], done, cache, want_logits=True, prefix_output=h[:, done:])
        logits.append(rest[:, max(0, keep_from - done):])
        return length

    def finish_chunk(self, cache: E2ECache, start: int, next_token):
        """The current chunk's inner step, now that its last target `next_token` [B, 1] has arrived."""
        targets = torch.cat([cache.chunk_ids[:, 1:], next_token], 1)
        step_size = self.loop.step_size()
        out = self.loop.chunk_step(start, step_size != 0, step_size, False, False, cache.chunk_inputs, targets,
                                   cache.inner)
        self.start_chunk(cache, out.state)

    def start_chunk(self, cache: E2ECache, state: InnerState):
        """A new chunk begins with the inner loop's `state`: nothing of it read yet."""
        cache.inner, cache.chunk_kv = state, [None] * len(state.windows)
        cache.chunk_inputs = cache.chunk_ids = None

    def cached_segment(self, ids, position: int, cache: E2ECache, want_logits: bool = True, prefix_output=None):
        """Tokens `ids` at `position` (within one chunk in meta mode) through every block with the cache, or, given
        prefix_output (their prefix blocks' output, from a prefill), through the suffix blocks only. Returns their
        logits, or None unless want_logits."""
        config = self.config
        meta = config.train_mode == "meta"
        h = self.backbone.embed_tokens(ids) if prefix_output is None else prefix_output
        first = 0 if prefix_output is None else config.num_prefix_layers
        for i, block in enumerate(self.backbone.layers[first:], start=first):
            x = block.input_layernorm(h)
            if meta and block.is_suffix:
                j = i - config.num_prefix_layers  # which suffix block
                if j == 0:  # the suffix inputs of the chunk, kept for its inner step
                    cat = lambda a, x: x if a is None else torch.cat([a, x], 1)
                    cache.chunk_inputs, cache.chunk_ids = cat(cache.chunk_inputs, h), cat(cache.chunk_ids, ids)
                window, so_far = cache.inner.windows[j], cache.chunk_kv[j]
                past_k, past_v = window if so_far is None else (torch.cat([window.k, so_far.k], 1),
                                                                 torch.cat([window.v, so_far.v], 1))
                out, k, v = block.self_attn.chunk_attention(x, past_k, past_v, position)
                cache.chunk_kv[j] = Window(k, v) if so_far is None else Window(torch.cat([so_far.k, k], 1),
                                                                               torch.cat([so_far.v, v], 1))
                h = block.after_attention(h, out, cache.inner.fast[j])
            else:
                out, cache.kv[i] = block.self_attn.sequence_attention(x, cache.kv[i], position)
                h = block.after_attention(h, out)
        return self.lm.lm_head(self.backbone.norm(h)) if want_logits else None


class E2EForCausalLM(E2EPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: E2EConfig):
        super().__init__(config)
        self.model = E2EModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The inner step size's warm-up factor for training forwards (the trainer sets it each outer step from
        # config.ilr_multiplier); evaluation, decoding and eval-mode forwards use 1.
        self.inner_lr_multiplier = 1.0
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def generate(self, *args, use_cache=True, **kwargs):
        """GenerationMixin.generate, decoding through an E2ECache unless use_cache=False."""
        return super().generate(*args, use_cache=use_cache, **kwargs)

    @property
    def suffix_blocks(self):
        return [block for block in self.model.layers if block.is_suffix]

    @property
    def inner_loop(self) -> E2EInnerLoop:
        """The inner loop over this model's suffix blocks."""
        return E2EInnerLoop(self)

    @torch.no_grad()
    def inner_loop_trace(self, input_ids) -> list:
        """The fast weights after each inner step on input_ids (meta mode): [per updated chunk c: theta(c+1) as
        [gate, up, down per suffix block], each [B, out, in]]. A chunk is updated when the token after it is in
        input_ids (its last target), so T + 1 tokens give the updates of all T / b chunks."""
        if self.config.train_mode != "meta":
            raise ValueError("inner_loop_trace needs train_mode 'meta' (there is no inner loop otherwise)")
        trace = []
        self.inner_loop.run(input_ids, self.model.embed_tokens(input_ids), want_logits=False, trace=trace)
        return trace

    def next_token_losses(self, input_ids, block: int = LOSS_BLOCK):
        """[B, T] the cross-entropy of each position's prediction of the next token (0 at the last position; BOS
        targets included) without the [B, T, V] logits (evaluation by position at long context): chunk by chunk
        in meta mode, else `block` positions at a time."""
        if self.config.train_mode == "meta":
            return self.inner_loop.run(input_ids, self.model.embed_tokens(input_ids), want_logits=False)[1]
        return token_nll(self.model(input_ids), self.lm_head, next_token_targets(input_ids), block)

    # ---------------------------------------------------------------- forward

    def forward(self, input_ids=None, attention_mask=None, cache: E2ECache | None = None, inputs_embeds=None,
                labels=None, use_cache=None, output_hidden_states=None, return_dict=None, logits_to_keep: int = 0,
                past_key_values: E2ECache | None = None, cache_position=None, output_attentions=None,
                return_logits: bool | None = None):
        """Logits of every position (the last `logits_to_keep`, if set); in meta mode those of the fast weights of
        its chunk (the inner loop runs in every forward, training or not; in training mode the graph goes through
        it, so the loss differentiates through the inner loop). `labels`: the loss is the mean over the chunks
        that have targets of each chunk's mean cross-entropy of logits[:, t] against labels[:, t + 1] (ignore_index
        -100, BOS targets masked, as the official loss), taken from each chunk as it is read: with labels the
        logits are returned only when asked (`return_logits=True` or `logits_to_keep`), so neither training nor
        evaluation holds [B, T, V]. In meta mode labels may only mask input_ids (-100): the inner loop learns
        from input_ids. `cache` (or `past_key_values`): the decoding state (E2ECache), no outer gradient.
        `cache_position`, passed by older generate(), is implied by the cache and not read."""
        if input_ids is None:
            raise ValueError("E2E models need input_ids (inputs_embeds alone give the inner loop no targets)")
        if inputs_embeds is not None:
            raise ValueError("pass input_ids, not inputs_embeds: the inner loop trains on the next tokens' ids")
        if output_hidden_states or output_attentions:
            raise ValueError("output_hidden_states and output_attentions are not supported by E2E models")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"expected a (batch, length) input with length >= 1, got shape {tuple(input_ids.shape)}")
        if not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(input_ids)).tolist()
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("E2E models read every token in order and do not support padding (attention_mask has "
                             "zeros); pass unpadded sequences of equal length")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        cache = decoding_state(cache, past_key_values, E2ECache)
        want_logits = bool(return_logits or (return_logits is None and (labels is None or logits_to_keep)))
        chunk_stats = grad_norms = nll = logits = None
        if use_cache:
            cache = cache if cache is not None else E2ECache(self.config.num_hidden_layers)
            logits = E2EDecoding(self).read(input_ids, cache, 0 if labels is not None else logits_to_keep)
        elif self.config.train_mode == "meta":
            if labels is not None and not torch.compiler.is_compiling() \
                    and not bool(((labels == input_ids) | (labels == -100)).all()):
                raise ValueError("labels must equal input_ids where they are not -100: the inner loop of an E2E model "
                                 "learns from input_ids' next tokens")
            logits, nll, chunk_stats, grad_norms = self.inner_loop.run(input_ids, self.model.embed_tokens(input_ids),
                                                                     want_logits)
        else:
            h = self.model.norm(self.model.run_sequence_blocks(self.model.embed_tokens(input_ids), self.model.layers))
            if labels is not None:
                nll = token_nll(h, self.lm_head, next_token_targets(labels))
            if want_logits:
                logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None:
            targets = next_token_targets(labels)
            if nll is None:  # decoding through a cache: its logits
                nll = token_cross_entropy(logits, targets)
            per_chunk, counts = chunk_means(nll, loss_mask(targets, self.config.bos_token_id),
                                            self.config.mini_batch_size)
            loss = mean_over_chunks(per_chunk, counts)
        if logits is not None:
            if logits_to_keep and logits.shape[1] > logits_to_keep:
                logits = logits[:, -logits_to_keep:]
            logits = logits.to(compute_dtype(logits.dtype)) if want_logits or use_cache else None
        output = E2ECausalLMOutput(loss=loss, logits=logits, chunk_losses=chunk_stats, inner_grad_norms=grad_norms,
                                   **{CACHE_FIELD: cache if use_cache else None})
        return output if return_dict is not False else output.to_tuple()


AutoConfig.register("ttt_e2e", E2EConfig, exist_ok=True)
AutoModelForCausalLM.register(E2EConfig, E2EForCausalLM, exist_ok=True)
# save_pretrained writes the code beside the weights, with an auto_map (see the end of ttt.py)
E2EConfig.register_for_auto_class()
E2EForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["E2EConfig", "E2EModel", "E2EForCausalLM", "E2ECache", "E2E_STANDARD_CONFIGS"]
