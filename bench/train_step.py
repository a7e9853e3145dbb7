"""Training-step throughput of the TTT model: forward + backward + AdamW, tokens per second.

    python bench/train_step.py --layer linear --seq_length 512 --batch_size 4

The default configuration is the one the official implementation was measured with in
../shared/reference/SPEC_DETAILED.md section 13 (hidden 256, 4 layers, 4 heads, intermediate 512,
vocab 8000, float32), so the figures compare directly.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ttt import TTTConfig, TTTForCausalLM  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", choices=["linear", "mlp"], default="linear")
    parser.add_argument("--model_size", default="tiny")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = TTTConfig.from_size(args.model_size, vocab_size=args.vocab_size, ttt_layer_type=args.layer)
    model = TTTForCausalLM(config).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_length), device=args.device)

    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_length
    median = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.layer} size={args.model_size} params={params / 1e6:.2f}M T={args.seq_length} B={args.batch_size} "
          f"device={args.device} threads={torch.get_num_threads()}: "
          f"{tokens / median:,.0f} tokens/s (median of {args.steps} steps, {median * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
