"""Evaluation during training (config.eval) and decoded samples of latent runs.

A tiny toy run writes eval scalars to metrics.jsonl, with the same per-sample seeds every
time; a tiny latent run (records of the tiny random SD VAE of tests/fixtures) decodes its
grids and computes Inception metrics on decoded images, in the trainer and in the sample
command. The Inception network is the one-conv stand-in of test_evaluation_extractor.py
(the real network's parity is in test_models_inception.py).
"""

import importlib.util
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from twinflow_jax import errors
from twinflow_jax import generate
from twinflow_jax import sample
from twinflow_jax.data import latent_metadata
from twinflow_jax.data import prepare
from twinflow_jax.data import vae_codec
from twinflow_jax.evaluation import extractor
from twinflow_jax.evaluation import reference as reference_lib
from twinflow_jax.evaluation import sample_metrics
from twinflow_jax.models import vae as vae_lib
from twinflow_jax.models.convert import diffusers_vae
from twinflow_jax.models.convert import inception as convert_inception
from twinflow_jax.train import loop
from twinflow_jax.train import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
SD_VAE = str(ROOT / "tests" / "fixtures" / "vae_sd")
ONE_DEVICE = jax.devices()[:1]


def _config(name):
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _fast(c, steps):
  c.mesh.update(data=1, fsdp=1, tensor=1)     # one device: the cheapest compile
  c.optim.update(schedule="constant", warmup_steps=0)
  c.train.update(global_batch_size=16, num_steps=steps, log_every=1, checkpoint_every=100,
                 sample_every=0, num_samples=8, sample_presets=("1nfe",),
                 use_tensorboard=False, async_checkpointing=False)
  return c


def test_toy_run_writes_eval_scalars_with_fixed_seeds(tmp_path):
  c = _fast(_config("toy2d"), 4)
  assert tuple(c.eval.metrics) == ("toy2d",) and c.eval.every > 0   # the config's default
  c.model.update(hidden=16, depth=1, time_dim=16)
  c.data.toy2d_size = 512
  c.eval.update(every=2, num_samples=256, presets=("1nfe",), weights=("ema", "online"))
  workdir = str(tmp_path / "toy")
  result = loop.train(c, workdir, devices=ONE_DEVICE)
  evals = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
           if "eval/seconds" in r]
  assert [r["step"] for r in evals] == [2, 4]            # every 2 steps, the last at the end
  keys = {f"eval/{w}/1nfe/toy2d/{m}" for w in ("ema", "online") for m in ("swd", "mmd")}
  assert keys | {"eval/seconds", "eval/sample_seconds", "step"} == set(evals[-1])
  assert all(math.isfinite(evals[-1][k]) and evals[-1][k] >= 0 for k in keys)
  assert evals[-1]["eval/seconds"] >= evals[-1]["eval/sample_seconds"] > 0
  # The final evaluation is the metric of generate's samples (seed eval.seed) of the state.
  setup = loop.build(c, ONE_DEVICE)
  x = generate.generate(setup.apply_fn, result.state.ema, None, "1nfe", key=0, x_shape=(2,),
                        num=256, mesh=setup.mesh, rules=setup.rules)
  ev = sample_metrics.make_evaluators(("toy2d",), c.data, (2,))
  want = sample_metrics.evaluate(x, None, ev)
  assert evals[-1]["eval/ema/1nfe/toy2d/swd"] == pytest.approx(want["toy2d/swd"], rel=1e-4)
  assert evals[-1]["eval/ema/1nfe/toy2d/mmd"] == pytest.approx(want["toy2d/mmd"], rel=1e-3)


@pytest.mark.parametrize("field, value, message", [
    ("metrics", ("fid",), r"config.eval.metrics must be a subset of"),
    ("metrics", ("mnist",), r"config.eval.metrics=\('mnist',\): the 'mnist' metrics need config.data.source="
     r".*--config.eval.metrics='\(\)'"),
    ("weights", ("ema_0.5",), r"config.eval.weights has 'ema_0.5'"),
    ("presets", ("3nfe",), r"config.eval.presets must be"),
    ("metrics", ("inception",), r"config.eval.inception_weights must be"),
])
def test_eval_config_mistakes_name_the_field(tmp_path, field, value, message):
  c = _fast(_config("toy2d"), 2)
  c.eval[field] = value
  with pytest.raises(errors.ConfigError, match=message):
    loop.train(c, str(tmp_path / "w"), devices=ONE_DEVICE)
  assert not (tmp_path / "w").exists()    # stopped before anything was written


class TinyInception(nnx.Module):
  """Stand-in for the FID InceptionV3: conv -> mean -> 16 features -> 7 logits."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), 8, rngs=rngs)
    self.proj = nnx.Linear(8, 16, rngs=rngs)
    self.fc = nnx.Linear(16, 7, rngs=rngs)

  def __call__(self, x):
    from twinflow_jax.models.inception import InceptionOutput
    pool = jax.numpy.tanh(self.proj(jax.numpy.mean(jax.nn.relu(self.conv(x)), axis=(1, 2))))
    unbiased = pool @ self.fc.kernel[...]
    return InceptionOutput(pool, unbiased + self.fc.bias[...], unbiased)


@pytest.fixture(scope="module")
def latent_data(tmp_path_factory):
  """8 random 16 x 16 images of 2 classes, encoded by the tiny SD VAE: 8 x 8 x 4 latents."""
  root = tmp_path_factory.mktemp("latents")
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    os.makedirs(root / "img" / c)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
          root / "img" / c / f"{i}.png")
  out = str(root / "prepared")
  assert prepare.main([f"--vae={SD_VAE}", f"--image_folder={root / 'img'}",
                       "--image_size=16", f"--output={out}", "--batch_size=8", "--quiet"]) == 0
  return out


def test_latent_run_decodes_grids_and_measures_decoded_images(latent_data, tmp_path,
                                                              monkeypatch):
  model = TinyInception(nnx.Rngs(0))
  weights = tmp_path / "inception.npz"
  weights.write_bytes(b"stand-in")     # the loader is replaced by the tiny network
  monkeypatch.setattr(convert_inception, "load_inception", lambda path, **kw: model)
  ref_images = np.random.default_rng(1).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
  acts = extractor.ActivationExtractor(model)(ref_images)
  ref_path = str(tmp_path / "ref.npz")
  reference_lib.save_reference(ref_path, reference_lib.ReferenceStats(
      acts.pool.mean(0), np.cov(acts.pool, rowvar=False)))

  meta = latent_metadata.read_metadata(latent_data)
  c = _fast(_config("default"), 2)
  c.train.num_samples = 16
  c.model.update(depth=1, hidden_size=32, num_heads=2, input_size=8, in_channels=4,
                 num_classes=2)
  c.data.update(latent_metadata.config_fields(meta, latent_data))
  c.data.update(read_threads=1, prefetch_buffer_size=2)
  c.loss.update(estimate_order=1, enhanced_ratio=0.0)   # fewer network calls to compile
  c.eval.update(metrics=("inception",), every=0, at_end=True, num_samples=16, batch_size=16,
                inception_weights=str(weights), reference=ref_path, seed=5,
                inception_metrics=("fid", "inception_score"))
  workdir = str(tmp_path / "run")
  grids = []
  write = loop.write_samples
  monkeypatch.setattr(loop, "write_samples",
                      lambda w, step, samples, *a: grids.append(samples) or write(
                          w, step, samples, *a))
  loop.train(c, workdir, devices=ONE_DEVICE)
  [ev] = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "eval/seconds" in r]
  # The final grid shows decoded images, not latents.
  assert [g["1nfe"].shape for g in grids] == [(16, 16, 16, 3)]
  assert np.abs(grids[0]["1nfe"]).max() <= 1.0

  # The sample command (same seed: the same samples) decodes them and measures the decoded
  # images with the trainer's numbers; by hand: VAE decode -> tiny Inception -> FID.
  out = str(tmp_path / "s.npz")
  assert sample.main(["--workdir", workdir, "--num", "16", "--seed", "5", "--out", out,
                      "--metrics", "inception", "--inception-weights", str(weights),
                      "--reference", ref_path]) == 0
  with np.load(out) as f:
    assert f["samples"].shape == (16, 8, 8, 4) and f["images"].shape == (16, 16, 16, 3)
    assert f["images"].dtype == np.uint8
    x, got = f["samples"], json.loads(str(f["metrics"]))
  vae = diffusers_vae.load_diffusers_vae(SD_VAE)
  decoded = vae_codec.decode(x, vae, meta, output="float", mesh=vae_lib.batch_mesh())
  evaluator = sample_metrics.make_evaluators(
      ("inception",), c.data, (16, 16, 3), reference=ref_path, inception_model=model)
  want = sample_metrics.evaluate(decoded, np.arange(16) % 2, evaluator)
  for key in ("fid", "inception_score"):
    assert ev[f"eval/ema/1nfe/inception/{key}"] == pytest.approx(want[f"inception/{key}"],
                                                                 rel=1e-3)
    assert got[f"inception/{key}"] == pytest.approx(want[f"inception/{key}"], rel=1e-3)
  # --no-decode keeps latents; a VAE folder that is not there is one clear line.
  assert sample.main(["--workdir", workdir, "--num", "4", "--out", out, "--no-decode"]) == 0
  with np.load(out) as f:
    assert "images" not in f.files
  with pytest.raises(SystemExit):
    sample.main(["--workdir", workdir, "--num", "4", "--out", out,
                 "--vae", str(tmp_path / "nowhere")])
