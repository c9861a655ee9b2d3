r"""Writes the README figure: real digits beside the default run's 1-NFE samples.

  python -m twinflow_jax.main --config configs/default.py --workdir /tmp/mnist
  python -m twinflow_jax.sample --workdir /tmp/mnist --preset 1nfe --num 100 \
      --out /tmp/mnist_1nfe.npz
  python tools/make_readme_figure.py --samples /tmp/mnist_1nfe.npz \
      --out docs/assets/default_1nfe.png

Left: 100 held-out real digits as the trainer sees them (16 x 16, one class per column);
right: the 100 samples of the .npz (one network evaluation each, EMA weights, classes
0-9 per column as the sample command draws them). Core install only (no torch).
"""

import argparse

import numpy as np

from twinflow_jax.evaluation import mnist
from twinflow_jax.train import images


def real_grid(resolution: int, per_class: int = 10) -> np.ndarray:
  x, labels = mnist.real_digits(resolution, "heldout")
  # Row i holds the i-th held-out digit of every class: one class per column.
  order = np.stack([np.flatnonzero(labels == c)[:per_class] for c in range(10)], axis=1)
  return x[order.reshape(-1)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--samples", required=True, help=".npz of python -m twinflow_jax.sample")
  parser.add_argument("--out", required=True, help="output .png")
  parser.add_argument("--scale", type=int, default=2, help="pixel enlargement (default 2)")
  args = parser.parse_args()
  drawn = np.load(args.samples)
  samples = drawn["samples"][:100]
  if samples.shape[0] != 100 or not np.array_equal(drawn["labels"][:100], np.arange(100) % 10):
    raise SystemExit("error: --samples must hold 100 samples with labels 0..9 repeated "
                     "(the sample command's default --num 100)")
  tile = samples.shape[1] * args.scale
  left = images.make_grid(images.to_uint8(real_grid(samples.shape[1])), ncols=10,
                          min_tile=tile)
  right = images.make_grid(images.to_uint8(samples), ncols=10, min_tile=tile)
  gap = np.full((left.shape[0], 12, left.shape[2]), 255, np.uint8)
  figure = np.concatenate([left, gap, right], axis=1)
  images.write_png(args.out, figure[..., 0] if figure.shape[-1] == 1 else figure)
  print(f"wrote {args.out} ({figure.shape[1]} x {figure.shape[0]}; step "
        f"{int(drawn['step'])}, preset {drawn['preset']}, weights {drawn['weights']})")


if __name__ == "__main__":
  main()
