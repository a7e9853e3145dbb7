"""The Triton TTT-Linear scan kernels alone (ttt_kernels.py): forward and backward time per layer for each number
of warps per program, and their relative error against the PyTorch recomputing scan on the same fresh inputs. On
a GPU this is the loop for kernel work: change a kernel, run this, compare.

    python bench/scan_kernels.py                          # B=1 and B=4, 12 heads of 64, T=2048
    python bench/scan_kernels.py --shapes 1,12,512,16,64  # B,H,n,K,f (n mini-batches of K tokens)

Without a GPU the kernels run through Triton's interpreter: only the error column means anything there, so the
default shape is small. Timings: triton.testing.do_bench's median, TF32 matrix products (as the GPU trainer).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ttt_kernels  # noqa: E402
from ttt import TTT_NORM_EPS, linear_scan_backward_op, linear_scan_op  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scan_inputs(B, H, n, K, f, seed):
    """q, k, target, eta_qk, e, W0, b0, gamma, beta at the scales of a trained layer's."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    draw = lambda *shape, scale=1.0: torch.randn(*shape, device=DEVICE, generator=generator) * scale  # noqa: E731
    return (draw(B, H, n, K, f), draw(B, H, n, K, f), draw(B, H, n, K, f), draw(B, H, n, K, K, scale=0.05),
            torch.rand(B, H, n, K, 1, device=DEVICE, generator=generator) * 0.02, draw(B, H, f, f, scale=0.02),
            draw(B, H, 1, f, scale=0.02), 1 + draw(H, 1, f, scale=0.1), draw(H, 1, f, scale=0.1))


def scan_and_gradients(inputs, d_out, d_W, d_b, triton):
    out, W, b, starts = linear_scan_op(*inputs, keep_starts=True, triton=triton)
    q, k, target, eta_qk, e, _, _, gamma, beta = inputs
    return out, W, b, *linear_scan_backward_op(q, k, target, eta_qk, e, gamma, beta, starts, d_out, d_W, d_b,
                                               triton)


def parse_shape(text, parser):
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1 or not ttt_kernels.block_shapes_fit(torch.empty(shape, device="meta")):
        parser.error(f"--shapes {text}: give B,H,n,K,f, positive, with K and f powers of two from 16 to 128")
    return shape


def relative_error(got, expected):
    return max(((g - e).norm() / e.norm()).item() for g, e in zip(got, expected))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_shapes = ["1,12,128,16,64", "4,12,128,16,64"] if DEVICE == "cuda" else ["1,3,4,16,32"]
    parser.add_argument("--shapes", nargs="+", default=default_shapes, help="B,H,n,K,f of each case")
    parser.add_argument("--warps", nargs="+", type=int, choices=[1, 2, 4, 8, 16],
                        default=[2, 4, 8] if DEVICE == "cuda" else [4], help="warps per program to time")
    args = parser.parse_args()
    shapes = [parse_shape(text, parser) for text in args.shapes]
    torch.set_float32_matmul_precision("high")
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU, Triton interpreter'}\n")
    print("| B, H, n, K, f | warps | forward (us) | backward (us) | max relative error vs PyTorch |")
    print("| --- | --- | --- | --- | --- |")
    for shape in shapes:
        inputs = scan_inputs(*shape, seed=sum(shape))
        d_out, d_W, d_b = (torch.randn_like(t) for t in (inputs[0], inputs[5], inputs[6]))
        expected = scan_and_gradients(inputs, d_out, d_W, d_b, triton=False)
        for warps in args.warps:
            ttt_kernels.NUM_WARPS = warps
            error = relative_error(scan_and_gradients(inputs, d_out, d_W, d_b, triton=True), expected)
            times = "| - | -"  # the interpreter's times say nothing about a GPU's
            if DEVICE == "cuda":
                from triton.testing import do_bench

                q, k, target, eta_qk, e, W0, b0, gamma, beta = inputs
                forward = lambda: ttt_kernels.linear_scan_forward(*inputs, TTT_NORM_EPS, True)  # noqa: E731
                _, _, _, W_starts, b_starts = forward()
                backward = lambda: ttt_kernels.linear_scan_backward(  # noqa: E731
                    q, k, target, eta_qk, e, gamma, beta, W_starts, b_starts, d_out, d_W, d_b, TTT_NORM_EPS)
                times = "".join(f"| {do_bench(fn, warmup=50, rep=200, return_mode='median') * 1e3:,.1f} "
                                for fn in (forward, backward))
            print(f"| {','.join(map(str, shape))} | {warps} {times} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
