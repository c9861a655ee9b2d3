"""Layers shared by the Flux and Qwen-Image transformers.

Both families use the same dual-stream block math: image and text tokens keep
their own adaLN-Zero modulation, q/k/v projections with per-head RMS q/k-norm,
output projections and MLPs, and meet in one attention over [text | image]
tokens with multi-axis RoPE on queries and keys (`dual_stream_block`;
diffusers' `FluxTransformerBlock` and `QwenImageTransformerBlock` compute
exactly this, under different module names). Flux adds single-stream blocks.

Modules are named after diffusers' (`RopeAttention.to_q` is `attn.to_q`,
`to_out[0]` is `to_out.0`), with the project's leaf layers: `Dense` (kernel
[in, out], the torch weight transposed), `Modulation` (`proj`),
`FeedForward` (`fc1`, `fc2` = `net.0.proj`, `net.2`) and `RMSNorm` (`scale`
= `weight`), as in `sd3.py`. q/k/v are 2-D projections [D, N*H], so each maps
to one diffusers tensor and LoRA can wrap each one.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.attention import dot_product_attention
from twinflow_jax.models.embeddings import copy_params, timestep_embedding
from twinflow_jax.models.layers import (Dense, FeedForward, Modulation,
                                        RMSNorm, layer_norm, modulate,
                                        normal_002)
from twinflow_jax.models.rope import apply_rope
from twinflow_jax.models.sharding import constrain

TOKENS = ('activation_batch', 'activation_length', 'activation_embed')
HEADS = ('activation_batch', 'activation_length', 'activation_heads',
         'activation_kv')
VEC = ('activation_batch', 'activation_embed')
NORM_EPS = 1e-6  # LayerNorm and RMSNorm eps of both families
TIME_SCALE = 1000.0  # network time = 1000 t (diffusers' timestep * 1000)
FREQ_DIM = 256  # diffusers' Timesteps(num_channels=256)


class TimestepMLP(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding and
  PixArtAlphaTextProjection(act_fn='silu'))."""

  def __init__(self, d_in: int, d: int, in_name: str, *, dtype, param_dtype,
               rngs: nnx.Rngs, kernel_init=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=kernel_init)
    self.linear_1 = Dense(d_in, d, (in_name, 'embed'), **kw)
    self.linear_2 = Dense(d, d, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))

  def embed_time(self, t_net: jax.Array) -> jax.Array:
    """[B] network times -> [B, D] (diffusers Timesteps(256, flip_sin_to_cos,
    shift 0): [cos | sin], frequencies 10000^(-i/128))."""
    return self(timestep_embedding(t_net, FREQ_DIM))


def twin_time(t_embedder: TimestepMLP, r_embedder: TimestepMLP | None,
              t: jax.Array, r: jax.Array) -> jax.Array:
  """E_t(1000 t) + (t - r) E_r(1000 r) for signed TwinFlow times t, r [B].

  As the official Qwen-Image wrapper: `temb + temb_2 * (t - r)` with t, r the
  diffusers timesteps in [0, 1] units; r_embedder None drops the r term.
  Returns [B, D] in the compute dtype.
  """
  t = jnp.asarray(t, jnp.float32)
  temb = t_embedder.embed_time(TIME_SCALE * t)
  if r_embedder is None:
    return temb
  r = jnp.asarray(r, jnp.float32)
  temb_2 = r_embedder.embed_time(TIME_SCALE * r)
  return temb + temb_2 * (t - r)[:, None].astype(temb_2.dtype)


class RopeAttention(nnx.Module):
  """diffusers Flux / Qwen-Image attention: q/k/v, RMS qk-norm, RoPE.

  joint=True adds the text projections (add_q/k/v_proj, norm_added_q/k,
  to_add_out); pre_only=True (Flux single blocks) has no output projection.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, joint: bool,
               pre_only: bool, attention: str, dtype, param_dtype,
               rngs: nnx.Rngs):
    inner = num_heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.head_dim, self.impl = num_heads, head_dim, attention
    rms = lambda: RMSNorm(head_dim, 'kv', eps=NORM_EPS,
                          param_dtype=param_dtype)
    self.to_q = Dense(dim, inner, ('embed', 'heads'), **kw)
    self.to_k = Dense(dim, inner, ('embed', 'heads'), **kw)
    self.to_v = Dense(dim, inner, ('embed', 'heads'), **kw)
    self.norm_q, self.norm_k = rms(), rms()
    self.to_out = (None if pre_only else
                   nnx.List([Dense(inner, dim, ('heads', 'embed'), **kw)]))
    if joint:
      self.add_q_proj = Dense(dim, inner, ('embed', 'heads'), **kw)
      self.add_k_proj = Dense(dim, inner, ('embed', 'heads'), **kw)
      self.add_v_proj = Dense(dim, inner, ('embed', 'heads'), **kw)
      self.norm_added_q, self.norm_added_k = rms(), rms()
      self.to_add_out = Dense(inner, dim, ('heads', 'embed'), **kw)

  def _heads(self, x: jax.Array) -> jax.Array:
    return constrain(x.reshape(*x.shape[:2], self.heads, self.head_dim),
                     HEADS)

  def _qkv(self, x, q_proj, k_proj, v_proj, q_norm, k_norm):
    q = q_norm(self._heads(q_proj(x)))
    k = k_norm(self._heads(k_proj(x)))
    return q, k, self._heads(v_proj(x))

  def _attend(self, q, k, v, rope, key_mask) -> jax.Array:
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    o = constrain(dot_product_attention(q, k, v, key_mask, impl=self.impl),
                  HEADS)
    return o.reshape(*o.shape[:2], self.heads * self.head_dim)

  def self_attention(self, x: jax.Array, rope, key_mask) -> jax.Array:
    """Single-stream attention, no output projection: [B, T, D] -> [B, T, NH]."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q,
                        self.norm_k)
    return self._attend(q, k, v, rope, key_mask)

  def __call__(self, img: jax.Array, txt: jax.Array, rope, key_mask
               ) -> tuple[jax.Array, jax.Array]:
    """Joint attention over [text | image] -> (img out, txt out), [B, T*, D].

    rope: (cos, sin) [Tt + Ti, H/2] or None; key_mask: [B, Tt + Ti] bool or
    None.
    """
    tt = txt.shape[1]
    qi, ki, vi = self._qkv(img, self.to_q, self.to_k, self.to_v, self.norm_q,
                           self.norm_k)
    qt, kt, vt = self._qkv(txt, self.add_q_proj, self.add_k_proj,
                           self.add_v_proj, self.norm_added_q,
                           self.norm_added_k)
    o = self._attend(jnp.concatenate([qt, qi], axis=1),
                     jnp.concatenate([kt, ki], axis=1),
                     jnp.concatenate([vt, vi], axis=1), rope, key_mask)
    img_out = constrain(self.to_out[0](o[:, tt:]), TOKENS)
    return img_out, constrain(self.to_add_out(o[:, :tt]), TOKENS)


def dual_stream_block(img: jax.Array, txt: jax.Array, c: jax.Array, rope,
                      key_mask, *, img_mod: Modulation, txt_mod: Modulation,
                      attn: RopeAttention, img_ff: FeedForward,
                      txt_ff: FeedForward) -> tuple[jax.Array, jax.Array]:
  """One Flux double-stream / Qwen-Image block: -> (img, txt).

  img [B, Ti, D], txt [B, Tt, D], c [B, D]; the modulations give, in
  diffusers' order, (shift, scale, gate) for attention then for the MLP.
  """
  i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod(c)
  t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod(c)
  attn_img, attn_txt = attn(
      modulate(layer_norm(img, NORM_EPS), i_shift1, i_scale1),
      modulate(layer_norm(txt, NORM_EPS), t_shift1, t_scale1), rope, key_mask)
  img = constrain(img + i_gate1[:, None] * attn_img, TOKENS)
  img = img + i_gate2[:, None] * img_ff(
      modulate(layer_norm(img, NORM_EPS), i_shift2, i_scale2))
  txt = constrain(txt + t_gate1[:, None] * attn_txt, TOKENS)
  txt = txt + t_gate2[:, None] * txt_ff(
      modulate(layer_norm(txt, NORM_EPS), t_shift2, t_scale2))
  return constrain(img, TOKENS), constrain(txt, TOKENS)


def output_layer(x: jax.Array, c: jax.Array, norm_out: Modulation,
                 proj_out: Dense) -> jax.Array:
  """diffusers AdaLayerNormContinuous (chunks (scale, shift)) + proj_out."""
  scale, shift = norm_out(c)
  return proj_out(modulate(layer_norm(x, NORM_EPS), shift, scale))


def run_blocks(blocks, policy, carry: tuple, *args) -> tuple:
  """carry = block(*carry, *args) over blocks, each remat by `policy`."""

  def call(block, carry, *args):
    return block(*carry, *args)

  if policy is not None:
    call = nnx.remat(call, policy=policy, prevent_cse=True)
  for block in blocks:
    carry = call(block, carry, *args)
  return carry


class TimeTextEmbed(nnx.Module):
  """diffusers' time(-guidance)(-text) embedders under their module names.

  timestep_embedder always; guidance_embedder (Flux.1-dev) and text_embedder
  (pooled text, Flux) when their widths are given. `__call__` sums what
  exists; the TwinFlow r-embedder (`time_text_embed_2`) is one of these with
  only a timestep_embedder.
  """

  def __init__(self, dim: int, *, guidance: bool = False, pooled_dim: int = 0,
               dtype, param_dtype, rngs: nnx.Rngs, kernel_init=None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
              kernel_init=kernel_init)
    self.timestep_embedder = TimestepMLP(FREQ_DIM, dim, 'freq', **kw)
    self.guidance_embedder = (TimestepMLP(FREQ_DIM, dim, 'freq', **kw)
                              if guidance else None)
    self.text_embedder = (TimestepMLP(pooled_dim, dim, 'pooled', **kw)
                          if pooled_dim else None)


def make_r_embedder(time_text_embed: TimeTextEmbed, dim: int, *,
                    enabled: bool, init: str, dtype, param_dtype,
                    rngs: nnx.Rngs) -> TimeTextEmbed | None:
  """The TwinFlow target-time embedder `time_text_embed_2` (or None).

  init 'copy': a copy of time_text_embed.timestep_embedder (official
  Qwen-Image `init_time_embed_2_weights`); 'small': N(0, 0.02^2) kernels,
  zero biases (official SD3).
  """
  if not enabled:
    return None
  emb = TimeTextEmbed(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=normal_002 if init == 'small' else None)
  if init == 'copy':
    copy_params(time_text_embed.timestep_embedder, emb.timestep_embedder)
  return emb
