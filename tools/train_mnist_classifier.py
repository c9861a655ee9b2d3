r"""Trains the offline MNIST judge (`twinflow_jax.evaluation.classifier`) at one resolution.

Trains on the 4000 training digits of the fixed split (`evaluation.mnist.split_indices`),
prepared exactly as the trainer's data (pad to 32, resize to S x S, [-1, 1]), with random
translations of up to S/16 pixels, reports the accuracy on the 1000 held-out digits and
writes the weights (about 160 kB) into the package:

  python tools/train_mnist_classifier.py --resolution 16      # ~1 min on 2 CPU cores
  python tools/train_mnist_classifier.py --resolution 32 --out /tmp/clf32.npz

Deterministic for a given seed and JAX version.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twinflow_jax.evaluation import classifier as clf_lib
from twinflow_jax.evaluation import mnist


def shift_batch(x: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
  """Random integer translations of images [B, S, S, C]; background (-1) fills in."""
  if max_shift == 0:
    return x
  b, s = x.shape[0], x.shape[1]
  p = max_shift
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-1.0)
  dy, dx = rng.integers(0, 2 * p + 1, b), rng.integers(0, 2 * p + 1, b)
  return np.stack([padded[i, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])


def train(resolution: int, *, epochs: int = 30, batch_size: int = 128, lr: float = 2e-3,
          weight_decay: float = 1e-4, seed: int = 0, verbose: bool = True):
  """Returns (params, meta) of a classifier trained at `resolution`."""
  x_tr, y_tr = mnist.real_digits(resolution, "train")
  x_ho, y_ho = mnist.real_digits(resolution, "heldout")
  steps_per_epoch = len(x_tr) // batch_size
  total = epochs * steps_per_epoch
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, steps_per_epoch, total, lr * 0.01)
  tx = optax.adamw(sched, weight_decay=weight_decay)
  params = jax.tree.map(jnp.asarray, clf_lib.init_params(seed, x_tr.shape[-1]))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      _, logits = clf_lib.features_and_logits(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  max_shift = max(1, resolution // 16)
  t0 = time.time()
  for epoch in range(epochs):
    order = rng.permutation(len(x_tr))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      xb = shift_batch(x_tr[idx], rng, max_shift)
      params, opt_state, loss = step(params, opt_state, jnp.asarray(xb), jnp.asarray(y_tr[idx]))
      losses.append(float(loss))
    if verbose and (epoch + 1) % 5 == 0:
      clf = clf_lib.Classifier(jax.device_get(params), {"resolution": resolution,
                                                        "channels": x_tr.shape[-1]})
      acc = mnist.class_accuracy(clf.apply(x_ho)[1], y_ho)[0]
      print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, held-out accuracy "
            f"{acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
  params = jax.device_get(params)
  clf = clf_lib.Classifier(params, {"resolution": resolution, "channels": x_tr.shape[-1]})
  train_acc = mnist.class_accuracy(clf.apply(x_tr)[1], y_tr)[0]
  acc, per = mnist.class_accuracy(clf.apply(x_ho)[1], y_ho)
  meta = {"arch": clf_lib.ARCH, "resolution": resolution, "channels": int(x_tr.shape[-1]),
          "split_seed": mnist.SPLIT_SEED, "num_train": len(x_tr), "num_heldout": len(x_ho),
          "heldout_accuracy": round(acc, 4), "train_accuracy": round(train_acc, 4),
          "heldout_per_class": [round(float(a), 3) for a in per],
          "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
          "max_shift": max_shift, "seed": seed,
          "trained_by": "tools/train_mnist_classifier.py"}
  return params, meta


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--resolution", type=int, default=16,
                      help="image side S (the run's config.data.image_size); multiple of 4")
  parser.add_argument("--epochs", type=int, default=30)   # as the committed 16 x 16 weights
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None,
                      help="output .npz (default: the package's evaluation/assets file)")
  args = parser.parse_args(argv)
  if args.resolution < 8 or args.resolution % 4:
    sys.exit(f"--resolution must be a multiple of 4 and >= 8, got {args.resolution}")
  params, meta = train(args.resolution, epochs=args.epochs, seed=args.seed)
  out = args.out or clf_lib.weights_path(args.resolution)
  clf_lib.save(out, params, meta)
  n = sum(int(np.prod(v.shape)) for d in params.values() for v in d.values())
  print(f"held-out accuracy {meta['heldout_accuracy']:.4f} on {meta['num_heldout']} digits "
        f"(per class {meta['heldout_per_class']}), train {meta['train_accuracy']:.4f}; "
        f"{n} parameters -> {out}")


if __name__ == "__main__":
  main()
