#!/usr/bin/env bash
# Interactive launcher: asks for the size, model (TTT's inner model or a baseline), dataset, GPU count and whether to resume, then runs
# scripts/train_<size>_c4.sh. Answers can come on standard input, one per line (an empty line takes the default):
#   printf '125m\nmlp\n\n8\ny\n' | scripts/launch_training.sh --dry-run
# Arguments to this script (e.g. --dry-run, or trainer flags) are passed on to the launcher.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

ask() {  # ask VAR "question" default allowed...
  local var=$1 question=$2 default=$3 answer
  shift 3
  while true; do
    printf '%s [%s]: ' "$question" "$default" >&2
    if ! IFS= read -r answer; then
      answer=""  # no more input: take the default
    fi
    answer=${answer:-$default}
    if [ "$#" -eq 0 ] || [[ " $* " == *" $answer "* ]]; then
      printf -v "$var" '%s' "$answer"
      return
    fi
    echo "  '$answer' is not one of: $*" >&2
    [ -t 0 ] || exit 2  # answers from a pipe or file: a wrong one is an error, not a retry
  done
}

if [ ! -t 0 ] && [[ " $* " != *" --dry-run "* ]]; then
  # without a terminal nobody answers: Enter through every question would start the 125m C4 run, on any machine
  echo "launch_training.sh: error: this launcher asks questions and needs a terminal; without one, run a recipe" \
       "directly (scripts/train_125m_c4.sh ..., scripts/train_e2e.sh SIZE ...), or pipe answers with --dry-run to" \
       "see the command" >&2
  exit 2
fi
detected=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
ask size "Model size (125m, 350m, 760m, 1b)" 125m 125m 350m 760m 1b
ask layer "Model (linear = TTT-Linear, mlp = TTT-MLP, or a baseline: transformer, mamba2, gated_deltanet)" linear \
  linear mlp transformer mamba2 gated_deltanet
ask dataset "Dataset (Hub id or local path; empty = allenai/c4 en)" allenai/c4
ask gpus "Number of GPUs on this node" "${detected:-0}"
ask resume "Resume from the latest checkpoint? (y/n)" n y n

if [ "$gpus" = 0 ] && [[ " $* " != *" --dry-run "* ]]; then
  ask cpu "No GPU: the $size recipe would take weeks on this CPU. Run it here anyway? (y/n)" n y n
  if [ "$cpu" != y ]; then
    echo "launch_training.sh: not started (--dry-run prints the command; train_ttt.py trains small models on a CPU)" >&2
    exit 1
  fi
fi
if [ "$layer" = linear ] || [ "$layer" = mlp ]; then
  args=(--layer "$layer" --num_gpus "$gpus")
else
  args=(--model_type "$layer" --num_gpus "$gpus")
fi
if [ "$dataset" != "allenai/c4" ]; then
  args+=(--dataset_name "$dataset" --dataset_config "")
fi
if [ "$resume" = y ]; then
  args+=(--resume_from_checkpoint latest)
fi
exec "$here/train_${size}_c4.sh" "${args[@]}" "$@"
