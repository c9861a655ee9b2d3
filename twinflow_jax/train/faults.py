"""Fault injection for the fault tests: simulated disk-full saves, unreadable checkpoints.

Only tests set the environment variable `TWINFLOW_FAULTS`; nothing else reads it and an
unset variable changes nothing. Its value is a comma-separated list of `<fault>@<step>`:

  save_enospc@S     the background write of checkpoint S fails with ENOSPC ("No space left
                    on device"), like a full disk, after the arrays were written.
  restore_error@S   reading checkpoint S when resuming fails on this process (set it for
                    one process of a multi-process run to make the processes disagree).
  readback_error@S  reading checkpoint S back right after saving it fails.
  nan_opt_state@S   after step S the loop puts a NaN into the optimizer state, as a
                    memory fault would.
  hang@S            after step S this process stops responding (it sleeps until killed),
                    as a frozen host; it first prints 'fault: hanging after step S'.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "TWINFLOW_FAULTS"
FAULTS = ("save_enospc", "restore_error", "readback_error", "nan_opt_state", "hang")


def active(name: str, step: int) -> bool:
  """Whether fault `name` is requested for `step` in this process."""
  spec = os.environ.get(ENV, "")
  if not spec:
    return False
  for entry in spec.split(","):
    fault, _, at = entry.strip().partition("@")
    if fault not in FAULTS:
      raise ValueError(f"{ENV}: unknown fault {fault!r}; known: {FAULTS}")
    if fault == name and at and int(at) == int(step):
      return True
  return False


def hang_if_requested(step: int) -> None:
  """Sleeps forever after `step` if `hang@step` is requested (see the module doc)."""
  if active("hang", step):
    print(f"fault: hanging after step {step}", file=sys.stderr, flush=True)
    while True:
      time.sleep(3600)
