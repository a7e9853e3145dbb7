"""Speed and memory of a TTT-E2E training step against the same model with TTT off (train_mode pretrain) and the
full-attention baseline of equal size, at several lengths. Each measurement runs in its own process, so its peak
memory is its own.

    python bench/e2e_speed.py                                   # tiny, T = 512 .. 4096, B = 1, on this machine
    python bench/e2e_speed.py --size 125m --lengths 8192 16384  # the 125m recipe's shapes (W 8192, chunk 1024)
    python bench/e2e_speed.py --batch_size 4 --lengths 1024 --mini_batch_size 64 --sliding_window 256
    python bench/e2e_speed.py --run e2e --size tiny --seq_length 1024   # one measurement, JSON

A step is forward, backward (second order through the inner loop for e2e) and AdamW. Reported: ms per step,
tokens/s, the E2E step's cost relative to the TTT-off step, and memory: on the CPU the process's peak resident set
minus its resident set before the first step (activations, gradients and optimizer state), on a GPU the peak
allocated memory (bf16 autocast and TF32 there, as train_gpu_optimized.py). Vocabulary 8000 (tiny) or 32000.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ttt_e2e import E2EConfig, E2EForCausalLM

VARIANTS = {"e2e": "e2e", "ttt-off": "pretrain", "fa": "fa"}


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(args) -> dict:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = {k: getattr(args, k) for k in ("sliding_window", "mini_batch_size") if getattr(args, k)}
    if args.run == "fa":
        shape = {}
    config = E2EConfig.from_size(args.size, VARIANTS[args.run], vocab_size=8000 if args.size == "tiny" else 32000,
                                 bos_token_id=1, **shape)
    model = E2EForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ids = torch.randint(3, config.vocab_size, (args.batch_size, args.seq_length), device=device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    before = resident_mb()
    times = []
    for i in range(args.warmup + args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    memory = (torch.cuda.max_memory_allocated() / 2**20 if cuda
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)
    return dict(model=args.run, size=args.size, seq_length=args.seq_length, batch_size=args.batch_size,
                step_ms=step * 1000, tokens_per_sec=args.batch_size * args.seq_length / step, memory_mb=memory,
                device=torch.cuda.get_device_name() if cuda else "cpu", threads=torch.get_num_threads())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--run", choices=list(VARIANTS), help="one measurement in this process, printed as JSON")
    parser.add_argument("--seq_length", type=int)
    parser.add_argument("--sliding_window", type=int, help="default: the size's (tiny 128, else 8192)")
    parser.add_argument("--mini_batch_size", type=int, help="the chunk; default: the size's (tiny 32, else 1024)")
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(measure(args)))
        return
    rows = []
    for length in args.lengths:
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--run", variant, "--size", args.size, "--seq_length", str(length),
                       "--batch_size", str(args.batch_size), "--repeats", str(args.repeats), "--warmup",
                       str(args.warmup)]
            command += [f"--{k}={getattr(args, k)}" for k in ("sliding_window", "mini_batch_size") if getattr(args, k)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                rows.append(dict(model=variant, seq_length=length, error=done.stderr.strip().splitlines()[-1]))
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| T | model | ms/step | tokens/s | x TTT-off step | memory MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['seq_length']} | {row['model']} | error: {row['error']} | | | |")
            continue
        off = next((r for r in rows if r["seq_length"] == row["seq_length"] and r["model"] == "ttt-off"
                    and "error" not in r), None)
        ratio = f"{row['step_ms'] / off['step_ms']:.2f}" if off else "-"
        print(f"| {row['seq_length']} | {row['model']} | {row['step_ms']:.0f} | {row['tokens_per_sec']:.0f} | "
              f"{ratio} | {row['memory_mb']:.0f} |")


if __name__ == "__main__":
    main()
