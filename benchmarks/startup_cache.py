r"""Start-up time of a training run, and what the persistent compilation cache saves.

Runs the trainer (`python -m twinflow_jax.main`) three times on one workdir, each in a
fresh process, and reports for each its time to the first finished step (process start to
the log line of the first step, which is logged at once: `train.log_every` = 1), the
trainer's own "train step compiled in" time and the process's whole wall time:
  first     a fresh workdir: nothing cached, the step is compiled and written to
            <workdir>/xla_cache (the default `train.compilation_cache_dir`);
  resume    the same workdir again, one step further: it restores the checkpoint and
            reads the compiled step from <workdir>/xla_cache;
  resume_cold  the same restart with the cache pointed at an empty folder: what a
            restart costs without the cache (the control).
The runs do not sample (`train.sample_every` = 0), checkpoint every step and use a constant
learning rate (a warm-up longer than the 3 steps would be refused).

  python3 benchmarks/startup_cache.py [--config configs/default.py] \
      [--workdir /tmp/startup] [--set train.global_batch_size=64 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
_STEP_LINE = re.compile(r"^I(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*\] step (\d+)/")
_COMPILED = re.compile(r"train step compiled in ([0-9.]+)s")


def _log_time(mmdd: str, hms: str) -> float:
  """Epoch seconds of an absl log line's local time stamp (this year)."""
  now = datetime.datetime.now()
  stamp = datetime.datetime.strptime(f"{now.year}{mmdd} {hms}", "%Y%m%d %H:%M:%S.%f")
  return stamp.timestamp()


def run_once(args, workdir: str, num_steps: int, cache_dir: str) -> dict:
  cmd = [sys.executable, "-m", "twinflow_jax.main", "--config", args.config,
         "--workdir", workdir, f"--config.train.num_steps={num_steps}",
         "--config.train.log_every=1", "--config.train.checkpoint_every=1",
         "--config.train.sample_every=0", "--config.optim.schedule=constant",
         f"--config.train.compilation_cache_dir={cache_dir}",
         "--alsologtostderr"]
  cmd += [f"--config.{s}" for s in args.set]
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
  start = time.time()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  wall = time.time() - start
  if proc.returncode != 0:
    sys.exit(f"error: the trainer exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
  first_step = compiled = None
  for line in proc.stderr.splitlines():
    m = _STEP_LINE.match(line)
    if m and first_step is None:
      first_step = _log_time(m.group(1), m.group(2)) - start
    m = _COMPILED.search(line)
    if m:
      compiled = float(m.group(1))
  return {"time_to_first_step_s": first_step, "compile_s": compiled, "process_wall_s": wall}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=str(ROOT / "configs" / "default.py"))
  ap.add_argument("--workdir", default="/tmp/twinflow_startup",
                  help="scratch workdir (emptied first)")
  ap.add_argument("--set", action="append", default=[],
                  help="extra config override FIELD=VALUE (repeatable)")
  ap.add_argument("--json", default=None, help="write the results here as JSON")
  args = ap.parse_args(argv)
  shutil.rmtree(args.workdir, ignore_errors=True)
  cold = args.workdir + "_empty_cache"
  shutil.rmtree(cold, ignore_errors=True)
  out = {}
  out["first"] = run_once(args, args.workdir, 1, "")                 # <workdir>/xla_cache
  out["resume"] = run_once(args, args.workdir, 2, "")
  out["resume_cold"] = run_once(args, args.workdir, 3, cold)         # an empty cache
  for k, v in out.items():
    print(f"{k:12s} time to first step {v['time_to_first_step_s']:6.1f}s, step compiled in "
          f"{v['compile_s']:6.1f}s, process {v['process_wall_s']:6.1f}s", flush=True)
  saved = out["resume_cold"]["time_to_first_step_s"] - out["resume"]["time_to_first_step_s"]
  print(f"the cache saves {saved:.1f}s of a restart's time to first step "
        f"({out['resume_cold']['time_to_first_step_s']:.1f}s -> "
        f"{out['resume']['time_to_first_step_s']:.1f}s)")
  out["load_average"] = open("/proc/loadavg").read().split()[:3]
  out["args"] = vars(args)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
  shutil.rmtree(cold, ignore_errors=True)
  return out


if __name__ == "__main__":
  main()
