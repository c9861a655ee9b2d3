"""Import hygiene: the package and the loss stay light (no TensorFlow)."""

import subprocess
import sys


def _modules_after(imports: str) -> list[str]:
  code = (f"import sys; import {imports}; "
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'torch', 'flax', "
          "'optax', 'grain', 'orbax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  return eval(out.stdout.strip())  # a printed list of names


def test_loss_and_sampler_import_jax_and_numpy_only():
  assert _modules_after("twinflow_jax, twinflow_jax.losses, twinflow_jax.sampling") == []


def test_no_tensorflow_or_tfds_at_import_time():
  # tensorflow_datasets is imported lazily, only where a TFDS source is opened.
  loaded = _modules_after("twinflow_jax.models, twinflow_jax.data, twinflow_jax.train.loop, "
                          "twinflow_jax.main, twinflow_jax.models.convert.cli, "
                          "twinflow_jax.models.convert.diffusers_sd3, "
                          "twinflow_jax.models.convert.diffusers_flux, "
                          "twinflow_jax.models.convert.diffusers_qwen_image")
  assert not {"tensorflow", "tensorflow_datasets", "torch"} & set(loaded), loaded
