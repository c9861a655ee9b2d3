"""FID, matrix square root, Inception Score, precision/recall, reference files.

All on cheap synthetic features or logits: no Inception needed.
"""

import numpy as np
import pytest
import scipy.linalg

from twinflow_jax.evaluation import fid
from twinflow_jax.evaluation.extractor import Activations
from twinflow_jax.evaluation.inception_metrics import inception_metrics
from twinflow_jax.evaluation.inception_score import (inception_score,
                                                     inception_score_per_split)
from twinflow_jax.evaluation.precision_recall import (manifold_radii,
                                                      precision_recall)
from twinflow_jax.evaluation.reference import (ReferenceStats, load_reference,
                                               save_reference)


def random_spd(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------------------------ sqrtm / FID


@pytest.mark.parametrize('rank', [None, 5])
def test_sqrtm_psd_matches_scipy(rank):
  rng = np.random.default_rng(0)
  a = random_spd(rng, 24, rank)
  ours = fid.sqrtm_psd(a)
  np.testing.assert_allclose(ours @ ours, a, atol=1e-10)
  want = np.real(scipy.linalg.sqrtm(a))
  np.testing.assert_allclose(ours, want, atol=1e-6 if rank else 1e-10)


def test_trace_sqrt_product_matches_scipy_on_nonsymmetric_product():
  rng = np.random.default_rng(1)
  s1, s2 = random_spd(rng, 32), random_spd(rng, 32)
  want = np.trace(np.real(scipy.linalg.sqrtm(s1 @ s2)))
  assert fid.trace_sqrt_product(s1, s2) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_closed_forms():
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  want = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want)
  # Same as the ADM / pytorch-fid scipy formula on full covariances.
  rng = np.random.default_rng(2)
  s1, s2 = random_spd(rng, 16), random_spd(rng, 16)
  m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
  adm = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
      np.real(scipy.linalg.sqrtm(s1 @ s2)))
  assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(adm, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
  rng = np.random.default_rng(3)
  feats = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32)) + 1.0
  assert abs(fid.fid_from_features(feats, feats)) < 1e-9
  # Fewer samples than dimensions (rank-deficient covariances): finite and ~0 relative
  # to the traces (square roots of round-off-sized eigenvalues; scipy: ~1.5e-5 here).
  few = feats[:20]
  scale = np.trace(fid.gaussian_stats(few).sigma)
  assert abs(fid.fid_from_features(few, few)) < 1e-7 * scale
  noise = rng.standard_normal(feats.shape)
  values = [fid.fid_from_features(feats, feats + s * noise)
            for s in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)]
  assert values[0] > 1e-4
  assert all(b > a for a, b in zip(values, values[1:])), values


def test_running_stats_equal_batch_stats():
  rng = np.random.default_rng(4)
  feats = rng.standard_normal((257, 12)) * 3 + 100.0  # large mean: cancellation check
  running = fid.RunningStats(12)
  for start in range(0, len(feats), 50):
    running.update(feats[start:start + 50])
  got, want = running.result(), fid.gaussian_stats(feats)
  np.testing.assert_allclose(got.mu, want.mu, rtol=1e-12)
  np.testing.assert_allclose(got.sigma, want.sigma, atol=1e-10)
  np.testing.assert_allclose(want.sigma, np.cov(feats, rowvar=False))


def test_frechet_distance_rejects_mismatched_stats():
  with pytest.raises(ValueError, match='do not match'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ------------------------------------------------------------------------- Inception Score


def test_inception_score_known_logits():
  k, n = 10, 200
  assert inception_score(np.zeros((n, k))) == pytest.approx(1.0)
  one_hot = 1e4 * np.eye(k)[np.arange(n) % k]  # confident, balanced over k classes
  assert inception_score(one_hot) == pytest.approx(k)
  same_class = 1e4 * np.eye(k)[np.zeros(n, int)]  # confident, one class
  assert inception_score(same_class) == pytest.approx(1.0)
  # Splits are scored separately: each split of 5 covers classes 0..4 or 5..9.
  halves = 1e4 * np.eye(k)[np.r_[np.arange(5), np.arange(5, 10)]]
  np.testing.assert_allclose(inception_score_per_split(halves, split_size=5), [5, 5])
  assert inception_score(halves, split_size=10) == pytest.approx(10)


# --------------------------------------------------------------------- precision / recall


def brute_radii(x, k):
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  return np.sort(d, axis=1)[:, k]


def test_manifold_radii_match_brute_force_with_ragged_blocks():
  x = np.random.default_rng(5).standard_normal((23, 6)).astype(np.float32)
  np.testing.assert_allclose(manifold_radii(x, k=3, block_size=7), brute_radii(x, 3),
                             rtol=1e-4)


def test_precision_recall_known_distributions():
  rng = np.random.default_rng(6)
  a = rng.standard_normal((60, 8)).astype(np.float32)
  b = rng.standard_normal((60, 8)).astype(np.float32) + 100.0
  assert precision_recall(a, a, block_size=16) == (1.0, 1.0)
  assert precision_recall(a, b, block_size=16) == (0.0, 0.0)
  # Generated = one of two far clusters of the real data: precise, half the recall.
  real = np.concatenate([a, b])
  pr = precision_recall(real, a[:40], block_size=16)
  assert pr.precision == 1.0
  assert 0.3 < pr.recall <= 0.5
  # Blocked JAX result == brute force numpy on overlapping clouds.
  fake = rng.standard_normal((37, 8)).astype(np.float32) * 1.3 + 0.5
  rr, fr = brute_radii(a, 3), brute_radii(fake, 3)
  d = ((a[:, None] - fake[None]) ** 2).sum(-1)
  want_p = np.mean((d <= rr[:, None]).any(axis=0))
  want_r = np.mean((d <= fr[None, :]).any(axis=1))
  got = precision_recall(a, fake, block_size=16)
  assert got == pytest.approx((want_p, want_r))
  assert 0 < got.precision < 1 and 0 < got.recall < 1


# ---------------------------------------------------------------------------- references


def test_reference_round_trip_and_adm_format(tmp_path):
  rng = np.random.default_rng(7)
  act = rng.standard_normal((30, 4)).astype(np.float32)
  stats = fid.gaussian_stats(act)
  path = str(tmp_path / 'ref.npz')
  save_reference(path, ReferenceStats(stats.mu, stats.sigma, act[:10], 30, 'adm'))
  ref = load_reference(path)
  np.testing.assert_array_equal(ref.sigma, stats.sigma)
  np.testing.assert_array_equal(ref.act, act[:10])
  assert (ref.num_images, ref.preprocess, ref.has_images) == (30, 'adm', False)
  adm = str(tmp_path / 'VIRTUAL_adm.npz')  # the ADM suite's reference-batch keys
  np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=stats.mu, sigma=stats.sigma,
           mu_s=stats.mu, sigma_s=stats.sigma)
  ref = load_reference(adm)
  assert ref.has_images and ref.act is None
  np.testing.assert_array_equal(ref.mu, stats.mu)
  np.savez(str(tmp_path / 'bad.npz'), arr_0=np.zeros(3))
  with pytest.raises(ValueError, match='no mu / sigma'):
    load_reference(str(tmp_path / 'bad.npz'))


def test_inception_metrics_from_activations():
  rng = np.random.default_rng(8)
  pool = rng.standard_normal((50, 6)).astype(np.float32)
  logits = 1e4 * np.eye(5)[np.arange(50) % 5]
  stats = fid.gaussian_stats(pool)
  ref = ReferenceStats(stats.mu, stats.sigma, act=pool)
  out = inception_metrics(Activations(pool, logits), ref)
  assert out['fid'] == pytest.approx(0.0, abs=1e-9)
  assert out['inception_score'] == pytest.approx(5.0)
  assert (out['precision'], out['recall']) == (1.0, 1.0)
  with pytest.raises(ValueError, match='reference activations'):
    inception_metrics(Activations(pool, logits), ReferenceStats(stats.mu, stats.sigma),
                      ['precision'])
