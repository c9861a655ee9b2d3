r"""CLI: checkpoints in and out of twinflow_jax.

  # PyTorch DiT/SiT checkpoint -> pretrained directory for the trainer
  python -m twinflow_jax.models.convert --src SiT-XL-2-256x256.pt \
      --model DiT-XL/2 --out /ckpt/sit_xl2_twinflow [--set dtype=bfloat16]
  # diffusers transformer folder (SD3 / SD3.5) -> pretrained directory (optional: the
  # trainer's init_from also takes the diffusers folder directly)
  python -m twinflow_jax.models.convert diffusers-import \
      --src /hf/stable-diffusion-3.5-medium/transformer --out /ckpt/sd35m [--set ...]
  # trained model (a run's workdir or a pretrained directory) -> diffusers folder
  python -m twinflow_jax.models.convert diffusers-export --src /runs/sd35m_twinflow \
      --out /export/sd35m_1nfe/transformer [--weights ema] [--dtype bfloat16]

The diffusers commands are described in `docs/pretrained-models.md`.

Reads .pt/.pth (needs torch), .safetensors or .npz; sizes not given on the
command line (in_channels, input_size, num_classes) are read from the
checkpoint. The time mapping (`--source`, default 'sit') is documented in
`sit.py`: SiT weights get time_convention='sit' (network time 1 - t,
output negated), 'twinflow' weights load as is, DDPM-noise DiT weights are
rejected. Writes DIR/params (Orbax) and DIR/model_config.json; load them with
`load_model_config` + `create_model` + `load_pretrained`.
"""

import argparse
import json
import os
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx

from twinflow_jax.models.configs import resolve_config
from twinflow_jax.models import lora as lora_lib
from twinflow_jax.models.convert import diffusers as dlib
from twinflow_jax.models.convert.sit import (infer_dit_fields, load_torch_dit,
                                             time_convention_for)
from twinflow_jax.models.convert.state_dict import read_state_dict
from twinflow_jax.models.factory import create_model
from twinflow_jax.models.param_tree import flatten, unflatten
from twinflow_jax.models.pretrained import (PARAMS_DIR, load_model_config, load_pretrained,
                                            save_pretrained)
from twinflow_jax.models.sharding import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twinflow_jax.models.convert',
      description='Convert a DiT/SiT PyTorch checkpoint for twinflow_jax.',
      epilog='diffusers models (SD3 / SD3.5): see `python -m twinflow_jax.models.convert '
      'diffusers-import --help` and `... diffusers-export --help`.')
  p.add_argument('--src', required=True,
                 help='.pt/.pth/.bin, .safetensors or .npz state dict')
  p.add_argument('--model', required=True, help="e.g. 'DiT-XL/2'")
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--source', default='sit', choices=('sit', 'twinflow', 'dit'),
                 help="time convention of the weights (default 'sit'; 'dit' "
                 'is rejected with an explanation)')
  p.add_argument('--in-channels', type=int)
  p.add_argument('--input-size', type=int)
  p.add_argument('--num-classes', type=int)
  p.add_argument('--keep-sigma', action='store_true',
                 help='keep the learned-sigma output half (learn_sigma=True)')
  p.add_argument('--r-embedder-init', default='copy', choices=('copy', 'small'))
  p.add_argument('--seed', type=int, default=0,
                 help="init seed (only used by --r-embedder-init small)")
  p.add_argument('--allow-pickle', action='store_true',
                 help='let torch unpickle non-tensor objects (trusted files)')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='override any model config field (VALUE parsed as '
                 'JSON when possible), e.g. --set depth=2; repeatable')
  return p


def _overrides(items: list[str]) -> dict:
  out = {}
  for item in items:
    field, sep, value = item.partition('=')
    if not sep or not field:
      raise ValueError(f'--set expects FIELD=VALUE, got {item!r}')
    try:
      out[field] = json.loads(value)
    except json.JSONDecodeError:
      out[field] = value
  return out


def _check_out_dir(out: str) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out {out} is a file; give a directory for the converted model')


def convert(args: argparse.Namespace) -> dict:
  """Runs the conversion; returns the stored model config."""
  time_convention = time_convention_for(args.source)
  _check_out_dir(args.out)
  sd = read_state_dict(args.src, allow_pickle=args.allow_pickle)
  fields = infer_dit_fields(sd)
  if args.keep_sigma and not fields['learn_sigma']:
    raise ValueError('--keep-sigma: the checkpoint has no sigma channels')
  model_config = {
      'name': args.model,
      'in_channels': args.in_channels or fields['in_channels'],
      'input_size': args.input_size or fields.get('input_size', 32),
      'num_classes': args.num_classes or fields['num_classes'],
      'learn_sigma': bool(args.keep_sigma),
      'time_convention': time_convention,
      'r_embedder_init': args.r_embedder_init,
  }
  model_config.update(_overrides(args.set))
  cfg = resolve_config(model_config)
  model = create_model(cfg.to_dict(), rngs=nnx.Rngs(args.seed))
  load_torch_dit(model, sd)
  save_pretrained(model, args.out, cfg.to_dict())
  return cfg.to_dict()


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in DIFFUSERS_COMMANDS:
    return diffusers_main(argv)
  args = parser().parse_args(argv)
  try:
    cfg = convert(args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f"wrote {args.out}: {cfg['name']} in_channels={cfg['in_channels']} "
        f"input_size={cfg['input_size']} num_classes={cfg['num_classes']} "
        f"time_convention={cfg['time_convention']}")
  return 0


# ---------------------------------------------------------------------------------------
# diffusers-import / diffusers-export.

DIFFUSERS_COMMANDS = ('diffusers-import', 'diffusers-export')


def diffusers_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twinflow_jax.models.convert',
      description='diffusers model folders in and out of twinflow_jax (SD3 / SD3.5).')
  sub = p.add_subparsers(dest='command', required=True)
  imp = sub.add_parser(
      'diffusers-import', help='diffusers folder -> pretrained directory (Orbax)',
      description='Reads a diffusers transformer folder (config.json + safetensors, '
      'sharded or not) tensor by tensor onto an FSDP mesh of all local devices and '
      'writes DIR/params + DIR/model_config.json for --config.train.init_from. The '
      'trainer also accepts the diffusers folder itself as init_from.')
  imp.add_argument('--src', required=True, help='diffusers model folder')
  imp.add_argument('--out', required=True, help='output pretrained directory')
  imp.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                   help='model config override (e.g. param_dtype=bfloat16, '
                   'r_embedder=false); repeatable')
  imp.add_argument('--seed', type=int, default=0,
                   help='init seed of the TwinFlow r-embedder when the folder lacks it')
  exp = sub.add_parser(
      'diffusers-export', help='trained model -> diffusers folder',
      description='Writes a diffusers folder (config.json + safetensors, numbered shards '
      'with an index above --max-shard-gb) with diffusers key names and the TwinFlow '
      'r-embedder as time_text_embed_2.* (the official wrapper\'s names). --src is a '
      'training workdir (its newest checkpoint, or --step) or a pretrained directory.')
  exp.add_argument('--src', required=True,
                   help='run workdir (with checkpoints/) or pretrained directory')
  exp.add_argument('--out', required=True, help='output diffusers folder (new)')
  exp.add_argument('--weights', default=None,
                   help="from a run: 'ema' (the TwinFlow teacher; default of full runs), "
                   "'params' (the online weights; default of LoRA runs, which the official "
                   "LoRA trainer samples) or an eval EMA name such as 'ema_0p9999'. A LoRA "
                   "run's adapters are merged into its base weights before writing")
  exp.add_argument('--base', default=None,
                   help='LoRA runs: the base diffusers folder if it moved from the run\'s '
                   'train.init_from (its fingerprint must match the checkpoint\'s)')
  exp.add_argument('--step', type=int, help='checkpoint step (default: the newest)')
  exp.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                   help='dtype of the written weights (default: as stored)')
  exp.add_argument('--max-shard-gb', type=float, default=10.0,
                   help='largest file before splitting into shards (GiB)')
  return p


def _fsdp_mesh():
  return jax.make_mesh((1, jax.device_count(), 1), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _progress(total_hint: str):
  count = [0]

  def report(key: str) -> None:
    count[0] += 1
    if count[0] % 50 == 0:
      print(f'  {count[0]} tensors {total_hint} (last: {key})', flush=True)

  return report


def diffusers_import(args: argparse.Namespace) -> dict:
  """diffusers folder -> pretrained directory; returns the stored model config."""
  out = os.path.abspath(args.out)
  _check_out_dir(out)
  if os.path.exists(os.path.join(out, 'params')):
    raise ValueError(f'{out} already holds a checkpoint')
  model = dlib.load_model(args.src, _overrides(args.set), mesh=_fsdp_mesh(),
                          seed=args.seed, progress=_progress('read'))
  cfg = model.config.to_dict()
  cfg['pretrained'] = ''  # the architecture fields are stored explicitly
  save_pretrained(model, out, cfg)
  return cfg


def _model_from_run(workdir: str, weights: str | None, step: int | None,
                    base: str | None = None):
  """Builds the run's model on an FSDP mesh and restores one weight set into it.

  LoRA runs (config lora.rank > 0): the adapters come from the checkpoint, the base from
  `base` or the run's train.init_from (checked against lora.base_fingerprint), and the
  adapters are merged into the base weights.
  """
  from twinflow_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f'{workdir}: no checkpoints/ folder (not a run workdir)')
  manager = ocp.CheckpointManager(ckpt_dir)
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f'{ckpt_dir} holds no checkpoint')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f'--step {step} not in the checkpoints of {workdir}: {steps}')
  config = manager.restore(step, args=ocp.args.Composite(
      **{ckpt_lib.CONFIG: ocp.args.JsonRestore()}))[ckpt_lib.CONFIG]
  lora = int(config.get('lora', {}).get('rank', 0)) > 0
  weights = weights or ('params' if lora else 'ema')
  if lora:
    import ml_collections  # pylint: disable=g-import-not-at-top
    from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top
    build = lora_train.model_fn(ml_collections.ConfigDict(config))
    model = _abstract_on_mesh(config['model'], _fsdp_mesh(), build)
    targets = flatten(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
  else:
    model = _abstract_on_mesh(config['model'], _fsdp_mesh())
    targets = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  saved = ocp.StandardCheckpointer().metadata(
      os.path.join(ckpt_dir, str(step), ckpt_lib.STATE)).item_metadata.tree
  names = sorted(k for k, v in saved.items() if k != 'opt_state' and isinstance(v, dict))
  if 'eval_emas' in saved:
    names = sorted(set(names) - {'eval_emas'} | set(saved['eval_emas']))
  if weights not in names:
    raise ValueError(f'--weights {weights!r} is not in the checkpoint of step {step} of '
                     f'{workdir}; it holds {names}')
  tree = unflatten({tuple(str(k) for k in p): v for p, v in targets.items()})
  nested = weights in saved.get('eval_emas', {})
  item = {'eval_emas': {weights: tree}} if nested else {weights: tree}
  restored = manager.restore(step, args=ocp.args.Composite(**{
      ckpt_lib.STATE: ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)}))[ckpt_lib.STATE]
  values = flatten(restored['eval_emas'][weights] if nested else restored[weights])
  by_str = {tuple(str(k) for k in p): p for p in targets}
  state = nnx.state(model, nnx.LoRAParam if lora else nnx.Param)
  nnx.replace_by_pure_dict(state, unflatten({by_str[p]: v for p, v in values.items()}))
  nnx.update(model, state)
  manager.close()
  if lora:
    base = base or config['train']['init_from']
    dlib.load_into(model, base)
    got = lora_train.fingerprint(nnx.to_pure_dict(nnx.state(model, lora_lib.FROZEN)))
    want = config['lora'].get('base_fingerprint', '')
    if got != want:
      raise ValueError(f'the base weights at {base} (fingerprint {got}) are not those the '
                       f'LoRA run {workdir} was trained on (fingerprint {want}); pass the '
                       'original base with --base')
    lora_lib.merge(model)
  return model, step


def _abstract_on_mesh(model_config: dict, mesh, build=None):
  """Abstract model whose leaves carry NamedShardings from the default rules.

  `build` (rngs -> model) replaces `create_model(model_config)`, e.g. to add LoRA layers.
  """
  build = build or (lambda rngs: create_model(model_config, rngs=rngs))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES), \
      nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    shardings = nnx.get_named_sharding(state, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       state, shardings)
  nnx.update(abstract, state)
  return abstract


def diffusers_export(args: argparse.Namespace) -> tuple[list[str], str]:
  """Run workdir or pretrained directory -> diffusers folder; returns (files, source)."""
  src = os.path.abspath(args.src)
  if os.path.isdir(os.path.join(src, PARAMS_DIR)):
    model = _abstract_on_mesh(load_model_config(src), _fsdp_mesh())
    load_pretrained(model, src)  # restores straight into the abstract model's shardings
    source = f'pretrained directory {src}'
  else:
    model, step = _model_from_run(src, args.weights, args.step, args.base)
    source = f'{args.weights or "default"} weights of step {step} of {src}'
  files = dlib.export(model, args.out, dtype=args.dtype,
                      max_shard_bytes=int(args.max_shard_gb * 2**30),
                      progress=_progress('written'))
  return files, source


def diffusers_main(argv: list[str]) -> int:
  args = diffusers_parser().parse_args(argv)
  try:
    if args.command == 'diffusers-import':
      cfg = diffusers_import(args)
      print(f"wrote {args.out}: {cfg['name']} num_layers={cfg['num_layers']} "
            f"(from {args.src})")
    else:
      files, source = diffusers_export(args)
      print(f'wrote {args.out}: {len(files)} files from the {source}')
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0
