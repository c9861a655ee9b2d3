"""Host memory: keep XLA's CPU buffers resident between steps (Linux, glibc).

XLA's CPU runtime allocates each call's temporary buffer (2.1 GiB for a DiT-S/2 forward +
backward at batch 16) from one of glibc's per-thread arenas, which can only serve it with
a fresh `mmap` and return it with `munmap` when the call ends: every step then faults in
and zeroes all of it again (about 600,000 page faults and 1.3-1.5 s of kernel time per
DiT-S/2 step on 2 cores). Three glibc tunables keep the memory in the process instead:
one arena (`arena_max=1`), no `mmap` for large blocks (`mmap_max=0`, so they come from the
heap, where a freed block is reused) and no trimming of the heap (`trim_threshold`). The
process's peak memory is unchanged (the same buffers exist at the same time); it is held
until exit rather than handed back between steps.

glibc reads GLIBC_TUNABLES once, when the process starts, so the command-line entry
points (`twinflow_jax.main`, `twinflow_jax.sample`, the benchmarks) call
`reexec_with_resident_malloc()` first: it restarts the same command (same PID, same
arguments) with the tunables added. It does nothing off Linux/glibc, on hosts with an
accelerator (whose buffers live on the device), when the tunables are already set, or
when TWINFLOW_RESIDENT_MALLOC=0. Measured effect: docs/performance.md.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping

OPT_OUT = "TWINFLOW_RESIDENT_MALLOC"
TUNABLES = (("glibc.malloc.arena_max", "1"),
            ("glibc.malloc.mmap_max", "0"),
            ("glibc.malloc.trim_threshold", str(2**62)))
# Device files of accelerators JAX would use: NVIDIA, AMD (ROCm), TPU (accel or vfio).
_ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*",
                      "/dev/vfio/[0-9]*")


def _accelerator_present() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def resident_malloc_env(environ: Mapping[str, str], *, linux_glibc: bool,
                        accelerator: bool) -> dict[str, str] | None:
  """The environment to restart with, or None when nothing should change.

  Args:
    environ: the current environment.
    linux_glibc: the process runs on Linux with glibc (the only allocator this tunes).
    accelerator: an accelerator device is present (its buffers are not host memory).

  Returns:
    A copy of `environ` whose GLIBC_TUNABLES has the `TUNABLES` the user did not set
    (the user's own values win), or None: not glibc, `OPT_OUT` is '0'/'off'/'false',
    JAX_PLATFORMS names no 'cpu' platform first, an accelerator without
    JAX_PLATFORMS=cpu, or every tunable already set.
  """
  if not linux_glibc or environ.get(OPT_OUT, "").lower() in ("0", "off", "false", "no"):
    return None
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    if platforms.split(",")[0].strip() != "cpu":
      return None
  elif accelerator:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  names = {item.split("=", 1)[0] for item in current.split(":") if item}
  missing = [f"{name}={value}" for name, value in TUNABLES if name not in names]
  if not missing:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join([current] * bool(current) + missing)
  return env


def reexec_with_resident_malloc() -> None:
  """Restarts this command with `TUNABLES` where they help (see the module doc).

  Call it first in a `__main__` block, before any work: `os.execve` replaces the
  process (same PID), so a job launcher sees nothing.
  """
  env = resident_malloc_env(
      os.environ, linux_glibc=sys.platform == "linux" and platform.libc_ver()[0] == "glibc",
      accelerator=_accelerator_present())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def resident_malloc_active() -> bool:
  """True when this process runs with all of `TUNABLES` in GLIBC_TUNABLES."""
  names = {item.split("=", 1)[0] for item in os.environ.get("GLIBC_TUNABLES", "").split(":")}
  return all(name in names for name, _ in TUNABLES)
