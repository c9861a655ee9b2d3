r"""Which few-step sampler suits a small model? A grid over the unified sampler's settings.

For finished MNIST runs, samples N digits (same per-sample seeds everywhere) for every
combination of steps, stochastic ratio s, last gap g1 and style, and prints the offline
MNIST metrics of each, next to 1 NFE; samplers equal to a preset carry its name. With
several runs (`--workdir A,B,...`) or sampling seeds (`--seed 0,1`), each (run, seed) is a
set, and a summary follows: the mean of each metric over the sets, the lowest pixel
diversity, and in how many sets each sampler is at least as good as that set's 1 NFE.
Inference only: minutes per set on a CPU.

  python benchmarks/mnist_sampler_search.py --workdir /tmp/mnist --weights ema
  python benchmarks/mnist_sampler_search.py --workdir /tmp/mnist --steps 2 \
      --ratios 0,0.5,1 --last-gaps 0.3,0.6 --styles few,any --num 500
  python benchmarks/mnist_sampler_search.py --workdir /tmp/s0,/tmp/s1,/tmp/s2 --seed 0,1 \
      --steps 2,4 --ratios 0,0.25,0.5,1 --last-gaps 0.5,0.6,0.7 --json search.json
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


def preset_name(cfg: sampling.SamplerConfig) -> str | None:
  return next((k for k, v in sampling.PRESETS.items() if v == cfg), None)


def search_run(workdir: str, step, weights: str, configs, num: int,
               seeds: list[int]) -> list[dict]:
  """Samples and judges every (name, SamplerConfig) of `configs` on one run, per seed."""
  run = readonly.load_run(workdir, step, (weights,))
  spec = run.spec
  ev = mnist.MnistEvaluator(spec.x_shape[0], spec.x_shape[-1])
  labels = generate.class_labels(num, spec.num_classes)
  sets = []
  for seed in seeds:
    rows = []
    print(f"{workdir} step {run.step}, {weights} weights, {num} samples, seed {seed}")
    print("| sampler | acc | worst | FID | div px | div feat |\n|---|---|---|---|---|---|")
    for name, cfg in configs:
      t0 = time.perf_counter()
      x = generate.generate(run.apply_fn, run.weights[weights], labels, cfg, key=seed,
                            x_shape=spec.x_shape, mesh=run.mesh, rules=run.rules,
                            batch_size=500)
      m = ev.evaluate(x, labels)
      rows.append({"sampler": name, "config": cfg.__dict__, **m})
      print(f"| {name} | {m['class_acc']:.3f} | {m['class_acc_min']:.2f} | {m['fid']:.2f} | "
            f"{m['div_pixel_rel']:.2f} | {m['div_feat_rel']:.2f} |  "
            f"({time.perf_counter() - t0:.0f}s)", flush=True)
    sets.append({"workdir": workdir, "step": run.step, "weights": weights, "seed": seed,
                 "rows": rows})
  return sets


def summarise(sets: list[dict]) -> list[dict]:
  """Per sampler: means over the sets and how many sets it is no worse than 1 NFE in."""
  out = []
  for i, row in enumerate(sets[0]["rows"]):
    pairs = [(s["rows"][i], s["rows"][0]) for s in sets]   # row 0 of every set is 1nfe
    mean = lambda k: sum(r[k] for r, _ in pairs) / len(pairs)
    out.append({
        "sampler": row["sampler"], "sets": len(pairs),
        "class_acc": mean("class_acc"), "fid": mean("fid"),
        "div_pixel_rel": mean("div_pixel_rel"),
        "div_pixel_rel_min": min(r["div_pixel_rel"] for r, _ in pairs),
        "no_worse_acc": sum(r["class_acc"] >= b["class_acc"] for r, b in pairs),
        "no_worse_fid": sum(r["fid"] <= b["fid"] for r, b in pairs),
        "no_worse_div": sum(r["div_pixel_rel"] >= b["div_pixel_rel"] for r, b in pairs)})
  return sorted(out, key=lambda r: -r["class_acc"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a run, or a comma list of runs")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--weights", default="ema")
  parser.add_argument("--steps", default="2,4", help="NFE values")
  parser.add_argument("--ratios", default="0,0.5,1", help="stochastic ratios s")
  parser.add_argument("--last-gaps", default="0.3,0.5,0.6,0.8", help="g1 values")
  parser.add_argument("--styles", default="few,any")
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--seed", default="0", help="sampling seed, or a comma list")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  try:
    seeds = [int(v) for v in args.seed.split(",")]
    grid = list(itertools.product([int(v) for v in args.steps.split(",")], floats(args.ratios),
                                  floats(args.last_gaps), args.styles.split(",")))
    searched = [sampling.SamplerConfig(steps=n, stochastic_ratio=s, gaps=(0.001, g1), style=st)
                for n, s, g1, st in grid]
  except ValueError as e:
    parser.error(f"--seed / --steps / --ratios / --last-gaps / --styles: {e}")

  configs = [("1nfe", sampling.PRESETS["1nfe"])]
  for (steps, s, g1, style), cfg in zip(grid, searched):
    name, preset = f"{style} n={steps} s={s:g} g1={g1:g}", preset_name(cfg)
    configs.append((f"{name} ({preset})" if preset else name, cfg))
  try:
    sets = [one for w in args.workdir.split(",")
            for one in search_run(w, args.step, args.weights, configs, args.num, seeds)]
  except (readonly.CheckpointReadError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  summary = summarise(sets) if len(sets) > 1 else None
  if summary:
    print(f"\nover {len(sets)} sets: mean class acc, FID, pixel diversity; lowest diversity; "
          "sets no worse than 1 NFE (acc / FID / div)")
    print("| sampler | acc | FID | div px | min div px | no worse |\n|---|---|---|---|---|---|")
    for r in summary:
      print(f"| {r['sampler']} | {r['class_acc']:.3f} | {r['fid']:.2f} | "
            f"{r['div_pixel_rel']:.3f} | {r['div_pixel_rel_min']:.2f} | {r['no_worse_acc']} / "
            f"{r['no_worse_fid']} / {r['no_worse_div']} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(sets[0] if len(sets) == 1 else {"sets": sets, "summary": summary}, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
