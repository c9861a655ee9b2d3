"""Reference statistics of a dataset: computed once, saved as .npz, ADM-compatible.

File format (`save_reference`), a plain .npz (np.load, no pickle):
  mu          float64 [2048]        mean of the Inception pool_3 features
  sigma       float64 [2048, 2048]  their covariance (ddof=1)
  act         float32 [M, 2048]     optional: features of M images (a uniform random
                                    subset; ADM: 10,000) for precision / recall
  num_images  int64                 images behind mu / sigma
  preprocess  str                   'adm' or 'pytorch_fid' (see preprocess.py)

The ADM suite's reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold `mu` and
`sigma` of the whole dataset plus `arr_0`, 10,000 uint8 images (and `mu_s`/`sigma_s`
for sFID, not used here); `load_reference` reads their mu / sigma directly. To get their
`act` for precision / recall, run `python -m twinflow_jax.evaluation.fid_stats --images
VIRTUAL_....npz ...`: it keeps the file's mu / sigma and adds the activations of arr_0.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

FORMAT = 'twinflow_jax.fid_reference.v1'


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Statistics of the real data (see the module docstring for the fields)."""
  mu: np.ndarray
  sigma: np.ndarray
  act: np.ndarray | None = None
  num_images: int | None = None
  preprocess: str | None = None
  has_images: bool = False  # the file also holds ADM's `arr_0` images

  def __post_init__(self):
    d = self.mu.shape[0] if self.mu.ndim == 1 else -1
    if self.mu.ndim != 1 or self.sigma.shape != (d, d):
      raise ValueError(f'reference mu / sigma have shapes {self.mu.shape} / '
                       f'{self.sigma.shape}; expected [D] / [D, D]')
    if self.act is not None and (self.act.ndim != 2 or self.act.shape[1] != d):
      raise ValueError(f'reference act has shape {self.act.shape}, expected [M, {d}]')


def save_reference(path: str, ref: ReferenceStats) -> None:
  """Writes `ref` to `path` (.npz), atomically (a temporary file, then rename)."""
  if not path.endswith('.npz'):
    raise ValueError(f'reference statistics are written as .npz; got {path!r}')
  arrays = {'mu': np.asarray(ref.mu, np.float64), 'sigma': np.asarray(ref.sigma, np.float64),
            'format': np.array(FORMAT)}
  if ref.act is not None:
    arrays['act'] = np.asarray(ref.act, np.float32)
  if ref.num_images is not None:
    arrays['num_images'] = np.int64(ref.num_images)
  if ref.preprocess is not None:
    arrays['preprocess'] = np.array(ref.preprocess)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_reference(path: str) -> ReferenceStats:
  """Reads our .npz or an ADM reference batch (mu, sigma, optionally act / arr_0)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'reference statistics {path!r} not found (compute them with '
                            'python -m twinflow_jax.evaluation.fid_stats)')
  try:
    z = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(f'{path}: not a readable .npz ({e})') from e
  with z:
    if 'mu' not in z.files or 'sigma' not in z.files:
      raise ValueError(f'{path} has no mu / sigma (keys: {sorted(z.files)[:8]}); compute '
                       'reference statistics with python -m twinflow_jax.evaluation.fid_stats')
    return ReferenceStats(
        mu=np.asarray(z['mu'], np.float64), sigma=np.asarray(z['sigma'], np.float64),
        act=np.asarray(z['act'], np.float32) if 'act' in z.files else None,
        num_images=int(z['num_images']) if 'num_images' in z.files else None,
        preprocess=str(z['preprocess']) if 'preprocess' in z.files else None,
        has_images='arr_0' in z.files)
