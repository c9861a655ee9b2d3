r"""`python -m twinflow_jax.evaluation.fid_stats`: reference statistics of a dataset, once.

  python -m twinflow_jax.evaluation.fid_stats --inception fid_inception.npz \
      --images train_images.npz --out ref.npz [--keep-act 10000]
  python -m twinflow_jax.evaluation.fid_stats --inception fid_inception.npz \
      --data-config configs/default.py --out mnist16_ref.npz

Reads the images (a .npy / .npz array, an image folder, or the pixel source of a
project config's `config.data`, see image_sources.py), runs the FID Inception over them
on all devices (ADM preprocessing by default, see preprocess.py), and writes mu / sigma
of the pool_3 features plus, with --keep-act M, the features of a uniform random subset
of M images for precision / recall (format: reference.py). Given an ADM reference
batch (an .npz with mu, sigma and arr_0) it keeps the file's mu / sigma (computed on the
whole dataset) and only adds the activations of its images. With several processes every
process runs this command; process 0 writes the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from twinflow_jax.evaluation import image_sources
from twinflow_jax.evaluation.extractor import ActivationExtractor, Throughput
from twinflow_jax.evaluation.fid import RunningStats
from twinflow_jax.evaluation.preprocess import MODES
from twinflow_jax.evaluation.reference import ReferenceStats, save_reference


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twinflow_jax.evaluation.fid_stats',
      description='Compute FID reference statistics (mu, sigma and optionally '
      'activations for precision/recall) of a set of images with the FID Inception.')
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--images', help='.npy / .npz of images (uint8 pixels or samples in '
                   '[-1, 1]; NHWC, NCHW or NHW) or a folder of image files')
  src.add_argument('--data-config', help="a project config file: use its config.data "
                   'pixel images, at the training resolution')
  p.add_argument('--inception', required=True,
                 help='FID Inception weights: the .npz from python -m '
                 'twinflow_jax.models.convert.inception (or the raw state dict)')
  p.add_argument('--out', required=True, help='output .npz')
  p.add_argument('--key', help='array key inside an .npz (default: arr_0, images, '
                 'samples or x)')
  p.add_argument('--keep-act', type=int, default=10000, metavar='M',
                 help='also store the features of M random images for precision/recall '
                 '(default 10000, as the ADM reference batches; 0: none)')
  p.add_argument('--max-images', type=int, default=0,
                 help='use only the first N images (default 0: all)')
  p.add_argument('--batch-size', type=int,
                 help='global images per step (default 32 per device)')
  p.add_argument('--preprocess', default='adm', choices=MODES,
                 help="'adm' (default, the ADM suite / TF graph) or 'pytorch_fid'")
  p.add_argument('--chunk', type=int, default=4096,
                 help='images per process read and processed at a time (memory bound)')
  p.add_argument('--seed', type=int, default=0, help='seed of the --keep-act subset')
  p.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  return p


def _open(args, pi: int, pc: int):
  """(this process's images, ADM mu/sigma or None)."""
  adm = None
  if args.images is not None:
    images = image_sources.open_images(args.images, args.key)
    if args.images.lower().endswith('.npz'):
      with np.load(args.images) as z:
        if 'mu' in z.files and 'sigma' in z.files:
          adm = (np.asarray(z['mu'], np.float64), np.asarray(z['sigma'], np.float64))
    sharded = False
  else:
    images = image_sources.DataConfigImages(args.data_config, pi, pc)
    sharded = images.source.sharded
  if sharded:  # the source already holds this process's share only
    if args.max_images:
      images = image_sources.Range(images, 0, min(len(images), args.max_images // pc))
    return images, adm
  total = len(images) if not args.max_images else min(len(images), args.max_images)
  lo, hi = total * pi // pc, total * (pi + 1) // pc
  return image_sources.Range(images, lo, hi), adm


def run(args) -> str:
  """Computes and writes the statistics; returns a summary line."""
  if not args.out.endswith('.npz'):
    raise ValueError(f'--out {args.out!r} must end in .npz')
  if os.path.exists(args.out) and not args.overwrite:
    raise ValueError(f'--out {args.out} exists; pass --overwrite or choose another path')
  if args.keep_act < 0 or args.max_images < 0 or args.chunk < 1:
    raise ValueError('--keep-act and --max-images must be >= 0, --chunk >= 1')
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert.inception import load_inception  # pylint: disable=g-import-not-at-top

  pi, pc = jax.process_index(), jax.process_count()
  images, adm = _open(args, pi, pc)
  counts = np.asarray(multihost_utils.process_allgather(np.int64(len(images)))).reshape(-1)
  total = int(counts.sum())
  if total < 2:
    raise ValueError(f'need at least 2 images, found {total}')
  model = load_inception(args.inception)
  extract = ActivationExtractor(model, batch_size=args.batch_size,
                                preprocess=args.preprocess)
  keep = min(args.keep_act, total)
  selected = np.zeros(total, bool)
  selected[np.random.default_rng(args.seed).choice(total, keep, replace=False)] = True
  stats, kept, seen = None, [], 0
  progress = Throughput('fid_stats', printer=lambda s: print(s, flush=True))
  start = time.perf_counter()
  # Every process makes the same number of (collective) extractor calls.
  for c in range(-(-int(counts.max()) // args.chunk)):
    part = image_sources.Range(images, min(c * args.chunk, len(images)),
                               min((c + 1) * args.chunk, len(images)))
    acts = extract(part, progress=lambda d, t, s=seen: progress(s + d, total))
    if adm is None:
      stats = stats or RunningStats(acts.pool.shape[1])
      stats.update(acts.pool)
    kept.append(acts.pool[selected[seen:seen + len(acts.pool)]])
    seen += len(acts.pool)
  rate = total / (time.perf_counter() - start)
  if hasattr(images, 'close'):
    images.close()
  mu, sigma = adm if adm is not None else stats.result()
  ref = ReferenceStats(mu=mu, sigma=sigma,
                       act=np.concatenate(kept) if keep else None,
                       num_images=None if adm is not None else total,
                       preprocess=args.preprocess)
  if pi == 0:
    save_reference(args.out, ref)
  where = "the file's own mu/sigma (ADM reference batch)" if adm is not None else (
      f'mu/sigma of {total} images')
  return (f'wrote {args.out}: {where}, act {keep} x {len(mu)}, preprocess {args.preprocess}, '
          f'{rate:.1f} img/s on {jax.device_count()} devices')


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    print(run(args))
  except (ValueError, FileNotFoundError, ImportError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
