"""Time, twin-time, label and position embeddings; patchify helpers.

Twin-time conditioning (TwinFlow): the signed current time `t` and the target
time `r` are embedded by two timestep embedders, and
`c_time = E_t(net(t)) + (t - r) * E_r(net(r))`, so the r-embedder contributes
nothing when r == t and negative t (fake trajectory) gives a different
sinusoidal embedding from positive t.

`net(t)` is the network's own time input, set by the time convention:
  'twinflow': net(t) = 1000 t  (t = 1 noise, t = 0 data; output F as is).
  'sit':      net(t) = 1 - t   (SiT/REPA linear interpolant: t_sit = 1 is
              data, and its velocity is data - noise = -F), output negated.
`(t - r)` is always in TwinFlow units, as in the official SD3/Qwen-Image
wrappers (`temb + temb_2 * (t - r)`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.layers import Dense, normal_002
from twinflow_jax.models.sharding import constrain

# Per-row vectors [B, D] (time and label embeddings) stay sharded like the batch, so
# that FSDP gathers the embedders' weights instead of moving rows between devices.
ROWS = ('activation_batch', 'activation_embed')


@dataclasses.dataclass(frozen=True)
class TimeConvention:
  """Affine map TwinFlow time -> network time, and the output's sign."""
  offset: float
  scale: float
  out_sign: float

  def net_time(self, t: jax.Array) -> jax.Array:
    """TwinFlow signed time [B] -> network time input [B] (float32)."""
    t = jnp.asarray(t, jnp.float32)
    return self.offset + self.scale * t


TIME_CONVENTIONS = {
    'twinflow': TimeConvention(offset=0.0, scale=1000.0, out_sign=1.0),
    'sit': TimeConvention(offset=1.0, scale=-1.0, out_sign=-1.0),
}


def timestep_frequencies(half: int, max_period: float = 10000.0) -> np.ndarray:
  """float32 frequencies max_period^(-i / half), i < half, as PyTorch computes them.

  float32 exponent, exp correctly rounded (torch's float32 exp is, XLA's is an
  ulp off in some entries; at network times of 1000 t, or Flux's 1000 x
  guidance, an ulp of a frequency moves sin/cos by ~1e-4). A numpy constant.
  """
  exponent = (np.float32(-math.log(max_period)) *
              np.arange(half, dtype=np.float32)) / np.float32(half)
  return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos | sin] of network times (DiT / GLIDE layout).

  Args:
    t: [B] float network times (may be fractional or negative).
    dim: embedding width (even).
    max_period: lowest frequency is 1 / max_period.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.asarray(timestep_frequencies(half, max_period))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nnx.Module):
  """Sinusoid(freq_dim) -> Dense -> SiLU -> Dense, width D."""

  def __init__(self, dim: int, freq_dim: int = 256, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    kw = dict(kernel_init=normal_002, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.fc1 = Dense(freq_dim, dim, ('freq', 'embed'), **kw)
    self.fc2 = Dense(dim, dim, ('mlp', 'embed'), **kw)

  def __call__(self, t_net: jax.Array) -> jax.Array:
    """[B] network times -> [B, D]."""
    emb = constrain(timestep_embedding(t_net, self.freq_dim),
                    ('activation_batch', None))
    h = constrain(jax.nn.silu(self.fc1(emb)), ROWS)
    return constrain(self.fc2(h), ROWS)


class TwinTimeEmbedder(nnx.Module):
  """E_t(net(t)) + (t - r) E_r(net(r)) for signed TwinFlow times t, r [B].

  `r_init`: 'copy' makes E_r a copy of E_t (fine-tuning a pretrained model,
  as for Qwen-Image); 'small' draws E_r's kernels from N(0, 0.02^2) with zero
  biases (as for SD3 / SANA).
  """

  def __init__(self, dim: int, *, time_convention: str = 'twinflow',
               r_init: str = 'copy', freq_dim: int = 256, dtype, param_dtype,
               rngs: nnx.Rngs):
    if time_convention not in TIME_CONVENTIONS:
      raise ValueError(f'time_convention {time_convention!r} not in '
                       f'{tuple(TIME_CONVENTIONS)}')
    if r_init not in ('copy', 'small'):
      raise ValueError(f"r_embedder_init {r_init!r} not in ('copy', 'small')")
    self.convention = TIME_CONVENTIONS[time_convention]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.t_embedder = TimestepEmbedder(dim, freq_dim, **kw)
    self.r_embedder = TimestepEmbedder(dim, freq_dim, **kw)
    if r_init == 'copy':
      copy_params(self.t_embedder, self.r_embedder)

  def __call__(self, t: jax.Array, r: jax.Array) -> jax.Array:
    """Signed times t, r [B] -> [B, D] in the compute dtype."""
    t = jnp.asarray(t, jnp.float32)
    r = jnp.asarray(r, jnp.float32)
    net = self.convention.net_time
    e_t = self.t_embedder(net(t))
    e_r = self.r_embedder(net(r))
    return constrain(e_t + (t - r)[:, None].astype(e_r.dtype) * e_r, ROWS)


def copy_params(src: nnx.Module, dst: nnx.Module) -> None:
  """Overwrites dst's parameters with copies of src's (same structure)."""
  # Real copies: a donated buffer must not back two parameters.
  state = jax.tree.map(lambda a: jnp.array(a, copy=True),
                       nnx.state(src, nnx.Param))
  nnx.update(dst, state)


class LabelEmbedder(nnx.Module):
  """Class table with num_classes + 1 rows; row `num_classes` is the null
  class used for guidance and label dropout."""

  def __init__(self, num_classes: int, dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = nnx.Param(
        normal_002(rngs.params(), (num_classes + 1, dim), param_dtype),
        out_sharding=('classes', 'embed'))

  def __call__(self, labels: jax.Array) -> jax.Array:
    """int labels [B] in [0, num_classes] -> [B, D] (NaN rows outside)."""
    # The whole table on every device (an FSDP weight gather), then a local lookup:
    # gathering from the 'embed'-sharded table would reshard the rows instead.
    table = constrain(self.embedding[...], (None, None))
    return constrain(jnp.take(table, labels, axis=0).astype(self.dtype), ROWS)


def sincos_2d_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding of a row-major token grid (MAE/DiT).

  The first half of the features encodes the column (w) index, the second
  half the row (h) index, each as [sin | cos] with frequencies
  1 / 10000^(i / (dim/4)) -- the exact layout of DiT's `pos_embed` buffer.

  Returns:
    [grid_h * grid_w, dim] float32 numpy array.
  """
  if dim % 4:
    raise ValueError(f'position embedding width {dim} must be divisible by 4')

  def one_d(d, pos):
    omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  ww, hh = np.meshgrid(np.arange(grid_w, dtype=np.float32),
                       np.arange(grid_h, dtype=np.float32))
  emb = np.concatenate([one_d(dim // 2, ww), one_d(dim // 2, hh)], axis=1)
  return emb.astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patch rows in (i, j, c) order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, gh: int, gw: int, p: int, c: int) -> jax.Array:
  """[B, gh*gw, p*p*c] -> [B, gh*p, gw*p, c] (inverse of `patchify`)."""
  b = x.shape[0]
  x = x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)
