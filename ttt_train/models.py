"""Which model a run trains: a TTT model (ttt.py), or the Transformer++ baseline of the same size (Mistral's
Llama-style architecture from transformers: RoPE, SwiGLU, RMSNorm, attention through
torch.nn.functional.scaled_dot_product_attention, optional sliding window)."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

from ttt import TTT_STANDARD_CONFIGS, TTTConfig
from ttt_train.cli import UserError

MODEL_TYPES = ("ttt", "transformer")
# Flags that define a TTT architecture; on resume they must agree with the checkpoint's config.
TTT_FLAGS = ("ttt_layer_type", "ttt_base_lr", "mini_batch_size", "use_gate", "share_qk", "pre_conv",
             "conv_kernel", "scan_checkpoint_group_size")
TRANSFORMER_FLAGS = ("sliding_window",)
CONFIG_MODEL_TYPE = {"ttt": "ttt", "transformer": "mistral"}


def transformer_config(size: str, vocab_size: int, sliding_window: int | None = None) -> MistralConfig:
    """The baseline with the TTT size's hidden/intermediate/layers/heads, tied embeddings as the TTT models."""
    dims = TTT_STANDARD_CONFIGS[size]
    return MistralConfig(vocab_size=vocab_size, num_key_value_heads=dims["num_attention_heads"],
                         head_dim=dims["hidden_size"] // dims["num_attention_heads"], sliding_window=sliding_window,
                         max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
                         **dims)


def build_config(args, vocab_size: int):
    model_type = args.model_type or "ttt"
    wrong = [f for f in (TRANSFORMER_FLAGS if model_type == "ttt" else TTT_FLAGS) if getattr(args, f) is not None]
    if wrong:
        raise UserError(f"--{wrong[0]} does not apply to --model_type {model_type}")
    if model_type == "transformer":
        return transformer_config(args.model_size, vocab_size, args.sliding_window)
    overrides = {k: getattr(args, k) for k in TTT_FLAGS if getattr(args, k) is not None}
    try:
        return TTTConfig.from_size(args.model_size, vocab_size=vocab_size, **overrides)
    except ValueError as error:  # TTTConfig names the field and the value
        raise UserError(f"model configuration: {error}") from error


def checkpoint_config(args, checkpoint, saved_args: dict):
    """The checkpoint's config, after checking that the explicitly given architecture flags agree with it
    (resuming cannot change the model)."""
    config = AutoConfig.from_pretrained(checkpoint)
    if args.model_type and CONFIG_MODEL_TYPE[args.model_type] != config.model_type:
        raise UserError(f"--model_type {args.model_type} conflicts with checkpoint {checkpoint}, a "
                         f"{config.model_type} model")
    saved_size = saved_args.get("model_size")
    if args.model_size is not None and saved_size is not None and args.model_size != saved_size:
        raise UserError(f"--model_size {args.model_size} conflicts with checkpoint {checkpoint}, trained with "
                         f"model_size={saved_size}")
    for flag in TTT_FLAGS + TRANSFORMER_FLAGS:
        value = getattr(args, flag)
        if value is not None and value != getattr(config, flag, None):
            raise UserError(f"--{flag} {value} conflicts with checkpoint {checkpoint}, trained with "
                             f"{flag}={getattr(config, flag, None)}")
    return config


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
    return "Transformer++" + (f" (sliding window {config.sliding_window})" if config.sliding_window else "")
