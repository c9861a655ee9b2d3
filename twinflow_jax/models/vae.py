"""Flax NNX `AutoencoderKL`: the image VAE of SD / SDXL (4 latent channels) and of
SD3 / Flux (16 channels, no quant convolutions), plus the parts every VAE here shares.

The network re-states diffusers' `AutoencoderKL` (`models/autoencoders/vae.py`
Encoder / Decoder with `DownEncoderBlock2D`, `UNetMidBlock2D`, `UpDecoderBlock2D`,
`ResnetBlock2D`, `Downsample2D`, `Upsample2D` and the single-head spatial `Attention`),
in NHWC:

  encode: images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, C]
          (f = 2 ** (len(block_out_channels) - 1); logvar clamped to [-30, 20])
  decode: latents [B, h, w, C] -> images [B, h f, w f, 3] (not clamped, as diffusers)

Parameter names follow diffusers' module tree (encoder.down_blocks.0.resnets.0.conv1
...), with Flax leaves: conv `kernel` [kh, kw, in, out], dense `kernel` [in, out],
norm `scale` / `bias`; `models/convert/diffusers_vae.py` maps a diffusers checkpoint
onto them. The Qwen-Image VAE lives in `vae_qwen_image.py` and has the same interface.

Sharding: parameters carry logical names ('conv_height', 'conv_width', 'conv_in',
'conv_out', 'norm') that `VAE_LOGICAL_AXIS_RULES` maps to None (replicated: the SD VAE
is 84M parameters); activations are constrained to ('activation_batch', ...), i.e. the
batch is split over ('data', 'fsdp'). `make_encode_fn` / `make_decode_fn` jit the
two halves with explicit batch shardings. Compute runs in `dtype` (e.g. bfloat16) with
normalisation statistics and the softmax in float32; float32 convolutions use the
highest matmul precision, so they stay float32 on accelerators too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import NamedSharding, PartitionSpec

from twinflow_jax.models.attention import attention_names, dot_product_attention
from twinflow_jax.models.sharding import (DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES,
                                          constrain)

# The VAE's parameter names, replicated; the rest as in the transformer models.
VAE_LOGICAL_AXIS_RULES = DEFAULT_LOGICAL_AXIS_RULES + (
    ('conv_height', None),
    ('conv_width', None),
    ('conv_in', None),
    ('conv_out', None),
    ('norm', None),
)
IMAGE_AXES = ('activation_batch', None, None, None)  # [B, H, W, C]
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp


def _dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ValueError(f'VAE dtype {name!r} not in {tuple(DTYPES)}')
  return DTYPES[name]


# ----------------------------------------------------------------------------------------
# Layers shared with the Qwen-Image VAE.


class Conv2d(nnx.Module):
  """2-D convolution, NHWC; kernel [kh, kw, in, out], bias [out].

  `padding` is ((top, bottom), (left, right)); the default pads k // 2 on every side
  (torch's `padding=k // 2`).
  """

  def __init__(self, c_in: int, c_out: int, kernel_size: int, *, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    k = kernel_size
    self.stride = stride
    self.padding = padding if padding is not None else ((k // 2, k // 2),) * 2
    self.dtype = dtype
    init = jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    self.kernel = nnx.Param(init(rngs.params(), (k, k, c_in, c_out), param_dtype),
                            out_sharding=('conv_height', 'conv_width', 'conv_in',
                                          'conv_out'))
    self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype), out_sharding=('conv_out',))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in] -> [B, H', W', out]."""
    precision = (jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype),
        (self.stride, self.stride), self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
    return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
  """x [..., in] @ kernel [in, out] + bias [out] (torch `nn.Linear`, transposed)."""

  def __init__(self, c_in: int, c_out: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    init = jax.nn.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (c_in, c_out), param_dtype),
                            out_sharding=('conv_in', 'conv_out'))
    self.bias = nnx.Param(jnp.zeros((c_out,), param_dtype), out_sharding=('conv_out',))

  def __call__(self, x: jax.Array) -> jax.Array:
    precision = (jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None)
    y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   precision=precision)
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """torch `nn.GroupNorm` over NHWC (biased variance, float32 statistics)."""

  def __init__(self, channels: int, groups: int, *, eps: float = 1e-6,
               param_dtype: Any = jnp.float32):
    if channels % groups:
      raise ValueError(f'VAE: {channels} channels do not split into {groups} groups '
                       '(config norm_num_groups)')
    self.groups, self.eps = groups, eps
    self.scale = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=('norm',))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), out_sharding=('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    y = g * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of [B, H, W, C] (torch 'nearest' and
  'nearest-exact' agree for an integer factor of 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# Queries per attention call: above this many tokens (e.g. a 128 x 128 latent of a
# 1024 px image) the queries are processed in chunks, so memory grows as T * chunk
# instead of T^2. Exact: every chunk sees all keys.
ATTENTION_QUERY_CHUNK = 4096


def single_head_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          impl: str) -> jax.Array:
  """Softmax attention of [B, T, C] queries/keys/values with one head of width C."""

  def attend(q_chunk):
    out = dot_product_attention(q_chunk[:, :, None, :], k[:, :, None, :],
                                v[:, :, None, :], impl=impl)
    return out[:, :, 0, :]

  b, t, c = q.shape
  chunk = ATTENTION_QUERY_CHUNK
  if t <= chunk:
    return attend(q)
  pad = -t % chunk
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0))) if pad else q
  chunks = qp.reshape(b, -1, chunk, c).transpose(1, 0, 2, 3)
  out = jax.lax.map(attend, chunks).transpose(1, 0, 2, 3).reshape(b, -1, c)
  return out[:, :t]


# ----------------------------------------------------------------------------------------
# Config.


def config_fields(cls: type, config: Mapping[str, Any],
                  tuple_fields: Sequence[str]) -> dict[str, Any]:
  """The entries of a diffusers config.json dict that are fields of the dataclass `cls`,
  the (JSON list) `tuple_fields` as tuples."""
  fields = {f.name for f in dataclasses.fields(cls)}
  kw = {k: v for k, v in config.items() if k in fields}
  for k in tuple_fields:
    if kw.get(k) is not None:
      kw[k] = tuple(kw[k])
  return kw


def check_run_options(cfg: Any) -> None:
  """Validates the run options (dtype, param_dtype, attention) of a VAE config."""
  _dtype(cfg.dtype), _dtype(cfg.param_dtype)
  if cfg.attention not in attention_names():
    raise ValueError(f'VAE attention {cfg.attention!r} not in {attention_names()}')


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """diffusers `AutoencoderKL` config fields that shape the network, plus run options.

  Build one from a diffusers config.json with `from_diffusers`. Latent normalisation
  (`scaling_factor`, `shift_factor`, optional per-channel `latents_mean` /
  `latents_std`) does not change the network; `latent_normalization` returns it.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  # Run options (not from diffusers).
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention: str = 'xla'

  kind = 'autoencoder_kl'

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **options) -> AutoencoderKLConfig:
    """Reads a diffusers `AutoencoderKL` config.json dict (unsupported variants raise)."""
    for key, allowed in (('down_block_types', 'DownEncoderBlock2D'),
                         ('up_block_types', 'UpDecoderBlock2D')):
      bad = [t for t in config.get(key, ()) if t != allowed]
      if bad:
        raise ValueError(f'VAE config {key} has {bad}; only {allowed} is supported')
    if config.get('act_fn', 'silu') != 'silu':
      raise ValueError(f"VAE config act_fn={config['act_fn']!r}; only 'silu' is supported")
    kw = config_fields(cls, config, ('block_out_channels', 'latents_mean', 'latents_std'))
    n = len(kw.get('block_out_channels', cls.block_out_channels))
    for key in ('down_block_types', 'up_block_types'):
      if key in config and len(config[key]) != n:
        raise ValueError(f'VAE config has {len(config[key])} {key} but {n} '
                         'block_out_channels')
    cfg = cls(**kw, **options)
    cfg.validate()
    return cfg

  def validate(self) -> None:
    check_run_options(self)
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f'VAE block_out_channels {self.block_out_channels} are not all '
                         f'divisible by norm_num_groups={self.norm_num_groups}')
    for k in ('latents_mean', 'latents_std'):
      v = getattr(self, k)
      if v is not None and len(v) != self.latent_channels:
        raise ValueError(f'VAE config {k} has {len(v)} entries for '
                         f'{self.latent_channels} latent channels')

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def latent_normalization(self) -> tuple[Any, Any]:
    """(shift, scale) with model input x = (latent - shift) * scale, as diffusers'
    pipelines use them: scalars from shift_factor / scaling_factor, or per-channel
    lists when latents_mean / latents_std are set (x = (z - mean) * scaling / std)."""
    if self.latents_mean is not None and self.latents_std is not None:
      return (list(self.latents_mean),
              [self.scaling_factor / s for s in self.latents_std])
    return float(self.shift_factor or 0.0), float(self.scaling_factor)


# ----------------------------------------------------------------------------------------
# Blocks.


class NormConvResidual(nnx.Module):
  """norm1 -> SiLU -> conv3x3 -> norm2 -> SiLU -> conv3x3, plus a 1x1 skip when the
  widths differ: the residual block of both VAEs, `norm(channels)` making the norm."""

  def __init__(self, c_in: int, c_out: int, norm: Callable[[int], nnx.Module], *,
               kw: dict, rngs: nnx.Rngs):
    self.norm1 = norm(c_in)
    self.conv1 = Conv2d(c_in, c_out, 3, **kw, rngs=rngs)
    self.norm2 = norm(c_out)
    self.conv2 = Conv2d(c_out, c_out, 3, **kw, rngs=rngs)
    self.conv_shortcut = (Conv2d(c_in, c_out, 1, **kw, rngs=rngs) if c_in != c_out
                          else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return constrain(skip.astype(h.dtype) + h, IMAGE_AXES)


class ResnetBlock2D(NormConvResidual):
  """diffusers `ResnetBlock2D` of the VAE: `NormConvResidual` with GroupNorms."""

  def __init__(self, c_in: int, c_out: int, groups: int, *, kw: dict, rngs: nnx.Rngs):
    super().__init__(c_in, c_out,
                     lambda c: GroupNorm(c, groups, param_dtype=kw['param_dtype']),
                     kw=kw, rngs=rngs)


class SpatialAttention(nnx.Module):
  """diffusers' VAE mid-block `Attention`: GroupNorm, one head over H*W tokens,
  output projection, residual."""

  def __init__(self, channels: int, groups: int, *, impl: str, kw: dict,
               rngs: nnx.Rngs):
    self.impl = impl
    self.group_norm = GroupNorm(channels, groups, param_dtype=kw['param_dtype'])
    self.to_q = Linear(channels, channels, **kw, rngs=rngs)
    self.to_k = Linear(channels, channels, **kw, rngs=rngs)
    self.to_v = Linear(channels, channels, **kw, rngs=rngs)
    self.to_out = Linear(channels, channels, **kw, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    out = single_head_attention(self.to_q(t), self.to_k(t), self.to_v(t), self.impl)
    return x + self.to_out(out).reshape(b, h, w, c).astype(x.dtype)


class MidBlock(nnx.Module):
  """resnet, (attention, resnet): `UNetMidBlock2D` with one layer, and the Qwen-Image
  VAE's mid block. The factories make the blocks, in that order (resnets first)."""

  def __init__(self, resnet: Callable[[], nnx.Module],
               attention: Callable[[], nnx.Module] | None):
    self.resnets = nnx.List([resnet() for _ in range(2)])
    self.attentions = nnx.List([attention()] if attention is not None else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


def _mid_block(cfg: AutoencoderKLConfig, channels: int, *, kw: dict,
               rngs: nnx.Rngs) -> MidBlock:
  g = cfg.norm_num_groups
  attention = (lambda: SpatialAttention(channels, g, impl=cfg.attention, kw=kw, rngs=rngs))
  return MidBlock(lambda: ResnetBlock2D(channels, channels, g, kw=kw, rngs=rngs),
                  attention if cfg.mid_block_add_attention else None)


class DownBlock(nnx.Module):
  """`DownEncoderBlock2D`: resnets, then a stride-2 conv padded (0, 1) on H and W."""

  def __init__(self, c_in: int, c_out: int, num_layers: int, groups: int,
               add_downsample: bool, *, kw: dict, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups, kw=kw, rngs=rngs)
        for i in range(num_layers)])
    self.downsampler = (Conv2d(c_out, c_out, 3, stride=2, padding=((0, 1), (0, 1)),
                               **kw, rngs=rngs) if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    return x if self.downsampler is None else self.downsampler(x)


class UpBlock(nnx.Module):
  """`UpDecoderBlock2D`: resnets, then nearest 2x upsampling and a conv3x3."""

  def __init__(self, c_in: int, c_out: int, num_layers: int, groups: int,
               add_upsample: bool, *, kw: dict, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups, kw=kw, rngs=rngs)
        for i in range(num_layers)])
    self.upsampler = (Conv2d(c_out, c_out, 3, **kw, rngs=rngs) if add_upsample
                      else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    if self.upsampler is not None:
      x = self.upsampler(upsample_nearest_2x(x))
    return x


class Encoder(nnx.Module):
  """images [B, H, W, in] -> moments [B, H/f, W/f, 2 C]."""

  def __init__(self, cfg: AutoencoderKLConfig, *, kw: dict, rngs: nnx.Rngs):
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, **kw, rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                  i < len(ch) - 1, kw=kw, rngs=rngs) for i in range(len(ch))])
    self.mid_block = _mid_block(cfg, ch[-1], kw=kw, rngs=rngs)
    self.conv_norm_out = GroupNorm(ch[-1], g, param_dtype=kw['param_dtype'])
    self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """latents [B, h, w, C] -> images [B, h f, w f, out]."""

  def __init__(self, cfg: AutoencoderKLConfig, *, kw: dict, rngs: nnx.Rngs):
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, **kw, rngs=rngs)
    self.mid_block = _mid_block(cfg, ch[0], kw=kw, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                i < len(ch) - 1, kw=kw, rngs=rngs) for i in range(len(ch))])
    self.conv_norm_out = GroupNorm(ch[-1], g, param_dtype=kw['param_dtype'])
    self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, **kw, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., 2C] -> (mean, logvar clamped to LOGVAR_RANGE) in float32."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
  """One draw mean + exp(logvar / 2) * N(0, 1) (diffusers `latent_dist.sample()`)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


class AutoencoderKL(nnx.Module):
  """SD / SDXL / SD3 / Flux image VAE (see the module docstring)."""

  def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    kw = dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype))
    c = config.latent_channels
    self.encoder = Encoder(config, kw=kw, rngs=rngs)
    self.decoder = Decoder(config, kw=kw, rngs=rngs)
    self.quant_conv = (Conv2d(2 * c, 2 * c, 1, **kw, rngs=rngs)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (Conv2d(c, c, 1, **kw, rngs=rngs)
                            if config.use_post_quant_conv else None)

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, C] float32."""
    h = self.encoder(constrain(images, IMAGE_AXES))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    return split_moments(constrain(h, IMAGE_AXES))

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents [B, h, w, C] (unnormalised) -> images [B, h f, w f, 3] float32."""
    z = constrain(latents, IMAGE_AXES)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return constrain(self.decoder(z), IMAGE_AXES).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# Analytic cost.


def flops_per_image(config: AutoencoderKLConfig, height: int, width: int,
                    part: str = 'encoder') -> int:
  """Matmul / convolution FLOPs (2 per multiply-add) of one image through an
  `AutoencoderKL` half: every convolution and dense layer, q.k^T and the attention-
  weighted values; norms, activations and the softmax (elementwise) are left out.

  Args:
    config: the VAE config (e.g. from `AutoencoderKLConfig.from_diffusers`).
    height, width: image size (encoder input / decoder output), multiples of the
      downsampling factor.
    part: 'encoder' (including quant_conv) or 'decoder' (including post_quant_conv).
  """
  f = config.downsample_factor
  if height % f or width % f:
    raise ValueError(f'image size {height}x{width} is not a multiple of the VAE\'s '
                     f'downsampling factor {f}')
  ch, c = config.block_out_channels, config.latent_channels

  def conv(c_in, c_out, k, pixels):
    return 2 * k * k * c_in * c_out * pixels

  def resnet(c_in, c_out, pixels):
    return (conv(c_in, c_out, 3, pixels) + conv(c_out, c_out, 3, pixels)
            + (conv(c_in, c_out, 1, pixels) if c_in != c_out else 0))

  def mid(width_, pixels):
    total = 2 * resnet(width_, width_, pixels)
    if config.mid_block_add_attention:  # 4 projections, q.k^T, p.v
      total += 4 * 2 * pixels * width_ * width_ + 2 * 2 * pixels * pixels * width_
    return total

  if part == 'encoder':
    h, w = height, width
    total = conv(config.in_channels, ch[0], 3, h * w)
    for i, c_out in enumerate(ch):
      c_in = ch[max(i - 1, 0)]
      for j in range(config.layers_per_block):
        total += resnet(c_in if j == 0 else c_out, c_out, h * w)
      if i < len(ch) - 1:
        h, w = h // 2, w // 2
        total += conv(c_out, c_out, 3, h * w)
    total += mid(ch[-1], h * w) + conv(ch[-1], 2 * c, 3, h * w)
    return total + (conv(2 * c, 2 * c, 1, h * w) if config.use_quant_conv else 0)
  if part == 'decoder':
    rev = tuple(reversed(ch))
    h, w = height // f, width // f
    total = conv(c, c, 1, h * w) if config.use_post_quant_conv else 0
    total += conv(c, rev[0], 3, h * w) + mid(rev[0], h * w)
    for i, c_out in enumerate(rev):
      c_in = rev[max(i - 1, 0)]
      for j in range(config.layers_per_block + 1):
        total += resnet(c_in if j == 0 else c_out, c_out, h * w)
      if i < len(rev) - 1:
        h, w = 2 * h, 2 * w
        total += conv(c_out, c_out, 3, h * w)
    return total + conv(rev[-1], config.out_channels, 3, h * w)
  raise ValueError(f"part={part!r}; choose 'encoder' or 'decoder'")


# ----------------------------------------------------------------------------------------
# Construction and jitted, batch-sharded encode / decode.


def create_vae(config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
  """Builds an `AutoencoderKL` or `AutoencoderKLQwenImage` from its config.

  Parameters are created under `VAE_LOGICAL_AXIS_RULES` (replicated) when a mesh is
  set (`jax.set_mesh`), unsharded otherwise; works inside `nnx.eval_shape`.
  """
  if config.kind == 'autoencoder_kl':
    build = lambda: AutoencoderKL(config, rngs=rngs)
  elif config.kind == 'qwen_image':
    from twinflow_jax.models import vae_qwen_image  # pylint: disable=g-import-not-at-top
    build = lambda: vae_qwen_image.AutoencoderKLQwenImage(config, rngs=rngs)
  else:
    raise ValueError(f'unknown VAE kind {config.kind!r}')
  if jax.sharding.get_abstract_mesh().empty:
    with nnx.use_eager_sharding(False):
      return build()
  with nnx.logical_axis_rules(core_spmd.get_logical_axis_rules()
                              or VAE_LOGICAL_AXIS_RULES):
    return build()


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'tensor') mesh putting `devices` (default: this process's
  local devices) on 'data': each process encodes its own inputs on its own chips."""
  devices = list(jax.local_devices() if devices is None else devices)
  return jax.sharding.Mesh(np.array(devices).reshape(len(devices), 1, 1), MESH_AXES)


def _batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  axes = tuple(a for a in ('data', 'fsdp') if a in mesh.shape)
  return NamedSharding(mesh, PartitionSpec(axes))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
  """Batch sizes given to `make_encode_fn` / `make_decode_fn` must be multiples."""
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.shape]))


@functools.lru_cache(maxsize=64)
def _jitted(method: str, mesh: jax.sharding.Mesh | None, n_out: int) -> Callable:
  """One jitted `(graphdef, state, x) -> vae.<method>(x)` per method and mesh; the
  graphdef is static, so VAEs of equal structure share compilations."""

  def run(graphdef, state, x):
    if mesh is None:
      return getattr(nnx.merge(graphdef, state), method)(x)
    with nnx.logical_axis_rules(VAE_LOGICAL_AXIS_RULES):
      return getattr(nnx.merge(graphdef, state), method)(x)

  if mesh is None:
    return jax.jit(run, static_argnums=0)
  replicated = NamedSharding(mesh, PartitionSpec())
  data = _batch_sharding(mesh)
  return jax.jit(run, static_argnums=0, in_shardings=(replicated, data),
                 out_shardings=data if n_out == 1 else (data,) * n_out)


def _jit_method(vae: nnx.Module, method: str, mesh: jax.sharding.Mesh | None,
                n_out: int) -> Callable:
  graphdef, state = nnx.split(vae)
  fn = _jitted(method, mesh, n_out)
  if mesh is None:
    return lambda x: fn(graphdef, state, x)
  state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
  data = _batch_sharding(mesh)

  def call(x):
    with jax.set_mesh(mesh):
      return fn(graphdef, state, jax.device_put(x, data))

  return call


def make_encode_fn(vae: nnx.Module, mesh: jax.sharding.Mesh | None = None
                   ) -> Callable[[Any], tuple[jax.Array, jax.Array]]:
  """Jitted `images [B, H, W, 3] -> (mean, logvar)`, batch sharded over the mesh.

  With a mesh, B must be a multiple of `batch_divisor(mesh)`; the weights are
  replicated onto the mesh once. Without one, runs on the default device.
  """
  return _jit_method(vae, 'encode', mesh, 2)


def make_decode_fn(vae: nnx.Module, mesh: jax.sharding.Mesh | None = None
                   ) -> Callable[[Any], jax.Array]:
  """Jitted `latents [B, h, w, C] -> images [B, H, W, 3]`, as `make_encode_fn`."""
  return _jit_method(vae, 'decode', mesh, 1)
