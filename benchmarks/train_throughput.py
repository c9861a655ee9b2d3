r"""Training throughput and model FLOPs utilisation (MFU) of the compiled train step.

For each model it builds the trainer's own step (`twinflow_jax.train.loop.build` and
`compile_step`: EMA teacher, TwinFlow loss and gradient, clipping, AdamW) on a mesh of
all (or the given) devices, feeds it a synthetic batch, and reports
  steps/s, examples/s, network rows/s (rows through the network per step, from
  `losses.count_network_rows`, over the step time),
  MFU = model FLOPs per step / step time / peak FLOP/s of the devices,
where the model FLOPs of a step are `models.flops_per_forward` of one row times
(network rows + 2 x batch): the student's backward counts as two forwards. The peak is
measured in the same run: a large matmul in the compute dtype on every device (the best
of several repetitions), so MFU is relative to what this machine really does, not to a
datasheet. XLA's own FLOP count of the compiled step is printed beside the analytic one.

Models (`--models`, comma list):
  default     configs/default.py (the MNIST DiT, 16 x 16 x 1), its batch of 64;
  DiT-B/2     32 x 32 x 4 latents, 1000 classes, batch --batch (default 4);
  DiT-XL/2    32 x 32 x 4 latents, 1000 classes, batch --batch (default 4);
  any other DiT-*/p or MMDiT name is built the same way.

  python3 benchmarks/train_throughput.py [--models default,DiT-B/2,DiT-XL/2] [--batch 4] \
      [--dtype float32|bfloat16] [--attention auto] [--remat none] [--scan-blocks] \
      [--mesh -1,1,1] [--row-blocks 0] [--steps 5] [--json out.json]

`--row-blocks 0` (default) sets loss.row_blocks to the number of batch shards (1 on one
device), the choice for pods. Runs on CPU, GPU and TPU; on several processes run it on
every process (only process 0 prints).
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

from twinflow_jax import hostmem
from twinflow_jax import losses
from twinflow_jax import models
from twinflow_jax.train import config as config_lib
from twinflow_jax.train import loop
from twinflow_jax.train import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def measure_peak(dtype: str, n: int | None = None, reps: int = 5) -> dict:
  """Peak matmul FLOP/s of all devices: an [n, n] @ [n, n] product on each, best of reps."""
  devices = jax.devices()
  platform = devices[0].platform
  if n is None:
    n = 2048 if platform == "cpu" else 8192
  dt = jnp.dtype(dtype)
  mesh = jax.make_mesh((len(devices),), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("d"))
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(k1, (len(devices), n, n), dt), sharding)
  b = jax.device_put(jax.random.normal(k2, (len(devices), n, n), dt), sharding)
  inner = 1 if platform == "cpu" else 20    # fill the launch overhead on accelerators

  @jax.jit
  def matmuls(a, b):
    def body(_, acc):
      return acc + jnp.einsum("dij,djk->dik", a, b, preferred_element_type=dt)
    return jax.lax.fori_loop(0, inner, body, jnp.zeros_like(a))

  jax.block_until_ready(matmuls(a, b))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(matmuls(a, b))
    best = min(best, time.perf_counter() - t0)
  flops = 2.0 * n**3 * inner * len(devices)
  return {"peak_flops": flops / best, "peak_matmul_n": n, "peak_dtype": dtype,
          "devices": len(devices), "platform": platform,
          "device_kind": devices[0].device_kind}


def model_config(name: str, args) -> tuple[object, int]:
  """The experiment config of one benchmark model and its batch size."""
  if name == "default":
    spec = importlib.util.spec_from_file_location("default", ROOT / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    batch = args.default_batch or c.train.global_batch_size
    c.model.dtype = args.dtype
  else:
    c = config_lib.base_config()
    c.model = {"name": name, "in_channels": 4, "input_size": 32, "num_classes": 1000,
               "dtype": args.dtype}
    c.data.source = "arrayrecord_latents"
    c.data.paths = "/nonexistent/latents.array_record"   # only the shapes are read
    c.data.latent_shape = (32, 32, 4)
    c.data.num_classes = 1000
    c.loss.enhanced_ratio = 0.8
    batch = args.batch
  if args.attention:
    c.model.attention = args.attention
  if args.remat:
    c.model.remat = args.remat
  if args.scan_blocks:
    c.model.scan_blocks = True
  c.train.global_batch_size = batch
  c.train.compilation_cache_dir = ""
  data, fsdp, tensor = (int(v) for v in args.mesh.split(","))
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c, batch


def synthetic_batch(setup) -> dict:
  rng = np.random.default_rng(0)
  out = {}
  for k, s in setup.batch_struct.items():
    if np.issubdtype(s.dtype, np.integer):
      v = rng.integers(0, max(setup.data_spec.num_classes, 1), s.shape).astype(s.dtype)
    elif s.dtype == np.bool_:
      v = np.ones(s.shape, bool)
    else:
      v = rng.standard_normal(s.shape).astype(s.dtype)
    out[k] = jax.make_array_from_callback(s.shape, setup.batch_shardings[k],
                                          lambda idx, v=v: v[idx])
  return out


def bench_model(name: str, args, peak: dict) -> dict:
  c, batch = model_config(name, args)
  mesh = mesh_lib.create_mesh(c.mesh)
  shards = mesh_lib.batch_shards(mesh)
  c.loss.row_blocks = args.row_blocks or shards
  t0 = time.perf_counter()
  setup = loop.build(c)
  compiled = loop.compile_step(setup)
  compile_s = time.perf_counter() - t0
  state = loop.init_state(setup, 0)
  batch_arrays = synthetic_batch(setup)
  for _ in range(args.warmup):
    state, m = compiled(state, batch_arrays)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch_arrays)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)

  tf_config = config_lib.tf_config(c)
  rows = losses.count_network_rows(batch, tf_config)
  h, w = setup.data_spec.x_shape[:2]
  fwd = models.flops_per_forward(c.model.to_dict(), 1, (h, w))
  model_flops = fwd * (rows["ours"] + 2 * batch)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) * (mesh.size if cost else 0) if cost and "flops" in cost \
      else None
  mem = compiled.memory_analysis()
  return {
      "model": name, "model_name": c.model.name, "batch": batch, "dtype": args.dtype,
      "attention": c.model.get("attention", "auto"), "remat": c.model.get("remat", "none"),
      "scan_blocks": bool(c.model.get("scan_blocks", False)),
      "mesh": dict(mesh.shape), "row_blocks": c.loss.row_blocks,
      "compile_s": compile_s, "step_s": step_s, "step_s_min": min(times),
      "steps_per_s": 1 / step_s, "examples_per_s": batch / step_s,
      "network_rows_per_step": rows["ours"], "network_rows_per_s": rows["ours"] / step_s,
      "model_flops_per_step": model_flops, "xla_flops_per_step": xla_flops,
      "achieved_flops": model_flops / step_s, "mfu": model_flops / step_s / peak["peak_flops"],
      "temp_mib_per_device": mem.temp_size_in_bytes / 2**20 if mem is not None else None,
      "loss": float(m["loss"]),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", default="default,DiT-B/2,DiT-XL/2")
  ap.add_argument("--batch", type=int, default=4, help="global batch of the latent models")
  ap.add_argument("--default-batch", type=int, default=0,
                  help="batch of the 'default' model (0: its config's 64)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--attention", default="", help="model attention impl (default: config's)")
  ap.add_argument("--remat", default="", help="model remat policy (default: config's)")
  ap.add_argument("--scan-blocks", action="store_true",
                  help="model.scan_blocks: one lax.scan over the DiT blocks (fast compile)")
  ap.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor (one may be -1)")
  ap.add_argument("--row-blocks", type=int, default=0,
                  help="loss.row_blocks; 0 = the number of batch shards")
  ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--peak-n", type=int, default=0, help="side of the peak matmul (0: auto)")
  ap.add_argument("--json", default=None, help="write the records here as JSON")
  args = ap.parse_args(argv)
  main_process = jax.process_index() == 0

  peak = measure_peak(args.dtype, args.peak_n or None)
  if main_process:
    print(f"{peak['devices']} x {peak['device_kind']} ({peak['platform']}): measured peak "
          f"{peak['peak_flops'] / 1e12:.3f} TFLOP/s ({args.dtype} {peak['peak_matmul_n']}^3 "
          "matmul on every device)", flush=True)
  records = []
  for name in [m for m in args.models.split(",") if m]:
    rec = bench_model(name, args, peak)
    rec.update(peak)
    records.append(rec)
    if main_process:
      xla = (f", XLA counts {rec['xla_flops_per_step'] / 1e12:.3f}"
             if rec["xla_flops_per_step"] else "")
      print(f"{name:9s} batch {rec['batch']:4d} {rec['dtype']}: {rec['steps_per_s']:.3f} steps/s, "
            f"{rec['examples_per_s']:.1f} examples/s, {rec['network_rows_per_s']:.1f} rows/s, "
            f"MFU {100 * rec['mfu']:.1f}% ({rec['model_flops_per_step'] / 1e12:.3f} TFLOP/step"
            f"{xla}; compile {rec['compile_s']:.1f}s)", flush=True)
  if main_process:
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    out = {"records": records, "jax": jax.__version__, "load_average": load,
           "resident_malloc": hostmem.resident_malloc_active()}
    if args.json:
      pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
  return records


if __name__ == "__main__":
  hostmem.reexec_with_resident_malloc()   # as twinflow_jax.main runs
  main()
