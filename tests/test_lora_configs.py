"""The pretrained-model configs train a few steps through `main` on tiny random models.

Each config runs with its own settings but tiny shapes: the committed tiny diffusers
fixtures stand in for the released transformers (config.json + safetensors), text features
come from tiny ArrayRecord t2i records written with the project's writer, 4 rows per step.
The SD3.5 LoRA run is then exported (merged) and sampled, read-only, by the sample command.
"""

import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp

from twinflow_jax import generate
from twinflow_jax import main as main_lib
from twinflow_jax import sample
from twinflow_jax.models import convert
from twinflow_jax.models.convert import diffusers as dlib
from twinflow_jax.models.convert.safetensors_io import SafetensorsFolder
from twinflow_jax.train import checkpoint as ckpt_lib
from twinflow_jax.train import readonly
from twinflow_jax.train import state as state_lib
from twinflow_jax.data import arrayrecord_io

import tiny_diffusers
from test_sample import snapshot

ROOT = os.path.join(os.path.dirname(__file__), '..')
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def write_records(path, latent_shape, txt_len, txt_dim, pooled_dim, n=16):
  rng = np.random.default_rng(0)
  arrays = {'latent': rng.standard_normal((n, *latent_shape)).astype(np.float32),
            'txt': rng.standard_normal((n, txt_len, txt_dim)).astype(np.float32),
            'txt_mask': np.arange(txt_len)[None] < rng.integers(2, txt_len + 1, (n, 1)),
            'pooled': rng.standard_normal((n, pooled_dim)).astype(np.float32)}
  return arrayrecord_io.write_arrays(str(path / 'train'), 't2i', arrays)


def tiny(c, fixture, tmp_path, latent_shape, pooled_dim, cut=True):
  """Points a config at a 1-block cut (`cut`) of a tiny fixture and at tiny records."""
  with open(os.path.join(fixture, 'config.json')) as f:
    dcfg = json.load(f)
  if cut:
    fixture = tiny_diffusers.one_block_folder(
        fixture, str(tmp_path / 'base'), 2 if dcfg['_class_name'].startswith('SD3') else 1)
  c.model.pretrained = fixture
  c.model.dtype = c.model.param_dtype = 'float32'
  c.model.remat = 'none'
  c.train.init_from = fixture
  txt_len, txt_dim = 5, dcfg['joint_attention_dim']
  c.data.paths = write_records(tmp_path, latent_shape, txt_len, txt_dim, pooled_dim)
  c.data.latent_shape, c.data.txt_len = latent_shape, txt_len
  c.data.txt_dim, c.data.pooled_dim = txt_dim, pooled_dim
  c.data.latent_dtype = c.data.txt_dtype = 'float32'
  c.data.read_threads, c.data.prefetch_buffer_size = 1, 8
  c.loss.row_blocks = 1
  c.train.global_batch_size = 8
  c.train.num_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.sample_every = 0
  c.train.sample_presets = ('1nfe',)
  c.train.num_samples = 2
  c.train.use_tensorboard = False
  c.train.async_checkpointing = False
  if c.lora.rank:
    c.lora.rank = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
  return c


def run_main(c, workdir, monkeypatch):
  def fail(error, status):   # main exits the process on errors; a test must not
    raise AssertionError(f'main failed with status {status}: {error}')
  monkeypatch.setattr(main_lib, '_fail', fail)
  main_lib.run(c, str(workdir))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['skipped_steps'] == 0 for r in rows)
  with open(os.path.join(workdir, 'config.json')) as f:
    return rows, json.load(f)


def test_sd35_lora_config_trains_and_samples_through_main(tmp_path, monkeypatch, capsys):
  c = tiny(load_config('sd35_twinflow.py', 'lora'), os.path.join(FIXTURES, 'sd35_medium'),
           tmp_path, (8, 12, 4), 16)
  assert c.lora.time_input == 't_minus_half_r' and not c.model.r_embedder
  assert load_config('sd35_twinflow.py', 'full').lora.rank == 0
  rows, saved = run_main(c, tmp_path / 'run', monkeypatch)
  assert len(saved['lora']['base_fingerprint']) == 16
  assert rows[-1]['grad_norm'] > 0
  # The checkpoint holds the adapters only (params, EMA, optimizer state).
  step_dir = tmp_path / 'run' / 'checkpoints' / '2' / 'state'
  tree = ocp.StandardCheckpointer().metadata(str(step_dir)).item_metadata.tree
  arrays = [n for n in ckpt_lib.leaf_names(tree) if n.split('/')[0] in ('params', 'ema',
                                                                            'opt_state')]
  assert arrays and all(n.endswith(('lora_a', 'lora_b', '/count')) for n in arrays), arrays
  # Merge-and-export: base + (alpha / rank) A B under the diffusers names.
  out = str(tmp_path / 'export')
  monkeypatch.setattr(convert.cli, '_fsdp_mesh', lambda: jax.make_mesh(
      (1, 2, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:2],
      axis_types=(jax.sharding.AxisType.Auto,) * 3))
  assert convert.main(['diffusers-export', '--src', str(tmp_path / 'run'), '--out', out]) == 0
  with SafetensorsFolder(out) as f, SafetensorsFolder(c.train.init_from) as b:
    key = 'transformer_blocks.0.attn.to_q.weight'
    params = ocp.StandardCheckpointer().restore(str(step_dir))['params']
    q = params['transformer_blocks']['0']['attn']['to_q']
    want = b.read(key).astype(np.float32) + (
        c.lora.alpha / c.lora.rank * (q['lora_a'] @ q['lora_b'])).T
    np.testing.assert_allclose(f.read(key).astype(np.float32), want, atol=1e-6)
    assert np.abs(f.read(key) - b.read(key)).max() > 1e-6   # the adapters moved
    np.testing.assert_array_equal(f.read('proj_out.weight'), b.read('proj_out.weight'))
  check_lora_sampling(c, tmp_path, out, (8, 12, 4), 16, capsys)


def sample_folder(folder, model_config, cond, preset, x_shape, mesh):
  """Samples a plain diffusers folder with the LoRA time input t - r / 2 (see train/lora.py)."""
  overrides = {k: v for k, v in model_config.items() if k not in ('name', 'pretrained')}
  model = dlib.load_model(folder, overrides, mesh=mesh)
  graphdef, params = state_lib.split_model(model)
  apply = state_lib.make_apply_fn(graphdef)
  shifted = lambda p, x, t, r, c: apply(p, x, t - r / 2, t - r / 2, c)
  return generate.generate(shifted, params, cond, preset, key=3, x_shape=x_shape, mesh=mesh)


def check_lora_sampling(c, tmp_path, merged, x_shape, pooled_dim, capsys):
  """The sample command on the LoRA run (read-only, base + adapters) equals sampling the
  merged export `merged`; a missing or different base is one clear error line."""
  run, out = str(tmp_path / 'run'), str(tmp_path / 'samples.npz')
  rng = np.random.default_rng(5)
  cond = {'txt': rng.standard_normal((2, 7, c.data.txt_dim)).astype(np.float32),
          'txt_mask': np.arange(7)[None] < np.array([[7], [4]]),
          'pooled': rng.standard_normal((2, pooled_dim)).astype(np.float32)}
  np.savez(tmp_path / 'prompts.npz', **cond)
  before = snapshot(run)
  # any4 calls the network at r != 0 (the 1/2/4-NFE presets at r = 0), so the comparison
  # below also pins the time input t - r / 2.
  argv = ['--workdir', run, '--cond-file', str(tmp_path / 'prompts.npz'), '--preset', 'any4',
          '--seed', '3', '--out', out]
  assert sample.main(argv) == 0
  assert snapshot(run) == before
  with np.load(out) as f:
    got = f['samples']
    assert str(f['weights']) == 'online'   # a LoRA run's default: the trained adapter
  assert got.shape == (2, *x_shape) and np.isfinite(got).all()
  mesh = generate.default_mesh()
  want = sample_folder(merged, c.model.to_dict(), cond, 'any4', x_shape, mesh)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  base = sample_folder(c.train.init_from, c.model.to_dict(), cond, 'any4', x_shape, mesh)
  assert np.abs(got - base).max() > 1e-3   # the adapters matter far beyond the tolerance

  # The base moved: one error line naming the field and the path, nothing written.
  moved = str(tmp_path / 'moved_base')
  os.rename(c.train.init_from, moved)
  with pytest.raises(SystemExit) as e:
    sample.main(argv[:-1] + [str(tmp_path / 'x.npz')])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f'error: {run} is a LoRA run') and '--base DIR' in err, err
  assert f"config.train.init_from = '{c.train.init_from}'" in err, err
  assert not (tmp_path / 'x.npz').exists() and snapshot(run) == before
  # Another base of the same architecture (the merged export) fails the fingerprint check.
  with pytest.raises(ValueError, match=re.escape(f'base weights at {merged} (fingerprint ')
                     + '.* are not those LoRA run .* give the original base folder with --base'):
    readonly.load_run(run, base=merged)
  # The moved original is accepted (adapters and base read, nothing sampled).
  loaded = readonly.load_run(run, base=moved)
  assert loaded.config.train.init_from == moved and list(loaded.weights) == ['online']
  assert snapshot(run) == before


def test_qwen_image_lora_config_trains_through_main(tmp_path, monkeypatch):
  c = tiny(load_config('qwen_image_twinflow_lora.py'), os.path.join(FIXTURES, 'qwen_image_tiny'),
           tmp_path, (4, 6, 4), 8)
  assert c.loss.ema_decay == 0.99 and c.lora.rank == 2
  run_main(c, tmp_path / 'run', monkeypatch)


def test_flux_lora_config_trains_through_main(tmp_path, monkeypatch):
  c = tiny(load_config('flux_twinflow_lora.py'), os.path.join(FIXTURES, 'flux_schnell_tiny'),
           tmp_path, (4, 6, 4), 12)
  run_main(c, tmp_path / 'run', monkeypatch)
