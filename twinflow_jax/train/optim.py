"""Optimizer factory: AdamW or RAdam, constant or warmup + cosine LR, clipping, accumulation.

The paper trains with AdamW (and RAdam for some fine-tunes) at a constant learning rate;
the cosine schedule is offered for from-scratch runs. Gradient accumulation wraps the whole
chain in `optax.MultiSteps`, so one call of the train step is one micro-batch and the
parameters change every `accum_steps` calls.
"""

from __future__ import annotations

from typing import Any

import optax

OPTIMIZERS = ("adamw", "radam")
SCHEDULES = ("constant", "warmup_cosine", "warmup_constant")


def create_schedule(optim_config: Any, num_updates: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer update count.

  Args:
    optim_config: has `lr`, `schedule` (one of SCHEDULES), `warmup_steps` and
      `min_lr_ratio` (final LR of the cosine as a fraction of `lr`).
    num_updates: total number of optimizer updates (train steps / accum_steps).
  """
  lr = float(optim_config.lr)
  if not lr > 0:
    raise ValueError(f"optim.lr must be > 0, got {optim_config.lr}")
  name = optim_config.get("schedule", "constant")
  warmup = int(optim_config.get("warmup_steps", 0))
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}")
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "warmup_constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
        [max(warmup, 1)])
  if name == "warmup_cosine":
    if num_updates <= warmup:
      raise ValueError(f"warmup_cosine needs more updates ({num_updates}) than warmup "
                       f"steps ({warmup})")
    ratio = float(optim_config.get("min_lr_ratio", 0.0))
    if not 0.0 <= ratio <= 1.0:
      raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {ratio}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=num_updates,
        end_value=lr * ratio)
  raise ValueError(f"unknown optim.schedule {name!r}; choose one of {SCHEDULES}")


def create_optimizer(optim_config: Any, num_steps: int
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer.

  Args:
    optim_config: has `name` ('adamw' | 'radam'), `lr`, `b1`, `b2`, `eps`,
      `weight_decay`, `grad_clip` (global norm, <= 0 disables), `accum_steps` and the
      schedule fields of `create_schedule`.
    num_steps: total train steps (micro-batches).

  Returns:
    (transformation, schedule); the schedule is indexed by optimizer updates.
  """
  accum = int(optim_config.get("accum_steps", 1))
  if accum < 1:
    raise ValueError(f"optim.accum_steps must be >= 1, got {accum}")
  if num_steps < 1:
    raise ValueError(f"train.num_steps must be >= 1, got {num_steps}")
  schedule = create_schedule(optim_config, max(num_steps // accum, 1))
  b1, b2 = float(optim_config.get("b1", 0.9)), float(optim_config.get("b2", 0.999))
  eps = float(optim_config.get("eps", 1e-8))
  wd = float(optim_config.get("weight_decay", 0.0))
  for name, v in (("b1", b1), ("b2", b2)):
    if not 0.0 <= v < 1.0:
      raise ValueError(f"optim.{name} must be in [0, 1), got {v}")
  if wd < 0:
    raise ValueError(f"optim.weight_decay must be >= 0, got {wd}")
  name = optim_config.get("name", "adamw")
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  elif name == "radam":
    # RAdam with decoupled weight decay, as torch.optim.RAdam(decoupled_weight_decay=True).
    opt = optax.chain(optax.scale_by_radam(b1=b1, b2=b2, eps=eps),
                      optax.add_decayed_weights(wd) if wd else optax.identity(),
                      optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f"unknown optim.name {name!r}; choose one of {OPTIMIZERS}")
  clip = float(optim_config.get("grad_clip", 1.0))
  tx = optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, schedule
