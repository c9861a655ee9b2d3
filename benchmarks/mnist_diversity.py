r"""Where do generated digits lose within-class diversity? Variance by spatial frequency.

The pixel diversity of `twinflow_jax.evaluation.mnist` (mean pairwise RMS distance within a
class) is about the square root of the within-class variance. This script splits that
variance (each image minus its class's mean image) over radial spatial-frequency bands,
for 1000 real held-out digits and for sample files written by `python -m
twinflow_jax.sample` (an .npz with `samples` and `labels`), and prints each file's variance
per band relative to the real digits'. Structure (shape, slant, stroke width) lives in the
low and middle bands; pixel noise in the top ones.

With `--workdir`, it also measures how much of the 1-NFE sampler's input noise z reaches
the output: the generator computes x = z - t F(z, t, 0) at t = 0.999, so the network must
reproduce z to cancel it; the correlation between z and the output on the pixels that
are background in every real digit shows what it leaves.

  python -m twinflow_jax.sample --workdir /tmp/mnist --preset 1nfe --num 1000 --out /tmp/s.npz
  python benchmarks/mnist_diversity.py /tmp/s.npz [more.npz ...] [--workdir /tmp/mnist]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

BANDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75)   # cycles per pixel (0.5 = Nyquist per axis)


def band_variance(x: np.ndarray, labels: np.ndarray, bands: Sequence[float] = BANDS
                  ) -> np.ndarray:
  """Within-class variance of images x [N, H, W, C] per radial frequency band.

  Each image minus the mean image of its class; power spectrum (summed over channels)
  averaged over images and summed within each band [bands[i], bands[i+1]).

  Returns:
    [len(bands) - 1] variances (their sum is H W times the mean per-pixel variance).
  """
  x = np.clip(np.asarray(x, np.float64), -1, 1)   # a new array: centred in place below
  labels = np.asarray(labels)
  for c in np.unique(labels):
    x[labels == c] -= x[labels == c].mean(0)
  p = (np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2).sum(-1).mean(0) / (x.shape[1] * x.shape[2])
  fy, fx = np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2])
  fr = np.sqrt(fy[:, None] ** 2 + fx[None] ** 2)
  return np.array([p[(fr >= lo) & (fr < hi)].sum() for lo, hi in zip(bands, bands[1:])])


def background(real: np.ndarray) -> np.ndarray:
  """[H, W, C] mask of the pixels that are dark in (nearly) every one of real [N, H, W, C]."""
  return real.mean(0) < -0.99


def noise_leak(workdir: str, num: int = 500) -> tuple[float, float]:
  """(correlation of z with the 1-NFE output on real-background pixels, output std there)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from twinflow_jax import generate, sampling  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import mnist  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top

  run = readonly.load_run(workdir)
  ((t, r),) = sampling.call_times("1nfe")     # (0.999, 0): x = z - t F(z, t, 0)
  params = run.weights[next(iter(run.weights))]
  labels = generate.class_labels(num, run.spec.num_classes)
  z = generate.initial_noise(0, jnp.arange(num), tuple(run.spec.x_shape))
  f = run.apply_fn(params, z, jnp.full((num,), t), jnp.full((num,), r), jnp.asarray(labels))
  out, z = np.asarray(z - t * f), np.asarray(z)
  real, _ = mnist.real_digits(run.spec.x_shape[0], "heldout", run.spec.x_shape[-1])
  mask = background(real)
  residual, noise = out[:, mask], z[:, mask]
  return float(np.corrcoef(residual.ravel(), noise.ravel())[0, 1]), float(residual.std())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("samples", nargs="*", help=".npz files with samples and labels")
  parser.add_argument("--workdir", help="also measure the 1-NFE noise leak of this run")
  args = parser.parse_args(argv)
  from twinflow_jax.evaluation import mnist  # pylint: disable=g-import-not-at-top

  files = []
  for f in args.samples:
    try:
      d = np.load(f)
      files.append((f, {"samples": d["samples"], "labels": d["labels"]}))
    except (OSError, ValueError, KeyError) as e:
      print(f"error: {f}: not a sample file with 'samples' and 'labels' "
            f"(write one with python -m twinflow_jax.sample): {e}", file=sys.stderr)
      return 2
  shape = files[0][1]["samples"].shape if files else (0, 16, 16, 1)   # [N, S, S, C]
  x_real, y_real = mnist.real_digits(shape[1], "heldout", shape[-1])
  real = band_variance(x_real, y_real)
  bands = [f"{lo:.1f}-{hi:.2g}" for lo, hi in zip(BANDS, BANDS[1:])]
  print(f"{'within-class variance':32s} " + " ".join(f"{b:>8s}" for b in bands) + "    total")
  print(f"{'real held-out (share of total)':32s} " +
        " ".join(f"{v / real.sum():8.3f}" for v in real) + f" {1.0:8.3f}")
  for name, d in files:
    v = band_variance(d["samples"], d["labels"])
    print(f"{name[-32:]:32s} " + " ".join(f"{a / b:8.2f}" for a, b in zip(v, real)) +
          f" {v.sum() / real.sum():8.3f}")
  if files:
    print("(rows below the first: variance relative to the real digits' in the same band)")
  if args.workdir:
    from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top
    try:
      corr, std = noise_leak(args.workdir)
    except (ValueError, OSError, readonly.CheckpointReadError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(f"1-NFE noise leak of {args.workdir}: corr(z, output) on background pixels "
          f"{corr:.3f}, output std there {std:.3f} (real digits: 0 and "
          f"{float(x_real[:, background(x_real)].std()):.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
