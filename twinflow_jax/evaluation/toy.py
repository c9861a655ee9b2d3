"""Distances between 2-D point sets (toy data): sliced Wasserstein and RBF-kernel MMD.

Pure numpy functions of two samples `a` [n, d] and `b` [m, d]; both are ~0 for two
samples of the same distribution and grow as the distributions move apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Bandwidths (kernel widths sigma) of the MMD, in data units. The toy distributions live
# on roughly [-2.5, 2.5]^2 with structure at the 0.1-1 scale; a sum over several widths
# sees both the fine structure (mode shapes) and the coarse one (mode weights).
DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0)


def _as_points(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"{name} must be points [n >= 2, d], got shape {x.shape}")
  return x


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 512,
                       seed: int = 0) -> float:
  """Sliced 1-Wasserstein distance between point sets a [n, d] and b [n, d].

  The mean, over `num_projections` random unit directions (drawn with `seed`), of the
  1-D Wasserstein-1 distance between the projected samples (mean absolute difference of
  the sorted projections). Needs equally many points in a and b.
  """
  a, b = _as_points(a, "a"), _as_points(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"sliced_wasserstein needs equal shapes, got {a.shape} and {b.shape}")
  rng = np.random.default_rng(seed)
  dirs = rng.standard_normal((a.shape[1], num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
  return float(np.mean(np.abs(pa - pb)))


def _sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
  return np.maximum(d, 0.0)


def mmd_rbf(a: np.ndarray, b: np.ndarray,
            bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS) -> float:
  """Squared maximum mean discrepancy with a sum of RBF kernels (unbiased estimate).

  k(x, y) = sum_s exp(-|x - y|^2 / (2 s^2)) over the bandwidths s. The unbiased
  U-statistic (diagonal terms left out) has mean 0 for two samples of one distribution,
  so it can come out slightly negative. Memory is O(n m); fine up to ~10^4 points.

  Args:
    a: points [n, d]; b: points [m, d].
    bandwidths: kernel widths s, in data units.

  Returns:
    MMD^2 as a float.
  """
  a, b = _as_points(a, "a"), _as_points(b, "b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"mmd_rbf needs points of one dimension, got {a.shape} and {b.shape}")
  if not bandwidths or min(bandwidths) <= 0:
    raise ValueError(f"bandwidths must be positive, got {bandwidths}")
  gammas = [1.0 / (2.0 * float(s) ** 2) for s in bandwidths]
  kern = lambda d: sum(np.exp(-g * d) for g in gammas)
  n, m = len(a), len(b)
  k_aa, k_bb, k_ab = kern(_sq_dists(a, a)), kern(_sq_dists(b, b)), kern(_sq_dists(a, b))
  term_aa = (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
  term_bb = (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
  return float(term_aa + term_bb - 2.0 * k_ab.mean())
