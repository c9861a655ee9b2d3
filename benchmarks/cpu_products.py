r"""Matrix-product rates of DiT-S/2's shapes, alone, in JAX or PyTorch, on all or some cores.

The TwinFlow step's time is mostly matrix products (73-83% of XLA's operations on CPU,
`op_profile.py`). This prints, for the shapes of DiT-S/2 at 16 rows (4096 tokens), the
rate of each kind alone: the MLP and projection products ([4096, 384] x [384, 1536] and
back) and the attention's batched ones ([16 x 6] pairs of [256, 64] x [64, 256] and
[256, 256] x [256, 64]), in float32 and in bfloat16 (JAX: a float32 result, as the model
asks on CPU; PyTorch: its bfloat16 result, accumulated in float32). Run it with each
interpreter to compare: a JAX release against another, or JAX against PyTorch on the same
cores.

  python3 benchmarks/cpu_products.py [--cores 1] [--dtype bfloat16] [--json out.json]
  /path/to/torch-python benchmarks/cpu_products.py --backend torch

`--cores N` restricts the process to its first N allowed cores before the backend starts
(XLA and PyTorch size their thread pools from that): the same rate on 1 core as on all
shows a product the runtime does not spread over cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

# (name, batch dims, m, k, n): out[batch, m, n] = a[batch, m, k] . b[batch, k, n]
SHAPES = (
    ("mlp in    [4096,384]x[384,1536]", (), 4096, 384, 1536),
    ("mlp out   [4096,1536]x[1536,384]", (), 4096, 1536, 384),
    ("qkv       [4096,384]x[384,1152]", (), 4096, 384, 1152),
    ("attn q.k  96x[256,64]x[64,256]", (16, 6), 256, 64, 256),
    ("attn p.v  96x[256,256]x[256,64]", (16, 6), 256, 256, 64),
)


def _restrict_cores(n: int) -> list[int]:
  allowed = sorted(os.sched_getaffinity(0))
  if n:
    if n > len(allowed):
      raise SystemExit(f"--cores {n}: only {len(allowed)} cores are allowed to this process")
    os.sched_setaffinity(0, allowed[:n])
  return sorted(os.sched_getaffinity(0))


def _time(fn, reps: int) -> float:
  fn()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _jax_products(dtype: str, reps: int):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  dt = jnp.dtype(dtype)
  for name, batch, m, k, n in SHAPES:
    a = jnp.asarray(rng.standard_normal((*batch, m, k)), dt)
    b = jnp.asarray(rng.standard_normal((*batch, k, n)), dt)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f = f.lower(a, b).compile()
    yield name, batch, m, k, n, _time(lambda: f(a, b).block_until_ready(), reps)


def _torch_products(dtype: str, reps: int):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  gen = torch.Generator().manual_seed(0)
  for name, batch, m, k, n in SHAPES:
    a = torch.randn(*batch, m, k, generator=gen).to(dt)
    b = torch.randn(*batch, k, n, generator=gen).to(dt)
    yield name, batch, m, k, n, _time(lambda: torch.matmul(a, b), reps)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  ap.add_argument("--backend", choices=("jax", "torch"), default="jax")
  ap.add_argument("--dtype", default="float32,bfloat16", help="comma list")
  ap.add_argument("--cores", type=int, default=0, help="use the first N cores (0 = all)")
  ap.add_argument("--reps", type=int, default=20, help="timed calls per product (best kept)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  dtypes = args.dtype.split(",")
  for dtype in dtypes:
    if dtype not in ("float32", "bfloat16"):
      raise SystemExit(f"--dtype {dtype!r}: give float32, bfloat16 or both, comma-separated")
  cores = _restrict_cores(args.cores)
  if args.backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    version, run = f"jax {jax.__version__}", _jax_products
  else:
    import torch  # pylint: disable=g-import-not-at-top
    version, run = f"torch {torch.__version__}", _torch_products
  print(f"{version}, Python {platform.python_version()}, {len(cores)} core(s) {cores}")
  rows = []
  for dtype in dtypes:
    for name, batch, m, k, n, sec in run(dtype, args.reps):
      gflops = 2.0 * math.prod(batch) * m * k * n / sec / 1e9
      rows.append({"dtype": dtype, "product": name, "batch": list(batch), "m": m, "k": k,
                   "n": n, "ms": sec * 1e3, "gflop_s": gflops})
      print(f"  {dtype:8s} {name:34s} {sec * 1e3:7.2f} ms {gflops:6.0f} GFLOP/s", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"backend": version, "python": platform.python_version(), "cores": cores,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
