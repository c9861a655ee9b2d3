r"""VAE encoding cost: measured images/s on this machine and analytic SD-VAE FLOPs.

Prints
  1. the analytic FLOPs of the full SD-VAE (the SD 1.x / SDXL / DiT / SiT VAE:
     block_out_channels (128, 256, 512, 512), 2 layers per block) encoder and decoder
     per image at --image_size, checked against XLA's cost analysis of the compiled
     encoder (compiled only, not run);
  2. encoder images/s of a tiny VAE with the SD-VAE's depth (4 levels, downsampling 8,
     so 256 px -> 32 x 32 x 4 latents, but widths (8, 16, 32, 32) and one layer per
     block; random weights) at --image_size, jitted, batch-sharded over the local
     devices (or of the diffusers folder --vae);
  3. encoder images/s of the full SD-VAE architecture (random weights) at --image_size,
     and the GFLOP/s that implies (skip with --full_sd_seconds=0);
  4. end-to-end `python -m twinflow_jax.data.prepare` images/s with that VAE on
     --num_images synthetic 500 x 375 JPEGs (decode, ADM crop, encode, write).

  python benchmarks/vae_encode.py [--image_size=256] [--batch=8] [--seconds=10] \
      [--full_sd_seconds=30] [--num_images=256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twinflow_jax.data import prepare
from twinflow_jax.models import vae as vae_lib
from twinflow_jax.models.convert import diffusers_vae

TINY = vae_lib.AutoencoderKLConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1,
                                   norm_num_groups=4)
SD_VAE = vae_lib.AutoencoderKLConfig()  # diffusers' SD-VAE architecture (defaults)


def _rate(fn, x, seconds: float) -> tuple[float, float]:
  """(images/s after compilation, compile + first call seconds)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(x))
  first = time.perf_counter() - start
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or n == 0:
    jax.block_until_ready(fn(x))
    n += len(x)
  return n / (time.perf_counter() - start), first


def _jpegs(folder: str, n: int) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, 'class0'))
  base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  for i in range(n):
    Image.fromarray(np.roll(base, i, axis=1)).save(
        os.path.join(folder, 'class0', f'{i:05d}.jpg'), quality=90)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--vae', default=None, help='diffusers VAE folder (default: tiny VAE)')
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seconds', type=float, default=10.0)
  p.add_argument('--full_sd_seconds', type=float, default=30.0)
  p.add_argument('--num_images', type=int, default=256)
  args = p.parse_args(argv)
  s = args.image_size
  print(f'{jax.local_device_count()} local device(s) ({jax.devices()[0].platform}), '
        f'{os.cpu_count()} CPUs, image {s}x{s}')

  # 1. Analytic FLOPs and XLA's count.
  enc = vae_lib.flops_per_image(SD_VAE, s, s, 'encoder')
  dec = vae_lib.flops_per_image(SD_VAE, s, s, 'decoder')
  abstract = nnx.eval_shape(lambda: vae_lib.create_vae(SD_VAE, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  lowered = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)).lower(
      state, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  xla = lowered.compile().cost_analysis()['flops']
  print(f'SD-VAE per image: encoder {enc / 1e9:.1f} GFLOPs analytic, '
        f'{xla / 1e9:.1f} GFLOPs XLA cost analysis (XLA skips zero-padding taps); '
        f'decoder {dec / 1e9:.1f} GFLOPs analytic')

  mesh = vae_lib.batch_mesh()
  batch = args.batch + (-args.batch % vae_lib.batch_divisor(mesh))
  x = np.random.default_rng(0).uniform(-1, 1, (batch, s, s, 3)).astype(np.float32)

  # 2. The tiny VAE (written as a diffusers folder for step 4) or --vae.
  tmp = tempfile.TemporaryDirectory()
  folder = args.vae
  if folder is None:
    folder = diffusers_vae.save_diffusers_vae(
        vae_lib.create_vae(TINY, rngs=nnx.Rngs(0)), os.path.join(tmp.name, 'tiny_vae'))
  tiny = diffusers_vae.load_diffusers_vae(folder)
  rate, first = _rate(vae_lib.make_encode_fn(tiny, mesh), x, args.seconds)
  tiny_flops = vae_lib.flops_per_image(tiny.config, s, s)
  print(f'VAE {args.vae or "tiny " + str(TINY.block_out_channels)}: {rate:.1f} images/s '
        f'encode (batch {batch}, first call {first:.1f} s; {tiny_flops / 1e9:.3f} '
        'GFLOPs per image)')

  # 3. The full SD-VAE architecture, random weights.
  if args.full_sd_seconds > 0:
    full = vae_lib.create_vae(SD_VAE, rngs=nnx.Rngs(0))
    xs = x[:vae_lib.batch_divisor(mesh)]
    rate, first = _rate(vae_lib.make_encode_fn(full, mesh), xs, args.full_sd_seconds)
    print(f'full SD-VAE encoder: {rate:.3f} images/s ({1 / rate:.2f} s per image, '
          f'{rate * enc / 1e9:.1f} GFLOP/s achieved; batch {len(xs)}, first call '
          f'{first:.1f} s)')

  # 4. End to end.
  root = tmp.name
  _jpegs(os.path.join(root, 'img'), args.num_images)
  flags = [f'--vae={folder}', f'--image_folder={root}/img', f'--image_size={s}',
           f'--output={root}/out', f'--batch_size={batch}', '--quiet']
  start = time.perf_counter()
  assert prepare.main(flags) == 0
  took = time.perf_counter() - start
  print(f'prepare end to end ({args.num_images} JPEGs 500x375, one run including '
        f'compilation): {args.num_images / took:.1f} images/s')
  tmp.cleanup()
  return 0


if __name__ == '__main__':
  sys.exit(main())
