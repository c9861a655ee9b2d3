"""Config helpers shared by the diffusers-derived families (Flux, Qwen-Image).

Their configs keep diffusers' config.json field names, so a checkpoint's
config.json (minus the `_class_name`-style private keys) plus runtime fields
(dtype, remat, attention, r_embedder_init, ...) is a model config.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from twinflow_jax.models.attention import attention_names
from twinflow_jax.models.configs import (DTYPES, REMAT_POLICIES, RuntimeOptionsMixin,
                                         _check_choice, _check_int)

CONFIG_FILE = 'config.json'


def check_bool(field, value):
  if not isinstance(value, bool):
    raise ValueError(f'model config field {field!r} must be a bool, got '
                     f'{value!r}')


def check_runtime_fields(cfg) -> None:
  """Validates the runtime fields shared by the pretrained families."""
  _check_choice('dtype', cfg.dtype, DTYPES)
  _check_choice('param_dtype', cfg.param_dtype, DTYPES)
  _check_choice('remat', cfg.remat, REMAT_POLICIES)
  _check_choice('attention', cfg.attention, attention_names())
  _check_choice('r_embedder_init', cfg.r_embedder_init, ('copy', 'small'))
  check_bool('r_embedder', cfg.r_embedder)
  if not isinstance(cfg.pretrained, str):
    raise ValueError("model config field 'pretrained' must be a folder path, got "
                     f'{cfg.pretrained!r}')


def check_rope_axes(cfg) -> None:
  axes = cfg.axes_dims_rope
  if (len(axes) != 3 or any(isinstance(a, bool) or not isinstance(a, int)
                            or a < 2 or a % 2 for a in axes)):
    raise ValueError("model config field 'axes_dims_rope' must be 3 even "
                     f'ints, got {axes!r}')
  if sum(axes) != cfg.attention_head_dim:
    raise ValueError(f"model config field 'axes_dims_rope' {tuple(axes)} must "
                     f"sum to 'attention_head_dim' ({cfg.attention_head_dim})")


# Positive-int fields of both Flux and Qwen-Image configs.
_DUAL_STREAM_INTS = ('patch_size', 'in_channels', 'num_layers',
                     'attention_head_dim', 'num_attention_heads',
                     'joint_attention_dim')


def check_dual_stream_fields(cfg, extra_ints: tuple[str, ...] = ()) -> None:
  """Validates the architecture ints shared by Flux and Qwen-Image (and
  `extra_ints`), including the optional `out_channels`."""
  for f in _DUAL_STREAM_INTS + extra_ints:
    _check_int(f, getattr(cfg, f))
  if cfg.out_channels is not None:
    _check_int('out_channels', cfg.out_channels)


def check_packed_channels(cfg, need: str) -> None:
  """RoPE axes, runtime fields, then the 2x2-packed channel counts.

  `need` ends the error message: what the family supports.
  """
  check_rope_axes(cfg)
  check_runtime_fields(cfg)
  if cfg.in_channels % 4 or cfg.out_dim != cfg.in_channels:
    raise ValueError(
        f"model config fields 'in_channels' ({cfg.in_channels}), "
        f"'out_channels' ({cfg.out_channels}), 'patch_size' "
        f'({cfg.patch_size}): {need}')


def read_config_json(path: str) -> dict[str, Any]:
  """DIR/config.json (or the file itself) of a diffusers model -> dict."""
  file = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f'no diffusers {CONFIG_FILE} at {path}')
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{file}: not valid JSON ({e})') from e


def config_from_dict(cls, d: Mapping[str, Any], family: str):
  """dict -> frozen config of cls.

  With 'pretrained': DIR, the architecture fields (cls.DIFFUSERS_FIELDS) come
  from DIR/config.json; the dict's own fields override them. Private
  diffusers keys ('_class_name', ...) are ignored.
  """
  d = {k: v for k, v in dict(d).items() if not k.startswith('_')}
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f'unknown model config field(s) {unknown} for {family}; '
                     f'known: {sorted(fields)}')
  base = {}
  if d.get('pretrained'):
    src = read_config_json(d['pretrained'])
    base = {k: v for k, v in src.items() if k in cls.DIFFUSERS_FIELDS}
  base.update(d)
  if 'axes_dims_rope' in base:
    axes = base['axes_dims_rope']
    if not isinstance(axes, (list, tuple)):
      raise ValueError("model config field 'axes_dims_rope' must be a list of "
                       f'3 ints, got {axes!r}')
    base['axes_dims_rope'] = tuple(axes)
  return cls(**base)


class DiffusersConfigMixin(RuntimeOptionsMixin):
  """Properties of a frozen family config dataclass.

  The subclass sets DIFFUSERS_CLASS (diffusers' `_class_name`) and
  DIFFUSERS_FIELDS (its config.json fields, which are dataclass fields).
  """
  DIFFUSERS_CLASS = ''
  DIFFUSERS_FIELDS: tuple[str, ...] = ()

  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_dim(self) -> int:
    return 4 * self.hidden_size  # diffusers FeedForward(mult=4)

  @property
  def out_dim(self) -> int:
    """Width of a packed output token."""
    return self.patch_size**2 * (self.out_channels or self.in_channels)

  @property
  def latent_channels(self) -> int:
    """Channels of the NHWC latents (a token packs 2x2 of them)."""
    return self.in_channels // 4

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict that the family's resolver turns back into this."""
    d = dataclasses.asdict(self)
    d['axes_dims_rope'] = list(d['axes_dims_rope'])
    return d

  def diffusers_config(self) -> dict[str, Any]:
    """The config.json of the matching diffusers model."""
    d = {f: getattr(self, f) for f in self.DIFFUSERS_FIELDS}
    d['axes_dims_rope'] = list(d['axes_dims_rope'])
    return d
