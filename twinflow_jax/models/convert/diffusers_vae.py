"""diffusers-format VAE folders -> Flax `AutoencoderKL` / `AutoencoderKLQwenImage`.

A diffusers VAE folder (e.g. the `vae/` subfolder of a pipeline) holds
  config.json                                      `_class_name` and the architecture,
                                                   plus scaling_factor / shift_factor /
                                                   latents_mean / latents_std;
  diffusion_pytorch_model.safetensors              the weights, or several files listed
  (or ...safetensors.index.json + shards)          in the index's `weight_map`.
Weights are read tensor by tensor with the `safetensors` package (numpy backend);
bfloat16 tensors, which numpy cannot hold natively, are read as raw bytes from the
file's header offsets and viewed as `ml_dtypes.bfloat16`. No torch is needed.

Name and layout mapping (Flax path -> diffusers name):
  .../kernel of a conv  <- .../weight [out, in, kh, kw] transposed to [kh, kw, in, out];
                           Qwen-Image causal conv3d weights [out, in, kt, kh, kw] give
                           their last temporal slice (the only one a single frame meets)
  .../kernel of a dense <- .../weight [out, in] transposed (also [out, in, 1, 1])
  .../scale             <- GroupNorm .weight / Qwen RMS-norm .gamma (flattened)
  downsampler / upsampler / to_out  <- downsamplers.0.conv / upsamplers.0.conv / to_out.0
  (Qwen) resample / upsampler       <- resample.1 / upsamplers.0
Old diffusers attention names (query / key / value / proj_attn) are accepted. Every
tensor of the file must be used, except Qwen-Image `time_conv` weights (temporal
layers, inactive on single frames).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.convert.safetensors_io import read_header
from twinflow_jax.models.param_tree import flatten, unflatten
from twinflow_jax.models.vae import AutoencoderKLConfig, create_vae
from twinflow_jax.models.vae_qwen_image import QwenImageVAEConfig

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
INDEX_FILE = WEIGHTS_FILE + '.index.json'
VAE_CLASSES = {'AutoencoderKL': AutoencoderKLConfig,
               'AutoencoderKLQwenImage': QwenImageVAEConfig}
# Dtypes that numpy reads natively through safetensors' numpy backend.
_RAW_DTYPES = {'BF16': np.dtype(jnp.bfloat16)}


class VaeFolderError(ValueError):
  """A VAE folder that cannot be used (message names the file and the fix)."""


class SafetensorsReader:
  """Reads named tensors from one safetensors file or an index of shards, lazily."""

  def __init__(self, folder: str):
    self.folder = folder
    single = os.path.join(folder, WEIGHTS_FILE)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
      self.files = [single]
      self._file_of = None
    elif os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError) as e:
        raise VaeFolderError(f'{index}: not a safetensors index with a weight_map '
                             f'({e})') from e
      self._file_of = {k: os.path.join(folder, v) for k, v in weight_map.items()}
      self.files = sorted(set(self._file_of.values()))
      missing = [f for f in self.files if not os.path.isfile(f)]
      if missing:
        raise VaeFolderError(f'{index} lists shard files that do not exist: {missing}')
    else:
      raise VaeFolderError(f'{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE} '
                           '(a diffusers-format VAE folder is expected)')
    self._headers = {f: _read_header(f) for f in self.files}
    if self._file_of is None:
      self._file_of = {k: single for k in self._headers[single]
                       if not k.startswith('__')}
    for name, file in self._file_of.items():
      if name not in self._headers[file]:
        raise VaeFolderError(f'{file} lacks tensor {name!r} that the index lists')

  def names(self) -> list[str]:
    return sorted(self._file_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._headers[self._file_of[name]][name]['shape'])

  def get(self, name: str) -> np.ndarray:
    """The tensor as numpy (bfloat16 as ml_dtypes.bfloat16)."""
    file = self._file_of[name]
    info = self._headers[file][name]
    if info['dtype'] in _RAW_DTYPES:
      start, end = info['data_offsets']
      offset = 8 + self._headers[file]['__header_len__']
      with open(file, 'rb') as f:
        f.seek(offset + start)
        raw = f.read(end - start)
      dtype = _RAW_DTYPES[info['dtype']].newbyteorder('<')
      return np.frombuffer(raw, dtype).reshape(info['shape'])
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(file, framework='numpy') as f:
      return f.get_tensor(name)


def _read_header(path: str) -> dict[str, Any]:
  header, offset = read_header(path, VaeFolderError)
  header['__header_len__'] = offset - 8
  return header


def read_vae_config(folder: str) -> dict[str, Any]:
  """config.json of a diffusers VAE folder, checked to name a supported class."""
  path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isdir(folder):
    raise VaeFolderError(f'VAE folder {folder!r} does not exist')
  if not os.path.isfile(path):
    raise VaeFolderError(f'{folder} has no {CONFIG_FILE}: a diffusers-format VAE folder '
                         '(config.json + diffusion_pytorch_model.safetensors) is expected')
  try:
    with open(path) as f:
      config = json.load(f)
  except ValueError as e:
    raise VaeFolderError(f'{path}: not valid JSON ({e})') from e
  name = config.get('_class_name')
  if name not in VAE_CLASSES:
    raise VaeFolderError(f'{path}: _class_name={name!r} is not a supported VAE; '
                         f'supported: {sorted(VAE_CLASSES)}')
  return config


def vae_config_from_diffusers(config: dict[str, Any], **options):
  """diffusers config dict -> AutoencoderKLConfig | QwenImageVAEConfig.

  options: run options (dtype, param_dtype, attention).
  """
  return VAE_CLASSES[config['_class_name']].from_diffusers(config, **options)


def _torch_name(path: tuple, qwen: bool) -> str:
  renames = ({'resample': 'resample.1', 'upsampler': 'upsamplers.0'} if qwen else
             {'downsampler': 'downsamplers.0.conv', 'upsampler': 'upsamplers.0.conv',
              'to_out': 'to_out.0'})
  leaf = {'kernel': 'weight', 'bias': 'bias',
          'scale': 'gamma' if qwen else 'weight'}[path[-1]]
  return '.'.join([renames.get(str(p), str(p)) for p in path[:-1]] + [leaf])


_OLD_ATTENTION = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def _to_flax(value: np.ndarray, target: tuple[int, ...], name: str) -> np.ndarray:
  """Transposes / slices a torch-layout tensor into the Flax layout `target`."""
  a = value
  if len(target) == 4 and a.ndim == 5:  # causal conv3d: last temporal slice
    a = a[:, :, -1]
  if len(target) == 4 and a.ndim == 4:
    a = a.transpose(2, 3, 1, 0)
  elif len(target) == 2 and a.ndim in (2, 4):
    a = a.reshape(a.shape[0], a.shape[1]).T if a.ndim == 4 else a.T
  elif len(target) == 1:
    a = a.reshape(-1)
  if a.shape != target:
    raise VaeFolderError(f'weight {name!r} has shape {tuple(value.shape)}, which does not '
                         f'fit the model parameter of shape {target} (config.json and '
                         'weights disagree?)')
  return a


def convert_vae_weights(reader: SafetensorsReader, model: nnx.Module) -> dict:
  """Reads every parameter of `model` (a VAE built from the folder's config) from
  `reader`; returns the pure parameter dict (numpy float32)."""
  qwen = model.config.kind == 'qwen_image'
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  available = set(reader.names())
  used, out, missing = set(), {}, []
  for path, leaf in flatten(state).items():
    name = _torch_name(path, qwen)
    if name not in available:
      parent, _, tail = name.rpartition('.')
      module, _, attr = parent.rpartition('.')
      old = f'{module}.{_OLD_ATTENTION.get(attr, attr)}.{tail}'
      if attr in _OLD_ATTENTION and old in available:
        name = old
      else:
        missing.append(name)
        continue
    used.add(name)
    value = np.asarray(reader.get(name)).astype(np.float32)
    out[path] = _to_flax(value, tuple(leaf.shape), name)
  unused = sorted(n for n in available - used if not (qwen and '.time_conv.' in n))
  if missing or unused:
    raise VaeFolderError(
        f'weights in {reader.folder} do not match its config.json: missing '
        f'{missing[:8]}{" ..." if len(missing) > 8 else ""}, unused '
        f'{unused[:8]}{" ..." if len(unused) > 8 else ""}')
  return unflatten(out)


def load_diffusers_vae(folder: str, *, dtype: str = 'float32',
                       param_dtype: str = 'float32', attention: str = 'xla'):
  """Builds the VAE of a diffusers folder and loads its weights (unsharded).

  Args:
    folder: diffusers VAE folder (config.json + safetensors weights).
    dtype: compute dtype ('float32', 'bfloat16', 'float16').
    param_dtype: stored parameter dtype.
    attention: attention implementation name (see `models.attention`).

  Returns:
    The `AutoencoderKL` / `AutoencoderKLQwenImage`; its `.config` also gives
    `latent_normalization()` (shift, scale) and `downsample_factor`. Use
    `models.vae.make_encode_fn(vae, mesh)` to run it sharded.

  Raises:
    VaeFolderError: missing files, unsupported class, weights that do not fit.
  """
  config = vae_config_from_diffusers(read_vae_config(folder), dtype=dtype,
                                     param_dtype=param_dtype, attention=attention)
  reader = SafetensorsReader(folder)
  abstract = nnx.eval_shape(lambda: create_vae(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  tree = convert_vae_weights(reader, abstract)
  pd = np.dtype(jnp.dtype(param_dtype))
  # device_put, not jnp.asarray: the latter compiles an identity per shape.
  arrays = {p: jax.device_put(v.astype(pd)) for p, v in flatten(tree).items()}
  nnx.replace_by_pure_dict(state, unflatten(arrays))
  return nnx.merge(graphdef, state)


def save_diffusers_vae(vae, folder: str) -> str:
  """Writes an `AutoencoderKL` as a diffusers folder (config.json + float32 safetensors).

  The inverse of `load_diffusers_vae`, for VAEs made or changed here (benchmarks,
  tests); diffusers' `AutoencoderKL` loads the local folder it writes.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = vae.config
  if cfg.kind != 'autoencoder_kl':
    raise ValueError('save_diffusers_vae writes AutoencoderKL only')
  n = len(cfg.block_out_channels)
  config = {'_class_name': 'AutoencoderKL', 'act_fn': 'silu',
            'down_block_types': ['DownEncoderBlock2D'] * n,
            'up_block_types': ['UpDecoderBlock2D'] * n}
  for f in dataclasses.fields(cfg):
    if f.name not in ('dtype', 'param_dtype', 'attention'):
      value = getattr(cfg, f.name)
      config[f.name] = list(value) if isinstance(value, tuple) else value
  tensors = {}
  for path, value in flatten(nnx.to_pure_dict(nnx.state(vae, nnx.Param))).items():
    a = np.asarray(value, np.float32)
    if a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
    elif a.ndim == 2:
      a = a.T
    tensors[_torch_name(path, qwen=False)] = np.ascontiguousarray(a)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
  return folder


def vae_fingerprint(folder: str) -> dict[str, Any]:
  """Identity of a VAE folder: sha256 of config.json and of the weight files' bytes.

  Stored in the data metadata, so that decoding later can check it uses the VAE
  the latents came from.
  """
  reader = SafetensorsReader(folder)
  with open(os.path.join(folder, CONFIG_FILE), 'rb') as f:
    config_hash = hashlib.sha256(f.read()).hexdigest()
  weights = hashlib.sha256()
  for file in reader.files:
    with open(file, 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 24), b''):
        weights.update(chunk)
  return {'config_sha256': config_hash, 'weights_sha256': weights.hexdigest(),
          'weight_files': [os.path.basename(f) for f in reader.files]}
