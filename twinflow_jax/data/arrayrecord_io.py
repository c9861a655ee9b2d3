"""Writing and reading ArrayRecord shards of latent records (schema: `records.py`)."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from array_record.python import array_record_module

from twinflow_jax import errors
from twinflow_jax.data import image_ops
from twinflow_jax.data import records
from twinflow_jax.data import sources

# One record per chunk, so a random access decompresses one example; snappy, because
# zstd (the ArrayRecord default) doubles the read time of incompressible latents.
COMPRESSIONS = ("snappy", "zstd", "uncompressed")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm",
                    ".npy")


def shard_paths(output_prefix: str, num_shards: int) -> list[str]:
  """File names `{prefix}-00000-of-0000N.array_record` of the shards."""
  return [f"{output_prefix}-{i:05d}-of-{num_shards:05d}.array_record"
          for i in range(num_shards)]


def write_examples(output_prefix: str, spec: records.RecordSpec,
                   examples: Iterable[Mapping[str, np.ndarray]], num_examples: int,
                   num_shards: int = 1, compression: str = "snappy") -> list[str]:
  """Streams `num_examples` examples into `num_shards` contiguous shards.

  Args:
    output_prefix: path prefix of the shards (parent folders are created).
    spec: the record schema every example must match.
    examples: iterable of dicts holding the spec's fields (one example each).
    num_examples: how many examples `examples` yields.
    num_shards: number of files; shard k holds examples [k N / S, (k + 1) N / S).
    compression: one of `COMPRESSIONS`.

  Returns:
    The shard paths.
  """
  if compression not in COMPRESSIONS:
    raise ValueError(f"compression={compression!r}; choose one of {COMPRESSIONS}")
  options = f"group_size:1,{compression}"
  if num_examples < 1:
    raise ValueError("nothing to write: num_examples must be >= 1")
  if not 1 <= num_shards <= num_examples:
    raise ValueError(f"num_shards={num_shards} must lie in [1, {num_examples}]")
  paths = shard_paths(output_prefix, num_shards)
  os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
  bounds = [k * num_examples // num_shards for k in range(num_shards + 1)]
  it = iter(examples)
  for k, path in enumerate(paths):
    writer = array_record_module.ArrayRecordWriter(path, options)
    try:
      for i in range(bounds[k], bounds[k + 1]):
        try:
          example = next(it)
        except StopIteration:
          raise ValueError(f"examples ran out after {i} of {num_examples}") from None
        writer.write(spec.encode(example))
    finally:
      writer.close()
  return paths


def write_arrays(output_prefix: str, kind: str, arrays: Mapping[str, np.ndarray],
                 num_shards: int = 1, compression: str = "snappy",
                 float_dtype: str | None = None) -> list[str]:
  """Writes stacked arrays as records of `kind`, one example at a time.

  Args:
    output_prefix: path prefix of the shards.
    kind: 'latents' (arrays 'latent' [N, H, W, C], 'label' [N]) or 't2i' ('latent',
      'txt' [N, L, D], 'txt_mask' [N, L], 'pooled' [N, P]).
    arrays: the stacked fields (memory-mapped arrays are read example by example).
      Stored dtypes follow `records.spec_from_arrays`.
    num_shards: number of output files.
    compression: one of `COMPRESSIONS`.
    float_dtype: store latent / txt / pooled in this dtype ('float32', 'float16',
      'bfloat16'); None keeps theirs.

  Returns:
    The shard paths.
  """
  spec = records.spec_from_arrays(kind, arrays, float_dtype)
  n = len(arrays["latent"])
  lengths = {f.name: len(arrays[f.name]) for f in spec.fields}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"arrays differ in length: {lengths}")
  if kind == "latents" and n and np.min(arrays["label"]) < 0:
    raise ValueError("labels must be >= 0")
  # RecordSpec.encode casts each example to the stored dtypes.
  examples = ({f.name: arrays[f.name][i] for f in spec.fields} for i in range(n))
  return write_examples(output_prefix, spec, examples, n, num_shards, compression)


def read_arrays(paths: str | Sequence[str],
                spec: records.RecordSpec | None = None) -> dict[str, np.ndarray]:
  """Reads every record of the files into stacked arrays (for inspection and tests).

  Args:
    paths: file paths / glob patterns (list or comma-separated string).
    spec: expected schema; None = the schema of the first record.

  Returns:
    dict of arrays [N, ...], one per field, in stored dtypes.
  """
  fields: dict[str, list[np.ndarray]] = {}
  for path in sources.expand_paths(paths):
    for i, record in enumerate(_read_all(path)):
      if spec is None:
        spec = records.read_header(record, f"record 0 of {path}")
      for k, v in spec.decode(record, f"record {i} of {path}").items():
        fields.setdefault(k, []).append(v)
  if not fields:
    raise ValueError(f"no records in {paths}")
  return {k: np.stack(v) for k, v in fields.items()}


def _read_all(path: str) -> list[bytes]:
  """Every record of one file; an unreadable file is a DataError naming it."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      return list(reader.read_all())
    finally:
      reader.close()
  except Exception as e:  # pylint: disable=broad-except  (the library names no file)
    why = errors.one_line(e) if str(e).strip() else "cut short or corrupt"
    raise errors.DataError(f"cannot read ArrayRecord file {path}: {why}") from e


# ----------------------------------------------------------------------------------------
# Image folders: <folder>/<class name>/<image file>, classes in sorted order.


def list_image_folder(folder: str) -> tuple[list[str], list[int], list[str]]:
  """Returns (files, labels, class names) of an image folder, sorted."""
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise errors.PathError(f"{folder!r} is a file; give the image folder "
                           "(<folder>/<class>/<image>)")
  if not os.path.isdir(folder):
    raise errors.PathError(f"image folder {folder!r} does not exist")
  classes = sorted(d for d in os.listdir(folder)
                   if os.path.isdir(os.path.join(folder, d)))
  if not classes:
    raise errors.DataError(f"{folder!r} has no class subfolders (<folder>/<class>/<image>)")
  files, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(folder, name)
    for f in sorted(os.listdir(class_dir)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(class_dir, f))
        labels.append(label)
  if not files:
    raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {folder!r}")
  return files, labels, classes


def load_image(path: str) -> np.ndarray:
  """Decodes one image file to uint8 [H, W, 3].

  .npy arrays and binary PPM / PGM need nothing else; other formats use Pillow
  (optional: `pip install pillow`).
  """
  lower = path.lower()
  if lower.endswith(".npy"):
    image = np.load(path)
  elif lower.endswith((".ppm", ".pgm")):
    image = _read_netpbm(path)
  else:
    try:
      from PIL import Image  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"decoding {path} needs Pillow: pip install pillow") from e
    with Image.open(path) as im:
      image = np.asarray(im.convert("RGB"))
  image = image_ops.to_hwc(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{path}: expected uint8 pixels, got {image.dtype}")
  return image_ops.match_channels(image, 3, path)


def _read_netpbm(path: str) -> np.ndarray:
  """Binary PGM (P5) / PPM (P6) with maxval 255."""
  with open(path, "rb") as f:
    data = f.read()
  tokens, pos = [], 0
  while len(tokens) < 4:
    while data[pos:pos + 1].isspace():
      pos += 1
    if data[pos:pos + 1] == b"#":
      pos = data.index(b"\n", pos) + 1
      continue
    end = pos
    while not data[end:end + 1].isspace():
      end += 1
    tokens.append(data[pos:end])
    pos = end
  magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
  if magic not in (b"P5", b"P6") or maxval != 255:
    raise ValueError(f"{path}: only binary 8-bit PGM (P5) / PPM (P6) is supported")
  channels = 3 if magic == b"P6" else 1
  pixels = np.frombuffer(data, np.uint8, count=width * height * channels, offset=pos + 1)
  return pixels.reshape(height, width, channels)


def image_folder_examples(files: Sequence[str], labels: Sequence[int],
                          image_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields {'latent': uint8 [S, S, 3] (centre crop + resize), 'label'} per file."""
  for path, label in zip(files, labels):
    yield {"latent": image_ops.square_resize_uint8(load_image(path), image_size),
           "label": np.int32(label)}


def write_image_folder(folder: str, output_prefix: str, image_size: int,
                       num_shards: int = 1,
                       compression: str = "snappy") -> tuple[list[str], list[str], int]:
  """Writes an image folder as pixel records (uint8 'latent', int32 'label').

  Also writes `{output_prefix}.classes.txt` (class name of label i on line i).

  Returns:
    (shard paths, class names, number of images written).
  """
  files, labels, classes = list_image_folder(folder)
  spec = records.latents_spec((image_size, image_size, 3), "uint8")
  paths = write_examples(output_prefix, spec,
                         image_folder_examples(files, labels, image_size),
                         len(files), num_shards, compression)
  with open(f"{output_prefix}.classes.txt", "w", encoding="utf-8") as f:
    f.write("\n".join(classes) + "\n")
  return paths, classes, len(files)
