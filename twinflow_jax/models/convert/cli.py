r"""CLI: PyTorch DiT/SiT checkpoint -> pretrained directory for the trainer.

  python -m twinflow_jax.models.convert --src SiT-XL-2-256x256.pt \
      --model DiT-XL/2 --out /ckpt/sit_xl2_twinflow [--set dtype=bfloat16]

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
import sys

from flax import nnx

from twinflow_jax.models.configs import resolve_config
from twinflow_jax.models.convert.sit import (infer_dit_fields, load_torch_dit,
                                             time_convention_for)
from twinflow_jax.models.convert.state_dict import read_state_dict
from twinflow_jax.models.factory import create_model
from twinflow_jax.models.pretrained import save_pretrained


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twinflow_jax.models.convert',
      description='Convert a DiT/SiT PyTorch checkpoint for twinflow_jax.')
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


def convert(args: argparse.Namespace) -> dict:
  """Runs the conversion; returns the stored model config."""
  time_convention = time_convention_for(args.source)
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
