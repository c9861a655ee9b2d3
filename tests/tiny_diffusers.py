"""Test helper: a 1- or 2-block diffusers folder cut from a committed tiny fixture.

The fixtures have 2-3 blocks; a training test compiles the TwinFlow step (about ten
network calls plus a backward pass), so one block keeps it fast. Parameters whose path and
shape exist in the fixture take its (random, non-zero) values; the rest (the last block is
context-pre-only in SD3, so its text-stream layers differ) keep a seeded random init.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.models import create_model
from twinflow_jax.models.convert import diffusers as dlib
from twinflow_jax.models.param_tree import flatten, unflatten


def one_block_folder(fixture: str, out: str, num_layers: int = 1) -> str:
  """Writes the cut to `out`; SD3 needs 2 blocks to have every projection (its last
  block is context-pre-only)."""
  with open(os.path.join(fixture, 'config.json')) as f:
    dcfg = json.load(f)
  dcfg['num_layers'] = num_layers
  if 'num_single_layers' in dcfg:
    dcfg['num_single_layers'] = 1
  if dcfg.get('dual_attention_layers'):
    dcfg['dual_attention_layers'] = [0]
  os.makedirs(out, exist_ok=True)
  src = dlib.load_model(fixture, {'param_dtype': 'float32'})
  fields = dlib.model_config_from_dir(fixture, {'r_embedder': False})
  fields.update({k: v for k, v in dcfg.items() if not k.startswith('_')})
  # Abstract build (no eager init: op-by-op initialisation compiles every shape).
  model = nnx.eval_shape(lambda: create_model(fields, rngs=nnx.Rngs(1)))
  have = flatten(nnx.to_pure_dict(nnx.state(src, nnx.Param)))
  state = nnx.state(model, nnx.Param)
  flat = flatten(nnx.to_pure_dict(state))
  rng = np.random.default_rng(2)
  for p, v in sorted(flat.items(), key=lambda kv: str(kv[0])):
    if p in have and have[p].shape == v.shape:
      flat[p] = have[p]
    else:   # random, non-zero
      flat[p] = jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype)
  nnx.replace_by_pure_dict(state, unflatten(flat))
  nnx.update(model, state)
  dlib.export(model, out)
  return out
