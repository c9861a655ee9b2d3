#!/usr/bin/env bash
# A Cloud TPU VM pod slice (several hosts: v4-32, v5p-64, v5litepod-32, ...), driven from
# your workstation: copies this checkout to every worker, installs it, and starts the same
# command on all of them through `gcloud compute tpus tpu-vm ssh --worker=all`. Each worker
# is one process driving its local chips; JAX's coordination service connects them
# (--distributed=on) and Orbax writes one checkpoint from all of them.
#
# Expects: gcloud authenticated for PROJECT; the slice TPU exists in ZONE (created with a
# TPU VM runtime that has Python >= 3.11); WORKDIR on storage every worker reaches (gs://).
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/in256 \
#     CONFIG=configs/imagenet256_sit_xl2.py:gs://my-bucket/ckpt/sit_xl2 launch/tpu_pod.sh \
#     --config.data.paths='gs://my-bucket/in256_latents/*.array_record'
#   DRY_RUN=1 launch/tpu_pod.sh         # print the commands, run nothing
#
# Re-running the same line after a preemption resumes from the newest checkpoint. On a
# preemption notice each worker gets SIGTERM; JAX's preemption sync point makes all
# workers stop at the same step and save. Several slices over DCN: launch/tpu_multislice.sh.
set -euo pipefail

# ---- parameters (environment variables; extra arguments go to the trainer) ----
TPU="${TPU:-my-tpu-slice}"                          # TPU VM (slice) name
ZONE="${ZONE:-us-central2-b}"                       # its zone
PROJECT="${PROJECT:-}"                              # GCP project (default: gcloud's)
CONFIG="${CONFIG:-configs/imagenet256_sit_xl2.py}"  # a config of configs/ (FILE or FILE:ARG)
WORKDIR="${WORKDIR:-gs://my-bucket/runs/twinflow}"  # shared by all workers
CACHE="${CACHE:-$WORKDIR/jax_cache}"                # persistent compilation cache
REMOTE_DIR="${REMOTE_DIR:-twinflow_jax}"            # checkout on the workers, under ~
DRY_RUN="${DRY_RUN:-0}"                             # 1: print each command, run nothing
# -------------------------------------------------------------------------------

run() {  # runs a command, or prints it shell-quoted with DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

GCLOUD_FLAGS=(--zone="$ZONE" --worker=all)
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
TRAIN=(python3 -m twinflow_jax.main --distributed=on --config="$CONFIG" --workdir="$WORKDIR"
       --config.train.compilation_cache_dir="$CACHE" "$@")

# 1. The same code and configs on every worker.
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/twinflow_jax_src.tgz"
run tar -C "$REPO_ROOT" --exclude=.git -czf "$TARBALL" .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:twinflow_jax_src.tgz" "${GCLOUD_FLAGS[@]}"

# 2. Install and start the trainer on every worker (the trainer command is the last line).
REMOTE="set -euo pipefail
mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -C $(printf '%q' "$REMOTE_DIR") -xzf twinflow_jax_src.tgz
cd $(printf '%q' "$REMOTE_DIR") && python3 -m pip install --quiet -U 'jax[tpu]' -e .
$(printf '%q ' "${TRAIN[@]}")"
run gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --command="$REMOTE"
