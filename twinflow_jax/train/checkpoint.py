"""Verified Orbax checkpoints of the train state, the Grain iterator and the config.

Layout: `workdir/checkpoints/<step>/` holds the items `state` (the TrainState arrays),
`config` (the run's config as JSON), `integrity` (one record per array, below) and `data`
(the Grain iterator position, one JSON file per process). Orbax writes a checkpoint to a
temporary directory and renames it when complete, so a save cut short never looks complete.

Integrity. Orbax checks its index files (CRC-32C) but not the array bytes: a flipped bit in
an array file restores silently. So every save records, for every array, an exact checksum
(two 32-bit weighted sums of the array's bit patterns, computed on the devices with integer
arithmetic, hence identical on any mesh and any number of processes) and the number of
non-finite values. A state with a non-finite value is never written. Restoring recomputes
the record on the restored arrays and treats any difference like an unreadable checkpoint.

Saving (`Checkpointer.save`, every process at the same steps) is asynchronous. `poll()`,
called after every train step, notices a failed background write at the next step and
raises `errors.CheckpointSaveError` naming the path and the OS error. Orbax never deletes
checkpoints here (`max_to_keep` is ours): before a new save starts and when the run ends,
the previous save is waited for, read back and verified (`train.verify_checkpoints`), and
only then are checkpoints beyond the newest `keep` deleted. So the newest good checkpoint
is never rotated out by one that failed.

Restoring (`Checkpointer.restore_latest`): the processes agree on the candidates (the union
of the complete steps each one sees) and try them newest first. For each, every process
reads the config and integrity records and its shards of the state; all processes share
whether they succeeded (`multihost_utils.process_allgather`), the checksums are computed
globally, and a candidate is used only when every process read it and it verified. Newer
candidates that failed are then moved aside to `<step>.corrupt` (kept, never deleted) by
process 0 only, after the agreement; if none restores, nothing is moved and
`errors.CheckpointRestoreError` lists why. A missing or unreadable data-iterator file is an
error naming it unless `allow_data_restart`; a checkpoint written with another number of
processes restores the data position exactly (global batches do not depend on it).

Read-only use (evaluation, sampling): `restorable_steps(directory)` lists the complete
steps and `restore_items(directory, step, {'params': abstract, 'ema': ..., 'eval_emas':
{...}})` restores some top-level items of the state onto the given shardings and verifies
them against the integrity record. Neither moves, renames or deletes anything.

Test-only fault injection: `twinflow_jax.train.faults` (environment variable).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging as std_logging
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from twinflow_jax import errors
from twinflow_jax.train import faults

STATE, DATA, CONFIG, INTEGRITY = "state", "data", "config", "integrity"
JSON_FILE = "metadata"            # the file name of Orbax's JSON items
INTEGRITY_FORMAT = "twinflow-integrity-1"
_VERIFY_CHUNK_BYTES = 1 << 30     # read-back verification restores about this much at once
_MESSAGE_BYTES = 400              # per-process message length shared between processes

PyTree = Any


# ----------------------------------------------------------------------------------------
# Integrity records: exact, mesh-independent checksums and a finite-value summary.


def _words(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (same shape; 8-byte values folded)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  if size == 8:
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)   # [..., 2]
    return w[..., 0] ^ (w[..., 1] * jnp.uint32(0x9E3779B1))
  raise TypeError(f"no checksum for dtype {x.dtype}")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major element index of every position (mod 2**32), without reshaping."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride)
    stride = (stride * shape[dim]) % 2**32
  return index


def _leaf_summary(x: jax.Array) -> jax.Array:
  """uint32 [3]: the checksum (two words) and the number of non-finite values of `x`."""
  w = _words(x)
  i = _flat_index(w.shape)
  # Two weighted sums mod 2**32. Each weight is odd and the mix is a bijection, so a
  # change of any single bit changes both sums; integer sums are exact in any order, so
  # the result does not depend on the sharding. One variadic reduction (cheap to compile).
  mixed = (w ^ (w >> 16)) * jnp.uint32(0x45D9F3B)
  a = w * (i * jnp.uint32(2) + jnp.uint32(1))
  b = mixed * ((i * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1))
  if jnp.issubdtype(x.dtype, jnp.inexact):
    nonfinite = (~jnp.isfinite(x)).astype(jnp.uint32)
  else:
    nonfinite = jnp.zeros(w.shape, jnp.uint32)
  zero = jnp.uint32(0)
  sums = jax.lax.reduce((a, b, nonfinite), (zero, zero, zero),
                        lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]),
                        tuple(range(w.ndim)))
  return jnp.stack(sums)


def _replicated_like(leaves: Sequence[jax.Array]) -> Any:
  for leaf in leaves:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return None


@functools.lru_cache(maxsize=8)
def _summary_fn(replicated: Any) -> Callable:
  return jax.jit(lambda xs: [_leaf_summary(x) for x in xs], out_shardings=replicated)


def _summaries(leaves: Sequence[jax.Array]) -> list[dict[str, Any]]:
  """Integrity summary of each array (a global computation: every process calls it)."""
  if not leaves:
    return []
  out = jax.device_get(_summary_fn(_replicated_like(leaves))(list(leaves)))
  return [{"shape": list(x.shape), "dtype": str(jnp.dtype(x.dtype)),
           "checksum": f"{int(c[0]):08x}{int(c[1]):08x}", "nonfinite": int(c[2])}
          for x, c in zip(leaves, out)]


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_names(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  """'params/x_in/kernel'-style names of the leaves of `tree`, in flattening order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return ["/".join(_key_name(k) for k in path) for path, _ in flat]


def integrity_record(state: PyTree, step: int) -> dict[str, Any]:
  """The JSON-able integrity record of a state: per array checksum and finite summary."""
  names = leaf_names(state)
  return {"format": INTEGRITY_FORMAT, "step": int(step),
          "arrays": dict(zip(names, _summaries(jax.tree.leaves(state))))}


def nonfinite_arrays(record: dict[str, Any]) -> list[str]:
  """Names (with counts) of the arrays of a record that hold non-finite values."""
  return [f"{name} ({info['nonfinite']})" for name, info in record["arrays"].items()
          if info["nonfinite"]]


def _compare(names: Sequence[str], got: Sequence[dict[str, Any]],
             record: dict[str, Any]) -> list[str]:
  """Differences between recomputed summaries and a saved record (empty if they match)."""
  if record.get("format") != INTEGRITY_FORMAT:
    return [f"unknown integrity record format {record.get('format')!r}"]
  problems = []
  for name, info in zip(names, got):
    want = record["arrays"].get(name)
    if want is None:
      problems.append(f"{name}: no checksum recorded")
    elif info["nonfinite"]:
      problems.append(f"{name}: {info['nonfinite']} non-finite values")
    elif (info["shape"], info["dtype"]) != (want["shape"], want["dtype"]):
      problems.append(f"{name}: {info['dtype']}{info['shape']} restored, "
                      f"{want['dtype']}{want['shape']} saved")
    elif info["checksum"] != want["checksum"]:
      problems.append(f"{name}: checksum {info['checksum']} != saved {want['checksum']}")
  return problems


# ----------------------------------------------------------------------------------------
# The integrity item: Orbax's JSON handler, with a test-only simulated disk-full write.


class IntegrityHandler(ocp.JsonCheckpointHandler):
  """Writes the integrity record in the background like any JSON item."""

  async def _save_fn(self, x, directory):
    if faults.active("save_enospc", x["step"]):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / JSON_FILE))
    await super()._save_fn(x, directory)


@ocp.args.register_with_handler(IntegrityHandler, for_save=True)
@dataclasses.dataclass
class IntegritySave(ocp.args.CheckpointArgs):
  item: Mapping[str, Any]


@ocp.args.register_with_handler(IntegrityHandler, for_restore=True)
@dataclasses.dataclass
class IntegrityRestore(ocp.args.CheckpointArgs):
  item: Any = None


# ----------------------------------------------------------------------------------------
# Multi-process agreement.


def _share(ok: bool, message: str = "") -> list[tuple[bool, str]]:
  """(ok, message) of every process, in process order (a collective on several)."""
  if jax.process_count() == 1:
    return [(ok, message)]
  buf = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  data = message.encode()[:_MESSAGE_BYTES]
  buf[0] = int(ok)
  buf[1:1 + len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [(bool(r[0]), bytes(r[1:]).rstrip(b"\0").decode(errors="replace")) for r in rows]


def _failures(shared: list[tuple[bool, str]]) -> str:
  """'process 1: why; ...' of the processes that failed (just 'why' on one process)."""
  bad = [(i, m) for i, (ok, m) in enumerate(shared) if not ok]
  if len(shared) == 1:
    return "; ".join(m for _, m in bad)
  return "; ".join(f"process {i}: {m}" for i, m in bad)


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------
# Reading one checkpoint (no Orbax barriers: a failure on one process cannot hang others).


def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


_QUIETED = False   # _quiet_abandoned_reads has run


def _quiet_abandoned_reads() -> None:
  """Drops the noise of Orbax's abandoned parallel reads when a restore fails.

  When one array of a checkpoint fails to read, Orbax raises at once and closes its event
  loop with the other reads unfinished. Python then prints each of them as it is
  collected or completes: "Exception ignored in <coroutine ...>" and asyncio's "Task
  exception was never retrieved" (with a TensorStore spec dump each), and "RuntimeError:
  Event loop is closed" from TensorStore's threads, dozens of tracebacks around the one
  line that reports the failure. Some of them come while the failing read still unwinds,
  so this is installed before the first restore (a restore that succeeds prints none of
  them) and stays for the rest of the process; anything else still reaches the usual
  hook and log.
  """
  global _QUIETED
  if _QUIETED:
    return
  _QUIETED = True
  previous = sys.unraisablehook

  def hook(unraisable):
    obj, exc = unraisable.object, unraisable.exc_value
    code = getattr(obj, "cr_code", None)
    if (code is not None and _ORBAX in code.co_filename) or _abandoned_read_error(exc):
      logging.debug("abandoned checkpoint read: %s", errors.one_line(exc))
    else:
      previous(unraisable)

  sys.unraisablehook = hook
  std_logging.getLogger("asyncio").addFilter(_not_an_abandoned_read)


_ORBAX = f"{os.sep}orbax{os.sep}"


def _abandoned_read_error(exc: BaseException | None) -> bool:
  """Whether `exc` is what an abandoned Orbax read leaves: raised through Orbax's code (or
  from an exception that was), or TensorStore's "Event loop is closed"."""
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    tb = exc.__traceback__
    while tb is not None:
      if _ORBAX in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    exc = exc.__cause__ or exc.__context__
  return False


def _not_an_abandoned_read(record: std_logging.LogRecord) -> bool:
  """asyncio log filter: False for the errors of Orbax's abandoned reads, True otherwise.

  "... exception was never retrieved" of the tasks (whose repr names Orbax's coroutine)
  and of the futures that gather them (whose repr names only the exception), "Exception
  in callback ..." and the like: judged by the exception's traceback through Orbax's code,
  or "Event loop is closed". What it drops goes to the debug log.
  """
  exc = record.exc_info[1] if record.exc_info else None
  text = record.getMessage()
  if _abandoned_read_error(exc) or ("never retrieved" in text and _ORBAX in text):
    logging.debug("abandoned checkpoint read: %s",
                  errors.one_line(exc) if exc else text.splitlines()[0])
    return False
  return True


def _restore_arrays(step_dir: epath.Path, target: PyTree) -> PyTree:
  """Restores the leaves of `target` that are ShapeDtypeStructs; others stay placeholders."""
  is_leaf = lambda x: x is ocp.PLACEHOLDER
  restore_args = jax.tree.map(
      lambda a: a if a is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
          sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), target, is_leaf=is_leaf)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args))
  finally:
    handler.close()


def _complete_steps(directory: epath.Path) -> list[int]:
  """Steps of the complete checkpoints in `directory` (a plain listing, read-only)."""
  if not directory.exists():
    return []
  # Orbax's test of a finished save (a rename locally, a marker file on object stores).
  return sorted(int(p.name) for p in ocp.step.checkpoint_steps_paths(directory)
                if p.name.isdigit())


def restorable_steps(directory: str) -> list[int]:
  """Sorted steps of the complete checkpoints under `directory` (workdir/checkpoints).

  Read-only: lists what a save finished (temporary and `.corrupt` folders are left out);
  whether a step verifies is known only when `restore_items` reads it.
  """
  return _complete_steps(epath.Path(directory))


def restore_items(directory: str, step: int, abstract: Mapping[str, PyTree], *,
                  verify: bool = True) -> dict[str, PyTree]:
  """Restores some top-level items of a saved TrainState, read-only and verified.

  Args:
    directory: the checkpoints directory (workdir/checkpoints).
    step: a step from `restorable_steps`.
    abstract: {item: tree of jax.ShapeDtypeStruct with `sharding`} for any of 'params',
      'ema' (the EMA teacher), 'eval_emas' ({name: params tree}, e.g. 'ema_0p9999'), or
      other TrainState fields; each tree mirrors the saved one (nested dicts for params).
    verify: recompute every restored array's checksum and compare it with the
      checkpoint's integrity record (a global computation: call it on every process).

  Returns:
    {item: restored tree of jax.Arrays on the given shardings}.

  Raises:
    errors.CheckpointRestoreError: the step is missing, unreadable or fails verification.
      Nothing under `directory` is ever moved, renamed or deleted.
  """
  step_dir = epath.Path(directory) / str(step)
  try:
    record = _read_json(step_dir / INTEGRITY / JSON_FILE) if verify else None
    item = dict(abstract)
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    handler = ocp.PyTreeCheckpointHandler()
    try:
      out = handler.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    finally:
      handler.close()
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointRestoreError(
        f"cannot read checkpoint {step_dir}: {errors.one_line(e)}") from e
  if verify:
    problems = _compare(leaf_names(out), _summaries(jax.tree.leaves(out)), record)
    if problems:
      raise errors.CheckpointRestoreError(
          f"checkpoint {step_dir} fails verification: {'; '.join(problems[:3])}")
  return dict(out)


# ----------------------------------------------------------------------------------------
# The trainer's checkpointer.


class Checkpointer:
  """Saves, verifies, rotates and restores (state, data iterator, config) in one directory.

  Every process must create it and call `save`, `finish`, `restore_latest` and `close` at
  the same steps; `poll` is local and cheap.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int,
               async_save: bool = True, verify_saves: bool = True):
    if save_every < 1:
      raise errors.ConfigError(f"train.checkpoint_every must be >= 1, got {save_every}")
    if keep < 1:
      raise errors.ConfigError(f"train.keep_checkpoints must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    self.save_every = save_every
    self.keep = keep
    self.verify_saves = verify_saves
    self._target: PyTree = None           # abstract state of the latest save
    self._pending: int | None = None      # step of a save not yet checked
    self._pending_record: dict[str, Any] | None = None
    self._pending_written = False         # its background write finished without error
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  @property
  def manager(self) -> ocp.CheckpointManager:
    return self._manager

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  # -------------------------------------------------------------------------- saving

  def due(self, step: int) -> bool:
    """Whether a periodic save falls on `step` (`step % save_every == 0`)."""
    return step % self.save_every == 0

  def save(self, step: int, state: Any, data_iter: Any | None, config: dict[str, Any],
           force: bool = False) -> bool:
    """Starts an (async) save at `step` if it is due (or `force`); True if started.

    Due means `step % save_every == 0`. The previous save is first finished, verified and
    rotated (`finish`). A state with a non-finite value is never written.

    Raises:
      errors.NonFiniteError: the state holds non-finite values (nothing is written).
      errors.CheckpointSaveError: this or the previous save failed.
    """
    if (not force and step % self.save_every) or step in self._manager.all_steps():
      return False
    self.finish(step)
    record = integrity_record(state, step)
    bad = nonfinite_arrays(record)
    if bad:
      raise errors.NonFiniteError(
          f"refusing to save checkpoint {step}: the state holds non-finite values in "
          f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the existing checkpoints "
          f"{self.all_steps()} are kept")
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config),
             INTEGRITY: IntegritySave(record)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  (a synchronous write failed)
      raise self._save_error(step, e, step) from e
    if saved:
      self._pending, self._pending_record, self._pending_written = step, record, False
      self._target = jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
      logging.info("checkpoint save started at step %d (%s)", step, self.directory)
    return saved

  def _save_error(self, step: int, error: BaseException,
                  noticed: int | None) -> errors.CheckpointSaveError:
    kept = [s for s in self.all_steps() if s != step]
    when = f" (noticed after step {noticed})" if noticed is not None else ""
    return errors.CheckpointSaveError(
        f"saving checkpoint {step} to {self.directory / str(step)} failed{when}: "
        f"{errors.one_line(error)}. The complete checkpoints {kept} are kept; free space "
        f"or fix the storage and rerun the same command to resume")

  def poll(self, step: int | None = None) -> None:
    """Raises at once if the pending background save failed (cheap; call every step).

    Args:
      step: the step just done (for the message).

    Raises:
      errors.CheckpointSaveError: naming the checkpoint path and the OS error.
    """
    if self._pending is None or self._pending_written:
      return
    if self._manager.is_saving_in_progress():
      return
    self._wait(step)

  def _wait(self, noticed: int | None = None) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      step, self._pending = self._pending, None
      raise self._save_error(step, e, noticed) from e
    self._pending_written = True

  def finish(self, step: int | None = None) -> None:
    """Waits for the pending save, reads it back and verifies it, then rotates old ones.

    Args:
      step: the current train step (for the message).

    Raises:
      errors.CheckpointSaveError: the save failed or its read-back does not verify (the
        older checkpoints are all kept).
    """
    if self._pending is None:
      return
    self._wait(step)
    saved = self._pending
    if self.verify_saves:
      problems = self._verify_written(saved)
      if problems:
        self._pending = None
        raise errors.CheckpointSaveError(
            f"checkpoint {saved} in {self.directory} does not read back as written: "
            f"{problems}. The older checkpoints are kept; check the storage")
    self._pending = None
    self._rotate(newest_good=saved)

  def _verify_written(self, step: int) -> str:
    """Reads checkpoint `step` back in chunks and compares it with its record ('' = ok)."""
    leaves, treedef = jax.tree_util.tree_flatten(self._target)
    names = leaf_names(self._target)
    chunks, chunk, size = [], [], 0
    for i, leaf in enumerate(leaves):
      nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
      if chunk and size + nbytes > _VERIFY_CHUNK_BYTES:
        chunks.append(chunk)
        chunk, size = [], 0
      chunk.append(i)
      size += nbytes
    chunks.append(chunk)
    step_dir = self.directory / str(step)
    for chunk in chunks:
      wanted = set(chunk)
      target = jax.tree_util.tree_unflatten(
          treedef, [a if i in wanted else ocp.PLACEHOLDER for i, a in enumerate(leaves)])
      try:
        if faults.active("readback_error", step):
          raise OSError(errno.EIO, "injected read error", str(step_dir))
        restored = _restore_arrays(step_dir, target)
        ok, why = True, ""
      except Exception as e:  # pylint: disable=broad-except
        ok, why = False, errors.one_line(e)
      shared = _share(ok, why)
      if not all(s for s, _ in shared):
        return _failures(shared)
      got = jax.tree_util.tree_leaves(restored, is_leaf=lambda x: x is ocp.PLACEHOLDER)
      arrays = [got[i] for i in chunk]
      problems = _compare([names[i] for i in chunk], _summaries(arrays),
                          self._pending_record)
      del restored, got, arrays
      if problems:
        return "; ".join(problems[:3])
    return ""

  def _rotate(self, newest_good: int) -> None:
    """Deletes all but the newest `keep` checkpoints up to `newest_good` (never it)."""
    steps = [s for s in self.all_steps() if s <= newest_good]
    for old in steps[:-self.keep]:
      self._manager.delete(old)
      logging.info("deleted checkpoint %d (keeping %d)", old, self.keep)

  # -------------------------------------------------------------------------- restoring

  def restore_latest(self, abstract_state: Any, data_iter: Any | None, *,
                     check_config: Callable[[int, dict[str, Any]], None] | None = None,
                     allow_data_restart: bool = False) -> tuple[int, Any] | None:
    """Restores the newest checkpoint that every process reads and that verifies.

    Args:
      abstract_state: tree of `jax.ShapeDtypeStruct` with `sharding` (the target layout,
        which may differ from the one the checkpoint was saved with).
      data_iter: Grain iterator whose position is restored in place (or None).
      check_config: called with (step, saved config JSON) before a candidate's arrays are
        read; raise (e.g. errors.ConfigError) to refuse the resume. Nothing is moved then.
      allow_data_restart: a missing or unreadable data-iterator file only warns, and every
        process restarts the data order from the beginning.

    Returns:
      (step, state), or None when there is no checkpoint at all.

    Raises:
      errors.CheckpointRestoreError: checkpoints exist but none restores and verifies
        (nothing is moved), or the data-iterator state is missing or unreadable.
    """
    self._report_incomplete()
    failed: list[tuple[int, str]] = []
    for step in self._candidates():
      why = self._try_config(step, check_config)
      if not why:
        state, why = self._try_state(step, abstract_state)
      if why:
        logging.error("checkpoint %d in %s cannot be used (%s); trying the previous one",
                      step, self.directory, why)
        failed.append((step, why))
        continue
      # Only once an older checkpoint restores on every process are the newer broken
      # ones moved aside (kept, never deleted), by process 0, so later saves and resumes
      # do not trip on them.
      for bad, _ in failed:
        self._quarantine(bad)
      if failed:
        _barrier("twinflow_quarantine_done")
        self._manager.reload()
      if data_iter is not None:
        self._restore_data(step, data_iter, allow_data_restart)
      logging.info("restored and verified checkpoint of step %d from %s", step,
                   self.directory)
      return step, state
    if failed:
      # Nothing restores: more likely a changed config or an unreachable store than
      # corruption everywhere. Stop and leave every checkpoint where it is.
      details = "; ".join(f"step {s}: {w}" for s, w in failed)
      raise errors.CheckpointRestoreError(
          f"none of the checkpoints {sorted(s for s, _ in failed)} in {self.directory} "
          f"could be restored and verified, so nothing was moved or overwritten. Does the "
          f"config match the one they were saved with? Errors: {details}")
    return None

  def _candidates(self) -> list[int]:
    """Union of the complete steps every process sees, newest first."""
    self._manager.reload()
    mine = _complete_steps(self.directory)
    if jax.process_count() == 1:
      return sorted(mine, reverse=True)
    counts = np.asarray(multihost_utils.process_allgather(np.int32(len(mine))))
    padded = np.full(max(int(counts.max()), 1), -1, np.int32)
    padded[:len(mine)] = mine
    every = np.asarray(multihost_utils.process_allgather(padded))
    return sorted({int(s) for s in every.ravel() if s >= 0}, reverse=True)

  def _try_config(self, step: int,
                  check_config: Callable[[int, dict[str, Any]], None] | None) -> str:
    """'' if every process reads the saved config (then `check_config` runs), else why."""
    try:
      saved = _read_json(self.directory / str(step) / CONFIG / JSON_FILE)
      ok, why = True, ""
    except Exception as e:  # pylint: disable=broad-except
      ok, why, saved = False, f"config unreadable: {errors.one_line(e)}", None
    shared = _share(ok, why)
    if not all(s for s, _ in shared):
      return _failures(shared)
    if check_config is not None:
      check_config(step, saved)   # the same file on every process: the same decision
    return ""

  def _try_state(self, step: int, abstract_state: Any) -> tuple[Any, str]:
    """(state, '') if every process reads it and it verifies, else (None, why)."""
    step_dir = self.directory / str(step)
    state = None
    try:
      if faults.active("restore_error", step):
        raise OSError(errno.EIO, "injected read error", str(step_dir / STATE))
      record = _read_json(step_dir / INTEGRITY / JSON_FILE)
      _quiet_abandoned_reads()
      state = _restore_arrays(step_dir, abstract_state)
      ok, why = True, ""
    except FileNotFoundError as e:
      ok, why = False, f"missing file: {errors.one_line(e)}"
    except Exception as e:  # pylint: disable=broad-except
      ok, why = False, f"{type(e).__name__}: {errors.one_line(e)}"
    shared = _share(ok, why)
    if not all(s for s, _ in shared):
      return None, _failures(shared)
    problems = _compare(leaf_names(state), _summaries(jax.tree.leaves(state)), record)
    if problems:
      more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
      return None, f"fails verification: {'; '.join(problems[:3])}{more}"
    return state, ""

  def _restore_data(self, step: int, data_iter: Any, allow_restart: bool) -> None:
    """Restores the iterator position of `step`; every process or none (restart)."""
    initial = data_iter.get_state()
    data_dir = self.directory / str(step) / DATA
    mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    try:
      state, note = _data_state(data_dir, mine)
      data_iter.set_state(state)
      ok, why = True, ""
      if note:
        logging.info("checkpoint %d: %s", step, note)
    except Exception as e:  # pylint: disable=broad-except
      ok, why = False, errors.one_line(e)
    shared = _share(ok, why)
    if all(s for s, _ in shared):
      return
    problem = _failures(shared)
    if not allow_restart:
      raise errors.CheckpointRestoreError(
          f"checkpoint {step}: the data-iterator state cannot be restored ({problem}). "
          f"Resuming without it would silently change the data order; pass "
          f"--config.train.allow_data_restart=True to restart the data order instead")
    logging.warning("checkpoint %d: the data-iterator state cannot be restored (%s); "
                    "train.allow_data_restart is set, so the data order restarts from the "
                    "beginning", step, problem)
    data_iter.set_state(initial)

  def restore_config(self, step: int) -> dict[str, Any]:
    """The config JSON saved with checkpoint `step`."""
    return _read_json(self.directory / str(step) / CONFIG / JSON_FILE)

  def _quarantine(self, step: int) -> None:
    """Moves a broken checkpoint out of the manager's view, keeping its files."""
    if jax.process_index() != 0:
      return
    src = self.directory / str(step)
    if not src.exists():
      return
    dst = self.directory / f"{step}.corrupt"
    n = 1
    while dst.exists():
      dst, n = self.directory / f"{step}.corrupt{n}", n + 1
    src.rename(dst)
    logging.warning("moved broken checkpoint %s to %s", src, dst)

  def _report_incomplete(self) -> None:
    if not self.directory.exists():
      return
    for p in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in p.name:
        logging.warning("ignoring incomplete checkpoint %s (a save was cut short)", p)

  def wait(self) -> None:
    """Blocks until pending async saves are complete (raises if one failed)."""
    if self._pending is not None:
      self._wait()

  def close(self) -> None:
    """Waits for the background save without raising (use `finish` to check it)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("a checkpoint save failed: %s", errors.one_line(e))
    self._manager.close()


def _data_state(data_dir: epath.Path, mine: epath.Path) -> tuple[Any, str]:
  """This process's saved iterator state, or the common one of another process count."""
  if mine.exists():
    try:
      return _read_json(mine), ""
    except ValueError as e:
      raise ValueError(f"{mine} is unreadable ({errors.one_line(e)})") from e
  count = mine.name.rsplit("-of-", 1)[1]
  every = sorted(data_dir.glob("process_*-of-*.json")) if data_dir.exists() else []
  # Files of the same process count name other processes' positions: a missing file of
  # this process is an error. Files of another count can stand in for it.
  others = [p for p in every if not p.name.endswith(f"-of-{count}")]
  states = []
  for p in others:
    try:
      states.append(_read_json(p))
    except ValueError:
      states = []
      break
  # A plain position is the number of global batches read, the same for any process
  # count (the pipeline's global batches do not depend on it).
  if states and all(s == states[0] for s in states) and set(states[0]) == {"next_index"}:
    return states[0], (f"data position {states[0]['next_index']} restored from a run with "
                       f"{len(states)} process(es)")
  held = f" (it holds {[p.name for p in every]})" if every else ""
  raise FileNotFoundError(f"data iterator file {mine} is missing{held}")


def config_to_json(config: Any) -> dict[str, Any]:
  """ml_collections ConfigDict (or dict) -> JSON-compatible dict."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def absolute_workdir(workdir: str) -> str:
  """`workdir` as an absolute path (URLs such as gs://... unchanged): Orbax refuses
  relative checkpoint paths, and a relative workdir would also change meaning with the
  current directory."""
  return workdir if "://" in workdir else os.path.abspath(workdir)
