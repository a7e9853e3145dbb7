#!/usr/bin/env bash
# TTT-E2E's official recipes (see scripts/launch.py for the table). Usage:
#   scripts/train_e2e.sh SIZE [--stage pretrain|extend] [--variant e2e|fa] [--num_gpus N] [--dry-run] [train_ttt.py flags ...]
# SIZE: 125m, 350m, 760m, 1b, 3b. Extension: --stage extend --init_from PRETRAINED/final_model --dataset_name BOOKS
exec python3 "$(dirname "$0")/launch.py" "$1" --family e2e "${@:2}"
