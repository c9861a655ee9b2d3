"""PyTorch DiT / SiT state dict -> Flax `DiT` parameters.

Source layout: `facebookresearch/DiT` and `willisma/SiT` `models.py` (same
module tree: x_embedder.proj, t_embedder.mlp.{0,2}, y_embedder.embedding_table,
pos_embed, blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}).

Time conventions (`source`):
  'sit'      SiT / REPA velocity models on the linear interpolant
             x = t_sit x_data + (1 - t_sit) noise, output v = data - noise.
             With TwinFlow's x_t = t z + (1 - t) x: t_sit = 1 - t and
             F_twinflow = z - x = -v_sit. The model gets
             time_convention='sit': network time 1 - t (unscaled, as SiT
             embeds t in [0, 1]), output negated.
  'twinflow' weights that already follow TwinFlow (network time 1000 t,
             output F): loaded as is.
  'dit'      rejected. DiT checkpoints predict DDPM noise (and sigma) at
             integer timesteps of a VP schedule. Turning that into a TwinFlow
             velocity needs a non-affine input rescaling, an inversion of the
             beta schedule, and x_hat = (x_t - t eps) / (1 - t), which is
             singular at t = 1 -- exactly where TwinFlow's one-step generator
             is evaluated. Start from SiT (same architecture) instead.
The learned-sigma half of the output (DiT, SiT-XL/2 256x256) is dropped unless
the model keeps it (learn_sigma=True). The target-time embedder is not in the
source: with r_embedder_init='copy' it becomes a copy of the time embedder,
with 'small' the model's own small-random init is kept.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models.configs import DiTConfig
from twinflow_jax.models.embeddings import sincos_2d_pos_embed
from twinflow_jax.models.param_tree import flatten, path_name, unflatten

SOURCES = {'sit': 'sit', 'twinflow': 'twinflow'}  # source -> time_convention


def time_convention_for(source: str) -> str:
  """Checkpoint source ('sit' | 'twinflow') -> the model's time_convention."""
  if source == 'dit':
    raise ValueError(
        "source 'dit' (DDPM noise prediction) cannot be mapped to a TwinFlow "
        'velocity: the eps -> velocity map divides by (1 - t) and is singular '
        'at t = 1, where the one-step generator runs. Use a SiT checkpoint '
        '(same architecture, velocity prediction) instead.')
  if source not in SOURCES:
    raise ValueError(f'checkpoint source {source!r} not in {tuple(SOURCES)} '
                     "(or 'dit', which is rejected)")
  return SOURCES[source]


def infer_dit_fields(sd: dict[str, np.ndarray]) -> dict[str, Any]:
  """Reads architecture fields from a DiT/SiT state dict.

  Returns:
    dict with depth, hidden_size, patch_size, in_channels, num_classes,
    learn_sigma and (when pos_embed is present) input_size.
  """
  for k in ('x_embedder.proj.weight', 'y_embedder.embedding_table.weight',
            'final_layer.linear.weight'):
    if k not in sd:
      raise ValueError(f'not a DiT/SiT state dict: missing {k!r}')
  d, c, p, p2 = sd['x_embedder.proj.weight'].shape
  if p != p2:
    raise ValueError(f'non-square patch {p}x{p2} is not supported')
  depth = 1 + max(int(m.group(1)) for k in sd
                  if (m := re.match(r'blocks\.(\d+)\.', k)))
  out = sd['final_layer.linear.weight'].shape[0] // (p * p)
  rows = sd['y_embedder.embedding_table.weight'].shape[0]
  fields = dict(depth=depth, hidden_size=d, patch_size=p, in_channels=c,
                num_classes=rows - 1, learn_sigma=out == 2 * c)
  if 'pos_embed' in sd:
    g = int(round(np.sqrt(sd['pos_embed'].shape[1])))
    fields['input_size'] = g * p
  return fields


def convert_dit_state_dict(sd: dict[str, np.ndarray],
                           cfg: DiTConfig) -> dict[str, Any]:
  """Maps a DiT/SiT state dict to the Flax DiT parameter tree.

  Args:
    sd: {torch name: array}, e.g. from `read_state_dict`.
    cfg: the target model config (sizes must match the checkpoint).

  Returns:
    Nested dict shaped like `nnx.to_pure_dict(nnx.state(DiT(cfg), nnx.Param))`
    (block indices as int keys), float32. The r-embedder is included (a copy
    of the time embedder) only when cfg.r_embedder_init == 'copy'.

  Raises:
    ValueError: missing / unexpected keys, or sizes that contradict cfg
      (the message names the config field).
  """
  d, n, p, c = cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.in_channels
  used = set()

  def get(key, shape):
    if key not in sd:
      raise ValueError(f'checkpoint is missing {key!r}')
    used.add(key)
    a = np.asarray(sd[key], np.float32)
    if a.shape != tuple(shape):
      raise ValueError(f'checkpoint {key!r} has shape {a.shape}, the model '
                       f'({cfg.name}, hidden_size={d}, patch_size={p}, '
                       f'in_channels={c}, num_classes={cfg.num_classes}) '
                       f'expects {tuple(shape)}')
    return a

  def linear(prefix, d_in, d_out):
    return {'kernel': get(prefix + '.weight', (d_out, d_in)).T,
            'bias': get(prefix + '.bias', (d_out,))}

  fields = infer_dit_fields(sd)
  for f in ('depth', 'hidden_size', 'patch_size', 'in_channels',
            'num_classes'):
    if fields[f] != getattr(cfg, f):
      raise ValueError(f'model config field {f!r} is {getattr(cfg, f)} but '
                       f'the checkpoint has {fields[f]}')

  # Conv [D, C, p, p] -> [(i, j, c), D], the row order of `patchify`.
  w = get('x_embedder.proj.weight', (d, c, p, p))
  x_embedder = {'kernel': w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
                'bias': get('x_embedder.proj.bias', (d,))}
  f = cfg.freq_dim
  t_embedder = {'fc1': linear('t_embedder.mlp.0', f, d),
                'fc2': linear('t_embedder.mlp.2', d, d)}
  table = get('y_embedder.embedding_table.weight', (cfg.num_classes + 1, d))

  if 'pos_embed' in sd:
    gh, gw = cfg.grid
    pos = get('pos_embed', (1, gh * gw, d))[0]
    if np.abs(pos - sincos_2d_pos_embed(d, gh, gw)).max() > 1e-4:
      raise ValueError("checkpoint 'pos_embed' is not DiT's fixed 2-D sin-cos "
                       f'table for a {gh}x{gw} grid (model config field '
                       "'input_size' wrong?)")

  blocks = {}
  m = cfg.mlp_dim
  for i in range(cfg.depth):
    b = f'blocks.{i}.'
    qkv = linear(b + 'attn.qkv', d, 3 * d)
    proj = linear(b + 'attn.proj', d, d)
    blocks[i] = {
        # Linear(D, 3D) rows are ordered (3, heads, head_dim), as timm splits.
        'qkv': {'proj': {'kernel': qkv['kernel'].reshape(d, 3, n, d // n),
                         'bias': qkv['bias'].reshape(3, n, d // n)}},
        'attn_out': {'kernel': proj['kernel'].reshape(n, d // n, d),
                     'bias': proj['bias']},
        'mlp': {'fc1': linear(b + 'mlp.fc1', d, m),
                'fc2': linear(b + 'mlp.fc2', m, d)},
        'modulation': {'proj': linear(b + 'adaLN_modulation.1', d, 6 * d)},
    }

  src_out = sd['final_layer.linear.weight'].shape[0] // (p * p)
  if src_out not in (c, 2 * c):
    raise ValueError(f"checkpoint final layer has {src_out} channels; expected "
                     f'{c} or {2 * c} (in_channels={c})')
  want_out = 2 * c if cfg.learn_sigma else c
  if want_out > src_out:
    raise ValueError("model config field 'learn_sigma' is True but the "
                     'checkpoint has no sigma channels')
  lin = linear('final_layer.linear', d, p * p * src_out)
  # Output rows are ordered (i, j, channel): keep the first want_out channels.
  kernel = lin['kernel'].reshape(d, p, p, src_out)[..., :want_out]
  bias = lin['bias'].reshape(p, p, src_out)[..., :want_out]
  final_layer = {
      'linear': {'kernel': kernel.reshape(d, p * p * want_out),
                 'bias': bias.reshape(p * p * want_out)},
      'modulation': {'proj': linear('final_layer.adaLN_modulation.1', d,
                                    2 * d)},
  }

  unexpected = sorted(set(sd) - used)
  if unexpected:
    raise ValueError(f'checkpoint has keys the DiT does not use: {unexpected}')

  time_embedder = {'t_embedder': t_embedder}
  if cfg.r_embedder_init == 'copy':
    time_embedder['r_embedder'] = {k: dict(v) for k, v in t_embedder.items()}
  return {'x_embedder': x_embedder, 'time_embedder': time_embedder,
          'y_embedder': {'embedding': table}, 'blocks': blocks,
          'final_layer': final_layer}


def load_torch_dit(model, sd: dict[str, np.ndarray]) -> None:
  """Loads a DiT/SiT state dict into an existing (possibly sharded) DiT.

  Parameters absent from the result of `convert_dit_state_dict` (the
  r-embedder with r_embedder_init='small') keep their current values; the
  others take the model's dtype and sharding.

  Args:
    model: a `DiT` whose config matches the checkpoint's sizes.
    sd: {torch name: array}.
  """
  if not isinstance(getattr(model, 'config', None), DiTConfig):
    raise ValueError('load_torch_dit needs a twinflow_jax.models.DiT, got '
                     f'{type(model).__name__}')
  tree = convert_dit_state_dict(sd, model.config)
  state = nnx.state(model, nnx.Param)
  current = flatten(nnx.to_pure_dict(state))
  new = {}
  for path, value in flatten(tree).items():
    old = current.get(path)
    name = path_name(path)
    if old is None:
      raise ValueError(f'converted parameter {name} does not exist in the '
                       'model')
    if tuple(old.shape) != value.shape:
      raise ValueError(f'converted parameter {name} has shape {value.shape}, '
                       f'model has {tuple(old.shape)}')
    sharding = getattr(old, 'sharding', None)
    arr = jnp.asarray(value, old.dtype)
    new[path] = arr if sharding is None else jax.device_put(arr, sharding)
  merged = dict(current)
  merged.update(new)
  nnx.replace_by_pure_dict(state, unflatten(merged))
  nnx.update(model, state)

