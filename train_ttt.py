"""Train a TTT language model (TTT-Linear / TTT-MLP) on a Hugging Face dataset or local text files.

    python train_ttt.py                                   # tiny model, built-in corpus, offline, about a minute
    python train_ttt.py --dataset_name ../shared/data/tinyshakespeare.txt \\
        --tokenizer_name ../shared/data/llama2_tokenizer --model_size tiny --max_train_steps 300
    accelerate launch train_ttt.py --config run.yaml --resume_from_checkpoint latest

Every flag can also be a key of the YAML file given to --config; the command line wins. Every flag also takes its
dashed spelling (--max-train-steps), and a few take the names other trainers use (listed beside the flag).
"""

import argparse
import contextlib
import difflib
import math
import os
import sys
from pathlib import Path

import yaml

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's modes
# The model's tables, named here without importing ttt.py (torch and transformers take seconds: --help must not);
# tests/test_train.py checks that they name exactly ttt.TTT_STANDARD_CONFIGS, ttt_e2e.E2E_STANDARD_CONFIGS,
# ttt.TTT_LAYER_TYPES and the families of ttt_train/families.py.
FAMILIES = ("ttt", "transformer", "e2e", "e2e_fa", "mamba2", "gated_deltanet")
MODEL_SIZES = ("tiny", "125m", "350m", "760m", "1b")
E2E_MODEL_SIZES = ("tiny", "125m", "350m", "760m", "1b", "3b")
PRESETS = ("nano", "small", "medium", "large", "xlarge")  # ttt_train.models.PRESETS
LAYER_TYPES = ("linear", "mlp")
PRECISIONS = ("no", "fp16", "bf16")  # Accelerate's mixed_precision values
# The largest --vocab_size / --max_vocab_size: the BPE trainer's memory grows with the vocabulary (10^9 asks the
# tokenizers library for ~70 GB and aborts the process), and the largest vocabularies in use are about 256K.
MAX_VOCAB_SIZE = 2**20


# The spellings users bring from other trainers (all-in-one CLIs, the Hugging Face Trainer), as aliases of the
# flags: one option each in --help. Every flag also takes its dashed spelling (added by add_aliases).
FLAG_ALIASES = {  # other trainers' spellings with the same meaning (HF Trainer, the guides in ../shared/seeds)
    "model_size": ["--model-preset"],
    "max_train_steps": ["--max_steps"],
    "lr_warmup_steps": ["--warmup_steps", "--warmup-steps"],
    "save_checkpoint_freq": ["--save_steps", "--save-every"],
    "resume_from_checkpoint": ["--resume-from"],
    "logging_steps": ["--log-every"],
    "eval_steps": ["--eval-every"],
    "per_device_train_batch_size": ["--batch-size"],
    "seq_length": ["--seq-len"],
    "num_train_epochs": ["--epochs"],
    "dataset_name": ["--dataset-id"],
    "hidden_size": ["--d-model"],
    "num_hidden_layers": ["--num-layers"],
    "num_attention_heads": ["--num-heads"],
    "intermediate_size": ["--d-ff"],
    "tokenizer_name": ["--tokenizer-path"],
    "train_tokenizer": ["--retrain-tokenizer"],
    "tokenizer_train_docs": ["--tokenizer-train-examples"],
    "max_eval_examples": ["--max-val-examples"],
    "max_grad_norm": ["--grad-clip"],
    "streaming": ["--use-streaming"],
}
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


def parameter_amount(text: str) -> int:
    """A parameter count: 10000000, 1e7, 10M, 1.3B, 500K."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a parameter count like 10M or 1.3B, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive parameter count, got {text!r}")
    return int(value)


class Parser(argparse.ArgumentParser):
    """An error is one line (argparse would print the whole usage first: about 70 lines above the one that
    matters), pointing to --help; an unknown flag gets a "did you mean" suggestion among the known spellings."""

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


def add_aliases(parser):
    """Each flag's dashed spelling and FLAG_ALIASES, as further option strings of the same action."""
    for action in list(parser._actions):
        if not action.option_strings or action.dest == "help":
            continue
        named = FLAG_ALIASES.get(action.dest, [])
        dashed = [name.replace("_", "-") for name in action.option_strings if "_" in name]
        action.shown_option_strings = [*action.option_strings, *named]
        if isinstance(action, argparse.BooleanOptionalAction):  # its usage entry lists every spelling otherwise
            action.format_usage = lambda shown=action.shown_option_strings: " | ".join(shown)
        for alias in [*named, *dashed]:
            if alias not in parser._option_string_actions:
                action.option_strings.append(alias)
                parser._option_string_actions[alias] = action


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="YAML file of flag values (keys are flag names without --)")

    m = p.add_argument_group("model (unset flags take the official defaults; on resume they come from the checkpoint)")
    m.add_argument("--model_type", choices=FAMILIES,
                   help="ttt (default, TTT-Linear/MLP), transformer (their Transformer++ baseline), e2e (TTT-E2E), "
                        "e2e_fa (TTT-E2E's full-attention baseline), mamba2 (Mamba-2) or gated_deltanet (Gated "
                        "DeltaNet); the baselines at a --model_size count the TTT-Linear model's parameters")
    m.add_argument("--model_size", choices=[*E2E_MODEL_SIZES, *PRESETS],  # E2E's include the others' (and 3b)
                   help="a paper size (3b: e2e only) or a preset (nano ~1M, small ~50M, medium ~125M, large "
                        "~350M, xlarge ~700M parameters); default: tiny, or on resume the checkpoint's")
    m.add_argument("--hidden_size", type=int, help="override the size's hidden size")
    m.add_argument("--num_hidden_layers", type=int, help="override the size's number of layers")
    m.add_argument("--num_attention_heads", type=int, help="override the size's number of heads")
    m.add_argument("--intermediate_size", type=int, help="override the size's MLP width")
    m.add_argument("--target_params", type=parameter_amount,
                   help="choose the shape whose parameter count (with the real vocabulary) is closest to this, e.g. "
                        "10M or 1.3B, and print it")
    m.add_argument("--prefer_depth", action="store_true", help="--target_params: the deepest of the close shapes")
    m.add_argument("--init_from", help="start from this saved model's weights with a fresh optimizer and schedule: "
                   "a converted official checkpoint (convert_jax_checkpoint.py), a final_model or checkpoint folder, "
                   "or a Hub id; the architecture (and, unless --tokenizer_name, the tokenizer) are the model's")
    m.add_argument("--ttt_layer_type", choices=LAYER_TYPES)
    m.add_argument("--ttt_base_lr", type=float, help="eta_base of the inner learning rate (paper: 1 linear, 0.1 mlp)")
    m.add_argument("--mini_batch_size", type=int,
                   help="TTT mini-batch size K (default 16); e2e: the inner loop's chunk b (official 1024)")
    m.add_argument("--use_gate", action=argparse.BooleanOptionalAction, help="GELU output gate (Mamba backbone)")
    m.add_argument("--share_qk", action=argparse.BooleanOptionalAction, help="shared Q/K projection + convs")
    m.add_argument("--pre_conv", action=argparse.BooleanOptionalAction, help="causal conv before each TTT layer")
    m.add_argument("--conv_kernel", type=int)
    m.add_argument("--scan_checkpoint_group_size", type=int,
                   help="use the straightforward inner-loop scan with activation checkpointing over groups of "
                        "this many mini-batches instead of the default recomputing scan (0: off)")
    m.add_argument("--sliding_window", type=int,
                   help="transformer and e2e: attend to this many previous tokens (e2e official 8192)")
    m.add_argument("--rope_theta", type=float,
                   help="RoPE base (defaults: 10000; e2e 500000); with --init_from, length extension raises it for "
                        "full attention (official fa extension: 2e6 at 32K, 1e7 at 128K); not changeable for ttt")
    e = p.add_argument_group("TTT-E2E (--model_type e2e; unset flags take the official recipe's values)")
    e.add_argument("--suffix_len", type=int, help="the last blocks whose prime MLP learns at test time (L/4)")
    e.add_argument("--train_mode", choices=["meta", "pretrain"],
                   help="meta (default): the inner loop runs and training meta-learns through it; pretrain: TTT off "
                        "(the prime MLPs are ordinary layers)")
    e.add_argument("--inner_lr", type=float, help="the inner SGD step size (1.0)")
    e.add_argument("--inner_clip", type=float, help="the inner gradient's global-norm clip (1.0)")
    e.add_argument("--ilr_init", type=float,
                   help="the inner step size's warm-up starts at this fraction (pretraining recipes 0.1; 1: none)")
    e.add_argument("--ilr_warmup_steps", type=int, help="outer steps of that warm-up (recipes: the lr warm-up)")
    e.add_argument("--first_order", action=argparse.BooleanOptionalAction,
                   help="drop the second-order terms of the meta-gradient: faster, NOT the official algorithm")
    e.add_argument("--recompute_prefix", action=argparse.BooleanOptionalAction,
                   help="recompute the prefix blocks in the backward instead of keeping their activations (default "
                        "on in meta mode, as the official code; --no-recompute_prefix: faster by one prefix forward, "
                        "more memory)")

    lo = p.add_argument_group("LoRA fine-tuning (peft; with --init_from)")
    lo.add_argument("--use_lora", action="store_true",
                    help="train low-rank adapters on the --init_from model instead of its weights; checkpoints hold "
                         "the adapters only")
    lo.add_argument("--lora_rank", type=int, help="the adapters' rank (default 8)")
    lo.add_argument("--lora_alpha", type=float, help="their scale numerator (default 16: scale alpha / rank)")
    lo.add_argument("--lora_dropout", type=float, help="dropout on their input (default 0)")
    lo.add_argument("--lora_target_modules",
                    help="comma-separated module names (default: per model type, the attention / TTT projections "
                         "and the MLP)")
    lo.add_argument("--merge_lora", action="store_true",
                    help="write final_model/ as a merged full model (else the adapters, which need peft to load)")

    h = p.add_argument_group("publishing to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)")
    h.add_argument("--push_to_hub", action="store_true",
                   help="upload final_model/ (with its model card and code) to a Hub model repository at the end; "
                        "the token and the Hub are checked, and the repository created, before training")
    h.add_argument("--hub_model_id", help="the repository (default: <your user>/<output_dir's name>)")
    h.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
    h.add_argument("--hub_strategy", choices=["end", "checkpoint"], default="end",
                   help="end: the final model; checkpoint: also each saved checkpoint, as last-checkpoint/")

    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", default="builtin:synthetic",
                   help="Hub dataset id, a local file or folder (.txt/.json/.jsonl/.parquet/.csv, or a "
                        "save_to_disk folder), or builtin:synthetic (a generated corpus, offline)")
    d.add_argument("--dataset_config", help="Hub dataset configuration (e.g. 'en' for allenai/c4)")
    d.add_argument("--text_column", help="default: the first of text, content, article, body")
    d.add_argument("--tokenizer_name", help="Hub id or local folder; builtin:bytes is a byte-level tokenizer "
                                            "(default for new runs; resumed runs use the checkpoint's tokenizer)")
    d.add_argument("--train_tokenizer", action="store_true",
                   help="train a byte-level BPE on the training data (saved to <output_dir>/tokenizer and with every "
                        "checkpoint; a resumed run keeps it)")
    d.add_argument("--vocab_size", type=int, help="--train_tokenizer: its vocabulary size (default 8192)")
    d.add_argument("--auto_vocab_size", action="store_true",
                   help="--train_tokenizer: one token per word occurring twice in the sample, plus the 256 bytes and "
                        "3 special tokens, rounded up to 64, within --min_vocab_size and --max_vocab_size")
    d.add_argument("--min_vocab_size", type=int, default=1024)
    d.add_argument("--max_vocab_size", type=int, default=32000)
    d.add_argument("--tokenizer_train_docs", type=int, default=10000,
                   help="--train_tokenizer: the first documents of the training data it learns from")
    d.add_argument("--streaming", action=argparse.BooleanOptionalAction,
                   help="stream the dataset (default: on for Hub datasets, off for local files)")
    d.add_argument("--seq_length", "--max_seq_length", dest="seq_length", type=int, default=512)
    d.add_argument("--validation_split", type=float, default=0.05,
                   help="fraction of documents held out when the dataset has no validation split")
    d.add_argument("--streaming_eval_docs", type=int, default=1000,
                   help="documents held out from a streamed dataset that has no validation split")
    d.add_argument("--max_eval_samples", type=int, default=64, help="validation blocks of seq_length tokens")
    d.add_argument("--max_train_examples", type=int, help="train on the first N training documents only")
    d.add_argument("--max_eval_examples", type=int, help="validate on the first N validation documents only")

    t = p.add_argument_group("optimisation")
    t.add_argument("--per_device_train_batch_size", type=int, default=4)
    t.add_argument("--per_device_eval_batch_size", type=int, default=8)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=3e-3)
    t.add_argument("--lr_end", type=float, default=1e-5)
    t.add_argument("--lr_warmup_steps", type=int, help="default: --warmup_ratio of --max_train_steps")
    t.add_argument("--warmup_ratio", type=float)
    t.add_argument("--lr_scheduler_type", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--weight_decay", type=float, default=0.1)
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    t.add_argument("--max_train_steps", type=int, help="optimizer steps (default 200)")
    t.add_argument("--num_train_epochs", type=float,
                   help="train for this many passes over the training data instead: the step count is computed "
                        "from the data's tokens (not for streamed data)")
    t.add_argument("--mixed_precision", choices=PRECISIONS,
                   help="default: the `accelerate launch` config's mixed_precision, else no (--bf16: bf16)")
    t.add_argument("--bf16", "--use-mixed-precision", dest="mixed_precision", action="store_const", const="bf16",
                   help=argparse.SUPPRESS)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--on_nonfinite", default="stop", choices=["stop", "skip"],
                   help="a non-finite loss or gradient norm: stop the run (default; nothing from the step is "
                        "saved), or skip the step's update (the run stops after 10 such steps in a row)")

    g = p.add_argument_group("performance (train_gpu_optimized.py turns these on)")
    g.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the model with torch.compile (inductor)")
    g.add_argument("--torch_compile_mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode: 'reduce-overhead' replays each step as CUDA graphs, which pays off "
                        "when kernel launches dominate (small per-device batches); needs --torch_compile")
    g.add_argument("--require_fused_kernels", action="store_true",
                   help="refuse to start where the model's sequence mixing would run its PyTorch fallback instead of "
                        "fused GPU kernels (the start-up line, metrics.jsonl and training_summary.json say which runs)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="TF32 tensor-core matmuls for float32 work on Ampere and newer GPUs")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each block in the backward pass (activation checkpointing)")
    g.add_argument("--data_prefetch", type=int, default=0,
                   help="batches prepared ahead in a background thread (0: prepared in the loop)")
    g.add_argument("--pin_memory", action=argparse.BooleanOptionalAction, default=False,
                   help="prepare batches in pinned memory for asynchronous copies to the GPU")
    g.add_argument("--peak_tflops", type=float,
                   help="the accelerator's peak TFLOP/s for MFU (default: looked up from the GPU name)")

    o = p.add_argument_group("checkpoints and logging")
    o.add_argument("--output_dir", default="outputs/ttt-tiny",
                   help="a folder, or s3:// gs:// az:// (staged locally, each checkpoint uploaded whole)")
    o.add_argument("--save_checkpoint_freq", type=int, default=100, help="steps between checkpoint-<step>/ (0: off)")
    o.add_argument("--save_total_limit", type=int, default=3, help="checkpoint-<step>/ folders kept")
    o.add_argument("--save_milestone_freq", type=int, default=0, help="steps between milestone-<step>/ (0: off)")
    o.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' in --output_dir")
    o.add_argument("--overwrite_output_dir", action="store_true",
                   help="a fresh run into a folder that holds files the trainer did not write (left untouched) or "
                        "the metrics/arguments of a run that saved no checkpoint (replaced); never replaces "
                        "checkpoints or models")
    o.add_argument("--save_best", action=argparse.BooleanOptionalAction, default=False,
                   help="keep best_model/: the model at the evaluation with the lowest validation loss so far "
                        "(never pruned; training_summary.json names it)")
    o.add_argument("--logging_steps", type=int, default=10)
    o.add_argument("--eval_steps", type=int, default=100, help="0: evaluate only at the end")
    o.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"])
    o.add_argument("--wandb_project", default="ttt")
    o.add_argument("--wandb_run_name")
    add_aliases(p)
    return p


def yaml_argv(values: dict, parser, path: str) -> list:
    """The YAML mapping as command-line arguments, each value checked against its flag's type, so that it is
    parsed exactly as if it had been typed (and typed flags after it win)."""
    actions = {}
    for action in parser._actions:  # a key is a flag's name: the first action of its dest (not an alias like --bf16)
        if action.option_strings and action.dest != "help":
            actions.setdefault(action.dest, action)
    unknown = sorted(set(values) - set(actions) - {"config"})
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown} (keys are flag names)")
    argv = []
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):  # a switch: true turns it on
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, got {value!r}")
            argv += [flag] if value else []
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                parser.error(f"--config {path}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
            continue
        if action.type is float and isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-3 as a string
            with contextlib.suppress(ValueError):  # not a number: the type check below names the key and value
                value = float(value)
        expected = {int: (int,), float: (int, float)}.get(action.type, (str,))
        if value is None or isinstance(value, bool) or not isinstance(value, expected):
            kind = {int: "an integer", float: "a number"}.get(action.type, "a string")
            parser.error(f"--config {path}: {key} must be {kind}, got {value!r}")
        argv += [flag, str(value)]
    return argv


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


def parse_args(argv=None, parser=None) -> argparse.Namespace:
    parser = parser or build_parser()
    given = sys.argv[1:] if argv is None else list(argv)
    refused = other_way(given)
    if refused:
        parser.error(refused)
    args = parser.parse_args(given)
    conflict = command_line_conflicts(given, parser)
    if conflict:
        parser.error(conflict)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                values = yaml.load(f, Loader=UniqueKeyLoader)  # a SafeLoader: no tags, no code
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            parser.error(f"cannot read --config {args.config}: {' '.join(str(error).split())}")
        if not isinstance(values, dict):
            parser.error(f"--config {args.config}: expected a mapping of flag names to values")
        args = parser.parse_args([*yaml_argv(values, parser, args.config),
                                  *(sys.argv[1:] if argv is None else argv)])
    check_args(args, parser)
    return args


def cuda_available() -> bool:
    import torch  # here, not at the top: --help stays fast

    return torch.cuda.is_available()


def check_paths(args):
    """What can be checked without torch, transformers or datasets (seconds to import, a minute on a busy machine):
    local paths that must exist, and the output directory's state against a fresh run or a resume. The trainer
    checks again (and applies) when it holds the directory's lock. Raises UserError (one line, exit 1)."""
    from ttt_train import hub, rundir  # light modules: the standard library only
    from ttt_train.cli import UserError, unwritable_folder

    named = [("dataset", args.dataset_name), ("tokenizer", args.tokenizer_name), ("--init_from model", args.init_from),
             ("--resume_from_checkpoint", None if args.resume_from_checkpoint == "latest" else
              args.resume_from_checkpoint)]
    for what, name in named:
        if name and not name.startswith("builtin:") and "://" not in name and hub.looks_local(name) \
                and not Path(name).expanduser().exists():
            raise UserError(f"{what} path {name} does not exist")
    if "://" in args.output_dir:
        return
    reason = unwritable_folder(args.output_dir)
    if reason:
        raise UserError(f"--output_dir {args.output_dir}: {reason}")
    rundir.RunLock(args.output_dir).check_free()
    if args.resume_from_checkpoint == "latest":
        rundir.resolve_checkpoint("latest", Path(args.output_dir))  # none there: the trainer's own error, now
    rundir.check_run_directory(Path(args.output_dir), fresh=not args.resume_from_checkpoint,
                               overwrite=args.overwrite_output_dir, extra=rundir.tracker_folders(args), apply=False)


def check_args(args, parser):
    if args.num_train_epochs is not None and args.max_train_steps is not None:
        parser.error("give --max_train_steps or --num_train_epochs, not both")
    if args.num_train_epochs is None and args.max_train_steps is None:
        args.max_train_steps = 200
    positive = ["seq_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                "gradient_accumulation_steps", "max_train_steps", "logging_steps", "save_total_limit",
                "max_eval_samples", "num_train_epochs"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    for action in parser._actions:  # every float flag: a finite number (inf and nan parse as floats)
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not math.isfinite(value):
            parser.error(f"--{action.dest} must be a finite number, got {value}")
    for name in ["save_checkpoint_freq", "save_milestone_freq", "eval_steps", "weight_decay", "max_grad_norm",
                 "lr_end", "lr_warmup_steps", "streaming_eval_docs", "seed"]:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ["ttt_base_lr", "mini_batch_size", "conv_kernel", "sliding_window", "rope_theta", "max_train_examples",
                 "max_eval_examples", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "lora_rank"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.scan_checkpoint_group_size is not None and args.scan_checkpoint_group_size < 0:
        parser.error(f"--scan_checkpoint_group_size must be >= 0, got {args.scan_checkpoint_group_size}")
    if args.learning_rate <= 0:
        parser.error(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.lr_warmup_steps is not None and args.max_train_steps is not None \
            and args.lr_warmup_steps > args.max_train_steps:
        parser.error(f"--lr_warmup_steps ({args.lr_warmup_steps}) exceeds --max_train_steps ({args.max_train_steps})")
    if args.init_from and args.model_size is not None:
        parser.error(f"--model_size does not apply with --init_from: the size is that of {args.init_from}")
    # on resume, --target_params and --train_tokenizer (with its options) may be repeated from the command that
    # started the run: they must then agree with the checkpoint (checked when it is read)
    if args.target_params is not None and (args.model_size or args.init_from):
        other = "--model_size" if args.model_size else "--init_from"
        parser.error(f"--target_params chooses a new model's shape; it does not go with {other}")
    hub_flags = [f for f in ("hub_model_id", "hub_private_repo") if getattr(args, f)] + \
        ["hub_strategy"] * (args.hub_strategy != "end")
    if hub_flags and not args.push_to_hub:
        parser.error(f"--{hub_flags[0]} applies to --push_to_hub: add --push_to_hub, or drop it")
    lora_flags = [f for f in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "merge_lora")
                  if getattr(args, f) not in (None, False)]
    if lora_flags and not args.use_lora:
        parser.error(f"--{lora_flags[0]} applies to --use_lora: add --use_lora (with --init_from), or drop it")
    if args.use_lora and not (args.init_from or args.resume_from_checkpoint):
        parser.error("--use_lora adapts a saved model: give --init_from (or resume a LoRA run)")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    tokenizer_flags = [f for f in ("vocab_size", "auto_vocab_size") if getattr(args, f)]
    if tokenizer_flags and not args.train_tokenizer:
        parser.error(f"--{tokenizer_flags[0]} applies to --train_tokenizer")
    if args.train_tokenizer:
        other = next((f for f in ("tokenizer_name", "init_from") if getattr(args, f)), None)
        if other:
            parser.error(f"--train_tokenizer makes a new run's tokenizer; it does not go with --{other} (a loaded "
                         f"model keeps its vocabulary)")
        if args.vocab_size is not None and args.auto_vocab_size:
            parser.error("give --vocab_size or --auto_vocab_size, not both")
        if args.vocab_size is None and not args.auto_vocab_size:
            args.vocab_size = 8192
        for name in ("vocab_size", "max_vocab_size"):
            if getattr(args, name) is not None and getattr(args, name) > MAX_VOCAB_SIZE:
                parser.error(f"--{name} {getattr(args, name)} exceeds {MAX_VOCAB_SIZE}: a byte-level BPE's training "
                             f"memory grows with its vocabulary, and the largest vocabularies in use are about 256K")
        if not 0 < args.min_vocab_size <= args.max_vocab_size:
            parser.error(f"--min_vocab_size ({args.min_vocab_size}) must be positive and at most --max_vocab_size "
                         f"({args.max_vocab_size})")
        if args.tokenizer_train_docs <= 0:
            parser.error(f"--tokenizer_train_docs must be positive, got {args.tokenizer_train_docs}")
    if args.prefer_depth and args.target_params is None:
        parser.error("--prefer_depth applies to --target_params")
    if args.model_size is None and not args.resume_from_checkpoint and not args.init_from \
            and args.target_params is None:
        args.model_size = "tiny"
    if args.lr_end > args.learning_rate:
        parser.error(f"--lr_end ({args.lr_end}) must not exceed --learning_rate ({args.learning_rate})")
    if args.lr_warmup_steps is not None and args.warmup_ratio is not None:
        parser.error("give --lr_warmup_steps or --warmup_ratio, not both")
    if args.warmup_ratio is None and args.lr_warmup_steps is None:
        args.warmup_ratio = 0.1  # the paper's recipe
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        parser.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0 < args.validation_split < 1:
        parser.error(f"--validation_split must be in (0, 1), got {args.validation_split}")
    if args.mixed_precision is None:  # `accelerate launch` passes its config's setting in the environment
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if args.mixed_precision not in PRECISIONS:
            parser.error(f"ACCELERATE_MIXED_PRECISION={args.mixed_precision} (from the launch config) is not one of "
                         f"{', '.join(PRECISIONS)}")
    for flag, value in (("--mixed_precision fp16", args.mixed_precision == "fp16"), ("--pin_memory", args.pin_memory)):
        if value and not cuda_available():
            parser.error(f"{flag} needs a CUDA GPU; none is available here")
    if args.data_prefetch < 0:
        parser.error(f"--data_prefetch must be >= 0, got {args.data_prefetch}")
    if args.pin_memory and not args.data_prefetch:
        parser.error("--pin_memory pins batches prepared ahead: give --data_prefetch > 0 too")
    if args.torch_compile_mode != "default" and not args.torch_compile:
        parser.error(f"--torch_compile_mode {args.torch_compile_mode} needs --torch_compile")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be positive, got {args.peak_tflops}")


def main(argv=None, parser=None):
    """The trainer on `argv` (default: the command line). Only as the program (argv None) does it take over SIGTERM
    and SIGINT (save, then exit 143 / 130); called with an argv, as a library, the caller keeps its handlers."""
    parser = parser or build_parser()
    args = parse_args(argv, parser)
    from ttt_train import cli  # imported after parsing: --help stays fast

    args.command = cli.command_line(argv)  # recorded in training_args.json and the model cards
    cli.run(check_paths, args)  # before the heavy imports: a wrong path or folder is reported at once
    from ttt_train.loop import train

    cli.run(train, args, argv is None)


if __name__ == "__main__":
    main()
