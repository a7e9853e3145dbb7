"""What each Triton kernel of ttt_kernels.py costs a GPU's streaming multiprocessor, compiled for a chosen
architecture without needing one: registers per thread, bytes spilled to the stack per thread, and shared memory
per program. Kernels that spill or need more shared memory than the GPU has per block run slowly or not at all;
this is how ttt_kernels.py's warps, pipelining stages and operation order were chosen, and where its figures come
from.

    python bench/kernel_resources.py                      # sm_90 (H100), the warps each kernel launches with
    python bench/kernel_resources.py --arch 80 --warps 4 8
    python bench/kernel_resources.py --num_stages 3       # with Triton's default software pipelining
    python bench/kernel_resources.py --head_dim 16 32 64  # per head dim (ttt_kernels.MLP_SHARED_MEMORY)

Compiles as the launches do (K=16, TF32 products, the kernels' num_stages unless --num_stages), except that
integer arguments are not specialised on their values, which changes little. Needs Triton's bundled cuobjdump.
"""

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ttt_kernels

# kernel, the ttt_kernels attributes of its launch's warps and stages (None: Triton's default)
KERNELS = [(ttt_kernels._scan_forward, "NUM_WARPS", None), (ttt_kernels._scan_backward_carry, "NUM_WARPS", None),
           (ttt_kernels._scan_backward_inputs, "NUM_WARPS", None),
           (ttt_kernels._mlp_scan_forward, "MLP_NUM_WARPS", "MLP_NUM_STAGES"),
           (ttt_kernels._mlp_walk_back, "MLP_NUM_WARPS", "MLP_NUM_STAGES")]


def compile_for(kernel, arch, head_dim, num_warps, num_stages):
    parameters = inspect.signature(kernel.fn).parameters
    constants = {"K": 16, "F": head_dim, "D": 4 * head_dim, "PRECISION": "tf32", "KEEP_STARTS": True}
    constants = {name: value for name, value in constants.items() if name in parameters}
    signature = {name: "constexpr" if name in constants else "*fp32" if name.endswith("_ptr")
                 else "fp32" if name == "eps" else "i32" for name in parameters}
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                          target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled):
    """(registers, stack bytes) per thread, from cuobjdump's report on the compiled binary."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(compiled.asm["cubin"])
        binary.flush()
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", binary.name], capture_output=True,
                                text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", report).groups()
    return int(registers), int(stack)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 A100, 90 H100, 100 B200)")
    parser.add_argument("--warps", nargs="+", type=int, choices=[1, 2, 4, 8, 16],
                        help="warps per program (default: each kernel's own)")
    parser.add_argument("--num_stages", type=int, help="software pipelining stages (default: each launch's own)")
    parser.add_argument("--head_dim", nargs="+", type=int, choices=[16, 32, 64], default=[64], help="f")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        parser.error("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")
    print(f"sm_{args.arch}, Triton {triton.__version__}, K=16\n")
    print("| kernel | f | warps | stages | registers / thread | spilled (stack) bytes / thread "
          "| shared memory (bytes) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kernel, warps_name, stages_name in KERNELS:
        stages = args.num_stages or (getattr(ttt_kernels, stages_name) if stages_name else None)
        for head_dim in args.head_dim:
            for warps in args.warps or [getattr(ttt_kernels, warps_name)]:
                compiled = compile_for(kernel, args.arch, head_dim, warps, stages)
                registers, stack = resources(compiled)
                print(f"| {kernel.fn.__name__} | {head_dim} | {warps} | {stages or 'default'} | {registers} | "
                      f"{stack:,} | {compiled.metadata.shared:,} |", flush=True)


if __name__ == "__main__":
    main()
