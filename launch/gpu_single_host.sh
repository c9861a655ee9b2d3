#!/usr/bin/env bash
# One machine with 1-8 GPUs: a single process drives all local GPUs (the mesh spans them;
# --config.mesh.* chooses data / FSDP / tensor parallelism).
#
# Expects: `pip install -e . "jax[cuda12]"` in the active Python (>= 3.11).
#
#   WORKDIR=/data/runs/cifar launch/gpu_single_host.sh --config.data.data_dir=/data/tfds
#   DRY_RUN=1 launch/gpu_single_host.sh  # print the command, run nothing
#
# Re-run the same line to resume. `kill -TERM <pid>` (or a scheduler's SIGTERM) makes the
# run save a checkpoint and exit cleanly.
set -euo pipefail

# ---- parameters (environment variables; extra arguments go to the trainer) ----
CONFIG="${CONFIG:-configs/cifar10_dit.py}"   # a config of configs/ (FILE or FILE:ARG)
WORKDIR="${WORKDIR:-$HOME/runs/twinflow}"    # run directory (resumed if it holds a run)
CACHE="${CACHE:-$WORKDIR/jax_cache}"         # persistent compilation cache
DRY_RUN="${DRY_RUN:-0}"                      # 1: print the command instead of running it
# Let XLA take most of the GPU memory up front (its default 75% is conservative).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# -------------------------------------------------------------------------------

run() {  # runs a command, or prints it shell-quoted with DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

cd "$(dirname "$0")/.."
run python3 -m twinflow_jax.main --distributed=off --config="$CONFIG" --workdir="$WORKDIR" \
  --config.train.compilation_cache_dir="$CACHE" "$@"
