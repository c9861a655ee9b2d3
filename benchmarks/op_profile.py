r"""Where the time of one compiled DiT call goes, per XLA operation (CPU).

Traces one call of a compiled forward (`fwd`) or flow-matching forward + backward (`fm`,
as in `vs_official.py`) with `jax.profiler`, reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed) and sums the XLA CPU runtime's
per-operation events. Operations with the same shape signature are grouped: matrix
products by operand shapes and contraction (their GFLOP/s from the HLO shapes), other
fusions by their kind. A fusion holding products (XLA may put two independent
products, e.g. a layer's input and weight gradients, into one) counts as its products.

  python3 benchmarks/op_profile.py [--what fm] [--model DiT-S/2] [--batch 16] \
      [--attention auto] [--top 25]

Products XLA runs as asynchronous Eigen contractions (e.g. a weight gradient whose
operand is transposed) have events that cover only their launch: they show an impossible
rate (thousands of GFLOP/s) and their compute is counted in the operation that runs
beside them (DiT-S/2's MLP weight gradient inside its input gradient, which then looks
half as fast as it is).

The events cover the operations XLA's CPU runtime runs itself; time outside them (the
runtime's own scheduling, idle threads) shows as the gap between the events' span and the
call's wall time. On a 2-core machine the two runtime threads rarely overlap, so the sum of
events is close to the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax import models

_DEF = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def build(args):
  """The compiled call and its arguments."""
  cfg = {"name": args.model, "in_channels": args.channels, "input_size": args.size,
         "num_classes": 1000, "dtype": args.dtype}
  if args.attention:
    cfg["attention"] = args.attention
  graphdef, params, rest = models.split_model(models.create_model(cfg, rngs=nnx.Rngs(0)))
  apply_fn = models.as_apply_fn(graphdef, rest)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.size, args.size, args.channels)
  x, z = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
  t = jnp.asarray(rng.uniform(0, 1, args.batch), jnp.float32)
  y = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
  if args.what == "fwd":
    return jax.jit(lambda p, x, t, y: apply_fn(p, x, t, t, y)), (params, x, t, y)

  def loss(p, x, z, t, y):
    tb = t[:, None, None, None]
    return jnp.mean(jnp.square(apply_fn(p, tb * z + (1 - tb) * x, t, t, y) - (z - x)))
  return jax.jit(jax.value_and_grad(loss)), (params, x, z, t, y)


def _dims(shape_text: str) -> list[int]:
  m = _SHAPE.match(shape_text)
  return [int(v) for v in m.group(1).split(",") if v] if m else []


def _dot_signature(lines: list[str], shapes: dict[str, str]) -> tuple[str, float] | None:
  """'lhs x rhs -> out (contracting dims)' of the first dot in `lines`, FLOPs of all."""
  sigs, flops = [], 0.0
  for line in lines:
    if " dot(" not in line:
      continue
    out = line.split(" = ", 1)[1].split(" ", 1)[0]
    names = re.search(r"dot\(([^)]*)\)", line).group(1).replace("%", "").split(", ")
    lhs, rhs = (shapes.get(n.strip(), "?") for n in names)
    lc = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
    rc = re.search(r"rhs_contracting_dims=\{([\d,]*)\}", line).group(1)
    k = math.prod(_dims(lhs)[int(i)] for i in lc.split(",")) if _dims(lhs) else 0
    sigs.append(f"dot {lhs.split('{')[0]} x {rhs.split('{')[0]} -> {out.split('{')[0]}"
                f" (contract lhs {lc}, rhs {rc})")
    flops += 2.0 * math.prod(_dims(out)) * k
  if not sigs:
    return None
  more = f" + {len(sigs) - 1} more product(s) in the same fusion" if len(sigs) > 1 else ""
  return sigs[0] + more, flops


def group_ops(hlo: str, durations: dict[str, int]) -> list[tuple[str, float, int, float]]:
  """(signature, seconds, count, FLOPs) per group, most time first."""
  computations, current = {}, None
  shapes = {}
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      computations[current] = []
      continue
    m = _DEF.match(line)
    if m:
      shapes.setdefault(m.group(1), m.group(2))
      if current:
        computations[current].append(line)
  defs = {}
  for lines in computations.values():
    for line in lines:
      m = _DEF.match(line)
      if m:
        defs.setdefault(m.group(1), line)
  groups = collections.defaultdict(lambda: [0.0, 0, 0.0])
  for name, ns in durations.items():
    line = defs.get(name)
    if line is None:
      continue
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = computations.get(called.group(1), []) if called else [line]
    dot = _dot_signature(body, shapes)
    if dot:
      sig, flops = dot
    else:
      sig, flops = re.sub(r"\.\d+$", "", name) + " " + line.split(" = ", 1)[1].split(" ", 1)[0].split("{")[0], 0.0
    g = groups[sig]
    g[0] += ns * 1e-9
    g[1] += 1
    g[2] += flops
  return sorted(((k, *v) for k, v in groups.items()), key=lambda r: -r[1])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--what", default="fm", choices=("fwd", "fm"))
  ap.add_argument("--model", default="DiT-S/2")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--channels", type=int, default=4)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--attention", default="", help="model attention ('' = the default)")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  fn, fargs = build(args)
  compiled = fn.lower(*fargs).compile()
  jax.block_until_ready(compiled(*fargs))   # warm-up
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*fargs))
    wall = time.perf_counter() - t0
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(
        glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    durations = collections.Counter()
    for plane in data.planes:
      for line in plane.lines:
        for ev in line.events:
          durations[ev.name] += ev.duration_ns
  rows = group_ops(compiled.as_text(), durations)
  total = sum(r[1] for r in rows)
  print(f"{args.model}, batch {args.batch}, {args.what}: wall {wall:.3f} s, "
        f"operations {total:.3f} s in {sum(r[2] for r in rows)} events")
  print(f"{'s':>7} {'share':>6} {'n':>4} {'GFLOP/s':>8}  operation")
  for sig, sec, n, flops in rows[:args.top]:
    rate = f"{flops / sec / 1e9:8.0f}" if flops and sec else " " * 8
    print(f"{sec:7.3f} {sec / total:6.1%} {n:4d} {rate}  {sig}")
  dots = sum(r[1] for r in rows if r[0].startswith("dot"))
  print(f"matrix products {dots:.3f} s ({dots / total:.0%}), other operations "
        f"{total - dots:.3f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "wall_s": wall, "ops": rows}, f, indent=1)


if __name__ == "__main__":
  main()
