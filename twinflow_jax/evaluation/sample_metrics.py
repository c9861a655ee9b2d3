"""The evaluation step: metrics of generated samples, as plain functions of arrays.

The trainer (or a notebook) builds the evaluators once for its data and then calls
`evaluate_presets` every `train.eval_every` steps:

  evaluators = sample_metrics.make_evaluators(("mnist",), config.data, spec.x_shape)
  labels = sample_metrics.eval_labels(num, spec.num_classes)
  scalars = sample_metrics.evaluate_presets(
      sample_fn, {"ema": state.ema}, ("1nfe", "small4"), labels, evaluators)
  # -> {'eval/ema/1nfe/mnist/class_acc': 0.97, ..., 'eval/seconds': 3.1}

`sample_fn(params, preset, labels) -> samples [N, ...]` is typically
`functools.partial(generate.generate, setup.apply_fn, ...)` with fixed seeds, so every
evaluation sees the same noise. Metrics ('name/key' in the results):
  mnist   class accuracy, classifier-feature FID, within-class diversity (pixels and
          features) and diversity relative to real digits (`evaluation.mnist`).
  toy2d   sliced Wasserstein distance and RBF-kernel MMD^2 to a held-out sample of the toy
          distribution (`evaluation.toy`).
  inception  FID, Inception Score and precision/recall with the FID InceptionV3
          (`inception_metrics`): images (or decoded latents) [N, H, W, 1 | 3] in [-1, 1],
          quantised and resized as the ADM suite does; needs `inception_weights` (converted
          .npz) and, for FID / precision / recall, `reference` statistics (.npz).
More plug in with `register`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Evaluator = Callable[[np.ndarray, np.ndarray | None], dict[str, float]]
EvaluatorFactory = Callable[..., Evaluator]

TOY_REFERENCE_SEED = 10_001      # not the training points' seed (config.data.toy2d_seed)


def _mnist_factory(data_config: Any, x_shape: Sequence[int], **_) -> Evaluator:
  from twinflow_jax.evaluation import mnist  # pylint: disable=g-import-not-at-top
  if data_config.source != "mnist":
    raise ValueError(f"the 'mnist' metrics need config.data.source='mnist', got "
                     f"{data_config.source!r}")
  if len(x_shape) != 3 or x_shape[0] != x_shape[1]:
    raise ValueError(f"the 'mnist' metrics need square images, got samples of {x_shape}")
  ev = mnist.MnistEvaluator(x_shape[0], x_shape[-1])
  return ev.evaluate


def _toy_factory(data_config: Any, x_shape: Sequence[int], num_reference: int = 4096,
                 **_) -> Evaluator:
  from twinflow_jax.data import toy2d  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import toy  # pylint: disable=g-import-not-at-top
  if data_config.source != "toy2d":
    raise ValueError(f"the 'toy2d' metrics need config.data.source='toy2d', got "
                     f"{data_config.source!r}")
  ref = toy2d.sample_toy2d(data_config.name, num_reference,
                           np.random.default_rng(TOY_REFERENCE_SEED))

  def evaluate(samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    del labels
    x = np.asarray(samples, np.float64)
    r = ref if len(ref) == len(x) else toy2d.sample_toy2d(
        data_config.name, len(x), np.random.default_rng(TOY_REFERENCE_SEED))
    return {"swd": toy.sliced_wasserstein(x, r), "mmd": toy.mmd_rbf(x, r)}

  return evaluate


def _inception_factory(data_config: Any, x_shape: Sequence[int], *,
                       inception_weights: str = "", reference: str = "",
                       inception_metrics: Sequence[str] = ("fid", "inception_score"),
                       mesh: Any = None, inception_model: Any = None,
                       inception_batch_size: int | None = None, **_) -> Evaluator:
  """FID / IS / precision-recall of image samples; `inception_model` replaces the weights."""
  del data_config
  import jax  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import extractor  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import inception_metrics as im  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import preprocess  # pylint: disable=g-import-not-at-top
  from twinflow_jax.evaluation import reference as reference_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert import inception as convert  # pylint: disable=g-import-not-at-top
  if len(x_shape) != 3 or x_shape[-1] not in (1, 3):
    raise ValueError(f"the 'inception' metrics need images [H, W, 1 | 3], got samples of "
                     f"{tuple(x_shape)} (latent runs are decoded through their VAE first)")
  metrics = tuple(inception_metrics)
  needs_ref = {"fid", "precision", "recall"} & set(metrics)
  if needs_ref and not reference:
    raise ValueError(f"the 'inception' metrics {sorted(needs_ref)} need reference statistics "
                     "(an .npz of python -m twinflow_jax.evaluation.fid_stats)")
  ref = reference_lib.load_reference(reference) if reference else None
  if inception_model is None:
    if not inception_weights:
      raise ValueError("the 'inception' metrics need the converted FID Inception weights "
                       "(python -m twinflow_jax.models.convert.inception)")
    if not os.path.isfile(inception_weights):
      raise FileNotFoundError(f"FID Inception weights {inception_weights!r} not found")
    inception_model = convert.load_inception(inception_weights)
  mesh = mesh if mesh is not None and "data" in mesh.axis_names else None
  extract = extractor.ActivationExtractor(inception_model, mesh=mesh,
                                          batch_size=inception_batch_size)

  def evaluate(samples: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    del labels
    # Every process holds all N samples; each contributes its own contiguous part, so the
    # gathered activations are the N samples once, in order.
    parts = np.array_split(np.asarray(samples), jax.process_count())
    # Model samples may overshoot [-1, 1] (early in training): clip and quantise them as
    # the ADM suite does (`samples_to_uint8`), rather than reject them like user images.
    acts = extract(preprocess.samples_to_uint8(parts[jax.process_index()]))
    return im.inception_metrics(acts, ref, metrics)

  return evaluate


_REGISTRY: dict[str, EvaluatorFactory] = {"mnist": _mnist_factory, "toy2d": _toy_factory,
                                          "inception": _inception_factory}


def register(name: str, factory: EvaluatorFactory) -> None:
  """Adds a metric: `factory(data_config, x_shape, **kwargs) -> evaluator`."""
  _REGISTRY[name] = factory


def available() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def make_evaluators(metrics: Sequence[str], data_config: Any, x_shape: Sequence[int],
                    **kwargs) -> dict[str, Evaluator]:
  """Builds the evaluators named in `metrics` once (loads classifiers, reference sets).

  Raises:
    ValueError: an unknown metric name, or one that does not fit the data.
  """
  unknown = [m for m in metrics if m not in _REGISTRY]
  if unknown:
    raise ValueError(f"unknown evaluation metrics {unknown}; available: {available()}")
  return {m: _REGISTRY[m](data_config, tuple(x_shape), **kwargs) for m in metrics}


def evaluate(samples: np.ndarray, labels: np.ndarray | None,
             evaluators: Mapping[str, Evaluator]) -> dict[str, float]:
  """All metrics of one set of samples: {'<metric>/<key>': value}."""
  out = {}
  for name, fn in evaluators.items():
    for k, v in fn(samples, labels).items():
      out[f"{name}/{k}"] = float(v)
  return out


def eval_labels(num: int, num_classes: int) -> np.ndarray | None:
  """Balanced labels 0..C-1 cycled to `num` (None for unconditional data)."""
  if num_classes <= 1:
    return None
  return (np.arange(num) % num_classes).astype(np.int32)


def evaluate_presets(sample_fn: Callable[[Any, str, np.ndarray | None], np.ndarray],
                     weights: Mapping[str, Any], presets: Sequence[str],
                     labels: np.ndarray | None, evaluators: Mapping[str, Evaluator]
                     ) -> dict[str, float]:
  """Samples every preset from every set of weights and evaluates each set.

  Args:
    sample_fn: `(params, preset, labels) -> samples [N, ...]` (host numpy).
    weights: {name: params}, e.g. {'ema': state.ema, 'online': state.params}.
    presets: sampler preset names.
    labels: the classes asked for [N] (None for unconditional data).
    evaluators: from `make_evaluators`.

  Returns:
    {'eval/<weights>/<preset>/<metric>/<key>': value, ..., 'eval/seconds': total time,
     'eval/sample_seconds': time spent sampling}.
  """
  out = {}
  t0 = time.perf_counter()
  t_sample = 0.0
  for wname, params in weights.items():
    for preset in presets:
      t1 = time.perf_counter()
      samples = sample_fn(params, preset, labels)
      t_sample += time.perf_counter() - t1
      for k, v in evaluate(samples, labels, evaluators).items():
        out[f"eval/{wname}/{preset}/{k}"] = v
  out["eval/seconds"] = time.perf_counter() - t0
  out["eval/sample_seconds"] = t_sample
  return out
