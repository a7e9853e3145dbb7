"""Which model a run trains: a TTT model (ttt.py), or the Transformer++ baseline of the same size (Mistral's
Llama-style architecture from transformers: RoPE, SwiGLU, RMSNorm, attention through
torch.nn.functional.scaled_dot_product_attention, optional sliding window)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

from ttt import TTT_STANDARD_CONFIGS, TTTConfig
from ttt_e2e import E2E_STANDARD_CONFIGS, E2EConfig
from ttt_train import data, hub
from ttt_train.cli import UserError

MODEL_TYPES = ("ttt", "transformer", "e2e", "e2e_fa")
# Flags that define each kind of model's architecture; on resume (or --init_from) they must agree with its config.
TTT_FLAGS = ("ttt_layer_type", "ttt_base_lr", "mini_batch_size", "use_gate", "share_qk", "pre_conv",
             "conv_kernel", "scan_checkpoint_group_size")
TRANSFORMER_FLAGS = ("sliding_window",)
E2E_FLAGS = ("sliding_window", "mini_batch_size", "suffix_len", "train_mode", "inner_lr", "inner_clip", "ilr_init",
             "ilr_warmup_steps", "first_order")
FLAGS = {"ttt": TTT_FLAGS, "transformer": TRANSFORMER_FLAGS, "e2e": E2E_FLAGS, "e2e_fa": ()}
ALL_FLAGS = tuple(dict.fromkeys(TTT_FLAGS + TRANSFORMER_FLAGS + E2E_FLAGS))
# TTT-E2E training settings, not architecture: --init_from may change them (extension starts without the inner
# step's warm-up, from a model pretrained with it).
INIT_OVERRIDES = ("ilr_init", "ilr_warmup_steps", "first_order")
CONFIG_MODEL_TYPE = {"ttt": "ttt", "transformer": "mistral", "e2e": "ttt_e2e", "e2e_fa": "ttt_e2e"}


def transformer_config(size: str, vocab_size: int, sliding_window: int | None = None) -> MistralConfig:
    """The baseline with the TTT size's hidden/intermediate/layers/heads, tied embeddings as the TTT models."""
    dims = TTT_STANDARD_CONFIGS[size]
    return MistralConfig(vocab_size=vocab_size, num_key_value_heads=dims["num_attention_heads"],
                         head_dim=dims["hidden_size"] // dims["num_attention_heads"], sliding_window=sliding_window,
                         max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
                         **dims)


def build_config(args, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None):
    model_type = args.model_type or "ttt"
    wrong = [f for f in ALL_FLAGS if f not in FLAGS[model_type] and getattr(args, f) is not None]
    if wrong:
        raise UserError(f"--{wrong[0]} does not apply to --model_type {model_type}")
    sizes = E2E_STANDARD_CONFIGS if model_type.startswith("e2e") else TTT_STANDARD_CONFIGS
    if args.model_size not in sizes:
        raise UserError(f"--model_size {args.model_size} is not a size of --model_type {model_type} "
                        f"({', '.join(sizes)})")
    if model_type == "transformer":
        return transformer_config(args.model_size, vocab_size, args.sliding_window)
    overrides = {k: getattr(args, k) for k in FLAGS[model_type] if getattr(args, k) is not None}
    try:
        if model_type == "ttt":
            return TTTConfig.from_size(args.model_size, vocab_size=vocab_size, **overrides)
        variant = "fa" if model_type == "e2e_fa" else "pretrain" if overrides.pop("train_mode", None) == "pretrain" \
            else "e2e"
        return E2EConfig.from_size(args.model_size, variant, vocab_size=vocab_size, bos_token_id=bos_token_id,
                                   eos_token_id=eos_token_id, **overrides)
    except ValueError as error:  # the config names the field and the value
        raise UserError(f"model configuration: {error}") from error


def check_flags_agree(args, config, source: str, skip=()):
    """The explicitly given architecture flags must be those of `config` (the model of `source`): resuming or
    initialising from a saved model cannot change its architecture."""
    if args.model_type and CONFIG_MODEL_TYPE[args.model_type] != config.model_type:
        raise UserError(f"--model_type {args.model_type} conflicts with {source}, a {config.model_type} model")
    for flag in ALL_FLAGS:
        if flag in skip:
            continue
        value = getattr(args, flag)
        if value is not None and value != getattr(config, flag, None):
            raise UserError(f"--{flag} {value} conflicts with {source}, whose model has "
                            f"{flag}={getattr(config, flag, None)}")


def checkpoint_config(args, checkpoint, saved_args: dict):
    """The checkpoint's config, after checking that the explicitly given architecture flags agree with it."""
    config = AutoConfig.from_pretrained(checkpoint)
    saved_size = saved_args.get("model_size")
    if args.model_size is not None and saved_size is not None and args.model_size != saved_size:
        raise UserError(f"--model_size {args.model_size} conflicts with checkpoint {checkpoint}, trained with "
                         f"model_size={saved_size}")
    check_flags_agree(args, config, f"checkpoint {checkpoint}")
    return config


def init_config(args):
    """The config of the --init_from model (a local folder or a Hub id), checked against the flags."""
    name = hub.resolve(args.init_from, "--init_from model")
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as error:  # OSError, ValueError, JSON errors...: all mean "not a saved model"
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--init_from {args.init_from} is not a saved model (config.json): {detail}") from error
    overrides = {f: getattr(args, f) for f in INIT_OVERRIDES if getattr(args, f) is not None}
    if overrides and config.model_type != "ttt_e2e":
        raise UserError(f"--{next(iter(overrides))} applies to TTT-E2E models; --init_from {args.init_from} is a "
                        f"{config.model_type} model")
    check_flags_agree(args, config, f"--init_from {args.init_from}", skip=INIT_OVERRIDES)
    if overrides:
        try:
            config = type(config)(**{**config.to_diff_dict(), **overrides})
        except ValueError as error:
            raise UserError(f"model configuration: {error}") from error
    return config


def load_initial_model(args, config):
    """The --init_from model's weights in float32 (training keeps float32 master weights, whatever dtype they were
    saved in), from safetensors only (a pickled pytorch_model.bin is refused: it could run code)."""
    model = data.load_model(args.init_from, config=config, dtype=torch.float32, use_safetensors=True)
    return model.train()


def build_model(config):
    return AutoModelForCausalLM.from_config(config)


def parameter_count(config) -> int:
    """Parameters of the model `config` describes (tied ones once), counted without allocating them."""
    with torch.device("meta"):
        model = build_model(config)
    model.tie_weights()  # transformers 5.6 leaves a model built on the meta device untied until it is loaded
    return sum(p.numel() for p in model.parameters())


def enable_activation_checkpointing(model):
    """Recompute each block's activations in the backward (non-reentrant). transformers renamed
    gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns, and goes in v6); the
    releases before the rename have only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def describe(config) -> str:
    if config.model_type == "ttt":
        return {"linear": "TTT-Linear", "mlp": "TTT-MLP"}[config.ttt_layer_type]
    if config.model_type == "ttt_e2e":
        attention = f"window {config.sliding_window}" if config.sliding_window else "full attention"
        if not config.suffix_len:
            return f"TTT-E2E's full-attention baseline ({attention})"
        mode = (f"chunks of {config.mini_batch_size}" + (", first-order" if config.first_order else "")
                if config.train_mode == "meta" else "TTT off")
        return f"TTT-E2E ({attention}, prime MLPs in the last {config.suffix_len} blocks, {mode})"
    return "Transformer++" + (f" (sliding window {config.sliding_window})" if config.sliding_window else "")
