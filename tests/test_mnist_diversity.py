"""Within-class variance by spatial frequency (benchmarks/mnist_diversity.py)."""

import importlib.util
import pathlib

import numpy as np

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "mnist_diversity.py"
_spec = importlib.util.spec_from_file_location("mnist_diversity_benchmark", _PATH)
mnist_diversity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mnist_diversity)


def test_band_variance_sums_to_within_class_variance():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (40, 8, 8, 1))
  labels = np.repeat(np.arange(4), 10)
  v = mnist_diversity.band_variance(x, labels)
  centred = np.concatenate([x[labels == c] - x[labels == c].mean(0) for c in range(4)])
  # Parseval: the bands cover every frequency, so they add up to the per-image energy.
  np.testing.assert_allclose(v.sum(), (centred ** 2).sum((1, 2, 3)).mean(), rtol=1e-10)


def test_band_variance_separates_noise_from_shape():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(2), 50)
  base = rng.uniform(-0.5, 0.5, (2, 16, 16, 1))[labels]       # one image per class
  assert np.allclose(mnist_diversity.band_variance(base, labels), 0)
  # A per-image shift of a smooth bump varies the low bands; pixel noise mostly the top.
  ii = np.arange(16)
  bump = np.exp(-((ii[:, None] - 8) ** 2 + (ii[None] - 8) ** 2) / 8.0)[None, :, :, None]
  shifted = base + 0.5 * np.roll(bump, 1, axis=2) * rng.uniform(0, 1, (100, 1, 1, 1))
  noisy = base + 0.1 * rng.standard_normal(base.shape)
  low, high = mnist_diversity.band_variance(shifted, labels), \
      mnist_diversity.band_variance(noisy, labels)
  assert low[:2].sum() > 0.9 * low.sum()
  assert high[-3:].sum() > 0.3 * high.sum()   # white noise: spread by the bands' areas
