"""Pretrained-weight handoff: an Orbax checkpoint of parameters + JSON config.

Layout of a pretrained directory (written by `save_pretrained` and the
`python -m twinflow_jax.models.convert` CLI):
  DIR/params/             Orbax StandardCheckpointer item: the nested dict of
                          nnx.Param arrays (list indices as string keys).
  DIR/model_config.json   the model config ({'name': ..., overrides}).
A trainer builds the model from the JSON (adding its own dtype / remat /
attention overrides), possibly sharded, then calls `load_pretrained`.

`load_pretrained` also accepts a diffusers model folder (config.json +
diffusion_pytorch_model*.safetensors, e.g. the `transformer/` folder of SD3.5) for the
families of `models/convert/diffusers.py`: the weights are then read tensor by tensor
straight into the model's shardings, with no conversion step.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from twinflow_jax.models.param_tree import flatten, path_name, unflatten

PARAMS_DIR = 'params'
CONFIG_FILE = 'model_config.json'
# Fields that change what the weights mean without changing their shapes.
_SEMANTIC_FIELDS = ('time_convention',)


def _str_keys(tree):
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def save_pretrained(model: nnx.Module, out_dir: str,
                    model_config: Mapping[str, Any] | Any) -> str:
  """Writes the model's parameters and config to out_dir (created).

  Args:
    model: the model whose nnx.Param state is saved.
    out_dir: target directory; must not already hold a checkpoint.
    model_config: the config to store (dict / ConfigDict / resolved config).

  Returns:
    The absolute directory path.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, PARAMS_DIR)):
    raise ValueError(f'{out_dir} already holds a checkpoint')
  os.makedirs(out_dir, exist_ok=True)
  cfg = (model_config.to_dict() if hasattr(model_config, 'to_dict') else
         dict(model_config))
  params = _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, PARAMS_DIR), params)
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
  return out_dir


def load_model_config(path: str) -> dict[str, Any]:
  """Reads DIR/model_config.json of a pretrained directory."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'no {CONFIG_FILE} in {path}')
  with open(file) as f:
    return json.load(f)


def load_pretrained(model: nnx.Module, path: str) -> nnx.Module:
  """Restores saved parameters into an existing, possibly sharded, model.

  Arrays are restored straight into the shardings the model's parameters
  already have. Shapes are checked first; a mismatch, a missing or an extra
  parameter raises ValueError listing them. When both the stored config and
  the model have a `time_convention`, they must agree.

  Args:
    model: model built with a compatible config (e.g. from
      `load_model_config(path)` plus runtime overrides).
    path: directory written by `save_pretrained` / the convert CLI, or a diffusers
      model folder of a supported family.

  Returns:
    The same model, updated in place.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
    # Imported lazily: the models do not depend on the conversion code.
    from twinflow_jax.models.convert import diffusers  # pylint: disable=g-import-not-at-top
    if diffusers.is_diffusers_dir(path):
      return diffusers.load_into(model, path)
  params_dir = os.path.join(path, PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f'no Orbax parameter checkpoint at {params_dir}')
  cfg = getattr(model, 'config', None)
  if os.path.isfile(os.path.join(path, CONFIG_FILE)) and cfg is not None:
    stored = load_model_config(path)
    model_fields = cfg.to_dict() if hasattr(cfg, 'to_dict') else {}
    for f in _SEMANTIC_FIELDS:
      if f in stored and f in model_fields and stored[f] != model_fields[f]:
        raise ValueError(f'checkpoint has {f}={stored[f]!r} but the model '
                         f'has {f}={model_fields[f]!r}')

  ckptr = ocp.StandardCheckpointer()
  saved = flatten(ckptr.metadata(params_dir).item_metadata.tree)
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  current = flatten(pure)
  by_str = {tuple(map(str, p)): p for p in current}
  missing = sorted(path_name(p) for p in by_str if p not in saved)
  extra = sorted(path_name(p) for p in saved if p not in by_str)
  wrong = [f'{path_name(p)}: checkpoint {tuple(saved[p].shape)} vs model '
           f'{tuple(current[q].shape)}' for p, q in by_str.items()
           if p in saved and tuple(saved[p].shape) != tuple(current[q].shape)]
  if missing or extra or wrong:
    raise ValueError(
        f'checkpoint {path} does not match the model: missing {missing}, '
        f'unexpected {extra}, shape mismatches {wrong}')

  def target(a):
    sharding = getattr(a, 'sharding', None)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  target_tree = unflatten({s: target(current[p]) for s, p in by_str.items()})
  restored = flatten(ckptr.restore(params_dir, target_tree))
  nnx.replace_by_pure_dict(state, 
      unflatten({p: restored[s] for s, p in by_str.items()}))
  nnx.update(model, state)
  return model
