"""Pieces shared by the text encoders (CLIP, T5, Qwen2): norm, activations, attention.

The encoders follow Hugging Face transformers' numerics: normalisation statistics and
attention softmax in float32, everything else in the compute dtype.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# transformers' ACT2FN names used by the supported configs.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function of a transformers `hidden_act` name."""
  if name not in _ACTIVATIONS:
    raise ValueError(f'activation {name!r} is not supported; choose from '
                     f'{tuple(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with scale and bias (float32 statistics)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=('embed',))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              bias: jax.Array | None = None,
              mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention with float32 logits; grouped-query when k has fewer heads.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0 (query head n uses key head n // (N / K)).
    v: [B, S, K, H] values.
    scale: logit scale (1/sqrt(H), or 1 for T5).
    bias: additive logit bias broadcastable to [B, N, T, S] (T5's position bias).
    mask: bool, broadcastable to [B, N, T, S]; False = not attended. A query with no
      attended key (a padding row) gets a uniform average instead of NaN.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  n, kh = q.shape[2], k.shape[2]
  if n != kh:
    k = jnp.repeat(k, n // kh, axis=2)
    v = jnp.repeat(v, n // kh, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q, k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bsnh->btnh', probs, v)


def causal_mask(length: int) -> jax.Array:
  """[1, 1, T, T] bool, True where key position <= query position."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]
