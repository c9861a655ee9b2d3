r"""Where the time of one compiled DiT call goes, per XLA operation (CPU).

Traces one call of a compiled forward (`fwd`), flow-matching forward + backward (`fm`)
or TwinFlow train step (`step`), the very programs `vs_official.py` times, with
`jax.profiler`, reads the trace back with
`jax.profiler.ProfileData` (no TensorBoard needed) and sums the XLA CPU runtime's
per-operation events. Operations with the same shape signature are grouped: matrix
products by operand shapes and contraction (their GFLOP/s from the HLO shapes), other
fusions by their kind. A fusion holding products (XLA may put two independent
products, e.g. a layer's input and weight gradients, into one) counts as its products.

  python3 benchmarks/op_profile.py [--what fm|fwd|step] [--model DiT-S/2] [--batch 16] \
      [--attention auto] [--top 25]

Products XLA runs as asynchronous Eigen contractions (e.g. a weight gradient whose
operand is transposed) have events that cover only their launch: they show an impossible
rate (thousands of GFLOP/s) and their compute is counted in the operation that runs
beside them (DiT-S/2's MLP weight gradient inside its input gradient, which then looks
half as fast as it is).

The events cover the operations XLA's CPU runtime runs itself; time outside them (the
runtime's own scheduling, idle threads) shows as the gap between the events' span and the
call's wall time. Independent operations may run at once on the runtime's threads: on 2
cores (jax 0.10.2, float32) the events of DiT-S/2's fm sum to about its wall time, those of
the step to 1.3x.

The call is also timed untraced, just before, so the tracer's own cost shows (small:
DiT-S/2's bfloat16 fm on jax 0.12, 2.85 s traced against 2.81 s untraced). An event lasts
as long as its operation took beside whatever ran at the same time, so small operations
can look slower than they are: the events of that fm sum to 3.32 s, and its [16, 6, 256,
64] transposes show 3.0 ms per event against 0.5 ms timed alone. Confirm a small
operation's cost by timing the change (docs/performance.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vs_official  # pylint: disable=g-import-not-at-top,wrong-import-position

_DEF = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


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
  ap.add_argument("--what", default="fm", choices=vs_official.KINDS)
  ap.add_argument("--model", default="DiT-S/2")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--channels", type=int, default=4)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--attention", default="", help="model attention ('' = the default)")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  args.jax_model = json.dumps({"attention": args.attention} if args.attention else {})
  side = vs_official.JaxSide(args)
  side.build(args.what)   # compiled and warmed up
  compiled, run = side.compiled[args.what], side.fns[args.what]
  t0 = time.perf_counter()
  jax.block_until_ready(run())
  plain = time.perf_counter() - t0   # the same call untraced: the tracer's own cost shows
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    jax.block_until_ready(run())
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
  print(f"{args.model}, batch {args.batch}, {args.what}: wall {wall:.3f} s traced, "
        f"{plain:.3f} s untraced; operations {total:.3f} s in "
        f"{sum(r[2] for r in rows)} events")
  print(f"{'s':>7} {'share':>6} {'n':>4} {'GFLOP/s':>8}  operation")
  for sig, sec, n, flops in rows[:args.top]:
    rate = f"{flops / sec / 1e9:8.0f}" if flops and sec else " " * 8
    print(f"{sec:7.3f} {sec / total:6.1%} {n:4d} {rate}  {sig}")
  dots = sum(r[1] for r in rows if r[0].startswith("dot"))
  print(f"matrix products {dots:.3f} s ({dots / total:.0%}), other operations "
        f"{total - dots:.3f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "wall_s": wall, "untraced_wall_s": plain, "ops": rows},
                f, indent=1)


if __name__ == "__main__":
  main()
