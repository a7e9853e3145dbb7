#!/usr/bin/env bash
# The paper's 125m recipe on C4 (see scripts/launch.py for the table). Usage:
#   scripts/train_125m_c4.sh [--layer linear|mlp] [--num_gpus N] [--dry-run] [train_ttt.py flags ...]
exec python3 "$(dirname "$0")/launch.py" 125m "$@"
