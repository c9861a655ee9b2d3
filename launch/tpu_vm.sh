#!/usr/bin/env bash
# One Cloud TPU VM (a single host: v4-8, v5litepod-8, v6e-8, ...). Run this ON the VM, in a
# checkout of this repository: one process drives all local chips, no jax.distributed.
#
# Expects: Python >= 3.11 on the VM; SETUP=1 installs the package and jax[tpu] first.
# WORKDIR may be local or gs:// (checkpoints, metrics.jsonl, samples/, config.json).
#
#   WORKDIR=gs://my-bucket/runs/cifar launch/tpu_vm.sh --config.data.data_dir=gs://my-bucket/tfds
#   DRY_RUN=1 launch/tpu_vm.sh          # print the commands, run nothing
#
# Re-running the same line resumes from the newest checkpoint in WORKDIR.
set -euo pipefail

# ---- parameters (environment variables; extra arguments go to the trainer) ----
CONFIG="${CONFIG:-configs/cifar10_dit.py}"   # a config of configs/ (FILE or FILE:ARG)
WORKDIR="${WORKDIR:-$HOME/runs/twinflow}"    # run directory (resumed if it holds a run)
CACHE="${CACHE:-$WORKDIR/jax_cache}"         # persistent compilation cache across restarts
SETUP="${SETUP:-0}"                          # 1: pip install -e . "jax[tpu]" first
DRY_RUN="${DRY_RUN:-0}"                      # 1: print each command instead of running it
# -------------------------------------------------------------------------------

run() {  # runs a command, or prints it shell-quoted with DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

cd "$(dirname "$0")/.."
if [[ "$SETUP" == 1 ]]; then
  run python3 -m pip install --quiet -U "jax[tpu]" -e .
fi
run python3 -m twinflow_jax.main --distributed=off --config="$CONFIG" --workdir="$WORKDIR" \
  --config.train.compilation_cache_dir="$CACHE" "$@"
