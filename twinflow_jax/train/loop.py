"""The training loop: build (or restore) the sharded state, compile the step, run, save.

`train(config, workdir)` is the whole program behind `python -m twinflow_jax.main`. It
resumes from the newest checkpoint in `workdir` that restores and verifies, so the same
command is simply rerun after a preemption. Faults stop it loudly (docs/checkpoints.md):
a failed save at the next step, `train.max_consecutive_skips` skipped steps in a row, a
resume whose config differs in a field that matters; every complete checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from twinflow_jax import data as data_lib
from twinflow_jax import errors
from twinflow_jax import hostmem
from twinflow_jax import models
from twinflow_jax import sampling
from twinflow_jax.train import checkpoint as ckpt_lib
from twinflow_jax.train import config as config_lib
from twinflow_jax.train import evaluation
from twinflow_jax.train import faults
from twinflow_jax.train import images
from twinflow_jax.train import lora as lora_train
from twinflow_jax.train import mesh as mesh_lib
from twinflow_jax.train import metrics as metrics_lib
from twinflow_jax.train import optim
from twinflow_jax.train import preemption
from twinflow_jax.train import state as state_lib
from twinflow_jax.train import step as step_lib


@dataclasses.dataclass
class TrainResult:
  """What `train` returns (mostly for tests and notebooks).

  Attributes:
    step: the last step done.
    state: the final TrainState (global arrays).
    history: the logged metric records of this call (as in metrics.jsonl).
    stopped: why the loop ended early ('SIGTERM', 'preemption', 'stop_at_step'), or None.
    resumed_from: the checkpoint step this call resumed from, or None.
  """
  step: int
  state: state_lib.TrainState
  history: list[dict[str, Any]]
  stopped: str | None
  resumed_from: int | None


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before any array is allocated."""
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  data_spec: Any
  graphdef: nnx.GraphDef
  apply_fn: Callable
  tx: Any
  schedule: Callable
  init_fn: Callable
  abstract_state: state_lib.TrainState
  shardings: state_lib.TrainState
  batch_shardings: dict[str, jax.sharding.NamedSharding]
  batch_struct: dict[str, jax.ShapeDtypeStruct]
  train_step: Callable
  # LoRA runs (train/lora.py): the frozen base, outside the TrainState.
  frozen_init_fn: Callable | None = None
  abstract_frozen: Any = None
  frozen_shardings: Any = None

  @property
  def lora(self) -> bool:
    return self.frozen_init_fn is not None


def row_blocks_hint(row_blocks: int, batch_shards: int) -> str | None:
  """A warning when the loss's row blocks do not sit on the mesh's batch shards, else None.

  Not an error: row_blocks = 1 is the official layout (the fixtures' parity); on a sharded
  mesh it makes each row group live on part of the devices, so the loss's network calls
  move activations between them (docs/performance.md).
  """
  if row_blocks % batch_shards == 0:
    return None
  return (f"loss.row_blocks={row_blocks} on a mesh with {batch_shards} batch shards: the "
          "loss's row groups span devices and its network calls move activations between "
          f"them; --config.loss.row_blocks={batch_shards} keeps every shard's rows local "
          "(docs/training.md)")


def build(config: Any, devices=None) -> Setup:
  """Validates the config and derives mesh, model, optimizer, shardings and the step.

  Raises:
    errors.UserError: a config value that is invalid or does not fit the devices (every
      ValueError raised while turning the config into objects is one).
  """
  with errors.as_config_errors():
    config_lib.validate(config)
    tf_config = config_lib.tf_config(config)
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    t = config.train
    mesh_lib.check_batch_size(t.global_batch_size, mesh)
    rules = mesh_lib.logical_rules(config.mesh.logical_axis_rules,
                                   models.DEFAULT_LOGICAL_AXIS_RULES)
    data_spec = data_lib.get_data_spec(config.data)
    config_lib.check_model_fits_data(config.model, data_spec)
    accum = int(config.optim.accum_steps)
    tx, schedule = optim.create_optimizer(config.optim, t.num_steps)

    decays = tuple(float(d) for d in t.eval_ema_decays)
    frozen_init_fn = abs_frozen = frozen_shardings = None
    if lora_train.enabled(config):
      model_fn = lora_train.model_fn(config)
      graphdef, abs_params, p_specs, abs_frozen, f_specs = lora_train.param_specs(
          model_fn, mesh, rules)
      mesh_lib.check_shardable(abs_frozen, f_specs, mesh)
      init_fn = functools.partial(lora_train.init_state, model_fn, tx,
                                  eval_ema_decays=decays)
      frozen_init_fn = functools.partial(lora_train.init_frozen, model_fn)
      frozen_shardings = mesh_lib.spec_shardings(f_specs, mesh)
      apply_fn = lora_train.make_apply_fn(graphdef, config.lora.time_input)
    else:
      model_config = config.model.to_dict()
      model_fn = lambda rngs: models.create_model(model_config, rngs=rngs)
      graphdef, abs_params, p_specs = state_lib.param_specs(model_fn, mesh, rules)
      init_fn = functools.partial(state_lib.init_state, model_fn, tx,
                                  eval_ema_decays=decays)
      apply_fn = state_lib.make_apply_fn(graphdef)
    mesh_lib.check_shardable(abs_params, p_specs, mesh)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = state_lib.state_shardings(abstract_state, p_specs, tx, mesh)

  batch_struct = data_spec.batch_struct(t.global_batch_size)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch_shardings = {k: batch_sharding for k in batch_struct}
  train_step = step_lib.make_train_step(
      apply_fn, tf_config, tx, schedule, num_classes=data_spec.num_classes,
      uncond=t.uncond, eval_ema_decays=decays, accum_steps=accum,
      guide_from=config_lib.guide_source(config))
  return Setup(mesh, rules, data_spec, graphdef, apply_fn, tx, schedule, init_fn,
               abstract_state, shardings, batch_shardings, batch_struct, train_step,
               frozen_init_fn, abs_frozen, frozen_shardings)


def compile_step(setup: Setup):
  """`jax.jit` with explicit shardings and the state donated, compiled ahead of time."""
  rep = mesh_lib.replicated(setup.mesh)
  in_shardings = (setup.shardings, setup.batch_shardings)
  abstract_args = (
      state_lib.abstract_with_shardings(setup.abstract_state, setup.shardings),
      state_lib.abstract_with_shardings(setup.batch_struct, setup.batch_shardings))
  if setup.lora:   # the frozen base is a third, non-donated argument
    in_shardings += (setup.frozen_shardings,)
    abstract_args += (state_lib.abstract_with_shardings(setup.abstract_frozen,
                                                        setup.frozen_shardings),)
  jitted = jax.jit(setup.train_step, in_shardings=in_shardings,
                   out_shardings=(setup.shardings, rep), donate_argnums=0)
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    return jitted.lower(*abstract_args).compile()


def enable_compilation_cache(path: str | None) -> None:
  """Persistent XLA compilation cache (process-wide): a resumed run reuses executables.

  None turns it off again. JAX decides once per process whether to use the cache, so a
  change is followed by `reset_cache()` to take effect even after earlier compiles.
  """
  if jax.config.jax_compilation_cache_dir == path:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5 if path else 1.0)
  compilation_cache.reset_cache()


def init_state(setup: Setup, seed: int) -> state_lib.TrainState:
  """A fresh state, created directly in its sharded layout."""
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    return jax.jit(setup.init_fn, out_shardings=setup.shardings)(jax.random.key(seed))


def load_frozen_base(setup: Setup, path: str, seed: int = 0) -> Any:
  """LoRA: the base parameters read from `path` into their shardings (train.init_from)."""
  adapters = state_lib.abstract_with_shardings(setup.abstract_state.params,
                                               setup.shardings.params)
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    return lora_train.read_base(setup.frozen_init_fn, setup.graphdef, adapters,
                                setup.frozen_shardings, path, seed)


def load_pretrained_params(setup: Setup, state: state_lib.TrainState, path: str
                           ) -> state_lib.TrainState:
  """Fresh state with parameters, teacher and eval EMAs from a pretrained directory.

  The weights are read straight into the parameters' shardings; the optimizer state
  (zeros at init) does not depend on the values and is kept.
  """
  with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
    model = nnx.merge(setup.graphdef, state.params)
    models.load_pretrained(model, path)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                   out_shardings=setup.shardings.params)
    return state.replace(params=params, ema=copy(params),
                         eval_emas={k: copy(params) for k in state.eval_emas})


def make_sampler(setup: Setup, config: Any) -> Callable[[Any, int], dict[str, np.ndarray]]:
  """`(params, step) -> {preset: samples}` (host numpy), replicated on every process."""
  t = config.train
  spec = setup.data_spec
  n = t.num_samples
  presets = tuple(t.sample_presets)
  rep = mesh_lib.replicated(setup.mesh)
  p_shard = setup.shardings.params
  if setup.lora:   # params are (adapters, frozen base)
    p_shard = (p_shard, setup.frozen_shardings)

  if spec.conditioning == "class":
    # Class-conditional grids show the classes in order along each row.
    ncls = max(spec.num_classes, 1)
    cond = jnp.arange(n, dtype=jnp.int32) % ncls
  else:
    cond = None   # text conditions come from the first batch (see `train`)
    if n > t.global_batch_size and t.sample_every:
      raise errors.ConfigError(
          f"config.train.num_samples={n} exceeds config.train.global_batch_size="
          f"{t.global_batch_size}: text-conditional sample grids take their conditions "
          "from the first batch")

  def sample_all(params, key, text_cond):
    k_noise, k_sample = jax.random.split(key)
    noise = jax.random.normal(k_noise, (n, *spec.x_shape), jnp.float32)
    c = cond if text_cond is None else text_cond
    return {p: sampling.sample(setup.apply_fn, params, noise, c, p, k_sample)
            for p in presets}

  jitted = jax.jit(sample_all, in_shardings=(p_shard, rep, rep), out_shardings=rep)
  seed_key = jax.random.key(config.seed + 1)

  def run(params, step, text_cond=None):
    with jax.set_mesh(setup.mesh), nnx.logical_axis_rules(setup.rules):
      out = jitted(params, jax.random.fold_in(seed_key, step), text_cond)
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}

  return run


def _sample_params(state: state_lib.TrainState, source: str):
  if source == "ema":
    return state.ema
  if source == "params":
    return state.params
  return state.eval_emas[source]


def write_samples(workdir: str, step: int, samples: dict[str, np.ndarray], writer: Any,
                  is_main: bool, ncols: int | None = None) -> list[str]:
  """PNG per preset: workdir/samples/step_<step>_<preset>.png (main process only).

  `ncols` = the number of classes puts one class per column (labels are index mod classes).
  """
  if not is_main:
    return []
  out_dir = os.path.join(workdir, "samples")
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths, grids = [], {}
  for preset, x in samples.items():
    img = images.samples_to_image(x, ncols=ncols)
    path = os.path.join(out_dir, f"step_{step:07d}_{preset}.png")
    images.write_png(path, img)
    paths.append(path)
    grids[f"samples/{preset}"] = (img[None, ..., None] if img.ndim == 2 else img[None])
  writer.write_images(step, grids)
  return paths


class SkipMonitor:
  """Counts consecutive skipped steps from the `skip_reason` metric, one step behind.

  Reading the metric of the step before the one just dispatched keeps the device busy;
  `flush()` reads the newest one too (before a save and at the end).
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.streak = 0                 # consecutive skipped steps up to the last one read
    self.first: int | None = None   # first step of the current streak
    self._first_reason = 0
    self._queued: tuple[int, jax.Array] | None = None

  def push(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Reads the previously pushed step, then queues `step` (its metrics)."""
    self.flush()
    self._queued = (step, metrics["skip_reason"])

  def flush(self) -> None:
    """Reads the queued step.

    Raises:
      errors.NonFiniteError: after `limit` consecutive skipped steps.
    """
    if self._queued is None:
      return
    step, reason = self._queued
    self._queued = None
    reason = int(jax.device_get(reason))
    if not reason:
      self.streak = 0
      return
    if not self.streak:
      self.first, self._first_reason = step, reason
      logging.warning("step %d skipped (not finite: %s)", step,
                      step_lib.describe_skip_reason(reason))
    self.streak += 1
    if self.streak >= self.limit:
      raise errors.NonFiniteError(
          f"training stopped: {self.streak} consecutive steps were skipped "
          f"(config.train.max_consecutive_skips={self.limit}), the first at step "
          f"{self.first} (not finite: {step_lib.describe_skip_reason(self._first_reason)})."
          f" Nothing was saved from these steps; the checkpoints are kept. Check the data "
          f"and the learning rate, then rerun to resume")


def _inject_nan(tree: Any) -> Any:
  """`tree` with its first floating-point array set to NaN (fault tests only)."""
  leaves, treedef = jax.tree.flatten(tree)
  i = next(i for i, a in enumerate(leaves) if jnp.issubdtype(a.dtype, jnp.inexact))
  leaves[i] = leaves[i] * jnp.nan
  return jax.tree.unflatten(treedef, leaves)


def train(config: Any, workdir: str, *, stop: preemption.StopRequest | None = None,
          stop_at_step: int | None = None, devices=None) -> TrainResult:
  """Trains (or resumes) the run described by `config` in `workdir`.

  Args:
    config: the experiment ConfigDict (`twinflow_jax.train.config.base_config` fields).
    workdir: checkpoints, metrics.jsonl, samples and TensorBoard events go here.
    stop: an external stop request (the loop installs its own SIGTERM handler if None).
    stop_at_step: leave the loop after this step without a final checkpoint, as if the
      process had been killed there (used to test resumption).
    devices: the devices of the mesh (default: all); e.g. one device to test resharding.

  Returns:
    A TrainResult.

  Raises:
    errors.UserError: a config, path or data mistake (nothing was written or moved).
    errors.RunError: a fault stopped the run (failed save, `max_consecutive_skips`
      skipped steps, no verifiable checkpoint); every complete checkpoint is kept.
  """
  is_main = jax.process_index() == 0
  multi_process = jax.process_count() > 1
  workdir = ckpt_lib.absolute_workdir(workdir)
  setup = build(config, devices)
  t = config.train
  # Latent runs: grids and metrics see images decoded by the data's VAE. Built before
  # anything is written, so a missing VAE, reference or weights file stops here.
  decoder = evaluation.latent_decoder(config)
  evaluator = evaluation.create(config, setup, decoder)
  # Persistent XLA cache, by default in the workdir: a resumed run does not recompile.
  enable_compilation_cache(config.train.compilation_cache_dir
                           or os.path.join(workdir, "xla_cache"))
  if is_main:
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, FileNotFoundError, PermissionError) as e:
      raise errors.UserError(f"--workdir {workdir} cannot be used as a directory "
                             f"({type(e).__name__}: {errors.one_line(e)}); give a "
                             "directory that exists or can be created") from e
  config_json = ckpt_lib.config_to_json(config)
  frozen = None
  if setup.lora:
    # The base is read before anything is restored: its fingerprint is part of the config
    # that a checkpoint must match.
    with errors.as_config_errors("config.train.init_from"):
      frozen = load_frozen_base(setup, t.init_from, config.seed)
    base_id = lora_train.fingerprint(frozen)
    lora_train.check_fingerprint(config, base_id, "config.lora.base_fingerprint names")
    config_json["lora"]["base_fingerprint"] = base_id
    logging.info("LoRA: base weights from %s (fingerprint %s), %d adapted layers",
                 t.init_from, base_id, len(jax.tree.leaves(setup.abstract_state.params)) // 2)

  # Each process loads the rows of the global batch that its devices hold.
  rows = data_lib.process_rows(mesh_lib.batch_sharding(setup.mesh), t.global_batch_size)
  with errors.as_config_errors():
    data_iter = data_lib.create_train_iterator(
        config.data, global_batch_size=t.global_batch_size, seed=config.seed, rows=rows)
  checkpointer = ckpt_lib.Checkpointer(
      ckpt_lib.checkpoint_dir(workdir), save_every=t.checkpoint_every,
      keep=t.keep_checkpoints, async_save=t.async_checkpointing,
      verify_saves=t.verify_checkpoints)

  def check_config(step: int, saved: dict[str, Any]) -> None:
    if setup.lora:
      saved_id = saved.get("lora", {}).get("base_fingerprint", "")
      if saved_id != config_json["lora"]["base_fingerprint"]:
        raise errors.ConfigError(
            f"the base weights at {t.init_from} (fingerprint "
            f"{config_json['lora']['base_fingerprint']}) are not those checkpoint {step} in "
            f"{checkpointer.directory} was trained on (fingerprint {saved_id or 'none'}); "
            "point config.train.init_from at the original base")
    diffs = config_lib.resume_differences(saved, config_json)
    if diffs and t.allow_config_change:
      logging.warning("resuming checkpoint %d although these fields changed "
                      "(train.allow_config_change): %s", step, "; ".join(diffs))
    elif diffs:
      raise errors.ConfigError(
          f"checkpoint {step} in {checkpointer.directory} was saved with another config; "
          f"these fields differ (saved -> now): {'; '.join(diffs)}. Resuming would "
          f"silently change the run: restore them, use another --workdir, or pass "
          f"--config.train.allow_config_change=True to resume anyway")

  target = state_lib.abstract_with_shardings(setup.abstract_state, setup.shardings)
  restored = checkpointer.restore_latest(target, data_iter, check_config=check_config,
                                         allow_data_restart=t.allow_data_restart)
  if restored is None:
    state, start_step, resumed_from = init_state(setup, config.seed), 0, None
    if t.init_from and not setup.lora:   # a LoRA run's init_from is its frozen base
      with errors.as_config_errors("config.train.init_from"):
        state = load_pretrained_params(setup, state, t.init_from)
      logging.info("initialised parameters and EMA teacher from %s", t.init_from)
  else:
    resumed_from, state = restored
    start_step = int(jax.device_get(state.step))
    if start_step != resumed_from:
      raise RuntimeError(f"checkpoint {resumed_from} holds state of step {start_step}")

  writer = metrics_lib.create_writer(workdir, is_main, t.use_tensorboard)
  jsonl = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"), is_main)
  if is_main:
    jsonl.truncate_after(start_step)
    epath.Path(workdir, "config.json").write_text(
        json.dumps(config_json, indent=2, sort_keys=True))
    n_params = state_lib.num_params(setup.abstract_state.params)
    if setup.lora:
      logging.info("LoRA: %.3fM trainable parameters on a frozen base of %.2fM",
                   n_params / 1e6, state_lib.num_params(setup.abstract_frozen) / 1e6)
      n_params += state_lib.num_params(setup.abstract_frozen)
    logging.info("model %s: %.2fM parameters; mesh %s; %d process(es); %s",
                 config.model.name, n_params / 1e6, dict(setup.mesh.shape),
                 jax.process_count(),
                 f"resuming from step {start_step}" if resumed_from is not None
                 else "starting from scratch")
    hint = row_blocks_hint(int(config.loss.row_blocks), mesh_lib.batch_shards(setup.mesh))
    if hint:
      logging.warning(hint)
    if resumed_from is None:
      writer.write_hparams({"num_params": n_params, **_flatten(config_json)})

  t0 = time.perf_counter()
  compiled = compile_step(setup)
  logging.info("train step compiled in %.1fs", time.perf_counter() - t0)
  memory = compiled.memory_analysis()
  hint = hostmem.large_buffer_hint(memory.temp_size_in_bytes if memory else None,
                                   jax.default_backend())
  if hint and jax.process_index() == 0:
    logging.info(hint)
  sampler = make_sampler(setup, config)
  sample_source = config_lib.sample_source(config)
  step_args = () if frozen is None else (frozen,)
  sample_weights = ((lambda s: _sample_params(s, sample_source)) if frozen is None else
                    (lambda s: (_sample_params(s, sample_source), frozen)))
  spec = setup.data_spec
  grid_cols = (spec.num_classes if spec.conditioning == "class" and 1 < spec.num_classes <= 32
               else None)

  # Our own signal handlers only when the caller did not bring a stop request.
  stop_context = (contextlib.nullcontext(stop) if stop is not None else
                  preemption.StopRequest(preemption.default_signals(multi_process)))
  throughput = metrics_lib.Throughput(start_step, t.num_steps, t.global_batch_size)
  skips = SkipMonitor(t.max_consecutive_skips)
  history: list[dict[str, Any]] = []
  stopped = None
  text_cond = None
  step = start_step
  try:
    with stop_context as stop:
      while step < t.num_steps:
        batch = data_lib.make_global_batch(next(data_iter), setup.mesh,
                                           global_batch_size=t.global_batch_size)
        if text_cond is None and setup.data_spec.conditioning == "text":
          text_cond = {k: batch[k][:t.num_samples] for k in ("txt", "txt_mask", "pooled")}
        state, step_metrics = compiled(state, batch, *step_args)
        step += 1
        if faults.active("nan_opt_state", step):
          state = state.replace(opt_state=_inject_nan(state.opt_state))
        faults.hang_if_requested(step)
        checkpointer.poll(step)    # a failed background save stops the run here
        skips.push(step, step_metrics)

        if step % t.log_every == 0 or step == t.num_steps:
          scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          scalars.update(throughput.update(step))
          history.append({"step": step, **scalars})
          jsonl.write(step, scalars)
          writer.write_scalars(step, scalars)
          if is_main:
            logging.info(metrics_lib.progress_line(step, t.num_steps, scalars,
                                                   throughput.eta_seconds(step)))
        if t.sample_every and step % t.sample_every == 0 and step < t.num_steps:
          samples = sampler(sample_weights(state), step, text_cond)
          write_samples(workdir, step, evaluation.decode_samples(decoder, samples), writer,
                        is_main, grid_cols)
        if evaluator is not None and evaluator.due(step, t.num_steps):
          evaluation.run_and_record(evaluator, state, step, jsonl, writer, history,
                                    frozen=frozen)

        if stop_at_step is not None and step >= stop_at_step:
          stopped = "stop_at_step"
          break
        if preemption.should_stop(stop, checkpointer.manager, step, multi_process):
          stopped = stop.signal_name or "preemption"
          skips.flush()
          if skips.streak:   # no checkpoint from a run of skipped steps
            logging.warning("stopping at step %d (%s) without a checkpoint: the last %d "
                            "steps were skipped", step, stopped, skips.streak)
          else:
            checkpointer.save(step, state, data_iter, config_json, force=True)
            checkpointer.finish(step)
            logging.warning("stopping at step %d (%s); checkpoint saved", step, stopped)
          break
        if checkpointer.due(step):
          skips.flush()
          if skips.streak:
            logging.warning("no checkpoint at step %d: the last %d steps were skipped",
                            step, skips.streak)
          else:
            checkpointer.save(step, state, data_iter, config_json)

      if stopped is None:
        skips.flush()
        checkpointer.save(step, state, data_iter, config_json, force=True)
        checkpointer.finish(step)
        samples = sampler(sample_weights(state), step, text_cond)
        paths = write_samples(workdir, step, evaluation.decode_samples(decoder, samples),
                              writer, is_main, grid_cols)
        if is_main:
          logging.info("done at step %d; samples: %s", step, ", ".join(paths))
        if evaluator is not None and evaluator.at_end:
          evaluation.run_and_record(evaluator, state, step, jsonl, writer, history,
                                    frozen=frozen)
  finally:
    checkpointer.close()
    writer.flush()
    writer.close()
  return TrainResult(step, state, history, stopped, resumed_from)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
  return out
