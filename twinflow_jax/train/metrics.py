"""Metric sinks: CLU writers (TensorBoard when available), metrics.jsonl and a progress line.

`clu.metric_writers` imports TensorFlow, which the core install does not have; without it
the trainer uses a writer with the same interface that keeps the console quiet, so training
never depends on TensorFlow. The console gets one progress line per logged step: every
scalar is in metrics.jsonl (and TensorBoard), so no writer repeats them in the log.
"""

from __future__ import annotations

import importlib.util
import json
import logging as logging_std
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from twinflow_jax import hostmem


class _DropLibraryInfo(logging_std.Filter):
  """Drops INFO (and lower) records emitted from inside the given libraries."""

  def __init__(self, packages: tuple[str, ...]):
    super().__init__()
    self._markers = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or not any(
        m in record.pathname for m in self._markers)


# JAX start-up INFO records that alarm more than they inform: the probe of every backend
# plugin ("Unable to initialize backend 'tpu': ... libtpu.so" on any machine without TPUs)
# and the compilation cache's reset notice. `log_backend` states the backend in use instead;
# a backend that was asked for (JAX_PLATFORMS) and fails still raises in JAX.
_JAX_STARTUP_LOGGERS = ("jax._src.xla_bridge", "jax._src.compilation_cache")


class _DropLoggerInfo(logging_std.Filter):
  """Drops INFO (and lower) records of the named loggers."""

  def __init__(self, names: tuple[str, ...]):
    super().__init__()
    self._names = names

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno > logging_std.INFO or record.name not in self._names


def quiet_library_logs(packages: tuple[str, ...] = ("orbax",)) -> None:
  """Hides Orbax's per-save INFO chatter and JAX's backend probe so progress stays readable.

  Call it before the first JAX computation (the probe runs when the backends start).
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo(packages))
  if not any(isinstance(f, _DropLoggerInfo) for f in handler.filters):
    handler.addFilter(_DropLoggerInfo(_JAX_STARTUP_LOGGERS))


def backend_line() -> str:
  """One line naming the JAX backend and devices in use, e.g. 'JAX backend cpu: 8 ...'."""
  import jax  # pylint: disable=g-import-not-at-top
  kinds = sorted({d.device_kind for d in jax.devices()})
  resident = "; host buffers kept resident" if hostmem.resident_malloc_active() else ""
  return (f"JAX backend {jax.default_backend()}: {jax.device_count()} device(s) "
          f"({', '.join(kinds)}), {jax.local_device_count()} local, "
          f"{jax.process_count()} process(es){resident}")


class LoggingWriter:
  """Fallback with the `clu.metric_writers.MetricWriter` interface, without TensorFlow.

  Scalars and images are already in metrics.jsonl, the progress line and samples/*.png, so
  they are logged at DEBUG level only (`--verbosity=1` shows them).
  """

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    text = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))
    logging.debug("[%d] %s", step, text)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    shapes = ", ".join(f"{k}: {np.shape(v)}" for k, v in images.items())
    logging.debug("[%d] images %s", step, shapes)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    # The full config is in workdir/config.json; keep the log short.
    logging.debug("hparams: %s", json.dumps(dict(hparams), default=str, sort_keys=True))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class NullWriter(LoggingWriter):
  """Writer for processes other than 0: drops everything."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def write_images(self, step, images):
    del step, images

  def write_texts(self, step, texts):
    del step, texts

  def write_hparams(self, hparams):
    del hparams


def tensorboard_available() -> bool:
  """True when TensorFlow and tensorboard are installed (the `tensorboard` extra)."""
  return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


def create_writer(workdir: str, is_main: bool, use_tensorboard: bool = True) -> Any:
  """CLU's asynchronous TensorBoard writer if possible, else `LoggingWriter`.

  Not `clu.metric_writers.create_default_writer`: it adds CLU's LoggingWriter, which would
  print every scalar a second time next to the progress line.

  Args:
    workdir: event files go to `workdir/tensorboard`.
    is_main: only the main process (index 0) writes anything.
    use_tensorboard: set False to force the logging fallback.
  """
  if not is_main:
    return NullWriter()
  if use_tensorboard and tensorboard_available():
    try:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      return metric_writers.AsyncWriter(
          metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard")))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard writer unavailable (%s); logging only", e)
  return LoggingWriter()


class JsonlWriter:
  """Appends one JSON object per logged step to `path` (main process only).

  Local paths are appended to; object stores (gs://...) cannot append, so there the file
  is rewritten from the records kept in memory.
  """

  def __init__(self, path: str, enabled: bool = True):
    self.path, self.enabled = epath.Path(path), enabled
    self._local = "://" not in str(path)
    self._lines: list[str] = []

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step` (written after the checkpoint we resume from)."""
    if not self.enabled or not self.path.exists():
      return
    kept = []
    for line in self.path.read_text().splitlines(keepends=True):
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by a kill
    self._lines = kept
    self._rewrite()

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _to_json(v) for k, v in sorted(scalars.items())})
    line = json.dumps(record) + "\n"
    self._lines.append(line)
    if self._local:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(line)
    else:
      self._rewrite()

  def _rewrite(self) -> None:
    if self._local:
      tmp = epath.Path(str(self.path) + ".tmp")
      tmp.write_text("".join(self._lines))
      os.replace(tmp, self.path)
    else:
      self.path.write_text("".join(self._lines))


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads metrics.jsonl back (for tests and notebooks)."""
  text = epath.Path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class Throughput:
  """Steps/s and examples/s over the interval since the last call, and an ETA."""

  def __init__(self, start_step: int, num_steps: int, batch_size: int):
    self.num_steps, self.batch_size = num_steps, batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()
    self.steps_per_sec = float("nan")

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    dt, ds = now - self._last_time, step - self._last_step
    if ds > 0 and dt > 0:
      self.steps_per_sec = ds / dt
    self._last_step, self._last_time = step, now
    return {"steps_per_sec": self.steps_per_sec,
            "examples_per_sec": self.steps_per_sec * self.batch_size}

  def eta_seconds(self, step: int) -> float:
    if not self.steps_per_sec > 0:
      return float("nan")
    return (self.num_steps - step) / self.steps_per_sec


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_line(step: int, num_steps: int, scalars: Mapping[str, Any],
                  eta_seconds: float) -> str:
  """One human-readable line: step, percentage, loss, LR, speed, skips and ETA."""
  pct = 100.0 * step / max(num_steps, 1)
  parts = [f"step {step}/{num_steps} ({pct:.1f}%)"]
  for key, label in (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "gnorm"),
                     ("steps_per_sec", "steps/s"), ("examples_per_sec", "ex/s")):
    if key in scalars:
      parts.append(f"{label} {_fmt(scalars[key])}")
  if scalars.get("skipped_steps"):
    parts.append(f"skipped {int(scalars['skipped_steps'])}")
  parts.append(f"ETA {format_duration(eta_seconds)}")
  return " | ".join(parts)


def _to_json(v: Any) -> Any:
  v = np.asarray(v)
  if v.ndim:
    return v.tolist()
  v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/inf literals
  return v


def _fmt(v: Any) -> str:
  v = np.asarray(v)
  if v.ndim:
    return str(v.tolist())
  v = v.item()
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
