r"""Which few-step sampler suits a small model? A grid over the unified sampler's settings.

For one finished MNIST run, samples N digits (same per-sample seeds everywhere) for every
combination of steps, stochastic ratio s, last gap g1 and style, and prints the offline
MNIST metrics of each, next to 1 NFE. Inference only: minutes on a CPU.

  python benchmarks/mnist_sampler_search.py --workdir /tmp/mnist --weights ema
  python benchmarks/mnist_sampler_search.py --workdir /tmp/mnist --steps 2 \
      --ratios 0,0.5,1 --last-gaps 0.3,0.6 --styles few,any --num 500
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from twinflow_jax import generate
from twinflow_jax import sampling
from twinflow_jax.evaluation import mnist
from twinflow_jax.train import readonly


def floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",") if v]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--weights", default="ema")
  parser.add_argument("--steps", default="2,4", help="NFE values")
  parser.add_argument("--ratios", default="0,0.5,1", help="stochastic ratios s")
  parser.add_argument("--last-gaps", default="0.3,0.5,0.6,0.8", help="g1 values")
  parser.add_argument("--styles", default="few,any")
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)

  run = readonly.load_run(args.workdir, args.step, (args.weights,))
  spec = run.spec
  ev = mnist.MnistEvaluator(spec.x_shape[0], spec.x_shape[-1])
  labels = generate.class_labels(args.num, spec.num_classes)
  configs = [("1nfe", sampling.PRESETS["1nfe"])]
  for steps, s, g1, style in itertools.product(
      [int(v) for v in args.steps.split(",")], floats(args.ratios), floats(args.last_gaps),
      args.styles.split(",")):
    cfg = sampling.SamplerConfig(steps=steps, stochastic_ratio=s, gaps=(0.001, g1), style=style)
    configs.append((f"{style} n={steps} s={s:g} g1={g1:g}", cfg))
  rows = []
  print(f"{args.workdir} step {run.step}, {args.weights} weights, {args.num} samples")
  print("| sampler | acc | worst | FID | div px | div feat |\n|---|---|---|---|---|---|")
  for name, cfg in configs:
    t0 = time.perf_counter()
    x = generate.generate(run.apply_fn, run.weights[args.weights], labels, cfg, key=args.seed,
                          x_shape=spec.x_shape, mesh=run.mesh, rules=run.rules,
                          batch_size=500)
    m = ev.evaluate(x, labels)
    rows.append({"sampler": name, "config": cfg.__dict__, **m})
    print(f"| {name} | {m['class_acc']:.3f} | {m['class_acc_min']:.2f} | {m['fid']:.2f} | "
          f"{m['div_pixel_rel']:.2f} | {m['div_feat_rel']:.2f} |  ({time.perf_counter() - t0:.0f}s)",
          flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"workdir": args.workdir, "step": run.step, "weights": args.weights,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
