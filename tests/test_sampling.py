"""The unified sampler: time grids, call sequences, exactness on a known flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twinflow_jax import sampling
from twinflow_jax.sampling import SamplerConfig

# TWINFLOW.md section 3: the (t, r) of each call of the official presets.
EXPECTED_CALLS = {
    "1nfe": [(0.999, 0.0)],
    "2nfe": [(0.999, 0.0), (0.6, 0.0)],
    "4nfe": [(0.999, 0.0), (0.8327, 0.0), (0.6663, 0.0), (0.5, 0.0)],
    "any4": [(0.999, 0.8327), (0.8327, 0.6663), (0.6663, 0.5), (0.5, 0.0)],
    # Not official: this project's preset for small models (docs/sampling.md).
    "small4": [(0.999, 0.866), (0.866, 0.733), (0.733, 0.6), (0.6, 0.0)],
}


def recording_apply(log, target=None):
  """A network whose average velocity points at `target` (exact for a point mass)."""
  def apply_fn(params, x, t, r, cond):
    jax.debug.callback(lambda tt, rr: log.append((float(tt[0]), float(rr[0]))), t, r,
                       ordered=True)
    goal = jnp.zeros_like(x) if target is None else target
    return (x - goal) / jnp.abs(t)[:, None]
  return apply_fn


@pytest.mark.parametrize("preset", sorted(EXPECTED_CALLS))
def test_preset_call_sequences(preset):
  log = []
  sampling.sample(recording_apply(log), None, jnp.ones((2, 3)), None, preset,
                  jax.random.key(0)).block_until_ready()
  assert len(log) == sampling.get_config(preset).steps
  np.testing.assert_allclose(log, EXPECTED_CALLS[preset], atol=5e-5)


def test_multi30_call_sequence():
  log = []
  sampling.sample(recording_apply(log), None, jnp.ones((2, 3)), None, "multi30").block_until_ready()
  assert len(log) == 30
  # "mul" style: r = t; Kumaraswamy (1.17, 0.8, 1.1) grid over linspace(0.001, 1, 31)[:-1].
  u = np.linspace(0.001, 1.0, 31)[:-1]
  want_t = 1 - (1 - (1 - u**1.17) ** 0.8) ** 1.1
  np.testing.assert_allclose([t for t, _ in log], want_t, atol=1e-6)
  np.testing.assert_allclose([r for _, r in log], want_t, atol=1e-6)
  grid = sampling.time_grid("multi30")
  assert grid.shape == (31,) and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)


@pytest.mark.parametrize("preset", ["1nfe", "2nfe", "4nfe", "any4", "multi30", "small4"])
def test_exact_for_a_point_mass(preset):
  # For data concentrated at x*, F(x_t, t, r) = (x_t - x*) / t for every r, and every
  # setting of the sampler must return x* exactly, whatever the re-injected noise.
  target = jnp.array([[0.5, -1.0, 2.0]])
  noise = jax.random.normal(jax.random.key(1), (4, 3))
  out = sampling.sample(recording_apply([], target), None, noise, None, preset,
                        jax.random.key(2))
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(target, (4, 3)), atol=1e-5)


def test_stochastic_ratio_uses_key():
  noise = jax.random.normal(jax.random.key(1), (4, 2))
  half = lambda p, x, t, r, c: 0.5 * x   # not a point mass: the noise matters
  a = sampling.sample(half, None, noise, None, "4nfe", jax.random.key(0))
  b = sampling.sample(half, None, noise, None, "4nfe", jax.random.key(0))
  c = sampling.sample(half, None, noise, None, "4nfe", jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a - c)).max() > 1e-3
  # The deterministic preset does not need a key.
  d = sampling.sample(half, None, noise, None, "any4")
  assert d.shape == noise.shape
  with pytest.raises(ValueError, match="needs a PRNG key"):
    sampling.sample(half, None, noise, None, "4nfe")


def test_one_step_formula():
  # 1 NFE: x_hat = z - t F at t = 0.999.
  noise = jnp.array([[1.0, 2.0]])
  f = lambda p, x, t, r, c: p * jnp.ones_like(x)
  out = sampling.sample(f, 0.3, noise, None, "1nfe", jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), noise - 0.999 * 0.3, rtol=1e-6)


def test_classifier_free_guidance_with_interval():
  b = 3
  def apply_fn(p, x, t, r, cond):
    return cond[:, None] * jnp.ones_like(x)      # F_c = cond value, F_e = uncond value
  noise = jnp.zeros((b, 2))
  cond, uncond = jnp.full((b,), 2.0), jnp.full((b,), 1.0)
  cfg = SamplerConfig(steps=1, stochastic_ratio=0.0, gaps=(0.0, 0.5), cfg_scale=3.0)
  out = sampling.sample(apply_fn, None, noise, cond, cfg, uncond=uncond)
  guided = 1.0 + 3.0 * (2.0 - 1.0)
  np.testing.assert_allclose(np.asarray(out), -1.0 * guided, rtol=1e-6)   # t = 1
  # Outside the interval the conditional output is used.
  out = sampling.sample(apply_fn, None, noise, cond, cfg.replace(cfg_interval=(0.0, 0.5)),
                        uncond=uncond)
  np.testing.assert_allclose(np.asarray(out), -2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="needs `uncond`"):
    sampling.sample(apply_fn, None, noise, cond, cfg)


def test_dtypes_and_validation():
  f = lambda p, x, t, r, c: x * 0.5
  out = sampling.sample(f, None, jnp.ones((2, 4, 4, 1), jnp.bfloat16), None, "2nfe",
                        jax.random.key(0))
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 4, 1)
  with pytest.raises(ValueError, match="unknown sampler preset"):
    sampling.get_config("8nfe")
  for field, value in [("steps", 0), ("stochastic_ratio", 1.5), ("gaps", (0.6, 0.5)),
                       ("style", "ddim"), ("time_dist", (1, 0, 1))]:
    with pytest.raises(ValueError, match=f"SamplerConfig.{field}"):
      SamplerConfig(**{field: value})
