"""Offline metrics of class-conditional MNIST samples, judged by the bundled classifier.

Nothing is downloaded: the reference is the 5000 digits bundled with the package, brought
to the samples' resolution exactly as the trainer's data pipeline does (pad to 32 x 32,
antialiased resize to S x S, [-1, 1]), and the judge is the small CNN of
`evaluation.classifier` trained on those digits at that resolution.

The digits are split once, with a fixed seed, into 4000 for training the classifier (also
the FID reference set) and 1000 held out (100 per class), used for the classifier's
reported accuracy and as the "real-digit floor" that every generated set is compared with:
1000 held-out real digits go through exactly the metric a set of 1000 samples does.

Metrics (`MnistEvaluator.evaluate`, keys as returned):
  class_acc       fraction of samples the classifier assigns to the class they were asked
                  for (argmax of the logits); class_acc_min: the worst class's.
  fid             Frechet distance between Gaussians fitted to the classifier's 128-d
                  penultimate features of the samples and of the 4000 reference digits.
                  Like every FID it is biased upwards for small sets: compare sets of one
                  size (the floor uses 1000 digits).
  div_pixel       within-class diversity in pixel space: for each class, the mean over all
                  pairs i != j of samples of that class of the RMS pixel difference
                  ||x_i - x_j||_2 / sqrt(H W C) (pixels in [-1, 1], clipped), averaged over
                  classes (classes with fewer than 2 samples are left out).
  div_feat        the same in classifier-feature space: the mean pairwise Euclidean distance
                  of the 128-d features within a class, averaged over classes.
  div_pixel_rel   div_pixel / the real held-out digits' div_pixel (1.0 = as diverse as real
                  digits); div_feat_rel likewise. The pairwise mean does not depend on the
                  number of samples per class (it is a U-statistic), so sets of any size
                  compare.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from twinflow_jax.data import sources
from twinflow_jax.evaluation import classifier as classifier_lib

SPLIT_SEED = 0
HELDOUT_PER_CLASS = 100
NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
  """(train [4000], heldout [1000]) indices into the bundled digits; 100 per class held out.

  Fixed: a per-class random choice with `SPLIT_SEED`, both sorted.
  """
  _, labels = sources.load_mnist()
  rng = np.random.default_rng(SPLIT_SEED)
  held = np.concatenate([rng.choice(np.flatnonzero(labels == c), HELDOUT_PER_CLASS,
                                    replace=False) for c in range(NUM_CLASSES)])
  held = np.sort(held)
  train = np.setdiff1d(np.arange(len(labels)), held)
  return train, held


def real_digits(resolution: int, split: str = "all", channels: int = 1
                ) -> tuple[np.ndarray, np.ndarray]:
  """Bundled digits as the trainer sees them: (x float32 [N, S, S, C] in [-1, 1], labels).

  Args:
    resolution: S (the trainer's config.data.image_size).
    split: 'train' (4000), 'heldout' (1000, 100 per class) or 'all' (5000).
    channels: 1, or 3 (tiled), as config.data.channels.
  """
  images, labels = sources.load_mnist()
  train, held = split_indices()
  idx = {"train": train, "heldout": held, "all": np.arange(len(labels))}.get(split)
  if idx is None:
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
  batch = sources.MnistLoader(images, labels, int(resolution), channels)(idx)
  return batch["x"], batch["label"]


def class_accuracy(logits: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES
                   ) -> tuple[float, np.ndarray]:
  """(overall accuracy, per-class accuracy [num_classes], NaN for absent classes)."""
  pred = np.asarray(logits).argmax(-1)
  labels = np.asarray(labels)
  hit = pred == labels
  per = np.array([hit[labels == c].mean() if np.any(labels == c) else np.nan
                  for c in range(num_classes)])
  return float(hit.mean()), per


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean [D], covariance [D, D]) in float64 (unbiased covariance)."""
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for symmetric PSD covariances.

  tr((S1 S2)^(1/2)) is computed as sum sqrt(eig(A S2 A)) with A = S1^(1/2) (symmetric
  eigendecompositions only, so no complex round-off as with a general sqrtm).
  """
  w, v = np.linalg.eigh(sigma1)
  a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = a @ sigma2 @ a
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)


def mean_pairwise_distance(x: np.ndarray, block: int = 64) -> float:
  """Mean Euclidean distance over all pairs i != j of the rows of x [n, D] (n >= 2).

  Differences are formed directly (in blocks of rows), so identical rows are exactly 0.
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  n = len(x)
  if n < 2:
    raise ValueError("mean_pairwise_distance needs at least 2 rows")
  total = 0.0
  for i in range(0, n, block):
    d = np.sqrt(((x[i:i + block, None, :] - x[None, :, :]) ** 2).sum(-1))
    total += d.sum()       # the diagonal (i == j) adds zeros
  return float(total / (n * (n - 1)))


def within_class_diversity(x: np.ndarray, labels: np.ndarray, num_classes: int = NUM_CLASSES,
                           per_dim: bool = False) -> float:
  """Mean over classes of the mean pairwise distance within the class.

  Args:
    x: [N, ...] samples (or features); flattened per sample.
    labels: [N] class of each sample.
    num_classes: classes 0..num_classes-1 are considered; those with < 2 samples skipped.
    per_dim: divide distances by sqrt(D) (RMS difference per pixel).

  Returns:
    The average, or NaN when no class has two samples.
  """
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  labels = np.asarray(labels)
  vals = [mean_pairwise_distance(x[labels == c]) for c in range(num_classes)
          if np.sum(labels == c) >= 2]
  if not vals:
    return float("nan")
  scale = np.sqrt(x.shape[1]) if per_dim else 1.0
  return float(np.mean(vals) / scale)


@dataclasses.dataclass(frozen=True)
class Reference:
  """Reference statistics of real digits at one resolution."""
  mu: np.ndarray
  sigma: np.ndarray
  div_pixel: float
  div_feat: float


class MnistEvaluator:
  """Judges class-conditional digit samples at one resolution (see the module doc)."""

  def __init__(self, resolution: int, channels: int = 1,
               clf: classifier_lib.Classifier | None = None):
    self.resolution = int(resolution)
    self.channels = int(channels)
    self.classifier = clf or classifier_lib.load_for_resolution(self.resolution)
    x_ref, _ = real_digits(self.resolution, "train", self.channels)
    feats_ref, _ = self.classifier.apply(x_ref)
    x_held, y_held = real_digits(self.resolution, "heldout", self.channels)
    feats_held, _ = self.classifier.apply(x_held)
    mu, sigma = gaussian_stats(feats_ref)
    self.reference = Reference(
        mu, sigma, within_class_diversity(x_held, y_held, per_dim=True),
        within_class_diversity(feats_held, y_held))

  def evaluate(self, samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of samples [N, S, S, C] (model space, [-1, 1]) asked for classes labels [N].

    Returns:
      {'class_acc', 'class_acc_min', 'fid', 'div_pixel', 'div_feat', 'div_pixel_rel',
       'div_feat_rel'} as floats (see the module docstring).
    """
    samples = np.asarray(samples, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if samples.shape[0] != labels.shape[0]:
      raise ValueError(f"{samples.shape[0]} samples but {labels.shape[0]} labels")
    if np.any((labels < 0) | (labels >= NUM_CLASSES)):
      raise ValueError("MNIST metrics need class labels in [0, 10) (not the null class)")
    feats, logits = self.classifier.apply(samples)
    acc, per = class_accuracy(logits, labels)
    mu, sigma = gaussian_stats(feats)
    div_pixel = within_class_diversity(np.clip(samples, -1, 1), labels, per_dim=True)
    div_feat = within_class_diversity(feats, labels)
    ref = self.reference
    return {"class_acc": acc, "class_acc_min": float(np.nanmin(per)),
            "fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
            "div_pixel": div_pixel, "div_feat": div_feat,
            "div_pixel_rel": div_pixel / ref.div_pixel, "div_feat_rel": div_feat / ref.div_feat}

  def per_class_accuracy(self, samples: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Accuracy of each class [10] (NaN where a class is absent)."""
    _, logits = self.classifier.apply(samples)
    return class_accuracy(logits, labels)[1]

  def real_floor(self) -> dict[str, float]:
    """The metrics of the 1000 held-out real digits (what a perfect generator scores)."""
    x, y = real_digits(self.resolution, "heldout", self.channels)
    return self.evaluate(x, y)
