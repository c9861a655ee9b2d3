"""diffusers `SD3Transformer2DModel` <-> `models.sd3.SD3Transformer` names.

The NNX tree mirrors diffusers, so most names map by joining the path with dots
(kernel -> `.weight`, transposed). The exceptions:
  pos_embed/proj/kernel [p*p*C, D]          pos_embed.proj.weight [D, C, p, p] (conv)
  */norm1/proj, */norm1_context/proj        *.norm1.linear, *.norm1_context.linear
  norm_out/proj                             norm_out.linear
  */ff/fc1, */ff/fc2 (same for ff_context)  *.ff.net.0.proj, *.ff.net.2
  */norm_q/scale (RMS norms)                *.norm_q.weight
The TwinFlow r-embedder `time_text_embed_2/...` is written as `time_text_embed_2.*`, the
names of the official `SD3Transformer2DModelWrapper`; a base checkpoint lacks it, and then
the model's small random init is kept. diffusers' persistent buffer `pos_embed.pos_embed`
(the sin-cos table) is not a parameter here: it is recomputed, compared with the
checkpoint's on import, and written on export.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twinflow_jax.models import sd3
from twinflow_jax.models.convert import diffusers as dlib

RENAMES = (
    (r'(^|\.)norm1\.proj$', r'\1norm1.linear'),
    (r'(^|\.)norm1_context\.proj$', r'\1norm1_context.linear'),
    (r'^norm_out\.proj$', 'norm_out.linear'),
    (r'\.(ff|ff_context)\.fc1$', r'.\1.net.0.proj'),
    (r'\.(ff|ff_context)\.fc2$', r'.\1.net.2'),
)
POS_EMBED_KEY = 'pos_embed.pos_embed'
POS_EMBED_ATOL = 1e-4


def param_key(cfg: sd3.SD3Config, path: tuple) -> tuple[str, dlib.Transform]:
  """Parameter path -> (diffusers key, layout transform)."""
  names = [str(p) for p in path if str(p) != 'base_module']
  if names == ['pos_embed', 'proj', 'kernel']:
    return 'pos_embed.proj.weight', dlib.PatchConv(cfg.patch_size, cfg.in_channels)
  return dlib.standard_param_key(path, RENAMES)


def optional(cfg: sd3.SD3Config, path: tuple) -> bool:
  del cfg
  return str(path[0]) == 'time_text_embed_2'


def model_config(dcfg: dict[str, Any]) -> dict[str, Any]:
  out = {'name': 'sd3'}
  out.update({k: dcfg[k] for k in sd3.DIFFUSERS_FIELDS if k in dcfg})
  return out


ROW_BLOCK = 8  # grid rows of the position table per chunk


def _row_blocks(cfg: sd3.SD3Config):
  m = cfg.pos_embed_max_size
  return [(h, min(h + ROW_BLOCK, m)) for h in range(0, m, ROW_BLOCK)]


def buffers(cfg: sd3.SD3Config) -> dict[str, dlib.Buffer]:
  """The position table, produced a few grid rows at a time."""
  m, d = cfg.pos_embed_max_size, cfg.inner_dim
  chunks = lambda: (sd3.pos_embed_rows(cfg, h0, h1)[None] for h0, h1 in _row_blocks(cfg))
  return {POS_EMBED_KEY: dlib.Buffer((1, m * m, d), chunks)}


def check_buffer(cfg: sd3.SD3Config, src, key: str) -> None:
  """The checkpoint's position table must be the one the model computes."""
  if key != POS_EMBED_KEY:
    return
  m, d = cfg.pos_embed_max_size, cfg.inner_dim
  shape = (1, m * m, d)
  if tuple(src.shape(key)) != shape:
    raise ValueError(f'{src.path}: {key} has shape {tuple(src.shape(key))}, the config '
                     f'(pos_embed_max_size={m}, width {d}) gives {shape}')
  # A bfloat16 checkpoint holds the table rounded to bfloat16 (diffusers then runs with
  # the rounded table, |diff| <= 2^-9; this model keeps the float32 table).
  err = 0.0
  for h0, h1 in _row_blocks(cfg):
    got = src.read(key, (slice(None), slice(h0 * m, h1 * m)))[0]
    want = sd3.pos_embed_rows(cfg, h0, h1).astype(got.dtype).astype(np.float32)
    err = max(err, float(np.abs(got.astype(np.float32) - want).max()))
  if err > POS_EMBED_ATOL:
    raise ValueError(
        f'{src.path}: {key} differs from the sin-cos table diffusers computes for '
        f'sample_size={cfg.sample_size}, patch_size={cfg.patch_size}, '
        f'pos_embed_max_size={m} (max |diff| {err:.3g}); this model recomputes the '
        'table, so such a checkpoint is not supported')


FAMILY = dlib.DiffusersFamily(
    name='sd3',
    class_names=('SD3Transformer2DModel', 'SD3Transformer2DModelWrapper'),
    model_config=model_config,
    diffusers_config=lambda cfg: cfg.diffusers_config(),
    param_key=param_key,
    optional=optional,
    buffers=buffers,
    check_buffer=check_buffer,
)
dlib.register_family(FAMILY)
