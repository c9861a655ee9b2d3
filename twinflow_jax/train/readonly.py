"""Strictly read-only access to a training run: its config and one set of weights.

For sampling and evaluation from a workdir that a trainer may still be writing to, or that
holds a broken checkpoint: nothing here creates, moves, renames or deletes anything (no
`CheckpointManager`, which may create directories, and no quarantine of unreadable
checkpoints as `Checkpointer.restore_latest` does). An unreadable checkpoint is reported
as `CheckpointReadError` and left as it is.

Only the weights asked for are read (Orbax partial restore of one subtree of the saved
`TrainState`: `params`, `ema` or `eval_emas/<name>`), directly into the target shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Sequence

import jax
import ml_collections
from etils import epath

from twinflow_jax import errors
from twinflow_jax.train import checkpoint as checkpoint_lib
from twinflow_jax.train.state import eval_ema_name

STATE_ITEM = "state"          # the Checkpointer's item names (train/checkpoint.py)
CONFIG_ITEM = "config"


class CheckpointReadError(RuntimeError):
  """A checkpoint (or the run's config) is missing or cannot be read."""


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def complete_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints in workdir/checkpoints, ascending.

  Orbax writes a checkpoint under a temporary name and renames it to `<step>` when done,
  so only purely numeric names count (not `<step>.orbax-checkpoint-tmp-*` of a save cut
  short, nor `<step>.corrupt` set aside by the trainer).
  """
  d = checkpoint_dir(workdir)
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def read_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The run's config: workdir/config.json, else the one saved with checkpoint `step`.

  Raises:
    CheckpointReadError: neither exists or parses.
  """
  candidates = [epath.Path(workdir) / "config.json"]
  steps = complete_steps(workdir)
  if step is not None or steps:
    s = step if step is not None else steps[-1]
    candidates.append(checkpoint_dir(workdir) / str(s) / CONFIG_ITEM / "metadata")
  for path in candidates:
    if path.is_file():
      try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
      except (ValueError, TypeError) as e:
        raise CheckpointReadError(f"the run config {path} cannot be read ({e})") from e
  raise CheckpointReadError(f"{workdir} holds no run config (config.json); is it the "
                            "--workdir of a twinflow_jax.main run?")


def weights_key(weights: str, eval_ema_decays=()) -> tuple[str, ...]:
  """User name of a set of weights -> its path in the saved TrainState.

  'ema' (the TwinFlow EMA teacher) -> ('ema',); 'online' or 'params' -> ('params',);
  'ema_<decay>' (an evaluation EMA, e.g. 'ema_0.9999' or 'ema_0p9999') ->
  ('eval_emas', 'ema_0p9999').

  Raises:
    ValueError: an unknown name, or an evaluation EMA the run did not keep.
  """
  if weights == "ema":
    return ("ema",)
  if weights in ("online", "params"):
    return ("params",)
  m = re.fullmatch(r"ema_(\d+(?:[.p]\d*)?)", weights)
  if not m:
    raise ValueError(f"unknown weights {weights!r}: use 'ema', 'online' or 'ema_<decay>' "
                     "(an evaluation EMA of train.eval_ema_decays, e.g. 'ema_0.9999')")
  name = eval_ema_name(float(m.group(1).replace("p", ".")))
  kept = [eval_ema_name(float(d)) for d in eval_ema_decays]
  if name not in kept:
    have = ", ".join(["ema", "online"] + [k.replace("p", ".") for k in kept])
    raise ValueError(f"the run keeps no evaluation EMA {weights!r} (train.eval_ema_decays="
                     f"{list(eval_ema_decays)}); available weights: {have}")
  return ("eval_emas", name)


def verify_checkpoint(step_dir: epath.Path) -> None:
  """Structural check of a checkpoint before it is read.

  The arrays themselves are verified as they are read (`restore_weights`: every array's
  checksum against the checkpoint's integrity record, as the trainer's restore does).

  Raises:
    CheckpointReadError: the checkpoint is incomplete.
  """
  if not (step_dir / STATE_ITEM).is_dir():
    raise CheckpointReadError(f"checkpoint {step_dir} has no '{STATE_ITEM}' item; it is "
                              "incomplete or not a twinflow_jax checkpoint")


@contextlib.contextmanager
def _quiet_background_errors():
  """Keeps tracebacks of Orbax's background threads off the console after a failed read.

  When a read fails, callbacks still pending in Orbax / TensorStore threads may later hit
  an already closed event loop and print tracebacks (through the `asyncio` and
  `concurrent.futures` loggers, the thread hook, sys.unraisablehook or sys.excepthook) under the one-line error that the
  restore raises anyway. After a failure they stay at debug level for the rest of the
  process; after a successful read everything is restored.
  """
  loggers = [logging.getLogger(n) for n in ("asyncio", "concurrent.futures")]
  levels = [lg.level for lg in loggers]
  hooks = threading.excepthook, sys.excepthook, sys.unraisablehook
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  threading.excepthook = lambda args: logging.debug(
      "background error after a checkpoint read: %r", args.exc_value)
  # TensorStore's threads report through sys.unraisablehook (and sys.excepthook).
  sys.excepthook = lambda kind, value, tb: logging.debug(
      "background error after a checkpoint read: %r", value)
  sys.unraisablehook = lambda args: logging.debug(
      "background error after a checkpoint read: %r", args.exc_value)
  yield   # not restored when the body raises: the pending callbacks run later
  for lg, level in zip(loggers, levels):
    lg.setLevel(level)
  threading.excepthook, sys.excepthook, sys.unraisablehook = hooks


def restore_weights(workdir: str, step: int, key: tuple[str, ...], abstract_params: Any
                    ) -> Any:
  """Reads one set of weights of checkpoint `step`, read-only, onto the given shardings.

  Args:
    workdir: the run's --workdir.
    step: a complete checkpoint step (see `complete_steps`).
    key: path of the weights in the TrainState, from `weights_key`.
    abstract_params: tree of `jax.ShapeDtypeStruct` with `sharding` (the model's params).

  Returns:
    The weights as global jax.Arrays with the target shardings.

  Raises:
    CheckpointReadError: the checkpoint is incomplete, unreadable or does not match.
  """
  step_dir = checkpoint_dir(workdir) / str(step)
  verify_checkpoint(step_dir)
  item: dict[str, Any] = abstract_params
  for k in reversed(key):
    item = {k: item}
  try:
    # The trainer's read-only restore: partial, and every array read is checked against
    # the checkpoint's integrity record (a flipped bit must not become NaN samples).
    with _quiet_background_errors():
      out = checkpoint_lib.restore_items(str(checkpoint_dir(workdir)), step, item)
  except errors.CheckpointRestoreError as e:
    cause = e.__cause__
    if cause is None:   # read, but fails verification (the message names the arrays)
      raise CheckpointReadError(f"{e}; it was left as it is") from e
    raise CheckpointReadError(
        f"checkpoint {step_dir} cannot be read ({type(cause).__name__}: "
        f"{errors.one_line(cause)[:200]}); it was left as it is") from e
  for k in key:
    out = out[k]
  got = jax.tree.map(lambda a: (a.shape, a.dtype), out)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params)
  if got != want:
    raise CheckpointReadError(f"checkpoint {step_dir} holds weights that do not match the "
                              "model of the run config")
  return out


@dataclasses.dataclass
class LoadedRun:
  """A run's model and weights, ready for `generate.generate`.

  Attributes:
    workdir: the run's --workdir.
    config: its config (from config.json; a LoRA run's `train.init_from` is the base
      folder actually read).
    step: the checkpoint step read.
    steps: all complete checkpoint steps.
    spec: the example shape and conditioning (`data.DataSpec`).
    mesh: the device mesh the weights live on.
    rules: the model's logical-axis rules.
    apply_fn: `apply_fn(params, x_t, t, r, cond) -> F`; for LoRA runs the trainer's
      (`train.lora.make_apply_fn`: adapters on the frozen base, the run's time input).
    weights: {name: params} for each name asked for ('ema', 'online', 'ema_<decay>'); for
      LoRA runs params are (adapters, base), the one frozen base shared by all names.
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  steps: list[int]
  spec: Any
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  apply_fn: Callable
  weights: dict[str, Any]


def is_lora(config: Any) -> bool:
  """Whether the run trained LoRA adapters on a frozen base (config.lora.rank > 0)."""
  from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top
  return lora_train.enabled(config)


def default_weights(config: Any) -> str:
  """The weights sampled when none are named: 'ema' (the TwinFlow EMA teacher), but
  'online' for LoRA runs (the trained adapter, which the official LoRA trainer samples and
  saves; their EMA slot may be the base itself, see train/lora.py)."""
  return "online" if is_lora(config) else "ema"


def _lora_base(config: ml_collections.ConfigDict, workdir: str, base: str | None
               ) -> ml_collections.ConfigDict:
  """The run config pointed at the base folder to read (`base`, else train.init_from).

  A `model.pretrained` that named the same folder as train.init_from (where the
  architecture is read) follows `base`.

  Raises:
    ValueError: a folder that does not exist (one line naming the field and the path).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  old = config.train.get("init_from", "")
  if base:
    if not os.path.isdir(base):
      raise ValueError(f"the LoRA base folder {base} (given as base / --base) does not exist")
    base = os.path.abspath(base)
    if config.model.get("pretrained") and config.model.pretrained == old:
      config.model.pretrained = base
    config.train.init_from = base
  elif not old or not os.path.isdir(old):
    raise ValueError(
        f"{workdir} is a LoRA run whose frozen base weights are not at config.train.init_from"
        f" = {old!r} (recorded in {epath.Path(workdir) / 'config.json'}); give the base "
        "transformer folder the run was trained on with --base DIR (python: "
        "load_run(..., base=DIR)); it is checked against lora.base_fingerprint")
  pretrained = config.model.get("pretrained", "")
  if pretrained and not os.path.isdir(pretrained):
    raise ValueError(f"the architecture of LoRA run {workdir} is read from "
                     f"config.model.pretrained = {pretrained!r}, which does not exist; give "
                     "the base folder with --base DIR")
  if not config.lora.get("base_fingerprint"):
    raise ValueError(f"the config of LoRA run {workdir} records no lora.base_fingerprint; "
                     "it was not written by the twinflow_jax trainer")
  return config


def _read_lora_base(config: Any, workdir: str, build: Callable, graphdef: Any,
                    adapters: Any, frozen_shardings: Any, mesh: jax.sharding.Mesh,
                    rules) -> Any:
  """The frozen base of a LoRA run, read as the trainer does and checked by fingerprint."""
  import functools  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top

  path = config.train.init_from
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      frozen = lora_train.read_base(functools.partial(lora_train.init_frozen, build), graphdef,
                                    adapters, frozen_shardings, path, int(config.seed))
  except (ValueError, OSError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"the base weights of LoRA run {workdir} at config.train.init_from = "
                     f"{path} cannot be read ({msg[:300]}); give the base transformer folder "
                     "the run was trained on with --base DIR") from e
  lora_train.check_fingerprint(
      config, lora_train.fingerprint(frozen), f"LoRA run {workdir} was trained on",
      fix="give the original base folder with --base DIR")
  return frozen


def data_spec_of(config: Any):
  """The run's example shape and conditioning, without reading any data or metadata."""
  from twinflow_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  c = config.data
  if c.source == "tfds" and (c.get("channels") is None or c.get("num_classes") is None):
    m = config.model     # no TFDS metadata lookup: the model config knows the shapes
    return data_config.DataSpec((int(c.image_size), int(c.image_size),
                                 int(m.get("in_channels", 3))),
                                int(m.get("num_classes", 1000)), "class")
  return data_lib.get_data_spec(c)


def _keep_compilation_cache_out_of(workdir: str) -> None:
  """Turns off a persistent XLA cache that would write into the run's folder.

  The trainer points JAX's process-wide cache at <workdir>/xla_cache; sampling from that
  run later in the same process (a notebook, a test) must not add files to it.
  """
  cache = jax.config.jax_compilation_cache_dir
  if not cache:
    return
  cache, root = os.path.realpath(cache), os.path.realpath(workdir)
  if cache == root or cache.startswith(root + os.sep):
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def load_run(workdir: str, step: int | None = None, weights: Sequence[str] | None = None,
             devices: Sequence[jax.Device] | None = None, base: str | None = None
             ) -> LoadedRun:
  """Builds a run's model from its config and reads the named weights, read-only.

  The mesh is the run's (config.mesh) when it fits the devices, else every device on
  'data'; the weights are read straight into their shardings on it.

  LoRA runs (config.lora.rank > 0), whose checkpoints hold the adapters only: the model
  is the trainer's (base transformer of config.model with the adapters of config.lora),
  the frozen base is read from `base` or config.train.init_from exactly as the trainer
  reads it (`train.lora.read_base`) and must match the run's lora.base_fingerprint; the
  adapters come from the checkpoint, and `apply_fn` is the trainer's (with the run's
  lora.time_input).

  Args:
    workdir: the run's --workdir.
    step: checkpoint step (default: the newest complete one).
    weights: names of the weight sets to read (default: `default_weights(config)`).
    devices: the devices to use (default: all).
    base: LoRA runs: the base folder, if it moved since training.

  Raises:
    CheckpointReadError: no checkpoint, or the one asked for cannot be read.
    ValueError: an unknown step or weights name, a config that does not build here, or a
      LoRA base that is missing or is not the one the run was trained on.
  """
  from twinflow_jax import generate  # pylint: disable=g-import-not-at-top
  from twinflow_jax import models  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  workdir = checkpoint_lib.absolute_workdir(workdir)

  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is not a directory")
  _keep_compilation_cache_out_of(workdir)
  steps = complete_steps(workdir)
  if not steps:
    raise CheckpointReadError(f"{workdir} holds no complete checkpoint (nothing in "
                              f"{checkpoint_dir(workdir)})")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"no complete checkpoint of step {step} in {workdir}; available: {steps}")
  config = read_config(workdir, step)
  lora = is_lora(config)
  if base and not lora:
    raise ValueError(f"--base applies to LoRA runs (config.lora.rank > 0); {workdir} is not "
                     "one (its checkpoints hold the whole model)")
  weights = (default_weights(config),) if weights is None else tuple(weights)
  keys = {w: weights_key(w, config.train.get("eval_ema_decays", ())) for w in weights}
  if lora:
    config = _lora_base(config, workdir, base)
  try:
    spec = data_spec_of(config)
    try:
      mesh = mesh_lib.create_mesh(config.mesh, devices)
    except ValueError:
      mesh = (generate.default_mesh() if devices is None else
              mesh_lib.create_mesh({"data": -1}, devices))
    rules = mesh_lib.logical_rules(config.mesh.get("logical_axis_rules", ()),
                                   models.DEFAULT_LOGICAL_AXIS_RULES)
    if lora:
      from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top
      build = lora_train.model_fn(config)
      graphdef, abs_params, p_specs, abs_frozen, f_specs = lora_train.param_specs(
          build, mesh, rules)
      mesh_lib.check_shardable(abs_frozen, f_specs, mesh)
      apply_fn = lora_train.make_apply_fn(graphdef, config.lora.time_input)
    else:
      model_config = config.model.to_dict()
      model_fn = lambda rngs: models.create_model(model_config, rngs=rngs)
      graphdef, abs_params, p_specs = state_lib.param_specs(model_fn, mesh, rules)
      apply_fn = state_lib.make_apply_fn(graphdef)
    mesh_lib.check_shardable(abs_params, p_specs, mesh)
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f"the run config of {workdir} does not build a model here: {e}") from e
  target = state_lib.abstract_with_shardings(abs_params, mesh_lib.spec_shardings(p_specs, mesh))
  frozen = None
  if lora:   # the base first: a wrong one stops before the checkpoint is read
    frozen = _read_lora_base(config, workdir, build, graphdef, target,
                             mesh_lib.spec_shardings(f_specs, mesh), mesh, rules)
  loaded = {w: restore_weights(workdir, step, k, target) for w, k in keys.items()}
  if lora:
    loaded = {w: (adapters, frozen) for w, adapters in loaded.items()}
  return LoadedRun(workdir, config, step, steps, spec, mesh, rules, apply_fn, loaded)
