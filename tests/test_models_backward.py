"""Hand-written backward passes: same gradients, and XLA:CPU keeps only what they save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax import models
from twinflow_jax.models import backward
from twinflow_jax.models import layers


def test_after_is_the_identity_and_spreads_a_nan():
  x = jnp.arange(6.0).reshape(2, 3)
  ops = (jnp.ones((4, 2)), jnp.arange(3.0))
  out = jax.jit(backward.after)(x, ops)
  for a, b in zip(out, ops):
    np.testing.assert_array_equal(a, b)
  out = jax.jit(backward.after)(x.at[0, 0].set(jnp.nan), ops)
  assert all(np.isnan(np.asarray(a)).all() for a in out)


def _formula_ln(x, eps=1e-6):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2),
                                        (jnp.float64, 1e-13)])
def test_layer_norms_same_forward_and_gradient(dtype, rtol):
  rng = np.random.default_rng(0)
  with jax.enable_x64(dtype == jnp.float64):
    x, w = (jnp.asarray(rng.standard_normal((3, 5, 64)) * 3 + 1, dtype) for _ in range(2))
    shift, scale = (jnp.asarray(rng.standard_normal((3, 64)), dtype) for _ in range(2))
    cases = {  # ours, the formula autodiff differentiates
        "layer_norm": (lambda x, s, c: layers.layer_norm(x, 1e-5),
                       lambda x, s, c: _formula_ln(x, 1e-5)),
        "modulated": (lambda x, s, c: layers.modulated_layer_norm(x, s, c),
                      lambda x, s, c: layers.modulate(_formula_ln(x), s, c)),
    }
    for name, (ours, ref) in cases.items():
      np.testing.assert_array_equal(ours(x, shift, scale), ref(x, shift, scale), name)
      loss = lambda f: lambda *a: jnp.sum((f(*a) * w).astype(jnp.float32))
      got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, shift, scale)
      want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, shift, scale)
      for a, b in zip(got, want):
        assert a.dtype == b.dtype
        b = np.asarray(b, np.float64)
        np.testing.assert_allclose(np.asarray(a, np.float64), b,
                                   atol=rtol * np.abs(b).max() + 1e-30, err_msg=name)


def _fwd_bwd_temp_bytes(depth, b=4, size=32, hidden=32, heads=2):
  cfg = dict(name="DiT-S/2", in_channels=4, input_size=size, num_classes=10,
             hidden_size=hidden, num_heads=heads, depth=depth)
  graphdef, params, rest = models.split_model(models.create_model(cfg, rngs=nnx.Rngs(0)))
  apply_fn = models.as_apply_fn(graphdef, rest)
  x, t, y = jnp.ones((b, size, size, 4)), jnp.full((b,), 0.5), jnp.zeros((b,), jnp.int32)
  loss = lambda p: jnp.mean(jnp.square(apply_fn(p, x, t, t, y)))
  return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_dit_backward_keeps_no_attention_probabilities():
  # What one more block adds to XLA's temporaries of a forward + backward, in units of
  # one residual-stream array [B, T, D]: about 19 here (q, k, v, the attention output,
  # the normalised and modulated inputs of both halves, the gated outputs, the MLP's
  # hidden pre- and post-activation). Before the custom backwards kept to what they
  # save, it was about 38: 16 more for the attention probabilities [B, N, T, T], which
  # XLA merged with the forward's, and the LayerNorm intermediates.
  b, t, d, heads = 4, (32 // 2) ** 2, 32, 2
  per_block = (_fwd_bwd_temp_bytes(4) - _fwd_bwd_temp_bytes(2)) / 2
  unit = b * t * d * 4
  assert per_block <= 24 * unit, per_block / unit
  assert b * heads * t * t * 4 == 16 * unit   # so the probabilities alone would exceed it


def test_bfloat16_products_have_float32_results_on_cpu():
  # XLA:CPU runs bfloat16 products on bfloat16 dot instructions only when their result is
  # float32: the bfloat16 DiT's forward and backward ask for that in every product.
  cfg = dict(name="DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8,
             in_channels=3, num_classes=5, dtype="bfloat16")
  graphdef, params, rest = models.split_model(models.create_model(cfg, rngs=nnx.Rngs(0)))
  apply_fn = models.as_apply_fn(graphdef, rest)
  x, t, y = jnp.ones((2, 8, 8, 3)), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32)
  loss = lambda p: jnp.sum(apply_fn(p, x, t, t, y).astype(jnp.float32))
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) > 20
  assert not [d for d in dots if d.rstrip().endswith("bf16>")], dots


@pytest.mark.parametrize("x_shape,k_shape,n_in", [((2, 5, 8), (8, 12), 1),
                                                  ((2, 5, 3, 4), (3, 4, 6), 2),
                                                  ((2, 5, 8), (8, 3, 2, 4), 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_dense_same_values_as_tensordot(x_shape, k_shape, n_in, with_bias):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(k_shape[n_in:]), jnp.float32)
  w = jnp.asarray(rng.standard_normal(x_shape[:len(x_shape) - n_in] + k_shape[n_in:]),
                  jnp.float32)
  if with_bias:   # ours rounds once after adding the bias, the formula twice
    ours = lambda x, k, b: layers._bf16_dense(x, k, b, n_in)  # pylint: disable=protected-access
    ref = lambda x, k, b: jnp.tensordot(x, k, axes=n_in) + b.astype(jnp.bfloat16)
  else:
    ours = lambda x, k, b: layers._bf16_dense(x, k, None, n_in)  # pylint: disable=protected-access
    ref = lambda x, k, b: jnp.tensordot(x, k, axes=n_in)
    np.testing.assert_array_equal(ours(x, kernel, bias), ref(x, kernel, bias))
  tol = lambda b: 1e-2 * float(np.abs(np.asarray(b, np.float32)).max())
  np.testing.assert_allclose(np.asarray(ours(x, kernel, bias), np.float32),
                             np.asarray(ref(x, kernel, bias), np.float32),
                             atol=tol(ref(x, kernel, bias)))
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w)
  for a, b in zip(jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, kernel, bias),
                  jax.grad(loss(ref), argnums=(0, 1, 2))(x, kernel, bias)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tol(b))
