"""Lazy, sliced reading and streamed writing of (sharded) safetensors checkpoints.

Reading goes through the `safetensors` package (`safe_open(..., framework='np')`,
`get_slice`), so a caller reads only the block of a tensor it needs; bfloat16 tensors come
back as `ml_dtypes.bfloat16` arrays (safetensors >= 0.6 does this itself; for older
versions the block is read from a memory map of the file instead).

Writing streams one tensor at a time: the header is written first from the shapes and
dtypes, then each tensor's bytes as its producer returns them, so at most one tensor is in
host memory. Files larger than `max_shard_bytes` are split as diffusers / transformers do
(`<prefix>-00001-of-0000N.safetensors` plus `<prefix>.safetensors.index.json`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64),
    'I32': np.dtype(np.int32), 'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_SUFFIX = '.safetensors.index.json'


def read_header(path: str, error: type[ValueError] = ValueError) -> tuple[dict, int]:
  """(JSON header, byte offset of the data section) of a .safetensors file.

  A file that is not one raises `error` (a ValueError type) naming the file.
  """
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise error(f'{path}: too short to be a safetensors file')
    (n,) = struct.unpack('<Q', head)
    if n > os.path.getsize(path) - 8:
      raise error(f'{path}: safetensors header length {n} exceeds the file')
    try:
      return json.loads(f.read(n)), 8 + n
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise error(f'{path}: bad safetensors header ({e})') from e


class SafetensorsFolder:
  """Read-only view of the tensors of one or more .safetensors files.

  Opened from a single file, a folder with `<prefix>.safetensors`, or a folder with
  `<prefix>.safetensors.index.json` and the shard files it names. Tensors are read on
  demand: `read(key, index)` returns only the block `index` (a tuple of slices).
  Use as a context manager (or call `close`).
  """

  def __init__(self, path: str, prefix: str = 'diffusion_pytorch_model'):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    self.path = path
    if os.path.isfile(path):
      files = {None: path}
      self.weight_map = None
    elif os.path.isfile(os.path.join(path, prefix + INDEX_SUFFIX)):
      index_file = os.path.join(path, prefix + INDEX_SUFFIX)
      with open(index_file) as f:
        try:
          self.weight_map = json.load(f)['weight_map']
        except (json.JSONDecodeError, KeyError) as e:
          raise ValueError(f'{index_file}: not a safetensors index ({e})') from e
      files = {name: os.path.join(path, name) for name in set(self.weight_map.values())}
      absent = sorted(n for n, p in files.items() if not os.path.isfile(p))
      if absent:
        raise FileNotFoundError(f'{index_file} names shard files that are missing: {absent}')
    elif os.path.isfile(os.path.join(path, prefix + '.safetensors')):
      files = {None: os.path.join(path, prefix + '.safetensors')}
      self.weight_map = None
    else:
      raise FileNotFoundError(
          f'no {prefix}.safetensors or {prefix}{INDEX_SUFFIX} in {path}')
    self._files = files
    self._handles = {}
    self._info = {}  # key -> (file name, dtype, shape, absolute data offset)
    for name, file in files.items():
      header, data_start = read_header(file)
      for key, info in header.items():
        if key == '__metadata__':
          continue
        if info['dtype'] not in DTYPES:
          raise ValueError(f'{file}: tensor {key!r} has unsupported dtype {info["dtype"]}')
        if self.weight_map is not None and self.weight_map.get(key) != name:
          continue  # not the copy the index points to
        self._info[key] = (name, DTYPES[info['dtype']], tuple(info['shape']),
                           data_start + info['data_offsets'][0])
    if self.weight_map is not None:
      lost = sorted(k for k in self.weight_map if k not in self._info)
      if lost:
        raise ValueError(f'{path}: the index lists tensors absent from their shard files: '
                         f'{lost[:10]}{" ..." if len(lost) > 10 else ""}')

  def __enter__(self) -> 'SafetensorsFolder':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for h in self._handles.values():
      h.__exit__(None, None, None)
    self._handles.clear()

  def keys(self) -> list[str]:
    return sorted(self._info)

  def __contains__(self, key: str) -> bool:
    return key in self._info

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info[key][2]

  def dtype(self, key: str) -> np.dtype:
    return self._info[key][1]

  def nbytes(self, key: str) -> int:
    return math.prod(self.shape(key)) * self.dtype(key).itemsize

  def _handle(self, name):
    if name not in self._handles:
      h = self._safe_open(self._files[name], framework='np')
      self._handles[name] = h.__enter__()
    return self._handles[name]

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The block `index` (tuple of slices, default all) of tensor `key`, its own dtype."""
    if key not in self._info:
      raise KeyError(f'{self.path}: no tensor {key!r}')
    name, dtype, shape, offset = self._info[key]
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(shape) - len(index))
    try:
      block = self._handle(name).get_slice(key)[index] if shape else (
          self._handle(name).get_tensor(key))
      block = np.asarray(block)
      if block.dtype != dtype:  # e.g. old safetensors returning raw bf16 bits
        raise TypeError(block.dtype)
    except TypeError:
      # safetensors without bfloat16 support in numpy: read the bytes ourselves.
      mm = np.memmap(self._files[name], dtype=dtype, mode='r', offset=offset, shape=shape)
      block = np.array(mm[index] if shape else mm)
      del mm
    return block


@dataclasses.dataclass(frozen=True)
class TensorOut:
  """One tensor to write: key, shape, dtype and a producer of its value.

  `produce()` returns the array, or an iterator of arrays whose C-order concatenation is
  the tensor (for tensors too large to hold at once).
  """
  key: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _plan_shards(tensors: Sequence[TensorOut], max_bytes: int) -> list[list[TensorOut]]:
  shards, cur, size = [], [], 0
  for t in tensors:
    if cur and size + t.nbytes > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(t)
    size += t.nbytes
  if cur or not shards:
    shards.append(cur)
  return shards


def _write_file(path: str, tensors: Sequence[TensorOut],
                progress: Callable[[str], None] | None) -> None:
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for t in tensors:
    dt = np.dtype(t.dtype)
    if dt not in DTYPE_NAMES:
      raise ValueError(f'cannot write {t.key!r}: dtype {dt} has no safetensors name')
    header[t.key] = {'dtype': DTYPE_NAMES[dt], 'shape': list(t.shape),
                     'data_offsets': [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # data section 8-byte aligned
  tmp = path + '.partial'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for t in tensors:
      value = t.produce()
      whole = isinstance(value, np.ndarray) or not hasattr(value, '__iter__')
      if whole:
        value = np.asarray(value)
        if value.shape != tuple(t.shape):
          raise ValueError(f'{t.key}: producer gave shape {value.shape}, expected '
                           f'{tuple(t.shape)}')
      written = 0
      for a in ([value] if whole else value):
        a = np.ascontiguousarray(a)
        if a.dtype != np.dtype(t.dtype):
          raise ValueError(f'{t.key}: producer gave {a.dtype}, expected '
                           f'{np.dtype(t.dtype)}')
        if a.dtype.byteorder == '>':
          a = a.byteswap().view(a.dtype.newbyteorder('<'))
        f.write(memoryview(a.reshape(-1).view(np.uint8)))
        written += a.nbytes
        del a
      if written != t.nbytes:
        raise ValueError(f'{t.key}: producer gave {written} bytes, expected {t.nbytes}')
      if progress:
        progress(t.key)
  os.replace(tmp, path)


def write_safetensors_folder(out_dir: str, tensors: Iterable[TensorOut], *,
                             prefix: str = 'diffusion_pytorch_model',
                             max_shard_bytes: int = 10 * 2**30,
                             progress: Callable[[str], None] | None = None
                             ) -> list[str]:
  """Writes tensors as `<prefix>.safetensors`, or as numbered shards plus an index.

  Each producer is called once, in order, while its file is written; files appear under
  their final name only when complete.

  Args:
    out_dir: target folder (created).
    tensors: what to write (keys unique).
    prefix: file name stem ('diffusion_pytorch_model' for diffusers models).
    max_shard_bytes: split into several files above this size.
    progress: called with each key after it is written.

  Returns:
    The file names written (shards, then the index if any).
  """
  tensors = list(tensors)
  keys = [t.key for t in tensors]
  if len(set(keys)) != len(keys):
    raise ValueError('duplicate tensor keys: '
                     f'{sorted({k for k in keys if keys.count(k) > 1})}')
  os.makedirs(out_dir, exist_ok=True)
  shards = _plan_shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    name = prefix + '.safetensors'
    _write_file(os.path.join(out_dir, name), shards[0], progress)
    return [name]
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f'{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _write_file(os.path.join(out_dir, name), shard, progress)
    names.append(name)
    weight_map.update({t.key: name for t in shard})
  index = {'metadata': {'total_size': sum(t.nbytes for t in tensors)},
           'weight_map': dict(sorted(weight_map.items()))}
  with open(os.path.join(out_dir, prefix + INDEX_SUFFIX), 'w') as f:
    json.dump(index, f, indent=2)
  return names + [prefix + INDEX_SUFFIX]
