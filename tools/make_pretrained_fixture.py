r"""Writes tiny random diffusers models and their reference outputs under tests/fixtures/.

Needs torch and diffusers (the tools venv), only for this script; the tests read the
folders with the project's own loader and compare against the saved outputs:

  /work/venv-tools/bin/python tools/make_pretrained_fixture.py [--family sd3] \
      [--out tests/fixtures] [--twinflow-repo /work/.mirror/inclusionAI+TwinFlow/repo]
  # Check that a folder written by `export` loads and runs in diffusers:
  /work/venv-tools/bin/python tools/make_pretrained_fixture.py --check-export DIR \
      --reference tests/fixtures/sd3_medium

Every family writes, per variant, `<out>/<variant>/` = a diffusers model folder
(config.json + safetensors, saved by diffusers' own `save_pretrained`) and
`<variant>/reference.npz` = the inputs and float32 outputs of the diffusers forward.
All weights are random and non-zero (norm scales 1 + noise, adaLN and output layers
included), so every weight changes the output. Other families add a `make_<family>`
function and an entry in FAMILIES.

SD3 variants (3 blocks, width 32, 4 heads x 8, 4 latent channels):
  sd3_medium   SD3-medium layout, float32, one file.
  sd35_medium  dual_attention_layers (0, 1) and qk_norm='rms_norm' (SD3.5-medium's
               MMDiT-X), weights rounded to and saved in bfloat16 (the forward runs in
               float32 on the rounded values).
  sd35_large   qk_norm='rms_norm', no dual attention, saved from the official TwinFlow
               `SD3Transformer2DModelWrapper` (with `time_text_embed_2`), as numbered
               shards with an index; outputs also for target_timestep != timestep.
reference.npz holds latents [B, C, H, W] (H != W), t [B] (TwinFlow times; the network gets
timestep = 1000 t; one t is negative), pooled [B, P], and for two text lengths L in
TXT_LENS: txt_L [B, L, J], out_L [B, C, H, W] (r = t), and for the wrapper also r_L, out_r_L.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

TXT_LENS = (7, 11)
BATCH, HEIGHT, WIDTH = 3, 8, 12  # latent size; the token grid is 4 x 6


def randomize(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.15) -> None:
  """Every parameter random and non-zero: weights N(0, scale^2 / fan-in-ish), norms 1 + N."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith('norm_q.weight') or name.endswith('norm_k.weight') or (
          'norm_added' in name):
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim >= 2:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(noise * max(scale, 1.0 / np.sqrt(fan_in)))
      else:
        p.copy_(0.1 * noise)


def to_bf16_values(module: torch.nn.Module) -> None:
  """Rounds float32 parameters to bfloat16 values (kept in float32)."""
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(p.to(torch.bfloat16).to(torch.float32))


def official_sd3_wrapper(repo: str):
  """The official TwinFlow SD3 wrapper class, imported from the git mirror."""
  src = subprocess.run(
      ['git', '-C', repo, 'show',
       'HEAD:src/networks/stable_diffusion_3/transformer_sd_3.py'],
      check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'twinflow_transformer_sd_3.py')
  with open(path, 'w') as f:
    f.write(src)
  spec = importlib.util.spec_from_file_location('twinflow_transformer_sd_3', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.SD3Transformer2DModelWrapper


SD3_BASE = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3,
                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=24,
                caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
                pos_embed_max_size=12)
SD3_VARIANTS = {
    'sd3_medium': dict(dual_attention_layers=(), qk_norm=None),
    'sd35_medium': dict(dual_attention_layers=(0, 1), qk_norm='rms_norm'),
    'sd35_large': dict(dual_attention_layers=(), qk_norm='rms_norm'),
}


def sd3_inputs(cfg: dict, gen: torch.Generator) -> dict[str, np.ndarray]:
  rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)
  data = {
      'latents': rnd(BATCH, cfg['in_channels'], HEIGHT, WIDTH),
      't': torch.tensor([0.93, 0.41, -0.62]),
      'pooled': rnd(BATCH, cfg['pooled_projection_dim']),
  }
  for n in TXT_LENS:
    data[f'txt_{n}'] = rnd(BATCH, n, cfg['joint_attention_dim'])
    data[f'r_{n}'] = data['t'] * torch.tensor([0.0, 0.5, 0.3]) + torch.tensor(
        [0.0, 0.0, -0.1])
  return data


def sd3_forward(model, data, n, r=None):
  kw = dict(hidden_states=data['latents'], encoder_hidden_states=data[f'txt_{n}'],
            pooled_projections=data['pooled'], timestep=1000.0 * data['t'],
            return_dict=False)
  if r is not None:
    kw['target_timestep'] = 1000.0 * r
  with torch.no_grad():
    return model(**kw)[0].numpy()


def make_sd3(out_root: str, twinflow_repo: str) -> None:
  from diffusers import SD3Transformer2DModel  # pylint: disable=g-import-not-at-top
  for i, (variant, extra) in enumerate(SD3_VARIANTS.items()):
    gen = torch.Generator().manual_seed(100 + i)
    cfg = dict(SD3_BASE, **extra)
    wrapper = variant == 'sd35_large'
    cls = official_sd3_wrapper(twinflow_repo) if wrapper else SD3Transformer2DModel
    model = cls(**cfg).eval()
    randomize(model, gen)
    bf16 = variant == 'sd35_medium'
    if bf16:
      to_bf16_values(model)
    data = sd3_inputs(cfg, gen)
    out = {k: v.numpy() for k, v in data.items()}
    for n in TXT_LENS:
      if wrapper:
        out[f'out_{n}'] = sd3_forward(model, data, n, r=data['t'])
        out[f'out_r_{n}'] = sd3_forward(model, data, n, r=data[f'r_{n}'])
      else:
        out[f'out_{n}'] = sd3_forward(model, data, n)
      print(f'{variant} L={n}: |out| max {np.abs(out[f"out_{n}"]).max():.3f}')
    folder = os.path.join(out_root, variant)
    save = dict(safe_serialization=True)
    if wrapper:
      save['max_shard_size'] = '150KB'
    if bf16:
      model = model.to(torch.bfloat16)
    model.save_pretrained(folder, **save)
    np.savez_compressed(os.path.join(folder, 'reference.npz'), **out)
    print(f'wrote {folder}: {sorted(os.listdir(folder))}')


def check_export(folder: str, reference: str, twinflow_repo: str) -> int:
  """Loads an exported folder in diffusers and compares with reference.npz.

  Plain `SD3Transformer2DModel` at r = t (it ignores the time_text_embed_2.* keys); when
  the reference has target-time outputs, also the official TwinFlow wrapper at r != t.
  """
  from diffusers import SD3Transformer2DModel  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(reference, 'reference.npz')) as z:
    data = {k: torch.from_numpy(z[k]) for k in z.files}
  report = {'folder': folder}
  model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
  report['diffusers_max_abs_diff'] = max(
      float(np.abs(sd3_forward(model, data, n) - data[f'out_{n}'].numpy()).max())
      for n in TXT_LENS)
  if f'out_r_{TXT_LENS[0]}' in data:
    wrapper = official_sd3_wrapper(twinflow_repo).from_pretrained(
        folder, torch_dtype=torch.float32).eval()
    report['official_wrapper_r_max_abs_diff'] = max(
        float(np.abs(sd3_forward(wrapper, data, n, r=data[f'r_{n}'])
                     - data[f'out_r_{n}'].numpy()).max()) for n in TXT_LENS)
  print(json.dumps(report))
  return 0 if all(v < 1e-4 for k, v in report.items() if k != 'folder') else 1


FAMILIES = {'sd3': make_sd3}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--family', action='append', choices=sorted(FAMILIES),
                 help='families to write (default: all)')
  p.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                               'fixtures'))
  p.add_argument('--twinflow-repo', default='/work/.mirror/inclusionAI+TwinFlow/repo',
                 help='git mirror of inclusionAI/TwinFlow (for the official wrappers)')
  p.add_argument('--check-export', metavar='DIR',
                 help='load DIR (written by twinflow_jax export) in diffusers and compare')
  p.add_argument('--reference', help='fixture folder with reference.npz (--check-export)')
  args = p.parse_args()
  torch.set_num_threads(2)
  if args.check_export:
    return check_export(args.check_export, args.reference, args.twinflow_repo)
  for fam in args.family or sorted(FAMILIES):
    FAMILIES[fam](os.path.abspath(args.out), args.twinflow_repo)
  return 0


if __name__ == '__main__':
  sys.exit(main())
