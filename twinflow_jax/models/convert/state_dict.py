"""Reading PyTorch-style state dicts as numpy: .npz, .safetensors, .pt.

`.safetensors` is parsed here with numpy (8-byte little-endian header length,
JSON header, raw little-endian tensor bytes), so no extra dependency is
needed; torch is imported only to read pickled `.pt` / `.pth` / `.bin` files.
"""

import json
import os
import struct
from typing import Any

import jax.numpy as jnp
import numpy as np

_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': jnp.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
_TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Parses a .safetensors file into {name: array} (bf16 kept as bfloat16)."""
  with open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f'{path}: too short to be a safetensors file')
  (n,) = struct.unpack('<Q', raw[:8])
  if n > len(raw) - 8:
    raise ValueError(f'{path}: safetensors header length {n} exceeds the file')
  try:
    header = json.loads(raw[8:8 + n])
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: bad safetensors JSON header ({e})') from e
  data = memoryview(raw)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    dtype = _SAFETENSORS_DTYPES.get(info['dtype'])
    if dtype is None:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype '
                       f"{info['dtype']}")
    start, end = info['data_offsets']
    arr = np.frombuffer(data[start:end], dtype=np.dtype(dtype).newbyteorder(
        '<'))
    out[name] = arr.reshape(info['shape']).copy()
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes {name: array} as .safetensors (used by tests and tools)."""
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, chunks, offset = {}, [], 0
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    b = arr.astype(arr.dtype.newbyteorder('<')).tobytes()
    header[name] = {'dtype': names[arr.dtype], 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + len(b)]}
    chunks.append(b)
    offset += len(b)
  blob = json.dumps(header).encode()
  blob += b' ' * (-len(blob) % 8)  # 8-byte alignment of the data section
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)) + blob + b''.join(chunks))


def _read_torch(path: str, allow_pickle: bool) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch (pip install torch); or convert it to '
        '.safetensors / .npz elsewhere') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # torch raises UnpicklingError subclasses
    raise ValueError(
        f'{path}: could not load with weights_only=True ({e}); the file holds '
        'more than tensors. Pass allow_pickle=True (--allow-pickle) only if '
        'you trust it.') from e
  return obj


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
  """Picks the state dict inside a training checkpoint (EMA first)."""
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a state dict, got {type(obj)}')
  for key in ('ema', 'model', 'state_dict'):
    if key in obj and isinstance(obj[key], dict):
      return obj[key]
  return obj


def _to_numpy(v: Any) -> np.ndarray:
  if hasattr(v, 'detach'):  # torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == 'torch.bfloat16':
      v = v.float()
    v = v.numpy()
  return np.asarray(v)


def read_state_dict(path: str, *,
                    allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a state dict from .npz, .safetensors or a torch pickle.

  Training checkpoints ({'model', 'ema', ...}) give their 'ema' weights; a
  DDP 'module.' prefix is removed.

  Args:
    path: local file path.
    allow_pickle: let torch unpickle arbitrary objects (trusted files only).

  Returns:
    {parameter name: float numpy array}.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  lower = path.lower()
  if lower.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      sd = {k: z[k] for k in z.files}
  elif lower.endswith('.safetensors'):
    sd = read_safetensors(path)
  elif lower.endswith(_TORCH_SUFFIXES):
    sd = _unwrap(_read_torch(path, allow_pickle), path)
  else:
    raise ValueError(f'{path}: unknown checkpoint format; use .npz, '
                     f'.safetensors or one of {_TORCH_SUFFIXES}')
  out = {}
  for k, v in sd.items():
    k = k[len('module.'):] if k.startswith('module.') else k
    out[k] = _to_numpy(v)
  return out
