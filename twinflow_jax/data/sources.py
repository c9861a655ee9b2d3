"""Example sources: each maps a batch of example indices to a decoded batch.

Every source is a `Source`: `size` examples addressed by index, and `load`, a picklable
callable taking int64 indices [b] and returning a dict of stacked numpy arrays in the
batch convention ('x' float32 [b, ...], plus 'label' int32 [b] or 'txt', 'txt_mask',
'pooled'). Loading whole batches lets in-memory sources (MNIST, toy points) and
fixed-size latent records decode with a few vectorised numpy operations instead of
Python calls per example; TFDS images, of any size, are decoded one by one.

Per-process sharding: TFDS shards at the source (`tfds.split_for_jax_process`); the
others are sharded by the pipeline (`Source.sharded` False).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.resources
import os
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np

from twinflow_jax.data import config as config_lib
from twinflow_jax.data import image_ops
from twinflow_jax.data import latent_metadata
from twinflow_jax.data import records
from twinflow_jax.data import toy2d

MNIST_ASSET = "mnist5k.npz"
_GLOB_CHARS = frozenset("*?[")


@dataclasses.dataclass(frozen=True)
class Source:
  """Indexed examples and their batch loader.

  Attributes:
    size: number of examples (of this process if `sharded`).
    load: picklable callable, int64 indices [b] in [0, size) -> dict of arrays [b, ...].
    sharded: True if the source already holds only this process's shard.
  """
  size: int
  load: Callable[[np.ndarray], dict[str, np.ndarray]]
  sharded: bool = False


# ----------------------------------------------------------------------------------------
# Batch loaders (module-level dataclasses: picklable for worker processes).


@dataclasses.dataclass(frozen=True, eq=False)
class MnistLoader:
  """uint8 digits [N, 28, 28] -> 'x' [b, S, S, C] in [-1, 1] (pad to 32, then resize)."""
  images: np.ndarray
  labels: np.ndarray
  image_size: int
  channels: int

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images = image_ops.pad_to(self.images[indices][..., None], 32)
    if self.image_size != 32:
      images = image_ops.resize(images, self.image_size, self.image_size)
    images = image_ops.match_channels(images, self.channels, "MNIST image")
    return {"x": image_ops.pixels_to_unit_range(images),
            "label": self.labels[indices].astype(np.int32)}


@dataclasses.dataclass(frozen=True, eq=False)
class Toy2dLoader:
  """Toy points [N, 2] -> 'x' [b, 2] and label 0 (unconditional)."""
  points: np.ndarray

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": self.points[indices], "label": np.zeros(len(indices), np.int32)}


@dataclasses.dataclass(frozen=True, eq=False)
class RecordLoader:
  """Reads and decodes records one by one, then stacks them.

  Attributes:
    records: random-access records (`__len__`, `__getitem__`).
    decode: picklable callable, one record -> dict of arrays (one example).
  """
  records: Any
  decode: Callable[[Any], dict[str, np.ndarray]]

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    examples = [self.decode(self.records[int(i)]) for i in indices]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------------------
# Per-record decoders.


@dataclasses.dataclass(frozen=True)
class DecodeTfdsImage:
  """TFDS example -> 'x' [S, S, C] in [-1, 1] (centre crop, resize) and 'label'."""
  image_size: int
  channels: int
  image_key: str
  label_key: str
  num_classes: int

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = image_ops.to_hwc(example[self.image_key])
    if image.dtype != np.uint8:
      raise ValueError(f"TFDS feature {self.image_key!r} has dtype {image.dtype}; "
                       "expected uint8 images")
    image = image_ops.square_resize_uint8(image, self.image_size)
    image = image_ops.match_channels(image, self.channels, "TFDS image")
    label = np.int32(example[self.label_key]) if self.label_key else np.int32(0)
    if not 0 <= label < self.num_classes:
      raise ValueError(f"TFDS label {label} outside [0, {self.num_classes}); check "
                       "config.data.num_classes")
    return {"x": image_ops.pixels_to_unit_range(image), "label": label}


@dataclasses.dataclass(frozen=True, eq=False)
class LatentRecordLoader:
  """ArrayRecord records -> 'x' (scaled latents or [-1, 1] pixels) and conditions.

  Attributes:
    records: Grain ArrayRecord data source of `records.py` records.
    spec: the schema the config expects.
    scale, shift: x = (latent - shift) * scale for float latents.
    num_classes: label range check of class-conditional records.
  """
  records: Any
  spec: records.RecordSpec
  scale: float
  shift: float
  num_classes: int | None

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    # Per-record reads: on few cores they beat __getitems__, which starts a thread
    # pool on every call.
    fields = self.spec.decode_batch([self.records[int(i)] for i in indices],
                                    "ArrayRecord record")
    latent = fields["latent"]
    if latent.dtype == np.uint8:
      x = image_ops.pixels_to_unit_range(latent)
    else:
      x = (latent.astype(np.float32) - np.float32(self.shift)) * np.float32(self.scale)
    if self.spec.kind == "latents":
      label = fields["label"]
      bad = (label < 0) | (label >= self.num_classes)
      if bad.any():
        raise ValueError(f"record label {label[bad][0]} outside [0, {self.num_classes}); "
                         "check config.data.num_classes")
      return {"x": x, "label": label.astype(np.int32)}
    return {"x": x,
            "txt": fields["txt"].astype(np.float32),
            "txt_mask": fields["txt_mask"].copy(),
            "pooled": fields["pooled"].astype(np.float32)}


# ----------------------------------------------------------------------------------------
# Source constructors.


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """The bundled digits: uint8 images [5000, 28, 28] and uint8 labels [5000]."""
  path = importlib.resources.files("twinflow_jax.data") / "assets" / MNIST_ASSET
  if not path.is_file():
    raise FileNotFoundError(
        f"bundled MNIST file {path} is missing; reinstall twinflow_jax (it ships as "
        "package data, see twinflow_jax/data/assets/README.md)")
  with path.open("rb") as f, np.load(f) as data:
    return data["images"], data["labels"]


def mnist_source(c: ml_collections.ConfigDict) -> Source:
  images, labels = load_mnist()
  return Source(len(images), MnistLoader(images, labels, c.image_size, c.channels or 1))


def toy2d_source(c: ml_collections.ConfigDict) -> Source:
  points = toy2d.sample_toy2d(c.name, c.toy2d_size, np.random.default_rng(c.toy2d_seed))
  return Source(len(points), Toy2dLoader(points))


def tfds_source(c: ml_collections.ConfigDict, spec: config_lib.DataSpec,
                process_index: int, process_count: int) -> Source:
  """This process's shard of a prepared TFDS dataset (never downloads)."""
  import tensorflow_datasets as tfds  # Lazy: slow import; the data_source path needs no TF.

  if c.num_classes is not None:  # Else spec.num_classes came from the dataset info.
    _, info_classes = config_lib.tfds_info(c)
    if c.num_classes != info_classes:
      raise ValueError(f"config.data.num_classes={c.num_classes} but TFDS {c.name!r} "
                       f"has {info_classes} classes")
  split = tfds.split_for_jax_process(c.split, process_index=process_index,
                                     process_count=process_count, drop_remainder=True)
  try:
    data = tfds.data_source(c.name, split=split, data_dir=c.data_dir, download=False)
  except Exception as e:  # tfds raises several types; explain the usual causes.
    _raise_tfds_error(tfds, c, e)
  decode = DecodeTfdsImage(c.image_size, spec.x_shape[-1], c.image_key, c.label_key,
                           spec.num_classes)
  return Source(len(data), RecordLoader(data, decode), sharded=True)


def _raise_tfds_error(tfds, c: ml_collections.ConfigDict, error: Exception):
  builder = tfds.builder(c.name, data_dir=c.data_dir)
  data_dir = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  build = (f"tfds build {c.name} --data_dir={data_dir} --file_format=array_record "
           "(needs TensorFlow and network once, on any machine; then copy the data_dir)")
  if c.name.startswith("imagenet"):
    build += (f"; for {c.name} first put the ILSVRC2012 tar files in "
              f"{data_dir}/downloads/manual")
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {c.name!r} is not prepared in {data_dir}. Prepare it with: "
        f"{build}. Set config.data.data_dir to its data_dir.") from error
  file_format = builder.info.file_format
  if file_format is not None and "array_record" not in str(file_format).lower():
    raise ValueError(
        f"TFDS dataset {c.name!r} in {data_dir} is stored as {file_format}, which has no "
        f"random access. Convert it once with: tfds convert_format --root_data_dir="
        f"{data_dir} --out_file_format=array_record, or rebuild it with: {build}"
    ) from error
  raise error


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Expands a comma-separated string or list of paths / glob patterns.

  Patterns are expanded and sorted; plain paths are kept in order (remote paths such
  as gs://... are passed through unchecked).

  Raises:
    FileNotFoundError: when a pattern matches nothing or a local path is missing.
  """
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",")]
  out = []
  for p in paths:
    if not p:
      continue
    if _GLOB_CHARS & set(p):
      matches = sorted(glob.glob(p))
      if not matches:
        raise FileNotFoundError(f"no ArrayRecord file matches {p!r}; write records with "
                                "`python -m twinflow_jax.data.write_arrayrecord`")
      out.extend(matches)
    elif "://" in p or os.path.isfile(p):
      out.append(p)
    else:
      raise FileNotFoundError(f"ArrayRecord file {p!r} does not exist; write records with "
                              "`python -m twinflow_jax.data.write_arrayrecord`")
  if not out:
    raise FileNotFoundError("config.data.paths lists no ArrayRecord files")
  return out


def arrayrecord_source(c: ml_collections.ConfigDict) -> Source:
  """Precomputed latent records; checks the first record against the config now."""
  spec = config_lib.record_spec(c)
  paths = expand_paths(c.paths)
  # Records made by `python -m twinflow_jax.data.prepare` carry a metadata.json: a config
  # with another latent scale / shift / shape / dtype / kind is refused here.
  metadata = latent_metadata.find_metadata(paths)
  if metadata is not None:
    latent_metadata.check_data_config(c, metadata)
  data = grain.sources.ArrayRecordDataSource(paths)
  if len(data) == 0:
    raise ValueError(f"the ArrayRecord files {paths} hold no records")
  # Fail before training starts if the files were written for another config.
  spec.decode(data[0], f"record 0 of {paths[0]}")
  return Source(len(data), LatentRecordLoader(
      data, spec, float(c.latent_scale), float(c.latent_shift), c.num_classes))


def open_source(c: ml_collections.ConfigDict, spec: config_lib.DataSpec,
                process_index: int, process_count: int) -> Source:
  """Builds the source a validated `config.data` section (with its spec) asks for."""
  if c.source == "mnist":
    return mnist_source(c)
  if c.source == "toy2d":
    return toy2d_source(c)
  if c.source == "tfds":
    return tfds_source(c, spec, process_index, process_count)
  return arrayrecord_source(c)
