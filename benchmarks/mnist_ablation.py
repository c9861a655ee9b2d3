r"""One ablation run of the default MNIST job: train with overrides, then judge the digits.

Trains `configs/default.py` with the given overrides (plus an evaluation EMA of 0.999, which
costs nothing measurable and gives a third set of weights to compare), then runs
`benchmarks/mnist_nfe.py`'s evaluation on the final checkpoint and appends one JSON line
(name, overrides, train seconds, every metric) to the results file.

  python benchmarks/mnist_ablation.py --name enr0.4 --set loss.enhanced_ratio=0.4
  python benchmarks/mnist_ablation.py --name base --eval-only   # re-judge an existing run

Runs go to --root/<name>; the results file defaults to benchmarks/results/mnist_ablation.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def load_default_config(overrides: dict[str, object], config_file: str = "configs/default.py"):
  """The config file's get_config() with `section.field` overrides.

  Raises:
    ValueError: a missing config file or an override of a field the config lacks.
  """
  path = ROOT / config_file
  if not path.is_file():
    raise ValueError(f"--config {config_file}: no such file")
  spec = importlib.util.spec_from_file_location("ablation_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in overrides.items():
    node = c
    *parents, last = key.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"--set {key}: the config has no field {p!r} here")
      node = node[p]
    if last not in node:
      raise ValueError(f"--set {key}: the config has no field {last!r} (docs/configs.md)")
    node[last] = value
  return c


def parse_overrides(items: list[str]) -> dict[str, object]:
  out = {}
  for item in items:
    key, _, raw = item.partition("=")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", required=True)
  parser.add_argument("--set", action="append", default=[], help="section.field=value")
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--root", default="/tmp/twinflow_ablation")
  parser.add_argument("--results", default=str(ROOT / "benchmarks/results/mnist_ablation.jsonl"))
  parser.add_argument("--presets", default="1nfe,2nfe,4nfe,multi30")
  parser.add_argument("--weights", default="online,ema,ema_0.999")
  parser.add_argument("--num", type=int, default=1000)
  parser.add_argument("--eval-only", action="store_true")
  args = parser.parse_args(argv)

  from absl import logging  # pylint: disable=g-import-not-at-top
  import mnist_nfe  # pylint: disable=g-import-not-at-top
  from twinflow_jax import errors  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top

  overrides = {"train.eval_ema_decays": (0.999,), "train.sample_every": 0,
               **parse_overrides(args.set)}
  workdir = os.path.join(args.root, args.name)
  presets = mnist_nfe.parse_presets(args.presets)
  train_seconds = None
  if not args.eval_only:
    logging.set_verbosity(logging.WARNING)
    try:
      config = load_default_config(overrides, args.config)
      t0 = time.time()
      result = loop.train(config, workdir)
    except (ValueError, errors.UserError, errors.RunError) as e:
      sys.exit(f"error: {errors.one_line(e)}")
    train_seconds = round(time.time() - t0, 1)
    # The last record may be an evaluation's, which has no loss.
    final = next((h["loss"] for h in reversed(result.history) if "loss" in h), float("nan"))
    print(f"[{args.name}] trained {result.step} steps in {train_seconds}s; final loss "
          f"{final:.4f}", flush=True)
  weights = args.weights.split(",")
  try:
    res = mnist_nfe.evaluate_run(workdir, weights=weights, presets=presets, num=args.num)
  except (readonly.CheckpointReadError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  print(mnist_nfe.format_table(res), flush=True)
  record = {"name": args.name, "config": args.config, "overrides": args.set,
            "train_seconds": train_seconds, "time": time.strftime("%Y-%m-%d %H:%M"), **res}
  os.makedirs(os.path.dirname(args.results), exist_ok=True)
  with open(args.results, "a") as f:
    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
