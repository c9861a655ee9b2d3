"""Every field of every config in configs/ can be set on the command line.

The flags are parsed by the real parser (`config_flags.DEFINE_config_file` with
`lock_config=True`, as in twinflow_jax.main) into a fresh FlagValues; one CLI run checks
that the documented real-data overrides get past flag parsing.
"""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every config file in configs/ (found, so a new one cannot be missed), plus the variants
# that take an argument (FILE:ARG).
CONFIG_ARGS = ["toy2d.py:moons", "toy2d.py:checkerboard", "imagenet256_sit_xl2.py:/ckpt/sit",
               "sd35_twinflow.py:lora", "sd35_twinflow.py:lora_1order",
               "qwen_image_twinflow_lora.py:1order"]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py")
                 if not p.name.startswith("_")) + CONFIG_ARGS


def _parse(spec, overrides=()):
  # config_flags finds the overrides in `sys_argv` (default sys.argv): pass the same list.
  argv = ["prog", f"--config={ROOT / 'configs' / spec}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def _fields(config, prefix=""):
  """(dotted name, field type, value) of every leaf field."""
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", config.get_type(key), value


def _override(kind, value):
  """(command-line text, expected value) of a new value of the field's type."""
  if kind is bool:
    return str(not value).lower(), not value
  if kind is int:
    new = 3 if value is None else value + 1
    return str(new), new
  if kind is float:
    new = 0.25 if value is None else value * 2 + 0.25
    return repr(new), new
  if kind is str:
    return "override_text", "override_text"
  if kind is tuple:
    new = (3, 5) if not value else tuple(value) * 2
    return repr(new), new
  if kind is object:        # data.paths: a string (or a list literal)
    return "/data/train-*.array_record", "/data/train-*.array_record"
  raise AssertionError(f"field type {kind} cannot be overridden on the command line")


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_field_overrides_through_the_flag_parser(spec):
  base = _parse(spec)
  fields = list(_fields(base))
  assert len(fields) > 60
  expected, argv = {}, []
  for name, kind, value in fields:
    text, want = _override(kind, value)
    argv.append(f"--config.{name}={text}")
    expected[name] = want
  config = _parse(spec, argv)
  got = {name: value for name, _, value in _fields(config)}
  assert got == expected
  # Fields without a default are typed placeholders (a plain None has no type to parse
  # and `_override` would have failed on it).
  placeholders = {name for name, kind, value in fields if value is None}
  assert {"data.data_dir", "data.shuffle_seed", "data.num_epochs"} <= placeholders
  if spec.startswith("imagenet"):
    assert "data.paths" in placeholders


def test_documented_data_overrides_reach_the_trainer(tmp_path):
  # README / launch scripts: --config.data.paths and --config.data.data_dir used to be a
  # flags parsing error; now they reach the trainer, which names the missing files.
  pattern = str(tmp_path / "in256" / "train-*.array_record")
  env = cpu_env.subprocess_env(8)
  out = subprocess.run(
      [sys.executable, "-m", "twinflow_jax.main",
       f"--config={ROOT / 'configs/imagenet256_sit_xl2.py'}", f"--workdir={tmp_path / 'w'}",
       f"--config.data.paths={pattern}", f"--config.data.data_dir={tmp_path}",
       "--config.data.num_classes=1000", "--config.data.latent_shape=(32, 32, 4)"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: config.data.paths pattern {pattern!r} matches nothing; it must match "
      "ArrayRecord files; write records with `python -m twinflow_jax.data.write_arrayrecord`")
  assert "Traceback" not in out.stderr


def _cli(*args, tmp_path):
  env = cpu_env.subprocess_env(1)
  return subprocess.run([sys.executable, "-m", "twinflow_jax.main",
                         f"--workdir={tmp_path / 'w'}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_config_mistakes_are_one_line_with_the_file_or_field(tmp_path):
  no_get_config = tmp_path / "mine.py"
  no_get_config.write_text("x = 1\n")
  out = _cli(f"--config={no_get_config}", tmp_path=tmp_path)
  assert out.returncode == 2
  assert out.stderr == (f"error: config file {no_get_config} defines no get_config(); a "
                        "config file must define get_config() returning an "
                        "ml_collections.ConfigDict (see configs/)\n")
  # Shrinking the toy run below its warm-up names the field (no traceback, status 2).
  out = _cli(f"--config={ROOT / 'configs/toy2d.py'}", "--config.train.num_steps=50",
             tmp_path=tmp_path)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.optim.warmup_steps=100 must be below the number of optimizer updates "
      "(50 = config.train.num_steps 50 / config.optim.accum_steps 1) for "
      "optim.schedule='warmup_cosine'; lower --config.optim.warmup_steps or use "
      "--config.optim.schedule=constant")


def test_file_override_and_workdir_mistakes_are_one_line(tmp_path):
  toy = f"--config={ROOT / 'configs/toy2d.py'}"
  cases = [
      ([f"--config={ROOT / 'configs/defualt.py'}"],
       f"error: config file {ROOT / 'configs/defualt.py'} not found (--config)"),
      ([toy, "--config.train.num_step=5"],
       "error: unknown config field --config.train.num_step (Did you mean \"num_steps\""),
      ([f"--config={ROOT / 'configs/default.py'}:extra"],
       f"error: cannot load config file {ROOT / 'configs/default.py'}: TypeError: "),
  ]
  for args, start in cases:
    out = _cli(*args, tmp_path=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(start), out.stderr[-500:]
  (tmp_path / "w").write_text("a file, not a directory")
  out = _cli(toy, "--config.optim.warmup_steps=1", "--config.train.num_steps=2",
             tmp_path=tmp_path)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"error: --workdir {tmp_path / 'w'} cannot be used as a directory"), out.stderr[-500:]


def test_model_must_fit_the_data():
  from twinflow_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  spec = data_lib.DataSpec(x_shape=(16, 16, 1), num_classes=10, conditioning="class")
  model = {"name": "DiT-S/4", "in_channels": 1, "input_size": 16, "num_classes": 10}
  config_lib.check_model_fits_data(model, spec)
  for change, match in (({"num_classes": 5}, r"config.model.num_classes=5 is below the "
                         r"data's 10 classes; set --config.model.num_classes=10"),
                        ({"in_channels": 3}, r"config.model.in_channels=3 does not match "
                         r"the data's 1 channels"),
                        ({"name": "DiT-S/8"}, r"the data's 12 x 12 examples .* are not "
                         r"divisible by the patch size 8")):
    with pytest.raises(ValueError, match=match):
      config_lib.check_model_fits_data({**model, **change},
                                       data_lib.DataSpec((12, 12, 1), 10, "class"))
  # Text conditioning and other families are left to the model.
  config_lib.check_model_fits_data({"name": "mlp", "num_classes": 1},
                                   data_lib.DataSpec((2,), 1, "class"))


def test_distributed_on_without_a_cluster_is_one_line(tmp_path):
  env = cpu_env.subprocess_env(1)
  for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
            "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
    env.pop(v, None)
  out = subprocess.run([sys.executable, "-m", "twinflow_jax.main", "--distributed=on",
                        f"--config={ROOT / 'configs/toy2d.py'}", f"--workdir={tmp_path / 'w'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      "error: --distributed=on: jax.distributed.initialize() failed")
  assert not (tmp_path / "w").exists()
