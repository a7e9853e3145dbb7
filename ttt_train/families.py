"""The model families a run can train, one record each: what the trainer, the evaluator and the tools need to know
about a family, in one place. Adding a family is one record here plus its model (a file of this project or a
transformers class); nothing else branches on the family.

Names: `Family.name` is the family's name everywhere in this project (--model_type, training_args.json, metrics,
launchers, docs); `config_type` is what its saved config.json says (transformers' own model_type, which this
project cannot rename: the Transformer++ is a "mistral" model)."""

import importlib.metadata
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, Mamba2Config, MistralConfig, Qwen3_5TextConfig

import ttt_scan
from ttt import TTT_STANDARD_CONFIGS, TTTConfig
from ttt_e2e import E2E_STANDARD_CONFIGS, E2EConfig

# TTT-E2E on a preset or a searched shape: the MLP width of the official sizes' ratio (1664 / 2048, 2304 / 2816).
E2E_WIDTH = 13 / 16


@dataclass(frozen=True)
class KernelPath:
    """Which implementation runs a family's sequence mixing: `fused` (kernels written for the GPU) or not (the
    PyTorch reference path), in words, and what to install for the fused path where it is missing."""
    fused: bool
    detail: str
    install: str = ""

    def record(self) -> dict:
        return {"kernels": "fused" if self.fused else "fallback", "kernel_detail": self.detail}


@dataclass(frozen=True)
class Family:
    name: str  # --model_type
    title: str
    config_type: str  # config.json's model_type
    flags: tuple  # the architecture flags that apply (on resume / --init_from they must agree with the config)
    sizes: dict  # standard sizes by name; presets and --target_params shapes come from models.PRESETS / the search
    make_config: Callable  # (size | None, dims, vocab_size, overrides, bos, eos) -> config
    describe: Callable  # config -> words
    mixing_flops: Callable  # (config, seq_length) -> forward FLOPs of one token's sequence mixing in one layer
    kernels: Callable  # (config, device) -> KernelPath
    lora_targets: list | str  # peft target_modules by default
    matches: Callable = lambda config: True  # which saved configs of config_type are this family's
    no_decay: tuple = ()  # parameter names (the last component) AdamW does not decay, besides norms/biases/1-D
    init_overrides: tuple = ()  # what --init_from may change (settings no weight's shape depends on)
    fixed_on_init: str | None = None  # why the rest stays fixed, said with the refusal
    match_knob: str | None = None  # the dimension set so a size counts TTT-Linear's parameters (a baseline)
    match_step: int = 1  # ... in multiples of this
    ttt_statistics: bool = False  # the evaluator logs the TTT layers' statistics
    inner_loop: Callable = lambda config: False  # TTT-E2E's meta-learning: inner-loop metrics, inner lr warm-up
    check_run: Callable = lambda config, seq_length: None  # a run's settings the config cannot take (message)
    generation_kwargs: Callable = lambda model: {}  # what model.generate needs beyond the inputs
    paper: str | None = None  # what a model card asks its users to cite
    extra: dict = field(default_factory=dict)


def package_versions(*modules) -> tuple:
    """(versions of the importable ones as 'name version', the missing ones)."""
    found, missing = [], []
    for module in modules:
        if importlib.util.find_spec(module) is None:
            missing.append(module)
        else:
            try:
                found.append(f"{module} {importlib.metadata.version(module.replace('_', '-'))}")
            except importlib.metadata.PackageNotFoundError:
                found.append(module)
    return found, missing


def fused_packages(device, modules: dict, what: str) -> KernelPath:
    """The path of a transformers model whose fused kernels come from `modules` ({import name: pip name}):
    transformers uses them when they import and the tensors are on a CUDA GPU, else its PyTorch reference."""
    found, missing = package_versions(*modules)
    install = f"pip install {' '.join(modules[m] for m in modules)} (on a CUDA GPU)"
    if torch.device(device).type != "cuda":
        return KernelPath(False, f"{what}: PyTorch reference path (the fused kernels run on CUDA GPUs only)", install)
    if missing:
        return KernelPath(False, f"{what}: PyTorch reference path ({', '.join(missing)} not installed)", install)
    return KernelPath(True, f"{what}: {', '.join(found)}")


def attention_kernels(config, device) -> KernelPath:
    """Attention through torch's scaled_dot_product_attention: flash / memory-efficient kernels on a GPU."""
    if torch.device(device).type == "cuda":
        return KernelPath(True, f"attention: torch SDPA on CUDA (torch {torch.__version__})")
    return KernelPath(False, "attention: torch SDPA on the CPU (the fused attention kernels run on GPUs)",
                      "a CUDA GPU")


def attention_flops(config, seq_length):
    """Scores and values over the T (or window) previous tokens: 4 T C."""
    return 4 * min(seq_length, getattr(config, "sliding_window", None) or seq_length) * config.hidden_size


# ----------------------------------------------------------------------------------------------------------------
# TTT-Linear / TTT-MLP (ttt.py)


def ttt_config(size, dims, vocab_size, overrides, bos_token_id, eos_token_id):
    return TTTConfig(**{**TTT_STANDARD_CONFIGS.get(size, {}), **dims, "vocab_size": vocab_size, **overrides})


def ttt_flops(config, seq_length):
    """The inner loop's dual form per head, K = mini_batch_size, f = head dim: 6f^2 + 4Kf for TTT-Linear (the two
    f x f products, the gradient sum, the K x K mixing), 56f^2 + 8Kf for TTT-MLP."""
    f, K = config.hidden_size // config.num_attention_heads, config.mini_batch_size
    inner = 6 * f * f + 4 * K * f if config.ttt_layer_type == "linear" else 56 * f * f + 8 * K * f
    return inner * config.num_attention_heads


def ttt_kernels(config, device) -> KernelPath:
    """The scan TTTLayer.scan_implementation picks for a float32 scan of this config's mini-batches here."""
    f = config.hidden_size // config.num_attention_heads
    q = torch.empty(1, 1, 1, config.mini_batch_size, f, device=device)
    if config.scan_implementation == "loop" or config.scan_checkpoint_group_size:
        return KernelPath(False, "TTT scan: the loop in PyTorch (scan_implementation / scan_checkpoint_group_size)",
                          "the default scan settings")
    why_not = ttt_scan.why_not_triton(q, torch.float32, config.ttt_layer_type)
    if why_not is None:
        return KernelPath(True, f"TTT scan: Triton kernels (triton {package_versions('triton')[0][0].split()[-1]})")
    return KernelPath(False, f"TTT scan: recomputing scan in PyTorch ({why_not})", "triton (on a CUDA GPU)")


# ----------------------------------------------------------------------------------------------------------------
# Transformer++ (transformers' Mistral: RoPE, SwiGLU, RMSNorm, SDPA, optional sliding window)


def transformer_config(size, dims, vocab_size, overrides, bos_token_id=1, eos_token_id=2) -> MistralConfig:
    """The baseline with a TTT size's hidden/intermediate/layers/heads, tied embeddings as the TTT models."""
    dims = {**TTT_STANDARD_CONFIGS.get(size, {}), **dims}
    return MistralConfig(vocab_size=vocab_size, num_key_value_heads=dims["num_attention_heads"],
                         head_dim=dims["hidden_size"] // dims["num_attention_heads"],
                         sliding_window=overrides.get("sliding_window"), max_position_embeddings=2048,
                         rope_theta=overrides.get("rope_theta") or 10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa", **dims)


# ----------------------------------------------------------------------------------------------------------------
# TTT-E2E (ttt_e2e.py) and its full-attention baseline


def e2e_config(variant):
    def make(size, dims, vocab_size, overrides, bos_token_id, eos_token_id):
        overrides = dict(overrides)
        mode = variant if overrides.pop("train_mode", None) != "pretrain" else "pretrain"
        if size not in E2E_STANDARD_CONFIGS:  # a preset or a searched shape: E2E's proportions on it
            base = "tiny" if dims["hidden_size"] <= 256 else "125m"  # tiny's window and chunk, or the official ones
            dims = dict(dims)
            if mode != "fa":
                dims["intermediate_size"] = max(32, round(dims["intermediate_size"] * E2E_WIDTH / 32) * 32)
                dims.setdefault("suffix_len", max(1, dims["num_hidden_layers"] // 4))
            size = base
        elif "num_hidden_layers" in dims and mode != "fa":
            dims = {**dims, "suffix_len": max(1, dims["num_hidden_layers"] // 4)}
        return E2EConfig.from_size(size, mode, vocab_size=vocab_size, bos_token_id=bos_token_id,
                                   eos_token_id=eos_token_id, **{**dims, **overrides})
    return make


def describe_e2e(config) -> str:
    attention = f"window {config.sliding_window}" if config.sliding_window else "full attention"
    if not config.suffix_len:
        return f"TTT-E2E's full-attention baseline ({attention})"
    mode = (f"chunks of {config.mini_batch_size}" + (", first-order" if config.first_order else "")
            + ("" if config.recompute_prefix else ", prefix activations kept")
            if config.train_mode == "meta" else "TTT off")
    return f"TTT-E2E ({attention}, prime MLPs in the last {config.suffix_len} blocks, {mode})"


def e2e_check_run(config, seq_length):
    if config.train_mode == "meta" and seq_length % config.mini_batch_size:
        return (f"--seq_length {seq_length} is not a multiple of the E2E chunk (mini_batch_size "
                f"{config.mini_batch_size}): the training loss weighs every chunk equally, as the official one")
    return None


# --init_from for length extension (a model trained at one length continued at a longer one) may raise RoPE theta
# for full attention (the official fa extension: 2e6 at 32K, 1e7 at 128K) and change E2E's window and chunk; E2E's
# training settings change too (extension starts without the inner step's warm-up, from a model pretrained with it).
E2E_TRAINING = ("ilr_init", "ilr_warmup_steps", "first_order", "recompute_prefix")
E2E_FLAGS = ("sliding_window", "mini_batch_size", "suffix_len", "train_mode", "inner_lr", "inner_clip", "ilr_init",
             "ilr_warmup_steps", "first_order", "recompute_prefix", "rope_theta")
E2E_LORA = r".*\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"  # the prime MLP: the fast weights' start


# ----------------------------------------------------------------------------------------------------------------
# Mamba-2 (transformers' Mamba2ForCausalLM), the published shape: head dim 64, expand 2, state 128, one group,
# convolution 4, chunk 256; a pure Mamba-2 stack (no MLP), so a size has about twice the layers of a Transformer's
# (mamba2-130m: 24 layers of 768) and its depth is set to count the TTT-Linear model's parameters.

MAMBA2_SHAPE = dict(state_size=128, expand=2, head_dim=64, n_groups=1, conv_kernel=4, chunk_size=256)


def mamba2_config(size, dims, vocab_size, overrides, bos_token_id, eos_token_id) -> Mamba2Config:
    dims = {**TTT_STANDARD_CONFIGS.get(size, {}), **dims}
    hidden = dims["hidden_size"]
    heads = MAMBA2_SHAPE["expand"] * hidden // MAMBA2_SHAPE["head_dim"]
    if heads * MAMBA2_SHAPE["head_dim"] != MAMBA2_SHAPE["expand"] * hidden:
        raise ValueError(f"hidden_size {hidden}: Mamba-2's heads of {MAMBA2_SHAPE['head_dim']} need "
                         f"{MAMBA2_SHAPE['expand']} x hidden_size to be a multiple of {MAMBA2_SHAPE['head_dim']}")
    return Mamba2Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=dims["num_hidden_layers"],
                        num_heads=heads, tie_word_embeddings=True, bos_token_id=bos_token_id or 1,
                        eos_token_id=eos_token_id or 2, pad_token_id=0, **MAMBA2_SHAPE)


def mamba2_flops(config, seq_length):
    """The SSD scan per token and head (P = head dim, N = state size): the state update B x^T and the read C^T h,
    2PN each, and the chunked form's within-chunk scores, about 2 Q (N + P) with chunk Q."""
    P, N, Q = config.head_dim, config.state_size, min(config.chunk_size, seq_length)
    return config.num_heads * (4 * P * N + 2 * Q * (N + P))


# ----------------------------------------------------------------------------------------------------------------
# Gated DeltaNet (transformers' Qwen3.5 text model with every layer a linear-attention layer): Qwen3.5's head shape
# (key and value heads of 128, twice as many value heads as key heads, convolution 4), a SwiGLU MLP after each
# mixer whose width is set to count the TTT-Linear model's parameters.


def gated_deltanet_config(size, dims, vocab_size, overrides, bos_token_id, eos_token_id) -> Qwen3_5TextConfig:
    dims = {**TTT_STANDARD_CONFIGS.get(size, {}), **dims}
    key_heads = max(1, dims["hidden_size"] // 256)
    return Qwen3_5TextConfig(
        vocab_size=vocab_size, hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"], layer_types=["linear_attention"] * dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"], num_key_value_heads=dims["num_attention_heads"],
        head_dim=dims["hidden_size"] // dims["num_attention_heads"], linear_num_key_heads=key_heads,
        linear_num_value_heads=2 * key_heads, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=bos_token_id or 1,
        eos_token_id=eos_token_id or 2, pad_token_id=None,
        use_cache=False)  # transformers' cache cannot be built for this model (RecurrentCache); generation passes one


def gated_deltanet_flops(config, seq_length):
    """The chunked delta rule per token and head (d_k, d_v = 128, chunk 64): the state read and update, 4 d_k d_v,
    and the within-chunk scores and WY terms, about 2 x 64 (2 d_k + d_v)."""
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    return config.linear_num_value_heads * (4 * dk * dv + 128 * (2 * dk + dv))


class RecurrentCache(DynamicCache):
    """A DynamicCache for a model whose every layer is recurrent (Gated DeltaNet here). transformers' own cache
    counts the tokens seen by an attention layer's keys, and raises when there is none (5.6-5.25: `get_seq_length`
    / `get_mask_sizes` "can only be called on Attention layers"), so generation with a cache fails; this one counts
    them itself. `seen` grows after each forward (count_tokens, a forward hook on the decoder)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple:
        return self.seen + query_length, 0


def count_tokens(module, args, kwargs, output):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, RecurrentCache):
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        inputs = inputs if inputs is not None else args[0]
        cache.seen += inputs.shape[1]


def recurrent_generation(model) -> dict:
    """A RecurrentCache, counted by a hook on the decoder (installed once)."""
    base = model.get_decoder()
    if not getattr(base, "_counts_recurrent_cache", False):
        base.register_forward_hook(count_tokens, with_kwargs=True)
        base._counts_recurrent_cache = True
    # transformers renamed the cache argument (5.6: past_key_values; later: cache, the old name warns)
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    return {name: RecurrentCache(config=model.config), "use_cache": True}


# ----------------------------------------------------------------------------------------------------------------
# The registry

TTT_PAPER = ("Yu Sun et al., *Learning to (Learn at Test Time): RNNs with Expressive Hidden States*, "
             "arXiv:2407.04620 (2024).")
E2E_PAPER = ("*End-to-End Test-Time Training for Long Context* (the official JAX code: "
             "https://github.com/test-time-training/e2e).")
ATTENTION_LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TTT_FLAGS = ("ttt_layer_type", "ttt_base_lr", "mini_batch_size", "use_gate", "share_qk", "pre_conv", "conv_kernel",
             "scan_checkpoint_group_size", "rope_theta")

FAMILIES = {family.name: family for family in (
    Family(
        name="ttt", title="TTT-Linear / TTT-MLP", config_type="ttt", flags=TTT_FLAGS, sizes=TTT_STANDARD_CONFIGS,
        make_config=ttt_config, describe=lambda c: {"linear": "TTT-Linear", "mlp": "TTT-MLP"}[c.ttt_layer_type],
        mixing_flops=ttt_flops, kernels=ttt_kernels, lora_targets=ATTENTION_LORA[:4] + ["g_proj"] + ATTENTION_LORA[4:],
        no_decay=("b1", "b2", "learnable_token_idx"), ttt_statistics=True, paper=TTT_PAPER,
        fixed_on_init="TTT layers restart RoPE every mini-batch, so theta does not bound their context, and the "
                      "mini-batch size fixes the shape of the learned token-position factors; a TTT model extends to "
                      "a longer context as it is: train it at the longer --seq_length"),
    Family(
        name="transformer", title="Transformer++", config_type="mistral", flags=("sliding_window", "rope_theta"),
        sizes=TTT_STANDARD_CONFIGS, make_config=transformer_config,
        describe=lambda c: "Transformer++" + (f" (sliding window {c.sliding_window})" if c.sliding_window else ""),
        mixing_flops=attention_flops, kernels=attention_kernels, lora_targets=ATTENTION_LORA,
        init_overrides=("rope_theta", "sliding_window")),
    Family(
        name="e2e", title="TTT-E2E", config_type="ttt_e2e", flags=E2E_FLAGS, sizes=E2E_STANDARD_CONFIGS,
        make_config=e2e_config("e2e"), describe=describe_e2e, matches=lambda c: c.suffix_len > 0,
        # the attention as for a Transformer; the inner loop (a further pass of the suffix blocks) is not counted
        mixing_flops=attention_flops, kernels=attention_kernels, lora_targets=E2E_LORA,
        init_overrides=E2E_TRAINING + ("rope_theta", "sliding_window", "mini_batch_size"),
        inner_loop=lambda c: c.train_mode == "meta", check_run=e2e_check_run, paper=E2E_PAPER),
    Family(
        name="e2e_fa", title="TTT-E2E's full-attention baseline", config_type="ttt_e2e", flags=("rope_theta",),
        sizes=E2E_STANDARD_CONFIGS, make_config=e2e_config("fa"), describe=describe_e2e,
        matches=lambda c: c.suffix_len == 0, mixing_flops=attention_flops, kernels=attention_kernels,
        lora_targets=E2E_LORA, init_overrides=E2E_TRAINING + ("rope_theta", "sliding_window", "mini_batch_size"),
        paper=E2E_PAPER),
    Family(
        name="mamba2", title="Mamba-2", config_type="mamba2", flags=(), sizes=TTT_STANDARD_CONFIGS,
        make_config=mamba2_config, mixing_flops=mamba2_flops,
        describe=lambda c: f"Mamba-2 (state {c.state_size}, {c.num_heads} heads of {c.head_dim}, expand {c.expand})",
        kernels=lambda c, device: fused_packages(device, {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"},
                                                 "Mamba-2 scan"),
        # peft refuses out_proj (and conv1d) on Mamba models: the fused path reads their weights directly
        lora_targets=["in_proj"], no_decay=("A_log", "D", "dt_bias"), match_knob="num_hidden_layers",
        paper="Tri Dao and Albert Gu, *Transformers are SSMs: Generalized Models and Efficient Algorithms Through "
              "Structured State Space Duality*, arXiv:2405.21060 (2024)."),
    Family(
        name="gated_deltanet", title="Gated DeltaNet", config_type="qwen3_5_text", flags=(),
        sizes=TTT_STANDARD_CONFIGS, make_config=gated_deltanet_config, mixing_flops=gated_deltanet_flops,
        describe=lambda c: (f"Gated DeltaNet ({c.linear_num_key_heads} key / {c.linear_num_value_heads} value heads "
                            f"of {c.linear_key_head_dim})"),
        kernels=lambda c, device: fused_packages(
            device, {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}, "Gated DeltaNet"),
        lora_targets=["in_proj_qkv", "in_proj_z", "out_proj", "gate_proj", "up_proj", "down_proj"],
        no_decay=("A_log", "dt_bias"), match_knob="intermediate_size", match_step=64,
        generation_kwargs=recurrent_generation,
        paper="Songlin Yang, Jan Kautz and Ali Hatamizadeh, *Gated Delta Networks: Improving Mamba2 with Delta Rule*, "
              "arXiv:2412.06464 (2024)."),
)}
NAMES = tuple(FAMILIES)
ALL_FLAGS = tuple(dict.fromkeys(f for family in FAMILIES.values() for f in family.flags))


def family_of(config) -> Family:
    """The family of a saved model's config (a ValueError for a model no family trains)."""
    for family in FAMILIES.values():
        if family.config_type == getattr(config, "model_type", None) and family.matches(config):
            return family
    raise ValueError(f"a {getattr(config, 'model_type', None)} model is none of this project's families "
                     f"({', '.join(NAMES)})")


def generation_kwargs(model) -> dict:
    """What model.generate needs for this model's family beyond the inputs ({} for a model of no family)."""
    try:
        family = family_of(model.config)
    except ValueError:
        return {}
    return family.generation_kwargs(model)
