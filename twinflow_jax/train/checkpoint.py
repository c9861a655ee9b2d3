"""Orbax checkpoints of the train state, the Grain iterator and the config.

One `CheckpointManager` under `workdir/checkpoints` saves asynchronously every K steps and
on request (preemption), keeps the last N, and on start restores the newest checkpoint that
reads back. Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save cut short never looks complete; a complete-looking checkpoint that fails
to restore (corrupt files) is reported, moved aside to `<step>.corrupt` (kept, not deleted)
and the previous one is used. Old checkpoints are only deleted by `max_to_keep` once a newer
one has been finalised.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE, DATA, CONFIG = "state", "data", "config"


class Checkpointer:
  """Saves and restores (state, data iterator, config) under one directory.

  Every process must create it and call `save`/`restore` at the same steps.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int,
               async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"train.checkpoint_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    self.save_every = save_every
    self._options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  @property
  def manager(self) -> ocp.CheckpointManager:
    return self._manager

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None, config: dict[str, Any],
           force: bool = False) -> bool:
    """Starts an (async) save at `step` if it is due (or `force`); True if started.

    Due means `step % save_every == 0`; the decision is ours rather than Orbax's (whose
    policy also saves the very first step).
    """
    if (not force and step % self.save_every) or step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state),
             CONFIG: ocp.args.JsonSave(config)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("checkpoint save started at step %d (%s)", step, self.directory)
    return saved

  def restore_latest(self, abstract_state: Any, data_iter: Any | None
                     ) -> tuple[int, Any] | None:
    """Restores the newest readable checkpoint onto `abstract_state`'s shardings.

    Args:
      abstract_state: tree of `jax.ShapeDtypeStruct` with `sharding` (the target layout,
        which may differ from the one the checkpoint was saved with).
      data_iter: Grain iterator whose position is restored in place (or None).

    Returns:
      (step, state), or None when there is no checkpoint at all.

    Raises:
      RuntimeError: every checkpoint present failed to restore.
    """
    self._report_incomplete()
    steps = self.all_steps()
    failed: list[tuple[int, Exception]] = []
    for step in reversed(steps):
      try:
        state = self._restore(step, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except
        logging.error("checkpoint at step %d in %s cannot be restored (%s: %s); trying "
                      "the previous one", step, self.directory, type(e).__name__, e)
        failed.append((step, e))
        continue
      # Only once an older checkpoint restores are the newer broken ones moved aside
      # (kept, never deleted), so that later saves and resumes do not trip on them.
      for bad, _ in failed:
        self._quarantine(bad)
      logging.info("restored checkpoint of step %d from %s", step, self.directory)
      return step, state
    if steps:
      # Nothing restores: more likely a changed config or an unreachable store than
      # corruption everywhere. Stop and leave every checkpoint where it is.
      details = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failed)
      raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} could be "
                         f"restored, so nothing was moved or overwritten. Does the config "
                         f"match the one they were saved with? Errors: {details}")
    return None

  def _restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    state = self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]
    if data_iter is None:
      return state
    data_dir = self.directory / str(step) / DATA
    if not data_dir.exists():
      raise FileNotFoundError(f"checkpoint {step} has no data iterator state")
    # Grain keeps one file per process; with another process count the position cannot
    # be restored, but the model state still can.
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not (data_dir / mine).exists():
      logging.warning("checkpoint %d holds data iterator states %s, none for %s: the data "
                      "order restarts from the beginning", step,
                      sorted(p.name for p in data_dir.iterdir()), mine)
      return state
    self._manager.restore(step, args=ocp.args.Composite(
        **{DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
    return state

  def restore_config(self, step: int) -> dict[str, Any]:
    """The config JSON saved with checkpoint `step`."""
    return self._manager.restore(
        step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def _quarantine(self, step: int) -> None:
    """Moves a broken checkpoint out of the manager's view, keeping its files."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst = self.directory / f"{step}.corrupt"
      n = 1
      while dst.exists():
        dst, n = self.directory / f"{step}.corrupt{n}", n + 1
      src.rename(dst)
      logging.warning("moved broken checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine_checkpoint_{step}")
    self._manager.reload()

  def _report_incomplete(self) -> None:
    if not self.directory.exists():
      return
    for p in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in p.name:
        logging.warning("ignoring incomplete checkpoint %s (a save was cut short)", p)

  def wait(self) -> None:
    """Blocks until pending async saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def config_to_json(config: Any) -> dict[str, Any]:
  """ml_collections ConfigDict (or dict) -> JSON-compatible dict."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
