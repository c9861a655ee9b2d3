"""T5 encoder (transformers' T5EncoderModel), as SD3 and Flux use T5-XXL v1.1.

Pre-norm blocks with RMS LayerNorm (no mean, no bias), attention without the
1/sqrt(head_dim) logit scale, and a learnt relative position bias: a table
[num_buckets, heads] owned by the first layer whose bias is added in every layer. T5 v1.1
uses a gated-GELU feed-forward (`feed_forward_proj='gated-gelu'`: gelu_new(wi_0 x) *
wi_1 x); the original T5 a ReLU one.

Weights come from a transformers folder through `models/convert/hf_text.py`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.layers import Dense, RMSNorm, normal_002
from twinflow_jax.models.text_layers import activation, attention


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 encoder (the fields of transformers' T5Config).

  Attributes:
    vocab_size: token table rows.
    d_model: width D.
    d_kv: head width (heads * d_kv need not equal D).
    d_ff: feed-forward hidden width.
    num_layers: encoder blocks.
    num_heads: attention heads.
    num_buckets: relative position buckets (both directions together).
    max_distance: distance from which all positions share the last bucket.
    dense_act: feed-forward activation ('gelu_new' for v1.1, 'relu' for T5).
    gated: gated feed-forward (wi_0, wi_1) as in v1.1.
    layer_norm_eps: RMS norm epsilon.
  """
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  dense_act: str = 'gelu_new'
  gated: bool = True
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    activation(self.dense_act)


def relative_position_buckets(length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 buckets [T, T] of (key - query) positions, on the host.

  Half the buckets hold positive offsets. Of each half, the first half of the buckets
  are exact distances and the rest grow logarithmically up to `max_distance`. The log
  is taken in float32, as transformers does in torch, so bucket edges match it.
  """
  pos = np.arange(length)
  rel = pos[None, :] - pos[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  n = np.abs(rel)
  exact = half // 2
  with np.errstate(divide='ignore'):
    ratio = np.log(n.astype(np.float32) / np.float32(exact)).astype(np.float32)
  large = (ratio / np.float32(math.log(max_distance / exact))
           * np.float32(half - exact)).astype(np.float32)
  large = exact + np.where(n < exact, 0, large).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(n < exact, n, large)


class T5Attention(nnx.Module):
  """Unscaled multi-head self-attention without biases."""

  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, h = cfg.d_model, cfg.num_heads, cfg.d_kv
    kw = dict(use_bias=False, kernel_init=normal_002, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    self.q = Dense(d, (n, h), ('embed', 'heads', 'kv'), **kw)
    self.k = Dense(d, (n, h), ('embed', 'heads', 'kv'), **kw)
    self.v = Dense(d, (n, h), ('embed', 'heads', 'kv'), **kw)
    self.o = Dense((n, h), d, ('heads', 'kv', 'embed'), **kw)

  def __call__(self, x: jax.Array, bias: jax.Array,
               mask: jax.Array | None) -> jax.Array:
    return self.o(attention(self.q(x), self.k(x), self.v(x), scale=1.0, bias=bias,
                            mask=mask))


class T5FeedForward(nnx.Module):
  """wo(act(wi_0 x) * wi_1 x) (gated) or wo(act(wi x))."""

  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(use_bias=False, kernel_init=normal_002, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    self.act = activation(cfg.dense_act)
    self.wi_0 = Dense(cfg.d_model, cfg.d_ff, ('embed', 'mlp'), **kw)
    self.wi_1 = (Dense(cfg.d_model, cfg.d_ff, ('embed', 'mlp'), **kw)
                 if cfg.gated else None)
    self.wo = Dense(cfg.d_ff, cfg.d_model, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.wi_0(x))
    if self.wi_1 is not None:
      h = h * self.wi_1(x)
    return self.wo(h)


class T5Block(nnx.Module):
  """x + attn(norm(x)), then x + ff(norm(x))."""

  def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_norm = RMSNorm(cfg.d_model, 'embed', eps=cfg.layer_norm_eps,
                             param_dtype=param_dtype)
    self.attn = T5Attention(cfg, **kw)
    self.ff_norm = RMSNorm(cfg.d_model, 'embed', eps=cfg.layer_norm_eps,
                           param_dtype=param_dtype)
    self.ff = T5FeedForward(cfg, **kw)

  def __call__(self, x, bias, mask):
    x = x + self.attn(self.attn_norm(x), bias, mask)
    return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
  """T5 encoder stack.

  Call: input_ids int [B, T], attention_mask bool [B, T] or None (None attends to
  every token, padding included, as the SD3 and Flux pipelines run it)
  -> last_hidden_state [B, T, D] in the compute dtype (after the final RMS norm).
  """

  def __init__(self, cfg: T5Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    self.embedding = nnx.Param(
        normal_002(rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype),
        out_sharding=(None, 'embed'))
    self.relative_attention_bias = nnx.Param(
        normal_002(rngs.params(), (cfg.num_buckets, cfg.num_heads), param_dtype),
        out_sharding=(None, 'heads'))
    self.blocks = nnx.List([T5Block(cfg, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, 'embed', eps=cfg.layer_norm_eps,
                              param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    t = input_ids.shape[1]
    buckets = relative_position_buckets(t, cfg.num_buckets, cfg.max_distance)
    # [T, T, N] -> [1, N, T, T], shared by all blocks.
    bias = jnp.take(self.relative_attention_bias[...], jnp.asarray(buckets), axis=0)
    bias = jnp.transpose(bias, (2, 0, 1))[None]
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    x = jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)
    for block in self.blocks:
      x = block(x, bias, mask)
    return self.final_norm(x)
