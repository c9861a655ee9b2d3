"""diffusers-format transformers in and out: the generic, family-independent part.

A diffusers model folder is `config.json` plus `diffusion_pytorch_model.safetensors` or
`diffusion_pytorch_model-0000i-of-0000N.safetensors` with
`diffusion_pytorch_model.safetensors.index.json`. A family module
(`diffusers_sd3.py`, ...) describes how its NNX parameters are named in diffusers as a
`DiffusersFamily`; this module does the rest:

  Weights in  `load_model(dir, overrides, mesh=)` builds the model abstractly
              (`nnx.eval_shape`), derives each parameter's NamedSharding from the logical
              rules, and fills every parameter with `jax.make_array_from_callback`: each
              process reads, per addressable shard, only that block of the tensor
              (`safe_open(...).get_slice`), transforms it (transpose, ...) and casts it to the
              parameter dtype. No process ever holds a whole model, and never more than one
              tensor's local shards at a time. `load_into(model, dir)` does the same into an
              existing (sharded) model, which is what `models.load_pretrained` and the
              trainer's `train.init_from` use.
  Weights out `export(model, out_dir)` writes the same key names (plus the TwinFlow
              r-embedder under the official wrapper's names), one tensor at a time: each
              parameter is gathered to host (all processes take part; process 0 writes),
              transformed back to torch layout and streamed into the file. Large models are
              split into shards with an index, like diffusers' `save_pretrained`.

Missing checkpoint keys for parameters the family marks optional (the TwinFlow
r-embedder, absent from a base checkpoint) keep the model's own initialisation; any other
missing, unexpected or mis-shaped key is an error that lists them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd

from twinflow_jax.models.convert.safetensors_io import (SafetensorsFolder, TensorOut,
                                                         write_safetensors_folder)
from twinflow_jax.models.diffusers_configs import read_config_json
from twinflow_jax.models.param_tree import flatten, path_name, unflatten
from twinflow_jax.models.sharding import DEFAULT_LOGICAL_AXIS_RULES

CONFIG_FILE = 'config.json'
WEIGHTS_PREFIX = 'diffusion_pytorch_model'
Index = tuple[slice, ...]


# ---------------------------------------------------------------------------------------
# Layout transforms between a diffusers tensor and an NNX parameter.


class Transform:
  """Maps one diffusers tensor (torch layout) to one parameter (model layout) and back.

  `read(src, key, index)` returns the block `index` of the model-layout array, reading as
  little of the source as the layout allows. The default reads the whole tensor.
  """

  def source_shape(self, model_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape that gives a parameter of `model_shape`."""
    return model_shape

  def to_model(self, a: np.ndarray) -> np.ndarray:
    return a

  def to_torch(self, a: np.ndarray) -> np.ndarray:
    return a

  def read(self, src: SafetensorsFolder, key: str, index: Index) -> np.ndarray:
    return self.to_model(src.read(key))[index]


class Identity(Transform):
  """Same layout (biases, norm scales): reads just the block."""

  def read(self, src, key, index):
    return src.read(key, index)


class Linear(Transform):
  """torch Linear weight [out, in] <-> Dense kernel [in, out]: reads the transposed block."""

  def source_shape(self, model_shape):
    return tuple(reversed(model_shape))

  def to_model(self, a):
    return a.T

  def to_torch(self, a):
    return a.T

  def read(self, src, key, index):
    index = tuple(index) + (slice(None),) * (2 - len(index))
    return src.read(key, (index[1], index[0])).T


class PatchConv(Transform):
  """Conv2d(C, D, p, stride p) weight [D, C, p, p] <-> Dense kernel [p*p*C, D].

  Kernel rows follow `embeddings.patchify`: (i, j, c).
  """

  def __init__(self, patch: int, channels: int):
    self.p, self.c = patch, channels

  def source_shape(self, model_shape):
    return (model_shape[1], self.c, self.p, self.p)

  def to_model(self, a):
    return a.transpose(2, 3, 1, 0).reshape(self.p * self.p * self.c, a.shape[0])

  def to_torch(self, a):
    return a.reshape(self.p, self.p, self.c, a.shape[1]).transpose(3, 2, 0, 1)

  def read(self, src, key, index):
    index = tuple(index) + (slice(None),) * (2 - len(index))
    return self.to_model(src.read(key, (index[1],)))[index[0]]


IDENTITY, LINEAR = Identity(), Linear()


@dataclasses.dataclass(frozen=True)
class Buffer:
  """A non-parameter tensor a family writes on export (e.g. a fixed position table).

  chunks() yields float32 pieces of it in C order (e.g. blocks of rows), so that large
  tables are never whole in memory; they are cast to the export dtype piece by piece.
  """
  shape: tuple[int, ...]
  chunks: Callable[[], Iterable[np.ndarray]]


# ---------------------------------------------------------------------------------------
# What a family provides.


@dataclasses.dataclass(frozen=True)
class DiffusersFamily:
  """The diffusers naming of one model family.

  Attributes:
    name: model config name (`create_model({'name': name, ...})`).
    class_names: diffusers `_class_name`s this family reads (the first is written).
    model_config: diffusers config.json dict -> our model config dict (with 'name').
    diffusers_config: our resolved config -> diffusers config.json dict (no '_' keys).
    param_key: (resolved config, parameter path) -> (diffusers key, Transform).
    optional: (resolved config, parameter path) -> True if the checkpoint may lack it
      (then the model's own initialisation is kept, e.g. the TwinFlow r-embedder).
    buffers: resolved config -> {key: Buffer} written on export besides the parameters
      (e.g. fixed position tables that diffusers keeps as persistent buffers).
    check_buffer: (resolved config, reader, key) -> None, called on import for every
      checkpoint key that names a buffer; raises ValueError if it contradicts the model.
    init_from: (resolved config, parameter path) -> another diffusers key or None. For an
      optional parameter the checkpoint lacks, the value is read from that key instead
      when the checkpoint has it (the 'copy' init of the TwinFlow r-embedder: Qwen-Image's
      official `init_time_embed_2_weights` copies the loaded time embedder).
  """
  name: str
  class_names: tuple[str, ...]
  model_config: Callable[[Mapping[str, Any]], dict[str, Any]]
  diffusers_config: Callable[[Any], dict[str, Any]]
  param_key: Callable[[Any, tuple], tuple[str, Transform]]
  optional: Callable[[Any, tuple], bool] = lambda cfg, path: False
  buffers: Callable[[Any], dict[str, Buffer]] = lambda cfg: {}
  check_buffer: Callable[[Any, SafetensorsFolder, str], None] | None = None
  init_from: Callable[[Any, tuple], str | None] = lambda cfg, path: None


_FAMILIES: dict[str, DiffusersFamily] = {}


def register_family(family: DiffusersFamily) -> None:
  """Makes a family available to `load_model` / `load_into` / `export`."""
  _FAMILIES[family.name] = family


def families() -> dict[str, DiffusersFamily]:
  _load_builtin_families()
  return dict(_FAMILIES)


def _load_builtin_families() -> None:
  # Family modules register themselves on import (lazily: they import this module).
  # pylint: disable=g-import-not-at-top,unused-import
  from twinflow_jax.models.convert import diffusers_sd3  # noqa: F401
  from twinflow_jax.models.convert import diffusers_flux  # noqa: F401
  from twinflow_jax.models.convert import diffusers_qwen_image  # noqa: F401


def dotted_key(path: tuple, renames: Sequence[tuple[str, str]] = ()) -> tuple[str, str]:
  """Default naming: parameter path -> (diffusers module path, leaf name).

  ('transformer_blocks', 0, 'attn', 'to_q', 'kernel') -> ('transformer_blocks.0.attn.to_q',
  'kernel'). `base_module` segments (an `nnx.LoRA` wrapping a layer) are dropped, so a
  merged LoRA model exports under the base names. `renames` are (regex, replacement)
  pairs applied in order to the dotted module path (e.g. ('\\.ff\\.fc1$', '.ff.net.0.proj')).
  """
  parts = [str(p) for p in path if str(p) != 'base_module']
  module = '.'.join(parts[:-1])
  for pattern, repl in renames:
    module = re.sub(pattern, repl, module)
  return module, parts[-1]


def standard_param_key(path: tuple, renames: Sequence[tuple[str, str]] = ()
                       ) -> tuple[str, Transform]:
  """kernel (2-D) -> `.weight` transposed; bias -> `.bias`; RMSNorm scale -> `.weight`."""
  module, leaf = dotted_key(path, renames)
  if leaf == 'kernel':
    return f'{module}.weight', LINEAR
  if leaf == 'bias':
    return f'{module}.bias', IDENTITY
  if leaf == 'scale':
    return f'{module}.weight', IDENTITY
  raise ValueError(f'no diffusers name for parameter {path_name(path)} (leaf {leaf!r}); '
                   'LoRA factors must be merged into the base weights before export')


R_EMBEDDER = 'time_text_embed_2'  # the official wrappers' TwinFlow r-embedder module


def r_embedder_family(name: str, class_names: tuple[str, ...], config_type: type,
                      renames: Sequence[tuple[str, str]]) -> DiffusersFamily:
  """A family named by `standard_param_key(path, renames)` whose TwinFlow r-embedder
  `time_text_embed_2` (Flux, Qwen-Image) may be absent from a base checkpoint.

  With `r_embedder_init` 'copy', an absent r-embedder tensor is read from the same
  tensor of `time_text_embed` (the official `init_time_embed_2_weights`). The model
  config takes `config_type.DIFFUSERS_FIELDS` from config.json; export writes
  `cfg.diffusers_config()`.
  """

  def param_key(cfg: Any, path: tuple) -> tuple[str, Transform]:
    del cfg
    return standard_param_key(path, renames)

  def init_from(cfg: Any, path: tuple) -> str | None:
    names = [str(p) for p in path if str(p) != 'base_module']
    if cfg.r_embedder_init != 'copy' or names[0] != R_EMBEDDER:
      return None
    key, _ = param_key(cfg, ('time_text_embed',) + tuple(path[1:]))
    return key

  def optional(cfg: Any, path: tuple) -> bool:
    del cfg
    return str(path[0]) == R_EMBEDDER

  def model_config(dcfg: Mapping[str, Any]) -> dict[str, Any]:
    out = {'name': name}
    out.update({k: dcfg[k] for k in config_type.DIFFUSERS_FIELDS if k in dcfg})
    return out

  return DiffusersFamily(name=name, class_names=class_names, model_config=model_config,
                         diffusers_config=lambda cfg: cfg.diffusers_config(),
                         param_key=param_key, optional=optional, init_from=init_from)


# ---------------------------------------------------------------------------------------
# Folders and configs.


def is_diffusers_dir(path: str) -> bool:
  """True for a folder with config.json and diffusion_pytorch_model*.safetensors."""
  if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))):
    return False
  return any(n.startswith(WEIGHTS_PREFIX) and n.endswith(('.safetensors', '.index.json'))
             for n in os.listdir(path))


def read_config(path: str) -> dict[str, Any]:
  """DIR/config.json as a dict (clear errors for a missing or broken file)."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'{path} is not a diffusers model folder: no {CONFIG_FILE}')
  return read_config_json(file)


def family_for(diffusers_cfg: Mapping[str, Any], path: str = '') -> DiffusersFamily:
  """The registered family whose class_names contain config.json's `_class_name`."""
  name = diffusers_cfg.get('_class_name')
  for fam in families().values():
    if name in fam.class_names:
      return fam
  known = sorted(n for f in families().values() for n in f.class_names)
  raise ValueError(f'{path or "config.json"}: diffusers _class_name {name!r} is not '
                   f'supported; supported: {known}')


def model_config_from_dir(path: str, overrides: Mapping[str, Any] | None = None
                          ) -> dict[str, Any]:
  """Our model config dict for a diffusers folder: its config.json plus `overrides`.

  Overrides are runtime fields (dtype, param_dtype, remat, attention, r_embedder, ...);
  the result also records 'pretrained': path.
  """
  dcfg = read_config(path)
  fam = family_for(dcfg, path)
  cfg = fam.model_config(dcfg)
  cfg['pretrained'] = os.path.abspath(path)
  cfg.update(overrides or {})
  if cfg.get('name') != fam.name:
    raise ValueError(f"model config field 'name' is {cfg.get('name')!r} but {path} holds "
                     f'a {fam.name!r} model')
  return cfg


# ---------------------------------------------------------------------------------------
# Reading.


def _family_of_model(model: nnx.Module) -> tuple[DiffusersFamily, Any]:
  cfg = getattr(model, 'config', None)
  for fam in families().values():
    if getattr(cfg, 'name', None) == fam.name:
      return fam, cfg
  raise ValueError(f'{type(model).__name__} has no diffusers family; supported model '
                   f'names: {sorted(families())}')


def _plan(fam: DiffusersFamily, cfg: Any, src: SafetensorsFolder,
          targets: Mapping[tuple, Any]) -> tuple[dict[tuple, tuple[str, Transform]], list]:
  """Matches parameters and checkpoint keys; returns (plan, optional paths absent)."""
  plan, absent, missing, wrong = {}, [], [], []
  for path, target in targets.items():
    key, tr = fam.param_key(cfg, path)
    if key not in src and fam.optional(cfg, path):
      key = fam.init_from(cfg, path) or key
    if key not in src:
      if fam.optional(cfg, path):
        absent.append(path)
      else:
        missing.append(key)
      continue
    want = tr.source_shape(tuple(target.shape))
    if tuple(src.shape(key)) != want:
      wrong.append(f'{key}: checkpoint {tuple(src.shape(key))} vs model {want} '
                   f'({path_name(path)})')
    plan[path] = (key, tr)
  used = {k for k, _ in plan.values()}
  buffers = set(fam.buffers(cfg))
  unexpected = sorted(k for k in src.keys() if k not in used and k not in buffers)
  if missing or unexpected or wrong:
    raise ValueError(
        f'checkpoint {src.path} does not match the {fam.name} model: missing keys '
        f'{sorted(missing)}, unexpected keys {unexpected}, shape mismatches {wrong}')
  if fam.check_buffer is not None:
    for key in sorted(buffers & set(src.keys())):
      fam.check_buffer(cfg, src, key)
  return plan, absent


def _index_key(index: Index) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


def _read_param(src: SafetensorsFolder, key: str, tr: Transform, shape, dtype,
                sharding) -> jax.Array:
  """One parameter, each addressable shard read and converted on its own."""
  cache = {}

  def block(index: Index) -> np.ndarray:
    k = _index_key(index)
    if k not in cache:  # replicas of a shard on several local devices: read once
      cache[k] = np.asarray(tr.read(src, key, index)).astype(dtype, copy=False)
    return cache[k]

  arr = jax.make_array_from_callback(tuple(shape), sharding, block)
  cache.clear()
  return arr


def read_params(src: SafetensorsFolder, fam: DiffusersFamily, cfg: Any,
                targets: Mapping[tuple, Any], *,
                progress: Callable[[str], None] | None = None
                ) -> tuple[dict[tuple, jax.Array], list[tuple]]:
  """Reads every parameter of `targets` from the checkpoint, straight into its sharding.

  Args:
    src: the open checkpoint.
    fam, cfg: the family and the resolved model config.
    targets: {parameter path: array or ShapeDtypeStruct with .shape, .dtype and a
      .sharding (None = the default device)}.
    progress: called with each key once read.

  Returns:
    ({path: jax.Array in the target dtype and sharding}, [optional paths the checkpoint
    lacks]).
  """
  plan, absent = _plan(fam, cfg, src, targets)
  out = {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for path, (key, tr) in plan.items():
    t = targets[path]
    sharding = getattr(t, 'sharding', None) or default
    out[path] = _read_param(src, key, tr, t.shape, np.dtype(t.dtype), sharding)
    if progress:
      progress(key)
  return out, absent


# The weights a diffusers checkpoint holds: every nnx.Param but LoRA factors (an
# `nnx.LoRA` wrapping a layer keeps the layer's weights under `base_module`).
BASE_WEIGHTS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def _flat_params(model: nnx.Module, which=BASE_WEIGHTS) -> dict[tuple, Any]:
  """{parameter path: value} of a model (values may be abstract)."""
  return flatten(nnx.to_pure_dict(nnx.state(model, which)))


def _set_params(model: nnx.Module, values: Mapping[tuple, Any]) -> None:
  state = nnx.state(model, BASE_WEIGHTS)
  flat = flatten(nnx.to_pure_dict(state))
  flat.update(values)
  nnx.replace_by_pure_dict(state, unflatten(flat))
  nnx.update(model, state)


def load_into(model: nnx.Module, path: str, *,
              progress: Callable[[str], None] | None = None) -> nnx.Module:
  """Fills an existing (possibly sharded) model from a diffusers folder, in place.

  Every parameter keeps its dtype and sharding; optional parameters the checkpoint lacks
  keep their values, and so do LoRA factors (`nnx.LoRAParam`) of layers wrapped by
  `nnx.LoRA`, whose base weights load under the layer's name. The folder's config.json
  must describe the model's architecture (checked through the parameter shapes).
  """
  fam, cfg = _family_of_model(model)
  dcfg = read_config(path)
  if dcfg.get('_class_name') not in fam.class_names:
    raise ValueError(f'{path}: _class_name {dcfg.get("_class_name")!r} is not a '
                     f'{fam.name} model ({fam.class_names})')
  with SafetensorsFolder(path, WEIGHTS_PREFIX) as src:
    values, _ = read_params(src, fam, cfg, _flat_params(model), progress=progress)
  _set_params(model, values)
  return model


def _mesh_context(mesh, rules):
  """Context managers that make parameter creation follow `rules` on `mesh`."""
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(jax.set_mesh(mesh))
    if rules is not None or not core_spmd.get_logical_axis_rules():
      stack.enter_context(nnx.logical_axis_rules(rules or DEFAULT_LOGICAL_AXIS_RULES))
  return stack


def load_model(path: str, overrides: Mapping[str, Any] | None = None, *,
               mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, Any]] | None = None, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> nnx.Module:
  """Builds a model from a diffusers folder and loads its weights, sharded on `mesh`.

  The model is created abstractly; each parameter is then read shard by shard into its
  NamedSharding (from `rules`, default `DEFAULT_LOGICAL_AXIS_RULES`). Optional parameters
  the checkpoint lacks (the TwinFlow r-embedder) are initialised by a jitted init whose
  outputs are only those parameters (XLA drops the rest of the init).

  Args:
    path: diffusers model folder (config.json + safetensors).
    overrides: model config overrides (dtype, param_dtype, remat, attention, r_embedder).
    mesh: device mesh (None: single device, unsharded).
    rules: logical-axis rules (default: the active ones, else the defaults).
    seed: init seed of the optional parameters.
    progress: called with each key once read.

  Returns:
    The model; its `config` records the resolved config.
  """
  from twinflow_jax.models.factory import create_model  # pylint: disable=g-import-not-at-top
  model_cfg = model_config_from_dir(path, overrides)
  with _mesh_context(mesh, rules), nnx.use_eager_sharding(False):
    make = lambda: create_model(model_cfg, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(make)
    abs_flat = _flat_params(abstract)
    if mesh is not None:
      shardings = flatten(nnx.to_pure_dict(
          nnx.get_named_sharding(nnx.state(abstract, nnx.Param), mesh)))
    else:  # committed to one device, like the arrays read from the checkpoint
      one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = {p: one for p in abs_flat}
    targets = {p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[p])
               for p, v in abs_flat.items()}
    fam, cfg = _family_of_model(abstract)
    with SafetensorsFolder(path, WEIGHTS_PREFIX) as src:
      values, absent = read_params(src, fam, cfg, targets, progress=progress)
    if absent:
      values.update(_init_subset(make, absent, targets))
  _set_params(abstract, values)
  return abstract


def _init_subset(make: Callable[[], nnx.Module], paths: list[tuple],
                 targets: Mapping[tuple, Any]) -> dict[tuple, jax.Array]:
  """Initial values of some parameters only, created directly in their shardings."""
  out_sh = tuple(targets[p].sharding for p in paths)

  def init():
    flat = _flat_params(make())
    return tuple(flat[p] for p in paths)

  vals = jax.jit(init, out_shardings=out_sh)()
  return dict(zip(paths, vals))


# ---------------------------------------------------------------------------------------
# Writing.


def _gather(a: jax.Array) -> np.ndarray:
  """The full value of one (possibly multi-process) array on every process.

  Assembled from the shards into a fresh numpy array: `np.asarray(a)` / `device_get`
  would also cache a host copy on the array object, and over a whole export that cache
  would hold the entire model in host memory.
  """
  if getattr(a, 'is_fully_addressable', True):
    host = np.empty(a.shape, a.dtype)
    for shard in a.addressable_shards:
      if shard.replica_id == 0:
        host[shard.index] = np.asarray(shard.data)
    return host
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def export(model: nnx.Module, out_dir: str, *, dtype: str | None = None,
           max_shard_bytes: int = 10 * 2**30,
           progress: Callable[[str], None] | None = None) -> list[str]:
  """Writes the model as a diffusers folder (config.json + safetensors [+ index]).

  Every process must call it (the gathers are collective); only process 0 writes. Host
  memory holds one gathered tensor at a time.

  Args:
    model: a model of a registered family (LoRA factors merged into the base weights
      first; `base_module` path segments are dropped from the names).
    out_dir: target folder; must not already hold a diffusers model.
    dtype: 'float32' | 'bfloat16' | 'float16' for the written weights (default: each
      parameter's own dtype).
    max_shard_bytes: split into numbered shards with an index above this size.
    progress: called with each key once written.

  Returns:
    The written file names (process 0; [] elsewhere).
  """
  fam, cfg = _family_of_model(model)
  if is_diffusers_dir(out_dir) or os.path.isfile(os.path.join(out_dir, CONFIG_FILE)):
    raise ValueError(f'{out_dir} already holds a diffusers model; choose a new folder')
  out_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
  lora = sorted(path_name(p) for p in _flat_params(model, nnx.LoRAParam))
  if lora:
    raise ValueError(f'the model has LoRA factors ({lora[:4]}{" ..." if len(lora) > 4 else ""}'
                     '); merge them into the base weights before exporting')
  items = []
  for path, arr in _flat_params(model, nnx.Param).items():
    key, tr = fam.param_key(cfg, path)
    dt = out_dtype or np.dtype(arr.dtype)
    shape = tr.source_shape(tuple(arr.shape))
    items.append(TensorOut(key, shape, dt,
                           lambda arr=arr, tr=tr, dt=dt: tr.to_torch(_gather(arr)).astype(dt)))
  # Buffers (fixed tables) follow the weights' dtype when it is uniform, as in
  # diffusers' `model.to(dtype)`.
  dts = {t.dtype for t in items}
  buf_dtype = out_dtype or (dts.pop() if len(dts) == 1 else np.dtype(np.float32))
  for key, buf in fam.buffers(cfg).items():
    items.append(TensorOut(key, tuple(buf.shape), buf_dtype, lambda b=buf, dt=buf_dtype: (
        np.asarray(c).astype(dt) for c in b.chunks())))
  items.sort(key=lambda t: t.key)
  if jax.process_index() != 0:
    for t in items:  # take part in the collective gathers
      t.produce()
    return []
  names = write_safetensors_folder(out_dir, items, prefix=WEIGHTS_PREFIX,
                                   max_shard_bytes=max_shard_bytes, progress=progress)
  dcfg = {'_class_name': fam.class_names[0], '_diffusers_version': '0.32.0'}
  dcfg.update(fam.diffusers_config(cfg))
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(dcfg, f, indent=2)
  return names + [CONFIG_FILE]


def num_bytes(model: nnx.Module) -> int:
  """Bytes of the model's parameters (as stored)."""
  return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
             for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
