"""XLA settings of the test suite, for this process (conftest) and for the subprocesses."""

import os

# The suite is dominated by XLA compiling tiny programs that then run a few steps, so
# LLVM's optimisation is time lost (it halves the compile of a train step). Numerics do not
# depend on it beyond rounding.
COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int | None) -> str:
  """XLA_FLAGS for `devices` simulated CPU devices (None: XLA's default, one)."""
  count = () if devices is None else (f"--xla_force_host_platform_device_count={devices}",)
  return " ".join(count + COMPILE_FLAGS)


def subprocess_env(devices: int | None, **extra: str) -> dict[str, str]:
  """os.environ for a CPU subprocess with `devices` devices and the suite's compile flags."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
