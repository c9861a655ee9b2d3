"""Qwen-Image transformer (diffusers' `QwenImageTransformer2DModel`) with
TwinFlow times, as the official TwinFlow wrapper
(`src/networks/qwen_image/transformer_qwenimage.py`).

Numerically the diffusers model (parity-tested against fixtures written by
`tools/make_flux_qwen_fixture.py`): RMS-normed text projected by `txt_in`,
dual-stream blocks with joint attention over [text | image] under the
multimodal "scale_rope" RoPE (image rows/columns centred on 0, text on the
diagonal just past the image, see `rope.qwen_image_ids`), final
AdaLayerNormContinuous. The model takes NHWC latents and packs 2x2 patches
into tokens itself, as the Qwen-Image pipeline does.

Called as `F = model(x_t, t, r, cond)`:
  x_t  [B, H, W, C] latents, C = in_channels / 4 (16), H, W even.
  t, r [B] signed TwinFlow times. The official wrapper passes TwinFlow's t
       straight as diffusers' `timestep` (the pipeline's sigma in [0, 1],
       embedded as 1000 t by `Timesteps(scale=1000)`), and the model
       predicts the flow-matching velocity noise - data = TwinFlow's F, so F
       is the output unchanged.
  cond {'txt': [B, L, joint_attention_dim] Qwen2.5-VL states,
        'txt_mask': [B, L] bool, optional (True = real token): diffusers'
                    `encoder_hidden_states_mask`; masked text tokens are not
                    attended to. Text RoPE positions depend only on the token
                    index, so padding at the end changes nothing for the
                    real tokens (the official wrapper trims the batch to its
                    longest prompt, which gives the same result).
        'pooled': ignored if present (Qwen-Image has no pooled vector).}

TwinFlow target time (official): `time_text_embed_2`, a copy of
`time_text_embed` at init (r_embedder_init='copy'), embeds 1000 r and is added
as `temb + temb_2(r) * (t - r)` with (t - r) in TwinFlow units, so r = t gives
exactly the pretrained Qwen-Image. r_embedder=False (official LoRA configs:
aux_time_embed: false) drops it; then r is ignored.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.diffusers_configs import (DiffusersConfigMixin,
                                                   check_bool,
                                                   check_dual_stream_fields,
                                                   check_packed_channels,
                                                   config_from_dict)
from twinflow_jax.models.dual_stream import (NORM_EPS, TOKENS, VEC,
                                             TimeTextEmbed, check_inputs,
                                             dual_stream_block,
                                             dual_stream_flops,
                                             dual_stream_parts, joint_key_mask,
                                             joint_rope, make_r_embedder,
                                             output_layer, run_blocks,
                                             twin_time)
from twinflow_jax.models.layers import Dense, Modulation, RMSNorm
from twinflow_jax.models.rope import (pack_latents, qwen_image_ids,
                                      unpack_latents)
from twinflow_jax.models.sharding import constrain

# config.json switches of later Qwen-Image variants (Edit-2511, Layered);
# the text-to-image model has them all off.
_UNSUPPORTED_SWITCHES = ('guidance_embeds', 'zero_cond_t',
                         'use_additional_t_cond', 'use_layer3d_rope')


@dataclasses.dataclass(frozen=True)
class QwenImageConfig(DiffusersConfigMixin):
  """Qwen-Image config: diffusers' config.json fields + runtime fields.

  Defaults are diffusers' (the 20B Qwen-Image sizes).
  """
  DIFFUSERS_CLASS = 'QwenImageTransformer2DModel'
  DIFFUSERS_FIELDS = ('patch_size', 'in_channels', 'out_channels',
                      'num_layers', 'attention_head_dim',
                      'num_attention_heads', 'joint_attention_dim',
                      'guidance_embeds', 'axes_dims_rope', 'zero_cond_t',
                      'use_additional_t_cond', 'use_layer3d_rope')
  name: str = 'qwen_image'
  # --- diffusers QwenImageTransformer2DModel config.json ---
  patch_size: int = 2
  in_channels: int = 64
  out_channels: int | None = 16
  num_layers: int = 60
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 3584
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  zero_cond_t: bool = False
  use_additional_t_cond: bool = False
  use_layer3d_rope: bool = False
  # --- TwinFlow / runtime ---
  r_embedder: bool = True  # official aux_time_embed
  r_embedder_init: str = 'copy'  # 'copy' (official) | 'small'
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'auto'
  pretrained: str = ''  # diffusers folder the architecture fields came from


def resolve_qwen_image_config(
    model_config: Mapping[str, Any]) -> QwenImageConfig:
  """{'name': 'qwen_image', ...config.json / runtime fields} -> config.

  Raises:
    ValueError: unknown field or invalid value (the message names the field).
  """
  cfg = config_from_dict(QwenImageConfig, model_config, 'qwen_image')
  check_dual_stream_fields(cfg)
  for f in _UNSUPPORTED_SWITCHES:
    check_bool(f, getattr(cfg, f))
    if getattr(cfg, f):
      raise ValueError(f'model config field {f!r} is true: only the '
                       'text-to-image Qwen-Image (all of '
                       f'{_UNSUPPORTED_SWITCHES} false) is supported')
  check_packed_channels(
      cfg, 'packed 2x2 latent tokens in and out need in_channels = '
      'patch_size^2 * out_channels, divisible by 4')
  return cfg


class QwenImageTransformerBlock(nnx.Module):
  """diffusers QwenImageTransformerBlock: `dual_stream_block`."""

  def __init__(self, cfg: QwenImageConfig, *, rngs: nnx.Rngs):
    (self.img_mod, self.txt_mod, self.attn, self.img_mlp,
     self.txt_mlp) = dual_stream_parts(
         cfg, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
         rngs=rngs)

  def __call__(self, img, txt, c, rope, key_mask):
    """img [B, Ti, D], txt [B, Tt, D], c [B, D] -> (img, txt)."""
    return dual_stream_block(img, txt, c, rope, key_mask, img_mod=self.img_mod,
                             txt_mod=self.txt_mod, attn=self.attn,
                             img_ff=self.img_mlp, txt_ff=self.txt_mlp)


class QwenImage(nnx.Module):
  """Qwen-Image transformer, `F = model(x_t, t, r, cond)` (module doc).

  Module names are diffusers' (see `convert/diffusers_qwen_image.py`).
  """

  def __init__(self, config: QwenImageConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    d = cfg.hidden_size
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              rngs=rngs)
    self.img_in = Dense(cfg.in_channels, d, ('patch', 'embed'), **kw)
    self.txt_norm = RMSNorm(cfg.joint_attention_dim, 'txt_embed', eps=NORM_EPS,
                            param_dtype=cfg.params_dtype)
    self.txt_in = Dense(cfg.joint_attention_dim, d, ('txt_embed', 'embed'),
                        **kw)
    self.time_text_embed = TimeTextEmbed(d, **kw)
    self.time_text_embed_2 = make_r_embedder(
        self.time_text_embed, d, enabled=cfg.r_embedder,
        init=cfg.r_embedder_init, **kw)
    self.transformer_blocks = nnx.List([
        QwenImageTransformerBlock(cfg, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.norm_out = Modulation(d, 2, **kw)
    self.proj_out = Dense(d, cfg.out_dim, ('embed', 'patch'), **kw)

  def _check(self, x, t, r, cond) -> None:
    check_inputs('QwenImage', self.config, x, t, r, cond, {'txt'},
                 "'txt' [B, L, D_txt] and optionally 'txt_mask' [B, L]")

  def time_embedding(self, t: jax.Array, r: jax.Array) -> jax.Array:
    """temb [B, D] = E(1000 t) + (t - r) E_2(1000 r) (official wrapper)."""
    r_emb = self.time_text_embed_2
    # exact: diffusers' Qwen-Image multiplies t by the frequencies in the
    # timestep dtype (float64 in the fixtures' reference), not in float32.
    temb = twin_time(self.time_text_embed.timestep_embedder,
                     None if r_emb is None else r_emb.timestep_embedder, t, r,
                     exact=True)
    return constrain(temb.astype(self.config.compute_dtype), VEC)

  def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array,
               cond: Mapping[str, jax.Array]) -> jax.Array:
    """F(x_t, t, r, cond) -> [B, H, W, C] float32 (see module doc)."""
    self._check(x_t, t, r, cond)
    cfg = self.config
    gh, gw = x_t.shape[1] // 2, x_t.shape[2] // 2
    c = self.time_embedding(t, r)
    img = self.img_in(pack_latents(x_t.astype(cfg.compute_dtype)))
    img = constrain(img, TOKENS)
    # RMS statistics of the text in its given precision (float32 stats).
    txt = constrain(self.txt_in(self.txt_norm(jnp.asarray(cond['txt']))),
                    TOKENS)
    lt = txt.shape[1]
    img_ids, txt_ids = qwen_image_ids(gh, gw, lt)
    rope = joint_rope(np.concatenate([txt_ids, img_ids]), cfg.axes_dims_rope)
    key_mask = None
    if cond.get('txt_mask') is not None:
      key_mask = joint_key_mask(cond['txt_mask'], gh * gw)
    img, _ = run_blocks(self.transformer_blocks, cfg.remat_policy, (img, txt),
                        c, rope, key_mask)
    out = output_layer(img, c, self.norm_out, self.proj_out)
    return unpack_latents(out, gh, gw).astype(jnp.float32)


def flops_per_forward(cfg: QwenImageConfig, b: int, h: int, w: int,
                      lt: int) -> int:
  """Matmul FLOPs of one forward at latent size h x w, text length lt."""
  return dual_stream_flops(cfg, b, h, w, lt, time_mlps=1 + int(cfg.r_embedder))
