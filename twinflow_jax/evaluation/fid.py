"""Frechet distance between Gaussians fitted to features (FID), in float64 numpy.

  FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

The ADM suite and pytorch-fid take `scipy.linalg.sqrtm(S1 @ S2)`, a Schur-based square
root of a non-symmetric product; with fewer samples than feature dimensions (S1, S2
rank-deficient) it can return complex or inaccurate values and needs an eps retry.
Here the trace term is computed from symmetric matrices only:

  tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = sum_i sqrt(lambda_i),

where lambda_i are the eigenvalues of the PSD matrix S1^{1/2} S2 S1^{1/2} (S1 S2 is
similar to it), S1^{1/2} comes from an eigendecomposition, and round-off negatives are
clipped to 0. Everything runs in float64 with numpy's `eigh`, so no scipy is needed;
tests check it against `scipy.linalg.sqrtm`. Covariances use ddof=1 (`np.cov`), as ADM,
pytorch-fid and TTUR do.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GaussianStats(NamedTuple):
  """Mean [D] and covariance [D, D] of a feature set (float64)."""
  mu: np.ndarray
  sigma: np.ndarray


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Square root of a symmetric positive semi-definite matrix [D, D] (float64).

  Uses the eigendecomposition of (a + a^T) / 2; eigenvalues below 0 (round-off) are
  treated as 0. The result is symmetric PSD and squares back to `a`.
  """
  a = np.asarray(a, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f'sqrtm_psd expects a square matrix, got shape {a.shape}')
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^{1/2}) for PSD covariances [D, D] (float64, symmetric route)."""
  s1 = sqrtm_psd(sigma1)
  m = s1 @ np.asarray(sigma2, np.float64) @ s1
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].

  Returns:
    The squared Frechet (2-Wasserstein) distance, >= 0 up to round-off; FID when the
    statistics are of Inception pool_3 features.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
      np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
      np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (
      mu1.shape[0],) * 2:
    raise ValueError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma '
                     f'{sigma1.shape} vs {sigma2.shape}')
  for name, v in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
    if not np.all(np.isfinite(v)):
      raise ValueError(f'{name} holds non-finite values')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def gaussian_stats(features: np.ndarray) -> GaussianStats:
  """Mean and covariance (ddof=1) of features [N, D], N >= 2, in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'need features [N >= 2, D], got shape {f.shape}')
  return GaussianStats(f.mean(axis=0), np.cov(f, rowvar=False))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two feature sets [N1, D] and [N2, D]."""
  s1, s2 = gaussian_stats(features1), gaussian_stats(features2)
  return frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)


class RunningStats:
  """Streaming mean / covariance (ddof=1) of feature batches, in float64.

  Sums are taken around a fixed shift (the first batch's mean) so that the
  E[x x^T] - mu mu^T cancellation stays small; memory is O(D^2), not O(N D).
  """

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._shift = None
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    """Adds features [B, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f'expected features [B, {self.dim}], got shape {f.shape}')
    if not len(f):
      return
    if self._shift is None:
      self._shift = f.mean(axis=0)
    c = f - self._shift
    self._sum += c.sum(axis=0)
    self._outer += c.T @ c
    self.count += len(f)

  def result(self) -> GaussianStats:
    if self.count < 2:
      raise ValueError(f'need at least 2 feature vectors, have {self.count}')
    mean_c = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(mean_c, mean_c)) / (self.count - 1)
    return GaussianStats(self._shift + mean_c, (sigma + sigma.T) / 2)
