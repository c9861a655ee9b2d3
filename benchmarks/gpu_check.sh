#!/usr/bin/env bash
# One short GPU check (a few minutes of GPU time), most important first:
#   1. DiT-XL/2 training throughput and MFU in bfloat16 with cuDNN attention;
#   2. the official PyTorch TwinFlow step (bf16 autocast, as its training scripts run it)
#      beside ours on the same GPU: seconds per step, MFU and peak device memory of both;
#   3. the default MNIST config and DiT-B/2, and the sampler's latency;
#   4. DiT-XL/2 with its blocks as one lax.scan (model.scan_blocks): compile time and speed.
# About 8 minutes on one H200 (docs/performance.md has the results).
#
#   OFFICIAL_REPO=/path/to/TwinFlow bash benchmarks/gpu_check.sh
#
# The machine must already have this package's dependencies and jax with CUDA (e.g.
# pip install -e . "jax[cuda12]"); NO_INSTALL=1 skips the `pip install -e .` here. The
# side-by-side part needs torch with CUDA and a checkout of inclusionAI/TwinFlow.
# Settings: BATCH (default 64), STEPS (default 5); results go to ${OUT:-/tmp}/gpu_*.json,
# one log line per result on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
BATCH=${BATCH:-64}
STEPS=${STEPS:-5}
[ -n "${NO_INSTALL:-}" ] || python3 -m pip install -q -e . || exit 1
python3 - <<'PY' || exit 1
import jax, sys
if jax.default_backend() != "gpu":
  sys.exit(f"gpu_check: jax sees no GPU ({jax.devices()}); install jax with CUDA, "
           "e.g. pip install 'jax[cuda12]'")
print("jax", jax.__version__, jax.devices())
PY
python3 -c "import flax, optax, orbax.checkpoint as o, grain; print('flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__)"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# The JAX and PyTorch workers of part 2 share the GPU: no up-front grab of 75% of it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "1. ours: DiT-XL/2 bf16, cuDNN attention, batch $BATCH"
ATTN=cudnn
xl() {   # DiT-XL/2 throughput with attention $1, then any extra flags
  local attn=$1; shift
  timeout 240 python3 benchmarks/train_throughput.py --models DiT-XL/2 --batch "$BATCH" \
      --dtype bfloat16 --attention "$attn" --steps "$STEPS" --warmup 2 "$@" | grep -v '^{'
}
if ! xl cudnn --json "$OUT/gpu_throughput.json"; then
  ATTN=auto
  echo "cuDNN attention failed: again with jax.nn's own choice"
  xl auto --json "$OUT/gpu_throughput.json"
fi
PEAK=$(python3 -c "import json; print(json.load(open('$OUT/gpu_throughput.json'))['records'][0]['peak_flops'])" 2>/dev/null || echo 0)

stage "2. side by side with the official step"
if [ -n "${OFFICIAL_REPO:-}" ]; then
  timeout 300 python3 benchmarks/vs_official.py --official-repo "$OFFICIAL_REPO" --device cuda \
      --what step --model DiT-XL/2 --batch "$BATCH" --dtype bfloat16 --rounds 2 --iters 3 \
      --no-memory --jax-model "{\"attention\": \"$ATTN\"}" \
      --peak-flops "$PEAK" --json "$OUT/gpu_vs_official.json"
else
  echo "OFFICIAL_REPO not set: skipped"
fi

stage "3. default config and DiT-B/2 (bf16), sampler latency"
timeout 150 python3 benchmarks/train_throughput.py --models default,DiT-B/2 --batch "$BATCH" \
    --dtype bfloat16 --scan-blocks --steps "$STEPS" --warmup 2 \
    --json "$OUT/gpu_throughput_small.json" | grep -v '^{'
timeout 90 python3 benchmarks/sampler_latency.py --models default --batches 1,256 \
    --dtype bfloat16 --reps 5 --json "$OUT/gpu_sampler.json" | grep -v '^{'

stage "4. DiT-XL/2 with scanned blocks (compile time, speed)"
xl "$ATTN" --scan-blocks --json "$OUT/gpu_throughput_scan.json"
stage "done"
