"""Multi-axis rotary position embeddings (RoPE) and 2x2 latent packing.

Shared by the Flux and Qwen-Image transformers. A token's position is a
vector of A integer ids (Flux, Qwen-Image: A = 3 = (frame, row, column)); the
head dimension is split into A consecutive chunks of `axes_dim[a]` features,
and chunk a is rotated by angles `pos[a] * theta^(-2i / axes_dim[a])`.
Rotations act on interleaved feature pairs (2i, 2i + 1), which is both
diffusers' `apply_rotary_emb(use_real_unbind_dim=-1)` (Flux) and its
complex-number form (`apply_rotary_emb_qwen(use_real=False)`, Qwen-Image).

Positions depend only on static shapes, so the tables are computed in float64
numpy at trace time and enter the graph as float32 constants.

Packing: the Flux and Qwen-Image pipelines turn NCHW latents into tokens of
2x2 patches with features ordered (channel, row-in-patch, col-in-patch)
(`_pack_latents`); `pack_latents` / `unpack_latents` do the same on NHWC.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_tables(ids: np.ndarray, axes_dim: Sequence[int],
                theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """cos / sin tables of multi-axis RoPE.

  Args:
    ids: [S, A] positions (ints, may be negative).
    axes_dim: A even chunk widths; their sum is the head dimension H.
    theta: RoPE base.

  Returns:
    (cos, sin), each [S, H // 2] float32 numpy: the angle of feature pair i.
  """
  ids = np.asarray(ids, np.float64)
  if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
    raise ValueError(f'rope ids must be [S, {len(axes_dim)}], got {ids.shape}')
  angles = []
  for a, dim in enumerate(axes_dim):
    if dim % 2:
      raise ValueError(f'RoPE axis widths must be even, got {tuple(axes_dim)}')
    inv_freq = 1.0 / theta**(np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles.append(np.outer(ids[:, a], inv_freq))
  angle = np.concatenate(angles, axis=1)
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved feature pairs of queries or keys.

  Args:
    x: [B, S, N, H].
    cos, sin: [S, H // 2] (from `rope_tables`).

  Returns:
    [B, S, N, H] in x's dtype (rotation computed in float32).
  """
  b, s, n, h = x.shape
  xp = x.astype(jnp.float32).reshape(b, s, n, h // 2, 2)
  x0, x1 = xp[..., 0], xp[..., 1]
  c = jnp.asarray(cos)[None, :, None, :]
  si = jnp.asarray(sin)[None, :, None, :]
  out = jnp.stack([x0 * c - x1 * si, x0 * si + x1 * c], axis=-1)
  return out.reshape(b, s, n, h).astype(x.dtype)


def flux_ids(grid_h: int, grid_w: int, txt_len: int) -> np.ndarray:
  """Flux token positions for [text | image] tokens.

  Text ids are all zero; image token (i, j) of the packed grid has id
  (0, i, j), as the Flux pipeline's `_prepare_latent_image_ids`.

  Returns:
    [txt_len + grid_h * grid_w, 3] int numpy.
  """
  img = np.zeros((grid_h, grid_w, 3), np.int64)
  img[..., 1] = np.arange(grid_h)[:, None]
  img[..., 2] = np.arange(grid_w)[None, :]
  return np.concatenate([np.zeros((txt_len, 3), np.int64),
                         img.reshape(-1, 3)], axis=0)


def qwen_image_ids(grid_h: int, grid_w: int,
                   txt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Qwen-Image positions ("scale_rope" centring), as diffusers' QwenEmbedRope.

  Image token (i, j) gets (0, i - ceil(h / 2), j - ceil(w / 2)): the rows run
  from -ceil(h/2) to floor(h/2) - 1, likewise the columns. Text token k gets
  m + k on all three axes, m = max(floor(h/2), floor(w/2)), so text sits
  just past the image on the diagonal. The text positions depend only on the
  index, so padding at the end of the text (masked out) leaves the real
  tokens' positions unchanged.

  Returns:
    (img_ids [grid_h * grid_w, 3], txt_ids [txt_len, 3]) int numpy.
  """
  rows = np.arange(grid_h) - (grid_h - grid_h // 2)
  cols = np.arange(grid_w) - (grid_w - grid_w // 2)
  img = np.zeros((grid_h, grid_w, 3), np.int64)
  img[..., 1] = rows[:, None]
  img[..., 2] = cols[None, :]
  start = max(grid_h // 2, grid_w // 2)
  txt = np.repeat((start + np.arange(txt_len))[:, None], 3, axis=1)
  return img.reshape(-1, 3), txt


def pack_latents(x: jax.Array, p: int = 2) -> jax.Array:
  """NHWC latents [B, H, W, C] -> tokens [B, (H/p)(W/p), C*p*p].

  Token features are ordered (c, row-in-patch, col-in-patch), as the
  diffusers Flux / Qwen-Image pipelines pack NCHW latents.
  """
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack_latents(x: jax.Array, gh: int, gw: int, p: int = 2) -> jax.Array:
  """Tokens [B, gh*gw, C*p*p] -> NHWC [B, gh*p, gw*p, C] (inverse of pack)."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, gh, gw, c, p, p).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, gh * p, gw * p, c)
