"""Example sources: each maps a batch of example indices to a decoded batch.

Every source is a `Source`: `size` examples addressed by index, and `load`, a picklable
callable taking int64 indices [b] and returning a dict of stacked numpy arrays in the
batch convention ('x' float32 [b, ...], plus 'label' int32 [b] or 'txt', 'txt_mask',
'pooled'). Loading whole batches lets in-memory sources (MNIST, toy points) and
fixed-size latent records decode with a few vectorised numpy operations instead of
Python calls per example; TFDS images, of any size, are decoded one by one.

Every process opens the whole dataset (TFDS and ArrayRecord files are random access, so
this reads nothing up front); the pipeline gives each process its rows of every global
batch, so the global batches do not depend on the number of processes.
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
from array_record.python import array_record_module

from twinflow_jax import errors
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
      raise errors.DataError(f"TFDS feature {self.image_key!r} has dtype {image.dtype}; "
                             "expected uint8 images")
    image = image_ops.square_resize_uint8(image, self.image_size)
    image = image_ops.match_channels(image, self.channels, "TFDS image")
    label = np.int32(example[self.label_key]) if self.label_key else np.int32(0)
    if not 0 <= label < self.num_classes:
      raise errors.DataError(f"TFDS label {label} outside [0, {self.num_classes}); check "
                             "config.data.num_classes")
    return {"x": image_ops.pixels_to_unit_range(image), "label": label}


def _readable(records: Any, index: int) -> bool:
  try:
    records[index]
  except Exception:  # pylint: disable=broad-except
    return False
  return True


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
    try:
      blobs = [self.records[int(i)] for i in indices]
    except Exception as e:  # pylint: disable=broad-except
      bad = next((int(i) for i in indices if not _readable(self.records, int(i))), None)
      where = record_file(self.records, bad) if bad is not None else "ArrayRecord files"
      raise errors.DataError(f"cannot read record {bad} from {where}: "
                             f"{errors.one_line(e)}; the file is corrupt, rewrite it") from e
    try:
      fields = self.spec.decode_batch(blobs, "ArrayRecord record")
    except ValueError as e:
      files = sorted({record_file(self.records, int(i)) for i in indices})
      raise errors.DataError(f"{e} (in {', '.join(files[:3])})") from e
    latent = fields["latent"]
    if latent.dtype == np.uint8:
      x = image_ops.pixels_to_unit_range(latent)
    else:
      x = (latent.astype(np.float32) - np.float32(self.shift)) * np.float32(self.scale)
    if self.spec.kind == "latents":
      label = fields["label"]
      bad = (label < 0) | (label >= self.num_classes)
      if bad.any():
        where = record_file(self.records, int(indices[np.argmax(bad)]))
        raise errors.DataError(f"record label {label[bad][0]} in {where} outside "
                               f"[0, {self.num_classes}); check config.data.num_classes")
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
  """A prepared TFDS dataset split (never downloads), opened whole on every process.

  `process_index` / `process_count` are unused: the pipeline splits each global batch.
  """
  del process_index, process_count
  import tensorflow_datasets as tfds  # Lazy: slow import; the data_source path needs no TF.

  if c.num_classes is not None:  # Else spec.num_classes came from the dataset info.
    _, info_classes = config_lib.tfds_info(c)
    if c.num_classes != info_classes:
      raise errors.ConfigError(f"config.data.num_classes={c.num_classes} but TFDS "
                               f"{c.name!r} has {info_classes} classes")
  try:
    data = tfds.data_source(c.name, split=c.split, data_dir=c.data_dir, download=False)
  except Exception as e:  # tfds raises several types; explain the usual causes.
    _raise_tfds_error(tfds, c, e)
  decode = DecodeTfdsImage(c.image_size, spec.x_shape[-1], c.image_key, c.label_key,
                           spec.num_classes)
  return Source(len(data), RecordLoader(data, decode))


def _raise_tfds_error(tfds, c: ml_collections.ConfigDict, error: Exception):
  builder = tfds.builder(c.name, data_dir=c.data_dir)
  data_dir = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  build = (f"tfds build {c.name} --data_dir={data_dir} --file_format=array_record "
           "(needs TensorFlow and network once, on any machine; then copy the data_dir)")
  if c.name.startswith("imagenet"):
    build += (f"; for {c.name} first put the ILSVRC2012 tar files in "
              f"{data_dir}/downloads/manual")
  if not builder.is_prepared():
    raise errors.PathError(
        f"TFDS dataset {c.name!r} is not prepared in {data_dir}. Prepare it with: "
        f"{build}. Set config.data.data_dir to its data_dir.") from error
  file_format = builder.info.file_format
  if file_format is not None and "array_record" not in str(file_format).lower():
    raise errors.DataError(
        f"TFDS dataset {c.name!r} in {data_dir} is stored as {file_format}, which has no "
        f"random access. Convert it once with: tfds convert_format --root_data_dir="
        f"{data_dir} --out_file_format=array_record, or rebuild it with: {build}"
    ) from error
  raise error


_WRITE_HINT = "write records with `python -m twinflow_jax.data.write_arrayrecord`"


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Expands a comma-separated string or list of paths / glob patterns.

  Patterns are expanded and sorted (folders among the matches are left out); plain paths
  are kept in order (remote paths such as gs://... are passed through unchecked).

  Raises:
    errors.PathError (a FileNotFoundError): a pattern that matches no file, a missing
      local path, or a folder given instead of files.
  """
  if isinstance(paths, str):
    paths = [p.strip() for p in paths.split(",")]
  out = []
  for p in paths:
    if not p:
      continue
    if _GLOB_CHARS & set(p):
      matches = sorted(glob.glob(p))
      files = [m for m in matches if not os.path.isdir(m)]
      if not files:
        what = (f"only folders ({', '.join(matches[:3])})" if matches else "nothing")
        raise errors.PathError(f"config.data.paths pattern {p!r} matches {what}; it must "
                               f"match ArrayRecord files; {_WRITE_HINT}")
      out.extend(files)
    elif "://" in p or os.path.isfile(p):
      out.append(p)
    elif os.path.isdir(p):
      pattern = os.path.join(p, "*.array_record")
      raise errors.PathError(
          f"config.data.paths names the folder {p!r}, not ArrayRecord files; give the "
          f"files or a pattern, e.g. --config.data.paths='{pattern}'")
    else:
      raise errors.PathError(f"ArrayRecord file {p!r} (config.data.paths) does not exist; "
                             f"{_WRITE_HINT}")
  if not out:
    raise errors.PathError("config.data.paths lists no ArrayRecord files")
  return out


def _unreadable_file(path: str) -> str | None:
  """Why one ArrayRecord file cannot be opened, or None if it opens."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
    reader.num_records()
    reader.close()
  except Exception as e:  # pylint: disable=broad-except
    return errors.one_line(e) if str(e).strip() else "cut short or corrupt"
  return None


def open_arrayrecord_files(paths: Sequence[str]) -> Any:
  """`grain.sources.ArrayRecordDataSource` of `paths`; errors name the bad file.

  Raises:
    errors.DataError: a file that is not a readable ArrayRecord file (corrupt, cut
      short, smaller than the 64 KiB minimum, or another format), named with its reason.
  """
  try:
    return grain.sources.ArrayRecordDataSource(list(paths))
  except Exception as e:  # pylint: disable=broad-except
    # The library's message names no file: find the culprit(s) one by one.
    bad = [(p, why) for p in paths if (why := _unreadable_file(p)) is not None]
    if not bad:
      raise
    listed = "; ".join(f"{p}: {why}" for p, why in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    raise errors.DataError(
        f"cannot read ArrayRecord file {listed}{more}. Is it complete and written by "
        f"twinflow_jax.data.write_arrayrecord? Rewrite it or remove it from "
        f"config.data.paths") from e


def record_file(data: Any, index: int) -> str:
  """The file holding record `index` of an ArrayRecord data source (for messages)."""
  try:
    reader_idx, _ = data._reader_idx_and_position(index)  # pylint: disable=protected-access
    return str(data._paths[reader_idx])  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  (private API of array_record)
    return f"one of {len(getattr(data, 'paths', []) or [])} ArrayRecord files"


def arrayrecord_source(c: ml_collections.ConfigDict) -> Source:
  """Precomputed latent records; checks the first record against the config now."""
  spec = config_lib.record_spec(c)
  paths = expand_paths(c.paths)
  # Records made by `python -m twinflow_jax.data.prepare` carry a metadata.json: a config
  # with another latent scale / shift / shape / dtype / kind is refused here.
  with errors.as_config_errors():
    metadata = latent_metadata.find_metadata(paths)
    if metadata is not None:
      latent_metadata.check_data_config(c, metadata)
  data = open_arrayrecord_files(paths)
  if len(data) == 0:
    raise errors.DataError(f"the ArrayRecord files {paths} hold no records")
  # Fail before training starts if the files were written for another config.
  with errors.as_config_errors():
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
