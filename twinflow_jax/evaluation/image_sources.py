"""Image sets for reference statistics: arrays, .npy / .npz files, folders, data configs.

Every source is sliceable in order (`images[lo:hi]` -> uint8 [n, H, W, C], C in {1, 3})
with `len()` and `.shape`, which is what `ActivationExtractor` reads.

  .npy          memory-mapped; uint8 pixels or float samples in [-1, 1] (floor-quantised
                as ADM saves samples), NHWC, NCHW or [N, H, W].
  .npz          streamed member by member (ADM sample / reference batches are several GB):
                key `--key`, else the first of arr_0, images, samples, x.
  folder        every image file below it (recursive, sorted by path), decoded with Pillow
                (.npy / .ppm / .pgm without); all images must have one size.
  data config   a project config file (`get_config()`); its `config.data` pixel source
                (mnist, tfds, uint8 arrayrecord) exactly as the trainer sees it, i.e. at
                the training resolution, mapped back from [-1, 1] to uint8 by rounding.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from typing import Any

import numpy as np

from twinflow_jax.evaluation.preprocess import as_uint8_nhwc

NPZ_KEYS = ('arr_0', 'images', 'samples', 'x')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.pgm', '.npy')


class ArrayImages:
  """In-memory or memory-mapped array of images."""

  def __init__(self, array: np.ndarray, what: str = 'images'):
    self.array, self.what = array, what
    one = as_uint8_nhwc(np.zeros((1,) + tuple(array.shape[1:]), np.uint8), what)
    self.shape = (len(array),) + one.shape[1:]

  def __len__(self) -> int:
    return len(self.array)

  def __getitem__(self, s: slice) -> np.ndarray:
    return as_uint8_nhwc(np.asarray(self.array[s]), self.what)


class NpzMemberImages:
  """One array member of an .npz, read sequentially without loading it whole."""

  def __init__(self, path: str, key: str | None = None):
    self.path = path
    self._zip = self._file = None   # before anything can raise: __del__ closes them
    try:
      with zipfile.ZipFile(path) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith('.npy')]
    except zipfile.BadZipFile as e:
      raise ValueError(f'{path}: not an .npz file ({e})') from e
    if key is None:
      key = next((k for k in NPZ_KEYS if k in names), None)
      if key is None:
        raise ValueError(f'{path}: no image array among its keys {names}; expected one '
                         f'of {NPZ_KEYS} (or pass --key)')
    elif key not in names:
      raise ValueError(f'{path}: has no key {key!r}; keys: {names}')
    self.key = key
    self._open()
    if len(self._shape) not in (3, 4):
      raise ValueError(f'{path}[{key}]: expected images [N, H, W(, C)], got shape '
                       f'{self._shape}')
    self.shape = (self._shape[0],) + as_uint8_nhwc(
        np.zeros((1,) + self._shape[1:], np.uint8), f'{path}[{key}]').shape[1:]

  def close(self) -> None:
    for f in (self._file, self._zip):
      if f is not None:
        f.close()
    self._zip = self._file = None

  def __del__(self):
    self.close()

  def _open(self) -> None:
    self.close()
    self._zip = zipfile.ZipFile(self.path)
    self._file = self._zip.open(self.key + '.npy')
    version = np.lib.format.read_magic(self._file)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._file)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._file)
    else:
      raise ValueError(f'{self.path}[{self.key}]: .npy format version {version} is not '
                       'supported (1.0 or 2.0)')
    if fortran or dtype.hasobject:
      raise ValueError(f'{self.path}[{self.key}]: Fortran-order or object arrays are not '
                       'supported; save a C-order numeric array')
    self._shape, self._dtype = tuple(shape), dtype
    self._row = int(np.prod(shape[1:])) * dtype.itemsize
    self._pos = 0

  def __len__(self) -> int:
    return self._shape[0]

  def __getitem__(self, s: slice) -> np.ndarray:
    lo, hi, _ = s.indices(len(self))
    if lo < self._pos:
      self._open()
    if lo > self._pos:
      self._file.read((lo - self._pos) * self._row)
    data = self._file.read((hi - lo) * self._row)
    if len(data) != (hi - lo) * self._row:
      raise ValueError(f'{self.path}[{self.key}]: file ends early (truncated?)')
    self._pos = hi
    a = np.frombuffer(data, self._dtype).reshape((hi - lo,) + self._shape[1:])
    return as_uint8_nhwc(a, f'{self.path}[{self.key}]')


class FolderImages:
  """All image files below a folder (recursive, sorted); one image size."""

  def __init__(self, folder: str):
    files = []
    for root, dirs, names in os.walk(folder):
      dirs.sort()
      files += [os.path.join(root, n) for n in sorted(names)
                if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
      raise ValueError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) below {folder!r}')
    self.files = files
    first = self._load(files[0])
    self.shape = (len(files),) + first.shape

  @staticmethod
  def _load(path: str) -> np.ndarray:
    from twinflow_jax.data.arrayrecord_io import load_image  # pylint: disable=g-import-not-at-top
    return load_image(path)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, s: slice) -> np.ndarray:
    out = []
    for path in self.files[s]:
      image = self._load(path)
      if image.shape != self.shape[1:]:
        raise ValueError(f'{path} is {image.shape[1]}x{image.shape[0]}, the first image '
                         f'{self.shape[2]}x{self.shape[1]}: all images must have one size '
                         '(resize them first)')
      out.append(image)
    return np.stack(out) if out else np.zeros((0,) + self.shape[1:], np.uint8)


def load_config_file(path: str) -> Any:
  """Runs a project config file and returns its `get_config()`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  spec = importlib.util.spec_from_file_location('_fid_stats_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'{path} defines no get_config()')
  return module.get_config()


class DataConfigImages:
  """The pixel images a `config.data` section feeds the trainer (this process's share)."""

  def __init__(self, config_path: str, process_index: int = 0, process_count: int = 1):
    from twinflow_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
    from twinflow_jax.data import sources  # pylint: disable=g-import-not-at-top
    cfg = load_config_file(config_path)
    if 'data' not in cfg:
      raise ValueError(f'{config_path}: the config has no data section')
    spec = data_config.get_data_spec(cfg.data)
    c = data_config.resolve_config(cfg.data)
    if len(spec.x_shape) != 3 or spec.x_shape[-1] not in (1, 3) or (
        c.source.startswith('arrayrecord') and c.latent_dtype != 'uint8'):
      raise ValueError(f'{config_path}: config.data.source={c.source!r} gives '
                       f'{spec.x_shape} {"latents" if len(spec.x_shape) == 3 else "points"}'
                       ', not pixel images; Inception statistics need images (decode '
                       'latents to pixels first and pass them with --images)')
    self.source = sources.open_source(c, spec, process_index, process_count)
    self.shape = (self.source.size,) + tuple(spec.x_shape)

  def __len__(self) -> int:
    return self.source.size

  def __getitem__(self, s: slice) -> np.ndarray:
    lo, hi, _ = s.indices(len(self))
    if hi <= lo:
      return np.zeros((0,) + self.shape[1:], np.uint8)
    x = self.source.load(np.arange(lo, hi, dtype=np.int64))['x']
    # Rounding recovers the stored pixels exactly for unresized data.
    return np.clip(np.rint((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class Range:
  """A contiguous sub-range [start, stop) of an image source."""

  def __init__(self, images, start: int, stop: int):
    self.images, self.start, self.stop = images, start, stop
    self.shape = (stop - start,) + tuple(images.shape[1:])

  def close(self) -> None:
    if hasattr(self.images, 'close'):
      self.images.close()

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, s: slice) -> np.ndarray:
    lo, hi, _ = s.indices(len(self))
    return self.images[self.start + lo:self.start + hi]


def open_images(path: str, key: str | None = None):
  """An image source for a .npy / .npz file or a folder (see the module docstring)."""
  if os.path.isdir(path):
    return FolderImages(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'images {path!r} not found (expected a .npy, .npz or folder)')
  lower = path.lower()
  if lower.endswith('.npy'):
    return ArrayImages(np.load(path, mmap_mode='r'), path)
  if lower.endswith('.npz'):
    return NpzMemberImages(path, key)
  raise ValueError(f'{path}: unsupported image file; give a .npy, .npz or a folder')
