"""The one helper behind scripts/train_<size>_c4.sh and scripts/train_e2e.sh: the official recipe for a size, with
the per-device batch and gradient accumulation derived from the global batch and the number of GPUs, then
`accelerate launch` (or plain python for one process) of train_gpu_optimized.py. Arguments it does not know are
passed to the trainer and override the recipe (the trainer's last value of a flag wins).

    scripts/train_125m_c4.sh [--layer linear|mlp] [--model_type ttt|transformer|mamba2|gated_deltanet]
                             [--num_gpus N] [--dry-run] [trainer flags ...]
    scripts/train_e2e.sh SIZE [--stage pretrain|extend] [--variant e2e|fa] [--num_gpus N] [--dry-run] [flags ...]

Environment: NUM_GPUS (default: the GPUs torch sees), PER_DEVICE_BATCH (default: the recipe's), and for several
nodes NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT.
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The paper's recipes (App. C, Table 3): sequence 2048, 256 sequences (0.5M tokens) per step, AdamW with weight
# decay 0.1, cosine to 1e-5 after 10% warm-up. per_device_batch is the largest micro-batch we start from on one
# 80 GB GPU; accumulation makes up the rest of the global batch. FSDP shards the two larger sizes.
COMMON = dict(dataset_name="allenai/c4", dataset_config="en", tokenizer_name="meta-llama/Llama-2-7b-hf",
              seq_length=2048, weight_decay=0.1, lr_end=1e-5, warmup_ratio=0.1, lr_scheduler_type="cosine",
              save_checkpoint_freq=500, save_milestone_freq=2000, eval_steps=500, logging_steps=10,
              report_to="tensorboard")
TTT_BACKBONE = dict(pre_conv=True, share_qk=True, use_gate=True)  # the paper's Mamba backbone for the TTT layers
# The baselines the C4 recipes train at the same size, tokens and schedule (the paper's comparison); their sizes
# count the TTT-Linear model's parameters (ttt_train/families.py).
BASELINES = ("transformer", "mamba2", "gated_deltanet")
RECIPES = {
    "125m": dict(learning_rate=3e-3, max_train_steps=4800, per_device_batch=16, fsdp=False),
    "350m": dict(learning_rate=1.5e-3, max_train_steps=13500, per_device_batch=8, fsdp=False),
    "760m": dict(learning_rate=1.25e-3, max_train_steps=29000, per_device_batch=4, fsdp=True),
    "1b": dict(learning_rate=1e-3, max_train_steps=50000, per_device_batch=4, fsdp=True),
}
GLOBAL_BATCH = 256
# The GPUs every recipe is planned for: one node of 8 80-GB GPUs (per_device_batch and the accumulation that makes
# up the global batch). A dry run on a host without GPUs prints the command for these.
RECIPE_GPUS = 8
INNER_BASE_LR = {"linear": 1.0, "mlp": 0.1}  # the paper's eta_base per inner model

# TTT-E2E's official recipes (test-time-training/e2e configs; ../shared/reference_e2e/SPEC.md 2.6): pretraining
# at 8K on DCLM, then extension at 32K on Books3 from the pretrained weights (fresh optimizer, 5% of the tokens);
# AdamW, weight decay 0.1, clip 1.0, cosine to 1e-5 after 10% warm-up; the inner step size warms up from 0.1 over
# the outer warm-up in pretraining, not in extension. The fa baseline trains with the same steps and rates. The
# official pretraining data (DCLM filtered for long documents, Llama-3 tokenised, a zarr bucket) is not on the
# Hub: DCLM's baseline release streams in its place; Books3 is not distributed, so extension needs --dataset_name.
# per_device_batch is a starting point (not measured here: the suffix's second-order pass needs more memory).
E2E_COMMON = dict(tokenizer_name="meta-llama/Meta-Llama-3-8B", weight_decay=0.1, lr_end=1e-5, warmup_ratio=0.1,
                  lr_scheduler_type="cosine", max_grad_norm=1.0, save_checkpoint_freq=500, save_milestone_freq=2500,
                  eval_steps=500, logging_steps=10, report_to="tensorboard")
E2E_STAGES = {
    "pretrain": dict(seq_length=8192, dataset_name="mlfoundations/dclm-baseline-1.0", streaming=True),
    "extend": dict(seq_length=32768, learning_rate=4e-4, ilr_init=1.0, ilr_warmup_steps=0),
}
# The fa baseline's RoPE theta when extended to a length (E2E keeps 500,000: its attention never spans more
# than window + chunk); the official configs raise it with the context.
FA_EXTENSION_THETA = {32768: 2e6, 131072: 1e7}
E2E_RECIPES = {  # size: pretraining (steps, global batch, peak lr), extension (steps, global batch)
    "125m": dict(pretrain=(4800, 64, 3e-3), extend=(120, 32), per_device_batch=4),
    "350m": dict(pretrain=(13500, 64, 1.5e-3), extend=(337, 32), per_device_batch=2),
    "760m": dict(pretrain=(29000, 64, 1.25e-3), extend=(725, 32), per_device_batch=1),
    "1b": dict(pretrain=(50000, 64, 1e-3), extend=(1250, 32), per_device_batch=1),
    "3b": dict(pretrain=(52000, 128, 8e-4), extend=(1300, 64), per_device_batch=1),
}


def count_gpus() -> int:
    if "NUM_GPUS" in os.environ:
        return int(os.environ["NUM_GPUS"])
    return visible_gpus()


def batch_split(processes: int, max_per_device: int, global_batch: int = GLOBAL_BATCH) -> tuple:
    """(per-device batch, accumulation steps) with per_device * accumulation * processes == global_batch."""
    if global_batch % processes:
        raise SystemExit(f"error: the global batch of {global_batch} sequences does not split over {processes} "
                         f"processes; use a process count that divides it")
    per_process = global_batch // processes
    per_device = min(max_per_device, per_process)
    while per_process % per_device:
        per_device -= 1
    return per_device, per_process // per_device


def flag_args(values: dict) -> list:
    out = []
    for key, value in values.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not False:
            out += [f"--{key}", str(value)]
    return out


def ttt_flags(size, layer, processes, model_type="ttt") -> tuple:
    """(trainer flags, use FSDP) of the C4 recipe for TTT-Linear/MLP, or for a baseline (`model_type`)."""
    recipe = RECIPES[size]
    per_device_batch = int(os.environ.get("PER_DEVICE_BATCH", recipe["per_device_batch"]))
    per_device, accumulation = batch_split(processes, per_device_batch)
    flags = {**COMMON, "model_size": size, "learning_rate": recipe["learning_rate"],
             "max_train_steps": recipe["max_train_steps"], "per_device_train_batch_size": per_device,
             "gradient_accumulation_steps": accumulation}
    if model_type == "ttt":
        flags |= {**TTT_BACKBONE, "ttt_layer_type": layer, "ttt_base_lr": INNER_BASE_LR[layer],
                  "output_dir": f"outputs/ttt-{layer}-{size}-c4"}
    else:
        flags |= {"model_type": model_type, "output_dir": f"outputs/{model_type}-{size}-c4"}
    return flags, recipe["fsdp"]


def e2e_flags(size, stage, variant, processes) -> tuple:
    """(trainer flags, use FSDP) of a TTT-E2E recipe: `variant` e2e (meta-learned TTT) or fa (full attention)."""
    recipe = E2E_RECIPES[size]
    steps, global_batch, *peak = recipe[stage]
    per_device_batch = int(os.environ.get("PER_DEVICE_BATCH", recipe["per_device_batch"]))
    per_device, accumulation = batch_split(processes, per_device_batch, global_batch)
    flags = {**E2E_COMMON, **E2E_STAGES[stage], "model_type": "e2e" if variant == "e2e" else "e2e_fa",
             "model_size": size, "max_train_steps": steps, "per_device_train_batch_size": per_device,
             "gradient_accumulation_steps": accumulation, "output_dir": f"outputs/{variant}-{size}-{stage}"}
    if stage == "pretrain":
        flags |= {"learning_rate": peak[0]}
        if variant == "e2e":
            flags |= {"ilr_init": 0.1, "ilr_warmup_steps": steps // 10}  # over the outer warm-up
    if variant == "fa":
        flags = {k: v for k, v in flags.items() if k not in ("ilr_init", "ilr_warmup_steps")}
        if stage == "extend":
            flags["rope_theta"] = FA_EXTENSION_THETA[flags["seq_length"]]
    if stage == "extend":
        flags.pop("model_size")  # the size is that of --init_from, the pretrained model
    return flags, size in ("760m", "1b", "3b")


def build_command(size, layer, num_gpus, extra, family="ttt", stage="pretrain", variant="e2e",
                  model_type="ttt") -> list:
    machines = int(os.environ.get("NUM_MACHINES", "1"))
    processes = max(num_gpus, 1) * machines
    flags, fsdp = ttt_flags(size, layer, processes, model_type) if family == "ttt" \
        else e2e_flags(size, stage, variant, processes)
    trainer = flag_args(flags)
    script = str(ROOT / "train_gpu_optimized.py")
    if processes == 1:
        return [sys.executable, script, *trainer, *extra]
    config = ROOT / ("accelerate_fsdp_config.yaml" if fsdp else "accelerate_config.yaml")
    launcher = ["accelerate", "launch", "--config_file", str(config), "--num_processes", str(processes),
                "--num_machines", str(machines)]
    if machines > 1:
        launcher += ["--machine_rank", os.environ.get("MACHINE_RANK", "0"),
                     "--main_process_ip", os.environ["MAIN_PROCESS_IP"],
                     "--main_process_port", os.environ.get("MAIN_PROCESS_PORT", "29500")]
    return [*launcher, script, *trainer, *extra]


def confirmed_on_terminal(question: str) -> bool:
    """A yes from a person at a terminal; without a terminal (a script, a job), no."""
    if not sys.stdin.isatty():
        return False
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=list(E2E_RECIPES))
    parser.add_argument("--family", choices=["ttt", "e2e"], default="ttt",
                        help="ttt: TTT-Linear/MLP on C4 (train_<size>_c4.sh); e2e: TTT-E2E (train_e2e.sh)")
    parser.add_argument("--layer", choices=list(INNER_BASE_LR), default="linear", help="ttt: the inner model")
    parser.add_argument("--model_type", choices=["ttt", *BASELINES], default="ttt",
                        help="the C4 recipes: TTT (--layer), or a baseline at the same size, tokens and schedule")
    parser.add_argument("--stage", choices=list(E2E_STAGES), default="pretrain",
                        help="e2e: pretraining at 8K, or extension at 32K (needs --init_from and --dataset_name)")
    parser.add_argument("--variant", choices=["e2e", "fa"], default="e2e",
                        help="e2e: TTT-E2E; fa: its full-attention baseline")
    parser.add_argument("--num_gpus", type=int, help="default: NUM_GPUS, else the GPUs torch sees")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the command instead of running it")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")  # one line, no usage
    args, extra = parser.parse_known_args(argv)
    if args.family == "e2e" and args.model_type != "ttt":
        parser.error(f"--model_type {args.model_type}: train_e2e.sh trains TTT-E2E or, with --variant fa, its "
                     f"full-attention baseline; the other baselines take the C4 recipes (train_<size>_c4.sh)")
    if int(os.environ.get("NUM_MACHINES", "1")) > 1 and "MAIN_PROCESS_IP" not in os.environ:
        parser.error("NUM_MACHINES > 1 needs MAIN_PROCESS_IP (the address of the node with MACHINE_RANK 0)")
    chosen = args.num_gpus is not None or "NUM_GPUS" in os.environ  # a GPU count the user gave (0 included)
    num_gpus = args.num_gpus if args.num_gpus is not None else count_gpus()
    if num_gpus < 0:
        parser.error(f"--num_gpus must be >= 0, got {num_gpus}")
    if num_gpus == 0 and not chosen and not args.dry_run and not confirmed_on_terminal(
            f"launch: no CUDA GPU found; the {args.size} recipe is meant for GPUs and would take weeks on this "
            f"CPU. Run it here anyway? [y/N] "):
        parser.error(f"no CUDA GPU found: the {args.size} recipe is meant for GPUs and would take weeks on this CPU; "
                     f"--dry-run prints its command on the recipe's {RECIPE_GPUS} GPUs, --num_gpus 0 runs it here on "
                     f"purpose, and train_ttt.py trains small models on a CPU (README: Quick start)")
    if num_gpus == 0 and args.dry_run and not chosen:  # the command the recipe runs on the GPUs it is planned for
        here = build_command(args.size, args.layer, 0, extra, args.family, args.stage, args.variant, args.model_type)
        print(f"launch: no GPU found here; printing the recipe's command on its {RECIPE_GPUS} GPUs (--num_gpus N for "
              f"another count); on this CPU, as one process, it would run: {shlex.join(here)}", file=sys.stderr)
        num_gpus = RECIPE_GPUS
    elif num_gpus == 0:
        print("launch: no GPU found; the run goes to the CPU as one process", file=sys.stderr)
    if args.family == "ttt" and args.size not in RECIPES:
        parser.error(f"TTT-Linear/MLP recipes exist for {', '.join(RECIPES)}, not {args.size}")
    if args.family == "e2e" and args.stage == "extend":
        given = {a.split("=")[0] for a in extra}
        missing = [flag for flag in ("--init_from", "--dataset_name") if flag not in given]
        if missing:
            parser.error(f"--stage extend needs {' and '.join(missing)}: extension starts from the pretrained model "
                         f"(--init_from) on long documents (Books3 in the paper, not distributed: --dataset_name)")
    if num_gpus > 0 and not args.dry_run:
        visible = visible_gpus()
        if visible < num_gpus:  # else every process would start, fail alike and print its own traceback
            parser.error(f"{num_gpus} GPU(s) asked (--num_gpus / NUM_GPUS) but this host has "
                         + (f"{visible}: give at most {visible}" if visible else
                            "no CUDA GPU: --num_gpus 0 runs the recipe on the CPU") + "; --dry-run prints the command")
    command = build_command(args.size, args.layer, num_gpus, extra, args.family, args.stage, args.variant,
                            args.model_type)
    if not args.dry_run:  # from where the user is: their relative paths (data, output_dir) mean what they wrote
        check_trainer_flags(command[command.index(str(ROOT / "train_gpu_optimized.py")) + 1:])
    print(shlex.join(command), flush=True)
    if not args.dry_run:
        os.execvp(command[0], command)


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count()


def check_trainer_flags(trainer_args: list):
    """The trainer's own checks of its flags, paths and output folder (no torch needed), once here: launched, each
    of its processes would report the same error after its start-up, and the launcher its traceback."""
    sys.path.insert(0, str(ROOT))
    import train_ttt
    from ttt_train import cli

    cli.run(train_ttt.check_paths, train_ttt.parse_args(trainer_args))


if __name__ == "__main__":
    main()
