"""The `config.data` section: fields, defaults, validation and the example spec."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from twinflow_jax import errors
from twinflow_jax.data import records
from twinflow_jax.data import toy2d

SOURCES = ("mnist", "toy2d", "tfds", "arrayrecord_latents", "arrayrecord_t2i")
MNIST_NUM_CLASSES = 10


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.data` section with every field at its default.

  Fields (default in brackets):
    source ['mnist']: where examples come from. 'mnist': the 5000 MNIST digits bundled
      in the package (no network). 'toy2d': a 2-D distribution generated in code.
      'tfds': a prepared TFDS image dataset read with `tfds.data_source` (ArrayRecord
      format). 'arrayrecord_latents' / 'arrayrecord_t2i': precomputed latents written
      by `python -m twinflow_jax.data.write_arrayrecord` (schema: `records.py`).
    name ['']: TFDS dataset name for 'tfds' (e.g. 'cifar10', 'imagenet2012'); the
      distribution for 'toy2d' ('gaussians8', 'checkerboard', 'moons').
    split ['train']: TFDS split string (e.g. 'train[:90%]'); every process opens all of
      it and reads its rows of each global batch.
    data_dir [None]: TFDS data directory; None = TFDS default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    image_key ['image'], label_key ['label']: TFDS feature names; label_key '' reads
      the dataset as unconditional (label 0, num_classes 1).
    paths [None]: ArrayRecord files: a list of paths / glob patterns, or one string of
      comma-separated paths / patterns (on the command line:
      --config.data.paths='/data/train-*.array_record').
    image_size [32]: side of the square images of 'mnist' and 'tfds'. MNIST digits
      (28 x 28) are zero-padded to 32 x 32, then resized if image_size != 32; TFDS images
      are centre-cropped to a square and resized (antialiased bilinear).
    channels [None]: channels of 'mnist' / 'tfds' images; None = the data's own (MNIST 1,
      TFDS from the dataset info). Grey images are tiled when 3 is asked for.
    num_classes [None]: number of classes; None = the data's own (MNIST 10, TFDS from the
      dataset info, toy2d 1). Required for 'arrayrecord_latents'. The null class used by
      label dropout has id `num_classes`, so class embeddings need num_classes + 1 rows.
    label_dropout [0.1]: probability of replacing an example's label by the null class
      (classifier-free guidance training). For 'arrayrecord_t2i' it replaces the text by
      the null text: zero embeddings, all-False mask, zero pooled vector.
    hflip [False]: random horizontal flip (probability 1/2) of images or latents.
    latent_shape [None]: [H, W, C] of the ArrayRecord latents, e.g. (32, 32, 4).
    latent_dtype ['float32']: stored latent dtype: 'float32', 'float16', 'bfloat16', or
      'uint8' for pixel records (then scaled to [-1, 1] like images).
    latent_scale [1.0], latent_shift [0.0]: the model sees
      x = (latent - latent_shift) * latent_scale (e.g. SD-VAE: scale 0.18215; SD3 VAE:
      shift 0.0609, scale 1.5305). Must stay 1 / 0 for uint8 pixel records.
    txt_len, txt_dim, pooled_dim [None]: text-to-image record shapes: txt [txt_len,
      txt_dim], txt_mask [txt_len], pooled [pooled_dim]; required for 'arrayrecord_t2i'.
    txt_dtype ['float32']: stored dtype of txt and pooled ('float32', 'float16', 'bfloat16').
    toy2d_size [1048576]: number of toy points drawn once (with toy2d_seed [0]) and then
      shuffled and repeated like any finite dataset.
    shuffle [True]: shuffle examples (a new permutation every epoch).
    shuffle_seed [None]: seed of the shuffle and of the random augmentations; None = the
      `seed` argument of `create_train_iterator`.
    num_epochs [None]: epochs to read; None = repeat forever.
    worker_count [0]: Grain worker processes (`mp_prefetch`); 0 = read in this process.
      Batches do not depend on it, but a checkpointed iterator state does: resume with
      the same worker_count.
    worker_buffer_size [2]: batches each worker prepares ahead.
    read_threads [4], prefetch_buffer_size [8]: Grain read threads and the number of
      batches they prepare ahead (per process, or per worker with worker_count > 0).
  """
  # Fields without a default are typed placeholders (None until set), so that the command
  # line can set them: --config.data.num_classes=1000.
  return ml_collections.ConfigDict({
      "source": "mnist",
      "name": "",
      "split": "train",
      "data_dir": config_dict.placeholder(str),
      "image_key": "image",
      "label_key": "label",
      "paths": config_dict.placeholder(object),
      "image_size": 32,
      "channels": config_dict.placeholder(int),
      "num_classes": config_dict.placeholder(int),
      "label_dropout": 0.1,
      "hflip": False,
      "latent_shape": config_dict.placeholder(tuple),
      "latent_dtype": "float32",
      "latent_scale": 1.0,
      "latent_shift": 0.0,
      "txt_len": config_dict.placeholder(int),
      "txt_dim": config_dict.placeholder(int),
      "pooled_dim": config_dict.placeholder(int),
      "txt_dtype": "float32",
      "toy2d_size": 2**20,
      "toy2d_seed": 0,
      "shuffle": True,
      "shuffle_seed": config_dict.placeholder(int),
      "num_epochs": config_dict.placeholder(int),
      "worker_count": 0,
      "worker_buffer_size": 2,
      "read_threads": 4,
      "prefetch_buffer_size": 8,
  })


def validate_config(data_config: ml_collections.ConfigDict | dict[str, Any]) -> None:
  """Checks field names and values of a `config.data` section.

  Raises:
    errors.ConfigError (a ValueError): naming the first unknown field or invalid value.
  """
  known = default_config()
  unknown = sorted(set(data_config.keys()) - set(known.keys()))
  if unknown:
    raise errors.ConfigError(f"unknown config.data fields {unknown}; known: "
                             f"{sorted(known.keys())}")
  c = resolve_config(data_config)
  if c.source not in SOURCES:
    raise errors.ConfigError(f"config.data.source={c.source!r}; choose one of {SOURCES}")
  if not 0.0 <= c.label_dropout <= 1.0:
    raise errors.ConfigError(
        f"config.data.label_dropout={c.label_dropout} must lie in [0, 1]")
  if c.image_size < 1:
    raise errors.ConfigError(f"config.data.image_size={c.image_size} must be positive")
  if c.channels is not None and c.channels not in (1, 3):
    raise errors.ConfigError(f"config.data.channels={c.channels} must be None, 1 or 3")
  if c.num_classes is not None and c.num_classes < 1:
    raise errors.ConfigError(f"config.data.num_classes={c.num_classes} must be >= 1")
  if (c.worker_count < 0 or c.worker_buffer_size < 1 or c.read_threads < 1
      or c.prefetch_buffer_size < 1):
    raise errors.ConfigError("config.data.worker_count must be >= 0; worker_buffer_size, "
                             "read_threads and prefetch_buffer_size >= 1")
  if c.num_epochs is not None and c.num_epochs < 1:
    raise errors.ConfigError(
        f"config.data.num_epochs={c.num_epochs} must be None or >= 1")
  if c.source == "toy2d":
    if c.name not in toy2d.TOY2D_NAMES:
      raise errors.ConfigError(f"config.data.name={c.name!r} for source 'toy2d'; choose "
                               f"one of {toy2d.TOY2D_NAMES}")
    if c.hflip:
      raise errors.ConfigError("config.data.hflip is for images; set it False for 'toy2d'")
    if c.num_classes not in (None, 1):
      raise errors.ConfigError("toy2d data is unconditional: config.data.num_classes must "
                               f"be None or 1, got {c.num_classes}")
    if c.toy2d_size < 1:
      raise errors.ConfigError(f"config.data.toy2d_size={c.toy2d_size} must be >= 1")
  if c.source == "mnist" and c.num_classes not in (None, MNIST_NUM_CLASSES):
    raise errors.ConfigError(
        f"MNIST has 10 classes; config.data.num_classes={c.num_classes}")
  if c.source == "tfds" and not c.name:
    raise errors.ConfigError("config.data.name must name the TFDS dataset (e.g. 'cifar10')")
  if c.source.startswith("arrayrecord"):
    if not c.paths:
      raise errors.ConfigError(
          f"config.data.paths must list the ArrayRecord files of {c.source!r}, e.g. "
          "--config.data.paths='/data/train-*.array_record'")
    if not (isinstance(c.paths, str) or (isinstance(c.paths, (list, tuple)) and all(
        isinstance(p, str) for p in c.paths))):
      raise errors.ConfigError(
          f"config.data.paths must be a string of comma-separated paths / patterns or a "
          f"list of them, got {c.paths!r}")
    if c.source == "arrayrecord_latents" and c.num_classes is None:
      raise errors.ConfigError(
          "config.data.num_classes must be set for 'arrayrecord_latents'")
    record_spec(c)  # Shape / dtype fields.
    if c.latent_dtype == "uint8" and (c.latent_scale, c.latent_shift) != (1.0, 0.0):
      raise errors.ConfigError("uint8 records hold pixels, mapped to [-1, 1]: leave "
                               "config.data.latent_scale / latent_shift at 1.0 / 0.0")


def resolve_config(data_config) -> ml_collections.ConfigDict:
  """A copy of the defaults updated with the given fields (call validate_config first)."""
  c = default_config()
  with c.unlocked():
    for k, v in dict(data_config).items():
      try:
        c[k] = v
      except TypeError as e:  # a value of another type than the field's placeholder
        raise errors.ConfigError(f"config.data.{k}={v!r}: {e}") from e
  return c


def record_spec(c: ml_collections.ConfigDict) -> records.RecordSpec:
  """The ArrayRecord schema that an 'arrayrecord_*' config expects."""
  if c.source == "arrayrecord_latents":
    with errors.as_config_errors():
      return records.latents_spec(c.latent_shape, c.latent_dtype)
  if c.source == "arrayrecord_t2i":
    for f in ("txt_len", "txt_dim", "pooled_dim"):
      if c[f] is None:
        raise errors.ConfigError(f"config.data.{f} must be set for 'arrayrecord_t2i'")
    with errors.as_config_errors():
      return records.t2i_spec(c.latent_shape, c.txt_len, c.txt_dim, c.pooled_dim,
                              c.latent_dtype, c.txt_dtype)
  raise errors.ConfigError(f"source {c.source!r} has no ArrayRecord schema")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What one example looks like, known before any data is read.

  Attributes:
    x_shape: per-example shape of 'x': [H, W, C] (NHWC images / latents) or [2] (toy).
    num_classes: class count, without the null class (id num_classes); 0 for text.
    conditioning: 'class' (batches carry 'label') or 'text' ('txt', 'txt_mask', 'pooled').
    txt_shape: [L, D] of 'txt' for text conditioning, else None.
    pooled_dim: P of 'pooled' for text conditioning, else None.
  """
  x_shape: tuple[int, ...]
  num_classes: int
  conditioning: str
  txt_shape: tuple[int, int] | None = None
  pooled_dim: int | None = None

  def batch_struct(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch of `batch_size` examples (keys as in batches)."""
    out = {"x": jax.ShapeDtypeStruct((batch_size, *self.x_shape), np.float32)}
    if self.conditioning == "class":
      out["label"] = jax.ShapeDtypeStruct((batch_size,), np.int32)
    else:
      out["txt"] = jax.ShapeDtypeStruct((batch_size, *self.txt_shape), np.float32)
      out["txt_mask"] = jax.ShapeDtypeStruct((batch_size, self.txt_shape[0]), np.bool_)
      out["pooled"] = jax.ShapeDtypeStruct((batch_size, self.pooled_dim), np.float32)
    return out


def get_data_spec(data_config) -> DataSpec:
  """Returns the example shape and conditioning of a `config.data` section.

  Reads no examples. For 'tfds' with `channels` or `num_classes` left at None it reads
  the dataset info (metadata only) through `tfds.builder`.
  """
  validate_config(data_config)
  c = resolve_config(data_config)
  if c.source == "toy2d":
    return DataSpec((2,), 1, "class")
  if c.source == "mnist":
    return DataSpec((c.image_size, c.image_size, c.channels or 1), MNIST_NUM_CLASSES, "class")
  if c.source == "tfds":
    channels, num_classes = c.channels, c.num_classes
    if channels is None or num_classes is None:
      info_channels, info_classes = tfds_info(c)
      channels = channels or info_channels
      num_classes = num_classes or info_classes
    return DataSpec((c.image_size, c.image_size, channels), num_classes, "class")
  spec = record_spec(c)
  latent_shape = spec.fields[0].shape
  if c.source == "arrayrecord_latents":
    return DataSpec(latent_shape, c.num_classes, "class")
  return DataSpec(latent_shape, 0, "text", (c.txt_len, c.txt_dim), c.pooled_dim)


def tfds_info(c: ml_collections.ConfigDict) -> tuple[int, int]:
  """(channels, num_classes) of a TFDS image dataset, from its metadata."""
  import tensorflow_datasets as tfds  # Lazy: slow import; never pulls TensorFlow here.

  features = tfds.builder(c.name, data_dir=c.data_dir).info.features
  if c.image_key not in features:
    raise errors.ConfigError(f"TFDS dataset {c.name!r} has no feature {c.image_key!r} "
                     f"(features: {list(features.keys())}); set config.data.image_key")
  shape = features[c.image_key].shape
  channels = shape[-1] if len(shape) == 3 and shape[-1] else 3
  if not c.label_key:
    return channels, 1
  if c.label_key not in features or not hasattr(features[c.label_key], "num_classes"):
    raise errors.ConfigError(f"TFDS dataset {c.name!r} has no class label {c.label_key!r} "
                     f"(features: {list(features.keys())}); set config.data.label_key "
                     "('' for unconditional)")
  return channels, int(features[c.label_key].num_classes)
