"""End-to-end trainer tests on the toy config (tiny MLP, 8 simulated CPU devices).

Covers: sharded vs single-device equality, determinism, kill-and-resume equality,
restoring onto another mesh (8 -> 1 and 1 -> 8 devices), a corrupt latest checkpoint,
SIGTERM in a subprocess, EMA modes, the non-finite guard, accumulation and config errors.
"""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twinflow_jax import errors
from twinflow_jax.train import loop
from twinflow_jax.train import metrics
from twinflow_jax.train import state as state_lib
from twinflow_jax.train import step as step_lib

import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 6
# Persistent XLA cache shared by the runs below: the many identical train calls compile
# once (it is also a trainer feature, train.compilation_cache_dir).
CACHE_DIR = None


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  global CACHE_DIR
  CACHE_DIR = str(tmp_path_factory.mktemp("jax_cache"))
  loop.enable_compilation_cache(CACHE_DIR)
  yield
  loop.enable_compilation_cache(None)   # leave the process as we found it


def load_config(name, overrides, **fields):
  """configs/<name>.py with `fields` and then `overrides` ('section.field' = value) set."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for key, value in {**fields, **overrides}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


# Settings every shrunk test config shares: a constant LR, logs every step, no samples.
FAST = {"optim.schedule": "constant", "optim.warmup_steps": 0, "train.global_batch_size": 16,
        "train.log_every": 1, "train.sample_every": 0, "train.use_tensorboard": False,
        "eval.metrics": ()}


def toy_config(**overrides):
  """configs/toy2d.py shrunk to a few fast steps on a (2, 2, 2) mesh."""
  return load_config("toy2d", overrides, **FAST, **{
      "model.hidden": 16, "model.depth": 1, "model.time_dim": 16, "data.toy2d_size": 512,
      "train.num_steps": NUM_STEPS, "train.checkpoint_every": 2, "train.num_samples": 64,
      "train.sample_presets": ("1nfe",), "train.compilation_cache_dir": CACHE_DIR or "",
      "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def one_device(**overrides):
  return toy_config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, **overrides})


def assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       atol=atol, rtol=0), a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run on the (2, 2, 2) mesh."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = loop.train(toy_config(), workdir)
  return workdir, result


def test_reference_run_outputs(reference):
  workdir, result = reference
  assert result.step == NUM_STEPS and result.stopped is None
  recs = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in recs] == list(range(1, NUM_STEPS + 1))
  for key in ("loss", "loss_main", "loss_rect", "loss_adv", "learning_rate", "grad_norm",
              "skipped_steps", "steps_per_sec", "examples_per_sec"):
    assert key in recs[-1], key
  assert all(np.isfinite(r["loss"]) for r in recs) and recs[-1]["skipped_steps"] == 0
  # Params are sharded over the 8 devices; the batch over data x fsdp.
  assert len(jax.tree.leaves(result.state.params)[0].sharding.device_set) == 8
  png = os.path.join(workdir, "samples", f"step_{NUM_STEPS:07d}_1nfe.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  ckpts = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert ckpts == ["4", "6"]   # keep_checkpoints = 2


def test_sharded_mesh_matches_one_device(reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / "one")
  loop.train(one_device(), workdir, devices=jax.devices()[:1])
  ref, got = losses_by_step(ref_dir), losses_by_step(workdir)
  assert ref.keys() == got.keys()
  np.testing.assert_allclose([got[k] for k in ref], [ref[k] for k in ref], atol=1e-5, rtol=0)


def tiny_dit_config(**overrides):
  """configs/default.py (DiT on MNIST) shrunk to a few fast steps."""
  return load_config("default", overrides, **FAST, **{
      "model.depth": 1, "model.hidden_size": 32, "model.num_heads": 2, "data.image_size": 8,
      "train.num_steps": 3, "train.checkpoint_every": 100,
      "train.compilation_cache_dir": CACHE_DIR or ""})


@pytest.mark.slow
@pytest.mark.parametrize("row_blocks", [4])
def test_fsdp_and_tensor_sharded_dit_matches_one_device(tmp_path, row_blocks):
  # The toy MLP is replicated; a DiT really shards its weights over fsdp and tensor.
  # row_blocks = 4 (the batch shards of the mesh) keeps the loss's rows on their shards.
  # (row_blocks = 1 on a sharded mesh: test_sharded_mesh_matches_one_device and the loss's
  # 1-vs-8-device tests in test_losses.py; a second DiT compile here cost ~100 s.)
  sharded = loop.train(tiny_dit_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                          "loss.row_blocks": row_blocks}),
                       str(tmp_path / "sharded"))
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(sharded.state.params)]
  assert any("fsdp" in str(s) for s in specs) and any("tensor" in str(s) for s in specs)
  one = loop.train(tiny_dit_config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
                                      "loss.row_blocks": row_blocks}),
                   str(tmp_path / "one"), devices=jax.devices()[:1])
  got, ref = losses_by_step(str(tmp_path / "sharded")), losses_by_step(str(tmp_path / "one"))
  assert sorted(got) == [1, 2, 3]
  np.testing.assert_allclose([got[k] for k in ref], [ref[k] for k in ref], atol=1e-5, rtol=0)
  assert_trees_close(sharded.state.params, one.state.params, atol=1e-5)


def test_relative_workdir_saves_checkpoints(tmp_path, monkeypatch):
  # Orbax refuses relative checkpoint paths: the trainer makes --workdir absolute.
  monkeypatch.chdir(tmp_path)
  result = loop.train(toy_config(**{"train.num_steps": 2}), "rel")
  assert result.step == 2
  assert (tmp_path / "rel" / "checkpoints" / "2" / "state").is_dir()


def test_kill_and_resume_is_exact(reference, tmp_path):
  ref_dir, ref_result = reference
  workdir = str(tmp_path / "killed")
  first = loop.train(toy_config(), workdir, stop_at_step=5)   # checkpoints at 2 and 4
  assert first.stopped == "stop_at_step"
  # Same config and seed, same losses.
  np.testing.assert_array_equal([first.history[i]["loss"] for i in range(5)],
                                [losses_by_step(ref_dir)[s] for s in range(1, 6)])
  second = loop.train(toy_config(), workdir)
  assert second.resumed_from == 4 and second.step == NUM_STEPS
  ref, got = losses_by_step(ref_dir), losses_by_step(workdir)
  assert sorted(got) == list(range(1, NUM_STEPS + 1))   # step 5 logged again, once
  np.testing.assert_allclose([got[k] for k in ref], [ref[k] for k in ref], atol=1e-6, rtol=0)
  assert_trees_close(second.state.params, ref_result.state.params, atol=1e-6)
  assert_trees_close(second.state.ema, ref_result.state.ema, atol=1e-6)


@pytest.mark.parametrize("first_devices, second_devices", [(8, 1), (1, 8)])
def test_restore_onto_another_mesh(reference, tmp_path, first_devices, second_devices):
  ref_dir, ref_result = reference
  workdir = str(tmp_path / "remesh")

  def run(n, **kw):
    cfg = toy_config() if n == 8 else one_device()
    return loop.train(cfg, workdir, devices=jax.devices()[:n], **kw)

  run(first_devices, stop_at_step=3)        # checkpoint at step 2
  result = run(second_devices)
  assert result.resumed_from == 2
  leaf = jax.tree.leaves(result.state.params)[0]
  assert len(leaf.sharding.device_set) == second_devices
  ref, got = losses_by_step(ref_dir), losses_by_step(workdir)
  np.testing.assert_allclose([got[k] for k in ref], [ref[k] for k in ref], atol=1e-5, rtol=0)
  assert_trees_close(result.state.params, ref_result.state.params, atol=1e-5)


# The failed read of the corrupt checkpoint leaves an Orbax/TensorStore callback that fires
# after its event loop closed; Python reports it as unraisable, harmlessly.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / "corrupt")
  loop.train(toy_config(), workdir, stop_at_step=5)          # checkpoints 2 and 4
  ckpt = pathlib.Path(workdir) / "checkpoints"
  state_dir = ckpt / "4" / "state"
  for f in state_dir.rglob("*"):
    if f.is_file() and "ocdbt" in f.name or f.parent.name == "d":
      f.write_bytes(b"not a checkpoint")
  # An incomplete save (as left by a kill mid-write) is ignored too.
  (ckpt / "6.orbax-checkpoint-tmp-123").mkdir()
  result = loop.train(toy_config(), workdir)
  assert result.resumed_from == 2
  assert (ckpt / "4.corrupt" / "state").is_dir()                # kept, not deleted
  ref, got = losses_by_step(ref_dir), losses_by_step(workdir)
  np.testing.assert_allclose([got[k] for k in ref], [ref[k] for k in ref], atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_restorable_checkpoint_stops_and_keeps_everything(tmp_path):
  # A changed model no longer fits the saved state: that is no reason to move the
  # checkpoints aside and start again from step 0.
  workdir = str(tmp_path / "mismatch")
  loop.train(toy_config(), workdir, stop_at_step=3)           # checkpoint at step 2
  before = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  # The saved config says why at once ...
  with pytest.raises(errors.ConfigError, match=r"model.hidden: 16 -> 24"):
    loop.train(toy_config(**{"model.hidden": 24}), workdir)
  # ... and when the change is forced, the state does not fit: stop, move nothing.
  with pytest.raises(errors.CheckpointRestoreError, match="nothing was moved"):
    loop.train(toy_config(**{"model.hidden": 24, "train.allow_config_change": True}),
               workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) == before


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "sigterm"
  cmd = [sys.executable, "-m", "twinflow_jax.main", "--config", str(ROOT / "configs/toy2d.py"),
         "--workdir", str(workdir), "--config.train.num_steps=1000000",
         "--config.train.log_every=1", "--config.train.checkpoint_every=1000000",
         "--config.model.hidden=16", "--config.model.depth=1",
         "--config.train.global_batch_size=16", "--config.data.toy2d_size=512",
         # A constant LR, so that the resumed run may stop at a nearer step count.
         "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
         "--config.eval.metrics=()"]
  env = cpu_env.subprocess_env(2)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  jsonl = workdir / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert "stopped: SIGTERM" in out
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and steps[0] >= 3
  logged = [r["step"] for r in metrics.read_jsonl(str(jsonl))]
  assert max(logged) >= steps[0]
  # The checkpoint is complete and the same command resumes from it.
  cmd = [a for a in cmd if not a.startswith("--config.train.num_steps=")]
  out = subprocess.run(cmd + [f"--config.train.num_steps={steps[0] + 2}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  logged = [r["step"] for r in metrics.read_jsonl(str(jsonl))]
  assert logged == list(range(1, steps[0] + 3)), logged   # resumed, nothing lost or repeated


# ------------------------------------------------------------------------------ the step


def _setup_and_state(**overrides):
  cfg = one_device(**overrides)
  setup = loop.build(cfg, jax.devices()[:1])
  return cfg, setup, loop.init_state(setup, cfg.seed), loop.compile_step(setup)


@pytest.fixture(scope="module")
def default_step():
  """(setup, compiled step) of the one-device toy config with an eval EMA of 0.9."""
  _, setup, _, step = _setup_and_state(**{"train.eval_ema_decays": (0.9,)})
  return setup, step


def _batch(setup, seed=0, nan=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((16, 2)).astype(np.float32)
  if nan:
    x[3] = np.nan
  return {"x": jnp.asarray(x), "label": jnp.zeros(16, jnp.int32)}


def _copy(tree):
  return jax.tree.map(lambda a: np.array(a), tree)


def test_autoguidance_reads_the_named_eval_ema():
  # At step 0 the eval EMA, the teacher and the parameters are equal, so autoguidance by
  # the EMA cancels the guidance: the loss of the enhanced_ratio = 0 step, not the default's.
  losses_at_0 = {}
  conditional = {"train.eval_ema_decays": (0.9,), "model.num_classes": 1,
                 "train.uncond": "null", "loss.enhanced_ratio": 0.8}
  for name, kw in (("auto", {"train.guide_from": "0.9"}), ("off", {"loss.enhanced_ratio": 0.0}),
                   ("cfg", {})):
    _, setup, state, step = _setup_and_state(**{**conditional, **kw})
    losses_at_0[name] = float(step(state, _batch(setup, 0))[1]["loss"])
  assert losses_at_0["auto"] == pytest.approx(losses_at_0["off"], rel=1e-6)
  assert abs(losses_at_0["cfg"] - losses_at_0["off"]) > 1e-4


def test_ema_teacher_warmup_schedule_and_eval_emas(default_step):
  setup, step = default_step
  state = loop.init_state(setup, 0)
  cmds = []
  for i in range(4):
    prev = _copy(state.params)
    prev_ema = _copy(state.ema)
    prev_eval = _copy(state.eval_emas["ema_0p9"])
    cmd = float(state.ema_cmd)
    state, m = step(state, _batch(setup, i))
    cmds.append(cmd)
    # Teacher: ema = cmd * ema + (1 - cmd) * pre-update params.
    want = jax.tree.map(lambda e, p: cmd * e + (1 - cmd) * p, prev_ema, prev)
    assert_trees_close(state.ema, want, atol=1e-6)
    want_eval = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, prev_eval, _copy(state.params))
    assert_trees_close(state.eval_emas["ema_0p9"], want_eval, atol=1e-6)
  np.testing.assert_allclose(cmds, [0.0, 0.495, 0.62, 0.69], atol=6e-3)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_no_ema_and_frozen_teacher(decay):
  _, setup, state, step = _setup_and_state(**{"loss.ema_decay": decay})
  init = _copy(state.params)
  for i in range(2):
    before = _copy(state.params)
    state, _ = step(state, _batch(setup, i))
  if decay == 0.0:
    assert_trees_close(state.ema, before, atol=0)     # teacher = online (pre-update) params
  else:
    assert_trees_close(state.ema, init, atol=0)       # frozen initial copy


def test_non_finite_step_is_skipped_and_counted(default_step):
  setup, step = default_step
  state = loop.init_state(setup, 0)
  state, _ = step(state, _batch(setup, 0))
  before = _copy(state)
  state, m = step(state, _batch(setup, 1, nan=True))
  assert not np.isfinite(float(m["loss"]))
  assert int(state.skipped) == 1 and float(m["skipped_steps"]) == 1
  assert step_lib.describe_skip_reason(int(m["skip_reason"])).startswith("loss, gradient")
  assert int(state.step) == 2
  for name in ("params", "opt_state", "ema", "ema_cmd", "eval_emas"):
    assert_trees_close(getattr(state, name), getattr(before, name), atol=0)
  state, m = step(state, _batch(setup, 2))
  assert np.isfinite(float(m["loss"])) and int(state.skipped) == 1


def test_nan_in_optimizer_state_is_caught_by_the_guard(default_step):
  # The loss and gradient stay finite; the new parameters, moments and the evaluation
  # EMA (which follows the new parameters) would not.
  setup, step = default_step
  state = loop.init_state(setup, 0)
  state, _ = step(state, _batch(setup, 0))
  bad = state.replace(opt_state=loop._inject_nan(state.opt_state))
  before = _copy(bad)
  state, m = step(bad, _batch(setup, 1))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["skip_reason"]) == 4 | 8 | 16 and int(state.skipped) == 1
  for name in ("params", "ema", "eval_emas"):
    assert_trees_close(getattr(state, name), getattr(before, name), atol=0)


def test_accumulation_updates_params_and_teacher_once_per_cycle():
  _, setup, state, step = _setup_and_state(**{"optim.accum_steps": 2})
  p0 = _copy(state.params)
  state, _ = step(state, _batch(setup, 0))
  assert_trees_close(state.params, p0, atol=0)          # micro-batch 1: no update
  ema1, cmd1 = _copy(state.ema), float(state.ema_cmd)
  state, _ = step(state, _batch(setup, 1))
  assert not np.allclose(jax.tree.leaves(state.params)[0], jax.tree.leaves(p0)[0])
  assert float(state.ema_cmd) == cmd1                   # teacher waits for the next cycle
  assert_trees_close(state.ema, ema1, atol=0)
  state, _ = step(state, _batch(setup, 2))
  assert float(state.ema_cmd) > cmd1


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("overrides, match", [
    ({"train.global_batch_size": 10},
     r"global batch size 10 does not divide the 4 batch shards of the mesh \(data=2 x fsdp=2\)"),
    ({"mesh.data": 3}, r"multiply to 12, but there are 8 devices"),
    ({"train.num_steps": 0}, r"config.train.num_steps must be an int >= 1, got 0"),
    ({"train.global_batch_size": 2}, r"config.train.global_batch_size must be an int >= 4"),
    ({"train.uncond": "empty"}, r"config.train.uncond must be one of"),
    ({"train.sample_presets": ("3nfe",)}, r"config.train.sample_presets must be a subset"),
    ({"train.sample_from": "0.5"}, r"config.train.sample_from must be one of"),
    ({"optim.name": "lion"}, r"unknown optim.name 'lion'"),
    ({"loss.ema_decay": 1.5}, r"TwinFlowConfig.ema_decay must be in \[0, 1\], got 1.5"),
    ({"loss.row_blocks": 3}, r"TwinFlowConfig.row_blocks=3 does not divide the batch of 16"),
    ({"train.eval_ema_decays": (1.0,)}, r"config.train.eval_ema_decays must be decays in"),
    ({"train.guide_from": "0.5"}, r"config.train.guide_from must be '' or one of"),
    ({"model.depth": 0}, r"depth must be >= 1"),
])
def test_bad_config_values_fail_at_start(overrides, match):
  with pytest.raises(ValueError, match=match):
    loop.build(toy_config(**overrides))


def test_unshardable_model_names_the_parameter():
  cfg = toy_config(**{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1})
  cfg.model = dict(name="DiT-S/4", depth=1, hidden_size=36, num_heads=3, in_channels=1,
                   input_size=8, num_classes=10)
  cfg.data.source, cfg.data.image_size = "mnist", 8
  cfg.train.global_batch_size = 16
  with pytest.raises(ValueError, match=r"cannot shard .* dimension 36 is not divisible by "
                     r"fsdp=8 = 8"):
    loop.build(cfg)


def test_eval_ema_name_is_checkpoint_safe():
  assert state_lib.eval_ema_name(0.9999) == "ema_0p9999"


@pytest.mark.slow
def test_dit_bfloat16_compute_sharded_params_and_optimizer_state():
  """A tiny DiT on MNIST: bf16 compute, f32 master weights, FSDP/tensor-sharded state."""
  cfg = toy_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  cfg.model = dict(name="DiT-S/4", depth=1, hidden_size=32, num_heads=2, mlp_ratio=2.0,
                   in_channels=1, input_size=8, num_classes=10, dtype="bfloat16")
  cfg.data.source, cfg.data.image_size, cfg.data.label_dropout = "mnist", 8, 0.1
  cfg.train.global_batch_size = 8
  setup = loop.build(cfg)
  state = loop.init_state(setup, 0)
  kernel = state.params["x_embedder"]["kernel"]
  assert kernel.dtype == jnp.float32
  assert kernel.sharding.spec == jax.P(None, "fsdp")            # ('patch', 'embed')
  mu = state.opt_state[1][0].mu["x_embedder"]["kernel"]          # clip, then adamw
  assert mu.sharding.spec == kernel.sharding.spec
  assert state.ema["x_embedder"]["kernel"].sharding.spec == kernel.sharding.spec
  step = loop.compile_step(setup)
  rng = np.random.default_rng(0)
  batch = {"x": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 11, 8).astype(np.int32)}
  batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in batch.items()}
  before = _copy(state.params)
  state, m = step(state, batch)
  assert np.isfinite(float(m["loss"])) and int(state.skipped) == 0
  # (adaLN-zero: at step 1 only the zero-initialised output layers get gradients.)
  changed = jax.tree.map(lambda a, b: not np.allclose(np.array(a), b), state.params, before)
  assert any(jax.tree.leaves(changed))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params))


@pytest.mark.parametrize("name", ["default", "toy2d", "cifar10_dit", "imagenet256_sit_xl2",
                                  "t2i_mmdit"])
def test_every_config_builds_and_shards_on_8_devices(name):
  """Each config validates and its (abstract) state shards on 8 devices; nothing is read."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  assert module.__doc__ and "needs" in module.__doc__   # states what it is for and needs
  if cfg.data.source.startswith("arrayrecord"):
    cfg.data.paths = "/data/train-00000-of-00001.arrayrecord"   # only validated here
  setup = loop.build(cfg)
  assert setup.mesh.size == 8
  params = jax.tree.leaves(setup.shardings.params)
  assert len(params) == len(jax.tree.leaves(setup.abstract_state.params))
