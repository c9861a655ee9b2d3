"""Attention implementations and the memory-light GELU compute the same functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax import models
from twinflow_jax.models import attention
from twinflow_jax.models import layers


def _qkv(dtype, b=2, t=7, s=9, n=3, h=8, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(shape), dtype)
          for shape in ((b, t, n, h), (b, s, n, h), (b, s, n, h))]


def _numpy_attention(q, k, v, mask):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(np.asarray(mask)[:, None, None, :], logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("masked", [False, True])
def test_einsum_attention_matches_xla_and_float64_reference(masked):
  mask = jnp.asarray(np.random.default_rng(1).random((2, 9)) > 0.3) if masked else None
  q, k, v = _qkv(jnp.float32)
  run = lambda impl: lambda *a: attention.dot_product_attention(*a, mask, impl=impl)
  np.testing.assert_allclose(run("einsum")(q, k, v), run("xla")(q, k, v), atol=1e-6)
  loss = lambda impl: lambda *a: jnp.sum(jnp.sin(run(impl)(*a)))
  g_xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  g_ein = jax.jit(jax.grad(loss("einsum"), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_ein, g_xla):
    np.testing.assert_allclose(a, b, atol=1e-6 * float(jnp.abs(b).max()))
  with jax.enable_x64(True):   # the custom backward in float64 against jax's autodiff
    q64, k64, v64 = _qkv(jnp.float64)
    np.testing.assert_allclose(run("einsum")(q64, k64, v64),
                               _numpy_attention(q64, k64, v64, mask), atol=1e-14)
    ref = jax.grad(lambda *a: jnp.sum(jnp.sin(_jnp_attention(*a, mask))),
                   argnums=(0, 1, 2))(q64, k64, v64)
    got = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q64, k64, v64)
    for a, b in zip(got, ref):
      np.testing.assert_allclose(a, b, atol=1e-12)


def _jnp_attention(q, k, v, mask):
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -1e30)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)


def test_gelu_tanh_same_forward_and_gradient():
  x = jnp.asarray(np.random.default_rng(2).standard_normal(4096) * 4, jnp.float32)
  np.testing.assert_array_equal(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True))
  f = lambda g: lambda x: jnp.sum(jnp.cos(g(x)))
  np.testing.assert_allclose(jax.grad(f(layers.gelu_tanh))(x),
                             jax.grad(f(lambda x: jax.nn.gelu(x, approximate=True)))(x),
                             atol=3e-6)
  with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    np.testing.assert_allclose(jax.grad(f(layers.gelu_tanh))(x64),
                               jax.grad(f(lambda x: jax.nn.gelu(x, approximate=True)))(x64),
                               atol=1e-13)
  xb = x.astype(jnp.bfloat16)   # computed in float32, rounded once
  np.testing.assert_array_equal(
      layers.gelu_tanh(xb), jax.nn.gelu(xb.astype(jnp.float32), approximate=True).astype(xb.dtype))


def test_dit_with_einsum_attention_matches_xla():
  cfg = dict(name="DiT-S/2", depth=1, hidden_size=32, num_heads=4, input_size=8,
             in_channels=3, num_classes=5)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 8, 8, 3)), jnp.float32)
  t, r = jnp.asarray([0.9, 0.5, -0.3]), jnp.asarray([0.1, 0.5, -0.3])
  y = jnp.asarray([0, 4, 5])
  out, params = {}, None
  for impl in ("xla", "einsum"):
    graphdef, p, rest = models.split_model(
        models.create_model({**cfg, "attention": impl}, rngs=nnx.Rngs(0)))
    if params is None:   # adaLN-zero makes a fresh DiT trivial: perturb every weight
      params = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(
          rng.standard_normal(a.shape), a.dtype), p)
    apply_fn = models.as_apply_fn(graphdef, rest)
    loss = lambda q, apply_fn=apply_fn: jnp.sum(jnp.square(apply_fn(q, x, t, r, y)))
    out[impl] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(out["einsum"][0], out["xla"][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * float(
      jnp.abs(b).max()) + 1e-12), out["einsum"][1], out["xla"][1])


def test_auto_attention_is_einsum_on_cpu():
  q, k, v = _qkv(jnp.float32, seed=4)
  assert jax.default_backend() == "cpu"
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, impl="auto"),
                                attention.dot_product_attention(q, k, v, impl="einsum"))
