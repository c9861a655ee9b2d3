"""The inputs of `python -m twinflow_jax.data.prepare`: indexed images with a label or
a caption.

Every input is a deterministic, indexed list (sorted files, file order, TFDS index),
so that several processes can split it by index and a rerun sees the same order:
  image folder   <dir>/<class>/**/<image>; labels = index of the class in sorted order
                 (torchvision `ImageFolder`); files sorted within each class.
  labels file    one `<image path>,<int label>` (or tab-separated) per line, paths
                 relative to --image_dir (default: the labels file's folder).
  TFDS           a prepared image dataset read with `tfds.data_source` (no TensorFlow);
                 `label_key` '' makes it unconditional (label 0).
  JSONL          one JSON object per line with an image path and a caption, paths
                 relative to --image_dir (default: the JSONL file's folder).
All problems found while listing are `InputError`s naming the file (and line).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from twinflow_jax.data.prep_images import IMAGE_SUFFIXES


class InputError(ValueError):
  """A user mistake in the inputs; the message names the file / line / value."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: where its image comes from, and its label or caption."""
  index: int
  name: str  # for messages: a path or 'cifar10 train[17]'
  label: int = 0  # TFDS: read with the image (see InputSet.load)
  caption: str | None = None


@dataclasses.dataclass
class InputSet:
  """An indexed list of inputs.

  Attributes:
    kind: 'latents' (class labels) or 't2i' (captions).
    description: JSON-friendly summary stored in the metadata.
    items: the inputs, index i at position i.
    load: Item -> (image source for `prep_images`: a path, bytes or uint8 array;
      label): TFDS labels are read with the image, in the same record read.
    num_classes: class count ('latents'); class_names: their names, if known.
  """
  kind: str
  description: dict[str, Any]
  items: list[Item]
  load: Callable[[Item], Any]
  num_classes: int = 1
  class_names: list[str] | None = None

  def __len__(self) -> int:
    return len(self.items)


def _load_path(item: Item) -> tuple[str, int]:
  return item.name, item.label


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES)


def image_folder(folder: str) -> InputSet:
  """<folder>/<class>/<image> (any depth below the class folder), sorted."""
  if not os.path.isdir(folder):
    raise InputError(f'--image_folder {folder!r} is not a directory')
  classes = sorted(d for d in os.listdir(folder)
                   if os.path.isdir(os.path.join(folder, d)) and not d.startswith('.'))
  if not classes:
    raise InputError(f'--image_folder {folder!r} has no class sub-folders '
                     '(<folder>/<class>/<image>); for unlabelled images use '
                     '--labels_file or --jsonl')
  items = []
  for label, name in enumerate(classes):
    files = []
    for root, dirs, names in os.walk(os.path.join(folder, name)):
      dirs.sort()
      files.extend(os.path.join(root, n) for n in sorted(names) if _is_image(n))
    start = len(items)
    items.extend([Item(start + i, path, label) for i, path in enumerate(files)])
  if not items:
    raise InputError(f'no image files ({", ".join(IMAGE_SUFFIXES)}) under {folder!r}')
  return InputSet('latents', {'type': 'image_folder', 'path': os.path.abspath(folder)},
                  items, _load_path, len(classes), classes)


def labels_file(path: str, image_dir: str | None = None) -> InputSet:
  """Lines `<image path>,<label>` or `<image path>\\t<label>`; '#' starts a comment."""
  if not os.path.isfile(path):
    raise InputError(f'--labels_file {path!r} does not exist')
  root = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
  items = []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip() or line.lstrip().startswith('#'):
        continue
      sep = '\t' if '\t' in line else ','
      name, _, label = line.rpartition(sep)
      try:
        label = int(label)
      except ValueError:
        label = -1
      if not name or label < 0:
        raise InputError(f'{path}:{line_no}: expected "<image path>,<label>" with a '
                         f'label >= 0, got {line!r}')
      items.append(Item(len(items), os.path.join(root, name.strip()), label))
  if not items:
    raise InputError(f'--labels_file {path!r} lists no images')
  return InputSet('latents', {'type': 'labels_file', 'path': os.path.abspath(path),
                              'image_dir': os.path.abspath(root)},
                  items, _load_path, max(i.label for i in items) + 1)


@dataclasses.dataclass(frozen=True, eq=False)
class _TfdsLoader:
  data: Any
  image_key: str
  label_key: str

  def __call__(self, item: Item) -> tuple[Any, int]:
    record = self.data[item.index]
    return record[self.image_key], int(record[self.label_key]) if self.label_key else 0


def tfds_input(name: str, split: str = 'train', data_dir: str | None = None,
               image_key: str = 'image', label_key: str = 'label') -> InputSet:
  """A prepared TFDS image dataset (ArrayRecord format), read by index."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises many types; name the dataset and the fix.
    raise InputError(f'TFDS dataset {name!r} (split {split!r}, data_dir {data_dir!r}) '
                     f'cannot be opened: {e}. Prepare it once with `tfds build {name} '
                     '--file_format=array_record` and pass --tfds_data_dir') from e
  features = tfds.builder(name, data_dir=data_dir).info.features
  if image_key not in features:
    raise InputError(f'TFDS dataset {name!r} has no feature {image_key!r} '
                     f'(features: {list(features.keys())}); set --tfds_image_key')
  num_classes, class_names = 1, None
  if label_key:
    feature = features[label_key] if label_key in features else None
    if feature is None or not hasattr(feature, 'num_classes'):
      raise InputError(f'TFDS dataset {name!r} has no class label {label_key!r} '
                       f'(features: {list(features.keys())}); set --tfds_label_key '
                       "('' for unconditional)")
    num_classes = int(feature.num_classes)
    class_names = list(feature.names) if getattr(feature, 'names', None) else None
  items = [Item(i, f'{name} {split}[{i}]') for i in range(len(data))]
  return InputSet('latents', {'type': 'tfds', 'name': name, 'split': split,
                              'data_dir': data_dir},
                  items, _TfdsLoader(data, image_key, label_key), num_classes, class_names)


def jsonl(path: str, image_dir: str | None = None, image_field: str = 'image',
          caption_field: str = 'caption') -> InputSet:
  """One JSON object per line: {image_field: path, caption_field: text}."""
  if not os.path.isfile(path):
    raise InputError(f'--jsonl {path!r} does not exist')
  root = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
  items = []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{line_no}'
      try:
        row = json.loads(line)
      except ValueError as e:
        raise InputError(f'{where}: not valid JSON ({e})') from e
      if not isinstance(row, dict):
        raise InputError(f'{where}: expected a JSON object, got {type(row).__name__}')
      image = row.get(image_field)
      if not isinstance(image, str) or not image:
        raise InputError(f'{where}: no image path (key {image_field!r}; set '
                         '--jsonl_image_field)')
      caption = row.get(caption_field)
      if not isinstance(caption, str) or not caption.strip():
        raise InputError(f'{where}: caption missing or empty (key {caption_field!r}; '
                         'set --jsonl_caption_field)')
      items.append(Item(len(items), os.path.join(root, image), 0, caption))
  if not items:
    raise InputError(f'--jsonl {path!r} has no lines')
  return InputSet('t2i', {'type': 'jsonl', 'path': os.path.abspath(path),
                          'image_dir': os.path.abspath(root)}, items, _load_path)
