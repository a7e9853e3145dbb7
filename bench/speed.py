"""Speed and memory of the TTT model against the Transformer++ baseline of equal size, on the workloads of the
speed issue. Each measurement runs in its own process so that its peak memory is its own.

    python bench/speed.py                      # every workload, a markdown table on stdout
    python bench/speed.py --only b c           # some workloads
    python bench/speed.py --only d e --compile # training steps under torch.compile, as the GPU trainer runs
                                               # (without the loop scans, which it would unroll)
    python bench/speed.py --only d e --compile reduce-overhead   # ... and CUDA graphs
    python bench/speed.py --run b --model ttt-linear --seq_length 512 --batch_size 4   # one measurement, JSON
    python bench/speed.py --run d --size 125m --seq_length 2048 --batch_size 1 --profile  # ... and its profile

Workloads: (a) the TTT inner loop alone (the scan over the mini-batches of one layer, 12 heads of 64, B=4,
T=2048), forward and forward+backward; (b) a training step (forward, backward, AdamW) of the tiny model, T=512,
B=4; (c) the tiny model at T=2048 and 8192, B=1; (d) the 125m size at T=2048, B=1; (e) the 125m size at T=8192
and 32768, B=1 (run by default only on a GPU); (decode) tokens/s of cached greedy decoding after a prompt of 128
to 2048 tokens. Vocabulary 8000 for the tiny model, 32000 for 125m. On a GPU: bf16 autocast and TF32 (as
train_gpu_optimized.py), and MFU as the trainer reports it. Peak memory: the process's peak resident set on the
CPU, the peak allocated memory on a GPU. The tiny model on the CPU at --repeats 9 --warmup 2 is the configuration
and timing the official implementation was measured with (../shared/reference/SPEC_DETAILED.md, section 13).
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
from ttt import CACHE_FIELD, TTT_LAYER_CLASSES, TTT_STANDARD_CONFIGS, InnerState, TTTConfig, TTTForCausalLM
from ttt_train.config import COMPILE_MODES
from ttt_train.families import FAMILIES, transformer_config
from ttt_train.metrics import gpu_peak_tflops, training_flops_per_token
from ttt_train.models import matched_config

# The suffix is the scan (TTTConfig.scan_implementation): "-loop", the autograd loop over mini-batches;
# "-recomputing", the recomputing scan in PyTorch even where the Triton kernels run; none, "auto" (Triton on a GPU)
# "mamba2" and "gated_deltanet": transformers' classes at the size's parameter count (ttt_train/families.py), on their
# PyTorch reference path unless mamba-ssm / flash-linear-attention and causal-conv1d run (CUDA).
BASELINES = ("mamba2", "gated_deltanet")
MODELS = ("ttt-linear-loop", "ttt-linear-recomputing", "ttt-linear", "ttt-mlp-loop", "ttt-mlp-recomputing",
          "ttt-mlp", "transformer", *BASELINES)
WORKLOADS = {
    "a": [dict(model=m, seq_length=2048, batch_size=4) for m in MODELS if m != "transformer"],
    "b": [dict(model=m, seq_length=512, batch_size=4, size="tiny") for m in MODELS],
    "c": [dict(model=m, seq_length=t, batch_size=1, size="tiny") for t in (2048, 8192) for m in MODELS],
    "d": [dict(model=m, seq_length=2048, batch_size=1, size="125m") for m in MODELS],
    "e": [dict(model=m, seq_length=t, batch_size=1, size="125m") for t in (8192, 32768)
          for m in ("ttt-linear", "transformer")],
    # the baselines' caches are driven by generate() (families.generation_kwargs), not by this loop
    "decode": [dict(model=m, seq_length=t, batch_size=1, size="tiny") for t in (128, 512, 2048)
               for m in MODELS if "-loop" not in m and m not in BASELINES],
}


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(args):
    """bf16 autocast (the GPU trainer's default) or none; the TTT-Linear scan keeps float32 inside either way."""
    return torch.autocast(device(), dtype=torch.bfloat16, enabled=args.precision == "bf16")


def timed(fn, args, budget_s=15.0):
    """Median seconds of `args.repeats` calls after `args.warmup` (a GPU needs a few to compile kernels and raise
    its clocks); slow cases stop early once past `budget_s`, after at least 3 calls. With --profile, one more call
    runs under torch.profiler and its busiest operators go to stderr."""
    for _ in range(args.warmup):
        fn()
    times = []
    while len(times) < args.repeats and (len(times) < 3 or sum(times) < budget_s):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    if args.profile:
        print_profile(fn)
    return statistics.median(times)


def print_profile(fn):
    """The operators of one call by their own time on the device (GPU) or CPU, and how much of the call's wall
    time the device was busy: far under 100% means the step waits on Python and kernel launches."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        wall_s = time.perf_counter() - start
    events = profile.key_averages()
    sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=30), file=sys.stderr)
    if torch.cuda.is_available():
        kernels = [e for e in profile.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
        busy_s = sum(kernel.device_time_total for kernel in kernels) / 1e6
        print(f"device busy {busy_s * 1e3:.1f} ms of {wall_s * 1e3:.1f} ms wall ({busy_s / wall_s:.0%}, "
              f"profiler overhead included)", file=sys.stderr)


def scan_of(name) -> str:
    """config.scan_implementation of a bench model name: "-loop", "-recomputing", or (none) "auto"."""
    return next((scan for scan in ("loop", "recomputing") if name.endswith(f"-{scan}")), "auto")


def build_model(name, size):
    vocab = 32000 if size == "125m" else 8000
    from transformers import AutoModelForCausalLM

    if name == "transformer":
        return AutoModelForCausalLM.from_config(transformer_config(size, {}, vocab, {}))
    if name in BASELINES:
        family = FAMILIES[name]
        make = lambda dims: family.make_config(None, dims, vocab, {}, 1, 2)
        config = matched_config(family, dict(TTT_STANDARD_CONFIGS[size]), vocab, make, report=lambda _: None)
        return AutoModelForCausalLM.from_config(config)
    return TTTForCausalLM(TTTConfig.from_size(size, vocab_size=vocab, ttt_layer_type=name.split("-")[1],
                                              scan_implementation=scan_of(name)))


def run_inner_loop(args):
    """(a): only the scan of one TTT layer with 12 heads of 64 over T/16 mini-batches."""
    layer_class = TTT_LAYER_CLASSES[args.model.split("-")[1]]
    layer = layer_class(TTTConfig(hidden_size=768, num_attention_heads=12, intermediate_size=8,
                                  num_hidden_layers=1, vocab_size=8, scan_implementation=scan_of(args.model)),
                        0).to(device())
    B, H, n, K, f = args.batch_size, 12, args.seq_length // 16, 16, 64
    make = lambda *shape: torch.randn(*shape, device=device(), requires_grad=True)
    q, k, target = make(B, H, n, K, f), make(B, H, n, K, f), make(B, H, n, K, f)
    lr = torch.full((B, H, n, K, 1), 0.5 / f, device=device(), requires_grad=True)

    def forward():
        state = InnerState(tuple(p.unsqueeze(0).expand(B, *p.shape) for p in layer.initial_params()), None)
        c = layer.position_factor(device()).unsqueeze(-1)
        with autocast(args):
            out, _ = layer.scan(state, layer.make_mini_batch(q, k, target, lr, c, True))
        return out

    def forward_backward():
        forward().square().mean().backward()

    with torch.no_grad():
        forward_s = timed(forward, args)
    train_s = timed(forward_backward, args)
    tokens = B * args.seq_length
    return {"forward_tokens_per_sec": tokens / forward_s, "train_tokens_per_sec": tokens / train_s}


def run_train_step(args):
    model = build_model(args.model, args.size).to(device()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if args.compile:
        model = torch.compile(model, mode=args.compile)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_length), device=device())

    def step():
        with autocast(args):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens_per_sec = args.batch_size * args.seq_length / timed(step, args)
    result = {"train_tokens_per_sec": tokens_per_sec}
    if gpu_peak_tflops():
        num_params = sum(p.numel() for p in model.parameters())
        flops = training_flops_per_token(model.config, num_params, args.seq_length) * tokens_per_sec
        result["mfu"] = flops / (gpu_peak_tflops() * 1e12)
    return result


@torch.no_grad()
def run_decode(args):
    """Greedy decoding of 32 tokens, one forward per token through the cache, after a prompt of seq_length
    tokens (the prompt's prefill is not timed)."""
    model = build_model(args.model, args.size).to(device()).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_length), device=device())
    new_tokens, times = 32, []
    for _ in range(args.repeats + 1):
        with autocast(args):
            out = model(input_ids=ids, use_cache=True)
            synchronize()
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=token, use_cache=True, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        synchronize()
        times.append(time.perf_counter() - start)
    return {"decode_tokens_per_sec": args.batch_size * new_tokens / statistics.median(times[1:])}


def measure(args):
    torch.manual_seed(0)
    if args.precision == "bf16":
        torch.set_float32_matmul_precision("high")  # TF32 for what stays float32, as the GPU trainer's --tf32
    runner = {"a": run_inner_loop, "decode": run_decode}.get(args.run, run_train_step)
    result = runner(args)
    if torch.cuda.is_available():
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**vars(args), **result}))


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(WORKLOADS), help="workloads to run (default: all)")
    parser.add_argument("--repeats", type=int, help="timed repetitions, median reported (default: 10 on a GPU, 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: 3 on a GPU, 1)")
    parser.add_argument("--run", choices=list(WORKLOADS), help=argparse.SUPPRESS)  # one measurement, in a child
    parser.add_argument("--model", choices=MODELS, default="ttt-linear")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES,
                        help="torch.compile the model for the training-step workloads, in this mode (default: "
                             "'default', as train_gpu_optimized.py does; 'reduce-overhead' adds CUDA graphs)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one call of each measurement and print its busiest operators to stderr")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="float32, or bf16 autocast with TF32 (default: bf16 on a GPU, fp32 on the CPU)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.repeats = args.repeats or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if args.run:
        return measure(args)

    compiled = f", torch.compile ({args.compile})" if args.compile else ""
    print(f"machine: {machine()}, precision {args.precision}{compiled}\n")
    print("| workload | model | size | T x B | tokens/s | x loop | MFU | peak memory (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    default = [w for w in WORKLOADS if w != "e" or torch.cuda.is_available()]
    for workload in args.only or default:
        loop = {}  # (inner model, T, B) -> tokens/s of the loop scan
        for case in WORKLOADS[workload]:
            if case["model"].endswith("-recomputing") and not torch.cuda.is_available():
                continue  # the same path as "ttt-linear" or "ttt-mlp" without a GPU
            if args.compile and case["model"].endswith("-loop"):
                continue  # torch.compile would unroll its loop over the mini-batches: minutes per length
            command = [sys.executable, __file__, "--run", workload, "--repeats", str(args.repeats),
                       "--warmup", str(args.warmup), "--precision", args.precision,
                       *(["--compile", args.compile] if args.compile else []), *(["--profile"] * args.profile),
                       "--model", case["model"], "--size", case.get("size", "tiny"),
                       "--seq_length", str(case["seq_length"]), "--batch_size", str(case["batch_size"])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {workload} | {case['model']} | failed: {done.stderr.strip().splitlines()[-1]} |")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            speeds = {k.replace("_tokens_per_sec", ""): v for k, v in result.items() if k.endswith("tokens_per_sec")}
            key = (case["model"].split("-")[1] if case["model"].startswith("ttt-") else None,
                   case["seq_length"], case["batch_size"])
            if case["model"].endswith("-loop"):
                loop[key] = speeds
            base = loop.get(key)
            ratio = ", ".join(f"{v / base[k]:.2f}x" for k, v in speeds.items()) if base else ""
            mfu = f"{result['mfu']:.1%}" if "mfu" in result else ""
            shape = f"{case['seq_length']} x {case['batch_size']}"
            print(f"| {workload} | {case['model']} | {case.get('size', '-') if workload != 'a' else 'layer'} | "
                  f"{shape} | {', '.join(f'{k} {v:,.0f}' for k, v in speeds.items())} | {ratio} | {mfu} | "
                  f"{result['peak_memory_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
