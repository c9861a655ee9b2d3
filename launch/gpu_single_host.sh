#!/usr/bin/env bash
# Train on one machine with one or more GPUs: a single process drives all local GPUs
# (the mesh spans them; --config.mesh.* chooses data / FSDP / tensor parallelism).
#
# Usage:
#   pip install -e . "jax[cuda12]"
#   WORKDIR=/data/runs/cifar launch/gpu_single_host.sh configs/cifar10_dit.py \
#     --config.data.data_dir=/data/tfds
#
# Re-run the same line to resume. `kill -TERM <pid>` (or a scheduler's SIGTERM) makes
# the run save a checkpoint and exit cleanly.
set -euo pipefail

: "${WORKDIR:?set WORKDIR to the run directory}"
CONFIG="${1:?usage: launch/gpu_single_host.sh CONFIG [--config.x=y ...]}"
shift
# Let XLA take most of the GPU memory up front (the default 75% is conservative).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
exec python3 -m twinflow_jax.main --distributed=off --config="$CONFIG" \
  --workdir="$WORKDIR" --config.train.compilation_cache_dir="$WORKDIR/jax_cache" "$@"
