"""The train state: a pytree of parameters, optimizer state, EMAs, step, RNG and counters.

Parameters are plain nested dicts of arrays (`nnx.to_pure_dict` of the model's `nnx.Param`
state); the model's graph definition stays outside the state and turns the dict back into a
module inside `apply_fn`. Everything in the state is created directly with its final
sharding by one jitted init function, so no device ever holds a full unsharded copy.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from twinflow_jax.train import mesh as mesh_lib

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: int32 [], number of train steps (micro-batches) done.
    params: float32 master weights (nested dict).
    opt_state: optimizer state (`optax.MultiSteps` state when accumulating).
    ema: the TwinFlow EMA teacher (TWINFLOW.md section 2 step 6).
    ema_cmd: float32 [], the warm-up decay of the next teacher update (starts at 0).
    eval_emas: {name: params} extra EMAs for evaluation only (constant decay).
    rng: uint32 [2], raw data of the base key; step keys are fold_in(base, step).
    skipped: int32 [], number of steps whose update was skipped for non-finite values.
  """
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  ema: PyTree
  ema_cmd: jax.Array
  eval_emas: dict[str, PyTree]
  rng: jax.Array
  skipped: jax.Array


def eval_ema_name(decay: float) -> str:
  """Checkpoint-safe key of an extra EMA, e.g. 0.9999 -> 'ema_0p9999'."""
  return "ema_" + repr(float(decay)).replace(".", "p")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, PyTree]:
  """Module -> (graphdef, params as a nested dict). Only `nnx.Param` state is supported."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the trainer supports models whose state is all nnx.Param; found "
                     f"other state: {jax.tree.map(jnp.shape, rest)}")
  return graphdef, nnx.to_pure_dict(params)


def make_apply_fn(graphdef: nnx.GraphDef) -> Callable:
  """`apply_fn(params, x_t, t, r, cond) -> F` (float32) in the losses' convention.

  Mixed precision is the model's own business (`config.model.dtype='bfloat16'` computes in
  bfloat16 from the float32 master weights held here).
  """

  def apply_fn(params, x_t, t, r, cond):
    model = nnx.merge(graphdef, params)
    return model(x_t, t, r, cond).astype(jnp.float32)

  return apply_fn


def init_state(model_fn: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
               key: jax.Array, eval_ema_decays: tuple[float, ...] = ()) -> TrainState:
  """Builds a fresh state (call under `jax.jit` with output shardings).

  Args:
    model_fn: `rngs -> module`.
    tx: the optimizer.
    key: typed PRNG key; split into the model init key and the base key of the steps.
    eval_ema_decays: decays of the extra evaluation EMAs.
  """
  k_model, k_train = jax.random.split(key)
  _, params = split_model(model_fn(nnx.Rngs(params=k_model)))
  copy = lambda: jax.tree.map(jnp.copy, params)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema=copy(),
      ema_cmd=jnp.zeros((), jnp.float32),
      eval_emas={eval_ema_name(d): copy() for d in eval_ema_decays},
      rng=jax.random.key_data(k_train),
      skipped=jnp.zeros((), jnp.int32))


def param_specs(model_fn: Callable[[nnx.Rngs], nnx.Module], mesh: jax.sharding.Mesh,
                rules: tuple[tuple[str, Any], ...]) -> tuple[nnx.GraphDef, PyTree, PyTree]:
  """Abstract model -> (graphdef, abstract params, PartitionSpec tree of params).

  Built without allocating anything; the logical names of the parameters are mapped to mesh
  axes by `rules`.
  """
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(params=0)))
    graphdef, abs_params, rest = nnx.split(abstract_model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the trainer supports models whose state is all nnx.Param; found "
                       f"other state: {rest}")
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abs_params))
  return graphdef, nnx.to_pure_dict(abs_params), specs


def state_shardings(abstract_state: TrainState, p_specs: PyTree,
                    tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
  """NamedShardings of every leaf: parameter-shaped leaves follow the parameters."""
  p_shard = mesh_lib.spec_shardings(p_specs, mesh)
  rep = mesh_lib.replicated(mesh)
  opt_shard = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state.opt_state, p_shard,
      transform_non_params=lambda _: rep,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return TrainState(
      step=rep, params=p_shard, opt_state=opt_shard, ema=p_shard, ema_cmd=rep,
      eval_emas={k: p_shard for k in abstract_state.eval_emas}, rng=rep, skipped=rep)


def abstract_with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs carrying the target shardings (a restore target)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def num_params(params: PyTree) -> int:
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
