"""The FID InceptionV3 in Flax NNX: the network behind FID, IS and precision/recall.

This is the network of TensorFlow's `inception-2015-12-05` graph (the one the ADM
evaluation suite, TTUR and the original Inception Score use) as pytorch-fid ports it:
`pytorch_fid.inception.fid_inception_v3()` with the weights
`pt_inception-2015-12-05-6726825d.pth`. It is torchvision's `Inception3` with four
differences that matter for the numbers:

  * the classifier has 1008 outputs (the TF graph's classes; 1000 ImageNet classes plus
    8 unused ones) and there is no auxiliary head;
  * in Mixed_5b-5d (A blocks), 6b-6e (C blocks) and 7b (first E block) the pooling
    branch averages a 3x3 window WITHOUT the zero padding (count_include_pad=False,
    as TensorFlow's average pool);
  * in Mixed_7c (second E block) the pooling branch is a 3x3 MAX pool, stride 1,
    padding 1 (a quirk of the TF graph, kept by pytorch-fid);
  * every convolution is bias-free and followed by batch norm with eps 1e-3 (inference:
    running statistics) and ReLU.

Module and parameter names follow the PyTorch state dict (`Conv2d_1a_3x3.conv`,
`Mixed_6b.branch7x7dbl_3.bn`, `fc`, ...), so the weight converter
(`twinflow_jax.models.convert.inception`) is a plain rename + transpose.

Inputs are NHWC float images already scaled to [-1, 1] (see
`twinflow_jax.evaluation.preprocess` for the uint8 -> 299 x 299 pipeline); the network is
fully convolutional up to the global average pool, so any size >= 75 x 75 runs, but FID
is defined at 299 x 299. Outputs (`InceptionOutput`):

  pool             [N, 2048] global average of Mixed_7c: the FID / precision-recall
                   features (the TF graph's `pool_3`).
  logits           [N, 1008] fc(pool) with bias (the TF graph's `softmax/logits`).
  logits_unbiased  [N, 1008] pool @ fc.weight^T without the bias: what the Inception
                   Score uses. The original IS code (openai/improved-gan) and the ADM suite
                   both take the weight of `softmax/logits/MatMul` and apply the softmax
                   to pool_3 @ W, i.e. without the bias, over all 1008 outputs;
                   torch-fidelity's 'logits_unbiased' is the same quantity.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

NUM_CLASSES = 1008
FEATURE_DIM = 2048
MIN_SIZE = 75  # smallest input the stride/pool chain accepts
BN_EPS = 1e-3
Initializer = jax.nn.initializers.Initializer


class InceptionOutput(NamedTuple):
  """Outputs of `InceptionV3.__call__` (see the module docstring)."""
  pool: jax.Array  # [N, 2048]
  logits: jax.Array  # [N, 1008]
  logits_unbiased: jax.Array  # [N, 1008]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def max_pool(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
  """Max pool over H, W of NHWC x; padding never wins (it is -inf)."""
  return jax.lax.reduce_window(
      x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
      ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_exclude_pad(x: jax.Array, window: int = 3, stride: int = 1,
                         pad: int = 1) -> jax.Array:
  """Average pool that divides by the number of real (non-padding) pixels.

  = torch's avg_pool2d(..., count_include_pad=False) = TensorFlow's avg_pool 'SAME'.
  """
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  zero = jnp.array(0, x.dtype)
  total = jax.lax.reduce_window(x, zero, jax.lax.add, dims, strides, padding)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, zero, jax.lax.add, dims, strides, padding)
  return total / count


class BasicConv2d(nnx.Module):
  """Bias-free conv -> batch norm (running stats, eps 1e-3) -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int],
               stride: int = 1, padding: int | tuple[int, int] = 0, *,
               dtype: jnp.dtype, precision: jax.lax.Precision | str | None,
               init: Initializer | None, rngs: nnx.Rngs):
    ph, pw = _pair(padding)
    inits = {} if init is None else dict(kernel_init=init)
    self.conv = nnx.Conv(in_ch, out_ch, _pair(kernel), stride,
                         padding=((ph, ph), (pw, pw)), use_bias=False, dtype=dtype,
                         precision=precision, rngs=rngs, **inits)
    inits = {} if init is None else dict(scale_init=init, bias_init=init)
    self.bn = nnx.BatchNorm(out_ch, use_running_average=True, epsilon=BN_EPS,
                            dtype=dtype, rngs=rngs, **inits)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class FIDInceptionA(nnx.Module):
  """35 x 35 block (Mixed_5b-5d); pool branch: average without padding."""

  def __init__(self, in_ch: int, pool_features: int, **kw):
    self.branch1x1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, **kw)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(in_ch, pool_features, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Grid reduction 35 -> 17 (Mixed_6a), unchanged from torchvision."""

  def __init__(self, in_ch: int, **kw):
    self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
  """17 x 17 block with factorised 7 x 7 convs (Mixed_6b-6e); average w/o padding."""

  def __init__(self, in_ch: int, channels_7x7: int, **kw):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                 self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = conv(bd)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  """Grid reduction 17 -> 8 (Mixed_7a), unchanged from torchvision."""

  def __init__(self, in_ch: int, **kw):
    self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(
        self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
  """8 x 8 block with split 1x3 / 3x1 convs (Mixed_7b, 7c).

  pool='avg': average without padding (FIDInceptionE_1, Mixed_7b);
  pool='max': 3 x 3 max pool, stride 1, padding 1 (FIDInceptionE_2, Mixed_7c).
  """

  def __init__(self, in_ch: int, pool: str, **kw):
    if pool not in ('avg', 'max'):
      raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_ch, 320, 1, **kw)
    self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, **kw)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(in_ch, 192, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = max_pool(x, 3, 1, 1) if self.pool == 'max' else avg_pool_exclude_pad(x)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3 (TF inception-2015-12-05), NHWC.

  Attributes mirror the PyTorch module names. Parameters are float32; `dtype` is the
  compute dtype (keep float32 for metrics that are compared with published numbers).
  `precision` is passed to every convolution; the default 'highest' keeps float32
  accumulation on accelerators whose default matmul precision is lower (TPU bf16
  passes, TF32 on GPUs), at a speed cost there; it changes nothing on CPU.
  The network is never trained here: build it with `load_inception`
  (`twinflow_jax.models.convert.inception`), which starts from `abstract_inception`
  (`init=shape_only_init`, nothing allocated) and fills in converted weights. `init`
  None uses flax's default initializers (slow on CPU for 24M parameters).
  """

  def __init__(self, *, num_classes: int = NUM_CLASSES, dtype: jnp.dtype = jnp.float32,
               precision: jax.lax.Precision | str | None = 'highest',
               init: Initializer | None = None, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, precision=precision, init=init, rngs=rngs)
    self.dtype = dtype
    self.precision = precision
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = FIDInceptionA(192, pool_features=32, **kw)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64, **kw)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128, **kw)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160, **kw)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160, **kw)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = FIDInceptionE(1280, pool='avg', **kw)
    self.Mixed_7c = FIDInceptionE(2048, pool='max', **kw)
    inits = {} if init is None else dict(kernel_init=init, bias_init=init)
    self.fc = nnx.Linear(FEATURE_DIM, num_classes, dtype=dtype, precision=precision,
                         rngs=rngs, **inits)

  def features(self, x: jax.Array) -> jax.Array:
    """[N, H, W, 3] in [-1, 1] (H, W >= 75; FID: 299) -> pool features [N, 2048]."""
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'InceptionV3 expects NHWC RGB images [N, H, W, 3], got shape '
                       f'{x.shape}')
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f'InceptionV3 needs images of at least {MIN_SIZE} x {MIN_SIZE} '
                       f'pixels, got {x.shape[1]} x {x.shape[2]}; resize first '
                       '(twinflow_jax.evaluation.preprocess)')
    x = x.astype(self.dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, 3, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                  self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                  self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def __call__(self, x: jax.Array) -> InceptionOutput:
    """[N, H, W, 3] in [-1, 1] -> InceptionOutput(pool, logits, logits_unbiased)."""
    pool = self.features(x)
    w = self.fc.kernel[...].astype(jnp.float32)
    unbiased = jnp.dot(pool, w, precision=self.precision)
    return InceptionOutput(pool, unbiased + self.fc.bias[...].astype(jnp.float32),
                           unbiased)


def shape_only_init(key: jax.Array, shape: tuple[int, ...],
                    dtype: jnp.dtype = jnp.float32) -> jax.ShapeDtypeStruct:
  """An initializer that allocates nothing (for load targets)."""
  del key
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def abstract_inception(**kwargs) -> InceptionV3:
  """An `InceptionV3` whose weights are ShapeDtypeStructs: the target of a load.

  Much faster than `nnx.eval_shape` of the constructor (no tracing of ~470 variables);
  batch-norm statistics are small zero arrays. Keyword arguments go to `InceptionV3`.
  """
  return InceptionV3(init=shape_only_init, rngs=nnx.Rngs(0), **kwargs)
