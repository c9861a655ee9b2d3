#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (e.g. v5p-64, v4-32): the same command runs on every
# worker, each one process driving its local chips; JAX's coordination service connects
# them (--distributed=on) and Orbax writes one checkpoint from all of them.
#
# Usage:
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/in256 \
#     launch/tpu_pod.sh configs/imagenet256_sit_xl2.py:/ckpt/sit_xl2 \
#     --config.data.paths='gs://my-bucket/in256_latents/*.arrayrecord'
#
# Re-running the same line after a preemption resumes from the newest checkpoint in
# WORKDIR. On a preemption notice each worker gets SIGTERM; JAX's preemption sync point
# makes all workers stop at the same step and save.
# Multi-slice (several slices over DCN): create them as one queued resource and add
# --config.mesh.dcn_data=<number of slices> (batch split across slices, FSDP inside).
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
: "${WORKDIR:?set WORKDIR, e.g. gs://bucket/run (must be shared by all workers)}"
CONFIG="${1:?usage: launch/tpu_pod.sh CONFIG [--config.x=y ...]}"
shift
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR="${REMOTE_DIR:-twinflow_jax}"   # relative to the workers' home directory
# Persistent compilation cache: a resumed job skips most of the compile.
CACHE="${CACHE:-$WORKDIR/jax_cache}"

# Quote the extra flags for the remote shell.
EXTRA=""
for a in "$@"; do EXTRA+=" $(printf '%q' "$a")"; done

# 1. Copy this checkout to every worker (code and configs must be identical everywhere).
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$REPO_ROOT" --exclude=.git --exclude='workdir*' -czf /tmp/twinflow_jax_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/twinflow_jax_src.tgz "$TPU:twinflow_jax_src.tgz" \
  --zone="$ZONE" $PROJECT_FLAG --worker=all

# 2. Install and run the same command on every worker.
read -r -d '' REMOTE <<SCRIPT || true
set -euo pipefail
mkdir -p "$REMOTE_DIR" && tar -C "$REMOTE_DIR" -xzf twinflow_jax_src.tgz && cd "$REMOTE_DIR"
python3 -m pip install --quiet -U "jax[tpu]" -e .
python3 -m twinflow_jax.main --distributed=on --config=$(printf '%q' "$CONFIG") \
  --workdir=$(printf '%q' "$WORKDIR") \
  --config.train.compilation_cache_dir=$(printf '%q' "$CACHE")$EXTRA
SCRIPT

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$REMOTE"
