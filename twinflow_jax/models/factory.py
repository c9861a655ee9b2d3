"""`create_model` (the trainer's entry point) and the loss adapter."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as core_spmd

from twinflow_jax.models.configs import (DiTConfig, MMDiTConfig, as_dict,
                                         resolve_config)
from twinflow_jax.models.dit import DiT
from twinflow_jax.models.families import FAMILIES, family_of_config
from twinflow_jax.models.mlp import MLP
from twinflow_jax.models.mmdit import MMDiT
from twinflow_jax.models.sharding import DEFAULT_LOGICAL_AXIS_RULES

ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, Any], jax.Array]


def _create_mlp(overrides: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  try:
    return MLP(**overrides, rngs=rngs)
  except TypeError as e:
    raise ValueError(f"invalid field for model 'mlp' ({e}); the fields are "
                     'the keyword arguments of twinflow_jax.models.mlp.MLP'
                     ) from e


def create_model(model_config: Mapping[str, Any] | Any, *,
                 rngs: nnx.Rngs) -> nnx.Module:
  """Builds a model from its config (a dict or ConfigDict).

  Sharding: under `jax.set_mesh(mesh)` the parameters are created sharded
  by their logical axis names, using the active `nnx.logical_axis_rules` or,
  when none are active, `DEFAULT_LOGICAL_AXIS_RULES`. Without a mesh the model
  is built unsharded. Also works inside `nnx.eval_shape` for abstract models.

  Args:
    model_config: {'name': 'DiT-XL/2' | 'MMDiT-...' | 'mlp' | a family of
      `families.FAMILIES` (e.g. 'sd3'), ...overrides}; see `configs.py` and the family
      modules for the fields.
    rngs: parameter RNG streams.

  Returns:
    An nnx.Module called as `model(x_t, t, r, cond) -> F`.

  Raises:
    ValueError: bad name, unknown field or invalid value (names the field).
  """
  d = as_dict(model_config)
  if d.get('name') == 'mlp':
    build = lambda: _create_mlp({k: v for k, v in d.items() if k != 'name'},
                                rngs)
  elif d.get('name') in FAMILIES:
    family = FAMILIES[d['name']]
    cfg = family.resolve(d)
    build = lambda: family.build(cfg, rngs)
  else:
    cfg = resolve_config(d)
    cls = DiT if isinstance(cfg, DiTConfig) else MMDiT
    build = lambda: cls(cfg, rngs=rngs)
  if jax.sharding.get_abstract_mesh().empty:
    with nnx.use_eager_sharding(False):
      return build()
  if not core_spmd.get_logical_axis_rules():
    with nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
      return build()
  return build()


def model_config_of(model: nnx.Module) -> Any:
  """The resolved config of a DiT / MMDiT / family model (None for other models)."""
  cfg = getattr(model, 'config', None)
  if isinstance(cfg, (DiTConfig, MMDiTConfig)) or family_of_config(cfg):
    return cfg
  return None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State,
                                             nnx.State]:
  """model -> (graphdef, params, rest): params are the nnx.Param variables."""
  return nnx.split(model, nnx.Param, ...)


def as_apply_fn(graphdef: nnx.GraphDef, *rest: nnx.State) -> ApplyFn:
  """Adapter to the loss convention `apply_fn(params, x_t, t, r, cond) -> F`.

  Usage:
    graphdef, params, rest = split_model(model)
    apply_fn = as_apply_fn(graphdef, rest)
    loss, aux = twinflow_loss(apply_fn, params, teacher_params, ...)

  Args:
    graphdef: from `nnx.split(model, nnx.Param, ...)`.
    *rest: the non-parameter states of that split (empty for DiT / MMDiT).

  Returns:
    A pure function; params is the nnx.Param State (or its pure dict).
  """

  def apply_fn(params, x_t, t, r, cond):
    return nnx.merge(graphdef, params, *rest)(x_t, t, r, cond)

  return apply_fn
