#!/usr/bin/env bash
# Several TPU slices connected over the data-centre network (Multislice), created as one
# queued resource: every worker of every slice runs the same command through
# `gcloud compute tpus queued-resources ssh --node=all --worker=all`. JAX reads the
# MEGASCALE_* variables the TPU runtime sets and connects all processes (--distributed=on);
# the mesh puts data parallelism across slices (--config.mesh.dcn_data=NUM_SLICES) and
# FSDP / tensor parallelism inside each slice.
#
# Expects: a queued resource QR with NUM_SLICES slices (e.g. `gcloud compute tpus
# queued-resources create QR --node-count=NUM_SLICES --accelerator-type=v5p-64 ...`), ACTIVE;
# WORKDIR on GCS (the code travels through it, then the checkpoints go there).
#
#   QR=my-qr ZONE=us-east5-a NUM_SLICES=2 WORKDIR=gs://my-bucket/runs/in256 \
#     CONFIG=configs/imagenet256_sit_xl2.py:gs://my-bucket/ckpt/sit_xl2 \
#     launch/tpu_multislice.sh --config.data.paths='gs://my-bucket/in256_latents/*.array_record'
#   DRY_RUN=1 launch/tpu_multislice.sh  # print the commands, run nothing
set -euo pipefail

# ---- parameters (environment variables; extra arguments go to the trainer) ----
QR="${QR:-my-queued-resource}"                      # queued resource holding the slices
ZONE="${ZONE:-us-east5-a}"                          # its zone
PROJECT="${PROJECT:-}"                              # GCP project (default: gcloud's)
NUM_SLICES="${NUM_SLICES:-2}"                       # slices in QR (the DCN data axis)
CONFIG="${CONFIG:-configs/imagenet256_sit_xl2.py}"  # a config of configs/ (FILE or FILE:ARG)
WORKDIR="${WORKDIR:-gs://my-bucket/runs/twinflow}"  # shared by all workers (gs://)
CACHE="${CACHE:-$WORKDIR/jax_cache}"                # persistent compilation cache
REMOTE_DIR="${REMOTE_DIR:-twinflow_jax}"            # checkout on the workers, under ~
DRY_RUN="${DRY_RUN:-0}"                             # 1: print each command, run nothing
# -------------------------------------------------------------------------------

run() {  # runs a command, or prints it shell-quoted with DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi
TRAIN=(python3 -m twinflow_jax.main --distributed=on --config="$CONFIG" --workdir="$WORKDIR"
       --config.mesh.dcn_data="$NUM_SLICES" --config.train.compilation_cache_dir="$CACHE" "$@")

# 1. The code goes to every worker through the bucket.
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/twinflow_jax_src.tgz"
SRC="$WORKDIR/src/twinflow_jax_src.tgz"
run tar -C "$REPO_ROOT" --exclude=.git -czf "$TARBALL" .
run gcloud storage cp "$TARBALL" "$SRC"

# 2. Fetch, install and start the trainer on every worker of every slice (trainer last).
REMOTE="set -euo pipefail
gcloud storage cp $(printf '%q' "$SRC") twinflow_jax_src.tgz
mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -C $(printf '%q' "$REMOTE_DIR") -xzf twinflow_jax_src.tgz
cd $(printf '%q' "$REMOTE_DIR") && python3 -m pip install --quiet -U 'jax[tpu]' -e .
$(printf '%q ' "${TRAIN[@]}")"
run gcloud compute tpus queued-resources ssh "$QR" "${GCLOUD_FLAGS[@]}" --node=all --worker=all \
  --command="$REMOTE"
