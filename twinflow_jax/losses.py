"""The TwinFlow training loss as one pure JAX function.

This module states the production loss of the official PyTorch code
(`inclusionAI/TwinFlow`, `src/methodes/twinflow/twinflow.py`, class `TwinFlow`) number for
number; `../shared/TWINFLOW.md` in the project describes it line by line and the tests match
the official loss and gradients to 1e-10 in float64.

Conventions (as in the official code):
  * time `t` in [-1, 1]; `t = 1` is noise, `t = 0` data, `t < 0` the fake trajectory;
  * `x_t = |t| z + (1 - |t|) x`, target velocity `v = z - x`;
  * the network `apply_fn(params, x_t, t, r, cond) -> F` predicts the average velocity
    from `t` to the signed target time `r`: `x_r = x_t - (t - r) F`.

Everything random is drawn up front by `sample_draws` into a `TwinFlowDraws` pytree, so the
loss itself is deterministic: `jit`-, `grad`- and `vmap`-safe.

Beyond the official code, the teacher runs only on the rows whose results are used (the
enhanced target on mul/any rows, the RCGM chain on non-adv rows), the conditional and
unconditional teacher calls are one batched call, and the two rectification calls are one
call. `count_network_rows` reports the resulting work. With `row_blocks` = G the batch is
G official sub-batches, so that on a mesh every batch shard holds its own row groups.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, PyTree], jax.Array]

GROUPS = ("e2e", "mul", "any", "adv")
# The fifth group of the official LoRA loss (`TwinFlowConfig.one_group`).
ONE = "one"
METRICS = ("barron", "l2", "pseudo_huber")
# Official: r_mul = t (1 - min(0.05, cor) u); the "mul" rows learn a nearly instantaneous
# velocity within 5% of t.
_MUL_MAX_GAP = 0.05


@dataclasses.dataclass(frozen=True)
class TwinFlowConfig:
  """Hyper-parameters of the TwinFlow loss, with the official defaults.

  Attributes:
    estimate_order: N, the order of the RCGM target (number of teacher steps in the chain).
      0 disables RCGM; the loss is then averaged over the mul and adv rows only, as in the
      official code.
    enhanced_ratio: enr, training-time classifier-free guidance strength of the target.
      0 skips the enhanced target.
    rect_coef: dmc, weight of the rectification (distribution matching) term.
    consistency_ratio: cor; scales how far the target time r lies from t. The rectification
      term runs only when cor == 1, RCGM only when cor != 0.
    delta: the Euler step of the RCGM target (official 0.01).
    metric: per-row distance: "barron" (official), "l2", or "pseudo_huber".
    barron_alpha: shape parameter of the barron metric (official 1.0).
    barron_c: scale parameter of the barron metric (official 1e-3).
    huber_c: scale of the pseudo-Huber metric, sqrt(mse + c^2) - c.
    group_proportions: proportions of the contiguous row groups (e2e, mul, any, adv).
    row_blocks: G, the number of row blocks. The batch of B rows is seen as [G, B / G]:
      each block of B / G consecutive rows is one official sub-batch with its own
      e2e | mul | any | adv groups (sizes `group_sizes(B / G)`), its own draws and its own
      loss, and the loss is the mean of the G block losses. G = 1 is the official layout
      (the fixtures match it bit for bit). With G = the number of batch shards of a mesh
      (data x fsdp) every shard holds whole blocks, so the loss moves no activations
      between devices. B must be divisible by G with B / G >= 4; group proportions are
      rounded per block, so for B / G not divisible by 4 the global group sizes differ
      from the official rounding of B (e.g. B = 40, G = 8: 8, 8, 8, 16 rows instead of
      10, 10, 10, 10).
    time_dist: (a, b, scale): t ~ clip(Beta(a, b), 0, 1) * scale.
    enhanced_range: the enhanced target applies on rows with lo < t < hi (strict).
    image_free: learn from the teacher alone: the data rows are replaced by the online
      model's one-step samples; with ema_decay == 1 the target becomes
      enr (F_T(c) - F_T(e)) + F_T(e) on the enhanced rows.
    ema_decay: emd. Only its two special values change the loss: 0 means the teacher is the
      online network (teacher_params is ignored); 1 means a frozen teacher, and then (as in
      the official code) the RCGM chain runs on the online network while the enhanced
      target uses the frozen teacher.
    one_group: the row layout of the official LoRA loss (`twinflow_lora.py`): a fifth
      group 'one' (r = 0, t as drawn) with proportion 0 follows adv and takes the rows
      that `round(B p_k / sum(p))` leaves over (e.g. B = 10: 2|2|2|2|2, B = 5: 1|1|1|1|1);
      when the rounded sizes exceed B the groups are cut at the batch end (B = 7:
      2|2|2|1|0). Off: adv takes the remainder (`twinflow.py`). The two agree when the
      rounded sizes do not fall short of B (B = 4k, 4k + 3, and 4k + 2 with k odd).
  """

  estimate_order: int = 2
  enhanced_ratio: float = 0.8
  rect_coef: float = 0.5
  consistency_ratio: float = 1.0
  delta: float = 0.01
  metric: str = "barron"
  barron_alpha: float = 1.0
  barron_c: float = 1e-3
  huber_c: float = 1e-3
  group_proportions: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
  row_blocks: int = 1
  time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0)
  enhanced_range: tuple[float, float] = (0.0, 1.0)
  image_free: bool = False
  ema_decay: float = 0.99
  one_group: bool = False

  def __post_init__(self):
    # Accept lists (e.g. from ml_collections) but store tuples so the config stays hashable.
    for name in ("group_proportions", "time_dist", "enhanced_range"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    _check(isinstance(self.estimate_order, (int, np.integer)) and self.estimate_order >= 0,
           "estimate_order", "an integer >= 0", self.estimate_order)
    _check(self.enhanced_ratio >= 0, "enhanced_ratio", ">= 0", self.enhanced_ratio)
    _check(self.rect_coef >= 0, "rect_coef", ">= 0", self.rect_coef)
    _check(0 <= self.consistency_ratio <= 1, "consistency_ratio", "in [0, 1]",
           self.consistency_ratio)
    _check(0 < self.delta < 1, "delta", "in (0, 1)", self.delta)
    _check(self.metric in METRICS, "metric", f"one of {METRICS}", self.metric)
    _check(self.barron_c > 0, "barron_c", "> 0", self.barron_c)
    _check(self.huber_c > 0, "huber_c", "> 0", self.huber_c)
    _check(len(self.group_proportions) == 4 and min(self.group_proportions) >= 0
           and sum(self.group_proportions) > 0, "group_proportions",
           "4 non-negative numbers (e2e, mul, any, adv) with a positive sum",
           self.group_proportions)
    _check(isinstance(self.row_blocks, (int, np.integer)) and not isinstance(
        self.row_blocks, bool) and self.row_blocks >= 1, "row_blocks", "an integer >= 1",
           self.row_blocks)
    _check(len(self.time_dist) == 3 and self.time_dist[0] > 0 and self.time_dist[1] > 0
           and 0 < self.time_dist[2] <= 1, "time_dist",
           "(a > 0, b > 0, 0 < scale <= 1)", self.time_dist)
    _check(len(self.enhanced_range) == 2 and self.enhanced_range[0] < self.enhanced_range[1],
           "enhanced_range", "(lo, hi) with lo < hi", self.enhanced_range)
    _check(0 <= self.ema_decay <= 1, "ema_decay", "in [0, 1]", self.ema_decay)
    _check(isinstance(self.one_group, (bool, np.bool_)), "one_group", "a bool",
           self.one_group)

  def replace(self, **changes) -> "TwinFlowConfig":
    return dataclasses.replace(self, **changes)


def _check(ok: bool, field: str, want: str, got: Any) -> None:
  if not ok:
    raise ValueError(f"TwinFlowConfig.{field} must be {want}, got {got!r}")


# Named settings of the same loss, so one model can compare one-step methods.
PRESETS: dict[str, dict[str, Any]] = {
    # The official production loss.
    "twinflow": {},
    # RCGM alone: no self-adversarial rows, no rectification.
    "rcgm": dict(group_proportions=(1.0, 1.0, 1.0, 0.0), rect_coef=0.0),
    # Plain (conditional) flow matching: every row is a "mul" row with r = t.
    "flow_matching": dict(group_proportions=(0.0, 1.0, 0.0, 0.0), consistency_ratio=0.0,
                          enhanced_ratio=0.0, estimate_order=0, rect_coef=0.0),
}


def preset(name: str, **overrides) -> TwinFlowConfig:
  """A `TwinFlowConfig` for a named method ('twinflow', 'rcgm', 'flow_matching')."""
  if name not in PRESETS:
    raise ValueError(f"unknown TwinFlow preset {name!r}; choose one of {tuple(PRESETS)}")
  return TwinFlowConfig(**{**PRESETS[name], **overrides})


def group_sizes(batch: int, proportions=(1, 1, 1, 1),
                one_group: bool = False) -> tuple[int, int, int, int]:
  """Sizes of the contiguous row groups (e2e, mul, any, adv).

  Official rule: `round(B p_k / sum(p))` (Python's half-to-even rounding) for every group
  but the last, which takes the remainder. Here "the last" is the last group with a
  non-zero proportion, so that presets without adv rows never get a negative remainder;
  for the official proportions (1, 1, 1, 1) the two rules agree.

  With `one_group` (official LoRA layout, see `TwinFlowConfig.one_group`) all four are
  rounded, cut at the batch end, and the `batch - sum` rows left over (>= 0) form the
  group 'one' after adv.
  """
  if batch < 4:
    raise ValueError(f"TwinFlow needs a batch of at least 4 rows (one per group), got {batch}")
  total = float(sum(proportions))
  if one_group:
    sizes, cursor = [], 0
    for p in proportions:   # official: masks m[cursor:cursor + n], cut at the batch end
      n = int(round(batch * p / total))
      sizes.append(max(0, min(n, batch - cursor)))
      cursor += n
    return tuple(sizes)
  last = max(k for k, p in enumerate(proportions) if p > 0)
  sizes = [int(round(batch * p / total)) if k != last else 0
           for k, p in enumerate(proportions)]
  sizes[last] = batch - sum(sizes)
  if sizes[last] < 0:
    raise ValueError(f"group_proportions {tuple(proportions)} give group sizes {sizes} for a "
                     f"batch of {batch}: the remainder group is negative")
  return tuple(sizes)


def block_layout(batch: int, config: "TwinFlowConfig") -> tuple[int, int, tuple[int, ...]]:
  """(G, rows per block, group sizes of one block) of a batch; see `row_blocks`.

  The sizes are (e2e, mul, any, adv); with `one_group` the rows of a block they leave
  over are the group 'one'.

  Raises ValueError naming `row_blocks` when G does not divide the batch or leaves fewer
  than 4 rows per block.
  """
  g = config.row_blocks
  if g == 1:
    return 1, batch, group_sizes(batch, config.group_proportions, config.one_group)
  if batch % g:
    raise ValueError(f"TwinFlowConfig.row_blocks={g} does not divide the batch of {batch} "
                     "rows (the loss sees the batch as [row_blocks, batch / row_blocks]); "
                     "use a divisor of the batch, e.g. the number of batch shards")
  if batch // g < 4:
    raise ValueError(f"TwinFlowConfig.row_blocks={g} leaves {batch // g} rows per block of "
                     f"a batch of {batch}; every block needs at least 4 rows (one per "
                     f"group): use row_blocks <= {batch // 4}")
  return g, batch // g, group_sizes(batch // g, config.group_proportions, config.one_group)


class TwinFlowDraws(NamedTuple):
  """Every random draw of one step, in the official order.

  Shapes for a batch x of shape [B, *S] with n_e2e e2e rows and n_adv adv rows in all
  (with G = row_blocks blocks, G times the counts of one block, block after block):
    t: [B] base time t0 ~ Beta * scale.         (fixture key draw/t0)
    u_any: [B] r = t (1 - cor u_any).            (draw/u_tt)
    u_mul: [B] r_mul = t (1 - min(.05, cor) u).  (draw/u_tmin)
    z_fake: [n_adv, *S] noise of the fake samples.  (draw/z_adv)
    z: [B, *S] noise of the interpolation.       (draw/z)
    z_rect: [n_e2e, *S] rectification noise.     (draw/z_dm)
    s_rect: [n_e2e] rectification times.         (draw/t_dm)
    z_data: [B, *S] noise of the image-free fake data, or None when image_free is off
      (drawn after u_mul, before z_fake, as in the official code).
  """

  t: jax.Array
  u_any: jax.Array
  u_mul: jax.Array
  z_fake: jax.Array
  z: jax.Array
  z_rect: jax.Array
  s_rect: jax.Array
  z_data: jax.Array | None = None


def sample_draws(key: jax.Array, x_shape, config: TwinFlowConfig = TwinFlowConfig(),
                 dtype=jnp.float32) -> TwinFlowDraws:
  """Draws the random inputs of one TwinFlow step for a batch of shape `x_shape`."""
  x_shape = tuple(x_shape)
  if len(x_shape) < 2:
    raise ValueError(f"x must have a batch axis and at least one feature axis, got {x_shape}")
  b, feat = x_shape[0], x_shape[1:]
  g, _, (n_e2e, _, _, n_adv) = block_layout(b, config)
  n_e2e, n_adv = g * n_e2e, g * n_adv
  k = jax.random.split(key, 8)
  a_, b_, scale = config.time_dist
  if a_ == 1.0 and b_ == 1.0:
    t = jax.random.uniform(k[0], (b,), dtype)
  else:
    t = jax.random.beta(k[0], a_, b_, (b,), dtype)
  t = jnp.clip(t, 0, 1) * scale
  return TwinFlowDraws(
      t=t,
      u_any=jax.random.uniform(k[1], (b,), dtype),
      u_mul=jax.random.uniform(k[2], (b,), dtype),
      z_fake=jax.random.normal(k[4], (n_adv, *feat), dtype),
      z=jax.random.normal(k[5], (b, *feat), dtype),
      z_rect=jax.random.normal(k[6], (n_e2e, *feat), dtype),
      s_rect=jax.random.uniform(k[7], (n_e2e,), dtype),
      z_data=jax.random.normal(k[3], x_shape, dtype) if config.image_free else None,
  )


# ----------------------------------------------------------------------------- metrics


def _row_mean(a: jax.Array) -> jax.Array:
  return jnp.mean(a, axis=tuple(range(1, a.ndim)))


def row_distance(pred: jax.Array, target: jax.Array, config: TwinFlowConfig) -> jax.Array:
  """Per-row distance rho(pred, target) -> [B]; `target` must already be a constant."""
  mse = _row_mean(jnp.square(pred - target))
  if config.metric == "l2":
    return mse
  if config.metric == "pseudo_huber":
    c = config.huber_c
    return jnp.sqrt(mse + c * c) - c
  # Barron reweighting: a detached per-row weight turns the l2 loss into a robust one
  # (about sqrt(mse) for alpha = 1).
  alpha, c = config.barron_alpha, config.barron_c
  if abs(alpha - 2.0) < 1e-5:
    return mse / c
  weight = (mse / (c * c + 1e-8) / abs(alpha - 2.0) + 1.0) ** ((alpha - 2.0) / 2.0)
  return mse * jax.lax.stop_gradient(weight) / c


# ----------------------------------------------------------------------------- EMA


def ema_update(ema_params: PyTree, params: PyTree, decay) -> PyTree:
  """`ema * decay + params * (1 - decay)`, leaf by leaf (the official update_ema)."""
  return jax.tree.map(lambda e, p: e * decay + p * (1 - decay), ema_params, params)


def ema_warmup_decay(cmd, ema_decay: float):
  """The official warm-up schedule: the decay used at the next update.

  Starts at cmd = 0 (the first update copies the parameters) and approaches ema_decay:
  0 -> 0.495 -> 0.62 -> 0.69 -> ... for ema_decay = 0.99.
  """
  return cmd + (1 - cmd) * (ema_decay - cmd) * 0.5


def teacher_update(ema_params: PyTree, params: PyTree, cmd, ema_decay: float):
  """One in-step teacher update, as the official `update_ema`.

  Args:
    ema_params: the EMA teacher.
    params: the online parameters before this step's gradient update.
    cmd: current warm-up decay (scalar; 0 at the start of training).
    ema_decay: emd. In (0, 1): EMA with warm-up. 0: the teacher is the online network
      (returned ema is `params`). 1: frozen teacher (ema unchanged).

  Returns:
    (new_ema_params, new_cmd); use new_ema_params as this step's teacher.
  """
  if ema_decay == 0.0:
    return params, cmd
  if ema_decay == 1.0:
    return ema_params, cmd
  return ema_update(ema_params, params, cmd), ema_warmup_decay(cmd, ema_decay)


# ----------------------------------------------------------------------------- the loss


BatchAxes = str | tuple[str, ...] | None


def _pin_leading(a: jax.Array, axes: BatchAxes) -> jax.Array:
  """Shards a's leading axis over the mesh axes `axes` (a no-op without a mesh).

  Skipped when no mesh is set, when none of `axes` is in the mesh, or when they do not
  divide the leading axis; the other axes are left to XLA.
  """
  if axes is None:
    return a
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return a
  axes = tuple(n for n in ((axes,) if isinstance(axes, str) else axes) if n in mesh.shape)
  if not axes or a.shape[0] % math.prod(mesh.shape[n] for n in axes):
    return a
  spec = jax.sharding.PartitionSpec(axes, *([jax.sharding.PartitionSpec.UNCONSTRAINED]
                                            * (a.ndim - 1)))
  return jax.lax.with_sharding_constraint(a, spec)


class _Blocks:
  """Row bookkeeping in the [G, rows per block] view of a batch (`row_blocks`).

  Every row selection keeps the blocks apart: "rows start:stop" means those rows of every
  block, block after block, so with the leading (block) axis sharded each device only
  ever touches its own blocks. With G = 1 every operation is the plain row slice or
  concatenation of the official layout.
  """

  def __init__(self, g: int, axes: BatchAxes):
    self.g, self.axes = g, axes

  def pin(self, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: _pin_leading(a, self.axes), tree)

  def view(self, a: jax.Array) -> jax.Array:
    """[G k, ...] -> [G, k, ...]."""
    return self.pin(a.reshape((self.g, a.shape[0] // self.g) + a.shape[1:]))

  def flat(self, a: jax.Array) -> jax.Array:
    """[G, k, ...] -> [G k, ...]."""
    return self.pin(a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]))

  def rows(self, tree: PyTree, start: int, stop: int) -> PyTree:
    """Rows start:stop of every block."""
    return jax.tree.map(lambda a: self.flat(self.view(a)[:, start:stop]), tree)

  def join(self, *trees: PyTree) -> PyTree:
    """Per-block concatenation: block g of the result is block g of each tree in turn."""
    return jax.tree.map(
        lambda *a: self.flat(jnp.concatenate([self.view(x) for x in a], axis=1)), *trees)

  def halves(self, a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `join` of two trees of equal size."""
    v = self.view(a)
    k = v.shape[1] // 2
    return self.flat(v[:, :k]), self.flat(v[:, k:])

  def set_rows(self, a: jax.Array, start: int, value: jax.Array) -> jax.Array:
    """a with rows start:start + k of every block replaced by `value` [G k, ...]."""
    v = self.view(value)
    return self.flat(self.view(a).at[:, start:start + v.shape[1]].set(v))


def _bcast(a: jax.Array, like: jax.Array) -> jax.Array:
  """[B] -> [B, 1, ..., 1] to broadcast against `like`."""
  return a.reshape(a.shape + (1,) * (like.ndim - 1))


def _check_inputs(x, cond, uncond, draws: TwinFlowDraws, config: TwinFlowConfig):
  if x.ndim < 2:
    raise ValueError(f"x must be [B, ...] with at least one feature axis, got shape {x.shape}")
  b = x.shape[0]
  g, _, (n_e2e, _, _, n_adv) = block_layout(b, config)
  n_e2e, n_adv = g * n_e2e, g * n_adv
  want = dict(t=(b,), u_any=(b,), u_mul=(b,), z_fake=(n_adv, *x.shape[1:]), z=x.shape,
              z_rect=(n_e2e, *x.shape[1:]), s_rect=(n_e2e,))
  if config.image_free:
    want["z_data"] = x.shape
  for name, shape in want.items():
    got = getattr(draws, name)
    if got is None or tuple(got.shape) != tuple(shape):
      raise ValueError(f"draws.{name} has shape {None if got is None else got.shape}, "
                       f"expected {shape} for x of shape {x.shape} (use sample_draws)")
  for what, tree in (("cond", cond), ("uncond", uncond)):
    for leaf in jax.tree.leaves(tree):
      if leaf.ndim == 0 or leaf.shape[0] != b:
        raise ValueError(f"every leaf of {what} needs a leading batch axis of size {b}, "
                         f"got a leaf of shape {leaf.shape}")
  if jax.tree.structure(cond) != jax.tree.structure(uncond):
    raise ValueError("cond and uncond must have the same pytree structure, got "
                     f"{jax.tree.structure(cond)} and {jax.tree.structure(uncond)}")


def twinflow_loss(apply_fn: ApplyFn, params: PyTree, teacher_params: PyTree | None,
                  x: jax.Array, cond: PyTree, uncond: PyTree, draws: TwinFlowDraws,
                  config: TwinFlowConfig = TwinFlowConfig(), *,
                  batch_axes: BatchAxes = None, guide_params: PyTree | None = None):
  """The TwinFlow loss of one batch (official `TwinFlow.training_step`).

  Args:
    apply_fn: `apply_fn(params, x_t [n, *S], t [n], r [n], cond) -> F [n, *S]`, the
      network predicting the average velocity from signed time t to signed time r.
    params: online parameters, the only ones differentiated.
    teacher_params: this step's teacher (the EMA after its in-step update, see
      `teacher_update`); ignored (may be None) when config.ema_decay == 0.
    x: data [B, *S], B >= 4, any rank >= 2, float64/float32/bfloat16.
    cond: condition c, a pytree whose leaves have leading axis B (e.g. labels [B]).
    uncond: the "unconditional" e for the enhanced target, same structure as cond.
    draws: the step's random draws (`sample_draws(key, x.shape, config)`).
    config: hyper-parameters. With `row_blocks` = G > 1 the loss is the mean of the
      official losses of the G blocks of B / G consecutive rows.
    batch_axes: mesh axes the batch is sharded over (e.g. ('data', 'fsdp')); under a mesh
      the loss then pins the block axis of every row selection and network input to them,
      so with G a multiple of their size each device keeps its own blocks. None: no
      constraints (XLA propagates the input shardings). The value never depends on it.
    guide_params: autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad
      version of itself"), not in the official code: the enhanced target subtracts this
      weaker network on the same condition, enr (F_T(c) - F_W(c)), instead of the teacher
      on e, enr (F_T(c) - F_T(e)); `uncond` is then unused. None (default): official.

  Returns:
    (loss, aux): the scalar loss L_main + rect_coef * L_rect, and a dict of scalar terms
    for logging: "loss", "loss_main", "loss_rect", "loss_adv" and "group/<name>" (the mean
    weighted distance of each non-empty group, 'one' included).
  """
  _check_inputs(x, cond, uncond, draws, config)
  cfg = config
  b = x.shape[0]
  g, nb, (n_e2e, n_mul, n_any, n_adv) = block_layout(b, cfg)
  n_one = nb - (n_e2e + n_mul + n_any + n_adv)   # > 0 only with one_group (official LoRA)
  blk = _Blocks(g, batch_axes)
  x, cond, uncond, draws = blk.pin((x, cond, uncond, draws))
  if n_one:
    # Official row order e2e|mul|any|adv|one. The loss works on e2e|mul|any|one|adv, so
    # that the non-adv rows stay a prefix of every block: the rows of one move before adv
    # with their inputs and per-row draws. The loss is a mean over rows; nothing moves back.
    n4 = n_e2e + n_mul + n_any
    perm = np.concatenate([np.arange(n4), np.arange(n4 + n_adv, nb),
                           np.arange(n4, n4 + n_adv)])
    move = lambda a: blk.flat(blk.view(a)[:, perm])
    x, cond, uncond = jax.tree.map(move, (x, cond, uncond))
    draws = draws._replace(
        t=move(draws.t), u_any=move(draws.u_any), u_mul=move(draws.u_mul), z=move(draws.z),
        z_data=None if draws.z_data is None else move(draws.z_data))
  n_real = nb - n_adv                     # non-adv rows are the prefix [0, n_real) of a block
  # Static row masks (groups are contiguous in each block: e2e | mul | any | one | adv).
  group_id = np.tile(np.repeat(np.array([0, 1, 2, 4, 3]),
                               (n_e2e, n_mul, n_any, n_one, n_adv)), g)
  is_e2e, is_mul, is_adv, is_one = (group_id == 0, group_id == 1, group_id == 3,
                                    group_id == 4)
  # Targets and G are computed in float32 at least (float64 when x is float64).
  ct = jnp.promote_types(x.dtype, jnp.float32)
  sg = jax.lax.stop_gradient
  cor = cfg.consistency_ratio
  online = sg(params)
  enhance_on = cfg.estimate_order >= 0 and cfg.enhanced_ratio != 0.0
  rcgm_on = (cfg.estimate_order >= 1 and cor != 0.0 and (n_e2e + n_any + n_one) > 0
             and n_real > 0)
  if cfg.ema_decay == 0.0:
    teacher = online
  elif teacher_params is not None:
    teacher = sg(teacher_params)
  elif enhance_on or (rcgm_on and cfg.ema_decay != 1.0):
    raise ValueError("teacher_params is None but config.ema_decay != 0 and the loss needs "
                     "a teacher; pass the EMA teacher (or set ema_decay=0 to use the "
                     "online network)")
  else:
    teacher = None

  def net(p, xt, t, r, c):
    return blk.pin(apply_fn(p, xt, t, r, c).astype(ct))

  # 1-2. Times: r = t (1 - cor u); e2e rows (t, r) = (1, 0); mul rows r within 5% of t;
  # one rows r = 0.
  t0 = draws.t.astype(ct)
  r = t0 - draws.u_any.astype(ct) * cor * t0
  r_mul = t0 - draws.u_mul.astype(ct) * t0 * min(_MUL_MAX_GAP, cor)
  t = jnp.where(is_e2e, 1.0, t0).astype(ct)
  r = jnp.where(is_e2e | is_one, 0.0, jnp.where(is_mul, r_mul, r)).astype(ct)

  x = x.astype(ct)
  if cfg.image_free:
    z_d = draws.z_data.astype(ct)
    ones = jnp.ones((b,), ct)
    x = sg(z_d - net(online, z_d, ones, 0 * ones, cond))

  # 3. Fake data for the adv rows: the online one-step samples, r = -t.
  if n_adv:
    z_f = draws.z_fake.astype(ct)
    ones = jnp.ones((g * n_adv,), ct)
    x_fake = sg(z_f - net(online, z_f, ones, 0 * ones, blk.rows(cond, n_real, nb)))
    x = blk.join(blk.rows(x, 0, n_real), x_fake)
    r = jnp.where(is_adv, -t, r)

  # 4. Interpolation at |t|, then adv rows flip to negative time (t = r = -t').
  z = draws.z.astype(ct)
  x_t = _bcast(t, x) * z + (1 - _bcast(t, x)) * x
  v = z - x
  t = jnp.where(is_adv, -t, t)

  # 5. Student forward: the only forward with gradient.
  f_student = net(params, x_t, t, r, cond)
  f = sg(f_student)

  # 7. Enhanced target (training-time CFG) from the teacher at r = t; one batched call of
  # cond and uncond, only on the groups where 0 < t < 1 can hold.
  target = v
  lo, hi = cfg.enhanced_range
  if enhance_on:
    start = 0 if lo < 1.0 < hi else n_e2e   # e2e rows have t = 1
    stop = n_real                           # adv rows are never enhanced
    if stop > start:
      xs, ts = blk.rows(x_t, start, stop), blk.rows(t, start, stop)
      c_s = blk.rows(cond, start, stop)
      if guide_params is None:
        f_both = net(teacher, blk.join(xs, xs), blk.join(ts, ts), blk.join(ts, ts),
                     blk.join(c_s, blk.rows(uncond, start, stop)))
        f_c, f_e = blk.halves(f_both)
      else:   # autoguidance: the same rows and condition through the weaker network
        f_c = net(teacher, xs, ts, ts, c_s)
        f_e = net(sg(guide_params), xs, ts, ts, c_s)
      v_s = blk.rows(v, start, stop)
      enhanced = v_s + cfg.enhanced_ratio * (f_c - f_e)
      if cfg.ema_decay == 1.0 and cfg.image_free:
        enhanced = cfg.enhanced_ratio * (f_c - f_e) + f_e
      in_range = _bcast((ts > lo) & (ts < hi), xs)
      target = blk.set_rows(target, start, jnp.where(in_range, enhanced, v_s))

  # 8. RCGM N-th order target on the non-adv rows (the official code skips it when there
  # are no e2e, any or one rows). Frozen teacher: the official code runs the chain online.
  if rcgm_on:
    chain_params = online if cfg.ema_decay == 1.0 else teacher
    tr, rr, vr, fr = (blk.rows(a, 0, n_real) for a in (t, r, target, f))
    c_real = blk.rows(cond, 0, n_real)
    delta = cfg.delta
    t_m = jnp.maximum(tr - delta, rr)
    x_c = blk.rows(x_t, 0, n_real) - delta * vr
    n = cfg.estimate_order
    taus = [t_m * (1 - i / n) + rr * (i / n) for i in range(n + 1)]
    d_sum = jnp.zeros_like(x_c)
    for tau_c, tau_n in zip(taus[:-1], taus[1:]):
      f_c = net(chain_params, x_c, tau_c, tau_n, c_real)
      # The official recombination x_next = tau_n z_hat + (1 - tau_n) x_hat, i.e.
      # x - (tau_c - tau_n) F, kept in this form to match it to the last bit.
      a_c, a_n = _bcast(jnp.abs(tau_c), x_c), _bcast(tau_n, x_c)
      x_c = a_n * (x_c + (1 - a_c) * f_c) + (1 - a_n) * (x_c - a_c * f_c)
      d_sum = d_sum + f_c * _bcast(tau_c - tau_n, x_c)
    gap = tr - rr
    short = tr < rr + delta
    # Official: R = F cof_l - D cof_r - v with (cof_l, cof_r) = (1, 1 / (t - r)) where
    # t - r < delta (there t_m = r and D is zero up to rounding) and ((t - r) / delta,
    # 1 / delta) elsewhere. The official 1 / (t - r) is inf on r = t rows; guard it so no
    # NaN can reach anything.
    safe_gap = jnp.where(gap > 0, gap, 1.0)
    cof_l = jnp.where(short, 1.0, gap * (1.0 / delta))   # official: 100 * (t - r)
    cof_r = jnp.where(short, jnp.where(gap > 0, 1.0 / safe_gap, 0.0), 1.0 / delta)
    resid = fr * _bcast(cof_l, fr) - d_sum * _bcast(cof_r, fr) - vr
    rcgm = fr - jnp.clip(resid, -1.0, 1.0)
    target = blk.set_rows(target, 0, rcgm)

  # 9. Weights, 1 on adv rows; main loss. Blocks have equal sizes, so the mean over all
  # rows is the mean of the block means.
  w = jnp.tan((1 - (jnp.abs(t) - jnp.abs(r))) * math.pi / 2.5) + 1
  w = jnp.where(is_adv, 1.0, w).astype(ct)
  per_row = w * row_distance(f_student, sg(target), cfg)
  if cfg.estimate_order >= 1:
    loss_main = jnp.mean(per_row)
  elif n_mul + n_adv > 0:
    # Without RCGM only the mul and adv rows are trained (official behaviour).
    trained = np.flatnonzero(is_mul[:nb] | is_adv[:nb])
    loss_main = jnp.mean(blk.view(per_row)[:, trained])
  else:
    loss_main = jnp.zeros((), ct)

  # 10. Rectification on the e2e rows: one online call at (-s, -s) and (s, s).
  loss_rect = jnp.zeros((), ct)
  if cor == 1.0 and n_e2e > 0 and cfg.rect_coef != 0.0:
    f_e2e = blk.rows(f_student, 0, n_e2e)
    x_e = sg(blk.rows(x_t, 0, n_e2e) - sg(f_e2e))   # |t| = 1: the one-step samples
    s = draws.s_rect.astype(ct)
    x_s = _bcast(s, x_e) * draws.z_rect.astype(ct) + (1 - _bcast(s, x_e)) * x_e
    ts = blk.join(-s, s)
    c_e2e = blk.rows(cond, 0, n_e2e)
    f_fake, f_real = blk.halves(net(online, blk.join(x_s, x_s), ts, ts, blk.join(c_e2e, c_e2e)))
    # The official code rounds G to float32 (even in a float64 run); so do we.
    grad = jnp.clip((f_fake - f_real).astype(jnp.float32), -1.0, 1.0).astype(ct)
    loss_rect = jnp.mean(row_distance(f_e2e, sg(f_e2e) - grad, cfg))

  loss = loss_main + cfg.rect_coef * loss_rect
  aux = {"loss": loss, "loss_main": loss_main, "loss_rect": loss_rect,
         "loss_adv": jnp.mean(blk.rows(per_row, n_real, nb)) if n_adv else jnp.zeros((), ct)}
  start = 0
  for name, size in zip(GROUPS[:3] + (ONE, GROUPS[3]), (n_e2e, n_mul, n_any, n_one, n_adv)):
    if size:
      aux[f"group/{name}"] = jnp.mean(blk.rows(per_row, start, start + size))
    start += size
  aux = {k: sg(val) for k, val in aux.items()}
  return loss, aux


def count_network_rows(batch: int, config: TwinFlowConfig = TwinFlowConfig()) -> dict:
  """Rows passed through the network per step: this implementation vs the official code.

  Returns a dict with "ours" and "official" (row counts, student included) so the saving
  can be reported; the test suite checks "ours" against an instrumented apply_fn. With
  `row_blocks` = G, "ours" sums the G blocks (the calls stay batched: one call per kind
  with G times the rows of a block), and "official" is the official code on the whole
  batch of `batch` rows, the layout it would run otherwise.
  """
  g, nb, (n_e2e, n_mul, n_any, n_adv) = block_layout(batch, config)
  ours = g * _rows_per_step(nb, (n_e2e, n_mul, n_any, n_adv), config, official=False)
  official = _rows_per_step(
      batch, group_sizes(batch, config.group_proportions, config.one_group), config,
      official=True)
  return {"ours": ours, "official": official}


def _rows_per_step(batch: int, sizes, config: TwinFlowConfig, official: bool) -> int:
  n_e2e, n_mul, n_any, n_adv = sizes
  n_one = batch - sum(sizes)
  n_real = batch - n_adv
  cfg = config
  enr_on = cfg.estimate_order >= 0 and cfg.enhanced_ratio != 0.0
  rcgm_on = (cfg.estimate_order >= 1 and cfg.consistency_ratio != 0.0
             and (n_e2e + n_any + n_one) > 0)
  rect_on = cfg.consistency_ratio == 1.0 and n_e2e > 0
  free = batch if cfg.image_free else 0
  if official:
    return (batch + free + n_adv + (2 * batch if enr_on else 0)
            + (cfg.estimate_order * batch if rcgm_on else 0)
            + (2 * n_e2e if rect_on else 0))
  lo, hi = cfg.enhanced_range
  enh_rows = n_real - (0 if lo < 1.0 < hi else n_e2e)
  return (batch + free + n_adv + (2 * enh_rows if enr_on else 0)
          + (cfg.estimate_order * n_real if rcgm_on else 0)
          + (2 * n_e2e if rect_on and cfg.rect_coef != 0.0 else 0))
