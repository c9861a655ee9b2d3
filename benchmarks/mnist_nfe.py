r"""How good are the digits of a finished MNIST run, at 1, 2, 4 NFE and on the 30-step ODE?

Reads a run read-only (as `python -m twinflow_jax.sample`), samples N digits (N/10 per
class, the same per-sample seeds for every row) with each preset from each set of weights,
and judges them with the offline MNIST metrics (`twinflow_jax.evaluation.mnist`): class
accuracy (and the worst class), classifier-feature FID against the 4000 reference digits,
and within-class diversity relative to real digits, in pixels and in classifier features.
The first row is the real-digit floor: 1000 held-out real digits at the run's resolution.

  python benchmarks/mnist_nfe.py --workdir /tmp/mnist
  python benchmarks/mnist_nfe.py --workdir /tmp/mnist --presets 1nfe,small4 --weights ema \
      --num 1000 --json /tmp/mnist_nfe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

PRESETS = ("1nfe", "2nfe", "4nfe", "any4", "small4", "multi30")
COLUMNS = (("class_acc", "acc", "{:.3f}"), ("class_acc_min", "worst class", "{:.2f}"),
           ("fid", "FID (clf)", "{:.2f}"), ("div_pixel_rel", "div px", "{:.2f}"),
           ("div_feat_rel", "div feat", "{:.2f}"))


def evaluate_run(workdir: str, *, step: int | None = None, weights: Sequence[str] = ("ema",),
                 presets: Sequence[str] = PRESETS, num: int = 1000, seed: int = 0,
                 batch_size: int = 500, verbose: bool = True) -> dict[str, Any]:
  """Metrics of every (weights, preset) of one checkpoint, plus the real-digit floor.

  Returns:
    {'workdir', 'step', 'resolution', 'num', 'seed', 'floor': metrics,
     'rows': [{'weights', 'preset', 'nfe', 'seconds', **metrics, 'per_class': [10]}]}
  """
  from twinflow_jax import generate, sampling  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import mnist  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top

  run = readonly.load_run(workdir, step, tuple(weights))
  spec = run.spec
  if run.config.data.source != "mnist":
    raise ValueError(f"{workdir} is not an MNIST run (data.source={run.config.data.source!r})")
  evaluator = mnist.MnistEvaluator(spec.x_shape[0], spec.x_shape[-1])
  labels = generate.class_labels(num, spec.num_classes)
  out = {"workdir": workdir, "step": run.step, "resolution": spec.x_shape[0], "num": num,
         "seed": seed, "floor": evaluator.real_floor(), "rows": []}
  for w in weights:
    for preset in presets:
      t0 = time.perf_counter()
      x = generate.generate(run.apply_fn, run.weights[w], labels, preset, key=seed,
                            x_shape=spec.x_shape, mesh=run.mesh, rules=run.rules,
                            batch_size=batch_size)
      secs = time.perf_counter() - t0
      row = {"weights": w, "preset": preset, "nfe": sampling.get_config(preset).steps,
             "seconds": round(secs, 2), **evaluator.evaluate(x, labels),
             "per_class": [round(float(a), 3) for a in evaluator.per_class_accuracy(x, labels)]}
      out["rows"].append(row)
      if verbose:
        print(f"  {w} {preset}: acc {row['class_acc']:.3f}, FID {row['fid']:.2f}, div px "
              f"{row['div_pixel_rel']:.2f}, feat {row['div_feat_rel']:.2f} ({secs:.1f}s)",
              file=sys.stderr, flush=True)
  return out


def format_table(result: dict[str, Any]) -> str:
  """Markdown table of `evaluate_run`'s result (floor first)."""
  head = "| weights | preset | NFE | " + " | ".join(c[1] for c in COLUMNS) + " |"
  lines = [head, "|---" * (3 + len(COLUMNS)) + "|"]
  floor = result["floor"]
  lines.append("| real digits | - | - | " + " | ".join(f.format(floor[k]) for k, _, f in COLUMNS)
               + " |")
  for r in result["rows"]:
    lines.append(f"| {r['weights']} | {r['preset']} | {r['nfe']} | "
                 + " | ".join(f.format(r[k]) for k, _, f in COLUMNS) + " |")
  return "\n".join(lines)


def parse_presets(text: str) -> list[str]:
  """Comma-separated sampler presets; exits with one error line if unknown or none."""
  from twinflow_jax import sampling  # pylint: disable=g-import-not-at-top
  presets = [p for p in text.split(",") if p]
  bad = [p for p in presets if p not in sampling.PRESETS]
  if bad:
    sys.exit(f"error: unknown presets {bad}; choose from {tuple(sampling.PRESETS)}")
  if not presets:
    sys.exit("error: --presets names no preset")
  return presets


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--presets", default=",".join(PRESETS),
                      help="comma-separated sampler presets")
  parser.add_argument("--weights", default="online,ema",
                      help="comma-separated: ema, online, ema_<decay>")
  parser.add_argument("--num", type=int, default=1000, help="samples per row (a multiple of 10)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args(argv)
  from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top
  presets = parse_presets(args.presets)
  if args.num < 10 or args.num % 10:
    sys.exit(f"error: --num must be a positive multiple of 10 (the classes), got {args.num}")
  if args.json and (os.path.isdir(args.json)
                    or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
    sys.exit(f"error: --json {args.json} is a directory or its folder does not exist")
  try:
    result = evaluate_run(args.workdir, step=args.step, weights=args.weights.split(","),
                          presets=presets, num=args.num, seed=args.seed)
  except (readonly.CheckpointReadError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(f"{args.workdir}, step {result['step']}, {result['resolution']}x"
        f"{result['resolution']}, {args.num} samples per row ({args.num // 10} per class), "
        f"seed {args.seed}")
  print(format_table(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
