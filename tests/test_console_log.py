"""What a user sees on the console: one progress line per logged step, no backend probe."""

import json
import os
import re
import subprocess
import sys

import cpu_env

from twinflow_jax import hostmem

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_console_line_per_logged_step_and_no_backend_probe(tmp_path):
  env = dict(os.environ)
  # As a user runs it: JAX probes every backend plugin (the libtpu message comes from that
  # probe), one CPU device.
  env.pop("JAX_PLATFORMS", None)
  env["XLA_FLAGS"] = cpu_env.xla_flags(None)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "twinflow_jax.main", "--config", "configs/toy2d.py",
         f"--workdir={workdir}", "--config.model.hidden=32", "--config.model.depth=1",
         "--config.train.num_steps=4", "--config.train.log_every=2",
         "--config.train.global_batch_size=16", "--config.train.num_samples=16",
         "--config.train.checkpoint_every=100", "--config.train.sample_every=0",
         "--config.optim.warmup_steps=1"]
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  console = proc.stdout + proc.stderr
  assert proc.returncode == 0, console[-3000:]
  lines = console.splitlines()

  assert "Unable to initialize backend" not in console
  assert "libtpu" not in console
  backend = [l for l in lines if "JAX backend cpu: 1 device(s)" in l]
  assert len(backend) == 1, console
  # The command restarted itself with glibc's resident malloc (twinflow_jax/hostmem.py)
  # where that applies (Linux, glibc, no accelerator).
  restarts = hostmem.restart_env(env) is not None
  assert backend[0].endswith("; host buffers kept resident") == (
      restarts or hostmem.resident_malloc_active()), backend[0]

  # Logged steps 2 and 4: each appears in exactly one console line, the progress line.
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  records = [r for r in records if "loss" in r]   # train steps (an eval record has its own line)
  assert [r["step"] for r in records] == [2, 4]
  for r in records:
    mentions = [l for l in lines if re.search(rf"\b(step {r['step']}/4|\[{r['step']}\])", l)]
    assert len(mentions) == 1, (r["step"], mentions)
    assert f"loss {r['loss']:.4g}" in mentions[0]
  # No writer repeats the scalars (CLU's LoggingWriter style "[step] key=value, ...").
  assert not any("loss_main=" in l or "grad_norm=" in l for l in lines), console
