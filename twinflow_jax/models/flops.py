"""Analytic matmul FLOPs of one forward pass (for utilisation figures).

Counts 2 * M * N * K for every matrix product the models run (dense layers,
q.k^T and attention-weighted values); elementwise work (norms, activations,
softmax) is left out. One training step of TwinFlow costs several forwards
(see TWINFLOW.md section 2); a backward costs about twice a forward.
"""

from collections.abc import Mapping
from typing import Any

from twinflow_jax.models.configs import (DiTConfig, MMDiTConfig, as_dict,
                                         resolve_config)
from twinflow_jax.models.families import FAMILIES


def _twin_time_flops(b: int, d: int, freq: int) -> int:
  # Two timestep embedders (t and r), each freq -> D -> D.
  return 2 * 2 * b * (freq * d + d * d)


def _dit_flops(cfg: DiTConfig, b: int, h: int, w: int) -> int:
  d, p, m = cfg.hidden_size, cfg.patch_size, cfg.mlp_dim
  t = (h // p) * (w // p)
  c_out = cfg.in_channels * (2 if cfg.learn_sigma else 1)
  total = 2 * b * t * (p * p * cfg.in_channels) * d  # patch embedding
  total += _twin_time_flops(b, d, cfg.freq_dim)
  per_block = (2 * b * d * 6 * d  # adaLN
               + 2 * b * t * d * 3 * d  # qkv
               + 2 * 2 * b * t * t * d  # q.k^T and p.v
               + 2 * b * t * d * d  # attention output
               + 2 * 2 * b * t * d * m)  # MLP
  total += cfg.depth * per_block
  total += 2 * b * d * 2 * d + 2 * b * t * d * p * p * c_out  # final layer
  return total


def _mmdit_flops(cfg: MMDiTConfig, b: int, h: int, w: int, lt: int) -> int:
  d, p, m = cfg.hidden_size, cfg.patch_size, cfg.mlp_dim
  ti = (h // p) * (w // p)
  n = ti + lt
  total = 2 * b * ti * (p * p * cfg.in_channels) * d  # patch embedding
  total += 2 * b * lt * cfg.txt_dim * d  # context embedder
  total += _twin_time_flops(b, d, cfg.freq_dim)
  total += 2 * b * (cfg.pooled_dim * d + d * d)  # pooled projection
  full = (2 * 2 * b * d * 6 * d  # adaLN, both streams
          + 2 * b * n * d * 3 * d  # qkv, both streams
          + 2 * 2 * b * n * n * d  # joint attention
          + 2 * b * n * d * d  # output projections
          + 2 * 2 * b * n * d * m)  # MLPs
  last = (2 * b * d * 6 * d + 2 * b * d * 2 * d  # adaLN img + txt (pre-only)
          + 2 * b * n * d * 3 * d  # qkv, both streams
          + 2 * 2 * b * ti * n * d  # image queries only
          + 2 * b * ti * d * d  # image output projection
          + 2 * 2 * b * ti * d * m)  # image MLP
  total += (cfg.depth - 1) * full + last
  total += 2 * b * d * 2 * d + 2 * b * ti * d * p * p * cfg.in_channels
  return total


def flops_per_forward(model_config: Mapping[str, Any] | Any, batch: int,
                      resolution: int | tuple[int, int], *,
                      txt_len: int | None = None) -> int:
  """Matmul FLOPs of one forward `model(x_t, t, r, cond)`.

  Args:
    model_config: as for `create_model` (DiT, MMDiT or family names).
    batch: batch size B.
    resolution: spatial size of x_t (H = W, or (H, W)); for latent models the
      latent size.
    txt_len: text length L (text-conditioned models only, required there).

  Returns:
    FLOPs as an int (2 per multiply-add).
  """
  d = as_dict(model_config)
  if d.get('name') == 'mlp':
    raise ValueError("flops_per_forward covers DiT and MMDiT, not 'mlp'")
  family = FAMILIES.get(d.get('name'))
  cfg = family.resolve(d) if family else resolve_config(d)
  h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(
      resolution)
  if batch < 1 or h % cfg.patch_size or w % cfg.patch_size:
    raise ValueError(f'flops_per_forward: need batch >= 1 and resolution '
                     f'divisible by patch {cfg.patch_size}; got {batch=}, '
                     f'{resolution=}')
  if isinstance(cfg, DiTConfig):
    return _dit_flops(cfg, batch, h, w)
  if txt_len is None or txt_len < 1:
    raise ValueError('flops_per_forward: text-conditioned models need txt_len >= 1')
  if family:
    return family.flops(cfg, batch, h, w, txt_len)
  return _mmdit_flops(cfg, batch, h, w, txt_len)
