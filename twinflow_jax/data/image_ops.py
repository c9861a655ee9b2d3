"""Pure numpy image operations used while decoding examples.

They run inside Grain read threads and worker processes, so they avoid TensorFlow
and PIL: resizing is an antialiased (triangle filter) resampling written as two small
matrix products, which matches PIL's BILINEAR filter for downscaling.
"""

from __future__ import annotations

import functools

import numpy as np


def to_hwc(image: np.ndarray) -> np.ndarray:
  """Adds a channel axis to a [H, W] image; returns [H, W, C] images unchanged."""
  image = np.asarray(image)
  if image.ndim == 2:
    return image[:, :, None]
  if image.ndim != 3:
    raise ValueError(f"expected an image of shape [H, W] or [H, W, C], got {image.shape}")
  return image


def match_channels(image: np.ndarray, channels: int, what: str = "image") -> np.ndarray:
  """Returns images [..., C] with `channels` channels; grey images are tiled to RGB.

  Raises:
    ValueError: when the channels cannot be matched (e.g. RGB image, channels=1).
  """
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1:
    return np.repeat(image, channels, axis=-1)
  raise ValueError(
      f"{what} has {have} channels but config.data.channels={channels}; set "
      "config.data.channels to match the data (or None to take it from the data)")


def center_crop_square(image: np.ndarray) -> np.ndarray:
  """Crops the central square of side min(H, W) from `image` [H, W, C]."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return image[top:top + side, left:left + side]


@functools.lru_cache(maxsize=64)
def _resample_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Linear-interpolation matrix [out_size, in_size], antialiased when shrinking.

  Each output pixel centre maps back to `(i + 0.5) * in/out - 0.5`; the triangle
  kernel is widened by the shrink factor so every input pixel contributes (area-like
  averaging, no aliasing). Rows sum to one.
  """
  scale = in_size / out_size
  support = max(scale, 1.0)
  centres = (np.arange(out_size) + 0.5) * scale - 0.5
  taps = np.arange(in_size)
  weights = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
  # Edge rows whose kernel falls partly outside the image are renormalised.
  weights /= weights.sum(axis=1, keepdims=True)
  return weights.astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes images [..., H, W, C] to [..., height, width, C] (float32, same range).

  Antialiased bilinear resampling; a no-op copy (as float32) when sizes match.
  """
  h, w = image.shape[-3:-1]
  image = image.astype(np.float32)
  if (h, w) == (height, width):
    return image
  rows = _resample_matrix(h, height)
  cols = _resample_matrix(w, width)
  out = np.einsum("oh,...hwc->...owc", rows, image)
  return np.einsum("pw,...owc->...opc", cols, out)


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads images [..., h, w, C] (h, w <= size) centrally to [..., size, size, C]."""
  h, w = image.shape[-3:-1]
  if h > size or w > size:
    raise ValueError(f"cannot pad a {h}x{w} image to {size}x{size}")
  top, left = (size - h) // 2, (size - w) // 2
  pads = [(0, 0)] * (image.ndim - 3) + [(top, size - h - top), (left, size - w - left),
                                         (0, 0)]
  return np.pad(image, pads)


def square_resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to [size, size, C], rounding to uint8."""
  image = center_crop_square(to_hwc(image))
  if image.shape[0] == size and image.dtype == np.uint8:
    return image
  out = resize(image, size, size)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def pixels_to_unit_range(image: np.ndarray) -> np.ndarray:
  """Maps uint8-valued pixels [0, 255] to float32 [-1, 1]."""
  return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
