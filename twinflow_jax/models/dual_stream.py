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

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.attention import dot_product_attention
from twinflow_jax.models.embeddings import (copy_params, timestep_embedding,
                                            timestep_frequencies)
from twinflow_jax.models.layers import (Dense, FeedForward, Modulation,
                                        RMSNorm, check_text_cond, gated,
                                        modulated_layer_norm, normal_002)
from twinflow_jax.models.rope import apply_rope, rope_tables
from twinflow_jax.models.sharding import constrain

TOKENS = ('activation_batch', 'activation_length', 'activation_embed')
HEADS = ('activation_batch', 'activation_length', 'activation_heads',
         'activation_kv')
VEC = ('activation_batch', 'activation_embed')
NORM_EPS = 1e-6  # LayerNorm and RMSNorm eps of both families
TIME_SCALE = 1000.0  # network time = 1000 t (diffusers' timestep * 1000)
FREQ_DIM = 256  # diffusers' Timesteps(num_channels=256)
ROPE_THETA = 10000.0  # RoPE base of both families


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

  def embed_time(self, t: jax.Array, *, exact: bool = False) -> jax.Array:
    """[B] TwinFlow times -> [B, D] of the network time 1000 t.

    diffusers Timesteps(256, flip_sin_to_cos, shift 0): [cos | sin] with
    frequencies 10000^(-i/128). exact=False rounds the argument as diffusers'
    float32 path (1000 t, then times the frequency: Flux, SD3); exact=True
    keeps it exact (`exact_sinusoid`: Qwen-Image's Timesteps(scale=1000)
    multiplies t by float32 frequencies in the timestep dtype).
    """
    t = jnp.asarray(t, jnp.float32)
    if exact:
      return self(exact_sinusoid(t, TIME_SCALE, FREQ_DIM))
    return self(timestep_embedding(TIME_SCALE * t, FREQ_DIM))


def _top12(x):
  """x with only its 12 leading significant bits (sign and exponent kept)."""
  mask = 0xFFFFF000
  if isinstance(x, np.ndarray):
    return (x.astype(np.float32).view(np.uint32) & np.uint32(mask)).view(
        np.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(mask)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def exact_sinusoid(t: jax.Array, scale: float, dim: int = FREQ_DIM
                   ) -> jax.Array:
  """[cos | sin] of scale * t * freq, the argument kept exact in float32.

  Same layout and frequency table as `embeddings.timestep_embedding`. At
  |scale t| ~ 1000 a float32 argument is off by up to 3e-5 rad, which shows
  against a float64 reference; here t = t_hi + t_lo and scale * freq =
  F_hi + F_lo (12-bit heads), so t_hi F_hi is an exact float32 product and
  the small remainder goes through the angle-addition formulas (error ~1e-7).

  Args:
    t: [B] float32.
    scale: multiplies t (1000: TwinFlow time -> network time).
    dim: even embedding width.

  Returns:
    [B, dim] float32.
  """
  big = scale * timestep_frequencies(dim // 2).astype(np.float64)
  f_hi = _top12(big.astype(np.float32))
  f_lo = (big - f_hi.astype(np.float64)).astype(np.float32)
  t_hi = _top12(t)
  t_lo = t - t_hi
  a_hi = t_hi[:, None] * f_hi[None]  # 12 x 12 significant bits: exact
  a_lo = (t_hi[:, None] * f_lo[None] + t_lo[:, None] * f_hi[None]
          + t_lo[:, None] * f_lo[None])
  c_hi, s_hi, c_lo, s_lo = (jnp.cos(a_hi), jnp.sin(a_hi), jnp.cos(a_lo),
                            jnp.sin(a_lo))
  return jnp.concatenate([c_hi * c_lo - s_hi * s_lo,
                          s_hi * c_lo + c_hi * s_lo], axis=-1)


def twin_time(t_embedder: TimestepMLP, r_embedder: TimestepMLP | None,
              t: jax.Array, r: jax.Array, *, exact: bool = False
              ) -> jax.Array:
  """E_t(1000 t) + (t - r) E_r(1000 r) for signed TwinFlow times t, r [B].

  As the official Qwen-Image wrapper: `temb + temb_2 * (t - r)` with t, r the
  diffusers timesteps in [0, 1] units; r_embedder None drops the r term.
  `exact`: see `TimestepMLP.embed_time`. Returns [B, D] in the compute dtype.
  """
  t = jnp.asarray(t, jnp.float32)
  temb = t_embedder.embed_time(t, exact=exact)
  if r_embedder is None:
    return temb
  r = jnp.asarray(r, jnp.float32)
  temb_2 = r_embedder.embed_time(r, exact=exact)
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
      modulated_layer_norm(img, i_shift1, i_scale1, NORM_EPS),
      modulated_layer_norm(txt, t_shift1, t_scale1, NORM_EPS), rope, key_mask)
  img = constrain(img + gated(i_gate1, attn_img), TOKENS)
  img = img + gated(i_gate2, img_ff(
      modulated_layer_norm(img, i_shift2, i_scale2, NORM_EPS)))
  txt = constrain(txt + gated(t_gate1, attn_txt), TOKENS)
  txt = txt + gated(t_gate2, txt_ff(
      modulated_layer_norm(txt, t_shift2, t_scale2, NORM_EPS)))
  return constrain(img, TOKENS), constrain(txt, TOKENS)


def dual_stream_parts(cfg, **kw) -> tuple[Modulation, Modulation,
                                          RopeAttention, FeedForward,
                                          FeedForward]:
  """(img_mod, txt_mod, attn, img_ff, txt_ff) of one dual-stream block.

  Created in this order (the order the init RNG streams are drawn); each
  family stores them under its diffusers names. kw: dtype, param_dtype, rngs.
  """
  d = cfg.hidden_size
  img_mod, txt_mod = Modulation(d, 6, **kw), Modulation(d, 6, **kw)
  attn = RopeAttention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                       joint=True, pre_only=False, attention=cfg.attention,
                       **kw)
  return (img_mod, txt_mod, attn, FeedForward(d, cfg.mlp_dim, **kw),
          FeedForward(d, cfg.mlp_dim, **kw))


def check_inputs(model: str, cfg, x, t, r, cond, required: set[str],
                 cond_help: str) -> None:
  """Shape checks both families share: x_t [B, H, W, C] with even H, W,
  t, r [B], cond a dict holding `required` (else "`model` cond must be a
  dict with `cond_help`"), cond['txt'] [B, L, joint_attention_dim] and the
  optional cond['txt_mask'] [B, L]."""
  b, c = x.shape[0], cfg.latent_channels
  if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % 2 or x.shape[2] % 2:
    raise ValueError(f'{model} expects x_t [B, H, W, {c}] with even H, W; '
                     f'got {x.shape}')
  if jnp.shape(t) != (b,) or jnp.shape(r) != (b,):
    raise ValueError(f'{model} expects t, r of shape [{b}]; got '
                     f'{jnp.shape(t)}, {jnp.shape(r)}')
  if not isinstance(cond, Mapping) or not required <= set(cond):
    raise ValueError(f'{model} cond must be a dict with {cond_help}')
  check_text_cond(cond, b, cfg.joint_attention_dim)


def joint_rope(ids: np.ndarray, axes_dims: tuple[int, ...]
               ) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [T, H/2] tables for position ids [T, 3] of [text | image]."""
  return tuple(jnp.asarray(a) for a in rope_tables(ids, axes_dims,
                                                   ROPE_THETA))


def joint_key_mask(txt_mask: jax.Array, n_img: int) -> jax.Array:
  """[B, L] text mask -> [B, L + n_img] key mask, every image token kept."""
  txt_mask = jnp.asarray(txt_mask, bool)
  return jnp.concatenate([txt_mask, jnp.ones((txt_mask.shape[0], n_img),
                                             bool)], axis=1)


def dual_stream_flops(cfg, b: int, h: int, w: int, lt: int, *,
                      time_mlps: int) -> int:
  """Matmul FLOPs both families share at latent h x w, text length lt.

  `time_mlps` timestep MLPs, the patch and text embeddings, cfg.num_layers
  dual-stream blocks and the output layer; the family adds the rest.
  """
  if h % 2 or w % 2:
    raise ValueError(f'flops_per_forward: latent size must be even (2x2 '
                     f'packing), got {h}x{w}')
  d, m = cfg.hidden_size, cfg.mlp_dim
  ti = (h // 2) * (w // 2)
  n = ti + lt
  total = 2 * b * (FREQ_DIM * d + d * d) * time_mlps
  total += 2 * b * ti * cfg.in_channels * d + 2 * b * lt * (
      cfg.joint_attention_dim * d)
  block = (2 * 2 * b * d * 6 * d  # adaLN, both streams
           + 2 * b * n * d * 3 * d  # q, k, v
           + 2 * 2 * b * n * n * d  # q.k^T and p.v
           + 2 * b * n * d * d  # output projections
           + 2 * 2 * b * n * d * m)  # MLPs
  total += cfg.num_layers * block
  total += 2 * b * d * 2 * d + 2 * b * ti * d * cfg.out_dim
  return total


def output_layer(x: jax.Array, c: jax.Array, norm_out: Modulation,
                 proj_out: Dense) -> jax.Array:
  """diffusers AdaLayerNormContinuous (chunks (scale, shift)) + proj_out."""
  scale, shift = norm_out(c)
  return proj_out(modulated_layer_norm(x, shift, scale, NORM_EPS))


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
