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
                          "twinflow_jax.models.convert.diffusers_qwen_image, "
                          "twinflow_jax.models.lora, twinflow_jax.train.lora")
  assert not {"tensorflow", "tensorflow_datasets", "torch"} & set(loaded), loaded


def test_evaluation_imports_without_tensorflow_or_torch():
  loaded = _modules_after("twinflow_jax.evaluation, twinflow_jax.evaluation.fid, "
                          "twinflow_jax.evaluation.inception_score")
  assert loaded == [], loaded  # the pure metric modules need numpy only
  loaded = _modules_after("twinflow_jax.evaluation.fid_stats, "
                          "twinflow_jax.evaluation.inception_metrics, "
                          "twinflow_jax.models.inception, "
                          "twinflow_jax.models.convert.inception")
  assert not {"tensorflow", "tensorflow_datasets", "torch"} & set(loaded), loaded


def test_caption_embedding_imports_neither_torch_nor_tensorflow():
  # The text encoders run in JAX; `tokenizers` is imported only when a tokenizer is read.
  loaded = _modules_after("twinflow_jax.data.captions, twinflow_jax.models.convert.hf_text, "
                          "twinflow_jax.models.clip_text, twinflow_jax.models.t5, "
                          "twinflow_jax.models.qwen2_text")
  assert not {"tensorflow", "tensorflow_datasets", "torch"} & set(loaded), loaded


def test_error_types_are_light():
  # Commands import the error types before parsing flags; they pull in nothing heavy.
  assert _modules_after("twinflow_jax.errors, twinflow_jax.train.faults") == []


def test_sampling_and_evaluation_modules_stay_light():
  loaded = _modules_after("twinflow_jax.generate, twinflow_jax.sample, "
                          "twinflow_jax.train.readonly, twinflow_jax.evaluation.mnist, "
                          "twinflow_jax.evaluation.toy, twinflow_jax.evaluation.sample_metrics, "
                          "twinflow_jax.train.evaluation")
  assert not {"tensorflow", "tensorflow_datasets", "torch"} & set(loaded), loaded


def test_sample_command_help():
  out = subprocess.run([sys.executable, "-m", "twinflow_jax.sample", "--help"],
                       capture_output=True, text=True)
  assert out.returncode == 0 and "--workdir" in out.stdout and "--cfg-scale" in out.stdout
  assert "--diffusers" in out.stdout and "--guidance" in out.stdout
  assert "--vae" in out.stdout and "--metrics" in out.stdout


def test_vae_and_preparation_modules_stay_light():
  # The VAE, its diffusers reader and the preparation command import neither torch nor
  # TensorFlow (TFDS only when a --tfds input is opened; Pillow only to decode images).
  loaded = _modules_after("twinflow_jax.models.vae, twinflow_jax.models.vae_qwen_image, "
                          "twinflow_jax.models.convert.diffusers_vae, "
                          "twinflow_jax.data.prepare, twinflow_jax.data.vae_codec")
  assert not {"tensorflow", "tensorflow_datasets", "torch"} & set(loaded), loaded
