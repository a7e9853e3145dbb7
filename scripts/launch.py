"""The one helper behind scripts/train_<size>_c4.sh: the paper's recipe for a size, with the per-device batch and
gradient accumulation derived from the global batch and the number of GPUs, then `accelerate launch` (or plain
python for one process) of train_gpu_optimized.py. Arguments it does not know are passed to the trainer and
override the recipe (the trainer's last value of a flag wins).

    scripts/train_125m_c4.sh [--layer linear|mlp] [--num_gpus N] [--dry-run] [trainer flags ...]

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
              report_to="tensorboard", pre_conv=True, share_qk=True, use_gate=True)
RECIPES = {
    "125m": dict(learning_rate=3e-3, max_train_steps=4800, per_device_batch=16, fsdp=False),
    "350m": dict(learning_rate=1.5e-3, max_train_steps=13500, per_device_batch=8, fsdp=False),
    "760m": dict(learning_rate=1.25e-3, max_train_steps=29000, per_device_batch=4, fsdp=True),
    "1b": dict(learning_rate=1e-3, max_train_steps=50000, per_device_batch=4, fsdp=True),
}
GLOBAL_BATCH = 256
INNER_BASE_LR = {"linear": 1.0, "mlp": 0.1}  # the paper's eta_base per inner model


def count_gpus() -> int:
    if "NUM_GPUS" in os.environ:
        return int(os.environ["NUM_GPUS"])
    import torch
    return torch.cuda.device_count()


def batch_split(processes: int, max_per_device: int) -> tuple:
    """(per-device batch, accumulation steps) with per_device * accumulation * processes == GLOBAL_BATCH."""
    if GLOBAL_BATCH % processes:
        raise SystemExit(f"error: the global batch of {GLOBAL_BATCH} sequences does not split over {processes} "
                         f"processes; use a process count that divides it")
    per_process = GLOBAL_BATCH // processes
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


def build_command(size, layer, num_gpus, extra) -> list:
    recipe = RECIPES[size]
    machines = int(os.environ.get("NUM_MACHINES", "1"))
    processes = max(num_gpus, 1) * machines
    per_device_batch = int(os.environ.get("PER_DEVICE_BATCH", recipe["per_device_batch"]))
    per_device, accumulation = batch_split(processes, per_device_batch)
    trainer = flag_args({**COMMON, "model_size": size, "ttt_layer_type": layer, "ttt_base_lr": INNER_BASE_LR[layer],
                         "learning_rate": recipe["learning_rate"], "max_train_steps": recipe["max_train_steps"],
                         "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
                         "output_dir": f"outputs/ttt-{layer}-{size}-c4"})
    script = str(ROOT / "train_gpu_optimized.py")
    if processes == 1:
        return [sys.executable, script, *trainer, *extra]
    config = ROOT / ("accelerate_fsdp_config.yaml" if recipe["fsdp"] else "accelerate_config.yaml")
    launcher = ["accelerate", "launch", "--config_file", str(config), "--num_processes", str(processes),
                "--num_machines", str(machines)]
    if machines > 1:
        launcher += ["--machine_rank", os.environ.get("MACHINE_RANK", "0"),
                     "--main_process_ip", os.environ["MAIN_PROCESS_IP"],
                     "--main_process_port", os.environ.get("MAIN_PROCESS_PORT", "29500")]
    return [*launcher, script, *trainer, *extra]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=list(RECIPES))
    parser.add_argument("--layer", choices=list(INNER_BASE_LR), default="linear")
    parser.add_argument("--num_gpus", type=int, help="default: NUM_GPUS, else the GPUs torch sees")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the command instead of running it")
    args, extra = parser.parse_known_args(argv)
    if int(os.environ.get("NUM_MACHINES", "1")) > 1 and "MAIN_PROCESS_IP" not in os.environ:
        parser.error("NUM_MACHINES > 1 needs MAIN_PROCESS_IP (the address of the node with MACHINE_RANK 0)")
    num_gpus = args.num_gpus if args.num_gpus is not None else count_gpus()
    if num_gpus < 0:
        parser.error(f"--num_gpus must be >= 0, got {num_gpus}")
    if num_gpus == 0:
        print("launch: no GPU found; the run goes to the CPU as one process", file=sys.stderr)
    command = build_command(args.size, args.layer, num_gpus, extra)
    print(shlex.join(command), flush=True)
    if not args.dry_run:  # from where the user is: their relative paths (data, output_dir) mean what they wrote
        os.execvp(command[0], command)


if __name__ == "__main__":
    main()
