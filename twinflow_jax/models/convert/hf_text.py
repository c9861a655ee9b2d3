"""Hugging Face transformers text encoders -> the Flax text encoders.

Reads a transformers model folder, as the text_encoder*/ sub-folders of a diffusers
pipeline hold them: `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Supported architectures:

  CLIPTextModel, CLIPTextModelWithProjection    -> models.clip_text.CLIPTextEncoder
  T5EncoderModel                                -> models.t5.T5Encoder
  Qwen2_5_VLForConditionalGeneration (its language model; the vision tower and the LM
  head are not read), Qwen2_5_VLTextModel, Qwen2Model, Qwen2ForCausalLM
                                                -> models.qwen2_text.Qwen2TextModel

Tensors are read one at a time from memory-mapped files (the safetensors layout: an
8-byte little-endian header length, a JSON header of dtype, shape and byte offsets, then
raw little-endian data), so a 9 GB T5-XXL never needs a second copy in host memory.
bfloat16 tensors are viewed with ml_dtypes' bfloat16, which numpy lacks (the
`safetensors` package's numpy backend refuses them). Each tensor is transposed to the
Flax layout, cast to the parameter dtype and placed with the parameter's sharding
before the next one is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from twinflow_jax.models.convert.safetensors_io import read_header
from twinflow_jax.models.param_tree import flatten, path_name, unflatten
from twinflow_jax.models.qwen2_text import Qwen2TextConfig, Qwen2TextModel
from twinflow_jax.models.sharding import DEFAULT_LOGICAL_AXIS_RULES
from twinflow_jax.models.t5 import T5Config, T5Encoder

_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
KINDS = ('clip', 't5', 'qwen2')


class SafetensorsFolder:
  """Lazy reader of the safetensors weights of a transformers model folder."""

  def __init__(self, folder: str):
    self.folder = folder
    self._headers: dict[str, dict[str, Any]] = {}
    self._maps: dict[str, np.memmap] = {}
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
      with open(index, encoding='utf-8') as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ValueError(f'{index} has no "weight_map"')
      self._files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
      return
    found = sorted(f for f in os.listdir(folder) if f.endswith('.safetensors'))
    if 'model.safetensors' in found:
      found = ['model.safetensors']
    if len(found) != 1:
      raise FileNotFoundError(
          f'{folder} has no model.safetensors or model.safetensors.index.json '
          f'(found {found or "no .safetensors files"}); text encoders are read from '
          'safetensors weights, not from PyTorch .bin files')
    path = os.path.join(folder, found[0])
    self._headers[path] = _read_header(path)
    self._files = {k: path for k in self._headers[path] if k != '__offset__'}

  def keys(self) -> list[str]:
    return list(self._files)

  def __contains__(self, key: str) -> bool:
    return key in self._files

  def get(self, key: str) -> np.ndarray:
    """The tensor `key` as a numpy array (a view of the mapped file)."""
    path = self._files.get(key)
    if path is None:
      raise KeyError(key)
    if path not in self._headers:
      if not os.path.isfile(path):
        raise FileNotFoundError(f'weight shard {path} (listed in the index of '
                                f'{self.folder}) is missing')
      self._headers[path] = _read_header(path)
    header, offset = self._headers[path][key], self._headers[path]['__offset__']
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode='r')
    dtype = _DTYPES.get(header['dtype'])
    if dtype is None:
      raise ValueError(f'{path}: tensor {key!r} has unsupported dtype {header["dtype"]}')
    start, end = header['data_offsets']
    raw = self._maps[path][offset + start:offset + end]
    return raw.view(np.dtype(dtype).newbyteorder('<')).reshape(header['shape'])


def _read_header(path: str) -> dict[str, Any]:
  header, offset = read_header(path)
  header.pop('__metadata__', None)
  header['__offset__'] = offset
  return header


def read_config(folder: str) -> dict[str, Any]:
  """config.json of a transformers model folder."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no config.json in {folder}: not a transformers model folder')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _field(cfg: dict, name: str, folder: str, *alts: str):
  for key in (name,) + alts:
    if key in cfg and cfg[key] is not None:
      return cfg[key]
  raise ValueError(f'{folder}/config.json lacks {name!r}')


# ---------------------------------------------------------------------------
# Configs.


def clip_config(cfg: dict, folder: str = '.', *,
                with_projection: bool) -> CLIPTextConfig:
  """transformers CLIPTextConfig (or a CLIPConfig's text_config) -> CLIPTextConfig."""
  cfg = {**cfg, **(cfg.get('text_config') or {})}
  f = lambda n, *a: _field(cfg, n, folder, *a)
  return CLIPTextConfig(
      vocab_size=f('vocab_size'), hidden_size=f('hidden_size'),
      intermediate_size=f('intermediate_size'), num_layers=f('num_hidden_layers'),
      num_heads=f('num_attention_heads'),
      max_positions=cfg.get('max_position_embeddings', 77),
      hidden_act=cfg.get('hidden_act', 'quick_gelu'),
      layer_norm_eps=cfg.get('layer_norm_eps', 1e-5),
      eos_token_id=cfg.get('eos_token_id', 2),
      projection_dim=f('projection_dim') if with_projection else None)


def t5_config(cfg: dict, folder: str = '.') -> T5Config:
  """transformers T5Config -> T5Config (feed_forward_proj 'gated-gelu' or 'relu' ...)."""
  f = lambda n, *a: _field(cfg, n, folder, *a)
  proj = cfg.get('feed_forward_proj', 'relu')
  parts = proj.split('-')
  gated = parts[0] == 'gated' and len(parts) == 2
  act = parts[-1]
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f'{folder}/config.json: feed_forward_proj {proj!r} is not '
                     "'ACT' or 'gated-ACT'")
  if act == 'gelu':  # transformers maps 'gated-gelu' to the tanh approximation
    act = 'gelu_new'
  return T5Config(
      vocab_size=f('vocab_size'), d_model=f('d_model'), d_kv=f('d_kv'), d_ff=f('d_ff'),
      num_layers=f('num_layers'), num_heads=f('num_heads'),
      num_buckets=cfg.get('relative_attention_num_buckets', 32),
      max_distance=cfg.get('relative_attention_max_distance', 128),
      dense_act=act, gated=gated, layer_norm_eps=cfg.get('layer_norm_epsilon', 1e-6))


def qwen2_config(cfg: dict, folder: str = '.') -> Qwen2TextConfig:
  """Qwen2.5-VL / Qwen2 config (top-level or `text_config` fields) -> Qwen2TextConfig."""
  cfg = {**cfg, **(cfg.get('text_config') or {})}
  f = lambda n, *a: _field(cfg, n, folder, *a)
  if cfg.get('use_sliding_window'):
    raise ValueError(f'{folder}/config.json: use_sliding_window=true is not supported')
  rope = cfg.get('rope_parameters') or cfg.get('rope_scaling') or {}
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in ('default', 'mrope'):
    raise ValueError(f'{folder}/config.json: rope type {rope_type!r} is not supported '
                     "(only 'default' / 'mrope', which is 1-D RoPE for text)")
  heads = f('num_attention_heads')
  return Qwen2TextConfig(
      vocab_size=f('vocab_size'), hidden_size=f('hidden_size'),
      intermediate_size=f('intermediate_size'), num_layers=f('num_hidden_layers'),
      num_heads=heads, num_kv_heads=cfg.get('num_key_value_heads') or heads,
      head_dim=cfg.get('head_dim') or f('hidden_size') // heads,
      rms_norm_eps=cfg.get('rms_norm_eps', 1e-6),
      rope_theta=float(rope.get('rope_theta', cfg.get('rope_theta', 1e6))))


# ---------------------------------------------------------------------------
# Name maps: Flax parameter path -> (source key, transform of the source tensor).

Transform = Callable[[np.ndarray], np.ndarray]
NameMap = dict[tuple, tuple[str, Transform]]


def _same(a):
  return a


def _kernel(a):  # torch Linear weight [out, in] -> kernel [in, out]
  return a.T


def _split_out(n: int, h: int) -> Transform:  # [N*H, in] -> kernel [in, N, H]
  return lambda a: a.T.reshape(a.shape[1], n, h)


def _split_bias(n: int, h: int) -> Transform:
  return lambda a: a.reshape(n, h)


def _merge_in(n: int, h: int) -> Transform:  # [out, N*H] -> kernel [N, H, out]
  return lambda a: a.T.reshape(n, h, a.shape[0])


def _clip_map(cfg: CLIPTextConfig, keys) -> NameMap:
  p = 'text_model.' if any(k.startswith('text_model.') for k in keys) else ''
  n, h = cfg.num_heads, cfg.hidden_size // cfg.num_heads
  m: NameMap = {
      ('token_embedding',): (p + 'embeddings.token_embedding.weight', _same),
      ('position_embedding',): (p + 'embeddings.position_embedding.weight', _same),
      ('final_layer_norm', 'scale'): (p + 'final_layer_norm.weight', _same),
      ('final_layer_norm', 'bias'): (p + 'final_layer_norm.bias', _same),
  }
  for i in range(cfg.num_layers):
    s = f'{p}encoder.layers.{i}.'
    for ours, theirs in (('q', 'q_proj'), ('k', 'k_proj'), ('v', 'v_proj')):
      m[('layers', i, 'attn', ours, 'kernel')] = (s + f'self_attn.{theirs}.weight',
                                                  _split_out(n, h))
      m[('layers', i, 'attn', ours, 'bias')] = (s + f'self_attn.{theirs}.bias',
                                                _split_bias(n, h))
    m[('layers', i, 'attn', 'out', 'kernel')] = (s + 'self_attn.out_proj.weight',
                                                 _merge_in(n, h))
    m[('layers', i, 'attn', 'out', 'bias')] = (s + 'self_attn.out_proj.bias', _same)
    for ln in ('1', '2'):
      m[('layers', i, f'ln{ln}', 'scale')] = (s + f'layer_norm{ln}.weight', _same)
      m[('layers', i, f'ln{ln}', 'bias')] = (s + f'layer_norm{ln}.bias', _same)
    for fc in ('fc1', 'fc2'):
      m[('layers', i, fc, 'kernel')] = (s + f'mlp.{fc}.weight', _kernel)
      m[('layers', i, fc, 'bias')] = (s + f'mlp.{fc}.bias', _same)
  if cfg.projection_dim:
    m[('text_projection', 'kernel')] = ('text_projection.weight', _kernel)
  return m


def _t5_map(cfg: T5Config, keys) -> NameMap:
  n, h = cfg.num_heads, cfg.d_kv
  embed = 'shared.weight' if 'shared.weight' in keys else 'encoder.embed_tokens.weight'
  m: NameMap = {
      ('embedding',): (embed, _same),
      ('relative_attention_bias',): (
          'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight', _same),
      ('final_norm', 'scale'): ('encoder.final_layer_norm.weight', _same),
  }
  for i in range(cfg.num_layers):
    s = f'encoder.block.{i}.layer.'
    for w in ('q', 'k', 'v'):
      m[('blocks', i, 'attn', w, 'kernel')] = (s + f'0.SelfAttention.{w}.weight',
                                               _split_out(n, h))
    m[('blocks', i, 'attn', 'o', 'kernel')] = (s + '0.SelfAttention.o.weight',
                                               _merge_in(n, h))
    m[('blocks', i, 'attn_norm', 'scale')] = (s + '0.layer_norm.weight', _same)
    m[('blocks', i, 'ff_norm', 'scale')] = (s + '1.layer_norm.weight', _same)
    if cfg.gated:
      m[('blocks', i, 'ff', 'wi_0', 'kernel')] = (s + '1.DenseReluDense.wi_0.weight',
                                                  _kernel)
      m[('blocks', i, 'ff', 'wi_1', 'kernel')] = (s + '1.DenseReluDense.wi_1.weight',
                                                  _kernel)
    else:
      m[('blocks', i, 'ff', 'wi_0', 'kernel')] = (s + '1.DenseReluDense.wi.weight',
                                                  _kernel)
    m[('blocks', i, 'ff', 'wo', 'kernel')] = (s + '1.DenseReluDense.wo.weight', _kernel)
  return m


def _qwen2_prefix(keys) -> str:
  """Prefix of the language model's tensors ('model.', 'model.language_model.', ...)."""
  hits = [k[:-len('embed_tokens.weight')] for k in keys
          if k.endswith('embed_tokens.weight') and 'visual' not in k]
  if len(hits) != 1:
    raise ValueError('cannot find the language model\'s "embed_tokens.weight" '
                     f'(found {hits})')
  return hits[0]


def _qwen2_map(cfg: Qwen2TextConfig, keys) -> NameMap:
  p = _qwen2_prefix(keys)
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  m: NameMap = {
      ('embedding',): (p + 'embed_tokens.weight', _same),
      ('norm', 'scale'): (p + 'norm.weight', _same),
  }
  for i in range(cfg.num_layers):
    s = f'{p}layers.{i}.'
    for w, heads in (('q', n), ('k', k), ('v', k)):
      m[('layers', i, 'attn', w, 'kernel')] = (s + f'self_attn.{w}_proj.weight',
                                               _split_out(heads, h))
      m[('layers', i, 'attn', w, 'bias')] = (s + f'self_attn.{w}_proj.bias',
                                             _split_bias(heads, h))
    m[('layers', i, 'attn', 'o', 'kernel')] = (s + 'self_attn.o_proj.weight',
                                               _merge_in(n, h))
    m[('layers', i, 'input_norm', 'scale')] = (s + 'input_layernorm.weight', _same)
    m[('layers', i, 'post_attn_norm', 'scale')] = (
        s + 'post_attention_layernorm.weight', _same)
    for w in ('gate', 'up', 'down'):
      m[('layers', i, w, 'kernel')] = (s + f'mlp.{w}_proj.weight', _kernel)
  return m


# ---------------------------------------------------------------------------
# Loading.


def load_text_encoder(folder: str, kind: str, *, dtype: Any = jnp.float32,
                      mesh: jax.sharding.Mesh | None = None,
                      rules=DEFAULT_LOGICAL_AXIS_RULES) -> nnx.Module:
  """Builds a Flax text encoder from a transformers model folder.

  Args:
    folder: holds config.json and the safetensors weights.
    kind: 'clip' (CLIPTextModel[WithProjection]; the projection is loaded when the
      weights have `text_projection.weight`), 't5' (T5EncoderModel) or 'qwen2'
      (the language model of Qwen2.5-VL / Qwen2).
    dtype: parameter and compute dtype (float32 or bfloat16); norms and softmax stay
      in float32.
    mesh: when given, parameters are placed sharded by their logical axis names under
      `rules` (with fsdp = 1 and tensor = 1 they are replicated); else on the default
      device.
    rules: logical axis rules for the mesh.

  Returns:
    The encoder module, its config at `.config`.

  Raises:
    FileNotFoundError: missing folder, config.json or weights.
    ValueError: unknown kind, unsupported config, missing or mis-shaped tensors (the
      message names the tensor and the folder).
  """
  if kind not in KINDS:
    raise ValueError(f'unknown text encoder kind {kind!r}; choose from {KINDS}')
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'text encoder folder {folder} does not exist')
  hf = read_config(folder)
  weights = SafetensorsFolder(folder)
  keys = weights.keys()
  if kind == 'clip':
    cfg = clip_config(hf, folder, with_projection='text_projection.weight' in keys)
    build, names = CLIPTextEncoder, _clip_map
  elif kind == 't5':
    cfg = t5_config(hf, folder)
    build, names = T5Encoder, _t5_map
  else:
    cfg = qwen2_config(hf, folder)
    build, names = Qwen2TextModel, _qwen2_map
  dtype = jnp.dtype(dtype)

  def make():
    return build(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))

  if mesh is None:
    with nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(make)
    shardings = None
  else:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      abstract = nnx.eval_shape(make)
      shardings = flatten(nnx.to_pure_dict(
          nnx.get_named_sharding(nnx.state(abstract, nnx.Param), mesh)))
  graphdef, state = nnx.split(abstract)
  params = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  mapping = names(cfg, keys)
  missing = sorted({key for key, _ in mapping.values() if key not in weights})
  if missing:
    raise ValueError(f'{folder} lacks tensors {missing[:5]}'
                     f'{" ..." if len(missing) > 5 else ""} of a {kind} text encoder')
  unmapped = sorted(path_name(p) for p in params if p not in mapping)
  if unmapped:  # a bug in the name maps, not a user error
    raise AssertionError(f'no source tensor for parameters {unmapped}')
  loaded = {}
  for path, target in params.items():
    key, transform = mapping[path]
    value = transform(weights.get(key))
    if value.shape != tuple(target.shape):
      raise ValueError(f'{folder}: tensor {key!r} gives shape {value.shape} for '
                       f'{path_name(path)}, the config.json sizes expect '
                       f'{tuple(target.shape)}')
    value = np.array(value, dtype)  # a copy: device arrays never alias the mapped file
    loaded[path] = (jax.device_put(value) if shardings is None
                    else jax.device_put(value, shardings[path]))
  nnx.replace_by_pure_dict(state, unflatten(loaded))
  return nnx.merge(graphdef, state)
