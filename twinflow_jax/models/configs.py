"""Model configurations: named sizes, overrides and validation.

A model config is a dict (or ConfigDict) with a `name` and optional
overrides, e.g. {'name': 'DiT-XL/2', 'in_channels': 4, 'input_size': 32,
'dtype': 'bfloat16', 'remat': 'dots'}. Names:
  'DiT-{S,B,L,XL}/{2,4,8}'    DiT sizes of Peebles & Xie.
  'MMDiT-{S,B,L,XL}/{2,4,8}'  same widths/depths as an SD3-style MMDiT.
  'MMDiT-d{N}/{p}'            SD3 depth parameterisation: width 64 N, N heads
                              (SD3-medium is 'MMDiT-d24/2').
  'mlp'                       the toy 2-D MLP (`twinflow_jax.models.mlp`).
Any size field (depth, hidden_size, num_heads, mlp_ratio) may be overridden,
which is how the tests build tiny models.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from twinflow_jax.models.attention import attention_names
from twinflow_jax.models.embeddings import TIME_CONVENTIONS

# (depth, hidden_size, num_heads)
NAMED_SIZES = {
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}

# Per-block rematerialisation: name -> jax.checkpoint policy (None: no remat).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RuntimeOptionsMixin:
  """The jax objects named by a model config's runtime fields `dtype` (compute),
  `param_dtype` and `remat` (every family's config has them)."""

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def remat_policy(self):
    return REMAT_POLICIES[self.remat]


@dataclasses.dataclass(frozen=True)
class _TransformerConfig(RuntimeOptionsMixin):
  """Fields shared by DiT and MMDiT (see the subclasses)."""
  name: str = ''
  depth: int = 12
  hidden_size: int = 384
  num_heads: int = 6
  patch_size: int = 2
  mlp_ratio: float = 4.0
  in_channels: int = 4
  # Spatial size of x_t (latent size for latent models): int or (H, W).
  input_size: int | tuple[int, int] = 32
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'
  remat: str = 'none'  # key of REMAT_POLICIES
  # attention_names(); 'auto': einsum on CPU, else jax.nn's own choice.
  attention: str = 'auto'
  r_embedder_init: str = 'copy'  # 'copy' | 'small'
  time_convention: str = 'twinflow'  # see embeddings.TIME_CONVENTIONS
  freq_dim: int = 256

  @property
  def grid(self) -> tuple[int, int]:
    """Token grid (H/p, W/p)."""
    h, w = self.spatial
    return h // self.patch_size, w // self.patch_size

  @property
  def spatial(self) -> tuple[int, int]:
    s = self.input_size
    return (s, s) if isinstance(s, int) else tuple(s)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict that `resolve_config` turns back into this."""
    d = dataclasses.asdict(self)
    if not isinstance(d['input_size'], int):
      d['input_size'] = list(d['input_size'])
    return d


@dataclasses.dataclass(frozen=True)
class DiTConfig(_TransformerConfig):
  """Class-conditional DiT. cond = int32 labels [B]; null id = num_classes."""
  num_classes: int = 1000
  # Keep the second (learned-sigma) half of the output channels; the model's
  # __call__ always returns only the first in_channels.
  learn_sigma: bool = False
  # Run the blocks as one `lax.scan` over their stacked weights: the compiled
  # program holds one block instead of `depth`, so compiling DiT-XL/2 takes a
  # fraction of the time and memory; the weights stay per block (checkpoints
  # and sharding are unchanged) and are stacked inside each call, which makes
  # a step somewhat slower (docs/models.md).
  scan_blocks: bool = False


@dataclasses.dataclass(frozen=True)
class MMDiTConfig(_TransformerConfig):
  """SD3-style MMDiT. cond = {'txt' [B,L,txt_dim], 'txt_mask' [B,L] bool,
  'pooled' [B,pooled_dim]}."""
  in_channels: int = 16
  txt_dim: int = 4096
  pooled_dim: int = 2048
  qk_norm: bool = True
  r_embedder_init: str = 'small'


_NAME_RE = re.compile(r'^(DiT|MMDiT)-(S|B|L|XL|d\d+)/(\d+)$')


def _check_int(field, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'model config field {field!r} must be an int >= '
                     f'{minimum}, got {value!r}')


def _check_choice(field, value, choices):
  if value not in choices:
    raise ValueError(f'model config field {field!r} must be one of '
                     f'{tuple(choices)}, got {value!r}')


def _validate(cfg: _TransformerConfig) -> None:
  for f in ('depth', 'hidden_size', 'num_heads', 'patch_size', 'in_channels',
            'freq_dim'):
    _check_int(f, getattr(cfg, f))
  if not isinstance(cfg.mlp_ratio, (int, float)) or cfg.mlp_ratio <= 0:
    raise ValueError(f"model config field 'mlp_ratio' must be > 0, got "
                     f'{cfg.mlp_ratio!r}')
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(f"model config field 'hidden_size' ({cfg.hidden_size}) "
                     f"must be divisible by 'num_heads' ({cfg.num_heads})")
  if cfg.hidden_size % 4:
    raise ValueError(f"model config field 'hidden_size' ({cfg.hidden_size}) "
                     'must be divisible by 4 (2-D sin-cos position embedding)')
  size = cfg.input_size
  sizes = (size,) if isinstance(size, int) else tuple(size)
  if len(sizes) not in (1, 2):
    raise ValueError(f"model config field 'input_size' must be an int or "
                     f'(H, W), got {size!r}')
  for s in sizes:
    _check_int('input_size', s)
    if s % cfg.patch_size:
      raise ValueError(f"model config field 'input_size' ({size}) must be "
                       f"divisible by 'patch_size' ({cfg.patch_size})")
  _check_choice('dtype', cfg.dtype, DTYPES)
  _check_choice('param_dtype', cfg.param_dtype, DTYPES)
  _check_choice('remat', cfg.remat, REMAT_POLICIES)
  _check_choice('attention', cfg.attention, attention_names())
  _check_choice('r_embedder_init', cfg.r_embedder_init, ('copy', 'small'))
  _check_choice('time_convention', cfg.time_convention, TIME_CONVENTIONS)
  if isinstance(cfg, DiTConfig):
    _check_int('num_classes', cfg.num_classes)
    for f in ('learn_sigma', 'scan_blocks'):
      if not isinstance(getattr(cfg, f), bool):
        raise ValueError(f'model config field {f!r} must be a bool')
  if isinstance(cfg, MMDiTConfig):
    _check_int('txt_dim', cfg.txt_dim)
    _check_int('pooled_dim', cfg.pooled_dim)
    if not isinstance(cfg.qk_norm, bool):
      raise ValueError("model config field 'qk_norm' must be a bool")


def as_dict(model_config: Mapping[str, Any] | Any) -> dict[str, Any]:
  """dict / ConfigDict / FrozenConfigDict -> plain dict."""
  if hasattr(model_config, 'to_dict'):
    model_config = model_config.to_dict()
  if not isinstance(model_config, Mapping):
    raise ValueError(f'model config must be a dict or ConfigDict, got '
                     f'{type(model_config).__name__}')
  return dict(model_config)


def resolve_config(
    model_config: Mapping[str, Any] | Any) -> DiTConfig | MMDiTConfig:
  """Named size + overrides -> validated DiTConfig / MMDiTConfig.

  Args:
    model_config: dict or ConfigDict with 'name' (e.g. 'DiT-XL/2') and
      optional overrides of any DiTConfig / MMDiTConfig field.

  Returns:
    The frozen config.

  Raises:
    ValueError: unknown name or field, or an invalid value (message names the
      field).
  """
  d = as_dict(model_config)
  name = d.get('name')
  if not isinstance(name, str):
    raise ValueError("model config needs a string field 'name', e.g. "
                     "'DiT-XL/2'")
  m = _NAME_RE.match(name)
  if m is None:
    raise ValueError(
        f"model config field 'name' {name!r} not understood; expected "
        "'DiT-<S|B|L|XL>/<2|4|8>', 'MMDiT-<S|B|L|XL|dN>/<2|4|8>' or 'mlp'")
  family, size, patch = m.group(1), m.group(2), int(m.group(3))
  if patch not in PATCH_SIZES:
    raise ValueError(f"model config field 'name' {name!r}: patch size must be "
                     f'one of {PATCH_SIZES}')
  if size.startswith('d'):
    if family != 'MMDiT':
      raise ValueError(f"model config field 'name' {name!r}: the dN size is "
                       'only defined for MMDiT')
    n = int(size[1:])
    depth, hidden, heads = n, 64 * n, n
  else:
    depth, hidden, heads = NAMED_SIZES[size]
  cls = DiTConfig if family == 'DiT' else MMDiTConfig
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f'unknown model config field(s) {unknown} for {family}; '
                     f'known: {sorted(fields)}')
  base = dict(name=name, depth=depth, hidden_size=hidden, num_heads=heads,
              patch_size=patch)
  base.update(d)
  if isinstance(base.get('input_size'), (list, tuple)):
    base['input_size'] = tuple(base['input_size'])
  if base['patch_size'] != patch:
    raise ValueError(f"model config field 'patch_size' ({base['patch_size']}) "
                     f'contradicts the name {name!r}')
  cfg = cls(**base)
  _validate(cfg)
  return cfg
