"""train_ttt.py with GPU-oriented defaults: bf16 autocast, TF32 matmuls, fused AdamW, torch.compile, batches
prepared ahead in pinned memory, and MFU and GPU memory in the logs. Every flag of train_ttt.py works here and
overrides these defaults (e.g. --no-torch_compile, --mixed_precision no). Without a CUDA GPU it says so and
runs on the CPU with the CPU defaults of train_ttt.py.

    accelerate launch --config_file accelerate_config.yaml --num_processes 8 train_gpu_optimized.py \\
        --model_size 125m --dataset_name allenai/c4 --dataset_config en --seq_length 2048 ...
"""

import sys

import torch

import train_ttt

GPU_DEFAULTS = dict(mixed_precision="bf16", tf32=True, torch_compile=True, data_prefetch=4, pin_memory=True,
                    logging_steps=10)


def build_parser():
    parser = train_ttt.build_parser()
    parser.description = __doc__
    if torch.cuda.is_available():
        parser.set_defaults(**GPU_DEFAULTS)
    return parser


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("train_gpu_optimized.py: no CUDA GPU found; running on the CPU with train_ttt.py's CPU defaults",
              file=sys.stderr)
    train_ttt.main(parser=build_parser())
