"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
import cpu_env  # noqa: E402  (tests/ is on sys.path: rootdir conftest)

for _flag in cpu_env.xla_flags(8).split():
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
