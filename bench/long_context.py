"""Memory and time against the context length, for every model family the trainer has: a training step, an
evaluation forward and decoding one token after a context of T, at T = 2K .. 32K. What a long-context model must
show: memory and time per token flat in T (TTT layers, TTT-E2E, sliding windows); full attention's time per token
grows with T.

    python bench/long_context.py                                   # tiny shapes, T = 2K .. 32K, on this machine
    python bench/long_context.py --families e2e e2e-off --lengths 4096 8192 --parts train
    python bench/long_context.py --size 125m --lengths 8192 16384 32768 65536 131072   # on a GPU (bf16 autocast)
    python bench/long_context.py --output rows.json; python bench/long_context.py --markdown rows.json  # README table
    python bench/long_context.py --plot rows.json docs/long_context_tiny_cpu.png
    python bench/long_context.py --run e2e --length 4096 --part train   # one measurement, one JSON line

Families (the trainer's --model_type, E2E's variants spelled as its launchers do): ttt-linear, ttt-mlp (TTT layers),
transformer (Transformer++, full attention), transformer-sw (with --sliding_window), e2e (TTT-E2E), e2e-off (its
train_mode pretrain: TTT off), e2e-fa (TTT-E2E's full-attention baseline). Shapes: the size's standard dimensions
for each family (tiny: 4 layers, width 256; TTT-E2E tiny's window 128 and chunk 32; 125m: window 8192, chunk
1024), vocabulary 8000 (tiny) or the official 128256 (other sizes), batch 1.

Memory is the peak of tensors allocated during the measurement and alive at once: on a GPU the allocator's
statistic, on the CPU counted operator by operator (ttt_train/memory.py, in a second pass, since counting is slow);
weights are not included, gradients and activations are. Time: wall clock of the same work without counting, one
thread on the CPU (--threads). Each measurement runs in a process of its own with --timeout; a measurement that
exceeds it or runs out of memory is reported as such, not dropped.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ttt import TTT_STANDARD_CONFIGS, TTTConfig, TTTForCausalLM  # noqa: E402
from ttt_e2e import E2E_STANDARD_CONFIGS, E2EConfig, E2EForCausalLM  # noqa: E402
from ttt_train.families import transformer_config  # noqa: E402
from ttt_train.memory import PeakMemory  # noqa: E402

FAMILIES = ("ttt-linear", "ttt-mlp", "transformer", "transformer-sw", "e2e", "e2e-off", "e2e-fa")
PARTS = ("train", "eval", "decode")
E2E_VARIANTS = {"e2e": "e2e", "e2e-off": "pretrain", "e2e-fa": "fa"}


def build(family: str, size: str, vocab_size: int, length: int):
    if family in E2E_VARIANTS:
        return E2EForCausalLM(E2EConfig.from_size(size, E2E_VARIANTS[family], vocab_size=vocab_size, bos_token_id=1,
                                                  eos_token_id=2, max_position_embeddings=length))
    dims = TTT_STANDARD_CONFIGS[size]
    if family.startswith("ttt-"):
        return TTTForCausalLM(TTTConfig(**dims, vocab_size=vocab_size, ttt_layer_type=family[4:],
                                        max_position_embeddings=length))
    window = E2E_STANDARD_CONFIGS[size].get("sliding_window", 8192) if family == "transformer-sw" else None
    config = transformer_config(None, dims, vocab_size, {"sliding_window": window})
    config.max_position_embeddings = length
    return transformer_model(config)


def transformer_model(config):
    from transformers import MistralForCausalLM

    return MistralForCausalLM(config)


def work(model, ids, part: str):
    """Train and eval: the measured work, returning the tokens processed. Decode: the prefill of all but the last
    token (not measured), returning (the cache, the last token)."""
    if part == "train":
        model(input_ids=ids, labels=ids).loss.backward()
        return ids.numel()
    with torch.no_grad():
        if part == "eval":
            model(input_ids=ids, labels=ids)
            return ids.numel()
        out = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1)
        cache = out.past_key_values if "past_key_values" in out else out.cache
        return cache, ids[:, -1:]


def measure(args) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    vocab_size = args.vocab_size or (8000 if args.size == "tiny" else 128256)
    model = build(args.run, args.size, vocab_size, args.length).to(device).train(args.part == "train")
    ids = torch.randint(3, vocab_size, (args.batch_size, args.length), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def run():
        return work(model, ids, args.part)

    def decode(cache, token):
        with torch.no_grad():
            for _ in range(args.decode_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_argument(model): cache})
                token = out.logits[:, -1:].argmax(-1)
        return args.decode_tokens * args.batch_size

    result = {"family": args.run, "size": args.size, "length": args.length, "part": args.part,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "batch_size": args.batch_size,
              "vocab_size": vocab_size}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with autocast:
        if args.part == "decode":
            cache, token = run()
            sync()
            start = time.perf_counter()
            tokens = decode(cache, token)
            sync()
            elapsed = time.perf_counter() - start
            with PeakMemory(device) as memory:
                decode(cache, token)
        else:
            sync()
            start = time.perf_counter()
            tokens = run()
            sync()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            with PeakMemory(device) as memory:
                run()
    result.update(seconds=round(elapsed, 4), tokens_per_second=round(tokens / elapsed, 1),
                  ms_per_token=round(1000 * elapsed / tokens, 4), peak_memory_mb=round(memory.peak_bytes / 2**20, 1))
    return result


def cache_argument(model) -> str:
    """The name forward() takes the decoding state under (transformers 5.x's `cache`, or `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sweep(args):
    rows = []
    for family in args.families:
        for part in args.parts:
            for length in args.lengths:
                command = [sys.executable, __file__, "--run", family, "--length", str(length), "--part", part,
                           "--size", args.size, "--batch_size", str(args.batch_size), "--threads", str(args.threads),
                           "--decode_tokens", str(args.decode_tokens)]
                if args.vocab_size:
                    command += ["--vocab_size", str(args.vocab_size)]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                    if done.returncode == 0:
                        row = json.loads(done.stdout.strip().splitlines()[-1])
                    else:
                        code = done.returncode
                        last = (done.stderr.strip().splitlines() or
                                [f"exit code {code}" + (" (killed: out of memory?)" if code == -9 else "")])[-1]
                        row = {"family": family, "part": part, "length": length, "error": last[:200]}
                except subprocess.TimeoutExpired:
                    row = {"family": family, "part": part, "length": length, "error": f"over {args.timeout} s"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.output:
                    Path(args.output).write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows):
    print(f"\n{'family':15} {'part':7} {'T':>7} {'peak MB':>9} {'ms/token':>10} {'tokens/s':>10}  growth per doubling")
    previous = {}
    for row in rows:
        key = (row["family"], row["part"])
        if "error" in row:
            print(f"{row['family']:15} {row['part']:7} {row['length']:>7}  {row['error']}")
            previous.pop(key, None)
            continue
        growth = ""
        if key in previous:
            before = previous[key]
            growth = f"memory {row['peak_memory_mb'] / max(before['peak_memory_mb'], 1e-9):.2f}x, " \
                     f"time/token {row['ms_per_token'] / before['ms_per_token']:.2f}x"
        print(f"{row['family']:15} {row['part']:7} {row['length']:>7} {row['peak_memory_mb']:>9.1f} "
              f"{row['ms_per_token']:>10.3f} {row['tokens_per_second']:>10.0f}  {growth}")
        previous[key] = row


def markdown(rows) -> str:
    """The rows as the README's table: per family and part, peak MB and ms per token at each length, and the growth
    per doubling from the first length to the last (geometric mean)."""
    lengths = sorted({row["length"] for row in rows})
    header = "| family | part | " + " | ".join(f"T={n // 1024}K" for n in lengths) + " | per doubling |"
    lines = [header, "|" + " --- |" * (len(lengths) + 3)]
    for family in dict.fromkeys(row["family"] for row in rows):
        for part in dict.fromkeys(row["part"] for row in rows if row["family"] == family):
            cells, done = [], {}
            for n in lengths:
                row = next((r for r in rows if (r["family"], r["part"], r["length"]) == (family, part, n)), None)
                if row is None or "error" in row:
                    cells.append("—" if row is None else row["error"])
                else:
                    cells.append(f"{row['peak_memory_mb']:.0f} MB, {row['ms_per_token']:.2f} ms")
                    done[n] = row
            growth = ""
            if len(done) > 1:
                first, last = min(done), max(done)
                doublings = math.log2(last / first)
                memory = (done[last]["peak_memory_mb"] / done[first]["peak_memory_mb"]) ** (1 / doublings)
                time_ = (done[last]["ms_per_token"] / done[first]["ms_per_token"]) ** (1 / doublings)
                growth = f"memory {memory:.2f}x, time/token {time_:.2f}x"
            lines.append(f"| {family} | {part} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def plot(rows, path: str):
    """Peak memory and time per token against T, one line per family, a panel per part (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if "error" not in row]
    parts = list(dict.fromkeys(row["part"] for row in rows))
    fig, axes = plt.subplots(2, len(parts), figsize=(5 * len(parts), 8), squeeze=False)
    for column, part in enumerate(parts):
        for index, family in enumerate(dict.fromkeys(row["family"] for row in rows)):  # one colour per family
            mine = sorted((r for r in rows if (r["family"], r["part"]) == (family, part)), key=lambda r: r["length"])
            if not mine:
                continue
            lengths, style = [r["length"] for r in mine], dict(marker="o", label=family, color=f"C{index}")
            axes[0][column].plot(lengths, [max(r["peak_memory_mb"], 0.1) for r in mine], **style)
            axes[1][column].plot(lengths, [r["ms_per_token"] for r in mine], **style)
        for row, label in enumerate(("peak memory (MB)", "ms per token")):
            ax = axes[row][column]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length T")
            ax.set_ylabel(label)
            ax.set_title(part)
            ax.grid(True, which="both", alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--size", default="tiny", choices=sorted(set(TTT_STANDARD_CONFIGS) & set(E2E_STANDARD_CONFIGS)))
    parser.add_argument("--vocab_size", type=int, help="default 8000 for tiny, else the official 128256")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the figures in the README: 1)")
    parser.add_argument("--decode_tokens", type=int, default=8, help="tokens decoded after the context")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--output", help="also write the rows to this JSON file")
    parser.add_argument("--markdown", metavar="JSON", help="print the rows of an --output file as a Markdown table")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="plot the rows of an --output file")
    parser.add_argument("--run", choices=FAMILIES, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
    elif args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), args.plot[1])
    elif args.run:
        print(json.dumps(measure(args)))
    else:
        sweep(args)


if __name__ == "__main__":
    main()
