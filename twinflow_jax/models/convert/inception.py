r"""pytorch-fid's FID Inception weights -> `InceptionV3` parameters (.npz, no torch to load).

Source: `pt_inception-2015-12-05-6726825d.pth`, published by pytorch-fid at
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
(TensorFlow's inception-2015-12-05 graph ported to PyTorch; torch-fidelity ships the same
weights under the same hash). Nothing is downloaded here: fetch the file once yourself, then

  python -m twinflow_jax.models.convert.inception \
      --src pt_inception-2015-12-05-6726825d.pth --out fid_inception.npz

Reading a .pth needs torch (`pip install .[torch]`); a .safetensors or .npz export of the
same state dict (torch names) needs nothing else. The output .npz holds one float32
array per NNX variable under its '/'-joined path ('Mixed_6b/branch7x7_2/conv/kernel',
'fc/bias', ...) and a '__format__' marker; `load_inception(path)` builds the network
from it (and also accepts a raw state dict in .safetensors / .npz form directly).

Layout changes: conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; fc weight
[1008, 2048] -> kernel [2048, 1008]; batch norm weight/bias/running_mean/running_var ->
scale/bias/mean/var; `num_batches_tracked` is dropped.
"""

import argparse
import functools
import hashlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.convert.state_dict import read_state_dict
from twinflow_jax.models.inception import InceptionV3, abstract_inception
from twinflow_jax.models.param_tree import flatten, path_name, unflatten

FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
FID_WEIGHTS_SHA256_PREFIX = '6726825d'
FORMAT = 'twinflow_jax.fid_inception.v1'
_FORMAT_KEY = '__format__'
_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_IGNORED_SUFFIXES = ('num_batches_tracked',)


def torch_name(path: tuple) -> str:
  """NNX variable path -> PyTorch state-dict name, e.g.
  ('Mixed_5b', 'branch1x1', 'bn', 'mean') -> 'Mixed_5b.branch1x1.bn.running_mean'."""
  *module, leaf = path
  if module and module[-1] == 'bn':
    leaf = _BN[leaf]
  elif leaf == 'kernel':
    leaf = 'weight'
  return '.'.join(list(module) + [leaf])


def _to_torch_layout(path: tuple, shape: tuple) -> tuple:
  if path[-1] == 'kernel' and len(shape) == 4:  # [kh, kw, I, O] -> [O, I, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == 'kernel' and len(shape) == 2:  # [in, out] -> [out, in]
    return (shape[1], shape[0])
  return tuple(shape)


@functools.lru_cache(maxsize=1)
def _variable_shapes() -> tuple[tuple[tuple, tuple[int, ...]], ...]:
  """((NNX path, shape), ...) of every `InceptionV3` variable (built once)."""
  flat = flatten(nnx.to_pure_dict(nnx.state(abstract_inception())))
  return tuple((p, tuple(v.shape)) for p, v in flat.items())


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """{PyTorch name: shape} of the FID Inception state dict (472 tensors)."""
  return {torch_name(p): _to_torch_layout(p, s) for p, s in _variable_shapes()}


def convert_state_dict(sd: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Maps a pytorch-fid Inception state dict to flat NNX variables.

  Args:
    sd: {torch name: array}, e.g. from `read_state_dict`.

  Returns:
    {NNX path tuple: float32 array} for every variable of `InceptionV3`.

  Raises:
    ValueError: missing or unexpected tensors, or a wrong shape (the message names them).
  """
  target = dict(_variable_shapes())
  names = {torch_name(p): p for p in target}
  given = {k for k in sd if not k.endswith(_IGNORED_SUFFIXES)}
  missing = sorted(set(names) - given)
  unexpected = sorted(given - set(names))
  if missing or unexpected:
    hint = ''
    if any(k.startswith('AuxLogits.') for k in unexpected):
      hint = (' (AuxLogits: this is torchvision\'s ImageNet Inception, not the FID '
              f'Inception; use {FID_WEIGHTS_URL.rsplit("/", 1)[-1]})')
    raise ValueError(
        f'not the FID Inception state dict: {len(missing)} tensors missing '
        f'{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}{hint}')
  out = {}
  for name, path in names.items():
    a = np.asarray(sd[name], np.float32)
    want = _to_torch_layout(path, target[path])
    if a.shape != want:
      raise ValueError(f'tensor {name!r} has shape {a.shape}, the FID Inception '
                       f'expects {want}')
    if path[-1] == 'kernel':
      a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
    out[path] = np.ascontiguousarray(a)
  return out


def save_params(flat: dict[tuple, np.ndarray], out_path: str) -> None:
  """Writes converted variables as an .npz ('/'-joined paths + format marker)."""
  if not out_path.endswith('.npz'):
    raise ValueError(f'--out {out_path!r}: the converted weights are written as .npz; '
                     'give a path ending in .npz')
  parent = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(parent, exist_ok=True)
  arrays = {path_name(p): v for p, v in flat.items()}
  arrays[_FORMAT_KEY] = np.array(FORMAT)
  tmp = out_path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, out_path)


def load_params(path: str, *, allow_pickle: bool = False) -> dict[tuple, np.ndarray]:
  """Reads Inception weights: a converted .npz, or a raw pytorch-fid state dict.

  Args:
    path: output of this converter (.npz with '__format__'), or the state dict itself
      as .safetensors / .npz (torch names) / .pth (needs torch).
    allow_pickle: let torch unpickle non-tensor objects (trusted .pth files only).

  Returns:
    {NNX path tuple: float32 array}.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'Inception weights {path!r} not found. Download pytorch-fid\'s '
        f'{FID_WEIGHTS_URL} once and convert it: python -m '
        'twinflow_jax.models.convert.inception --src FILE.pth --out FILE.npz')
  if path.lower().endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      if _FORMAT_KEY in z.files:
        fmt = str(z[_FORMAT_KEY])
        if fmt != FORMAT:
          raise ValueError(f'{path}: weights format {fmt!r}, this version reads '
                           f'{FORMAT!r}; convert the .pth again')
        flat = {tuple(k.split('/')): np.asarray(z[k], np.float32)
                for k in z.files if k != _FORMAT_KEY}
        target = dict(_variable_shapes())
        if set(flat) != set(target):
          raise ValueError(f'{path}: converted weights do not match InceptionV3 '
                           f'({len(set(target) - set(flat))} variables missing)')
        return flat
  return convert_state_dict(read_state_dict(path, allow_pickle=allow_pickle))


def inception_from_params(flat: dict[tuple, np.ndarray], *,
                          dtype: jnp.dtype = jnp.float32,
                          precision: jax.lax.Precision | str | None = 'highest'
                          ) -> InceptionV3:
  """Builds an `InceptionV3` holding `flat` (no random init is run)."""
  graphdef, state = nnx.split(abstract_inception(dtype=dtype, precision=precision))
  pure = flatten(nnx.to_pure_dict(state))
  for p, v in pure.items():
    if p not in flat:
      raise ValueError(f'Inception variable {path_name(p)} missing from the weights')
    if tuple(flat[p].shape) != tuple(v.shape):
      raise ValueError(f'Inception variable {path_name(p)} has shape '
                       f'{flat[p].shape}, expected {v.shape}')
  nnx.replace_by_pure_dict(state, unflatten({p: jnp.asarray(flat[p]) for p in pure}))
  return nnx.merge(graphdef, state)


def load_inception(path: str, *, dtype: jnp.dtype = jnp.float32,
                   precision: jax.lax.Precision | str | None = 'highest',
                   allow_pickle: bool = False) -> InceptionV3:
  """`load_params` + `inception_from_params`: the FID InceptionV3 from a local file."""
  return inception_from_params(load_params(path, allow_pickle=allow_pickle),
                               dtype=dtype, precision=precision)


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twinflow_jax.models.convert.inception',
      description='Convert pytorch-fid\'s FID Inception weights (pt_inception-2015-12-05-'
      '6726825d.pth, from ' + FID_WEIGHTS_URL + ') to an .npz that twinflow_jax\'s '
      'FID / IS / precision-recall code loads without torch.')
  p.add_argument('--src', required=True,
                 help='the .pth (needs torch), or a .safetensors / .npz export of it')
  p.add_argument('--out', required=True, help='output .npz file')
  p.add_argument('--allow-pickle', action='store_true',
                 help='let torch unpickle non-tensor objects (trusted files only)')
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    flat = convert_state_dict(read_state_dict(args.src, allow_pickle=args.allow_pickle))
    save_params(flat, args.out)
  except (ValueError, FileNotFoundError, ImportError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  digest = sha256(args.src)
  n = sum(v.size for v in flat.values())
  print(f'wrote {args.out}: {len(flat)} tensors, {n} values (FID InceptionV3)')
  if digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
    print(f'source sha256 {digest[:16]}... matches the published pytorch-fid file')
  else:
    print(f'note: source sha256 {digest[:16]}... does not start with '
          f'{FID_WEIGHTS_SHA256_PREFIX}: not the published .pth itself (fine for an '
          'export of it; otherwise FID values will not be comparable)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
