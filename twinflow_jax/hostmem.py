"""Host memory: keep XLA's CPU buffers resident between steps (Linux, glibc).

XLA's CPU runtime allocates each call's buffers with malloc; glibc serves large blocks
with a fresh `mmap` and returns them with `munmap` (and trims its heaps), so every step
faults in and zeroes its working memory again: for a DiT-S/2 forward + backward at batch
16, a 2.1 GiB temporary buffer, about 600,000 page faults and 1.3-1.5 s of kernel time
per call on 2 cores. glibc's tunables keep the memory in the process instead:

  * `mmap_max=0` (large blocks come from the heap, where a freed block is reused) and
    `trim_threshold` = 2^62 (the heap is never handed back): the default. The default
    MNIST step runs about 1.2x faster with them.
  * `arena_max=1` as well ("large"): glibc's per-thread arenas cannot hold a block over
    64 MiB and `mmap` it whatever `mmap_max` says, so a model whose step needs larger
    buffers (DiT-S/2 and up) keeps them resident only with one arena. One arena costs
    the small default model about 20% (its threads then share one lock), so it is not
    the default: set TWINFLOW_RESIDENT_MALLOC=large for large models on a CPU.

Memory is held until exit rather than handed back between steps, and the heap can
fragment: the default MNIST job peaked at 1.73 GB resident against 1.43 GB without the
tunables; DiT-S/2's step at the same resident peak either way (3.56 GB, measured before the
hand-written backwards of models/backward.py lowered it to 2.80 GB).

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

MODE_ENV = "TWINFLOW_RESIDENT_MALLOC"
_MODES_ON, _MODES_OFF = ("", "1", "on", "large"), ("0", "off", "false", "no")
TUNABLES = (("glibc.malloc.mmap_max", "0"),
            ("glibc.malloc.trim_threshold", str(2**62)))
LARGE_TUNABLES = (("glibc.malloc.arena_max", "1"),) + TUNABLES
# Device files of accelerators JAX would use: NVIDIA, AMD (ROCm), TPU (accel or vfio).
_ACCELERATOR_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*",
                      "/dev/vfio/[0-9]*")


def _tunable_names(environ: Mapping[str, str]) -> set[str]:
  """The names set in GLIBC_TUNABLES ('a=1:b=2' -> {'a', 'b'})."""
  return {item.split("=", 1)[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}


def _accelerator_present() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


def on_linux_glibc() -> bool:
  """This process runs on Linux with glibc, the only allocator `TUNABLES` applies to."""
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def resident_malloc_env(environ: Mapping[str, str], *, linux_glibc: bool,
                        accelerator: bool) -> dict[str, str] | None:
  """The environment to restart with, or None when nothing should change.

  Args:
    environ: the current environment.
    linux_glibc: the process runs on Linux with glibc (the only allocator this tunes).
    accelerator: an accelerator device is present (its buffers are not host memory).

  Returns:
    A copy of `environ` whose GLIBC_TUNABLES has the `TUNABLES` (`LARGE_TUNABLES` when
    `MODE_ENV` is 'large') the user did not set (the user's own values win), or None: not
    glibc, `MODE_ENV` is '0'/'off'/'false'/'no', JAX_PLATFORMS names another platform
    first, an accelerator without JAX_PLATFORMS=cpu, or every tunable already set.

  Raises:
    ValueError: `MODE_ENV` has another value.
  """
  mode = environ.get(MODE_ENV, "").strip().lower()
  if mode not in _MODES_ON + _MODES_OFF:
    raise ValueError(f"{MODE_ENV}={environ[MODE_ENV]!r}: use 1 (default), large or 0")
  if not linux_glibc or mode in _MODES_OFF:
    return None
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    if platforms.split(",")[0].strip() != "cpu":
      return None
  elif accelerator:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  names = _tunable_names(environ)
  wanted = LARGE_TUNABLES if mode == "large" else TUNABLES
  missing = [f"{name}={value}" for name, value in wanted if name not in names]
  if not missing:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join([current] * bool(current) + missing)
  return env


def restart_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
  """`resident_malloc_env` of `environ` (default: this process's) on this host."""
  return resident_malloc_env(os.environ if environ is None else environ,
                             linux_glibc=on_linux_glibc(), accelerator=_accelerator_present())


def reexec_with_resident_malloc() -> None:
  """Restarts this command with `TUNABLES` where they help (see the module doc).

  Call it first in a `__main__` block, before any work: `os.execve` replaces the
  process (same PID), so a job launcher sees nothing.
  """
  try:
    env = restart_env()
  except ValueError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def resident_malloc_active(environ: Mapping[str, str] | None = None) -> bool:
  """True when this process (or `environ`) has all of `TUNABLES` in GLIBC_TUNABLES."""
  names = _tunable_names(os.environ if environ is None else environ)
  return all(name in names for name, _ in TUNABLES)


# glibc's per-thread arena heaps hold at most this; larger blocks are always mmap-ed.
ARENA_HEAP_BYTES = 64 * 2**20


def large_buffer_hint(temp_bytes: int | None, backend: str,
                      environ: Mapping[str, str] | None = None) -> str | None:
  """A one-line advice when a CPU step's temporaries are too large to stay resident.

  Args:
    temp_bytes: the compiled step's temporary buffer (`memory_analysis()`), or None.
    backend: `jax.default_backend()`.
    environ: the environment (default: this process's).

  Returns:
    The advice to set TWINFLOW_RESIDENT_MALLOC=large, or None (not a CPU backend, small
    buffers, already one arena, or the resident malloc turned off).
  """
  environ = os.environ if environ is None else environ
  if (backend != "cpu" or not temp_bytes or temp_bytes <= ARENA_HEAP_BYTES
      or "glibc.malloc.arena_max" in _tunable_names(environ)
      or not resident_malloc_active(environ)):
    return None
  return (f"the train step's {temp_bytes / 2**30:.2f} GiB of XLA temporaries are larger than "
          f"glibc's per-thread heaps and are faulted in again on every step; "
          f"{MODE_ENV}=large keeps them resident (DiT-S/2 on 2 cores: its step 1.1-1.5x "
          "faster, docs/performance.md)")
