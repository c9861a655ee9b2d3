"""`metadata.json` of prepared latents: what the records hold and how to read them.

`python -m twinflow_jax.data.prepare` writes `<output>/metadata.json` next to the
ArrayRecord shards. The data pipeline reads it automatically (the `metadata.json` in the
folder of each file of `config.data.paths`) and refuses a config that would read the
records wrongly: another latent scale or shift, shape, dtype, record kind, text shape,
or fewer classes. Fields (JSON):

  format             'twinflow_jax.prepared_latents/1'
  kind               'latents' (class labels) or 't2i' (text embeddings)
  records            file pattern of the shards, relative to the folder
  num_records        records written (with `hflip_records`, two per image)
  latent_shape       [h, w, C] of the stored latents; latent_dtype: stored dtype
  latent_shift, latent_scale   the model sees x = (latent - shift) * scale
  stored             'posterior_mean' or 'posterior_sample' (one draw, fixed seed)
  stored_normalization   null, or {'mean': [C], 'std': [C]}: the VAE's per-channel
                     statistics, already applied: latent = (z - mean) / std
  hflip_records      records 2i and 2i + 1 are image i and its mirror image
  num_classes, classes_file    ('latents'); txt_len, txt_dim, pooled_dim, txt_dtype ('t2i')
  vae                {path, class, config_sha256, weights_sha256, latent_channels,
                      downsample_factor, compute_dtype}
  preprocessing      image size, crop method, alpha and small-image handling
  input, counts      what was read, and how many images were written, skipped,
                     upscaled or converted to RGB
  config_data        the `config.data` fields that read these records
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from etils import epath

FILE_NAME = 'metadata.json'
FORMAT = 'twinflow_jax.prepared_latents/1'
_KIND_OF_SOURCE = {'arrayrecord_latents': 'latents', 'arrayrecord_t2i': 't2i'}


def write_metadata(folder: str, metadata: dict[str, Any]) -> str:
  """Writes folder/metadata.json atomically (tmp + rename); returns its path."""
  path = os.path.join(folder, FILE_NAME)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(metadata, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)
  return path


def read_metadata(path: str) -> dict[str, Any]:
  """Reads a metadata.json (or the one inside a folder) and checks its format."""
  p = epath.Path(path)
  if p.is_dir():
    p = p / FILE_NAME
  if not p.exists():
    raise FileNotFoundError(f'no {FILE_NAME} at {p}: not a folder written by '
                            '`python -m twinflow_jax.data.prepare`')
  try:
    metadata = json.loads(p.read_text())
  except ValueError as e:
    raise ValueError(f'{p}: not valid JSON ({e})') from e
  found = metadata.get('format') if isinstance(metadata, dict) else None
  if found != FORMAT:
    raise ValueError(f'{p}: format is {found!r}, expected {FORMAT!r}')
  metadata['_path'] = os.fspath(p)
  return metadata


def find_metadata(files: Sequence[str]) -> dict[str, Any] | None:
  """The metadata.json next to ArrayRecord files (None when there is none).

  Raises:
    ValueError: the files' folders hold metadata that disagree (mixed preparations).
  """
  found = {}
  for folder in sorted({os.path.dirname(os.fspath(f)) for f in files}):
    candidate = epath.Path(folder or '.') / FILE_NAME
    if candidate.exists():
      found[os.fspath(candidate)] = read_metadata(os.fspath(candidate))
  if not found:
    return None
  keys = ('kind', 'latent_shape', 'latent_dtype', 'latent_shift', 'latent_scale',
          'stored_normalization', 'txt_len', 'txt_dim', 'pooled_dim', 'txt_dtype')
  first_path, first = next(iter(found.items()))
  for path, other in found.items():
    diff = [k for k in keys if other.get(k) != first.get(k)]
    if diff:
      raise ValueError(f'config.data.paths mixes records of different preparations: '
                       f'{first_path} and {path} differ in {diff}')
  return first


def _close(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    a = list(a) if isinstance(a, (list, tuple)) else [a]
    b = list(b) if isinstance(b, (list, tuple)) else [b]
    return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
  return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def check_data_config(c: Any, metadata: dict[str, Any]) -> None:
  """Raises ValueError if `config.data` (resolved) would misread these records.

  The message names the config field, the value the metadata requires and the file.
  """
  where = metadata.get('_path', FILE_NAME)
  vae = metadata.get('vae', {}).get('path', '?')

  def fail(field: str, have: Any, want: Any, why: str = '') -> None:
    raise ValueError(
        f'config.data.{field}={have!r} but {where} says the records need '
        f'{field}={want!r}{why}; set --config.data.{field}={want!r}')

  kind = _KIND_OF_SOURCE.get(c.source)
  if kind != metadata['kind']:
    want = {v: k for k, v in _KIND_OF_SOURCE.items()}[metadata['kind']]
    fail('source', c.source, want)
  shape = tuple(metadata['latent_shape'])
  if c.latent_shape is None or tuple(c.latent_shape) != shape:
    fail('latent_shape', None if c.latent_shape is None else tuple(c.latent_shape),
         shape, f' (latents of VAE {vae}: {shape[-1]} channels)')
  if c.latent_dtype != metadata['latent_dtype']:
    fail('latent_dtype', c.latent_dtype, metadata['latent_dtype'])
  for field in ('latent_scale', 'latent_shift'):
    if not _close(c[field], metadata[field]):
      fail(field, c[field], metadata[field], f' (normalisation of VAE {vae})')
  if kind == 'latents':
    n = metadata.get('num_classes')
    if n is not None and c.num_classes is not None and c.num_classes < n:
      fail('num_classes', c.num_classes, n)
  else:
    for field in ('txt_len', 'txt_dim', 'pooled_dim', 'txt_dtype'):
      if c[field] != metadata[field]:
        fail(field, c[field], metadata[field])


def config_fields(metadata: dict[str, Any], folder: str) -> dict[str, Any]:
  """The `config.data` fields that read the records of a prepared folder."""
  source = {v: k for k, v in _KIND_OF_SOURCE.items()}[metadata['kind']]
  fields = dict(source=source, paths=os.path.join(folder, metadata['records']),
                latent_shape=tuple(metadata['latent_shape']),
                latent_dtype=metadata['latent_dtype'],
                latent_scale=metadata['latent_scale'],
                latent_shift=metadata['latent_shift'])
  if metadata['kind'] == 'latents':
    fields['num_classes'] = metadata['num_classes']
  else:
    fields.update({k: metadata[k] for k in ('txt_len', 'txt_dim', 'pooled_dim',
                                            'txt_dtype')})
  return fields
