"""Evaluation during training, and decoding of latent samples: the trainer's hooks.

`config.eval` (train/config.py) says what to measure; the loop calls three things:

  decoder = evaluation.latent_decoder(config)        # None for pixel / toy data
  evaluator = evaluation.create(config, setup, decoder)   # None when eval.metrics is ()
  ...
  if evaluator and evaluator.due(step, num_steps): record(evaluator(state, step))

Every evaluation samples `eval.num_samples` samples of each preset in `eval.presets` from
each set of weights in `eval.weights` with `generate.generate` and the fixed base seed
`eval.seed` (sample i always starts from the same noise, whatever the step, device count
or batch size), decodes them through the data's VAE when the run trains on latents, and
judges them with the evaluators of `evaluation.sample_metrics` ('mnist', 'toy2d',
'inception'). Evaluators are built once, before the first step, so a missing reference
file or Inception weights stop the run at start-up with one line naming the field.
Results are `eval/<weights>/<preset>/<metric>/<key>` scalars plus `eval/seconds` (the
whole evaluation) and `eval/sample_seconds`; the one-off set-up time is logged.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from twinflow_jax import errors
from twinflow_jax import generate
from twinflow_jax.train import config as config_lib


def latent_decoder(config: Any, vae_dir: str | None = None):
  """The VAE decoder of a latent run (`vae_codec.LatentDecoder`), or None.

  None when the data are not ArrayRecord latents with a metadata.json naming a VAE
  (pixels, toy data, latents prepared elsewhere). Decoding runs on this process's
  devices (each process decodes what it holds).

  Args:
    config: the experiment config (uses config.data and config.eval.vae_dir).
    vae_dir: overrides config.eval.vae_dir and the folder recorded in the metadata.

  Raises:
    errors.ConfigError: the VAE folder is missing or holds another VAE (names the field).
  """
  from twinflow_jax.data import vae_codec  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  folder = vae_dir or config.get("eval", {}).get("vae_dir", "") or None
  try:
    return vae_codec.decoder_for_data(config.data, mesh=vae_lib.batch_mesh(), vae_dir=folder)
  except errors.UserError:
    raise     # e.g. config.data.paths that match nothing: named by the data code
  except (ValueError, FileNotFoundError) as e:
    raise errors.ConfigError(
        f"{e} (decoding latent samples; set --config.eval.vae_dir to the VAE folder)") from e


def decode_samples(decoder, samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{preset: model-space samples} -> {preset: images in [-1, 1]} (unchanged if no VAE)."""
  if decoder is None:
    return dict(samples)
  return {k: decoder(v, output="float") for k, v in samples.items()}


def decoded_shape(decoder, x_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Per-sample shape after `decode_samples`: [h f, w f, 3] for a VAE of factor f."""
  if decoder is None:
    return tuple(x_shape)
  factor = decoder.metadata.get("vae", {}).get("downsample_factor")
  if factor:
    return (x_shape[0] * int(factor), x_shape[1] * int(factor), 3)
  return tuple(decoder(np.zeros((1, *x_shape), np.float32), output="float").shape[1:])


def weights_of(state: Any, source: str) -> Any:
  """The params of `state` named by `config.eval_weights_source` ('ema', 'params', key)."""
  if source == "ema":
    return state.ema
  if source == "params":
    return state.params
  return state.eval_emas[source]


class TrainEvaluator:
  """Samples and judges a train state; see the module docstring.

  Args:
    config: the experiment config (config.eval, config.data).
    apply_fn, mesh, rules, x_shape, num_classes, conditioning: the trainer's model and data
      spec (`loop.Setup`).
    decoder: `latent_decoder(config)` (None: samples are images or points already).
  """

  def __init__(self, config: Any, *, apply_fn: Callable, mesh: jax.sharding.Mesh,
               rules, x_shape: tuple[int, ...], num_classes: int, conditioning: str,
               decoder=None):
    from twinflow_jax.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
    e = config.eval
    if conditioning == "text":
      raise errors.ConfigError(
          "config.eval.metrics is set, but evaluation during training of text-conditional "
          "runs is not supported (it needs prompt embeddings); set --config.eval.metrics=()"
          " and evaluate with python -m twinflow_jax.sample --cond-file")
    t0 = time.perf_counter()
    self.every, self.at_end = int(e.every), bool(e.at_end)
    self.presets = tuple(e.presets)
    self.weights = {w: config_lib.eval_weights_source(config, w) for w in e.weights}
    self.labels = sample_metrics.eval_labels(int(e.num_samples), num_classes)
    self.num = int(e.num_samples)
    self.decoder = decoder
    self._generate = functools.partial(
        generate.generate, apply_fn, key=int(e.seed), x_shape=tuple(x_shape), num=self.num,
        mesh=mesh, rules=tuple(rules), batch_size=int(e.batch_size))
    try:
      self.evaluators = sample_metrics.make_evaluators(
          tuple(e.metrics), config.data, decoded_shape(decoder, tuple(x_shape)),
          inception_weights=e.inception_weights, reference=e.reference,
          inception_metrics=tuple(e.inception_metrics), mesh=mesh)
    except (ValueError, FileNotFoundError) as err:
      raise errors.ConfigError(
          f"config.eval.metrics={tuple(e.metrics)}: {errors.one_line(err)}; fix the config.eval "
          "fields, or turn evaluation off with --config.eval.metrics='()'") from err
    self.setup_seconds = time.perf_counter() - t0

  def due(self, step: int, num_steps: int) -> bool:
    """A periodic evaluation at `step` (the final one is `at_end`'s, after the save)."""
    return bool(self.every) and step % self.every == 0 and step < num_steps

  def sample(self, params: Any, preset: str, labels: np.ndarray | None) -> np.ndarray:
    """Samples [N, ...] of one preset (decoded to images in [-1, 1] for latent runs)."""
    x = self._generate(params, labels, preset)
    return x if self.decoder is None else self.decoder(x, output="float")

  def __call__(self, state: Any, step: int, frozen: Any = None) -> dict[str, float]:
    """All metrics of `state` at `step`: {'eval/<weights>/<preset>/<metric>/<key>': v}.

    `frozen`: a LoRA run's frozen base; the model then takes (weights, frozen).
    """
    from twinflow_jax.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
    weights = {w: weights_of(state, src) if frozen is None else (weights_of(state, src), frozen)
               for w, src in self.weights.items()}
    return sample_metrics.evaluate_presets(self.sample, weights, self.presets, self.labels,
                                           self.evaluators)


def create(config: Any, setup: Any, decoder=None) -> TrainEvaluator | None:
  """The trainer's evaluator (None when config.eval.metrics is empty).

  Raises:
    errors.UserError: a metric that does not fit the data, a missing reference or
      Inception weights file (names the config field).
  """
  if not tuple(config.eval.metrics):
    return None
  spec = setup.data_spec
  ev = TrainEvaluator(config, apply_fn=setup.apply_fn, mesh=setup.mesh, rules=setup.rules,
                      x_shape=tuple(spec.x_shape), num_classes=spec.num_classes,
                      conditioning=spec.conditioning, decoder=decoder)
  if jax.process_index() == 0:
    logging.info("evaluation: %s of %d samples of %s from %s, %s; set up in %.1fs",
                 "/".join(ev.evaluators), ev.num, "/".join(ev.presets), "/".join(ev.weights),
                 (f"every {ev.every} steps" if ev.every else "no periodic evaluation")
                 + (" and at the end" if ev.at_end else ""), ev.setup_seconds)
  return ev


def run_and_record(evaluator: TrainEvaluator, state: Any, step: int, jsonl: Any, writer: Any,
                   history: list[dict[str, Any]] | None = None, frozen: Any = None
                   ) -> dict[str, float]:
  """Evaluates `state` (with a LoRA run's `frozen` base), writes the scalars (metric
  writers, metrics.jsonl) and logs them."""
  scalars = evaluator(state, step, frozen)
  jsonl.write(step, scalars)
  writer.write_scalars(step, scalars)
  if history is not None:
    history.append({"step": step, **scalars})
  if jax.process_index() == 0:
    shown = ", ".join(f"{k[5:]} {v:.4g}" for k, v in scalars.items()
                      if k not in ("eval/seconds", "eval/sample_seconds"))
    logging.info("eval at step %d (%.1fs, sampling %.1fs): %s", step, scalars["eval/seconds"],
                 scalars["eval/sample_seconds"], shown)
  return scalars
