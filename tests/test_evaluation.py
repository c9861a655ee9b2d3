"""Offline evaluation: toy-data distances, MNIST metrics and the bundled digit classifier."""

import json

import ml_collections
import numpy as np
import pytest

from twinflow_jax.data import toy2d
from twinflow_jax.evaluation import classifier
from twinflow_jax.evaluation import mnist
from twinflow_jax.evaluation import sample_metrics
from twinflow_jax.evaluation import toy

# The committed 16 x 16 classifier must classify held-out real digits at least this well
# (measured: 0.97; the real digits at 16 x 16 are ~10 pixels tall).
HELDOUT_ACCURACY_FLOOR = 0.95


# ----------------------------------------------------------------------------- toy metrics


def _gaussians(n, seed):
  return toy2d.sample_toy2d("gaussians8", n, np.random.default_rng(seed))


def test_swd_and_mmd_vanish_for_one_distribution_and_grow_with_a_shift():
  a, b = _gaussians(1000, 1), _gaussians(1000, 2)
  assert toy.sliced_wasserstein(a, a) == 0.0
  same_swd, same_mmd = toy.sliced_wasserstein(a, b), toy.mmd_rbf(a, b)
  assert same_swd < 0.1 and abs(same_mmd) < 0.02
  swds = [toy.sliced_wasserstein(a, b + [d, 0.0]) for d in (0.2, 0.5, 1.0)]
  mmds = [toy.mmd_rbf(a, b + [d, 0.0]) for d in (0.2, 0.5, 1.0)]
  assert same_swd < swds[0] < swds[1] < swds[2]
  assert same_mmd < mmds[0] < mmds[1] < mmds[2]
  assert mmds[0] > 5 * abs(same_mmd)
  # A collapsed generator (every point at one mode) is far from the data.
  collapsed = np.broadcast_to(a[:1], a.shape)
  assert toy.mmd_rbf(collapsed, b) > mmds[1]


def test_mmd_matches_a_direct_sum():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 2)), rng.normal(size=(4, 2)) + 0.5
  k = lambda x, y: sum(np.exp(-np.sum((x - y) ** 2) / (2 * s * s)) for s in (0.5, 2.0))
  aa = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / 20
  bb = sum(k(b[i], b[j]) for i in range(4) for j in range(4) if i != j) / 12
  ab = sum(k(x, y) for x in a for y in b) / 20
  np.testing.assert_allclose(toy.mmd_rbf(a, b, (0.5, 2.0)), aa + bb - 2 * ab, rtol=1e-10)


# ------------------------------------------------------------------------ metric functions


def test_diversity_and_pairwise_distance():
  x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(mnist.mean_pairwise_distance(x), (5 + 0 + 5) / 3)
  same = np.ones((6, 4, 4, 1))
  labels = np.array([0, 0, 0, 1, 1, 1])
  assert mnist.within_class_diversity(same, labels) == 0.0
  # per_dim: the RMS pixel difference; two classes average.
  x = np.zeros((4, 2, 2, 1))
  x[1] = 1.0
  x[3] = 0.5
  np.testing.assert_allclose(
      mnist.within_class_diversity(x, np.array([0, 0, 1, 1]), per_dim=True), (1 + 0.5) / 2)


def test_frechet_distance_known_values():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(500, 6))
  mu, sigma = mnist.gaussian_stats(f)
  assert abs(mnist.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  shift = np.arange(6.0)
  np.testing.assert_allclose(mnist.frechet_distance(mu + shift, sigma, mu, sigma),
                             shift @ shift, rtol=1e-8)
  # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  np.testing.assert_allclose(mnist.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3),
                                                    np.diag(b)), 2.0, rtol=1e-10)
  # A rotated full covariance against itself.
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  s = q @ np.diag(a) @ q.T
  assert abs(mnist.frechet_distance(np.zeros(3), s, np.zeros(3), s)) < 1e-8


# ------------------------------------------------------------------------------ classifier


def test_committed_classifier_held_out_accuracy():
  clf = classifier.load_for_resolution(16)
  assert clf.meta["arch"] == classifier.ARCH and clf.meta["resolution"] == 16
  x, y = mnist.real_digits(16, "heldout")
  assert x.shape == (1000, 16, 16, 1) and np.bincount(y).tolist() == [100] * 10
  acc, per = mnist.class_accuracy(clf.apply(x)[1], y)
  assert acc >= HELDOUT_ACCURACY_FLOOR, acc
  np.testing.assert_allclose(acc, clf.meta["heldout_accuracy"], atol=2e-3)
  assert per.min() >= 0.85, per


def test_split_is_fixed_and_disjoint():
  train, held = mnist.split_indices()
  assert len(train) == 4000 and len(held) == 1000 and not set(train) & set(held)


def test_missing_resolution_explains_how_to_train_one():
  with pytest.raises(FileNotFoundError, match="tools/train_mnist_classifier.py --resolution 12"):
    classifier.load_for_resolution(12)


def test_classifier_file_round_trip(tmp_path):
  params = classifier.init_params(0)
  path = str(tmp_path / "c.npz")
  classifier.save(path, params, {"arch": classifier.ARCH, "resolution": 8, "channels": 1})
  clf = classifier.load(path)
  assert clf.resolution == 8
  for layer, d in params.items():
    for name, v in d.items():
      np.testing.assert_array_equal(clf.params[layer][name], v)
  with pytest.raises(ValueError, match=r"expects images \[N, 8, 8, 1\]"):
    clf.apply(np.zeros((2, 16, 16, 1)))


# --------------------------------------------------------------------- the MNIST evaluator


@pytest.fixture(scope="module")
def evaluator():
  return mnist.MnistEvaluator(16)


def test_real_digits_floor(evaluator):
  floor = evaluator.real_floor()
  assert floor["class_acc"] >= HELDOUT_ACCURACY_FLOOR
  assert floor["div_pixel_rel"] == pytest.approx(1.0) and floor["div_feat_rel"] == pytest.approx(1.0)
  assert floor["fid"] < 5.0, floor


def test_collapsed_and_noise_samples_score_badly(evaluator):
  x, y = mnist.real_digits(16, "heldout")
  floor = evaluator.evaluate(x, y)
  # One real digit per class, repeated: right classes, no diversity, worse FID.
  first = np.array([np.flatnonzero(y == c)[0] for c in range(10)])
  collapsed = x[first][y]
  got = evaluator.evaluate(collapsed, y)
  # (features of one image at other batch positions differ by float round-off)
  assert got["div_pixel"] == 0.0 and got["div_feat"] < 1e-5
  assert got["class_acc"] >= 0.9 and got["fid"] > 5 * floor["fid"] + 5
  # Noise is neither the right class nor near the digits.
  noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
  bad = evaluator.evaluate(noise, y)
  assert bad["class_acc"] < 0.3 and bad["fid"] > got["fid"]


def test_evaluate_presets_names_and_values(evaluator):
  x, y = mnist.real_digits(16, "heldout")
  data = ml_collections.ConfigDict({"source": "mnist", "name": ""})
  evaluators = sample_metrics.make_evaluators(("mnist",), data, (16, 16, 1))
  calls = []

  def sample_fn(params, preset, labels):
    calls.append((params, preset))
    return x if params == "good" else x[::-1]     # reversed: wrong classes

  labels = sample_metrics.eval_labels(1000, 10)
  order = np.argsort(np.argsort(labels, kind="stable"))   # real digits in label order
  x = x[np.argsort(y, kind="stable")][order]
  out = sample_metrics.evaluate_presets(sample_fn, {"a": "good", "b": "bad"}, ("1nfe", "2nfe"),
                                        labels, evaluators)
  assert calls == [("good", "1nfe"), ("good", "2nfe"), ("bad", "1nfe"), ("bad", "2nfe")]
  assert out["eval/a/1nfe/mnist/class_acc"] == pytest.approx(evaluator.real_floor()["class_acc"])
  assert out["eval/b/2nfe/mnist/class_acc"] < 0.3
  assert out["eval/seconds"] >= out["eval/sample_seconds"] >= 0
  json.dumps(out)   # plain floats, ready for metrics.jsonl
  with pytest.raises(ValueError, match="unknown evaluation metrics"):
    sample_metrics.make_evaluators(("fidd",), data, (16, 16, 1))
  with pytest.raises(ValueError, match="need config.data.source='toy2d'"):
    sample_metrics.make_evaluators(("toy2d",), data, (16, 16, 1))


def test_toy_evaluator():
  data = ml_collections.ConfigDict({"source": "toy2d", "name": "moons"})
  ev = sample_metrics.make_evaluators(("toy2d",), data, (2,))
  good = toy2d.sample_toy2d("moons", 1000, np.random.default_rng(3))
  res_good = sample_metrics.evaluate(good, None, ev)
  res_bad = sample_metrics.evaluate(good * 0.5, None, ev)
  assert set(res_good) == {"toy2d/swd", "toy2d/mmd"}
  assert res_good["toy2d/swd"] < 0.05 < res_bad["toy2d/swd"]
  assert res_good["toy2d/mmd"] < 0.01 < res_bad["toy2d/mmd"]
