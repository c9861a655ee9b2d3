"""The UCGM unified sampler used by TwinFlow (official `TwinFlow.sampling_loop`).

One loop covers one-step, few-step and multi-step sampling: from noise at t = 1 it visits
the times of a Kumaraswamy-warped grid; at each time the network's clean estimate `x_hat`
and noise estimate `z_hat` are recombined at the next time, optionally with fresh noise
(the stochastic ratio). The result is the last `x_hat`.

    K(u; a, b, c) = (1 - (1 - u^a)^b)^c,  u = linspace(g0, 1 - g1, steps),
    t_steps = concat(1 - K(u), [0]),
    x_next = (1 - t_next) x_hat + t_next (sqrt(1 - s) z_hat + sqrt(s) eps).

The (t, r) of each network call depends on the style: "few" r = 0, "any" r = t_next,
"mul" r = t_cur (the flow ODE). The official second-order (Heun) path drops r and is left
out; see TWINFLOW.md section 3.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array, PyTree], jax.Array]
STYLES = ("few", "any", "mul")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Settings of the unified sampler.

  Attributes:
    steps: number of network evaluations (NFE).
    stochastic_ratio: s in [0, 1]; the share of fresh noise re-injected at each step.
    gaps: (g0, g1), the grid runs over u in [g0, 1 - g1] (so t from 1 - g0 down to g1);
      g1 == 0 adds one grid point and drops the last, as the official code does.
    style: "few" (r = 0), "any" (r = next t) or "mul" (r = t, the flow ODE).
    time_dist: (a, b, c) of the Kumaraswamy warp; (1, 1, 1) is the identity.
    cfg_scale: classifier-free guidance F_e + w (F_c - F_e); None disables it (one
      conditional call per step). TwinFlow models need none: the guidance is distilled.
    cfg_interval: guidance applies where lo <= t <= hi, the conditional output elsewhere.
  """

  steps: int = 1
  stochastic_ratio: float = 1.0
  gaps: tuple[float, float] = (0.001, 0.7)
  style: str = "few"
  time_dist: tuple[float, float, float] = (1.0, 1.0, 1.0)
  cfg_scale: float | None = None
  cfg_interval: tuple[float, float] = (0.0, 1.0)

  def __post_init__(self):
    for name in ("gaps", "time_dist", "cfg_interval"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    def check(ok, field, want):
      if not ok:
        raise ValueError(f"SamplerConfig.{field} must be {want}, got {getattr(self, field)!r}")
    check(isinstance(self.steps, (int, np.integer)) and self.steps >= 1, "steps",
          "an integer >= 1")
    check(0.0 <= self.stochastic_ratio <= 1.0, "stochastic_ratio", "in [0, 1]")
    check(len(self.gaps) == 2 and self.gaps[0] >= 0 and self.gaps[1] >= 0
          and self.gaps[0] + self.gaps[1] < 1, "gaps", "(g0 >= 0, g1 >= 0) with g0 + g1 < 1")
    check(self.style in STYLES, "style", f"one of {STYLES}")
    check(len(self.time_dist) == 3 and min(self.time_dist) > 0, "time_dist",
          "three positive numbers (a, b, c)")
    check(len(self.cfg_interval) == 2 and self.cfg_interval[0] <= self.cfg_interval[1],
          "cfg_interval", "(lo, hi) with lo <= hi")

  def replace(self, **changes) -> "SamplerConfig":
    return dataclasses.replace(self, **changes)


# The settings of the official TwinFlow demos (TWINFLOW.md section 3).
PRESETS: dict[str, SamplerConfig] = {
    "1nfe": SamplerConfig(steps=1, stochastic_ratio=1.0, gaps=(0.001, 0.7), style="few"),
    "2nfe": SamplerConfig(steps=2, stochastic_ratio=1.0, gaps=(0.001, 0.6), style="few"),
    "4nfe": SamplerConfig(steps=4, stochastic_ratio=1.0, gaps=(0.001, 0.5), style="few"),
    "any4": SamplerConfig(steps=4, stochastic_ratio=0.0, gaps=(0.001, 0.5), style="any"),
    "multi30": SamplerConfig(steps=30, stochastic_ratio=0.0, gaps=(0.001, 0.0), style="mul",
                             time_dist=(1.17, 0.8, 1.1)),
    # Not official: `any` steps with half of the noise re-injected. On the MNIST default
    # (ten sample sets) it is the most accurate preset (0.979 against 0.975 at 1 NFE) but
    # the least varied (pixel diversity 0.86 against 0.89); the official `any4` is on average
    # no worse than 1 NFE on every metric and is the one recommended there
    # (benchmarks/mnist_sampler_search.py, docs/evaluation-mnist.md).
    "small4": SamplerConfig(steps=4, stochastic_ratio=0.5, gaps=(0.001, 0.6), style="any"),
}


def get_config(config: SamplerConfig | str) -> SamplerConfig:
  """Resolves a preset name ('1nfe', '2nfe', '4nfe', 'any4', 'multi30', 'small4')."""
  if isinstance(config, SamplerConfig):
    return config
  if config not in PRESETS:
    raise ValueError(f"unknown sampler preset {config!r}; choose one of {tuple(PRESETS)}")
  return PRESETS[config]


def time_grid(config: SamplerConfig | str) -> np.ndarray:
  """The float64 times [steps + 1] visited by the sampler, from near 1 down to 0."""
  cfg = get_config(config)
  g0, g1 = cfg.gaps
  n = cfg.steps + 1 if g1 == 0.0 else cfg.steps
  u = np.linspace(g0, 1.0 - g1, n, dtype=np.float64)
  if g1 == 0.0:
    u = u[:-1]
  a, b, c = cfg.time_dist
  k = (1 - (1 - u**a) ** b) ** c
  return np.concatenate([1 - k, [0.0]])


def call_times(config: SamplerConfig | str) -> list[tuple[float, float]]:
  """The (t, r) of each network call, in order."""
  cfg = get_config(config)
  ts = time_grid(cfg)
  r = {"few": lambda c, n: 0.0, "any": lambda c, n: n, "mul": lambda c, n: c}[cfg.style]
  return [(float(c), float(r(c, n))) for c, n in zip(ts[:-1], ts[1:])]


def sample(apply_fn: ApplyFn, params: PyTree, noise: jax.Array, cond: PyTree,
           config: SamplerConfig | str = "1nfe", key: jax.Array | None = None,
           uncond: PyTree = None) -> jax.Array:
  """Generates samples from noise with exactly `config.steps` network calls.

  Args:
    apply_fn: `apply_fn(params, x_t [B, *S], t [B], r [B], cond) -> F [B, *S]` (the
      loss's convention; signed times, t = 1 is noise).
    params: network parameters (e.g. the EMA weights).
    noise: initial noise z [B, *S].
    cond: condition pytree with leading axis B (e.g. labels [B]).
    config: a `SamplerConfig` or a preset name.
    key: PRNG key for the re-injected noise; needed when stochastic_ratio > 0. Either
      one key (the noise of step i is drawn for the whole batch from fold_in(key, i)) or
      one key per sample, a key array [B] (row b's noise of step i comes from
      fold_in(key[b], i)), so that a sample does not depend on the batch it is in.
    uncond: unconditional condition for classifier-free guidance (needed when
      config.cfg_scale is set); same structure as cond.

  Returns:
    Samples [B, *S] in noise's dtype (the loop itself runs in float32 or wider).
  """
  cfg = get_config(config)
  if cfg.stochastic_ratio > 0 and key is None:
    raise ValueError("sample() needs a PRNG key when stochastic_ratio > 0")
  if cfg.cfg_scale is not None and uncond is None:
    raise ValueError("sample() needs `uncond` when cfg_scale is set")
  if noise.ndim < 2:
    raise ValueError(f"noise must be [B, ...], got shape {noise.shape}")
  if key is not None and not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)    # raw uint32 key data [..., 2]
  if key is not None and key.shape not in ((), (noise.shape[0],)):
    raise ValueError(f"key must be one PRNG key or one per sample [{noise.shape[0]}], got "
                     f"a key array of shape {key.shape}")
  if key is None:
    key = jax.random.key(0)   # unused: no noise is re-injected
  return _sample(apply_fn, cfg, params, noise, cond, key, uncond)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample(apply_fn, cfg: SamplerConfig, params, noise, cond, key, uncond):
  b = noise.shape[0]
  ct = jnp.promote_types(noise.dtype, jnp.float32)
  times = np.asarray(call_times(cfg))                      # [steps, 2]: (t, r)
  t_next = time_grid(cfg)[1:]
  s = cfg.stochastic_ratio

  def velocity(x, t, r):
    tb, rb = jnp.full((b,), t, ct), jnp.full((b,), r, ct)
    if cfg.cfg_scale is None:
      return apply_fn(params, x, tb, rb, cond).astype(ct)
    both = jax.tree.map(lambda c, e: jnp.concatenate([c, e]), cond, uncond)
    f = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]),
                 jnp.concatenate([rb, rb]), both).astype(ct)
    f_c, f_e = f[:b], f[b:]
    lo, hi = cfg.cfg_interval
    guided = f_e + cfg.cfg_scale * (f_c - f_e)
    return jnp.where((t >= lo) & (t <= hi), guided, f_c)

  def step(carry, inputs):
    x, _ = carry
    (t, r, tn), i = inputs
    f = velocity(x.astype(noise.dtype), t, r)
    x_hat = x - jnp.abs(t) * f
    z_hat = x + (1 - jnp.abs(t)) * f
    if s > 0:
      if key.ndim:   # one key per sample
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:],
                                                   ct))(key)
      else:
        eps = jax.random.normal(jax.random.fold_in(key, i), x.shape, ct)
      z_hat = jnp.sqrt(1 - s) * z_hat + jnp.sqrt(s) * eps
    return ((1 - tn) * x_hat + tn * z_hat, x_hat), None

  grid = (jnp.asarray(times[:, 0], ct), jnp.asarray(times[:, 1], ct),
          jnp.asarray(t_next, ct))
  x0 = noise.astype(ct)
  (_, x_hat), _ = jax.lax.scan(step, (x0, x0), (grid, jnp.arange(cfg.steps)))
  return x_hat.astype(noise.dtype)
