r"""What the evaluation during training costs: config.eval of a config on a run's checkpoint.

Builds the trainer's evaluator (`twinflow_jax.train.evaluation.TrainEvaluator`) for the
`config.eval` of CONFIG, reads the EMA weights of a finished or partial run read-only, and
times the set-up and --repeats evaluations (the first one includes compiling the sampler).

  python benchmarks/eval_cost.py --workdir /tmp/mnist --config configs/default.py
"""

from __future__ import annotations

import argparse
import importlib.util
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="a twinflow_jax.main run with a checkpoint")
  p.add_argument("--config", default="configs/default.py", help="config whose eval is timed")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  from twinflow_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  run = readonly.load_run(args.workdir, weights=("ema",))
  t0 = time.perf_counter()
  ev = evaluation.TrainEvaluator(
      config, apply_fn=run.apply_fn, mesh=run.mesh, rules=run.rules,
      x_shape=tuple(run.spec.x_shape), num_classes=run.spec.num_classes,
      conditioning=run.spec.conditioning, decoder=evaluation.latent_decoder(run.config))
  print(f"set-up {time.perf_counter() - t0:.2f}s ({'/'.join(ev.evaluators)}, {ev.num} "
        f"samples of {'/'.join(ev.presets)})", flush=True)
  state = type("State", (), {"ema": run.weights["ema"]})
  for i in range(args.repeats):
    out = ev(state, run.step)
    shown = ", ".join(f"{k.split('/', 2)[-1]} {v:.3f}" for k, v in out.items()
                      if not k.endswith("seconds"))
    print(f"evaluation {i}: {out['eval/seconds']:.2f}s (sampling {out['eval/sample_seconds']:.2f}s)"
          f"; step {run.step}: {shown}", flush=True)


if __name__ == "__main__":
  main()
