"""Random FID-Inception weights and inputs from a seed, in plain numpy (no torch, no jax).

Shared by tools/make_inception_fixture.py (which loads these weights into pytorch-fid's
network) and tests/test_models_inception.py (which loads the same weights into the JAX
network), so that the committed fixture holds only a seed and the reference outputs,
not the ~95 MB of weights.

Only `Generator.random` (uniform float64) is used: its stream is fixed by the PCG64 bit
generator, unlike the normal/ziggurat samplers. Every tensor gets its own stream, seeded
by (seed, crc32(name)), so the order of the state dict does not matter.

Recipe (every value non-zero with probability 1, so every weight matters):
  conv / fc weight   U(-a, a), a = sqrt(6 / fan_in)   (He-uniform: variance 2 / fan_in)
  bn weight (gamma)  U(0.5, 1.5)
  bn bias (beta)     U(-0.2, 0.2)
  bn running_mean    U(-0.2, 0.2)
  bn running_var     U(0.5, 1.5)
  fc bias            U(-1, 1)
"""

import math
import zlib

import numpy as np

RECIPE = 'fid_inception_random.v1'


def _uniform(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  return rng.random(shape)


def random_tensor(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """One float32 tensor of the recipe, chosen by the PyTorch state-dict name."""
  u = _uniform(seed, name, tuple(shape))
  leaf = name.rsplit('.', 1)[-1]
  is_bn = '.bn.' in name
  if leaf == 'weight' and not is_bn:
    a = math.sqrt(6.0 / math.prod(shape[1:]))
    v = (2 * u - 1) * a
  elif is_bn and leaf == 'weight':
    v = 0.5 + u
  elif is_bn and leaf in ('bias', 'running_mean'):
    v = 0.2 * (2 * u - 1)
  elif is_bn and leaf == 'running_var':
    v = 0.5 + u
  elif name == 'fc.bias':
    v = 2 * u - 1
  else:
    raise ValueError(f'no recipe for tensor {name!r}')
  return v.astype(np.float32)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int
                      ) -> dict[str, np.ndarray]:
  """{name: shape} (num_batches_tracked excluded) -> {name: float32 tensor}."""
  return {name: random_tensor(seed, name, shape) for name, shape in sorted(shapes.items())}


def random_images(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """Float32 uniform noise images in [-1, 1) of the given shape."""
  u = _uniform(seed, '__images__', tuple(shape))
  return (2 * u - 1).astype(np.float32)


def checksums(sd: dict[str, np.ndarray]) -> np.ndarray:
  """Float64 sum of each tensor, in sorted-name order: detects a changed recipe."""
  return np.array([np.sum(sd[k], dtype=np.float64) for k in sorted(sd)])
