"""A small CNN digit classifier: the offline judge of generated MNIST digits.

The network is a pure function of a dict of arrays, so its weights are one small `.npz`
committed with the package (`evaluation/assets/mnist_classifier_<S>.npz`, one file per
image side S, trained by `tools/train_mnist_classifier.py` on the bundled digits with a
held-out split, see `twinflow_jax.evaluation.mnist`). Architecture (`ARCH`), for images
[B, S, S, C] in [-1, 1] (the model space of the trainer's MNIST data):

  conv3x3(16) relu, conv3x3(32) relu, maxpool 2
  conv3x3(32) relu, conv3x3(64) relu, maxpool 2
  global mean pool -> dense(128) relu  = the features (penultimate layer, 128-d)
  dense(10)                            = the logits

Global pooling keeps it valid at any S divisible by 4 (but its weights are trained for one
S: each resolution has its own file). About 42k parameters (0.17 MB as float32).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ARCH = "cnn-16-32-32-64-gap-128"
CONV_WIDTHS = (16, 32, 32, 64)
FEATURE_DIM = 128
NUM_CLASSES = 10
_ASSET_DIR = "assets"
Params = dict[str, dict[str, jax.Array]]


def init_params(seed: int, channels: int = 1) -> Params:
  """He-initialised parameters {layer: {'w', 'b'}} (conv w: [3, 3, in, out], HWIO), numpy."""
  rng = np.random.default_rng(seed)
  normal = lambda shape, fan_in, gain=2.0: (np.sqrt(gain / fan_in)
                                            * rng.standard_normal(shape)).astype(np.float32)
  params = {}
  c_in = channels
  for i, c_out in enumerate(CONV_WIDTHS):
    params[f"conv{i}"] = {"w": normal((3, 3, c_in, c_out), 9 * c_in),
                          "b": np.zeros((c_out,), np.float32)}
    c_in = c_out
  params["dense0"] = {"w": normal((c_in, FEATURE_DIM), c_in),
                      "b": np.zeros((FEATURE_DIM,), np.float32)}
  params["dense1"] = {"w": normal((FEATURE_DIM, NUM_CLASSES), FEATURE_DIM, 1.0),
                      "b": np.zeros((NUM_CLASSES,), np.float32)}
  return params


def _conv(x, p):
  y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + p["b"])


def _pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def features_and_logits(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Images [B, S, S, C] in [-1, 1] -> (features [B, 128], logits [B, 10]), float32."""
  h = x.astype(jnp.float32)
  for i in range(len(CONV_WIDTHS)):
    h = _conv(h, params[f"conv{i}"])
    if i % 2 == 1:
      h = _pool(h)
  h = h.mean(axis=(1, 2))
  feats = jax.nn.relu(h @ params["dense0"]["w"] + params["dense0"]["b"])
  return feats, feats @ params["dense1"]["w"] + params["dense1"]["b"]


def weights_path(resolution: int) -> str:
  """Where the committed weights for S x S digits live (inside the package)."""
  root = importlib.resources.files("twinflow_jax.evaluation") / _ASSET_DIR
  return os.fspath(root / f"mnist_classifier_{int(resolution)}.npz")


def save(path: str, params: Params, meta: dict[str, Any]) -> None:
  """Writes params (float32) and a JSON metadata string to one compressed .npz."""
  flat = {f"{layer}/{name}": np.asarray(v, np.float32)
          for layer, d in params.items() for name, v in d.items()}
  np.savez_compressed(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                      **flat)


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """Loaded classifier weights plus their metadata.

  Attributes:
    params: the weights (numpy float32).
    meta: training record: resolution, channels, arch, split seed, held-out accuracy, ...
  """
  params: Params
  meta: dict[str, Any]

  @property
  def resolution(self) -> int:
    return int(self.meta["resolution"])

  def apply(self, x: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, 128], logits [N, 10]) of images [N, S, S, C] (clipped to [-1, 1])."""
    x = np.asarray(x, np.float32)
    want = (self.resolution, self.resolution, int(self.meta.get("channels", 1)))
    if x.ndim != 4 or x.shape[1:] != want:
      raise ValueError(f"the MNIST classifier for {want[0]} x {want[1]} digits expects images "
                       f"[N, {want[0]}, {want[1]}, {want[2]}], got shape {x.shape}")
    x = np.clip(np.nan_to_num(x, nan=-1.0), -1.0, 1.0)
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      pad = batch_size - len(chunk) if len(x) > batch_size else 0
      if pad:   # one compiled shape for every chunk
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
      f, lg = _jitted_apply(self.params, chunk)
      n = len(chunk) - pad
      feats.append(np.asarray(f)[:n])
      logits.append(np.asarray(lg)[:n])
    return np.concatenate(feats), np.concatenate(logits)


_jitted_apply = jax.jit(features_and_logits)


def load(path: str) -> Classifier:
  """Reads weights written by `save`."""
  with open(path, "rb") as f, np.load(f) as data:
    meta = json.loads(bytes(data["__meta__"]).decode())
    params: Params = {}
    for key in data.files:
      if key == "__meta__":
        continue
      layer, name = key.split("/")
      params.setdefault(layer, {})[name] = np.asarray(data[key])
  if meta.get("arch") != ARCH:
    raise ValueError(f"{path} holds a classifier of architecture {meta.get('arch')!r}, this "
                     f"code expects {ARCH!r}; retrain it with tools/train_mnist_classifier.py")
  return Classifier(params, meta)


@functools.lru_cache(maxsize=8)
def load_for_resolution(resolution: int) -> Classifier:
  """The committed classifier for S x S digits; explains how to make a missing one."""
  path = weights_path(resolution)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no MNIST classifier for {resolution} x {resolution} digits ({path}); train one with "
        f"`python tools/train_mnist_classifier.py --resolution {resolution}` (about a minute "
        "on a CPU)")
  return load(path)
