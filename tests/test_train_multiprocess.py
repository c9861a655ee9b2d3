"""Two real processes (jax.distributed on CPU, 4 devices each) through the CLI.

* The 2 x 4-device run equals the 1 x 8-device run (losses and parameters, to 1e-6): each
  process loads the rows of the global batch that its devices hold.
* One process cannot read the newest checkpoint: both agree on the previous one, process
  0 alone sets the broken one aside, and the result still equals the reference.
* One process is SIGKILLed mid-run (after freezing at a known step), both are restarted
  and resume to the same result.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from absl import flags
from ml_collections import config_flags

from twinflow_jax.train import checkpoint as ckpt_lib
from twinflow_jax.train import loop
from twinflow_jax.train import metrics
from twinflow_jax.train import state as state_lib

import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["--config.model.hidden=16", "--config.model.depth=1", "--config.data.toy2d_size=512",
         "--config.train.global_batch_size=16", "--config.optim.schedule=constant",
         "--config.optim.warmup_steps=0", "--config.train.log_every=1",
         "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=10",
         "--config.train.sample_every=0", "--config.train.num_samples=16",
         "--config.train.sample_presets=('1nfe',)", "--config.train.use_tensorboard=false",
         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
         "--config.eval.metrics=()"]
TIMEOUT = 240


def parse_config(*extra):
  argv = ["prog", f"--config={ROOT / 'configs/toy2d.py'}", *FLAGS, *extra]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  yield str(tmp_path_factory.mktemp("xla_cache"))
  loop.enable_compilation_cache(None)   # the reference run turned it on in this process


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
  """The one-process run on 8 devices: 8 steps, checkpoints 2, 4, 6, 8."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = loop.train(parse_config("--config.train.num_steps=8",
                                   f"--config.train.compilation_cache_dir={cache}"), workdir)
  assert result.step == 8
  return workdir


@contextlib.contextmanager
def two_processes(workdir, *extra, faults=(None, None), cache=None):
  """Starts the CLI as processes 0 and 1 of 2 (4 CPU devices each); kills leftovers."""
  port = portpicker.pick_unused_port()
  procs = []
  try:
    for i in range(2):
      env = cpu_env.subprocess_env(4)
      env.pop("TWINFLOW_FAULTS", None)
      if faults[i]:
        env["TWINFLOW_FAULTS"] = faults[i]
      log = open(f"{workdir}.process{i}.log", "w")
      cmd = [sys.executable, "-m", "twinflow_jax.main",
             f"--config={ROOT / 'configs/toy2d.py'}", f"--workdir={workdir}", *FLAGS, *extra,
             f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"]
      if cache:
        cmd.append(f"--config.train.compilation_cache_dir={cache}")
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
      log.close()
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def log_of(workdir, i):
  return pathlib.Path(f"{workdir}.process{i}.log").read_text()


def wait_all(procs, workdir, timeout=TIMEOUT):
  deadline = time.time() + timeout
  for i, p in enumerate(procs):
    try:
      p.wait(max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {i} did not finish in {timeout}s:\n{log_of(workdir, i)[-3000:]}")
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log_of(workdir, i)[-3000:]}"


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")}


def params_at(workdir, step):
  setup = loop.build(parse_config())
  abstract = state_lib.abstract_with_shardings(setup.abstract_state.params,
                                               setup.shardings.params)
  out = ckpt_lib.restore_items(ckpt_lib.checkpoint_dir(str(workdir)), step,
                               {"params": abstract})
  return jax.tree.map(np.asarray, out["params"])


def assert_same_run(workdir, reference, last):
  ref, got = losses(reference), losses(workdir)
  assert sorted(got) == list(range(1, last + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)],
                             atol=1e-6, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
               params_at(workdir, last), params_at(reference, last))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache):
  workdir = tmp_path_factory.mktemp("two") / "run"
  with two_processes(workdir, "--config.train.num_steps=6", cache=cache) as procs:
    wait_all(procs, workdir)
  return workdir


@pytest.mark.slow
def test_two_processes_train_like_one(two_process_run, reference):
  assert_same_run(two_process_run, reference, 6)
  assert "2 process(es)" in log_of(two_process_run, 0)


@pytest.mark.slow
def test_processes_agree_when_one_cannot_read_the_newest(two_process_run, reference,
                                                         tmp_path, cache):
  workdir = tmp_path / "run"
  shutil.copytree(two_process_run, workdir)
  with two_processes(workdir, "--config.train.num_steps=8",
                     faults=(None, "restore_error@6"), cache=cache) as procs:
    wait_all(procs, workdir)
  log0 = log_of(workdir, 0)
  assert (f"checkpoint 6 in {workdir}/checkpoints cannot be used (process 1: OSError: "
          f"[Errno 5] injected read error") in log0
  assert "resuming from step 4" in log0
  assert "moved broken checkpoint" in log0 and "moved broken" not in log_of(workdir, 1)
  ckpt = workdir / "checkpoints"
  assert (ckpt / "6.corrupt" / "state").is_dir()
  assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
  assert_same_run(workdir, reference, 8)


@pytest.mark.slow
def test_sigkill_of_one_process_then_restart_resumes_exactly(tmp_path, reference, cache):
  workdir = tmp_path / "run"
  with two_processes(workdir, "--config.train.num_steps=8", faults=(None, "hang@5"),
                     cache=cache) as procs:
    deadline = time.time() + TIMEOUT
    while "fault: hanging after step 5" not in log_of(workdir, 1):
      assert time.time() < deadline and procs[1].poll() is None, log_of(workdir, 1)[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    # Process 0 now waits for its peer in a collective (JAX's heartbeat would end it after
    # 100 s); the job scheduler kills the rest of the job.
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
  assert procs[1].returncode == -signal.SIGKILL
  assert max(losses(workdir)) < 8
  # The save of step 4 may not have finished when the process froze: then 2 is the newest.
  complete = ckpt_lib.restorable_steps(ckpt_lib.checkpoint_dir(str(workdir)))
  assert complete and complete[-1] in (2, 4)
  with two_processes(workdir, "--config.train.num_steps=8", cache=cache) as procs:
    wait_all(procs, workdir)
  assert f"resuming from step {complete[-1]}" in log_of(workdir, 0)
  assert_same_run(workdir, reference, 8)
