"""Building blocks shared by the DiT and the MMDiT.

Each parameter is created with logical axis names (see `sharding.py`);
compute runs in `dtype` while parameters are stored in `param_dtype`.
Normalisation statistics are always taken in float32.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.attention import narrow_on_cpu
from twinflow_jax.models.backward import after
from twinflow_jax.models.sharding import constrain

Initializer = jax.nn.initializers.Initializer


def xavier_uniform(n_in: int, n_out: int) -> Initializer:
  """Glorot uniform over a kernel [*in_dims (n_in), *out_dims (n_out)].

  Matches torch's `xavier_uniform_` on the equivalent 2-D matrix.
  """
  return jax.nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=tuple(range(n_in)),
      out_axis=tuple(range(n_in, n_in + n_out)))


normal_002 = jax.nn.initializers.normal(0.02)
zeros = jax.nn.initializers.zeros


def check_text_cond(cond, batch: int, txt_dim: int) -> None:
  """cond['txt'] must be [batch, L, txt_dim] and the optional cond['txt_mask'] [batch, L]."""
  txt = cond['txt']
  if txt.ndim != 3 or txt.shape[0] != batch or txt.shape[2] != txt_dim:
    raise ValueError(f"cond['txt'] must be [{batch}, L, {txt_dim}], got {txt.shape}")
  mask = cond.get('txt_mask')
  if mask is not None and mask.shape != txt.shape[:2]:
    raise ValueError(f"cond['txt_mask'] must be {txt.shape[:2]}, got {mask.shape}")


class Dense(nnx.Module):
  """Linear map contracting the trailing `len(in_shape)` axes of its input.

  kernel: [*in_shape, *out_shape] with logical `names`;
  bias: [*out_shape] with the output names.
  """

  def __init__(
      self,
      in_shape: int | Sequence[int],
      out_shape: int | Sequence[int],
      names: Sequence[str | None],
      *,
      use_bias: bool = True,
      kernel_init: Initializer | None = None,
      bias_init: Initializer = zeros,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(
        out_shape)
    names = tuple(names)
    if len(names) != len(in_shape) + len(out_shape):
      raise ValueError(f'Dense: {names=} must name {in_shape + out_shape}')
    self.n_in = len(in_shape)
    self.dtype = dtype
    init = kernel_init or xavier_uniform(len(in_shape), len(out_shape))
    self.kernel = nnx.Param(
        init(rngs.params(), in_shape + out_shape, param_dtype),
        out_sharding=names)
    self.bias = nnx.Param(
        bias_init(rngs.params(), out_shape, param_dtype),
        out_sharding=names[self.n_in:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., *in_shape] -> [..., *out_shape]."""
    x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
    if x.dtype == jnp.bfloat16 and jax.default_backend() == 'cpu':
      return _bf16_dense(x, kernel, None if self.bias is None else self.bias[...],
                         self.n_in)
    y = jnp.tensordot(x, kernel, axes=self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


# XLA:CPU runs a bfloat16 product with a float32 result on the bfloat16 dot instructions
# of CPUs that have them (AVX-512 BF16: 331-378 GFLOP/s at 2048^3 and DiT-S/2's MLP shapes
# on 2 cores) but one with a bfloat16 result no faster than float32 (141-179). So on CPU
# the bfloat16 Dense asks for a float32 result, adds the bias and rounds once, in the
# forward and in both products of its backward (autodiff's backward would take the
# float32 cotangent of that rounding into a float32 product), and sums the bias gradient
# in float32 (XLA:CPU turns a bfloat16 sum into a slow windowed reduction).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bf16_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                n_in: int) -> jax.Array:
  y = jnp.tensordot(x, kernel, axes=n_in, preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def _bf16_dense_fwd(x, kernel, bias, n_in):
  return _bf16_dense(x, kernel, bias, n_in), (x, kernel, bias)


def _bf16_dense_bwd(n_in, res, g):
  x, kernel, bias = res
  n_batch, n_out = x.ndim - n_in, kernel.ndim - n_in
  g = g.astype(x.dtype)
  # dx[..., in] = g[..., out] . kernel[in, out]; dk[in, out] = x[..., in] . g[..., out]
  dx = jax.lax.dot_general(
      g, kernel, ((tuple(range(n_batch, n_batch + n_out)),
                   tuple(range(n_in, n_in + n_out))), ((), ())),
      preferred_element_type=jnp.float32)
  dk = jax.lax.dot_general(
      x, g, ((tuple(range(n_batch)), tuple(range(n_batch))), ((), ())),
      preferred_element_type=jnp.float32)
  db = None if bias is None else jnp.sum(g.astype(jnp.float32), axis=tuple(range(n_batch)))
  return (dx.astype(x.dtype), dk.astype(kernel.dtype),
          None if bias is None else db.astype(bias.dtype))


_bf16_dense.defvjp(_bf16_dense_fwd, _bf16_dense_bwd)


@jax.custom_vjp
def _grad_boundary(x):
  return x


def _grad_boundary_fwd(x):
  return x, None


def _grad_boundary_bwd(_, g):
  # A conditional is a fusion boundary (backward.py); on a multi-device CPU mesh its
  # predicate is one scalar taken from the first shard (no activation moves).
  return (after(g, g),)


_grad_boundary.defvjp(_grad_boundary_fwd, _grad_boundary_bwd)


def residual_grad_boundary(x: jax.Array) -> jax.Array:
  """Identity whose gradient is materialised here on CPU (unchanged elsewhere).

  XLA's CPU fusion copies the backward's running sum of the residual stream's
  gradient into each of its consumers, so every block's backward recomputes the
  gradient contributions of all blocks after it (fusions of up to 87 operands in the
  4-block default DiT). Placed at each block's input, this cuts that chain: the
  default MNIST train step runs 1.34x faster on 2 CPU cores (one process, alternating
  rounds); DiT-S/2's forward + backward is unchanged (0.99x).

  Args:
    x: any array (the residual stream [B, T, D] at a block's input).

  Returns:
    x, unchanged.
  """
  if jax.default_backend() != 'cpu':
    return x
  return _grad_boundary(x)


def _ln_stats(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


# The backward of LayerNorm (and of adaLN's modulation after it) is written out so that
# it keeps the normalised input and the [..., 1] inverse deviation, not the three [..., D]
# intermediates autodiff of the formula saves; `after` keeps XLA:CPU from re-deriving the
# normalised input from them anyway (backward.py). Float32 and wider inputs keep the
# output itself (exactly the normalised input); narrower ones keep the input and both
# statistics, from which the backward recomputes it exactly as the forward did.
def _ln_forward(x, eps):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, rstd = _ln_stats(x32, eps)
  y = ((x32 - mean) * rstd).astype(x.dtype)
  saved = (y, None, rstd) if y.dtype == x32.dtype else (x, mean, rstd)
  return y, saved


def _ln_backward(saved, dy):
  """d/dx of (x - mean(x)) * rsqrt(mean((x - mean(x))^2) + eps) given d/dy."""
  kept, mean, rstd = saved
  xhat = kept if mean is None else (kept.astype(rstd.dtype) - mean) * rstd
  dy = dy.astype(rstd.dtype)
  dx = rstd * (dy - jnp.mean(dy, axis=-1, keepdims=True)
               - xhat * jnp.mean(dy * xhat, axis=-1, keepdims=True))
  return dx.astype(kept.dtype), xhat


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without affine parameters (float32 stats).

  Same forward as the formula; the backward keeps the normalised input and the
  inverse deviation (see above), the gradient matches autodiff's to float rounding.

  Args:
    x: [..., D].
    eps: added to the variance.

  Returns:
    (x - mean) / sqrt(var + eps), [..., D] in x's dtype.
  """
  return _ln_forward(x, eps)[0]


def _layer_norm_bwd(eps, saved, dy):
  del eps
  return (_ln_backward(after(dy, saved), dy)[0],)


layer_norm.defvjp(_ln_forward, _layer_norm_bwd)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN modulation: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def modulated_layer_norm(x: jax.Array, shift: jax.Array, scale: jax.Array,
                         eps: float = 1e-6) -> jax.Array:
  """`modulate(layer_norm(x, eps), shift, scale)` with one backward for both.

  The same forward, bit for bit; the backward keeps the normalised input (which
  the scale's gradient needs as well) and the inverse deviation, not the
  intermediates of both formulas (several arrays of the residual stream's size
  per call).

  Args:
    x: [B, T, D].
    shift: [B, D].
    scale: [B, D].
    eps: LayerNorm's epsilon.

  Returns:
    [B, T, D] in the dtype modulate gives.
  """
  return _modulated_layer_norm_fwd(x, shift, scale, eps)[0]


def _modulated_layer_norm_fwd(x, shift, scale, eps):
  y, saved = _ln_forward(x, eps)
  return modulate(y, shift, scale), (saved, shift, scale)


def _modulated_layer_norm_bwd(eps, res, g):
  del eps
  saved, shift, scale = after(g, res)
  y_dtype = saved[0].dtype                          # x's dtype, which y has too
  g32 = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  dy = g32 * (1 + scale[:, None, :].astype(g32.dtype))
  dx, xhat = _ln_backward(saved, dy.astype(y_dtype))
  y = xhat.astype(y_dtype).astype(g32.dtype)       # the forward's y, as modulate saw it
  dscale = jnp.sum(g32 * y, axis=1).astype(scale.dtype)
  dshift = jnp.sum(g32, axis=1).astype(shift.dtype)
  return dx, dshift, dscale


modulated_layer_norm.defvjp(_modulated_layer_norm_fwd, _modulated_layer_norm_bwd)


@jax.custom_vjp
def gated(gate: jax.Array, y: jax.Array) -> jax.Array:
  """gate[:, None, :] * y, the adaLN gate of a block's branch, gate's gradient summed in float32.

  Autodiff sums the gate's gradient over the tokens in the product's dtype; for
  bfloat16 XLA:CPU emulates that with a windowed reduction that rounds after every
  addition (3% of the bfloat16 DiT-S/2 forward + backward on 2 cores). Values and
  float32 gradients are autodiff's.

  Args:
    gate: [B, D].
    y: [B, T, D].

  Returns:
    [B, T, D] in the promoted dtype of gate and y.
  """
  return gate[:, None, :] * y


def _gated_fwd(gate, y):
  return gated(gate, y), (gate, y)


def _gated_bwd(res, g):
  gate, y = res
  acc = jnp.promote_types(g.dtype, jnp.float32)
  dgate = jnp.sum(g.astype(acc) * y.astype(acc), axis=1).astype(gate.dtype)
  return dgate, (g * gate[:, None, :]).astype(y.dtype)


gated.defvjp(_gated_fwd, _gated_bwd)


class RMSNorm(nnx.Module):
  """RMS norm with a learnt scale over the last axis (used for q/k norm)."""

  def __init__(self, dim: int, name: str, *, eps: float = 1e-6,
               param_dtype: jnp.dtype = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """`jax.nn.gelu(x, approximate=True)`, whose backward keeps only x.

  Autodiff of the tanh formula saves several of its intermediates (each the
  size of the MLP's hidden activations) for the backward pass; this version
  saves x and recomputes tanh there, as PyTorch's GELU does. Same forward,
  the same gradient up to float rounding. Inputs narrower than float32
  (bfloat16) are computed in float32 and rounded once, as PyTorch's CPU and GPU
  kernels do: XLA otherwise rounds after each of the formula's nine operations
  (on 2 CPU cores 8.5 ms for DiT-S/2's [12 x 256, 1536] activations).
  """
  return _gelu_tanh_fwd(x)[0]


def _gelu_tanh_fwd(x):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jax.nn.gelu(x32, approximate=True).astype(x.dtype), x


def _gelu_tanh_bwd(x, g):
  # d/dx 0.5 x (1 + tanh(u)), u = c (x + a x^3).
  c, a = math.sqrt(2.0 / math.pi), 0.044715
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  t = jnp.tanh(c * (x32 + a * x32 * x32 * x32))
  d = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * c * (1 + 3 * a * x32 * x32)
  return ((g.astype(d.dtype) * d).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


class FeedForward(nnx.Module):
  """Transformer MLP: Dense -> GELU(tanh) -> Dense, hidden `mlp_dim`."""

  def __init__(self, dim: int, mlp_dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Dense(dim, mlp_dim, ('embed', 'mlp'), **kw)
    self.fc2 = Dense(mlp_dim, dim, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    h = gelu_tanh(self.fc1(x))
    h = constrain(h, ('activation_batch', 'activation_length',
                      'activation_mlp'))
    return constrain(self.fc2(h), ('activation_batch', 'activation_length',
                                   'activation_embed'))


class Modulation(nnx.Module):
  """adaLN head: SiLU(c) -> Dense(D, n*D) split into n chunks of [B, D].

  Zero-initialised (adaLN-Zero): gates start at 0, so each block starts as
  the identity map.
  """

  def __init__(self, dim: int, n: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.n = n
    self.proj = Dense(dim, n * dim, ('embed', 'modulation'), kernel_init=zeros,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, c: jax.Array) -> list[jax.Array]:
    """c [B, D] -> n arrays [B, D]."""
    # Pinning each chunk to the batch sharding also steers XLA's SPMD
    # partitioner away from a wrong reshard it otherwise picks for
    # `x + gate * proj(...)` when the batch spans ('data', 'fsdp') and the
    # width 'fsdp' (seen with jax 0.10.2).
    return [constrain(m, ('activation_batch', 'activation_embed'))
            for m in jnp.split(self.proj(jax.nn.silu(c)), self.n, axis=-1)]


def _qkv_slices(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, T, 3, N, H] -> q, k, v, each [B, T, N, H]."""
  return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


@jax.custom_vjp
def _unstack_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_qkv_slices` whose gradient is the stack of the three.

  Autodiff's gradient of the three slices is three zero-padded arrays added up, which
  XLA:CPU computes as written in the bfloat16 model, rounding after each addition:
  10.7 ms per DiT-S/2 layer at 16 rows on 2 cores, 2.3 ms for the stack. In float32
  XLA fuses the pads into one pass (2.8 ms) and the stack would cost two (5.1 ms), so
  QKVProjection uses this only for narrower dtypes on CPU (the same values either way).
  """
  return _qkv_slices(qkv)


def _unstack_qkv_fwd(qkv):
  return _unstack_qkv(qkv), None


def _unstack_qkv_bwd(_, g):
  return (jnp.stack(g, axis=2),)


_unstack_qkv.defvjp(_unstack_qkv_fwd, _unstack_qkv_bwd)


class QKVProjection(nnx.Module):
  """Fused q/k/v projection [B, T, D] -> 3 x [B, T, N, H], optional qk-norm."""

  def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, dtype,
               param_dtype, rngs: nnx.Rngs):
    head_dim = dim // num_heads
    # torch fuses qkv as Linear(D, 3D), rows ordered (3, heads, head_dim);
    # its xavier fan_out is 3D, as here.
    self.proj = Dense(dim, (3, num_heads, head_dim),
                      ('embed', 'qkv', 'heads', 'kv'), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
    if qk_norm:
      self.q_norm = RMSNorm(head_dim, 'kv', param_dtype=param_dtype)
      self.k_norm = RMSNorm(head_dim, 'kv', param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    qkv = self.proj(x)
    names = ('activation_batch', 'activation_length', 'activation_heads',
             'activation_kv')
    split = _unstack_qkv if narrow_on_cpu(qkv) else _qkv_slices
    q, k, v = (constrain(a, names) for a in split(qkv))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

