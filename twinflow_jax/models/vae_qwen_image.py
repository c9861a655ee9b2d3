"""Flax NNX Qwen-Image VAE (diffusers `AutoencoderKLQwenImage`) on single frames.

The Qwen-Image VAE (fine-tuned from the Wan 2.1 video VAE) is built of causal 3-D
convolutions, RMS norms, a single-head attention in its mid blocks and temporal
down/up-sampling layers. Qwen-Image encodes images as one-frame videos, and this
module implements exactly that single-frame (T = 1) path, in NHWC:

  * A causal 3-D convolution pads 2 (kernel_t - 1) zero frames in front of the one
    frame, so only the last temporal slice of its kernel, `weight[:, :, -1]`, meets
    data: it is a 2-D convolution with that slice (spatial padding as in diffusers).
  * The temporal layers (`time_conv` of 'downsample3d' / 'upsample3d') are skipped on
    the first chunk of a video in diffusers; with T = 1 that is the only chunk, so
    they never run. Their weights are read and ignored by the converter.
  * RMS norm: x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (torch's
    `F.normalize`), statistics in float32.
  * Decoder output is clamped to [-1, 1], as diffusers' `_decode` does.

Multi-frame video (T > 1, with the feature cache) is not implemented. Same
interface as `vae.AutoencoderKL`: `encode(images) -> (mean, logvar)`,
`decode(latents) -> images`; latents are normalised per channel with the config's
`latents_mean` / `latents_std` (x = (z - mean) / std), see `latent_normalization`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.sharding import constrain
from twinflow_jax.models.vae import (IMAGE_AXES, Conv2d, MidBlock, NormConvResidual,
                                     _dtype, check_run_options, config_fields,
                                     single_head_attention, split_moments,
                                     upsample_nearest_2x)


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
  """diffusers `AutoencoderKLQwenImage` config fields, plus run options."""
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  input_channels: int = 3
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  # Run options (not from diffusers).
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'xla'

  kind = 'qwen_image'

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **options) -> QwenImageVAEConfig:
    """Reads a diffusers `AutoencoderKLQwenImage` config.json dict."""
    kw = config_fields(cls, config, ('dim_mult', 'attn_scales', 'temperal_downsample',
                                     'latents_mean', 'latents_std'))
    if config.get('non_linearity', 'silu') != 'silu':
      raise ValueError('VAE config non_linearity must be silu')
    for k in ('latents_mean', 'latents_std'):
      if kw.get(k) is None:
        raise ValueError(f'Qwen-Image VAE config.json lacks {k!r}; it is needed to '
                         'normalise the latents')
    cfg = cls(**kw, **options)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    check_run_options(self)
    if self.attn_scales:
      # diffusers' QwenImageEncoder3d cannot run these either (its attention block
      # does not take the feature cache), and released checkpoints have none.
      raise ValueError(f'Qwen-Image VAE attn_scales={list(self.attn_scales)} is not '
                       'supported (released checkpoints use [])')
    if len(self.temperal_downsample) != len(self.dim_mult) - 1:
      raise ValueError('Qwen-Image VAE config: temperal_downsample needs '
                       f'{len(self.dim_mult) - 1} entries, has '
                       f'{len(self.temperal_downsample)}')
    for k in ('latents_mean', 'latents_std'):
      v = getattr(self, k)
      if v is not None and len(v) != self.z_dim:
        raise ValueError(f'Qwen-Image VAE config {k} has {len(v)} entries for '
                         f'z_dim={self.z_dim}')

  @property
  def latent_channels(self) -> int:
    return self.z_dim

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  def latent_normalization(self) -> tuple[Any, Any]:
    """(shift, scale) per channel: x = (z - latents_mean) / latents_std, as the
    Qwen-Image pipelines normalise."""
    return list(self.latents_mean), [1.0 / s for s in self.latents_std]


class RMSNorm(nnx.Module):
  """Qwen-Image `RMS_norm` over channels: F.normalize(x) * sqrt(C) * gamma."""

  def __init__(self, channels: int, *, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=('norm',))
    self.factor = float(channels) ** 0.5

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * self.factor
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class ResidualBlock(NormConvResidual):
  """RMS -> SiLU -> conv3 -> RMS -> SiLU -> conv3, plus a 1x1 skip when widths differ."""

  def __init__(self, c_in: int, c_out: int, *, kw: dict, rngs: nnx.Rngs):
    super().__init__(c_in, c_out, lambda c: RMSNorm(c, param_dtype=kw['param_dtype']),
                     kw=kw, rngs=rngs)


class AttentionBlock(nnx.Module):
  """RMS norm, fused 1x1 q/k/v, one head over H*W, 1x1 projection, residual."""

  def __init__(self, channels: int, *, impl: str, kw: dict, rngs: nnx.Rngs):
    self.impl = impl
    self.norm = RMSNorm(channels, param_dtype=kw['param_dtype'])
    self.to_qkv = Conv2d(channels, 3 * channels, 1, **kw, rngs=rngs)
    self.proj = Conv2d(channels, channels, 1, **kw, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    out = single_head_attention(q, k, v, self.impl).reshape(b, h, w, c)
    return x + self.proj(out).astype(x.dtype)


def _mid_block(channels: int, *, impl: str, kw: dict, rngs: nnx.Rngs) -> MidBlock:
  """resnet, attention, resnet (`vae.MidBlock`)."""
  return MidBlock(lambda: ResidualBlock(channels, channels, kw=kw, rngs=rngs),
                  lambda: AttentionBlock(channels, impl=impl, kw=kw, rngs=rngs))


class Downsample(nnx.Module):
  """'downsample2d' / 'downsample3d' at T = 1: zero-pad (0, 1), conv3 stride 2."""

  def __init__(self, channels: int, *, kw: dict, rngs: nnx.Rngs):
    self.resample = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                           **kw, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resample(x)


class Upsample(nnx.Module):
  """'upsample2d' / 'upsample3d' at T = 1: nearest 2x, conv3 halving the width."""

  def __init__(self, channels: int, *, kw: dict, rngs: nnx.Rngs):
    self.resample = Conv2d(channels, channels // 2, 3, **kw, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.resample(upsample_nearest_2x(x))


class Encoder(nnx.Module):
  """images [B, H, W, 3] -> moments [B, H/f, W/f, 2 z_dim] (before quant_conv)."""

  def __init__(self, cfg: QwenImageVAEConfig, *, kw: dict, rngs: nnx.Rngs):
    dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
    self.conv_in = Conv2d(cfg.input_channels, dims[0], 3, **kw, rngs=rngs)
    # One flat list, indexed like diffusers' `encoder.down_blocks.<i>`.
    layers = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        layers.append(ResidualBlock(c_in, c_out, kw=kw, rngs=rngs))
        c_in = c_out
      if i != len(cfg.dim_mult) - 1:
        layers.append(Downsample(c_out, kw=kw, rngs=rngs))
    self.down_blocks = nnx.List(layers)
    self.mid_block = _mid_block(dims[-1], impl=cfg.attention, kw=kw, rngs=rngs)
    self.norm_out = RMSNorm(dims[-1], param_dtype=kw['param_dtype'])
    self.conv_out = Conv2d(dims[-1], 2 * cfg.z_dim, 3, **kw, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for layer in self.down_blocks:
      x = layer(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class UpBlock(nnx.Module):

  def __init__(self, c_in: int, c_out: int, num_res_blocks: int, add_upsample: bool, *,
               kw: dict, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(c_in if i == 0 else c_out, c_out, kw=kw,
                                           rngs=rngs)
                             for i in range(num_res_blocks + 1)])
    self.upsampler = Upsample(c_out, kw=kw, rngs=rngs) if add_upsample else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    return x if self.upsampler is None else self.upsampler(x)


class Decoder(nnx.Module):
  """latents [B, h, w, z_dim] (after post_quant_conv) -> images [B, h f, w f, 3]."""

  def __init__(self, cfg: QwenImageVAEConfig, *, kw: dict, rngs: nnx.Rngs):
    mult = tuple(cfg.dim_mult)
    dims = [cfg.base_dim * u for u in (mult[-1],) + mult[::-1]]
    self.conv_in = Conv2d(cfg.z_dim, dims[0], 3, **kw, rngs=rngs)
    self.mid_block = _mid_block(dims[0], impl=cfg.attention, kw=kw, rngs=rngs)
    blocks = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
      # Each upsampler halves the width, so later blocks start from half.
      blocks.append(UpBlock(c_in // 2 if i > 0 else c_in, c_out, cfg.num_res_blocks,
                            i != len(mult) - 1, kw=kw, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], param_dtype=kw['param_dtype'])
    self.conv_out = Conv2d(dims[-1], cfg.input_channels, 3, **kw, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKLQwenImage(nnx.Module):
  """The Qwen-Image VAE on single frames (see the module docstring)."""

  def __init__(self, config: QwenImageVAEConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    kw = dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype))
    z = config.z_dim
    self.encoder = Encoder(config, kw=kw, rngs=rngs)
    self.quant_conv = Conv2d(2 * z, 2 * z, 1, **kw, rngs=rngs)
    self.post_quant_conv = Conv2d(z, z, 1, **kw, rngs=rngs)
    self.decoder = Decoder(config, kw=kw, rngs=rngs)

  @property
  def latent_channels(self) -> int:
    return self.config.z_dim

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, z_dim] float32."""
    h = self.quant_conv(self.encoder(constrain(images, IMAGE_AXES)))
    return split_moments(constrain(h, IMAGE_AXES))

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents [B, h, w, z_dim] (unnormalised) -> images in [-1, 1], float32."""
    x = self.decoder(self.post_quant_conv(constrain(latents, IMAGE_AXES)))
    return jnp.clip(constrain(x, IMAGE_AXES).astype(jnp.float32), -1.0, 1.0)
