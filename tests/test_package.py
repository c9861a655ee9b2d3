"""Import hygiene: the package and the loss stay light (no TensorFlow)."""

import subprocess
import sys


def test_import_does_not_pull_tensorflow():
  code = ("import sys, twinflow_jax, twinflow_jax.losses, twinflow_jax.sampling; "
          "bad = [m for m in ('tensorflow', 'torch', 'flax', 'optax') if m in sys.modules]; "
          "print(bad); sys.exit(1 if 'tensorflow' in bad or 'torch' in bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  # The loss and the sampler import jax and numpy only.
  assert out.stdout.strip() == "[]", out.stdout
