"""The trainer's settings as typed data: one dataclass per component (model, TTT-E2E, LoRA, Hub, data, optimisation,
performance, checkpoints, logging), each checking its own fields; the command line is generated from them by
transformers' HfArgumentParser (a field is a flag, its group a --help section, its `aliases` the spellings other
trainers use; every flag also takes its dashed spelling). A YAML or JSON file given to --config maps onto the same
fields (the command line wins). What a run settles while it runs (the checkpoint it resumes, the step count of
--num_train_epochs, the tokenizer and size taken from a checkpoint) is `RunState`, never written back here.

Adding a flag: one field in its group's dataclass (its type, default, help and aliases), and a check in that
group's `check` when it has a range. Only the standard library, PyYAML and transformers' argument parser are
imported: --help stays fast (no torch).
"""

import argparse
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers.hf_argparser import HfArgumentParser

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes
# The model's tables, named here without importing ttt.py (torch and transformers' models take seconds: --help must
# not); tests/test_train.py checks that they name exactly ttt.TTT_STANDARD_CONFIGS, ttt_e2e.E2E_STANDARD_CONFIGS,
# ttt.TTT_LAYER_TYPES, ttt_train.models.PRESETS and the families of ttt_train/families.py.
FAMILIES = ("ttt", "transformer", "e2e", "e2e_fa", "mamba2", "gated_deltanet")
MODEL_SIZES = ("tiny", "125m", "350m", "760m", "1b")
E2E_MODEL_SIZES = ("tiny", "125m", "350m", "760m", "1b", "3b")
PRESETS = ("nano", "small", "medium", "large", "xlarge")
LAYER_TYPES = ("linear", "mlp")
PRECISIONS = ("no", "fp16", "bf16")  # Accelerate's mixed_precision values
# The largest --vocab_size / --max_vocab_size: the BPE trainer's memory grows with the vocabulary (10^9 asks the
# tokenizers library for ~70 GB and aborts the process), and the largest vocabularies in use are about 256K.
MAX_VOCAB_SIZE = 2**20
DEFAULT_STEPS = 200  # --max_train_steps when neither it nor --num_train_epochs is given
DEFAULT_WARMUP_RATIO = 0.1  # the paper's recipe
DEFAULT_VOCAB_SIZE = 8192  # --train_tokenizer without --vocab_size / --auto_vocab_size


class ConfigError(ValueError):
    """A setting that is wrong on its own or with another: the parser prints it as one line and exits 2."""


class ParameterCount(int):
    """A parameter count as users write it: 10000000, 1e7, 10M, 1.3B, 500K."""

    def __new__(cls, text):
        if isinstance(text, int) and not isinstance(text, bool):
            value = text
        else:
            text = str(text)
            scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper(), 1)
            try:
                value = float(text[:-1] if scale != 1 else text) * scale
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected a parameter count like 10M or 1.3B, got {text!r}") from None
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"expected a positive parameter count, got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive parameter count, got {text!r}")
        return super().__new__(cls, int(value))


def flag(default=None, help=None, aliases=(), choices=None, switch=None):
    """A dataclass field that is a flag. `aliases`: other trainers' spellings (one option in --help);
    `switch`: for a bool, "store_true" (--x turns it on) or "negatable" (--x / --no-x)."""
    metadata = {"help": help} if help else {}
    if aliases:
        metadata["aliases"] = list(aliases)
    if choices:
        metadata["choices"] = list(choices)
    if switch:
        metadata["switch"] = switch
    return field(default=default, metadata=metadata)


class Group:
    """What every settings group shares: its fields' names and the checks on their ranges."""

    def values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def positive(self, *names):
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name} must be positive, got {value}")

    def non_negative(self, *names):
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name} must be >= 0, got {value}")

    def only_with(self, switch: str, names: tuple, advice: str = ""):
        """The fields `names` apply only with the switch `switch` on: one set without it is refused."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [name for name in names if getattr(self, name) != defaults[name]]
        if given and not getattr(self, switch):
            raise ConfigError(f"--{given[0]} applies to --{switch}{advice}")

    def finite(self):  # inf and nan parse as floats
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")

    def check(self):
        self.finite()


@dataclass
class ModelArguments(Group):
    _argument_group_name = "model (unset flags take the official defaults; on resume they come from the checkpoint)"
    model_type: str | None = flag(
        choices=FAMILIES,
        help="ttt (default, TTT-Linear/MLP), transformer (their Transformer++ baseline), e2e (TTT-E2E), e2e_fa "
             "(TTT-E2E's full-attention baseline), mamba2 (Mamba-2) or gated_deltanet (Gated DeltaNet); the "
             "baselines at a --model_size count the TTT-Linear model's parameters")
    model_size: str | None = flag(
        choices=(*E2E_MODEL_SIZES, *PRESETS), aliases=["--model-preset"],  # E2E's sizes include the others' (and 3b)
        help="a paper size (3b: e2e only) or a preset (nano ~1M, small ~50M, medium ~125M, large ~350M, xlarge "
             "~700M parameters); default: tiny, or on resume the checkpoint's")
    hidden_size: int | None = flag(aliases=["--d-model"], help="override the size's hidden size")
    num_hidden_layers: int | None = flag(aliases=["--num-layers"], help="override the size's number of layers")
    num_attention_heads: int | None = flag(aliases=["--num-heads"], help="override the size's number of heads")
    intermediate_size: int | None = flag(aliases=["--d-ff"], help="override the size's MLP width")
    target_params: ParameterCount | None = flag(
        help="choose the shape whose parameter count (with the real vocabulary) is closest to this, e.g. 10M or "
             "1.3B, and print it")
    prefer_depth: bool = flag(False, switch="store_true", help="--target_params: the deepest of the close shapes")
    init_from: str | None = flag(
        help="start from this saved model's weights with a fresh optimizer and schedule: a converted official "
             "checkpoint (convert_jax_checkpoint.py), a final_model or checkpoint folder, or a Hub id; the "
             "architecture (and, unless --tokenizer_name, the tokenizer) are the model's")
    ttt_layer_type: str | None = flag(choices=LAYER_TYPES)
    ttt_base_lr: float | None = flag(help="eta_base of the inner learning rate (paper: 1 linear, 0.1 mlp)")
    mini_batch_size: int | None = flag(
        help="TTT mini-batch size K (default 16); e2e: the inner loop's chunk b (official 1024)")
    use_gate: bool | None = flag(switch="negatable", help="GELU output gate (Mamba backbone)")
    share_qk: bool | None = flag(switch="negatable", help="shared Q/K projection + convs")
    pre_conv: bool | None = flag(switch="negatable", help="causal conv before each TTT layer")
    conv_kernel: int | None = flag()
    scan_checkpoint_group_size: int | None = flag(
        help="use the straightforward inner-loop scan with activation checkpointing over groups of this many "
             "mini-batches instead of the default recomputing scan (0: off)")
    sliding_window: int | None = flag(
        help="transformer and e2e: attend to this many previous tokens (e2e official 8192)")
    rope_theta: float | None = flag(
        help="RoPE base (defaults: 10000; e2e 500000); with --init_from, length extension raises it for full "
             "attention (official fa extension: 2e6 at 32K, 1e7 at 128K); not changeable for ttt")

    def check(self):
        super().check()
        self.positive("ttt_base_lr", "mini_batch_size", "conv_kernel", "sliding_window", "rope_theta",
                      "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        self.non_negative("scan_checkpoint_group_size")
        if self.init_from and self.model_size is not None:
            raise ConfigError(f"--model_size does not apply with --init_from: the size is that of {self.init_from}")
        if self.target_params is not None and (self.model_size or self.init_from):
            other = "--model_size" if self.model_size else "--init_from"
            raise ConfigError(f"--target_params chooses a new model's shape; it does not go with {other}")
        if self.prefer_depth and self.target_params is None:
            raise ConfigError("--prefer_depth applies to --target_params")


@dataclass
class E2EArguments(Group):
    _argument_group_name = "TTT-E2E (--model_type e2e; unset flags take the official recipe's values)"
    suffix_len: int | None = flag(help="the last blocks whose prime MLP learns at test time (L/4)")
    train_mode: str | None = flag(
        choices=("meta", "pretrain"),
        help="meta (default): the inner loop runs and training meta-learns through it; pretrain: TTT off (the prime "
             "MLPs are ordinary layers)")
    inner_lr: float | None = flag(help="the inner SGD step size (1.0)")
    inner_clip: float | None = flag(help="the inner gradient's global-norm clip (1.0)")
    ilr_init: float | None = flag(
        help="the inner step size's warm-up starts at this fraction (pretraining recipes 0.1; 1: none)")
    ilr_warmup_steps: int | None = flag(help="outer steps of that warm-up (recipes: the lr warm-up)")
    first_order: bool | None = flag(
        switch="negatable",
        help="drop the second-order terms of the meta-gradient: faster, NOT the official algorithm")
    recompute_prefix: bool | None = flag(
        switch="negatable",
        help="recompute the prefix blocks in the backward instead of keeping their activations (default on in meta "
             "mode, as the official code; --no-recompute_prefix: faster by one prefix forward, more memory)")


@dataclass
class LoraArguments(Group):
    _argument_group_name = "LoRA fine-tuning (peft; with --init_from)"
    use_lora: bool = flag(
        False, switch="store_true",
        help="train low-rank adapters on the --init_from model instead of its weights; checkpoints hold the adapters "
             "only")
    lora_rank: int | None = flag(help="the adapters' rank (default 8)")
    lora_alpha: float | None = flag(help="their scale numerator (default 16: scale alpha / rank)")
    lora_dropout: float | None = flag(help="dropout on their input (default 0)")
    lora_target_modules: str | None = flag(
        help="comma-separated module names (default: per model type, the attention / TTT projections and the MLP)")
    merge_lora: bool = flag(
        False, switch="store_true",
        help="write final_model/ as a merged full model (else the adapters, which need peft to load)")

    def check(self):
        super().check()
        self.positive("lora_rank")
        self.only_with("use_lora", ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora"),
                       ": add --use_lora (with --init_from), or drop it")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class HubArguments(Group):
    _argument_group_name = "publishing to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)"
    push_to_hub: bool = flag(
        False, switch="store_true",
        help="upload final_model/ (with its model card and code) to a Hub model repository at the end; the token "
             "and the Hub are checked, and the repository created, before training")
    hub_model_id: str | None = flag(help="the repository (default: <your user>/<output_dir's name>)")
    hub_private_repo: bool = flag(False, switch="store_true", help="create the repository private")
    hub_strategy: str = flag(
        "end", choices=("end", "checkpoint"),
        help="end: the final model; checkpoint: also each saved checkpoint, as last-checkpoint/")

    def check(self):
        super().check()
        self.only_with("push_to_hub", ("hub_model_id", "hub_private_repo", "hub_strategy"),
                       ": add --push_to_hub, or drop it")


@dataclass
class DataArguments(Group):
    _argument_group_name = "data"
    dataset_name: str = flag(
        "builtin:synthetic", aliases=["--dataset-id"],
        help="Hub dataset id, a local file or folder (.txt/.json/.jsonl/.parquet/.csv, or a save_to_disk folder), or "
             "builtin:synthetic (a generated corpus, offline)")
    dataset_config: str | None = flag(help="Hub dataset configuration (e.g. 'en' for allenai/c4)")
    text_column: str | None = flag(help="default: the first of text, content, article, body")
    tokenizer_name: str | None = flag(
        aliases=["--tokenizer-path"],
        help="Hub id or local folder; builtin:bytes is a byte-level tokenizer (default for new runs; resumed runs "
             "use the checkpoint's tokenizer)")
    train_tokenizer: bool = flag(
        False, switch="store_true", aliases=["--retrain-tokenizer"],
        help="train a byte-level BPE on the training data (saved to <output_dir>/tokenizer and with every "
             "checkpoint; a resumed run keeps it)")
    vocab_size: int | None = flag(help=f"--train_tokenizer: its vocabulary size (default {DEFAULT_VOCAB_SIZE})")
    auto_vocab_size: bool = flag(
        False, switch="store_true",
        help="--train_tokenizer: one token per word occurring twice in the sample, plus the 256 bytes and 3 special "
             "tokens, rounded up to 64, within --min_vocab_size and --max_vocab_size")
    min_vocab_size: int = flag(1024)
    max_vocab_size: int = flag(32000)
    tokenizer_train_docs: int = flag(
        10000, aliases=["--tokenizer-train-examples"],
        help="--train_tokenizer: the first documents of the training data it learns from")
    streaming: bool | None = flag(
        switch="negatable", aliases=["--use-streaming"],
        help="stream the dataset (default: on for Hub datasets, off for local files)")
    seq_length: int = flag(512, aliases=["--max_seq_length", "--seq-len"])
    validation_split: float = flag(0.05,
                                   help="fraction of documents held out when the dataset has no validation split")
    streaming_eval_docs: int = flag(
        1000, help="documents held out from a streamed dataset that has no validation split")
    max_eval_samples: int = flag(64, help="validation blocks of seq_length tokens")
    max_train_examples: int | None = flag(help="train on the first N training documents only")
    max_eval_examples: int | None = flag(aliases=["--max-val-examples"],
                                         help="validate on the first N validation documents only")

    def check(self):
        super().check()
        self.positive("seq_length", "max_eval_samples", "max_train_examples", "max_eval_examples")
        self.non_negative("streaming_eval_docs")
        if not 0 < self.validation_split < 1:
            raise ConfigError(f"--validation_split must be in (0, 1), got {self.validation_split}")
        self.only_with("train_tokenizer", ("vocab_size", "auto_vocab_size"))
        if not self.train_tokenizer:
            return
        if self.tokenizer_name:
            raise ConfigError("--train_tokenizer makes a new run's tokenizer; it does not go with --tokenizer_name (a "
                              "loaded model keeps its vocabulary)")
        if self.vocab_size is not None and self.auto_vocab_size:
            raise ConfigError("give --vocab_size or --auto_vocab_size, not both")
        if self.vocab_size is None and not self.auto_vocab_size:
            self.vocab_size = DEFAULT_VOCAB_SIZE
        for name in ("vocab_size", "max_vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) > MAX_VOCAB_SIZE:
                raise ConfigError(f"--{name} {getattr(self, name)} exceeds {MAX_VOCAB_SIZE}: a byte-level BPE's "
                                  f"training memory grows with its vocabulary, and the largest vocabularies in use "
                                  f"are about 256K")
        if not 0 < self.min_vocab_size <= self.max_vocab_size:
            raise ConfigError(f"--min_vocab_size ({self.min_vocab_size}) must be positive and at most "
                              f"--max_vocab_size ({self.max_vocab_size})")
        self.positive("vocab_size", "tokenizer_train_docs")


@dataclass
class OptimizerArguments(Group):
    _argument_group_name = "optimisation"
    per_device_train_batch_size: int = flag(4, aliases=["--batch-size"])
    per_device_eval_batch_size: int = flag(8)
    gradient_accumulation_steps: int = flag(1)
    learning_rate: float = flag(3e-3)
    lr_end: float = flag(1e-5)
    lr_warmup_steps: int | None = flag(aliases=["--warmup_steps", "--warmup-steps"],
                                       help="default: --warmup_ratio of --max_train_steps")
    warmup_ratio: float | None = flag()
    lr_scheduler_type: str = flag("cosine", choices=("cosine", "linear", "constant"))
    weight_decay: float = flag(0.1)
    adam_beta1: float = flag(0.9, help="AdamW's beta1")
    adam_beta2: float = flag(0.95, help="AdamW's beta2 (the papers' recipes: 0.95)")
    adam_epsilon: float = flag(1e-8, help="AdamW's epsilon")
    max_grad_norm: float = flag(1.0, aliases=["--grad-clip"], help="0 disables clipping")
    max_train_steps: int | None = flag(aliases=["--max_steps"], help=f"optimizer steps (default {DEFAULT_STEPS})")
    num_train_epochs: float | None = flag(
        aliases=["--epochs"],
        help="train for this many passes over the training data instead: the step count is computed from the data's "
             "tokens (not for streamed data)")
    mixed_precision: str | None = flag(
        choices=PRECISIONS,
        help="default: the `accelerate launch` config's mixed_precision, else no (--bf16: bf16)")
    seed: int = flag(42)
    on_nonfinite: str = flag(
        "stop", choices=("stop", "skip"),
        help="a non-finite loss or gradient norm: stop the run (default; nothing from the step is saved), or skip "
             "the step's update (the run stops after 10 such steps in a row)")

    def check(self):
        super().check()
        if self.num_train_epochs is not None and self.max_train_steps is not None:
            raise ConfigError("give --max_train_steps or --num_train_epochs, not both")
        if self.num_train_epochs is None and self.max_train_steps is None:
            self.max_train_steps = DEFAULT_STEPS
        self.positive("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                      "max_train_steps", "num_train_epochs")
        self.non_negative("weight_decay", "max_grad_norm", "lr_end", "lr_warmup_steps", "seed")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        self.positive("adam_epsilon")
        if self.lr_warmup_steps is not None and self.max_train_steps is not None \
                and self.lr_warmup_steps > self.max_train_steps:
            raise ConfigError(f"--lr_warmup_steps ({self.lr_warmup_steps}) exceeds --max_train_steps "
                              f"({self.max_train_steps})")
        if self.lr_end > self.learning_rate:
            raise ConfigError(f"--lr_end ({self.lr_end}) must not exceed --learning_rate ({self.learning_rate})")
        if self.lr_warmup_steps is not None and self.warmup_ratio is not None:
            raise ConfigError("give --lr_warmup_steps or --warmup_ratio, not both")
        if self.warmup_ratio is None and self.lr_warmup_steps is None:
            self.warmup_ratio = DEFAULT_WARMUP_RATIO
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision is None:  # `accelerate launch` passes its config's setting in the environment
            self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            if self.mixed_precision not in PRECISIONS:
                raise ConfigError(f"ACCELERATE_MIXED_PRECISION={self.mixed_precision} (from the launch config) is not "
                                  f"one of {', '.join(PRECISIONS)}")
        if self.mixed_precision == "fp16" and not cuda_available():
            raise ConfigError("--mixed_precision fp16 needs a CUDA GPU; none is available here")


@dataclass
class PerformanceArguments(Group):
    _argument_group_name = "performance (train_gpu_optimized.py turns these on)"
    torch_compile: bool = flag(False, switch="negatable", help="compile the model with torch.compile (inductor)")
    torch_compile_mode: str = flag(
        "default", choices=COMPILE_MODES,
        help="torch.compile's mode: 'reduce-overhead' replays each step as CUDA graphs, which pays off when kernel "
             "launches dominate (small per-device batches); needs --torch_compile")
    require_fused_kernels: bool = flag(
        False, switch="store_true",
        help="refuse to start where the model's sequence mixing would run its PyTorch fallback instead of fused GPU "
             "kernels (the start-up line, metrics.jsonl and training_summary.json say which runs)")
    tf32: bool = flag(False, switch="negatable",
                      help="TF32 tensor-core matmuls for float32 work on Ampere and newer GPUs")
    gradient_checkpointing: bool = flag(
        False, switch="negatable", help="recompute each block in the backward pass (activation checkpointing)")
    data_prefetch: int = flag(0, help="batches prepared ahead in a background thread (0: prepared in the loop)")
    pin_memory: bool = flag(
        False, switch="negatable", help="prepare batches in pinned memory for asynchronous copies to the GPU")
    peak_tflops: float | None = flag(
        help="the accelerator's peak TFLOP/s for MFU (default: looked up from the GPU name)")

    def check(self):
        super().check()
        if self.pin_memory and not cuda_available():
            raise ConfigError("--pin_memory needs a CUDA GPU; none is available here")
        self.non_negative("data_prefetch")
        if self.pin_memory and not self.data_prefetch:
            raise ConfigError("--pin_memory pins batches prepared ahead: give --data_prefetch > 0 too")
        if self.torch_compile_mode != "default" and not self.torch_compile:
            raise ConfigError(f"--torch_compile_mode {self.torch_compile_mode} needs --torch_compile")
        self.positive("peak_tflops")


@dataclass
class CheckpointArguments(Group):
    _argument_group_name = "checkpoints"
    output_dir: str = flag(
        "outputs/ttt-tiny", help="a folder, or s3:// gs:// az:// (staged locally, each checkpoint uploaded whole)")
    save_checkpoint_freq: int = flag(100, aliases=["--save_steps", "--save-every"],
                                     help="steps between checkpoint-<step>/ (0: off)")
    save_total_limit: int = flag(3, help="checkpoint-<step>/ folders kept")
    save_milestone_freq: int = flag(0, help="steps between milestone-<step>/ (0: off)")
    resume_from_checkpoint: str | None = flag(aliases=["--resume-from"],
                                              help="a checkpoint folder, or 'latest' in --output_dir")
    overwrite_output_dir: bool = flag(
        False, switch="store_true",
        help="a fresh run into a folder that holds files the trainer did not write (left untouched) or the "
             "metrics/arguments of a run that saved no checkpoint (replaced); never replaces checkpoints or models")
    save_best: bool = flag(
        False, switch="negatable",
        help="keep best_model/: the model at the evaluation with the lowest validation loss so far (never pruned; "
             "training_summary.json names it)")

    def check(self):
        super().check()
        self.positive("save_total_limit")
        self.non_negative("save_checkpoint_freq", "save_milestone_freq")


@dataclass
class LoggingArguments(Group):
    _argument_group_name = "logging and evaluation"
    logging_steps: int = flag(10, aliases=["--log-every"])
    eval_steps: int = flag(100, aliases=["--eval-every"], help="0: evaluate only at the end")
    report_to: str = flag("none", choices=("none", "tensorboard", "wandb", "all"))
    wandb_project: str = flag("ttt")
    wandb_run_name: str | None = flag()

    def check(self):
        super().check()
        self.positive("logging_steps")
        self.non_negative("eval_steps")


# The groups in --help order, and their names on RunConfig.
GROUPS = {"model": ModelArguments, "e2e": E2EArguments, "lora": LoraArguments, "hub": HubArguments,
          "data": DataArguments, "optim": OptimizerArguments, "perf": PerformanceArguments,
          "checkpoints": CheckpointArguments, "logging": LoggingArguments}


@dataclass
class RunConfig:
    """A run's settings, one group per component; `command` is the command line that gave them (recorded in
    training_args.json and the model cards)."""
    model: ModelArguments
    e2e: E2EArguments
    lora: LoraArguments
    hub: HubArguments
    data: DataArguments
    optim: OptimizerArguments
    perf: PerformanceArguments
    checkpoints: CheckpointArguments
    logging: LoggingArguments
    config: str | None = None  # the --config file they came from, if any
    command: str | None = None

    def groups(self) -> list:
        return [getattr(self, name) for name in GROUPS]

    def flat(self) -> dict:
        """Every setting by its flag's name: what training_args.json and the trackers record (and what a resume
        reads back from a checkpoint)."""
        values = {"config": self.config}
        for group in self.groups():
            values.update(group.values())
        return {**values, "command": self.command}

    def check(self):
        """Each group's own checks, then those across groups; settles the defaults that depend on other flags."""
        for group in self.groups():
            group.check()
        if self.lora.use_lora and not (self.model.init_from or self.checkpoints.resume_from_checkpoint):
            raise ConfigError("--use_lora adapts a saved model: give --init_from (or resume a LoRA run)")
        if self.data.train_tokenizer and self.model.init_from:
            raise ConfigError("--train_tokenizer makes a new run's tokenizer; it does not go with --init_from (a "
                              "loaded model keeps its vocabulary)")
        # on resume, --target_params and --train_tokenizer (with its options) may be repeated from the command that
        # started the run: they must then agree with the checkpoint (checked when it is read)
        if self.model.model_size is None and not self.checkpoints.resume_from_checkpoint and not self.model.init_from \
                and self.model.target_params is None:
            self.model.model_size = "tiny"


@dataclass
class RunState:
    """What the run settles while it runs, from the settings and what it finds: kept apart from RunConfig, which
    stays what the user asked for. `resume` and `init_from`: local copies of what --resume_from_checkpoint and
    --init_from name (a bucket's staged on this machine); `checkpoint`: the checkpoint folder the run resumes from
    (once the output directory is claimed); `max_train_steps`: the run's step count (--num_train_epochs: the
    data's); `tokenizer_name` and `model_size`: the run's (a resume's come from its checkpoint)."""
    resume: str | None = None
    init_from: str | None = None
    checkpoint: Path | None = None
    max_train_steps: int | None = None
    tokenizer_name: str | None = None
    model_size: str | None = None

    def recorded(self) -> dict:
        """The settled values training_args.json records over the flags' (a resume compares them)."""
        return {"max_train_steps": self.max_train_steps, "tokenizer_name": self.tokenizer_name,
                "model_size": self.model_size}


def cuda_available() -> bool:
    import torch  # here, not at the top: --help stays fast

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------------------
# The command line: HfArgumentParser over the groups, with one-line errors, the guides' spellings, a YAML/JSON file


CLOUD_SCHEMES = {"s3": "s3", "aws": "s3", "gcs": "gs", "gcp": "gs", "azure": "az"}
PAPERS_ARCHITECTURES = "the architectures are the papers' (RMSNorm, SwiGLU, RoPE): choose the model with --model_type"
AZURE_ENVIRONMENT = ("adlfs reads AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_SAS_TOKEN from the environment; give "
                     "--output_dir az://CONTAINER/PREFIX")
# The guides' spellings of things this toolkit does differently: refused with what to use instead (an alias would
# silently mean something else).
OTHER_WAYS = {
    "--split": "the trainer trains on the dataset's train split (a local file: all of it but the held-out "
               "documents); choose data with --dataset_name / --dataset_config (evaluate.py takes --split)",
    "--val-split": "validation is the dataset's validation split when it has one, else a held-out fraction of the "
                   "documents: --validation_split 0.05",
    "--dropout-rate": "these models train without dropout, as the papers' recipes do",
    "--activation": "the activation belongs to the architecture (SwiGLU in the Transformer++ and TTT-E2E, GELU in "
                    "TTT-MLP): choose the model with --model_type and --ttt_layer_type",
    "--no-rmsnorm": PAPERS_ARCHITECTURES, "--no-swiglu": PAPERS_ARCHITECTURES, "--no-rope": PAPERS_ARCHITECTURES,
    "--no-flash-attention": "attention runs through PyTorch's scaled_dot_product_attention, which chooses its fused "
                            "kernel itself",
    "--stride": "blocks are cut contiguously, --seq_length tokens each, without overlap",
    "--shuffle-buffer-size": "a streamed dataset is shuffled with a fixed, seeded buffer of 10,000 documents (so a "
                             "resume continues it exactly); --seed changes the order",
    "--azure-account-name": AZURE_ENVIRONMENT, "--azure-sas-token": AZURE_ENVIRONMENT,
    "--config_file": "it belongs to accelerate launch, before the script (accelerate launch --config_file F "
                     "train_gpu_optimized.py ...); this trainer's YAML file of flag values is --config",
}
CLOUD_FLAGS = ("--cloud-provider", "--cloud-bucket", "--cloud-prefix", "--cloud-region")


def other_way(argv: list) -> str | None:
    """The one-line refusal of the guides' cloud flags (all given, as one URL) or of the first OTHER_WAYS spelling
    in argv, with what to use instead."""
    given = {}
    for index, token in enumerate(argv):
        name, _, value = token.partition("=")
        if name in CLOUD_FLAGS:
            given[name] = value or (argv[index + 1] if index + 1 < len(argv) else "")
    if given:  # provider, bucket and prefix are one URL here
        scheme = CLOUD_SCHEMES.get(given.get("--cloud-provider", "s3").lower(), "s3")
        url = f"{scheme}://{given.get('--cloud-bucket') or 'BUCKET'}/{given.get('--cloud-prefix') or 'checkpoints'}"
        return (f"{', '.join(given)}: a cloud output directory is one URL here: --output_dir {url} (s3://, gs:// or "
                f"az://; the region and credentials come from the provider's environment)")
    for token in argv:
        name = token.partition("=")[0]
        if name in OTHER_WAYS:
            return f"{name} is not a flag of this trainer: {OTHER_WAYS[name]}"
    return None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A flag's line shows its name and its named aliases, not the automatic dashed spellings."""

    def _format_action_invocation(self, action):
        shown = getattr(action, "shown_option_strings", None)
        if shown is None:
            return super()._format_action_invocation(action)
        full = action.option_strings
        try:
            action.option_strings = shown
            return super()._format_action_invocation(action)
        finally:
            action.option_strings = full


class Parser(HfArgumentParser):
    """transformers' HfArgumentParser over the settings groups. Its own way with booleans (`--x true`, `--no_x`) is
    replaced by this toolkit's: a `store_true` switch, or a `negatable` one (--x / --no-x, as argparse's
    BooleanOptionalAction). An error is one line (argparse would print the whole usage first: about 70 lines above
    the one that matters), pointing to --help; an unknown flag gets a "did you mean" suggestion."""

    def __init__(self, description=None):
        super().__init__(list(GROUPS.values()), description=description, formatter_class=HelpFormatter)
        # the switch that turns bf16 on under two names other trainers use (not shown: --mixed_precision is)
        self.add_argument("--bf16", "--use-mixed-precision", dest="mixed_precision", action="store_const",
                          const="bf16", help=argparse.SUPPRESS)
        self.add_argument("--config", help="a YAML or JSON file of settings (keys are flag names without --; the "
                                           "command line wins)")
        for action in self._actions:
            shown = getattr(action, "shown_option_strings", None)
            if shown is not None and isinstance(action, argparse.BooleanOptionalAction):
                action.format_usage = lambda shown=shown: " | ".join(shown)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        """A field as a flag, with its dashed spellings and aliases as further option strings of the same action
        (shown in --help: the name and the aliases)."""
        metadata = dict(field.metadata)
        switch = metadata.pop("switch", None)
        aliases = metadata.pop("aliases", [])
        if switch is None:
            plain = copy.copy(field)  # the field as HfArgumentParser knows it (no aliases: added below)
            plain.metadata = types.MappingProxyType(metadata)
            HfArgumentParser._parse_dataclass_field(parser, plain)
            action = parser._actions[-1]
        else:
            kind = argparse.BooleanOptionalAction if switch == "negatable" else "store_true"
            action = parser.add_argument(f"--{field.name}", action=kind, default=field.default, dest=field.name,
                                         **metadata)
        automatic = f"--{field.name}".replace("_", "-") if "_" in field.name else None  # HfArgumentParser's
        shown = [s for s in action.option_strings if s != automatic] + list(aliases)
        for alias in [*action.option_strings, *aliases]:  # every spelling also dashed: --max-train-steps
            for spelling in (alias, alias[:2] + alias[2:].replace("_", "-")):
                if spelling not in parser._option_string_actions:
                    action.option_strings.append(spelling)
                    parser._option_string_actions[spelling] = action
        action.shown_option_strings = shown

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = [name for action in self._actions for name in action.option_strings]
            for argument in message.split(":", 1)[1].split():
                if argument.startswith("--"):
                    close = difflib.get_close_matches(argument.split("=")[0], known, n=1, cutoff=0.6)
                    if close:
                        message += f" (did you mean {close[0]}?)"
                        break
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

    def fields(self) -> dict:
        """Every setting's field by name."""
        return {f.name: f for dtype in self.dataclass_types for f in dataclasses.fields(dtype)}

    def run_config(self, argv: list) -> RunConfig:
        """argv as a checked RunConfig (argparse's own checks: types, choices, unknown flags; then the groups')."""
        namespace = self.parse_args(argv)
        groups = {name: dtype(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dtype)})
                  for name, dtype in GROUPS.items()}
        run = RunConfig(**groups, config=namespace.config)
        try:
            run.check()
        except ConfigError as error:
            self.error(str(error))
        return run


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags, no code), refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first, first_line = seen[key]
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice, {first!r} (line {first_line}) and "
                    f"{value_node.value!r} (line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = (value_node.value if isinstance(value_node, yaml.ScalarNode) else "...",
                         key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def base_type(field) -> type:
    """int, float, str or bool: what a YAML value of this field must be."""
    kinds = [t for t in getattr(field.type, "__args__", (field.type,)) if t is not type(None)]
    return kinds[0]


def file_argv(values: dict, parser: Parser, path: str) -> list:
    """The mapping of a --config file as command-line arguments, each value checked against its field's type, so
    that it is parsed exactly as if it had been typed (and typed flags after it win)."""
    fields = parser.fields()
    unknown = sorted(set(values) - set(fields) - {"config"})
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown} (keys are flag names)")
    argv = []
    for key, value in values.items():
        if key not in fields:
            continue
        field_ = fields[key]
        kind, switch = base_type(field_), field_.metadata.get("switch")
        if switch:
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, got {value!r}")
            if switch == "negatable":
                argv.append(f"--{key}" if value else f"--no-{key}")
            elif value:
                argv.append(f"--{key}")
            continue
        if kind is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string
            with contextlib.suppress(ValueError):  # not a number: the type check below names the key and value
                value = float(value)
        expected = {int: (int,), float: (int, float), ParameterCount: (int, str)}.get(kind, (str,))
        if value is None or isinstance(value, bool) or not isinstance(value, expected):
            what = {int: "an integer", float: "a number", ParameterCount: "a parameter count"}.get(kind, "a string")
            parser.error(f"--config {path}: {key} must be {what}, got {value!r}")
        argv += [f"--{key}", str(value)]
    return argv


def read_config_file(path: str, parser: Parser) -> dict:
    """A --config file's mapping: YAML (JSON is YAML too), read safely (no tags, no code), a key given twice
    refused."""
    try:
        with open(path, encoding="utf-8") as f:
            values = (json.load(f) if Path(path).suffix.lower() == ".json"
                      else yaml.load(f, Loader=UniqueKeyLoader))  # a SafeLoader: no tags, no code
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        parser.error(f"cannot read --config {path}: {' '.join(str(error).split())}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    return values


def command_line_conflicts(argv: list, parser) -> str | None:
    """Two spellings of one setting with different values (--max_steps 10 --max_train_steps 20, --bf16
    --mixed_precision no): argparse would keep the last silently; this names both."""
    given = {}
    tokens = list(argv)
    for i, token in enumerate(tokens):
        if not token.startswith("--") or token == "--":
            continue
        name, has_value, value = token.partition("=")
        action = parser._option_string_actions.get(name)
        if action is None or action.dest in ("help", "config"):
            continue
        if has_value:
            setting = value
        elif action.nargs == 0:  # a switch: its constant (--bf16: bf16; --no-x: False)
            setting = (not name.startswith("--no-")) if isinstance(action, argparse.BooleanOptionalAction) \
                else action.const
        else:
            setting = tokens[i + 1] if i + 1 < len(tokens) else None
        if action.type is not None and isinstance(setting, str):
            try:
                setting = action.type(setting)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                pass  # argparse reports it
        # the same spelling again is an override (launchers append the user's flags to their own): argparse's
        # last-wins; two spellings of one setting with different values is a mistake
        if action.dest in given and given[action.dest][0] != name and given[action.dest][1] != setting:
            before, value_before = given[action.dest]
            return (f"{before} {value_before} and {name} {setting} set the same setting ({action.dest}) to different "
                    f"values; give it once")
        given[action.dest] = (name, setting)
    return None


def parse(argv: list, parser: Parser) -> RunConfig:
    """The run's settings from argv (and the --config file it names), checked; every error is one line, exit 2."""
    refused = other_way(argv)
    if refused:
        parser.error(refused)
    config = parser.parse_args(argv).config  # argparse's own checks of the command line; the settings are checked
    conflict = command_line_conflicts(argv, parser)  # once, with the file's values (which may satisfy them)
    if conflict:
        parser.error(conflict)
    if config:
        argv = [*file_argv(read_config_file(config, parser), parser, config), *argv]
    return parser.run_config(argv)
