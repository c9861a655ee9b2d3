"""Sample grids as PNG files, written with zlib and struct only (no imaging library)."""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
from etils import epath


def encode_png(image: np.ndarray) -> bytes:
  """Encodes an 8-bit image.

  Args:
    image: uint8 [H, W] (gray), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA).

  Returns:
    The PNG file's bytes.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"encode_png expects uint8 pixels, got {image.dtype}")
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    color_type, channels = 0, 1
  elif image.ndim == 3 and image.shape[-1] in (3, 4):
    color_type, channels = (2 if image.shape[-1] == 3 else 6), image.shape[-1]
  else:
    raise ValueError(f"encode_png expects [H, W], [H, W, 1|3|4], got shape {image.shape}")
  height, width = image.shape[:2]
  if height == 0 or width == 0:
    raise ValueError(f"encode_png got an empty image of shape {image.shape}")
  # Each scanline starts with filter type 0 (none).
  rows = image.reshape(height, width * channels)
  raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()

  def chunk(tag: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_png(path: str, image: np.ndarray) -> None:
  """Writes `image` (see `encode_png`) to `path` (local or e.g. gs://)."""
  data = encode_png(image)
  if "://" in str(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)  # readers never see half a file


def to_uint8(images: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
  """Maps floats in [low, high] to uint8 (clipping), NaN to 0."""
  images = np.nan_to_num(np.asarray(images, np.float32), nan=low)
  scaled = (np.clip(images, low, high) - low) / (high - low) * 255.0
  return np.round(scaled).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2,
              pad_value: int = 255, min_tile: int = 0) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C].

  Images smaller than `min_tile` pixels are first enlarged by an integer factor
  (nearest neighbour) so that small samples stay visible.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"make_grid expects [N, H, W, C] with N >= 1, got {images.shape}")
  factor = max(1, min_tile // max(images.shape[1:3]))
  if factor > 1:
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value,
                 images.dtype)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def scatter_image(points: np.ndarray, size: int = 256, extent: float = 3.0) -> np.ndarray:
  """Renders 2-D points [N, 2] as a density image uint8 [size, size] (dark = dense).

  The square [-extent, extent]^2 maps onto the image, y pointing up.
  """
  points = np.asarray(points, np.float32)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"scatter_image expects points of shape [N, 2], got {points.shape}")
  finite = points[np.all(np.isfinite(points), axis=1)]
  hist, _, _ = np.histogram2d(finite[:, 1], finite[:, 0], bins=size,
                              range=[[-extent, extent], [-extent, extent]])
  hist = hist[::-1]  # row 0 is the top (largest y)
  density = np.log1p(hist) / max(np.log1p(hist).max(), 1e-8)
  return (255 - np.round(density * 255)).astype(np.uint8)


def samples_to_image(samples: np.ndarray, ncols: int | None = None) -> np.ndarray:
  """Samples in model space -> one uint8 image.

  [N, 2] points -> a density scatter; [N, H, W, 1 | 3] pixels in [-1, 1] -> a grid;
  latents (other channel counts) -> a grid of their first 3 channels on [-2.5, 2.5]
  (a quick look for latents without a VAE; `train.evaluation.decode_samples` decodes
  them first when the data's metadata names one). Tiles below 64 pixels are enlarged.
  """
  samples = np.asarray(samples)
  if samples.ndim == 2 and samples.shape[1] == 2:
    return scatter_image(samples)
  if samples.ndim == 4:
    if samples.shape[-1] in (1, 3):
      return make_grid(to_uint8(samples), ncols=ncols, min_tile=64)
    return make_grid(to_uint8(samples[..., :3], -2.5, 2.5), ncols=ncols, min_tile=64)
  raise ValueError(f"cannot render samples of shape {samples.shape}: expected [N, 2] "
                   "points or [N, H, W, C] images")
