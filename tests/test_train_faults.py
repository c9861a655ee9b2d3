"""Faults through the real CLI: exit status, the one-line message, and no good checkpoint lost.

One shrunk toy run (checkpoints 2, 4, 6) is copied for each fault: a flipped bit in a
stored array value, truncated array files, a NaN in the optimizer state, all-NaN data, a
full disk during an asynchronous save, a missing data-iterator file and a changed config. Faults that need a real failure point
use the test-only hook `twinflow_jax.train.faults` (environment variable TWINFLOW_FAULTS).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

from twinflow_jax.data import arrayrecord_io
from twinflow_jax.train import metrics

import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The toy config shrunk to a few fast steps on one device, checkpoints every 2 steps.
TOY = ["--config.model.hidden=16", "--config.model.depth=1", "--config.data.toy2d_size=512",
       "--config.train.global_batch_size=16", "--config.optim.schedule=constant",
       "--config.optim.warmup_steps=0", "--config.train.log_every=1",
       "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3",
       "--config.train.sample_every=0", "--config.train.num_samples=16",
       "--config.train.sample_presets=('1nfe',)", "--config.train.use_tensorboard=false",
       "--config.eval.metrics=()"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def run_cli(workdir, *flags, config="configs/toy2d.py", faults=None, cache=None,
            timeout=300):
  """`python -m twinflow_jax.main` on one CPU device; returns the CompletedProcess."""
  env = cpu_env.subprocess_env(1)
  env.pop("TWINFLOW_FAULTS", None)
  if faults:
    env["TWINFLOW_FAULTS"] = faults
  cmd = [sys.executable, "-m", "twinflow_jax.main", f"--config={ROOT / config}",
         f"--workdir={workdir}", *(TOY if config == "configs/toy2d.py" else ()), *flags]
  if cache:
    cmd.append(f"--config.train.compilation_cache_dir={cache}")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def last_line(out):
  return out.stderr.strip().splitlines()[-1]


def steps_in(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, cache_dir):
  """A completed 6-step run: checkpoints 2, 4 and 6, losses of steps 1-6."""
  workdir = tmp_path_factory.mktemp("good") / "run"
  out = run_cli(workdir, "--config.train.num_steps=6", cache=cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert steps_in(workdir) == [2, 4, 6]
  return workdir


def copy_of(good_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(good_run, workdir)
  return workdir


def flip_bit_in_array(step_dir, name="params.t_embed.kernel", bit=22):
  """Flips one bit of one stored value of array `name` of checkpoint `step_dir`.

  The value is rewritten through TensorStore, so the checkpoint stays well-formed: Orbax
  checks its index files (CRC-32C) but not the array values, and restores the damaged
  value silently. That is the corruption the integrity record exists for.
  """
  spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt",
                                        "base": f"file://{step_dir / 'state'}/",
                                        "path": f"{name}/"}}
  store = ts.open(spec).result()
  value = store.read().result()
  value.reshape(-1).view(np.uint32)[0] ^= np.uint32(1 << bit)
  store.write(value).result()
  return name.replace(".", "/")


def test_bit_flipped_array_falls_back_and_is_set_aside(good_run, tmp_path, cache_dir):
  workdir = copy_of(good_run, tmp_path)
  damaged = flip_bit_in_array(workdir / "checkpoints" / "6")
  out = run_cli(workdir, "--config.train.num_steps=6", cache=cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (f"checkpoint 6 in {workdir}/checkpoints cannot be used (fails verification: "
          f"{damaged}: checksum ") in out.stderr
  assert (workdir / "checkpoints" / "6.corrupt" / "state").is_dir()   # kept, set aside
  assert steps_in(workdir) == [2, 4, 6]       # 2 and 4 untouched, 6 written anew
  # Resumed from 4: steps 5 and 6 repeat the uninterrupted run exactly.
  ref, got = losses(good_run), losses(workdir)
  np.testing.assert_allclose([got[s] for s in (5, 6)], [ref[s] for s in (5, 6)], atol=1e-6)


def test_truncated_chunk_files_fall_back_quietly(good_run, tmp_path, cache_dir):
  """An array Orbax cannot read: one error line, no tracebacks of its abandoned reads."""
  workdir = copy_of(good_run, tmp_path)
  for f in (workdir / "checkpoints" / "6" / "state").glob("ocdbt.process_0/d/*"):
    os.truncate(f, 10)
  out = run_cli(workdir, "--config.train.num_steps=6", cache=cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"checkpoint 6 in .* cannot be used \(.*\); trying the previous one",
                   out.stderr)
  for noise in ("Traceback", "Event loop is closed", "Exception ignored",
                "never retrieved", "TensorStore details"):
    assert noise not in out.stderr, out.stderr[-3000:]
  assert (workdir / "checkpoints" / "6.corrupt").is_dir() and steps_in(workdir) == [2, 4, 6]


def test_nan_in_optimizer_state_stops_without_saving(good_run, tmp_path, cache_dir):
  workdir = copy_of(good_run, tmp_path)
  before = {s: (workdir / "checkpoints" / str(s) / "state").stat().st_mtime_ns
            for s in (2, 4, 6)}
  out = run_cli(workdir, "--config.train.num_steps=20", "--config.train.max_consecutive_skips=3",
                faults="nan_opt_state@7", cache=cache_dir)
  assert out.returncode == 3, out.stderr[-3000:]
  assert last_line(out) == (
      "error: training stopped: 3 consecutive steps were skipped "
      "(config.train.max_consecutive_skips=3), the first at step 8 (not finite: new "
      "parameters and new optimizer state). Nothing was saved from these steps; the "
      "checkpoints are kept. Check the data and the learning rate, then rerun to resume")
  assert "Traceback" not in out.stderr
  assert steps_in(workdir) == [2, 4, 6]       # no checkpoint 8 or 10 from the bad state
  assert before == {s: (workdir / "checkpoints" / str(s) / "state").stat().st_mtime_ns
                    for s in (2, 4, 6)}


@pytest.mark.slow
def test_all_nan_data_stops(tmp_path, cache_dir):
  n = 64
  prefix = str(tmp_path / "nan" / "lat")
  arrayrecord_io.write_arrays(prefix, "latents", {
      "latent": np.full((n, 4, 4, 1), np.nan, np.float32), "label": np.arange(n) % 2})
  workdir = tmp_path / "run"
  out = run_cli(
      workdir, "--config.model.depth=1", "--config.model.hidden_size=16",
      "--config.model.num_heads=2", "--config.model.input_size=4",
      "--config.model.num_classes=2", "--config.data.source=arrayrecord_latents",
      f"--config.data.paths={prefix}-*.array_record", "--config.data.latent_shape=(4, 4, 1)",
      "--config.data.num_classes=2", "--config.train.global_batch_size=8",
      "--config.train.num_steps=50", "--config.train.checkpoint_every=2",
      "--config.train.max_consecutive_skips=3", "--config.train.sample_every=0",
      "--config.train.log_every=1", "--config.optim.schedule=constant",
      "--config.eval.metrics=()", config="configs/default.py", cache=cache_dir)
  assert out.returncode == 3, out.stderr[-3000:]
  assert last_line(out).startswith(
      "error: training stopped: 3 consecutive steps were skipped "
      "(config.train.max_consecutive_skips=3), the first at step 1 (not finite: loss, "
      "gradient, ")
  assert steps_in(workdir) == []              # nothing saved from skipped steps


def test_full_disk_during_async_save_stops_at_the_next_step(good_run, tmp_path, cache_dir):
  workdir = copy_of(good_run, tmp_path)
  # Resumed from 6, the save at step 32 fails in the background; the next save would be
  # at 64: the run must stop well before.
  out = run_cli(workdir, "--config.train.num_steps=100", "--config.train.checkpoint_every=32",
                faults="save_enospc@32", cache=cache_dir)
  assert out.returncode == 3, out.stderr[-3000:]
  path = workdir / "checkpoints" / "32"
  message = last_line(out)
  match = re.fullmatch(
      f"error: saving checkpoint 32 to {re.escape(str(path))} failed \\(noticed after step "
      f"(\\d+)\\): \\[Errno 28\\] No space left on device: "
      f"'{re.escape(str(path))}[^']*'\\. The "
      f"complete checkpoints \\[2, 4, 6\\] are kept; free space or fix the storage and "
      f"rerun the same command to resume", message)
  assert match, message
  assert 32 < int(match.group(1)) < 64
  assert "Traceback" not in out.stderr
  assert max(losses(workdir)) < 64
  assert steps_in(workdir) == [2, 4, 6]


def test_missing_data_iterator_file_is_an_error_unless_allowed(good_run, tmp_path,
                                                               cache_dir):
  workdir = copy_of(good_run, tmp_path)
  missing = workdir / "checkpoints" / "6" / "data" / "process_0-of-1.json"
  missing.unlink()
  out = run_cli(workdir, "--config.train.num_steps=8", cache=cache_dir)
  assert out.returncode == 3, out.stderr[-3000:]
  assert last_line(out) == (
      f"error: checkpoint 6: the data-iterator state cannot be restored (data iterator "
      f"file {missing} is missing). Resuming without it would silently change the data "
      f"order; pass --config.train.allow_data_restart=True to restart the data order "
      f"instead")
  assert steps_in(workdir) == [2, 4, 6] and not list((workdir / "checkpoints").glob("*.c*"))
  out = run_cli(workdir, "--config.train.num_steps=8", "--config.train.allow_data_restart=true",
                cache=cache_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "the data order restarts from the beginning" in out.stderr
  assert steps_in(workdir) == [4, 6, 8]


def test_changed_config_is_refused_with_the_fields(good_run, tmp_path, cache_dir):
  workdir = copy_of(good_run, tmp_path)
  out = run_cli(workdir, "--config.train.num_steps=8", "--config.train.global_batch_size=32",
                "--config.data.shuffle_seed=7", "--config.train.log_every=2",
                cache=cache_dir)
  assert out.returncode == 2, out.stderr[-3000:]
  assert last_line(out) == (
      f"error: checkpoint 6 in {workdir}/checkpoints was saved with another config; these "
      f"fields differ (saved -> now): data.shuffle_seed: None -> 7; "
      f"train.global_batch_size: 16 -> 32. Resuming would silently change the run: "
      f"restore them, use another --workdir, or pass "
      f"--config.train.allow_config_change=True to resume anyway")
  assert steps_in(workdir) == [2, 4, 6] and not list((workdir / "checkpoints").glob("*.c*"))
