"""Flux.1 transformer (diffusers' `FluxTransformer2DModel`) with TwinFlow times.

Numerically the diffusers model (parity-tested against fixtures written by
`tools/make_flux_qwen_fixture.py`): double-stream blocks, then single-stream
blocks on [text | image], 3-axis RoPE (text ids zero, image ids (0, row,
col)), timestep + optional guidance + pooled-CLIP conditioning, final
AdaLayerNormContinuous. The model takes NHWC latents and packs 2x2 patches
into tokens itself, as the Flux pipeline does.

Called as `F = model(x_t, t, r, cond)`:
  x_t  [B, H, W, C] latents, C = in_channels / 4 (16 for Flux.1), H, W even.
  t, r [B] signed TwinFlow times. Flux's flow matching is TwinFlow's
       (x_t = t z + (1 - t) x, velocity z - x), so the network time is
       1000 t (the pipeline's `timestep / 1000`, times 1000 inside) and F
       is the model output unchanged.
  cond {'txt': [B, L, joint_attention_dim] T5 states,
        'pooled': [B, pooled_projection_dim] CLIP pooled vector,
        'txt_mask': [B, L] bool, optional; used only with use_txt_mask=True
                    (Flux was trained with padded text visible, so by
                    default the mask is ignored, as in the diffusers pipeline),
        'guidance': [B] float, optional, for guidance_embeds checkpoints
                    (Flux.1-dev); default `default_guidance` (the pipeline's
                    guidance_scale=3.5). An error for checkpoints without it.}

TwinFlow target time: Flux has no official TwinFlow wrapper. Following the
official Qwen-Image one, a second timestep embedder `time_text_embed_2.
timestep_embedder` (the key names a diffusers-style wrapper would have, as
Qwen-Image's) embeds 1000 r and is added as `temb + temb_2(r) * (t - r)`,
(t - r) in TwinFlow units -- the scale of Flux's own `timestep` input.
By default it starts as a copy of the time embedder (r_embedder_init='copy',
as the official Qwen-Image wrapper, the other distilled guidance-free
large model): temb_2 then lives on temb's scale, and the model is exactly the
pretrained Flux whenever r = t. 'small' (N(0, 0.02^2) kernels, zero biases,
as the official SD3 wrapper) is the alternative. Guidance and pooled text stay
in temb only. r_embedder=False drops the r-embedder (as the official LoRA
configs' aux_time_embed: false); then r is ignored.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.configs import _check_int
from twinflow_jax.models.diffusers_configs import (DiffusersConfigMixin,
                                                   check_bool,
                                                   check_dual_stream_fields,
                                                   check_packed_channels,
                                                   config_from_dict)
from twinflow_jax.models.dual_stream import (NORM_EPS, TOKENS, VEC,
                                             RopeAttention, TimeTextEmbed,
                                             check_inputs, dual_stream_block,
                                             dual_stream_flops,
                                             dual_stream_parts, joint_key_mask,
                                             joint_rope, make_r_embedder,
                                             output_layer, run_blocks,
                                             twin_time)
from twinflow_jax.models.layers import (Dense, Modulation, gated, gelu_tanh,
                                        modulated_layer_norm)
from twinflow_jax.models.rope import flux_ids, pack_latents, unpack_latents
from twinflow_jax.models.sharding import constrain


@dataclasses.dataclass(frozen=True)
class FluxConfig(DiffusersConfigMixin):
  """Flux transformer config: diffusers' config.json fields + runtime fields.

  Defaults are diffusers' (Flux.1 sizes; Flux.1-dev sets guidance_embeds).
  """
  DIFFUSERS_CLASS = 'FluxTransformer2DModel'
  DIFFUSERS_FIELDS = ('patch_size', 'in_channels', 'out_channels',
                      'num_layers', 'num_single_layers', 'attention_head_dim',
                      'num_attention_heads', 'joint_attention_dim',
                      'pooled_projection_dim', 'guidance_embeds',
                      'axes_dims_rope')
  name: str = 'flux'
  # --- diffusers FluxTransformer2DModel config.json ---
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  # --- TwinFlow / runtime ---
  default_guidance: float = 3.5
  use_txt_mask: bool = False
  r_embedder: bool = True
  r_embedder_init: str = 'copy'  # 'copy' | 'small'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'auto'
  pretrained: str = ''  # diffusers folder the architecture fields came from


def resolve_flux_config(model_config: Mapping[str, Any]) -> FluxConfig:
  """{'name': 'flux', ...config.json / runtime fields} -> FluxConfig.

  Raises:
    ValueError: unknown field or invalid value (the message names the field).
  """
  cfg = config_from_dict(FluxConfig, model_config, 'flux')
  check_dual_stream_fields(cfg, extra_ints=('pooled_projection_dim',))
  _check_int('num_single_layers', cfg.num_single_layers, minimum=0)
  check_bool('guidance_embeds', cfg.guidance_embeds)
  check_bool('use_txt_mask', cfg.use_txt_mask)
  if not isinstance(cfg.default_guidance, (int, float)):
    raise ValueError("model config field 'default_guidance' must be a number")
  check_packed_channels(
      cfg, 'only text-to-image Flux (packed 2x2 latent tokens in and out, '
      'in_channels = patch_size^2 * out_channels, divisible by 4) is '
      'supported, not the Fill/Depth/Canny variants')
  return cfg


class FluxTransformerBlock(nnx.Module):
  """diffusers FluxTransformerBlock (double stream): `dual_stream_block`."""

  def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
    (self.norm1, self.norm1_context, self.attn, self.ff,
     self.ff_context) = dual_stream_parts(
         cfg, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
         rngs=rngs)

  def __call__(self, img, txt, c, rope, key_mask):
    """img [B, Ti, D], txt [B, Tt, D], c [B, D] -> (img, txt)."""
    return dual_stream_block(img, txt, c, rope, key_mask, img_mod=self.norm1,
                             txt_mod=self.norm1_context, attn=self.attn,
                             img_ff=self.ff, txt_ff=self.ff_context)


class FluxSingleTransformerBlock(nnx.Module):
  """diffusers FluxSingleTransformerBlock on the joint sequence [B, T, D].

  Attention and a GELU(tanh) MLP run in parallel on one modulated input;
  `proj_out` maps their concatenation [attention (N*H) | MLP (4D)] back.
  """

  def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.mlp_dim
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
    self.norm = Modulation(d, 3, **kw)
    self.proj_mlp = Dense(d, m, ('embed', 'mlp'), **kw)
    self.attn = RopeAttention(d, cfg.num_attention_heads,
                              cfg.attention_head_dim, joint=False,
                              pre_only=True, attention=cfg.attention, **kw)
    self.proj_out = Dense(d + m, d, ('mlp', 'embed'), **kw)

  def __call__(self, x, c, rope, key_mask):
    """x [B, T, D], c [B, D] -> ([B, T, D],)."""
    shift, scale, gate = self.norm(c)
    h = modulated_layer_norm(x, shift, scale, NORM_EPS)
    mlp = gelu_tanh(self.proj_mlp(h))
    mlp = constrain(mlp, ('activation_batch', 'activation_length',
                          'activation_mlp'))
    attn = self.attn.self_attention(h, rope, key_mask)
    out = constrain(self.proj_out(jnp.concatenate([attn, mlp], axis=-1)),
                    TOKENS)
    return (constrain(x + gated(gate, out), TOKENS),)


class Flux(nnx.Module):
  """Flux.1 transformer called as `F = model(x_t, t, r, cond)` (module doc).

  Module names are diffusers' (see `convert/diffusers_flux.py`).
  """

  def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    d = cfg.hidden_size
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              rngs=rngs)
    self.x_embedder = Dense(cfg.in_channels, d, ('patch', 'embed'), **kw)
    self.context_embedder = Dense(cfg.joint_attention_dim, d,
                                  ('txt_embed', 'embed'), **kw)
    self.time_text_embed = TimeTextEmbed(
        d, guidance=cfg.guidance_embeds, pooled_dim=cfg.pooled_projection_dim,
        **kw)
    self.time_text_embed_2 = make_r_embedder(
        self.time_text_embed, d, enabled=cfg.r_embedder,
        init=cfg.r_embedder_init, **kw)
    self.transformer_blocks = nnx.List([
        FluxTransformerBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.single_transformer_blocks = nnx.List([
        FluxSingleTransformerBlock(cfg, rngs=rngs)
        for _ in range(cfg.num_single_layers)])
    self.norm_out = Modulation(d, 2, **kw)
    self.proj_out = Dense(d, cfg.out_dim, ('embed', 'patch'), **kw)

  def _check(self, x, t, r, cond) -> None:
    cfg = self.config
    check_inputs('Flux', cfg, x, t, r, cond, {'txt', 'pooled'},
                 "'txt' [B, L, D_txt], 'pooled' [B, P] and optionally "
                 "'txt_mask' [B, L], 'guidance' [B]")
    b, pooled = x.shape[0], cond['pooled']
    if pooled.shape != (b, cfg.pooled_projection_dim):
      raise ValueError(f"cond['pooled'] must be [{b}, "
                       f'{cfg.pooled_projection_dim}], got {pooled.shape}')
    g = cond.get('guidance')
    if g is not None:
      if not cfg.guidance_embeds:
        raise ValueError("cond['guidance'] given but the Flux checkpoint has "
                         'no guidance embedder (guidance_embeds=False)')
      if jnp.shape(g) != (b,):
        raise ValueError(f"cond['guidance'] must be [{b}], got "
                         f'{jnp.shape(g)}')

  def time_embedding(self, t: jax.Array, r: jax.Array,
                     cond: Mapping[str, jax.Array]) -> jax.Array:
    """temb [B, D]: twin time (+ guidance) + pooled-text projection."""
    cfg = self.config
    emb = self.time_text_embed
    r_emb = self.time_text_embed_2
    temb = twin_time(emb.timestep_embedder,
                     None if r_emb is None else r_emb.timestep_embedder, t, r)
    if emb.guidance_embedder is not None:
      g = cond.get('guidance')
      if g is None:
        g = jnp.full(jnp.shape(t), cfg.default_guidance, jnp.float32)
      # diffusers: guidance * 1000, embedded like a timestep.
      temb = temb + emb.guidance_embedder.embed_time(jnp.asarray(g,
                                                                 jnp.float32))
    temb = temb + emb.text_embedder(cond['pooled'])
    return constrain(temb.astype(cfg.compute_dtype), VEC)

  def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array,
               cond: Mapping[str, jax.Array]) -> jax.Array:
    """F(x_t, t, r, cond) -> [B, H, W, C] float32 (see module doc)."""
    self._check(x_t, t, r, cond)
    cfg = self.config
    gh, gw = x_t.shape[1] // 2, x_t.shape[2] // 2
    c = self.time_embedding(t, r, cond)
    img = self.x_embedder(pack_latents(x_t.astype(cfg.compute_dtype)))
    img = constrain(img, TOKENS)
    txt = constrain(self.context_embedder(cond['txt']), TOKENS)
    lt = txt.shape[1]
    rope = joint_rope(flux_ids(gh, gw, lt), cfg.axes_dims_rope)
    key_mask = None
    if cfg.use_txt_mask and cond.get('txt_mask') is not None:
      key_mask = joint_key_mask(cond['txt_mask'], gh * gw)
    img, txt = run_blocks(self.transformer_blocks, cfg.remat_policy,
                          (img, txt), c, rope, key_mask)
    x = constrain(jnp.concatenate([txt, img], axis=1), TOKENS)
    (x,) = run_blocks(self.single_transformer_blocks, cfg.remat_policy, (x,),
                      c, rope, key_mask)
    out = output_layer(x[:, lt:], c, self.norm_out, self.proj_out)
    return unpack_latents(out, gh, gw).astype(jnp.float32)


def flops_per_forward(cfg: FluxConfig, b: int, h: int, w: int, lt: int) -> int:
  """Matmul FLOPs of one forward at latent size h x w, text length lt."""
  total = dual_stream_flops(
      cfg, b, h, w, lt,
      time_mlps=1 + int(cfg.r_embedder) + int(cfg.guidance_embeds))
  d, m = cfg.hidden_size, cfg.mlp_dim
  n = (h // 2) * (w // 2) + lt
  total += 2 * b * (cfg.pooled_projection_dim * d + d * d)
  single = (2 * b * d * 3 * d + 2 * b * n * d * 3 * d + 2 * 2 * b * n * n * d
            + 2 * b * n * d * m  # proj_mlp
            + 2 * b * n * (d + m) * d)  # proj_out
  return total + cfg.num_single_layers * single
