"""The model a run trains: its config from the flags (a family of families.py at a size, a preset or the shape
--target_params finds), checked against a checkpoint or an --init_from model; building it; LoRA."""

import math
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ttt import TTT_STANDARD_CONFIGS
from ttt_train import data, hub
from ttt_train.cli import UserError
from ttt_train.families import ALL_FLAGS, E2E_TRAINING, FAMILIES, family_of

# Presets named by scale (configuration as data): the shape of a TTT-Linear / Transformer++ model of about that
# many parameters with the Llama-2 vocabulary (nano: with the byte tokenizer). TTT-E2E takes the same shape with
# the prime MLP in the last quarter of the blocks and families.E2E_WIDTH of the MLP width (the official sizes'
# ratio); Mamba-2 and Gated DeltaNet take its hidden size, and set one dimension (Family.match_knob) so that they
# count the TTT-Linear model's parameters.
PRESETS = {
    "nano": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384),
    "small": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, intermediate_size=1408),
    "medium": TTT_STANDARD_CONFIGS["125m"],
    "large": TTT_STANDARD_CONFIGS["350m"],
    "xlarge": TTT_STANDARD_CONFIGS["760m"],
}
DIM_FLAGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
HEAD_DIM = 64  # --target_params shapes: heads of 64, MLP width 8/3 of the hidden size (multiples of 64)
TARGET_TOLERANCE = 0.1  # shapes within 10% of --target_params compete on their aspect; else the closest wins


def make_config(model_type: str, size: str | None, dims: dict, vocab_size: int, overrides: dict, bos_token_id=None,
                eos_token_id=None):
    """The config of the family `model_type` with the shape `dims` (on top of the standard `size` when there is
    one)."""
    return FAMILIES[model_type].make_config(size, dims, vocab_size, overrides, bos_token_id, eos_token_id)


def search_shape(target: int, prefer_depth: bool, make) -> tuple:
    """(dims, parameters) of the shape whose parameter count is closest to `target`: hidden sizes in multiples of
    64 (heads of 64, MLP 8/3 wide), for each the depth that comes closest (counted by building the config: exact
    per layer, with the real vocabulary). Among the shapes within TARGET_TOLERANCE: the one whose hidden size per
    layer is closest to 64 (the paper's sizes' aspect), or with prefer_depth the deepest. None within it: the
    closest."""
    def shape(hidden, layers):
        return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_DIM),
                    intermediate_size=max(64, round(hidden * 8 / 3 / 64) * 64))

    smallest = parameter_count(make(shape(64, 1)))
    if target < smallest:
        raise UserError(f"--target_params {target} is below the smallest model of this type with this vocabulary "
                        f"({smallest} parameters: hidden 64, one layer)")
    candidates = []
    for hidden in range(64, 8193, 64):
        one, two = parameter_count(make(shape(hidden, 1))), parameter_count(make(shape(hidden, 2)))
        if one > target * (1 + TARGET_TOLERANCE):
            break
        per_layer = max(two - one, 1)
        layers = max(1, min(128, round((target - (one - per_layer)) / per_layer)))
        candidates.append((shape(hidden, layers), one + (layers - 1) * per_layer))
    close = [c for c in candidates if abs(c[1] - target) <= TARGET_TOLERANCE * target]
    if not close:
        dims, _ = min(candidates, key=lambda c: abs(c[1] - target))
    elif prefer_depth:
        dims, _ = max(close, key=lambda c: (c[0]["num_hidden_layers"], -abs(c[1] - target)))
    else:
        dims, _ = min(close, key=lambda c: abs(math.log(c[0]["hidden_size"] / c[0]["num_hidden_layers"] / 64)))
    return dims, parameter_count(make(dims))


def architecture_flags(model, e2e) -> dict:
    """The architecture flags' values (families.ALL_FLAGS, DIM_FLAGS and the E2E recipe's) from the model and
    TTT-E2E settings groups (ttt_train.config.ModelArguments, E2EArguments)."""
    return {**model.values(), **e2e.values()}


def build_config(model, e2e, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 report=print):
    """The config the model and TTT-E2E settings ask for: a standard size of the model type, a preset, or the shape
    --target_params finds; explicit dimension flags override the size's."""
    flags = architecture_flags(model, e2e)
    model_type = model.model_type or "ttt"
    family = FAMILIES[model_type]
    wrong = [f for f in ALL_FLAGS if f not in family.flags and flags[f] is not None]
    if wrong:
        raise UserError(f"--{wrong[0]} does not apply to --model_type {model_type}")
    sizes = family.sizes
    explicit = {k: flags[k] for k in DIM_FLAGS if flags[k] is not None}
    overrides = {k: flags[k] for k in family.flags if flags[k] is not None}
    make = lambda dims, size=None: make_config(model_type, size, dims, vocab_size, overrides, bos_token_id,
                                              eos_token_id)
    try:
        if model.target_params is not None:
            if explicit:
                raise UserError(f"--target_params chooses the dimensions; --{next(iter(explicit))} conflicts with it")
            dims, count = search_shape(model.target_params, model.prefer_depth, make)
            config = make(dims)
            # a Mamba-2 stack has neither heads of attention nor an MLP
            shape = ", ".join(what.format(getattr(config, k)) for k, what in (
                ("num_hidden_layers", "{} layers"), ("num_attention_heads", "{} heads"),
                ("intermediate_size", "MLP {}")) if hasattr(config, k))
            report(f"--target_params {model.target_params}: hidden {config.hidden_size}, {shape} -> {count} "
                   f"parameters (vocabulary {vocab_size})")
            return config
        if model.model_size in PRESETS:
            dims, size = {**PRESETS[model.model_size], **explicit}, None
        elif model.model_size in sizes:
            dims, size = explicit, model.model_size
        else:
            raise UserError(f"--model_size {model.model_size} is not a size of --model_type {model_type} "
                            f"({', '.join([*sizes, *PRESETS])})")
        if family.match_knob and family.match_knob not in explicit:
            return matched_config(family, {**TTT_STANDARD_CONFIGS.get(size, {}), **dims}, vocab_size, make, report)
        return make(dims, size)
    except ValueError as error:  # the config names the field and the value
        if isinstance(error, UserError):
            raise
        given = (f" (from {', '.join('--' + k for k in explicit)} on --model_size {model.model_size})"
                 if explicit else "")
        raise UserError(f"model configuration: {error}{given}") from error


def matched_config(family, dims: dict, vocab_size: int, make, report=print):
    """A baseline of the TTT size `dims` whose Family.match_knob (a depth or a width, in multiples of match_step)
    makes its parameter count closest to the TTT-Linear model of those dims with the same vocabulary (parameters
    grow linearly in either: two counts give the slope)."""
    target = parameter_count(FAMILIES["ttt"].make_config(None, dims, vocab_size, {}, None, None))
    knob, step = family.match_knob, family.match_step
    one, two = (parameter_count(make({**dims, knob: n * step})) for n in (1, 2))
    n = max(1, round((target - (one - (two - one))) / max(two - one, 1)))
    config = make({**dims, knob: n * step})
    count = parameter_count(config)
    report(f"{family.title}: {knob} {n * step} -> {count} parameters, {100 * (count / target - 1):+.1f}% of "
           f"TTT-Linear's {target} at this size")
    return config


def check_flags_agree(model, e2e, config, source: str, skip=(), why: str | None = None):
    """The explicitly given architecture flags must be those of `config` (the model of `source`): resuming or
    initialising from a saved model cannot change its architecture. `why`: the reason, added to a model flag's
    refusal."""
    try:
        actual = family_of(config)
    except ValueError as error:
        raise UserError(f"{source}: {error}") from error
    if model.model_type and model.model_type != actual.name:
        raise UserError(f"--model_type {model.model_type} conflicts with {source}, a {actual.title} model "
                        f"(--model_type {actual.name})")
    flags = architecture_flags(model, e2e)
    for flag in ALL_FLAGS + DIM_FLAGS:
        if flag in skip:
            continue
        value = flags[flag]
        if value is not None and value != setting(config, flag):
            reason = f" ({why})" if why and flag in ALL_FLAGS else ""
            raise UserError(f"--{flag} {value} conflicts with {source}, whose model has "
                            f"{flag}={setting(config, flag)}{reason}")


def setting(config, name: str):
    """A config's value of the flag `name` (transformers 5 keeps a Mistral model's RoPE theta in rope_parameters)."""
    if name == "rope_theta" and getattr(config, "rope_parameters", None):
        return config.rope_parameters.get("rope_theta")
    return getattr(config, name, None)


def with_settings(config, values: dict):
    """A copy of `config` with the flags' `values` (a ValueError names a field the config refuses)."""
    fields, values = config.to_diff_dict(), dict(values)
    if "rope_theta" in values and getattr(config, "rope_parameters", None):
        fields["rope_parameters"] = {**config.rope_parameters, "rope_theta": values.pop("rope_theta")}
    return type(config)(**{**fields, **values})


BYTES_PER_TRAINED_PARAMETER = 16  # float32 weights, their gradients and AdamW's two moments


def machine_memory(accelerator) -> tuple:
    """(bytes, what): the memory that holds a run's training state: every process's GPU, or on CPUs each
    machine's RAM (processes on one machine share it)."""
    processes = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_properties(accelerator.device).total_memory * processes, \
            f"{processes} GPU(s)"
    machines = max(1, processes // int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * machines, f"{machines} machine(s)' memory"


def check_target_fits(model, accelerator):
    """--target_params plans a new shape: one whose training state cannot fit in the run's memory, even sharded
    over all its processes, is refused before any data is read."""
    if model.target_params is None:
        return
    available, where = machine_memory(accelerator)
    needed = model.target_params * BYTES_PER_TRAINED_PARAMETER
    if needed > available:
        raise UserError(f"--target_params {model.target_params} cannot be trained here: its float32 weights, "
                        f"gradients and AdamW moments take about {needed / 2**30:,.0f} GiB "
                        f"({BYTES_PER_TRAINED_PARAMETER} bytes per parameter), and the {where} of this run hold "
                        f"{available / 2**30:,.0f} GiB")


# Options that fixed, when a run started, what its checkpoints hold (the shape, the trained tokenizer): a resume
# may repeat them (the same command line plus --resume_from_checkpoint), and they must then say the same.
FIXED_BY_TARGET = ("target_params", "prefer_depth")
FIXED_BY_TOKENIZER = ("train_tokenizer", "vocab_size", "auto_vocab_size", "min_vocab_size", "max_vocab_size",
                      "tokenizer_train_docs")


def check_repeated_start_options(model, data_args, checkpoint, saved_args: dict):
    """--target_params / --train_tokenizer (and their options) given on resume agree with the run's start."""
    groups = [(model, FIXED_BY_TARGET)] * (model.target_params is not None) + \
        [(data_args, FIXED_BY_TOKENIZER)] * bool(data_args.train_tokenizer)
    for group, names in groups:
        for name in names:
            given, saved = getattr(group, name), saved_args.get(name)
            if given != saved:
                started = f"{name}={saved}" if saved not in (None, False) else f"without --{name}"
                raise UserError(f"--{name} {given} conflicts with checkpoint {checkpoint}: its run started "
                                f"{started}; resume with the run's own options, or leave them out")


def checkpoint_config(model, e2e, data_args, checkpoint, saved_args: dict):
    """The checkpoint's config, after checking that the explicitly given architecture flags (and the repeated start
    options) agree with it."""
    check_repeated_start_options(model, data_args, checkpoint, saved_args)
    try:
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
    except Exception as error:  # a config.json that transformers cannot read: the checkpoint's error, one line
        raise data.refusal(error, "checkpoint", str(checkpoint)) from error
    saved_size = saved_args.get("model_size")
    if model.model_size is not None and saved_size is not None and model.model_size != saved_size:
        raise UserError(f"--model_size {model.model_size} conflicts with checkpoint {checkpoint}, trained with "
                         f"model_size={saved_size}")
    check_flags_agree(model, e2e, config, f"checkpoint {checkpoint}")
    return config


def init_config(model, e2e, local: str, report=print):
    """The config of the --init_from model (`local`: a local folder, the local copy of a bucket's, or a Hub id),
    checked against the flags; the settings the flags change (Family.init_overrides) are reported."""
    name = hub.resolve(local, "--init_from model")
    flags = architecture_flags(model, e2e)
    given = model.init_from
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except Exception as error:  # OSError, ValueError, JSON errors...: all mean "not a saved model"
        if data.ships_code(error):
            raise data.refusal(error, "--init_from model", given) from error
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--init_from {given} is not a saved model (config.json): {detail}") from error
    try:
        family = family_of(config)
    except ValueError as error:
        raise UserError(f"--init_from {given}: {error}") from error
    changeable = family.init_overrides
    e2e_only = [f for f in E2E_TRAINING if flags[f] is not None]  # meaningless for other models
    if e2e_only and E2E_TRAINING[0] not in changeable:
        raise UserError(f"--{e2e_only[0]} applies to TTT-E2E models; --init_from {given} is a "
                        f"{family.title} model")
    check_flags_agree(model, e2e, config, f"--init_from {given}", skip=changeable, why=family.fixed_on_init)
    overrides = {f: flags[f] for f in changeable if flags[f] is not None and flags[f] != setting(config, f)}
    if overrides:
        report(f"--init_from {given}: " + ", ".join(f"{flag} {setting(config, flag)} -> {value}"
                                                             for flag, value in overrides.items()))
        try:
            config = with_settings(config, overrides)
        except ValueError as error:
            raise UserError(f"model configuration: {error}") from error
    return config


def load_initial_model(name: str, config):
    """The weights of the saved model `name` (--init_from) in float32 (training keeps float32 master weights,
    whatever dtype they were saved in), from safetensors only (a pickled pytorch_model.bin is refused: it could run
    code)."""
    model = data.load_model(name, config=config, dtype=torch.float32, use_safetensors=True)
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
    return family_of(config).describe(config)


# ----------------------------------------------------------------------------------------------------------------
# LoRA (peft)

# Default adapter targets: Family.lora_targets (the mixer's projections and the MLP; TTT-E2E's prime MLP is left
# out: its weights are the fast weights' initial values, which the inner loop reads directly).
LORA_DEFAULTS = {"lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_target_modules": None}


def lora_settings(lora, saved_args: dict | None) -> dict | None:
    """The run's LoRA settings: the flags' (`lora`: ttt_train.config.LoraArguments), or on resume the checkpoint's
    (given flags must agree); None: no LoRA."""
    given = {k: getattr(lora, k) for k in LORA_DEFAULTS if getattr(lora, k) is not None}
    if saved_args is not None and saved_args.get("use_lora"):
        settings = {k: saved_args.get(k) if saved_args.get(k) is not None else v for k, v in LORA_DEFAULTS.items()}
        wrong = next((k for k, v in given.items() if v != settings[k]), None)
        if wrong:
            raise UserError(f"--{wrong} {given[wrong]} conflicts with the LoRA run being resumed ({wrong}="
                            f"{settings[wrong]})")
        return settings
    if saved_args is not None and lora.use_lora:
        raise UserError("--use_lora: the run being resumed trained full weights, not adapters; resume it without "
                        "--use_lora, or start a LoRA run from its model with --init_from <checkpoint> --use_lora "
                        "and another --output_dir")
    return {**LORA_DEFAULTS, **given} if lora.use_lora else None


def apply_lora(model, settings: dict):
    """`model` wrapped by peft with LoRA adapters on the target modules: only the adapters train."""
    try:
        import peft
    except ImportError as error:
        raise UserError("--use_lora needs peft: pip install peft") from error
    targets = settings["lora_target_modules"]
    targets = [t.strip() for t in targets.split(",") if t.strip()] if targets \
        else family_of(model.config).lora_targets
    config = peft.LoraConfig(r=settings["lora_rank"], lora_alpha=settings["lora_alpha"],
                             lora_dropout=settings["lora_dropout"], target_modules=targets, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)})
        raise UserError(f"--lora_target_modules {targets}: {str(error).splitlines()[0]}; this model's linear "
                        f"layers are named {', '.join(names)}") from error
