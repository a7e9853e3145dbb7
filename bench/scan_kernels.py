"""The Triton scan kernels alone (ttt_kernels.py), TTT-Linear and TTT-MLP: forward and backward time of one layer's
scan for each number of warps per program, against the PyTorch recomputing scan on the same fresh inputs, with
the kernels' relative error against it. On a GPU this is the loop for kernel work: change a kernel, run this,
compare.

    python bench/scan_kernels.py                          # B=1 and B=4, 12 heads of 64, T=2048, both inner models
    python bench/scan_kernels.py --inner mlp --warps 4 8  # TTT-MLP only, 4 and 8 warps
    python bench/scan_kernels.py --shapes 1,12,512,16,64  # B,H,n,K,f (n mini-batches of K tokens)

Times are of the scan operators (ttt::linear_scan, ttt::mlp_scan and their backwards), so TTT-MLP's backward
includes its batched PyTorch part around the kernel's walk back. Without a GPU the kernels run through Triton's
interpreter: only the error column means anything there, so the default shape is small. Timings:
triton.testing.do_bench's median, TF32 matrix products (as the GPU trainer).
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ttt_kernels
from ttt_scan import linear_scan_backward_op, linear_scan_op, mlp_scan_backward_op, mlp_scan_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCANS = {"linear": (linear_scan_op, linear_scan_backward_op, "NUM_WARPS"),
         "mlp": (mlp_scan_op, mlp_scan_backward_op, "MLP_NUM_WARPS")}


def scan_inputs(inner, B, H, n, K, f, seed):
    """The scan's inputs at the scales of a trained layer's: q, k, target, [eta,] eta_qk, e, the inner weights,
    gamma, beta."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    draw = lambda *shape, scale=1.0: torch.randn(*shape, device=DEVICE, generator=generator) * scale
    uniform = lambda *shape: torch.rand(*shape, device=DEVICE, generator=generator)
    widths = [f, f] if inner == "linear" else [f, 4 * f, f]
    weights = [w for a, b in zip(widths, widths[1:])
               for w in (draw(B, H, a, b, scale=0.02), draw(B, H, 1, b, scale=0.02))]
    eta = [] if inner == "linear" else [(uniform(B, H, n, K, K) * 0.05).tril()]
    return (draw(B, H, n, K, f), draw(B, H, n, K, f), draw(B, H, n, K, f), *eta, draw(B, H, n, K, K, scale=0.05),
            uniform(B, H, n, K, 1) * 0.02, *weights, 1 + draw(H, 1, f, scale=0.1), draw(H, 1, f, scale=0.1))


def scan_steps(inner, inputs, triton):
    """(forward, backward) closures of one scan, and the outputs of the forward that backward reuses the saved
    weights of, with fresh output gradients (the same for both paths)."""
    scan, scan_backward, _ = SCANS[inner]
    forward = lambda: scan(*inputs, keep_starts=True, triton=triton)
    out, *weights, starts = outputs = forward()
    torch.manual_seed(0)
    d_out, *d_weights = (torch.randn_like(t) for t in (out, *weights))
    fields, gamma_beta = inputs[:-2 - len(weights)], inputs[-2:]  # the backward takes no weights but the starts
    backward = lambda: scan_backward(*fields, *gamma_beta, starts, d_out, *d_weights, triton)
    return forward, backward, outputs


def results(inner, inputs, triton):
    """The scan's outputs and its backward's gradients."""
    _, backward, outputs = scan_steps(inner, inputs, triton)
    return [*outputs[:-1], *backward()]


def parse_shape(text, parser):
    try:
        shape = tuple(int(size) for size in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        parser.error(f"--shapes {text}: give B,H,n,K,f, five positive integers")
    return shape


def relative_error(got, expected):
    return max(((g - e).norm() / e.norm()).item() for g, e in zip(got, expected))


def microseconds(fn):
    from triton.testing import do_bench

    return f"{do_bench(fn, warmup=50, rep=200, return_mode='median') * 1e3:,.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_shapes = ["1,12,128,16,64", "4,12,128,16,64"] if DEVICE == "cuda" else ["1,3,4,16,32"]
    parser.add_argument("--shapes", nargs="+", default=default_shapes, help="B,H,n,K,f of each case")
    parser.add_argument("--inner", nargs="+", choices=list(SCANS), default=list(SCANS), help="inner models")
    parser.add_argument("--warps", nargs="+", type=int, choices=[1, 2, 4, 8, 16],
                        help="warps per program to time (default: 2 4 8 on a GPU, each kernel's own without)")
    args = parser.parse_args()
    shapes = [parse_shape(text, parser) for text in args.shapes]
    for inner in args.inner:
        for shape in shapes:
            if not ttt_kernels.block_shapes_fit(torch.empty(shape, device="meta"), inner):
                parser.error(f"--shapes {','.join(map(str, shape))}: the {inner} kernels do not take this K, f "
                             f"(ttt_kernels.block_shapes_fit)")
    torch.set_float32_matmul_precision("high")
    print(f"device: {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU, Triton interpreter'}\n")
    print("| inner | B, H, n, K, f | warps | forward (us) | backward (us) | max relative error vs PyTorch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for inner in args.inner:
        for shape in shapes:
            inputs = scan_inputs(inner, *shape, seed=sum(shape))
            expected = results(inner, inputs, triton=False)
            warps = args.warps or ([2, 4, 8] if DEVICE == "cuda" else [getattr(ttt_kernels, SCANS[inner][2])])
            rows = [("PyTorch", False)] + [(warp, True) for warp in warps]
            for label, triton in rows:
                if triton:
                    setattr(ttt_kernels, SCANS[inner][2], label)
                error = f"{relative_error(results(inner, inputs, triton=True), expected):.1e}" if triton else ""
                times = "| - | -"  # the interpreter's times say nothing about a GPU's
                if DEVICE == "cuda":
                    times = "".join(f"| {microseconds(fn)} " for fn in scan_steps(inner, inputs, triton)[:2])
                print(f"| {inner} | {','.join(map(str, shape))} | {label} {times} | {error} |", flush=True)


if __name__ == "__main__":
    main()
