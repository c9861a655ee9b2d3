"""Hand-written backward passes: same gradients, and XLA:CPU keeps only what they save."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax import models
from twinflow_jax.models import attention
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


def _tiny_bf16_dit_grad():
  """(jitted gradient of a 1-block bfloat16 DiT's summed output, its parameters)."""
  cfg = dict(name="DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8,
             in_channels=3, num_classes=5, dtype="bfloat16", attention="einsum")
  graphdef, params, rest = models.split_model(models.create_model(cfg, rngs=nnx.Rngs(0)))
  apply_fn = models.as_apply_fn(graphdef, rest)
  x, t, y = jnp.ones((2, 8, 8, 3)), jnp.full((2,), 0.5), jnp.zeros((2,), jnp.int32)
  loss = lambda p: jnp.sum(apply_fn(p, x, t, t, y).astype(jnp.float32))
  return jax.jit(jax.grad(loss)), params


def test_bfloat16_products_have_float32_results_on_cpu():
  # XLA:CPU runs bfloat16 products on bfloat16 dot instructions only when their result is
  # float32: the bfloat16 DiT's forward and backward ask for that in every product.
  grad, params = _tiny_bf16_dit_grad()
  text = grad.lower(params).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) > 20
  assert not [d for d in dots if d.rstrip().endswith("bf16>")], dots


def test_gated_matches_autodiff_and_sums_the_gate_gradient_in_float32():
  rng = np.random.default_rng(4)
  gate, y, w = (rng.standard_normal(s) for s in ((2, 16), (2, 300, 16), (2, 300, 16)))
  loss = lambda f: lambda g, y: jnp.sum((f(g, y) * w).astype(jnp.float32))
  formula = lambda g, y: g[:, None, :] * y
  g32, y32 = jnp.asarray(gate, jnp.float32), jnp.asarray(y, jnp.float32)
  np.testing.assert_array_equal(layers.gated(g32, y32), formula(g32, y32))
  for a, b in zip(jax.jit(jax.grad(loss(layers.gated), argnums=(0, 1)))(g32, y32),
                  jax.jit(jax.grad(loss(formula), argnums=(0, 1)))(g32, y32)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # bfloat16: the gate's gradient is a float32 sum over the 300 tokens, rounded once
  gb, yb = jnp.asarray(gate, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
  grad = jax.jit(jax.grad(loss(layers.gated), argnums=(0, 1)))
  dgate, dy = grad(gb, yb)
  assert dgate.dtype == dy.dtype == jnp.bfloat16
  exact = np.sum(w.astype(np.float32).astype(jnp.bfloat16).astype(np.float64)
                 * np.asarray(yb, np.float64), axis=1)
  np.testing.assert_allclose(np.asarray(dgate, np.float64), exact, rtol=8e-3, atol=1e-2)
  if jax.default_backend() == "cpu":   # no rounding-after-every-addition reduction
    assert "reduce-window" not in grad.lower(gb, yb).compile().as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qkv_split_gradient_is_the_stack_of_the_three(dtype):
  rng = np.random.default_rng(5)
  qkv = jnp.asarray(rng.standard_normal((2, 5, 3, 2, 4)), dtype)
  w = [jnp.asarray(rng.standard_normal((2, 5, 2, 4)), dtype) for _ in range(3)]
  loss = lambda split: lambda x: sum(jnp.sum((a * b).astype(jnp.float32))
                                     for a, b in zip(split(x), w))
  ours = jax.jit(jax.grad(loss(layers._unstack_qkv)))
  slices = lambda x: (x[:, :, 0], x[:, :, 1], x[:, :, 2])
  np.testing.assert_array_equal(ours(qkv), jax.grad(loss(slices))(qkv))
  np.testing.assert_array_equal(ours(qkv), jnp.stack(w, axis=2))


def _compiled_dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
  """Element type and shape of each product's operands in compiled HLO text."""
  types, out = {}, []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])", line)
    if m:
      types[m.group(1)] = m.group(2)
    if " dot(" in line:
      names = re.search(r" dot\(([^)]*)\)", line).group(1).split(",")
      out.append(tuple(types[n.strip().lstrip("%")] for n in names))
  return out


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's product kernels")
def test_bfloat16_attention_products_stay_bfloat16_after_xla_cpu():
  # XLA:CPU folds an explicit transpose of an operand into the product and then runs
  # the product in float32 after converting both operands: the bfloat16 DiT's attention
  # backward ran all five of its products so. Every attention product of the compiled
  # forward + backward must read bfloat16 operands.
  grad, params = _tiny_bf16_dit_grad()
  dots = _compiled_dot_operand_types(grad.lower(params).compile().as_text())
  attn_dots = [d for d in dots if all(s.count(",") == 3 for s in d)]   # [B, N, ., .]
  assert len(attn_dots) == 7, dots   # forward 2, backward 5
  assert all(s.startswith("bf16[") for d in attn_dots for s in d), attn_dots


@pytest.mark.parametrize("masked", [False, True])
def test_bfloat16_attention_gradient_matches_float32_formula(masked):
  rng = np.random.default_rng(3)
  q, k, v, w = (jnp.asarray(rng.standard_normal((2, 24, 3, 16)), jnp.bfloat16)
                for _ in range(4))
  mask = jnp.asarray(rng.random((2, 24)) > 0.3) if masked else None

  def formula(q, k, v):   # float32 softmax attention on the same bfloat16 inputs
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / 4.0
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)

  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, impl="einsum")
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(ours(q, k, v), np.float32), formula(q, k, v),
                             atol=2e-2, rtol=2e-2)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(formula), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16
    err = np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max()
    assert err < 2e-2, err


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
