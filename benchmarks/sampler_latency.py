r"""Sampling speed: images/s of the unified sampler at 1, 2 and 4 NFE and the 30-step ODE.

For each model and batch size it jit-compiles `twinflow_jax.sampling.sample` (the UCGM
sampler: presets `1nfe`, `2nfe`, `4nfe` and `multi30`, the flow ODE with 30 network
calls) with freshly initialised weights (speed does not depend on the values) and reports
the median latency of a whole batch and images/s after one warm-up call.

Models (`--models`, comma list): `default` (configs/default.py's MNIST DiT, 16 x 16 x 1,
10 classes) or a DiT/MMDiT name, built for 32 x 32 x 4 latents and 1000 classes (MMDiT:
77 text tokens of width 4096 and a 2048 pooled vector).

  python3 benchmarks/sampler_latency.py [--models default,DiT-B/2] [--batches 1,64] \
      [--presets 1nfe,2nfe,4nfe,multi30] [--dtype float32] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax import hostmem
from twinflow_jax import models
from twinflow_jax import sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]


def model_and_inputs(name: str, dtype: str, attention: str):
  """(model config dict, example shape, cond builder)."""
  if name == "default":
    spec = importlib.util.spec_from_file_location("default", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = dict(module.get_config().model.to_dict())
    shape = (cfg["input_size"], cfg["input_size"], cfg["in_channels"])
  else:
    cfg = {"name": name, "in_channels": 4, "input_size": 32}
    if name.startswith("DiT"):
      cfg["num_classes"] = 1000
    shape = (32, 32, 4)
  cfg["dtype"] = dtype
  if attention:
    cfg["attention"] = attention
  resolved = models.resolve_config(cfg)

  def cond(b):
    if isinstance(resolved, models.DiTConfig):
      return jnp.arange(b, dtype=jnp.int32) % resolved.num_classes
    return {"txt": jnp.zeros((b, 77, resolved.txt_dim), jnp.float32),
            "txt_mask": jnp.ones((b, 77), bool),
            "pooled": jnp.zeros((b, resolved.pooled_dim), jnp.float32)}
  return cfg, shape, cond


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="default,DiT-B/2")
  ap.add_argument("--batches", default="1,64", help="comma list of batch sizes")
  ap.add_argument("--presets", default="1nfe,2nfe,4nfe,multi30")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--attention", default="", help="model attention impl (default: config's)")
  ap.add_argument("--reps", type=int, default=3, help="timed calls (median reported)")
  ap.add_argument("--json", default=None, help="write the records here as JSON")
  args = ap.parse_args(argv)

  records = []
  for name in [m for m in args.models.split(",") if m]:
    cfg, shape, cond = model_and_inputs(name, args.dtype, args.attention)
    graphdef, params, rest = models.split_model(models.create_model(cfg, rngs=nnx.Rngs(0)))
    apply_fn = models.as_apply_fn(graphdef, rest)
    for b in [int(v) for v in args.batches.split(",") if v]:
      noise = jax.random.normal(jax.random.key(1), (b, *shape), jnp.float32)
      c = cond(b)
      for preset in [p for p in args.presets.split(",") if p]:
        key = jax.random.key(2)
        t0 = time.perf_counter()
        jax.block_until_ready(sampling.sample(apply_fn, params, noise, c, preset, key))
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(sampling.sample(apply_fn, params, noise, c, preset, key))
          times.append(time.perf_counter() - t0)
        lat = statistics.median(times)
        rec = {"model": name, "batch": b, "preset": preset,
               "nfe": sampling.get_config(preset).steps, "dtype": args.dtype,
               "latency_s": lat, "images_per_s": b / lat, "first_call_s": first,
               "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform}
        records.append(rec)
        print(f"{name:9s} batch {b:4d} {preset:8s} ({rec['nfe']:2d} NFE): "
              f"{1e3 * lat:9.1f} ms/batch, {rec['images_per_s']:9.2f} images/s "
              f"(first call with compile {first:.1f}s)", flush=True)
  load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
  out = {"records": records, "jax": jax.__version__, "load_average": load,
         "resident_malloc": hostmem.resident_malloc_active()}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
  return records


if __name__ == "__main__":
  hostmem.reexec_with_resident_malloc()   # as twinflow_jax.main runs
  main()
