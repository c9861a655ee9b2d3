"""Stop requests: SIGTERM (and SIGINT) on this process, and JAX's preemption notice.

A signal handler only sets a flag; the loop polls it between steps, saves a checkpoint and
returns. On multi-process runs the processes must agree on the step at which they stop, so
there the loop also asks JAX's preemption sync point (which the coordination service raises
on every process when any of them is told of a preemption), via the checkpoint manager.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from absl import logging


class StopRequest:
  """Context manager that turns SIGTERM/SIGINT into a flag (handlers restored on exit).

  On multi-process runs pass `signals=(signal.SIGINT,)`: `jax.distributed.initialize()`
  installs JAX's own SIGTERM notifier for the preemption sync point, which a Python handler
  would replace.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self.signal_name: str | None = None

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    if self._event.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C interrupts at once
    logging.warning("received %s: saving a checkpoint and stopping after this step",
                    self.signal_name)
    self._event.set()

  def __enter__(self) -> "StopRequest":
    # Signal handlers can only be installed from the main thread.
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def request(self, reason: str = "requested") -> None:
    """Asks the loop to stop (e.g. from a callback or a test)."""
    self.signal_name = reason
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()


def default_signals(multi_process: bool) -> tuple[int, ...]:
  """SIGTERM and SIGINT; SIGINT only on multi-process runs (see `StopRequest`)."""
  return (signal.SIGINT,) if multi_process else (signal.SIGTERM, signal.SIGINT)


def should_stop(stop: StopRequest, manager: Any, step: int, multi_process: bool) -> bool:
  """Whether to checkpoint and stop after `step`.

  Single process: the local signal flag. Multi-process: JAX's preemption sync point (all
  processes reach the same answer at the same step); a local SIGTERM there is only acted
  on through that sync point, since stopping alone would deadlock the others.
  """
  if multi_process:
    return bool(manager.reached_preemption(step))
  return stop.requested
