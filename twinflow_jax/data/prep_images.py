"""Decoding and ADM / DiT centre-cropping of images for latent preparation (Pillow).

`center_crop_arr` follows guided-diffusion's (ADM) `center_crop_arr`, which DiT, SiT
and REPA use to make ImageNet latents:
  1. while the short side is at least twice the target, halve both sides with a BOX
     filter (integer division: w // 2, h // 2);
  2. resize with BICUBIC so that the short side equals the target (the long side
     becomes round(long * target / short), Python rounding);
  3. crop the central target x target square (offset (size - target) // 2 per axis).
An image whose short side is below the target is upscaled by step 2 (as in ADM); it is
counted. Images are first converted to RGB as torchvision's `ImageFolder` loader does:
grey (L, I, F), palette (P), CMYK and YCbCr through Pillow's `convert('RGB')`; images with
alpha (RGBA, LA, P with transparency) either drop it (default, as that loader) or are
composited over white (`alpha='white'`).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff',
                  '.ppm', '.pgm', '.pbm')
ALPHA_MODES = ('drop', 'white')


class BadImage(Exception):
  """An image that cannot be decoded (truncated, corrupt, missing, not an image)."""


def _pil():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('preparing images needs Pillow: pip install -e ".[images]"') from e
  return Image


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """uint8 [S, S, 3] pixels plus what was done to get them."""
  pixels: np.ndarray
  mode: str  # the decoded image's Pillow mode before conversion to RGB
  upscaled: bool  # short side was below the target size


def load_rgb(source: Any, alpha: str = 'drop'):
  """Decodes a file path, bytes or uint8 array [H, W(, C)] into an RGB Pillow image.

  Returns:
    (image in mode 'RGB', the original mode).

  Raises:
    BadImage: unreadable, truncated or not an image (message says why).
  """
  image_mod = _pil()
  if alpha not in ALPHA_MODES:
    raise ValueError(f'alpha={alpha!r}; choose one of {ALPHA_MODES}')
  try:
    if isinstance(source, np.ndarray):
      array = source[..., 0] if source.ndim == 3 and source.shape[-1] == 1 else source
      if array.dtype != np.uint8:
        raise BadImage(f'pixels of dtype {array.dtype}, expected uint8')
      image = image_mod.fromarray(array)
    else:
      fp = io.BytesIO(source) if isinstance(source, bytes) else source
      image = image_mod.open(fp)
      image.load()  # Decodes now: truncated files fail here.
  except BadImage:
    raise
  except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as e:
    # DecompressionBombError: over twice Pillow's MAX_IMAGE_PIXELS (as torchvision).
    raise BadImage(f'{type(e).__name__}: {e}') from e
  mode = image.mode
  if alpha == 'white' and (mode in ('RGBA', 'LA', 'PA') or
                           (mode == 'P' and 'transparency' in image.info)):
    rgba = image.convert('RGBA')
    background = image_mod.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = image_mod.alpha_composite(background, rgba)
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return image, mode


def center_crop_arr(image, size: int) -> np.ndarray:
  """ADM centre crop of an RGB Pillow image to uint8 [size, size, 3] (see module doc)."""
  image_mod = _pil()
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size), resample=image_mod.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size),
                       resample=image_mod.BICUBIC)
  pixels = np.asarray(image)
  top = (pixels.shape[0] - size) // 2
  left = (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


def prepare_image(source: Any, size: int, alpha: str = 'drop') -> PreparedImage:
  """Decodes, converts to RGB and centre-crops one image (raises BadImage)."""
  image, mode = load_rgb(source, alpha)
  if min(image.size) < 1:
    raise BadImage(f'empty image of size {image.size}')
  upscaled = min(image.size) < size
  pixels = np.ascontiguousarray(center_crop_arr(image, size))
  return PreparedImage(pixels, mode, upscaled)


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1] (torchvision ToTensor + Normalize(0.5, 0.5))."""
  return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
