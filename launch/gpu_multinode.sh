#!/usr/bin/env bash
# Multi-node GPUs without a scheduler JAX detects (plain ssh, containers, Kubernetes): run
# this on every node with the same COORDINATOR and NUM_PROCESSES and its own PROCESS_ID.
# The flags hand them to jax.distributed.initialize(); one process per node drives its GPUs.
#
# Expects: the package installed (`pip install -e . "jax[cuda12]"`) on every node; node 0
# reachable at COORDINATOR (host:port, a free port); WORKDIR on a filesystem all nodes share.
#
#   # on node i of 4 (i = 0..3):
#   COORDINATOR=node0:12345 NUM_PROCESSES=4 PROCESS_ID=$i WORKDIR=/shared/runs/in256 \
#     CONFIG=configs/imagenet256_sit_xl2.py:/shared/ckpt/sit_xl2 launch/gpu_multinode.sh \
#     --config.data.paths='/shared/in256_latents/*.array_record'
#   DRY_RUN=1 launch/gpu_multinode.sh    # print the command, run nothing
set -euo pipefail

# ---- parameters (environment variables; extra arguments go to the trainer) ----
COORDINATOR="${COORDINATOR:-localhost:12345}"       # host:port of process 0
NUM_PROCESSES="${NUM_PROCESSES:-1}"                 # one per node
PROCESS_ID="${PROCESS_ID:-0}"                       # this node's index in [0, NUM_PROCESSES)
CONFIG="${CONFIG:-configs/imagenet256_sit_xl2.py}"  # a config of configs/ (FILE or FILE:ARG)
WORKDIR="${WORKDIR:-$HOME/runs/twinflow}"           # shared by all nodes
CACHE="${CACHE:-$WORKDIR/jax_cache}"                # persistent compilation cache
DRY_RUN="${DRY_RUN:-0}"                             # 1: print the command, run nothing
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# -------------------------------------------------------------------------------

run() {  # runs a command, or prints it shell-quoted with DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

cd "$(dirname "$0")/.."
run python3 -m twinflow_jax.main --distributed=on --coordinator_address="$COORDINATOR" \
  --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" --config="$CONFIG" \
  --workdir="$WORKDIR" --config.train.compilation_cache_dir="$CACHE" "$@"
