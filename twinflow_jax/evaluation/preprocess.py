"""Images -> Inception input, as the ADM evaluation suite (default) or pytorch-fid do it.

Samples first become uint8 pixels, exactly as guided-diffusion's `image_sample.py` saves
them: `((x + 1) * 127.5).clamp(0, 255).to(uint8)`, i.e. floor(clip((x + 1) * 127.5,
0, 255)) (truncation, not rounding). Reference images are uint8 already.

Then, per mode (both work on [N, H, W, C] uint8, C = 3, or C = 1 repeated to RGB):

  'adm' (default; ADM suite = TF `inception-2015-12-05` graph, also TTUR and the
        original IS code). The suite feeds the uint8 values as float32 into the graph,
        which resizes them to 299 x 299 with TF1 `ResizeBilinear` (align_corners=False,
        no half-pixel centres: source coordinate = dst * in / out, upper neighbour
        clamped to the edge, no antialiasing) and then computes (x - 128) / 128.
  'pytorch_fid' pytorch-fid's InceptionV3.forward: x / 255, `F.interpolate(299,
        bilinear, align_corners=False)` (half-pixel centres: src = (dst + 0.5) * in /
        out - 0.5, clamped at 0; no antialiasing), then 2x - 1.

The two differ slightly (resampling grid and 1/128 vs 1/127.5 scale), so FIDs are only
comparable within one mode; 'adm' matches published numbers computed with the ADM
suite and its reference batches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299
MODES = ('adm', 'pytorch_fid')


def samples_to_uint8(x: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """Model samples in [-1, 1] -> uint8 pixels: floor(clip((x + 1) * 127.5, 0, 255)).

  Works on numpy (returns numpy) and jax arrays (returns jax) of any shape.
  """
  xp = jnp if isinstance(x, jax.Array) else np
  y = xp.clip((xp.asarray(x, xp.float32) + 1.0) * 127.5, 0.0, 255.0)
  return xp.floor(y).astype(xp.uint8)


@functools.lru_cache(maxsize=32)
def _taps_tf1(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """TF1 legacy bilinear: (lower index, upper index, fraction) per output pixel."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src)
  hi = np.minimum(np.ceil(src), in_size - 1)
  return lo.astype(np.int32), hi.astype(np.int32), (src - lo).astype(np.float32)


@functools.lru_cache(maxsize=32)
def _taps_half_pixel(in_size: int, out_size: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch bilinear, align_corners=False: (lower, upper, fraction) per output pixel."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, 0)
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi.astype(np.int32), (src - lo).astype(np.float32)


def _lerp_axis(x: jax.Array, axis: int, taps) -> jax.Array:
  lo, hi, frac = taps
  a = jnp.take(x, jnp.asarray(lo), axis=axis)
  b = jnp.take(x, jnp.asarray(hi), axis=axis)
  shape = [1] * x.ndim
  shape[axis] = -1
  return a + (b - a) * jnp.asarray(frac).reshape(shape)


def resize_bilinear(x: jax.Array, size: tuple[int, int], mode: str = 'adm') -> jax.Array:
  """Bilinear resize of float NHWC images without antialiasing.

  Args:
    x: float [N, H, W, C].
    size: (out_h, out_w).
    mode: 'adm' (TF1 legacy grid) or 'pytorch_fid' (half-pixel grid); see module doc.

  Returns:
    float32 [N, out_h, out_w, C]. Interpolates along W first, then H (TF's order).
  """
  taps = {'adm': _taps_tf1, 'pytorch_fid': _taps_half_pixel}.get(mode)
  if taps is None:
    raise ValueError(f'unknown preprocessing mode {mode!r}; use one of {MODES}')
  x = jnp.asarray(x, jnp.float32)
  x = _lerp_axis(x, 2, taps(x.shape[2], size[1]))
  return _lerp_axis(x, 1, taps(x.shape[1], size[0]))


def inception_input(images: jax.Array, mode: str = 'adm',
                    size: int = INCEPTION_SIZE) -> jax.Array:
  """uint8 pixels [N, H, W, C] (C = 1 or 3) -> Inception input [N, size, size, 3].

  Args:
    images: uint8 (or float holding integer pixel values 0..255) NHWC images.
    mode: 'adm' or 'pytorch_fid' (module docstring).
    size: output side (299 for FID; smaller only in tests).

  Returns:
    float32 images on the scale the Inception expects (about [-1, 1]).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape {images.shape}')
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if mode == 'adm':
    return (resize_bilinear(x, (size, size), 'adm') - 128.0) / 128.0
  if mode == 'pytorch_fid':
    return 2.0 * resize_bilinear(x / 255.0, (size, size), 'pytorch_fid') - 1.0
  raise ValueError(f'unknown preprocessing mode {mode!r}; use one of {MODES}')


def as_uint8_nhwc(images: np.ndarray, what: str = 'images') -> np.ndarray:
  """Host-side normalisation of an image batch to uint8 [N, H, W, C], C in {1, 3}.

  Accepts uint8 pixels, or floats in [-1, 1] (model samples, quantised with
  `samples_to_uint8`); [N, H, W] gets a channel axis; NCHW with C in {1, 3} is
  transposed when the last axis is not a channel axis.
  """
  a = np.asarray(images)
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4:
    raise ValueError(f'{what}: expected images [N, H, W(, C)], got shape {a.shape}')
  if a.shape[-1] not in (1, 3) and a.shape[1] in (1, 3):
    a = a.transpose(0, 2, 3, 1)
  if a.shape[-1] not in (1, 3):
    raise ValueError(f'{what}: expected 1 or 3 channels, got shape {a.shape}')
  if a.dtype == np.uint8:
    return a
  if np.issubdtype(a.dtype, np.floating):
    if a.size and (np.nanmin(a) < -1.0 - 1e-3 or np.nanmax(a) > 1.0 + 1e-3):
      raise ValueError(f'{what}: float images must be samples in [-1, 1]; got values in '
                       f'[{np.nanmin(a):.3g}, {np.nanmax(a):.3g}] (give uint8 pixels '
                       'instead)')
    return samples_to_uint8(a)
  raise ValueError(f'{what}: expected uint8 pixels or float samples in [-1, 1], got '
                   f'dtype {a.dtype}')
