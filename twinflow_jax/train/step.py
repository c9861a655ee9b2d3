"""One train step: conditions, EMA teacher update, TwinFlow loss, guarded optimizer update.

`make_train_step` returns a pure function `(state, batch) -> (state, metrics)`; the loop
jits it once with explicit shardings and donates the state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from twinflow_jax import losses
from twinflow_jax.models import sharding as sharding_lib
from twinflow_jax.train.state import eval_ema_name
from twinflow_jax.train.state import TrainState

PyTree = Any
UNCOND_MODES = ("null", "shuffle", "zeros", "none")
# Bits of the `skip_reason` metric: what was not finite in a skipped step.
SKIP_REASONS = {"loss": 1, "gradient": 2, "new parameters": 4, "new optimizer state": 8,
                "new EMA": 16}


def tree_all_finite(tree: PyTree) -> jax.Array:
  """bool []: every floating-point value in `tree` is finite (integer leaves are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def describe_skip_reason(reason: int) -> str:
  """'loss and gradient' for the bits of a `skip_reason` metric."""
  names = [name for name, bit in SKIP_REASONS.items() if int(reason) & bit]
  if len(names) > 1:
    return ", ".join(names[:-1]) + " and " + names[-1]
  return names[0] if names else "nothing"


def make_conditions(batch: dict[str, jax.Array], key: jax.Array, *, num_classes: int,
                    uncond: str) -> tuple[PyTree, PyTree]:
  """(cond, uncond) of a batch.

  Class labels ('label' [B] int32; the data pipeline already applied label dropout, i.e.
  some labels are the null class id `num_classes`). Unconditional e: 'null' = the null
  class; 'shuffle' = a random other label (the official MNIST tutorial) or, for text,
  another row's prompt; 'zeros' = the null text (zero embeddings, all-False mask, zero
  pooled vector, as the data's text dropout); 'none' = e = c (no guidance signal).
  Text ('txt' [B, L, D], 'txt_mask' [B, L], 'pooled' [B, P]) is passed as a dict.
  Without either, the model is unconditional and both are None.
  """
  if uncond not in UNCOND_MODES:
    raise ValueError(f"unknown train.uncond {uncond!r}; choose one of {UNCOND_MODES}")
  k_shuffle = key
  if "label" in batch:
    labels = batch["label"].astype(jnp.int32)
    if uncond == "null":
      e = jnp.full_like(labels, num_classes)
    elif uncond == "shuffle":
      offset = jax.random.randint(k_shuffle, labels.shape, 1, max(num_classes, 2))
      e = jnp.where(labels == num_classes, labels, (labels + offset) % num_classes)
    elif uncond == "zeros":
      raise ValueError("train.uncond='zeros' is for text conditions; use 'null' or "
                       "'shuffle' for class labels")
    else:
      e = labels
    return labels, e
  if "txt" in batch:
    cond = {k: batch[k] for k in ("txt", "txt_mask", "pooled") if k in batch}
    if uncond in ("null", "zeros"):
      e = {k: jnp.zeros_like(v) for k, v in cond.items()}
    elif uncond == "shuffle":
      e = jax.tree.map(lambda a: jnp.roll(a, 1, axis=0), cond)
    else:
      e = cond
    return cond, e
  return None, None


def make_train_step(apply_fn: Callable, tf_config: losses.TwinFlowConfig,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    num_classes: int = 0, uncond: str = "null",
                    eval_ema_decays: tuple[float, ...] = (), accum_steps: int = 1,
                    guide_from: str | None = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  Order within a step (TWINFLOW.md section 2): the EMA teacher is updated first from the
  pre-update parameters (only at the start of an accumulation cycle, i.e. once per
  optimizer update), the loss uses that fresh teacher, then the gradient update; extra
  evaluation EMAs follow the new parameters. If the loss, the gradient norm, or any value
  of the new parameters, optimizer state or EMAs is not finite, the whole update
  (parameters, optimizer state, EMAs) is skipped, `skipped` counts it and the metric
  `skip_reason` says why (a sum of `SKIP_REASONS` bits; 0 = applied).

  `guide_from`, the key of one of the evaluation EMAs (e.g. 'ema_0p999'), turns the
  enhanced target into autoguidance by that slower, weaker average of the network (see
  `losses.twinflow_loss`); None keeps the official guidance by the teacher on e.

  With LoRA (`train/lora.py`) the step is called as `train_step(state, batch, frozen)`:
  `state` holds the adapters only and `apply_fn` takes `(adapters, frozen)` as params.
  """
  emd = float(tf_config.ema_decay)
  ema_names = [(eval_ema_name(d), float(d)) for d in eval_ema_decays]
  if guide_from is not None and guide_from not in dict(ema_names):
    raise ValueError(f"guide_from={guide_from!r} is not one of the evaluation EMAs "
                     f"{[n for n, _ in ema_names]}")

  def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: PyTree = None):
    # LoRA: `frozen` is the base, a constant of the step; apply_fn takes (params, frozen).
    apply = apply_fn if frozen is None else (
        lambda p, *args: apply_fn((p, frozen), *args))
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_draws, k_cond = jax.random.split(key)
    x = batch["x"].astype(jnp.float32)
    cond, e = make_conditions(batch, k_cond, num_classes=num_classes, uncond=uncond)
    draws = losses.sample_draws(k_draws, x.shape, tf_config, jnp.float32)

    # 6. EMA teacher update before the loss, once per optimizer update.
    new_ema, new_cmd = losses.teacher_update(state.ema, state.params, state.ema_cmd, emd)
    if accum_steps > 1:
      at_cycle_start = state.opt_state.mini_step == 0
      new_ema = jax.tree.map(lambda n, o: jnp.where(at_cycle_start, n, o), new_ema,
                             state.ema)
      new_cmd = jnp.where(at_cycle_start, new_cmd, state.ema_cmd)

    # The loss keeps its row blocks on the batch shards (see TwinFlowConfig.row_blocks).
    batch_axes = sharding_lib.mesh_axes("activation_batch")

    def loss_fn(params):
      guide = None if guide_from is None else state.eval_emas[guide_from]
      return losses.twinflow_loss(apply, params, new_ema, x, cond, e, draws, tf_config,
                                  batch_axes=batch_axes, guide_params=guide)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # MultiSteps applied the accumulated update iff its micro-step counter wrapped to 0.
    applied = new_opt.mini_step == 0 if accum_steps > 1 else jnp.bool_(True)
    new_eval = {name: jax.tree.map(
        lambda a, p, d=d: jnp.where(applied, a * d + p * (1 - d), a),
        state.eval_emas[name], new_params) for name, d in ema_names}

    finite = (jnp.isfinite(loss), jnp.isfinite(grad_norm), tree_all_finite(new_params),
              tree_all_finite(new_opt),
              tree_all_finite((new_ema, new_cmd)) & tree_all_finite(new_eval))
    ok = functools.reduce(jnp.logical_and, finite)
    reason = sum(jnp.where(f, 0, bit) for f, bit in zip(finite, SKIP_REASONS.values()))
    # One conditional for the whole state rather than a select per leaf: the same result,
    # but per-leaf selects cannot fuse with their producers (they wait for every finite
    # check) and doubled the compile of the default step (27 s -> 14 s on 2 CPU cores).
    new_parts = (new_params, new_opt, new_ema, new_cmd, new_eval)
    old_parts = (state.params, state.opt_state, state.ema, state.ema_cmd, state.eval_emas)
    kept = jax.lax.cond(ok, lambda: new_parts, lambda: old_parts)
    new_state = state.replace(
        step=state.step + 1,
        params=kept[0], opt_state=kept[1], ema=kept[2], ema_cmd=kept[3], eval_emas=kept[4],
        skipped=state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32))
    metrics = dict(aux)
    metrics.update(
        grad_norm=grad_norm,
        learning_rate=schedule(_update_count(state.opt_state, accum_steps)),
        skipped_steps=new_state.skipped,
        skip_reason=reason.astype(jnp.int32),
        ema_decay=state.ema_cmd)
    return new_state, metrics

  return train_step


def _update_count(opt_state: optax.OptState, accum_steps: int) -> jax.Array:
  """Number of optimizer updates applied so far (the schedule's index)."""
  if accum_steps > 1:
    return opt_state.gradient_step
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
  if not counts:
    return jnp.zeros((), jnp.int32)
  return counts[-1][1]
