"""Sampling from a run: per-sample seeds across meshes, and the read-only sample command."""

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from twinflow_jax import generate
from twinflow_jax import sample
from twinflow_jax import sampling
from twinflow_jax.train import loop
from twinflow_jax.train import readonly

import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config():
  """configs/default.py (DiT on MNIST) shrunk to 2 steps, checkpoints at 1 and 2."""
  spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs/default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8)
  c.data.image_size = 8
  c.optim.update(schedule="constant", warmup_steps=0, lr=1e-2)
  c.train.update(global_batch_size=16, num_steps=2, checkpoint_every=1, keep_checkpoints=2,
                 log_every=1, sample_every=0, num_samples=10, sample_presets=("1nfe",),
                 use_tensorboard=False, async_checkpointing=False, eval_ema_decays=(0.9,))
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.eval.metrics = ()
  return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "mnist")
  loop.train(tiny_config(), workdir)
  return workdir


def snapshot(root):
  """Every path under root with the hash of each file's bytes."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for d in dirnames:
      out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
    for f in filenames:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def corrupt_state(workdir, step):
  for f in pathlib.Path(workdir, "checkpoints", str(step), "state").rglob("*"):
    if f.is_file() and ("ocdbt" in f.name or f.parent.name == "d"):
      f.write_bytes(b"not a checkpoint")


@pytest.mark.slow
def test_same_samples_on_1_and_8_devices_and_any_batch(run_dir):
  eight = readonly.load_run(run_dir, weights=("ema", "online"))
  one = readonly.load_run(run_dir, weights=("ema",), devices=jax.devices()[:1])
  assert dict(eight.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert len(one.mesh.devices.flat) == 1
  # The weights were read into the sharded layout of the run's mesh.
  specs = [str(p.sharding.spec) for p in jax.tree.leaves(eight.weights["ema"])]
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  labels = generate.class_labels(13, 10)
  kw = dict(key=7, x_shape=(8, 8, 1))
  # 4nfe re-injects noise at every step: it checks the per-sample sampler keys too.
  a = generate.generate(eight.apply_fn, eight.weights["ema"], labels, "4nfe", mesh=eight.mesh,
                        rules=eight.rules, batch_size=8, **kw)
  b = generate.generate(one.apply_fn, one.weights["ema"], labels, "4nfe", mesh=one.mesh,
                        rules=one.rules, batch_size=5, **kw)
  assert a.shape == (13, 8, 8, 1) and np.isfinite(a).all() and a.std() > 0.1
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # Sample i does not depend on the others: the tail alone, with its indices.
  c = generate.generate(one.apply_fn, one.weights["ema"], labels[8:], "4nfe", mesh=one.mesh,
                        rules=one.rules, batch_size=5, start_index=8, **kw)
  np.testing.assert_allclose(c, a[8:], atol=1e-5, rtol=0)
  # Other weights, other seed: other samples.
  d = generate.generate(eight.apply_fn, eight.weights["online"], labels, "4nfe",
                        mesh=eight.mesh, rules=eight.rules, batch_size=8, key=8,
                        x_shape=(8, 8, 1))
  assert np.abs(d - a).max() > 1e-3
  np.testing.assert_allclose(generate.initial_noise(7, np.arange(3), (8, 8, 1)),
                             generate.initial_noise(7, np.arange(5), (8, 8, 1))[:3])


def test_per_sample_sampler_keys():
  half = lambda p, x, t, r, c: 0.5 * x
  noise = jax.random.normal(jax.random.key(0), (3, 4))
  keys = jax.random.split(jax.random.key(1), 3)
  both = sampling.sample(half, None, noise, None, "4nfe", keys)
  first = sampling.sample(half, None, noise[:1], None, "4nfe", keys[:1])
  np.testing.assert_allclose(both[:1], first, atol=1e-6)
  with pytest.raises(ValueError, match="one per sample"):
    sampling.sample(half, None, noise, None, "4nfe", keys[:2])


def test_sample_command_writes_npz_and_png_and_touches_nothing(run_dir, tmp_path):
  before = snapshot(run_dir)
  out = str(tmp_path / "s.npz")
  assert sample.main(["--workdir", run_dir, "--num", "12", "--preset", "2nfe", "--seed", "3",
                      "--out", out, "--weights", "ema_0.9"]) == 0
  assert snapshot(run_dir) == before
  with np.load(out) as f:
    assert f["samples"].shape == (12, 8, 8, 1)
    assert f["labels"].tolist() == [i % 10 for i in range(12)]
    assert str(f["preset"]) == "2nfe" and int(f["step"]) == 2 and str(f["weights"]) == "ema_0.9"
    samples = f["samples"]
  with open(out[:-4] + ".png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The command's samples are the library's.
  run = readonly.load_run(run_dir, weights=("ema_0.9",), devices=jax.devices()[:1])
  lib = generate.generate(run.apply_fn, run.weights["ema_0.9"], generate.class_labels(12, 10),
                          "2nfe", key=3, x_shape=(8, 8, 1), mesh=run.mesh)
  np.testing.assert_allclose(samples, lib, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "3nfe"], "unknown --preset '3nfe'"),
    (["--weights", "ema_0.5"], "keeps no evaluation EMA 'ema_0.5'"),
    (["--weights", "best"], "unknown weights 'best'"),
    (["--step", "7"], r"no complete checkpoint of step 7 in .*; available: \[1, 2\]"),
    (["--labels", "3,12"], r"--labels must lie in \[0, 10\)"),
    (["--cond-file", "x.npz"], "--cond-file is for text-conditional runs"),
    (["--out", "/proc/nowhere/x.npz"], "--out: cannot create the folder /proc/nowhere"),
    (["--metrics", "mnist", "--reference", "ref.npz"],
     "--reference given without --metrics inception"),
    (["--inception-metrics", "fid"], "--inception-metrics given without --metrics inception"),
])
def test_sample_command_user_errors(run_dir, tmp_path, capsys, argv, message):
  before = snapshot(run_dir)
  with pytest.raises(SystemExit) as e:
    sample.main(["--workdir", run_dir, "--out", str(tmp_path / "x.npz")] + argv)
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("error: ") and re.search(message, err[-1])
  assert snapshot(run_dir) == before and not (tmp_path / "x.npz").exists()


def test_relative_workdir_and_a_link_into_it(run_dir, tmp_path, monkeypatch):
  before = snapshot(run_dir)
  monkeypatch.chdir(os.path.dirname(run_dir))
  out = tmp_path / "rel.npz"
  assert sample.main(["--workdir", os.path.basename(run_dir), "--num", "4",
                      "--out", str(out)]) == 0
  assert out.exists()
  # --out through a symbolic link to the workdir is still inside it.
  (tmp_path / "link").symlink_to(run_dir)
  with pytest.raises(SystemExit) as e:
    sample.main(["--workdir", run_dir, "--num", "4", "--out", str(tmp_path / "link" / "x")])
  assert e.value.code == 1
  # An --out that is a directory is refused before anything is generated.
  (tmp_path / "d.npz").mkdir()
  with pytest.raises(SystemExit):
    sample.main(["--workdir", run_dir, "--num", "4", "--out", str(tmp_path / "d.npz")])
  assert snapshot(run_dir) == before


def test_checkpoint_that_reads_but_fails_its_checksums_is_refused(run_dir, tmp_path, capsys):
  # A flipped bit reads without error (as NaN or wrong weights); the integrity record
  # catches it. Damaging the record of one EMA array is the same mismatch.
  workdir = str(tmp_path / "flipped")
  shutil.copytree(run_dir, workdir)
  record = pathlib.Path(workdir, "checkpoints", "2", "integrity", "metadata")
  data = json.loads(record.read_text())
  name = next(n for n, a in data["arrays"].items()
              if n.startswith("ema/") and a["checksum"] != "0" * 16)   # zeros sum to 0
  data["arrays"][name]["checksum"] = "0" * 16
  record.write_text(json.dumps(data))
  before = snapshot(workdir)
  with pytest.raises(SystemExit) as e:
    sample.main(["--workdir", workdir, "--num", "4", "--out", str(tmp_path / "x.npz")])
  assert e.value.code == 1
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint {workdir}/checkpoints/2 fails verification: "
                         f"{name}: checksum"), last
  assert "--step 1" in last and not (tmp_path / "x.npz").exists()
  assert snapshot(workdir) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_is_reported_and_left_alone(run_dir, tmp_path):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(run_dir, workdir)
  corrupt_state(workdir, 2)
  before = snapshot(workdir)
  env = cpu_env.subprocess_env(2)
  cmd = [sys.executable, "-m", "twinflow_jax.sample", "--workdir", workdir, "--num", "4",
         "--out", str(tmp_path / "x.npz")]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint {workdir}/checkpoints/2 cannot be read"), last
  assert "--step 1" in last and "Traceback" not in proc.stderr
  assert snapshot(workdir) == before
  # The older checkpoint still samples, and the workdir stays as it was.
  assert sample.main(["--workdir", workdir, "--step", "1", "--num", "4",
                      "--out", str(tmp_path / "y.npz")]) == 0
  assert snapshot(workdir) == before
