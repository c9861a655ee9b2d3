"""Sharded activation extractor and the fid_stats command, with a tiny Inception stand-in.

The extractor only needs a model returning `.pool` and `.logits_unbiased`; a one-conv
network keeps these tests cheap (the real network's parity is in
test_models_inception.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.evaluation import fid, fid_stats
from twinflow_jax.evaluation import preprocess as pre
from twinflow_jax.evaluation.extractor import ActivationExtractor
from twinflow_jax.evaluation.reference import load_reference
from twinflow_jax.models.convert import inception as convert_inception
from twinflow_jax.models.inception import InceptionOutput


class TinyInception(nnx.Module):
  """conv 3x3/4 (8 ch) -> ReLU -> mean -> linear to `features` (pool) -> 7-way linear."""

  def __init__(self, rngs: nnx.Rngs, features: int = 2048):
    self.conv = nnx.Conv(3, 8, (3, 3), 4, rngs=rngs)
    self.proj = nnx.Linear(8, features, rngs=rngs)
    self.fc = nnx.Linear(features, 7, rngs=rngs)

  def __call__(self, x):
    pool = jnp.tanh(self.proj(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2))))
    unbiased = pool @ self.fc.kernel[...]
    return InceptionOutput(pool, unbiased + self.fc.bias[...], unbiased)


@pytest.fixture(scope='module')
def model():
  return TinyInception(nnx.Rngs(0), features=16)


def images(n, h=10, w=12, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_sharded_equals_unsharded_with_partial_last_batch(model):
  assert jax.device_count() == 8
  x = images(13)
  one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  seen = []
  sharded = ActivationExtractor(model, batch_size=8, image_size=16)(
      x, progress=lambda d, t: seen.append((d, t)))
  single = ActivationExtractor(model, mesh=one_device, batch_size=4, image_size=16)(x)
  direct = model(pre.inception_input(jnp.asarray(x), 'adm', 16))
  assert sharded.pool.shape == (13, 16) and sharded.logits.shape == (13, 7)
  np.testing.assert_allclose(sharded.pool, single.pool, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sharded.pool, direct.pool, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded.logits, direct.logits_unbiased, rtol=1e-5, atol=1e-6)
  assert seen == [(8, 13), (13, 13)]
  # A sharded jax.Array of samples (as the sampler returns them) works directly.
  mesh = jax.make_mesh((8,), ('data',))
  sharded_x = jax.device_put(x[:8], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data')))
  from_jax = ActivationExtractor(model, batch_size=8, image_size=16)(sharded_x)
  np.testing.assert_allclose(from_jax.pool, sharded.pool[:8], rtol=1e-6, atol=1e-6)


def test_project_mesh_float_samples_and_grey_images(model):
  from twinflow_jax.train.mesh import create_mesh  # pylint: disable=g-import-not-at-top
  mesh = create_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  samples = np.random.default_rng(1).uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
  got = ActivationExtractor(model, mesh=mesh, batch_size=4, image_size=16)(samples)
  u8 = pre.samples_to_uint8(samples)
  want = model(pre.inception_input(jnp.asarray(u8), 'adm', 16))
  np.testing.assert_allclose(got.pool, want.pool, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='multiple of the 4 batch shards'):
    ActivationExtractor(model, mesh=mesh, batch_size=6)
  with pytest.raises(ValueError, match=r'samples in \[-1, 1\]'):
    ActivationExtractor(model, mesh=mesh, batch_size=4, image_size=16)(samples * 3)


@pytest.fixture
def tiny_loader(monkeypatch):
  """fid_stats with the 2048-d tiny network in place of the converted Inception."""
  tiny = TinyInception(nnx.Rngs(1))
  monkeypatch.setattr(convert_inception, 'load_inception', lambda path: tiny)
  return tiny


def test_fid_stats_command_npz_and_adm_batch(tiny_loader, tmp_path, capsys):
  x = images(11, 20, 20)
  src, out = str(tmp_path / 'imgs.npz'), str(tmp_path / 'ref.npz')
  np.savez(src, arr_0=x)
  assert fid_stats.main(['--inception', 'unused', '--images', src, '--out', out,
                         '--keep-act', '4', '--batch-size', '8', '--chunk', '5']) == 0
  printed = capsys.readouterr().out
  assert 'fid_stats: 11/11 images' in printed and 'wrote' in printed
  ref = load_reference(out)
  acts = ActivationExtractor(tiny_loader, batch_size=8)(x)
  want = fid.gaussian_stats(acts.pool)
  np.testing.assert_allclose(ref.mu, want.mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.sigma, want.sigma, rtol=1e-4, atol=1e-7)
  assert ref.act.shape == (4, 2048) and ref.num_images == 11
  for row in ref.act:  # a subset of the images' activations
    assert np.abs(acts.pool - row).max(axis=1).min() < 1e-5
  # An ADM reference batch keeps its own mu / sigma and gains `act`.
  adm, out2 = str(tmp_path / 'VIRTUAL.npz'), str(tmp_path / 'ref2.npz')
  np.savez(adm, arr_0=x, mu=np.ones(2048), sigma=np.eye(2048))
  assert fid_stats.main(['--inception', 'unused', '--images', adm, '--out', out2,
                         '--batch-size', '8']) == 0
  ref2 = load_reference(out2)
  np.testing.assert_array_equal(ref2.mu, np.ones(2048))
  assert ref2.act.shape == (11, 2048)


def test_fid_stats_command_data_config(tiny_loader, tmp_path):
  out = str(tmp_path / 'mnist.npz')
  assert fid_stats.main(['--inception', 'unused', '--data-config', 'configs/default.py',
                         '--out', out, '--max-images', '24', '--keep-act', '0',
                         '--batch-size', '8']) == 0
  ref = load_reference(out)
  assert ref.num_images == 24 and ref.act is None
  assert np.all(np.isfinite(ref.sigma)) and np.trace(ref.sigma) > 0


def test_fid_stats_command_errors(tmp_path, capsys):
  out = str(tmp_path / 'ref.npz')
  assert fid_stats.main(['--inception', 'x', '--images', str(tmp_path / 'none.npy'),
                         '--out', out]) == 1
  assert 'not found' in capsys.readouterr().err
  np.save(str(tmp_path / 'imgs.npy'), images(3))
  open(out, 'w').close()
  assert fid_stats.main(['--inception', 'x', '--images', str(tmp_path / 'imgs.npy'),
                         '--out', out]) == 1
  assert '--overwrite' in capsys.readouterr().err


def test_inception_evaluator_clips_model_samples(model):
  # Samples of a young model overshoot [-1, 1]; the evaluation clips them as the ADM suite
  # does instead of failing the run (user images out of range are still refused above).
  from twinflow_jax.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
  evaluate = sample_metrics.make_evaluators(
      ('inception',), None, (8, 8, 1), inception_model=model,
      inception_metrics=('inception_score',), inception_batch_size=8)['inception']
  x = np.random.default_rng(2).uniform(-3, 3, (8, 8, 8, 1)).astype(np.float32)
  got = evaluate(x)
  assert got == evaluate(np.clip(x, -1, 1)) and np.isfinite(got['inception_score'])


def test_npz_member_images_errors(tmp_path):
  from twinflow_jax.evaluation.image_sources import NpzMemberImages  # pylint: disable=g-import-not-at-top
  bad = tmp_path / 'bad.npz'
  bad.write_text('not a zip')
  good = str(tmp_path / 'x.npz')
  np.savez(good, labels=np.arange(10), x=images(2, 8, 8))
  for path, key, match in ((str(bad), None, 'not an .npz file'),
                           (good, 'nokey', "has no key 'nokey'"),
                           (good, 'labels', r'expected images \[N, H, W\(, C\)\], got shape '
                                            r'\(10,\)')):
    with pytest.raises(ValueError, match=match):
      NpzMemberImages(path, key)
  assert NpzMemberImages(good, 'x').shape == (2, 8, 8, 3)
