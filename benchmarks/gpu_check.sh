#!/usr/bin/env bash
# One short GPU check (a few minutes of GPU time): DiT-XL/2 training throughput and MFU in
# bfloat16 with cuDNN attention, then the official PyTorch TwinFlow step (bf16 autocast, as
# its SD3 training script runs it) beside ours on the same GPU, with MFU for both.
#
#   OFFICIAL_REPO=/path/to/TwinFlow bash benchmarks/gpu_check.sh
#
# Installs only this package (pip install -e .); the machine must already have jax with
# CUDA (e.g. pip install "jax[cuda12]") and, for the side-by-side part, torch with CUDA.
# Settings: BATCH (default 32), STEPS (default 5); results go to ${OUT:-/tmp}/gpu_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
BATCH=${BATCH:-32}
STEPS=${STEPS:-5}
python3 -m pip install -q -e .
python3 - <<'PY'
import jax, sys
if jax.default_backend() != "gpu":
  sys.exit(f"gpu_check: jax sees no GPU ({jax.devices()}); install jax with CUDA, "
           "e.g. pip install 'jax[cuda12]'")
print("jax", jax.__version__, jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

# 1. Ours: the trainer's compiled step, peak measured by a bf16 matmul in the same run.
python3 benchmarks/train_throughput.py --models DiT-XL/2 --batch "$BATCH" --dtype bfloat16 \
    --attention cudnn --steps "$STEPS" --warmup 2 --json "$OUT/gpu_throughput.json"
PEAK=$(python3 -c "import json; print(json.load(open('$OUT/gpu_throughput.json'))['records'][0]['peak_flops'])")

# 2. Side by side with the official step (needs torch with CUDA and the official code).
if [ -n "${OFFICIAL_REPO:-}" ]; then
  python3 benchmarks/vs_official.py --official-repo "$OFFICIAL_REPO" --device cuda \
      --what step --model DiT-XL/2 --batch "$BATCH" --dtype bfloat16 --rounds 2 --iters 3 \
      --jax-model '{"attention": "cudnn"}' --peak-flops "$PEAK" --json "$OUT/gpu_vs_official.json"
else
  echo "OFFICIAL_REPO not set: skipped the side-by-side run against the official step"
fi
