"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
# Compile-time flags: the suite is dominated by XLA compiling tiny programs that then run
# a few steps, so LLVM's optimisation is time lost (it halves the compile of a train step).
# Numerics do not depend on them beyond rounding; subprocesses inherit them.
for _flag in ("--xla_force_host_platform_device_count=8",
              "--xla_backend_optimization_level=0",
              "--xla_llvm_disable_expensive_passes=true"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from absl import flags  # noqa: E402

# Grain worker processes and absl-based code expect parsed flags.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


def pytest_sessionfinish(session, exitstatus):
  """The suite must run without TensorFlow: fail the run if anything imported it."""
  import sys
  if "tensorflow" in sys.modules and exitstatus == 0:
    print("\nERROR: the test suite imported TensorFlow; keep TF imports out of the code "
          "paths the tests use.")
    session.exitstatus = 1
