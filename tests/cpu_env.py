"""XLA settings of the test suite, for this process (conftest) and for the subprocesses."""

import importlib.metadata
import os


def _compile_flags() -> tuple[str, ...]:
  """The suite is dominated by XLA compiling tiny programs that then run a few steps.

  LLVM's optimisation is time lost there (off: the compile of a train step halves), and on
  jaxlib 0.10 the MLIR fusion emitters of XLA:CPU compile about twice as slowly as the
  classic ones (jaxlib 0.12 no longer knows the flag, and XLA aborts on unknown flags).
  Numerics do not depend on either beyond rounding.
  """
  flags = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib = ""
  if jaxlib.startswith("0.10."):
    flags += ("--xla_cpu_use_fusion_emitters=false",)
  return flags


COMPILE_FLAGS = _compile_flags()


def xla_flags(devices: int | None) -> str:
  """XLA_FLAGS for `devices` simulated CPU devices (None: XLA's default, one)."""
  count = () if devices is None else (f"--xla_force_host_platform_device_count={devices}",)
  return " ".join(count + COMPILE_FLAGS)


def subprocess_env(devices: int | None, **extra: str) -> dict[str, str]:
  """os.environ for a CPU subprocess with `devices` devices and the suite's compile flags."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
