r"""Throughput of the FID Inception activation extractor (images per second, this machine).

Runs `ActivationExtractor` (uint8 -> ADM resize to 299 -> FID InceptionV3, jitted and
sharded over all local devices) on random 256 x 256 uint8 images and reports images/s
after compilation, per global batch size. Weights are random (speed does not depend on
them) unless --inception names a converted file.

  python benchmarks/fid_extractor.py [--batch-sizes 16,32] [--num-images 64]
      [--inception fid_inception.npz] [--source-size 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from twinflow_jax.evaluation.extractor import ActivationExtractor
from twinflow_jax.models.convert import inception as convert_inception


def random_inception():
  """InceptionV3 with random (He-scaled) weights and unit batch-norm statistics."""
  rng = np.random.default_rng(0)
  flat = {}
  for path, shape in convert_inception._variable_shapes():  # pylint: disable=protected-access
    if path[-1] == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      flat[path] = (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    elif path[-1] in ('scale', 'var'):
      flat[path] = np.ones(shape, np.float32)
    else:
      flat[path] = np.zeros(shape, np.float32)
  return convert_inception.inception_from_params(flat)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--batch-sizes', default='16,32')
  ap.add_argument('--num-images', type=int, default=64)
  ap.add_argument('--source-size', type=int, default=256)
  ap.add_argument('--inception', help='converted weights (default: random)')
  args = ap.parse_args()
  model = (convert_inception.load_inception(args.inception) if args.inception
           else random_inception())
  s = args.source_size
  images = np.random.default_rng(1).integers(0, 256, (args.num_images, s, s, 3), np.uint8)
  print(f'{jax.device_count()} {jax.devices()[0].platform} devices, {args.num_images} '
        f'images {s}x{s} -> 299x299')
  for bs in map(int, args.batch_sizes.split(',')):
    extract = ActivationExtractor(model, batch_size=bs)
    start = time.perf_counter()
    extract(images[:bs])  # compile + one batch
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    acts = extract(images)
    elapsed = time.perf_counter() - start
    assert acts.pool.shape == (args.num_images, 2048)
    print(f'batch {bs:4d}: {args.num_images / elapsed:7.2f} images/s '
          f'({elapsed:.1f} s for {args.num_images}; first call incl. compile '
          f'{compile_s:.1f} s)')


if __name__ == '__main__':
  main()
