r"""Writes tiny diffusers VAEs and their reference outputs to tests/fixtures/vae_*/.

Needs torch and diffusers (this script only; the tests read the files without torch):
  /work/venv-tools/bin/python tools/make_vae_fixture.py [--out tests/fixtures]

Three VAEs, each a diffusers-format folder (`config.json` + safetensors), so the tests
exercise the same reader as real checkpoints:
  vae_sd      `AutoencoderKL`, SD/SDXL-style: 4 latent channels, quant convs, mid-block
              attention, one downsample; float32 weights in one safetensors file.
  vae_flux    `AutoencoderKL`, SD3/Flux-style: 16 latent channels, no quant convs
              (use_quant_conv=False, use_post_quant_conv=False), shift and scale factors,
              two downsamples; weights stored in bfloat16 (the model is rounded to
              bfloat16 first, so the float64 reference uses exactly the stored values).
  vae_qwen    `AutoencoderKLQwenImage`: causal 3-D convolutions, RMS norms, mid-block
              attention, temporal down/up-sampling layers, latents_mean / latents_std
              (attn_scales=[] as in Qwen-Image: diffusers cannot run attention in the
              encoder's down blocks); bfloat16 weights sharded over several files
              with `diffusion_pytorch_model.safetensors.index.json`.
Every parameter (norm scales and biases included) gets a random non-zero value, so each
one changes the outputs. References are computed in float64 and saved as float32 in
`reference.npz`, in NHWC:
  images   [B, H, W, 3] inputs in [-1, 1]
  mean     [B, h, w, C] posterior mean (`encode(x).latent_dist.mean`)
  logvar   [B, h, w, C] posterior log-variance (clamped to [-30, 20] as diffusers does)
  latents  [B, h, w, C] decoder inputs (random normal)
  decoded  [B, H, W, 3] `decode(latents).sample`
The Qwen-Image VAE runs on single frames: inputs [B, 3, 1, H, W] on the torch side.
"""

import argparse
import json
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Random non-zero values for every parameter: fan-in scaled weights, norms near 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.rsplit('.', 1)[-1]
      is_norm = 'norm' in name
      if leaf == 'gamma' or (is_norm and leaf == 'weight'):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif leaf == 'bias':
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else p.shape[0]
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


def _nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().to(torch.float64).permute(0, 2, 3, 1).numpy().astype(np.float32)


def _kl_fixture(out: str, name: str, config: dict, seed: int, size: int,
                store_bf16: bool) -> None:
  model = AutoencoderKL(**config)
  _randomise(model, seed)
  model.eval()
  if store_bf16:
    model = model.to(torch.bfloat16)
  folder = os.path.join(out, name)
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=True)
  ref = model.to(torch.float64)
  g = torch.Generator().manual_seed(seed + 1)
  images = torch.rand((2, 3, size, size), generator=g, dtype=torch.float64) * 2 - 1
  factor = 2 ** (len(config['block_out_channels']) - 1)
  c = config['latent_channels']
  latents = torch.randn((2, c, size // factor, size // factor), generator=g,
                        dtype=torch.float64)
  with torch.no_grad():
    post = ref.encode(images).latent_dist
    decoded = ref.decode(latents).sample
  np.savez(os.path.join(folder, 'reference.npz'), images=_nchw_to_nhwc(images),
           mean=_nchw_to_nhwc(post.mean), logvar=_nchw_to_nhwc(post.logvar),
           latents=_nchw_to_nhwc(latents), decoded=_nchw_to_nhwc(decoded))


def _qwen_fixture(out: str, name: str, config: dict, seed: int, size: int) -> None:
  model = AutoencoderKLQwenImage(**config)
  _randomise(model, seed)
  model.eval().to(torch.bfloat16)
  folder = os.path.join(out, name)
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder, safe_serialization=True, max_shard_size='40KB')
  ref = model.to(torch.float64)
  g = torch.Generator().manual_seed(seed + 1)
  images = torch.rand((2, 3, 1, size, size), generator=g, dtype=torch.float64) * 2 - 1
  factor = 2 ** (len(config['dim_mult']) - 1)
  latents = torch.randn((2, config['z_dim'], 1, size // factor, size // factor),
                        generator=g, dtype=torch.float64)
  with torch.no_grad():
    post = ref.encode(images).latent_dist
    decoded = ref.decode(latents).sample
  np.savez(os.path.join(folder, 'reference.npz'),
           images=_nchw_to_nhwc(images[:, :, 0]), mean=_nchw_to_nhwc(post.mean[:, :, 0]),
           logvar=_nchw_to_nhwc(post.logvar[:, :, 0]),
           latents=_nchw_to_nhwc(latents[:, :, 0]),
           decoded=_nchw_to_nhwc(decoded[:, :, 0]))


SD = dict(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
          up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(4, 8),
          layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=16,
          scaling_factor=0.18215)
FLUX = dict(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 3,
            up_block_types=('UpDecoderBlock2D',) * 3, block_out_channels=(4, 4, 8),
            layers_per_block=1, latent_channels=16, norm_num_groups=2, sample_size=16,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False)
QWEN = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
            attn_scales=[], temperal_downsample=[False, True],
            latents_mean=[round(0.3 * i - 0.5, 4) for i in range(4)],
            latents_std=[round(1.0 + 0.5 * i, 4) for i in range(4)])


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', default='tests/fixtures')
  args = p.parse_args()
  torch.manual_seed(0)
  _kl_fixture(args.out, 'vae_sd', SD, seed=1, size=16, store_bf16=False)
  _kl_fixture(args.out, 'vae_flux', FLUX, seed=2, size=16, store_bf16=True)
  _qwen_fixture(args.out, 'vae_qwen', QWEN, seed=3, size=16)
  for name in ('vae_sd', 'vae_flux', 'vae_qwen'):
    folder = os.path.join(args.out, name)
    files = sorted(os.listdir(folder))
    total = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    print(f'{folder}: {files} ({total / 1024:.0f} KiB)')
    with open(os.path.join(folder, 'config.json')) as f:
      json.load(f)


if __name__ == '__main__':
  main()
