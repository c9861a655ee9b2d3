"""Qwen2 / Qwen2.5-VL language model as a text encoder (the Qwen-Image text path).

Qwen-Image encodes a prompt with the language model of Qwen2.5-VL-7B-Instruct and keeps
the last hidden state (after the final RMS norm). This is that decoder stack: RMSNorm,
grouped-query attention with q/k/v biases and rotary positions, SwiGLU MLP, causal mask.

Rotary positions. Qwen2.5-VL uses multimodal RoPE: three position ids (time, height,
width) per token, and the rotary frequencies are split into `mrope_section` chunks, each
rotated by one of the three ids. For text-only input the three ids are equal (the
token's index), so every chunk is rotated by the same id and M-RoPE is exactly 1-D RoPE
with the same inverse frequencies; this model implements that case only (no image
tokens). The position of a token is its index among the real (unmasked) tokens, as
transformers' `get_rope_index` computes it from the attention mask; with right padding,
which `captions.py` uses, that is its index in the row.

Weights come from a transformers folder through `models/convert/hf_text.py`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.layers import Dense, RMSNorm, normal_002
from twinflow_jax.models.text_layers import attention, causal_mask


@dataclasses.dataclass(frozen=True)
class Qwen2TextConfig:
  """Sizes of a Qwen2 language model (transformers' Qwen2_5_VLTextConfig fields).

  Attributes:
    vocab_size: token table rows.
    hidden_size: width D.
    intermediate_size: SwiGLU hidden width.
    num_layers: decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (num_heads % num_kv_heads == 0).
    head_dim: per-head width (hidden_size // num_heads in Qwen2.5).
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: rotary base.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'Qwen2 num_attention_heads {self.num_heads} is not a multiple '
                       f'of num_key_value_heads {self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'Qwen2 head_dim {self.head_dim} must be even for RoPE')


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Applies RoPE (half-split layout) to x [B, T, N, H] at positions [B, T]."""
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Qwen2Attention(nnx.Module):
  """Grouped-query self-attention: q/k/v with bias, o without, RoPE on q and k."""

  def __init__(self, cfg: Qwen2TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.theta = cfg.rope_theta
    self.head_dim = h
    self.q = Dense(d, (n, h), ('embed', 'heads', 'kv'), **kw)
    self.k = Dense(d, (k, h), ('embed', 'heads', 'kv'), **kw)
    self.v = Dense(d, (k, h), ('embed', 'heads', 'kv'), **kw)
    self.o = Dense((n, h), d, ('heads', 'kv', 'embed'), use_bias=False, **kw)

  def __call__(self, x, positions, mask):
    q = rotary(self.q(x), positions, self.theta)
    k = rotary(self.k(x), positions, self.theta)
    return self.o(attention(q, k, self.v(x), scale=self.head_dim**-0.5, mask=mask))


class Qwen2Layer(nnx.Module):
  """x + attn(norm(x)), then x + down(silu(gate(norm(x))) * up(norm(x)))."""

  def __init__(self, cfg: Qwen2TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.input_norm = RMSNorm(d, 'embed', eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = Qwen2Attention(cfg, **kw)
    self.post_attn_norm = RMSNorm(d, 'embed', eps=cfg.rms_norm_eps,
                                  param_dtype=param_dtype)
    self.gate = Dense(d, f, ('embed', 'mlp'), use_bias=False, **kw)
    self.up = Dense(d, f, ('embed', 'mlp'), use_bias=False, **kw)
    self.down = Dense(f, d, ('mlp', 'embed'), use_bias=False, **kw)

  def __call__(self, x, positions, mask):
    x = x + self.attn(self.input_norm(x), positions, mask)
    h = self.post_attn_norm(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class Qwen2TextModel(nnx.Module):
  """Qwen2 decoder stack without the LM head.

  Call: input_ids int [B, T], attention_mask bool [B, T] (True = real token)
  -> last_hidden_state [B, T, D] after the final norm, in the compute dtype. Rows of
  padding tokens are computed but meaningless.
  """

  def __init__(self, cfg: Qwen2TextConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    self.embedding = nnx.Param(
        normal_002(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype),
        out_sharding=(None, 'embed'))
    self.layers = nnx.List([Qwen2Layer(cfg, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, 'embed', eps=cfg.rms_norm_eps,
                        param_dtype=param_dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    t = input_ids.shape[1]
    attention_mask = jnp.asarray(attention_mask, bool)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    mask = causal_mask(t) & attention_mask[:, None, None, :]
    x = jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)
    for layer in self.layers:
      x = layer(x, positions, mask)
    return self.norm(x)
