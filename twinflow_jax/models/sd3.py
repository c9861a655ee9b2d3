"""Stable Diffusion 3 / 3.5 MMDiT (diffusers `SD3Transformer2DModel`) with TwinFlow time.

One module for the three released variants, chosen by the checkpoint's config.json:
  SD3-medium     num_layers 24, 24 heads x 64, no qk-norm, no dual attention.
  SD3.5-medium   num_layers 24, qk_norm='rms_norm', dual_attention_layers 0..12 (MMDiT-X:
                 those blocks add an image-only self-attention `attn2`).
  SD3.5-large    num_layers 38, 38 heads x 64, qk_norm='rms_norm'.
The module tree mirrors diffusers' names (`transformer_blocks/3/attn/to_q/kernel` is
`transformer_blocks.3.attn.to_q.weight`), every projection is its own 2-D `Dense`
(kernel [in, out]), so diffusers weights map one to one (`convert/diffusers_sd3.py`) and
each projection can be wrapped by `nnx.LoRA` like PEFT wraps the torch Linear.

Called as `F = model(x_t, t, r, cond)`:
  x_t   [B, H, W, C] latents (NHWC), H/p and W/p <= pos_embed_max_size.
  t, r  [B] signed TwinFlow times in [-1, 1]; the network time is 1000 t (SD3's
        flow-matching sigma = t, x_t = (1 - t) x + t z, and it predicts z - x, which is
        TwinFlow's F: no sign change).
  cond  {'txt': [B, L, joint_attention_dim], 'pooled': [B, pooled_projection_dim],
         'txt_mask': [B, L] bool (optional, IGNORED: diffusers' SD3 attends to every
         text token, padding included, and the pretrained weights expect that)}.
Returns F [B, H, W, out_channels] float32.

TwinFlow target time, exactly as the official `SD3Transformer2DModelWrapper`: a second
`CombinedTimestepTextProjEmbeddings` (`time_text_embed_2`, also fed the pooled text) on the
network target time 1000 r, scaled by (1000 t - 1000 r) / 1000 = t - r and added to the
usual embedding, so it contributes nothing when r = t. Its kernels start as N(0, 0.02^2) with zero
biases (`init_time_embed_2_weights`). `r_embedder=False` drops it (the official LoRA
configs run without it: `aux_time_embed: false`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.attention import attention_names, dot_product_attention
from twinflow_jax.models.configs import (DTYPES, REMAT_POLICIES, RuntimeOptionsMixin,
                                         _check_int)
from twinflow_jax.models.diffusers_configs import read_config_json
from twinflow_jax.models.embeddings import patchify, timestep_embedding, unpatchify
from twinflow_jax.models.layers import (Dense, FeedForward, Modulation, RMSNorm,
                                        gated, layer_norm, modulate, modulated_layer_norm,
                                        normal_002, zeros)
from twinflow_jax.models.sharding import constrain

TOKENS = ('activation_batch', 'activation_length', 'activation_embed')
HEADS = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')
VEC = ('activation_batch', 'activation_embed')
TIME_SCALE = 1000.0  # SD3 network timesteps are 1000 sigma

# Fields of diffusers' SD3Transformer2DModel config.json that shape the network.
DIFFUSERS_FIELDS = ('sample_size', 'patch_size', 'in_channels', 'num_layers',
                    'attention_head_dim', 'num_attention_heads', 'joint_attention_dim',
                    'caption_projection_dim', 'pooled_projection_dim', 'out_channels',
                    'pos_embed_max_size', 'dual_attention_layers', 'qk_norm')


@dataclasses.dataclass(frozen=True)
class SD3Config(RuntimeOptionsMixin):
  """SD3 transformer config: diffusers' fields plus twinflow_jax runtime options.

  The architecture fields have diffusers' names and defaults. Runtime fields: dtype
  (compute), param_dtype, remat (per block, see configs.REMAT_POLICIES), attention
  (implementation name), r_embedder (add the TwinFlow target-time embedder).
  `pretrained` (a diffusers transformer folder) only records where the architecture
  fields came from.
  """
  name: str = 'sd3'
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int | None = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'auto'
  r_embedder: bool = True
  pretrained: str = ''

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out_dim(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def mlp_dim(self) -> int:
    return 4 * self.inner_dim  # diffusers FeedForward, mult=4

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['dual_attention_layers'] = list(d['dual_attention_layers'])
    return d

  def diffusers_config(self) -> dict[str, Any]:
    """The architecture fields as in diffusers' config.json."""
    d = {f: getattr(self, f) for f in DIFFUSERS_FIELDS}
    d['dual_attention_layers'] = list(d['dual_attention_layers'])
    return d


def _check(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ValueError(f'model config field {field!r} {msg}')


def resolve_sd3_config(model_config: Mapping[str, Any]) -> SD3Config:
  """{'name': 'sd3', ...} -> validated SD3Config.

  With 'pretrained': DIR, the architecture fields come from DIR/config.json (diffusers
  layout; its private '_...' keys are ignored); other fields of the dict override them.
  """
  d = dict(model_config)
  fields = {f.name for f in dataclasses.fields(SD3Config)}
  base = {}
  if d.get('pretrained'):
    src = read_config_json(d['pretrained'])
    base = {k: v for k, v in src.items() if k in DIFFUSERS_FIELDS}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown} for 'sd3'; known: "
                     f'{sorted(fields)}')
  base.update(d)
  if base.get('dual_attention_layers') is not None:
    base['dual_attention_layers'] = tuple(int(i) for i in base['dual_attention_layers'])
  else:
    base['dual_attention_layers'] = ()
  cfg = SD3Config(**base)
  for f in ('sample_size', 'patch_size', 'in_channels', 'num_layers', 'attention_head_dim',
            'num_attention_heads', 'joint_attention_dim', 'caption_projection_dim',
            'pooled_projection_dim', 'pos_embed_max_size'):
    _check_int(f, getattr(cfg, f))
  _check(cfg.out_channels is None or (isinstance(cfg.out_channels, int)
                                      and cfg.out_channels >= 1), 'out_channels',
         f'must be None or an int >= 1, got {cfg.out_channels!r}')
  _check(cfg.caption_projection_dim == cfg.inner_dim, 'caption_projection_dim',
         f'({cfg.caption_projection_dim}) must equal num_attention_heads x '
         f'attention_head_dim ({cfg.inner_dim}): text and image streams share the width')
  _check(cfg.inner_dim % 4 == 0, 'attention_head_dim', 'x heads must be divisible by 4 '
         '(2-D sin-cos positions)')
  _check(all(0 <= i < cfg.num_layers for i in cfg.dual_attention_layers),
         'dual_attention_layers', f'must be block indices < num_layers={cfg.num_layers}, '
         f'got {list(cfg.dual_attention_layers)}')
  _check(cfg.qk_norm in (None, 'rms_norm'), 'qk_norm',
         f"must be None or 'rms_norm' (the SD3 releases), got {cfg.qk_norm!r}")
  _check(cfg.dtype in DTYPES, 'dtype', f'must be one of {tuple(DTYPES)}')
  _check(cfg.param_dtype in DTYPES, 'param_dtype', f'must be one of {tuple(DTYPES)}')
  _check(cfg.remat in REMAT_POLICIES, 'remat', f'must be one of {tuple(REMAT_POLICIES)}')
  _check(cfg.attention in attention_names(), 'attention',
         f'must be one of {attention_names()}')
  _check(isinstance(cfg.r_embedder, bool), 'r_embedder', 'must be a bool')
  return cfg


def cropped_pos_embed(cfg: SD3Config, gh: int, gw: int) -> jax.Array:
  """diffusers PatchEmbed.cropped_pos_embed, computed in-graph: [gh * gw, D] float32.

  The table is the 2-D sin-cos table of a pos_embed_max_size^2 grid whose positions are
  scaled by base_size / pos_embed_max_size (base_size = sample_size / patch_size); the
  centred gh x gw window is used. The first half of the features encodes the column.
  """
  m, d = cfg.pos_embed_max_size, cfg.inner_dim
  if gh > m or gw > m:
    raise ValueError(f'SD3: a {gh}x{gw} token grid exceeds pos_embed_max_size={m}')
  top, left = (m - gh) // 2, (m - gw) // 2
  step = np.float32(m / (cfg.sample_size // cfg.patch_size))
  rows = (jnp.arange(gh, dtype=jnp.float32) + top) / step
  cols = (jnp.arange(gw, dtype=jnp.float32) + left) / step
  omega = jnp.asarray(1.0 / 10000**(np.arange(d // 4, dtype=np.float64) / (d / 4.0)),
                      jnp.float32)

  def one_d(pos):
    out = pos[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=-1)

  emb_w = jnp.broadcast_to(one_d(cols)[None], (gh, gw, d // 2))
  emb_h = jnp.broadcast_to(one_d(rows)[:, None], (gh, gw, d // 2))
  return jnp.concatenate([emb_w, emb_h], axis=-1).reshape(gh * gw, d)


def pos_embed_rows(cfg: SD3Config, h0: int, h1: int) -> np.ndarray:
  """Rows h0..h1 of diffusers' persistent `pos_embed.pos_embed` buffer.

  Same arithmetic as diffusers (float32 positions, float64 frequencies), so the table can
  be compared with a checkpoint's and written on export a few grid rows at a time (the
  whole table of SD3.5-medium, 384^2 x 1536, is 0.9 GB in float32).

  Returns:
    [(h1 - h0) * M, D] float32, M = pos_embed_max_size, grid rows in row-major order.
  """
  m, d = cfg.pos_embed_max_size, cfg.inner_dim
  pos = (np.arange(m, dtype=np.float32) /
         np.float32(m / (cfg.sample_size // cfg.patch_size))).astype(np.float64)
  omega = 1.0 / 10000**(np.arange(d // 4, dtype=np.float64) / (d / 4.0))
  out = pos[:, None] * omega[None]
  one = np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)  # [M, D/2]
  rows = np.empty((h1 - h0, m, d), np.float32)
  rows[..., :d // 2] = one[None]  # the column position
  rows[..., d // 2:] = one[h0:h1, None]  # the row position
  return rows.reshape((h1 - h0) * m, d)


def pos_embed_table(cfg: SD3Config) -> np.ndarray:
  """The whole `pos_embed.pos_embed` buffer [1, M*M, D] float32 (small configs, tests)."""
  return pos_embed_rows(cfg, 0, cfg.pos_embed_max_size)[None]


class Mlp2(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

  def __init__(self, d_in: int, d: int, in_name: str, *, kernel_init=None, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kernel_init is not None:
      kw['kernel_init'] = kernel_init
    self.linear_1 = Dense(d_in, d, (in_name, 'embed'), **kw)
    self.linear_2 = Dense(d, d, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
  """diffusers CombinedTimestepTextProjEmbeddings: E(sinusoid(t_net)) + P(pooled)."""

  def __init__(self, cfg: SD3Config, *, kernel_init=None, rngs: nnx.Rngs):
    kw = dict(kernel_init=kernel_init, dtype=cfg.compute_dtype,
              param_dtype=cfg.params_dtype, rngs=rngs)
    self.timestep_embedder = Mlp2(256, cfg.inner_dim, 'freq', **kw)
    self.text_embedder = Mlp2(cfg.pooled_projection_dim, cfg.inner_dim, 'pooled', **kw)

  def __call__(self, t_net: jax.Array, pooled: jax.Array) -> jax.Array:
    """t_net [B] network times (1000 t), pooled [B, P] -> [B, D]."""
    return (self.timestep_embedder(timestep_embedding(t_net, 256))
            + self.text_embedder(pooled))


class SD3Attention(nnx.Module):
  """diffusers `Attention` with JointAttnProcessor2_0: separate q/k/v/out projections.

  joint=True adds the text-stream projections (add_q/k/v_proj, to_add_out unless
  context_pre_only); qk_norm='rms_norm' adds per-head RMS norms (norm_q, norm_k and
  norm_added_q, norm_added_k). to_out is a one-element list so that its path reads
  `to_out/0` as diffusers' `to_out.0`.
  """

  def __init__(self, cfg: SD3Config, *, joint: bool, context_pre_only: bool,
               rngs: nnx.Rngs):
    d, n, h = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
    self.heads, self.head_dim, self.impl = n, h, cfg.attention
    self.context_pre_only = context_pre_only
    self.to_q = Dense(d, d, ('embed', 'heads'), **kw)
    self.to_k = Dense(d, d, ('embed', 'heads'), **kw)
    self.to_v = Dense(d, d, ('embed', 'heads'), **kw)
    self.to_out = nnx.List([Dense(d, d, ('heads', 'embed'), **kw)])
    rms = lambda: RMSNorm(h, 'kv', param_dtype=cfg.params_dtype)
    qk = cfg.qk_norm == 'rms_norm'
    self.norm_q = rms() if qk else None
    self.norm_k = rms() if qk else None
    if joint:
      # The last block computes text queries in diffusers too (then drops their output).
      self.add_q_proj = Dense(d, d, ('embed', 'heads'), **kw)
      self.add_k_proj = Dense(d, d, ('embed', 'heads'), **kw)
      self.add_v_proj = Dense(d, d, ('embed', 'heads'), **kw)
      self.to_add_out = (None if context_pre_only else
                         Dense(d, d, ('heads', 'embed'), **kw))
      self.norm_added_q = rms() if qk else None
      self.norm_added_k = rms() if qk else None

  def _heads(self, x: jax.Array) -> jax.Array:
    return constrain(x.reshape(*x.shape[:2], self.heads, self.head_dim), HEADS)

  def _merge(self, o: jax.Array) -> jax.Array:
    return o.reshape(*o.shape[:2], self.heads * self.head_dim)

  def _qkv(self, x, q_proj, k_proj, v_proj, q_norm, k_norm, with_q=True):
    k, v = self._heads(k_proj(x)), self._heads(v_proj(x))
    q = self._heads(q_proj(x)) if with_q else None
    if q_norm is not None:
      q = q_norm(q) if with_q else None
      k = k_norm(k)
    return q, k, v

  def self_attention(self, x: jax.Array) -> jax.Array:
    """Image-only attention (MMDiT-X `attn2`): [B, T, D] -> [B, T, D]."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    o = dot_product_attention(q, k, v, None, impl=self.impl)
    return constrain(self.to_out[0](self._merge(o)), TOKENS)

  def __call__(self, img: jax.Array, txt: jax.Array
               ) -> tuple[jax.Array, jax.Array | None]:
    """Joint attention over [image | text]: -> (img out [B, Ti, D], txt out or None)."""
    ti = img.shape[1]
    qi, ki, vi = self._qkv(img, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
    # Text query outputs are discarded by a context-pre-only block: not computed.
    qt, kt, vt = self._qkv(txt, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                           self.norm_added_q, self.norm_added_k,
                           with_q=not self.context_pre_only)
    k = jnp.concatenate([ki, kt], axis=1)
    v = jnp.concatenate([vi, vt], axis=1)
    q = qi if self.context_pre_only else jnp.concatenate([qi, qt], axis=1)
    o = self._merge(dot_product_attention(q, k, v, None, impl=self.impl))
    img_out = constrain(self.to_out[0](o[:, :ti]), TOKENS)
    if self.context_pre_only:
      return img_out, None
    return img_out, constrain(self.to_add_out(o[:, ti:]), TOKENS)


class JointTransformerBlock(nnx.Module):
  """diffusers JointTransformerBlock (MMDiT; MMDiT-X with use_dual_attention)."""

  def __init__(self, cfg: SD3Config, *, context_pre_only: bool, dual: bool,
               rngs: nnx.Rngs):
    d = cfg.inner_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
    self.context_pre_only, self.dual = context_pre_only, dual
    # adaLN chunks in diffusers' order: shift, scale, gate (msa), shift, scale, gate
    # (mlp)[, shift, scale, gate (msa2)]. `Modulation` keeps torch's row order.
    self.norm1 = Modulation(d, 9 if dual else 6, **kw)
    # Context-pre-only: AdaLayerNormContinuous, chunks (scale, shift).
    self.norm1_context = Modulation(d, 2 if context_pre_only else 6, **kw)
    self.attn = SD3Attention(cfg, joint=True, context_pre_only=context_pre_only,
                             rngs=rngs)
    self.attn2 = (SD3Attention(cfg, joint=False, context_pre_only=False, rngs=rngs)
                  if dual else None)
    self.ff = FeedForward(d, cfg.mlp_dim, **kw)
    self.ff_context = None if context_pre_only else FeedForward(d, cfg.mlp_dim, **kw)

  def __call__(self, img: jax.Array, txt: jax.Array, temb: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """img [B, Ti, D], txt [B, Tt, D], temb [B, D] -> (img, txt)."""
    mod = self.norm1(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    img_ln = layer_norm(img)
    img_norm = modulate(img_ln, shift_msa, scale_msa)
    cmod = self.norm1_context(temb)
    txt_ln = layer_norm(txt)
    if self.context_pre_only:
      c_scale, c_shift = cmod
      txt_norm = modulate(txt_ln, c_shift, c_scale)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cmod
      txt_norm = modulate(txt_ln, c_shift_msa, c_scale_msa)
    attn_img, attn_txt = self.attn(img_norm, txt_norm)
    img = constrain(img + gated(gate_msa, attn_img), TOKENS)
    if self.dual:
      shift_msa2, scale_msa2, gate_msa2 = mod[6:]
      attn2 = self.attn2.self_attention(modulate(img_ln, shift_msa2, scale_msa2))
      img = constrain(img + gated(gate_msa2, attn2), TOKENS)
    img = img + gated(gate_mlp, self.ff(modulated_layer_norm(img, shift_mlp, scale_mlp)))
    img = constrain(img, TOKENS)
    if self.context_pre_only:
      return img, txt
    txt = txt + gated(c_gate_msa, attn_txt)
    txt = txt + gated(c_gate_mlp, self.ff_context(
        modulated_layer_norm(txt, c_shift_mlp, c_scale_mlp)))
    return img, constrain(txt, TOKENS)


class PatchEmbed(nnx.Module):
  """Conv(p, stride p) as a Dense over patchified rows (i, j, c): kernel [p*p*C, D]."""

  def __init__(self, cfg: SD3Config, *, rngs: nnx.Rngs):
    p = cfg.patch_size
    self.proj = Dense(p * p * cfg.in_channels, cfg.inner_dim, ('patch', 'embed'),
                      dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, p: int) -> jax.Array:
    return self.proj(patchify(x, p))


class SD3Transformer(nnx.Module):
  """`F = model(x_t, t, r, cond)`: diffusers' SD3Transformer2DModel in NNX (module doc)."""

  def __init__(self, config: SD3Config, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    d, p = cfg.inner_dim, cfg.patch_size
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
    self.pos_embed = PatchEmbed(cfg, rngs=rngs)
    self.time_text_embed = TimeTextEmbed(cfg, rngs=rngs)
    # Official TwinFlow init of time_text_embed_2: N(0, 0.02^2) weights, zero biases.
    self.time_text_embed_2 = (TimeTextEmbed(cfg, kernel_init=normal_002, rngs=rngs)
                              if cfg.r_embedder else None)
    self.context_embedder = Dense(cfg.joint_attention_dim, cfg.caption_projection_dim,
                                  ('txt_embed', 'embed'), **kw)
    dual = set(cfg.dual_attention_layers)
    self.transformer_blocks = nnx.List([
        JointTransformerBlock(cfg, context_pre_only=i == cfg.num_layers - 1,
                              dual=i in dual, rngs=rngs)
        for i in range(cfg.num_layers)])
    self.norm_out = Modulation(d, 2, **kw)  # AdaLayerNormContinuous: (scale, shift)
    self.proj_out = Dense(d, p * p * cfg.out_dim, ('embed', 'patch'), kernel_init=zeros,
                          **kw)

  def _check(self, x, t, r, cond) -> None:
    cfg = self.config
    b, p = x.shape[0], cfg.patch_size
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'SD3 expects x_t [B, H, W, {cfg.in_channels}] with H, W divisible '
                       f'by {p}; got {x.shape}')
    if jnp.shape(t) != (b,) or jnp.shape(r) != (b,):
      raise ValueError(f'SD3 expects t, r of shape [{b}]; got {jnp.shape(t)}, '
                       f'{jnp.shape(r)}')
    if not isinstance(cond, Mapping) or not {'txt', 'pooled'} <= set(cond):
      raise ValueError("SD3 cond must be a dict with 'txt' [B, L, D_txt] and 'pooled' "
                       "[B, P] (and optionally 'txt_mask', which SD3 ignores)")
    txt, pooled = cond['txt'], cond['pooled']
    if txt.ndim != 3 or txt.shape[0] != b or txt.shape[2] != cfg.joint_attention_dim:
      raise ValueError(f"cond['txt'] must be [{b}, L, {cfg.joint_attention_dim}], got "
                       f'{txt.shape}')
    if pooled.shape != (b, cfg.pooled_projection_dim):
      raise ValueError(f"cond['pooled'] must be [{b}, {cfg.pooled_projection_dim}], got "
                       f'{pooled.shape}')

  def time_embedding(self, t: jax.Array, r: jax.Array, pooled: jax.Array) -> jax.Array:
    """temb [B, D]: time_text_embed(1000 t) + time_text_embed_2(1000 r) (t - r)."""
    t = jnp.asarray(t, jnp.float32)
    r = jnp.asarray(r, jnp.float32)
    temb = self.time_text_embed(TIME_SCALE * t, pooled)
    if self.time_text_embed_2 is not None:
      temb_2 = self.time_text_embed_2(TIME_SCALE * r, pooled)
      # The official (1000 t - 1000 r) / 1000, taken as t - r: the same number up to
      # rounding, and exactly 0 at r = t (the compiler may fuse 1000 t - 1000 r into an
      # FMA that leaves a rounding residue).
      temb = temb + temb_2 * (t - r)[:, None].astype(temb_2.dtype)
    return constrain(temb, VEC)

  def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array,
               cond: Mapping[str, jax.Array]) -> jax.Array:
    """F(x_t, t, r, cond) -> [B, H, W, out_channels] float32 (see the module doc)."""
    self._check(x_t, t, r, cond)
    cfg = self.config
    dt, p = cfg.compute_dtype, cfg.patch_size
    gh, gw = x_t.shape[1] // p, x_t.shape[2] // p
    pos = cropped_pos_embed(cfg, gh, gw).astype(dt)
    img = constrain(self.pos_embed(x_t.astype(dt), p) + pos[None], TOKENS)
    temb = self.time_embedding(t, r, cond['pooled'])
    txt = constrain(self.context_embedder(cond['txt']), TOKENS)

    def call(block, img, txt, temb):
      return block(img, txt, temb)

    if cfg.remat_policy is not None:
      call = nnx.remat(call, policy=cfg.remat_policy, prevent_cse=True)
    for block in self.transformer_blocks:
      img, txt = call(block, img, txt, temb)
    scale, shift = self.norm_out(temb)
    out = self.proj_out(modulated_layer_norm(img, shift, scale))
    return unpatchify(out, gh, gw, p, cfg.out_dim).astype(jnp.float32)


def flops_per_forward(cfg: SD3Config, b: int, h: int, w: int, lt: int) -> int:
  """Matmul FLOPs of one forward (2 per multiply-add), as `models.flops`."""
  d, p, m = cfg.inner_dim, cfg.patch_size, cfg.mlp_dim
  ti = (h // p) * (w // p)
  n = ti + lt
  emb = 2 * b * (256 * d + d * d + cfg.pooled_projection_dim * d + d * d)
  total = 2 * b * ti * p * p * cfg.in_channels * d + 2 * b * lt * cfg.joint_attention_dim * d
  total += emb * (2 if cfg.r_embedder else 1)
  for i in range(cfg.num_layers):
    last = i == cfg.num_layers - 1
    dual = i in cfg.dual_attention_layers
    nq = ti if last else n  # queries whose outputs are used
    total += 2 * b * d * d * (9 if dual else 6) + 2 * b * d * d * (2 if last else 6)
    total += 2 * b * (n * 2 * d * d + nq * d * d)  # k, v for all; q for used queries
    total += 2 * 2 * b * nq * n * d  # q.k^T and p.v
    total += 2 * b * nq * d * d  # output projections
    total += 2 * 2 * b * nq * d * m  # MLPs
    if dual:
      total += 2 * b * ti * 4 * d * d + 2 * 2 * b * ti * ti * d
  total += 2 * b * d * 2 * d + 2 * b * ti * d * p * p * cfg.out_dim
  return total


def num_params(cfg: SD3Config) -> int:
  """Parameter count (from the abstract model, no allocation)."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: SD3Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
