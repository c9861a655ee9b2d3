"""Toy 2-D distributions for fast research runs and the toy benchmark.

All generators are pure numpy, seeded by the caller's `np.random.Generator`, and return
float32 arrays of shape [n, 2] with roughly unit scale (so they fit the linear
noise-to-data transport without rescaling).
"""

from __future__ import annotations

import numpy as np

TOY2D_NAMES = ("gaussians8", "checkerboard", "moons")


def _gaussians8(n: int, rng: np.random.Generator) -> np.ndarray:
  """Eight Gaussians (std 0.1) on a circle of radius 1.5 (about unit variance overall)."""
  angles = rng.integers(0, 8, size=n) * (2 * np.pi / 8)
  centers = 1.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return centers + 0.1 * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
  """Uniform on the black squares of a 4 x 4 board spanning [-2, 2]^2."""
  x1 = rng.uniform(-2, 2, size=n)
  x2 = rng.uniform(0, 1, size=n) + rng.integers(0, 2, size=n) * 2 - 2
  # Shift the second coordinate by one square on odd columns.
  x2 = x2 + (np.floor(x1) % 2)
  return np.stack([x1, x2], axis=1)


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
  """Two interleaving half circles with Gaussian noise (std 0.05), centred."""
  upper = rng.random(n) < 0.5
  theta = rng.uniform(0, np.pi, size=n)
  x = np.where(upper, np.cos(theta), 1 - np.cos(theta))
  y = np.where(upper, np.sin(theta), 0.5 - np.sin(theta))
  pts = np.stack([x - 0.5, y - 0.25], axis=1) * 1.5
  return pts + 0.05 * rng.standard_normal((n, 2))


_GENERATORS = {
    "gaussians8": _gaussians8,
    "checkerboard": _checkerboard,
    "moons": _moons,
}


def sample_toy2d(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """Draws `n` points of a toy distribution.

  Args:
    name: one of `TOY2D_NAMES`.
    n: number of points (>= 1).
    rng: numpy random generator (the only source of randomness).

  Returns:
    float32 array [n, 2].
  """
  if name not in _GENERATORS:
    raise ValueError(f"unknown toy 2-D distribution {name!r}; choose one of {TOY2D_NAMES}")
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  return _GENERATORS[name](int(n), rng).astype(np.float32)
