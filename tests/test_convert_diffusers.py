"""diffusers folders in and out: safetensors I/O, round trips, errors, CLI, trainer hook.

Uses the tiny SD3 fixtures of tools/make_pretrained_fixture.py; no forward passes (the
numerics are in test_models_sd3.py), so no compile beyond small jitted inits.
"""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.models import (MESH_AXES, create_model, load_model_config,
                                 load_pretrained)
from twinflow_jax.models import convert
from twinflow_jax.models.convert import cli
from twinflow_jax.models.convert import diffusers as dlib
from twinflow_jax.models.convert.safetensors_io import (SafetensorsFolder, TensorOut,
                                                         write_safetensors_folder)
from twinflow_jax.models.param_tree import flatten, unflatten

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
MEDIUM = os.path.join(FIXTURES, 'sd3_medium')  # float32, one file, no r-embedder
BF16 = os.path.join(FIXTURES, 'sd35_medium')  # bfloat16, dual attention
LARGE = os.path.join(FIXTURES, 'sd35_large')  # sharded + index, official wrapper


def params(model):
  return {p: np.asarray(v) for p, v in flatten(nnx.to_pure_dict(
      nnx.state(model, nnx.Param))).items()}


def tensors(folder):
  with SafetensorsFolder(folder) as src:
    return {k: src.read(k) for k in src.keys()}


def mesh222():
  return jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_safetensors_io_slices_bf16_and_shards(tmp_path):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((6, 5)).astype(np.float32)
  b = a.astype(ml_dtypes.bfloat16)
  items = [TensorOut('a', a.shape, a.dtype, lambda: a),
           TensorOut('b', b.shape, b.dtype, lambda: b),
           TensorOut('s', (), np.dtype(np.int64), lambda: np.asarray(7, np.int64)),
           TensorOut('c', a.shape, a.dtype, lambda: (a[i:i + 2] for i in range(0, 6, 2)))]
  names = write_safetensors_folder(str(tmp_path / 'one'), items)
  assert names == ['diffusion_pytorch_model.safetensors']
  names = write_safetensors_folder(str(tmp_path / 'many'), items, max_shard_bytes=100)
  assert names[-1] == 'diffusion_pytorch_model.safetensors.index.json' and len(names) == 4
  for d in ('one', 'many'):
    with SafetensorsFolder(str(tmp_path / d)) as src:
      assert src.keys() == ['a', 'b', 'c', 's'] and src.dtype('b') == b.dtype
      np.testing.assert_array_equal(src.read('c'), a)  # written chunk by chunk
      np.testing.assert_array_equal(src.read('a', (slice(1, 4), slice(2, 5))), a[1:4, 2:5])
      got = src.read('b', (slice(2, 3),))
      assert got.dtype == ml_dtypes.bfloat16
      np.testing.assert_array_equal(got.astype(np.float32), b[2:3].astype(np.float32))
      assert int(src.read('s')) == 7
  with pytest.raises(ValueError, match='duplicate'):
    write_safetensors_folder(str(tmp_path / 'dup'), items + items[:1])
  with pytest.raises(ValueError, match='producer'):
    write_safetensors_folder(str(tmp_path / 'bad'), [TensorOut('a', (2,), a.dtype, lambda: a)])
  with pytest.raises(ValueError, match='bytes'):
    write_safetensors_folder(str(tmp_path / 'bad'), [TensorOut('a', a.shape, a.dtype,
                                                               lambda: iter([a[:2]]))])
  assert not os.path.exists(tmp_path / 'bad' / 'diffusion_pytorch_model.safetensors')
  os.remove(tmp_path / 'many' / names[1])
  with pytest.raises(FileNotFoundError, match='missing'):
    SafetensorsFolder(str(tmp_path / 'many'))
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model'):
    SafetensorsFolder(str(tmp_path))


def test_export_round_trip_keeps_names_values_and_bf16(tmp_path):
  # bf16 checkpoint -> bf16 parameters -> export: the same tensors, bit for bit.
  model = dlib.load_model(BF16, {'param_dtype': 'bfloat16'})
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {a.dtype for a in leaves} == {jnp.dtype(jnp.bfloat16)}
  out = str(tmp_path / 'export')
  dlib.export(model, out, max_shard_bytes=60_000)
  assert os.path.isfile(os.path.join(out, 'diffusion_pytorch_model.safetensors.index.json'))
  src, got = tensors(BF16), tensors(out)
  r_keys = {k for k in got if k.startswith('time_text_embed_2.')}
  assert len(r_keys) == 8  # the official wrapper's names
  assert set(got) - r_keys == set(src)
  for k, v in src.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k].astype(np.float32), v.astype(np.float32), err_msg=k)
  cfg = json.load(open(os.path.join(out, 'config.json')))
  want = json.load(open(os.path.join(BF16, 'config.json')))
  assert cfg['_class_name'] == 'SD3Transformer2DModel'
  assert {k: v for k, v in cfg.items() if not k.startswith('_')} == {
      k: v for k, v in want.items() if not k.startswith('_')}
  # ... and loads back to identical parameters, on a (2, 2, 2) mesh too.
  again = dlib.load_model(out, {'param_dtype': 'bfloat16'}, mesh=mesh222())
  a, b = params(model), params(again)
  assert set(a) == set(b)
  for p in a:
    np.testing.assert_array_equal(a[p].astype(np.float32), b[p].astype(np.float32))
  fc1 = again.transformer_blocks[0].ff.fc1.kernel[...]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  with pytest.raises(ValueError, match='already holds'):
    dlib.export(model, out)


def test_float32_export_with_r_embedder_and_dtype_cast(tmp_path):
  model = dlib.load_model(LARGE)  # sharded files, r-embedder present
  out = str(tmp_path / 'f32')
  dlib.export(model, out)
  src, got = tensors(LARGE), tensors(out)
  assert set(got) == set(src)
  for k in src:
    np.testing.assert_array_equal(got[k], src[k], err_msg=k)
  half = str(tmp_path / 'bf16')
  dlib.export(model, half, dtype='bfloat16')
  with SafetensorsFolder(half) as f:
    assert {str(f.dtype(k)) for k in f.keys()} == {'bfloat16'}


def edited(tmp_path, folder, edit):
  """A copy of a fixture folder with its tensors changed by edit(dict)."""
  data = tensors(folder)
  edit(data)
  out = tmp_path / ('edited_' + os.path.basename(folder))
  write_safetensors_folder(str(out), [TensorOut(k, v.shape, v.dtype, lambda v=v: v)
                                      for k, v in data.items()])
  shutil.copy(os.path.join(folder, 'config.json'), out / 'config.json')
  return str(out)


def test_mismatches_are_listed(tmp_path):
  def drop_and_add(d):
    d.pop('transformer_blocks.1.attn.to_k.bias')
    d['extra.weight'] = np.zeros(3, np.float32)

  with pytest.raises(ValueError) as e:
    dlib.load_model(edited(tmp_path, MEDIUM, drop_and_add))
  msg = str(e.value)
  assert "missing keys ['transformer_blocks.1.attn.to_k.bias']" in msg
  assert "unexpected keys ['extra.weight']" in msg

  def reshape(d):
    d['context_embedder.weight'] = d['context_embedder.weight'][:, :20]

  with pytest.raises(ValueError, match=r'context_embedder.weight: checkpoint \(32, 20\)'):
    dlib.load_model(edited(tmp_path, MEDIUM, reshape))

  def shift_positions(d):
    d['pos_embed.pos_embed'] = np.roll(d['pos_embed.pos_embed'], 1, axis=1)

  with pytest.raises(ValueError, match='sin-cos table'):
    dlib.load_model(edited(tmp_path, MEDIUM, shift_positions))
  # A TwinFlow export loaded without the r-embedder names the surplus keys.
  with pytest.raises(ValueError, match='time_text_embed_2'):
    dlib.load_model(LARGE, {'r_embedder': False})
  bad = tmp_path / 'sana'
  bad.mkdir()
  (bad / 'config.json').write_text(json.dumps({'_class_name': 'SanaTransformer2DModel'}))
  with pytest.raises(ValueError, match='not supported'):
    dlib.load_model(str(bad))


def zeroed(model, keep=lambda path: False):
  """The model with every parameter (but those `keep` selects) set to zeros in place."""
  state = nnx.state(model, nnx.Param)
  flat = flatten(nnx.to_pure_dict(state))
  flat = {p: v if keep(p) else jnp.zeros_like(v) for p, v in flat.items()}
  nnx.replace_by_pure_dict(state, unflatten(flat))
  nnx.update(model, state)
  return model


def test_load_pretrained_accepts_diffusers_folder():
  # The trainer's init_from path: an existing sharded model filled in place.
  ref = params(dlib.load_model(LARGE))
  model = zeroed(dlib.load_model(LARGE, mesh=mesh222()))
  before = model.transformer_blocks[1].attn.to_v.kernel[...].sharding
  assert before.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  load_pretrained(model, LARGE)
  got = params(model)
  for p in ref:
    np.testing.assert_array_equal(got[p], ref[p])
  assert model.transformer_blocks[1].attn.to_v.kernel[...].sharding == before
  # A base checkpoint keeps the model's own r-embedder.
  is_r = lambda p: p[0] == 'time_text_embed_2'
  model = zeroed(dlib.load_model(MEDIUM, seed=1), keep=is_r)
  r_before = {p: v for p, v in params(model).items() if is_r(p)}
  load_pretrained(model, MEDIUM)
  got = params(model)
  for p, v in r_before.items():
    np.testing.assert_array_equal(got[p], v)
  np.testing.assert_array_equal(got[('proj_out', 'kernel')],
                                tensors(MEDIUM)['proj_out.weight'].T)


def test_cli_import_and_export(tmp_path, capsys, monkeypatch):
  # A 2-device FSDP mesh instead of all 8: Orbax compiles a slice per device and shape.
  monkeypatch.setattr(cli, '_fsdp_mesh', lambda: jax.make_mesh(
      (1, 2, 1), MESH_AXES, devices=jax.devices()[:2],
      axis_types=(jax.sharding.AxisType.Auto,) * 3))
  orbax_dir = str(tmp_path / 'orbax')
  assert convert.main(['diffusers-import', '--src', BF16, '--out', orbax_dir]) == 0
  stored = load_model_config(orbax_dir)
  assert stored['name'] == 'sd3' and stored['dual_attention_layers'] == [0, 1]
  ref = params(dlib.load_model(BF16))
  model = zeroed(dlib.load_model(BF16))
  load_pretrained(model, orbax_dir)
  for p, v in params(model).items():
    np.testing.assert_array_equal(v, ref[p])
  out = str(tmp_path / 'exported')
  assert convert.main(['diffusers-export', '--src', orbax_dir, '--out', out,
                       '--dtype', 'bfloat16', '--max-shard-gb', '0.0001']) == 0
  assert 'wrote' in capsys.readouterr().out
  src, got = tensors(BF16), tensors(out)
  for k in src:
    np.testing.assert_array_equal(got[k].astype(np.float32), src[k].astype(np.float32))
  # Clear one-line errors.
  assert convert.main(['diffusers-import', '--src', str(tmp_path / 'none'), '--out',
                       str(tmp_path / 'x')]) == 1
  assert 'not a diffusers model folder' in capsys.readouterr().err
  assert convert.main(['diffusers-export', '--src', str(tmp_path), '--out',
                       str(tmp_path / 'y')]) == 1
  assert 'no checkpoints/' in capsys.readouterr().err
  assert convert.main(['diffusers-import', '--src', BF16, '--out', orbax_dir]) == 1
  assert 'already holds' in capsys.readouterr().err


def t2i_config(model):
  """configs/t2i_mmdit.py with the tiny SD3 fixture's shapes on a (2, 2, 2) mesh."""
  spec = importlib.util.spec_from_file_location('t2i_cfg', os.path.join(
      os.path.dirname(__file__), '..', 'configs', 't2i_mmdit.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model = model
  c.data.paths = '/data/train-00000-of-00001.arrayrecord'  # only validated
  c.data.latent_shape, c.data.txt_len, c.data.txt_dim, c.data.pooled_dim = (8, 12, 4), 7, 24, 16
  c.train.global_batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  return c


@pytest.mark.slow
def test_trainer_init_from_diffusers_folder_and_export_from_run(tmp_path, monkeypatch):
  from twinflow_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  cfg = t2i_config({'name': 'sd3', 'pretrained': LARGE, 'dtype': 'float32'})
  setup = loop.build(cfg)
  state = loop.init_state(setup, 0)
  state = loop.load_pretrained_params(setup, state, LARGE)  # what train.init_from runs
  ref = params(dlib.load_model(LARGE))
  got, ema = flatten(state.params), flatten(state.ema)
  for p, v in ref.items():
    key = tuple(str(k) for k in p)
    q = next(k for k in got if tuple(map(str, k)) == key)
    np.testing.assert_array_equal(np.asarray(got[q]), v)
    np.testing.assert_array_equal(np.asarray(ema[q]), v)
  # A run's checkpoint exports its EMA teacher (default) or its online weights.
  workdir = str(tmp_path / 'run')
  state = state.replace(ema=jax.tree.map(lambda a: 2 * a, state.ema))
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), save_every=1, keep=1,
                               async_save=False)
  ckpt.save(3, state, None, ckpt_lib.config_to_json(cfg), force=True)
  ckpt.close()
  monkeypatch.setattr(cli, '_fsdp_mesh', lambda: jax.make_mesh(
      (1, 2, 1), MESH_AXES, devices=jax.devices()[:2],
      axis_types=(jax.sharding.AxisType.Auto,) * 3))
  for weights, factor in (('ema', 2), ('params', 1)):
    out = str(tmp_path / weights)
    assert convert.main(['diffusers-export', '--src', workdir, '--out', out,
                         '--weights', weights]) == 0
    src, exported = tensors(LARGE), tensors(out)
    assert set(exported) == set(src)
    for k in ('transformer_blocks.2.attn.add_q_proj.weight',
              'time_text_embed_2.text_embedder.linear_1.bias', 'pos_embed.proj.weight'):
      np.testing.assert_array_equal(exported[k], factor * src[k])
  assert convert.main(['diffusers-export', '--src', workdir, '--out',
                       str(tmp_path / 'x'), '--weights', 'nope']) == 1
  assert convert.main(['diffusers-export', '--src', workdir, '--out',
                       str(tmp_path / 'y'), '--step', '7']) == 1


def test_lora_wrapped_layers_load_and_export_after_merge(tmp_path):
  model = dlib.load_model(MEDIUM)
  attn = model.transformer_blocks[0].attn
  assert dlib.dotted_key(('transformer_blocks', 0, 'attn', 'to_q', 'base_module',
                          'kernel')) == ('transformer_blocks.0.attn.to_q', 'kernel')
  attn.to_q = nnx.LoRA(32, 2, 32, base_module=attn.to_q, rngs=nnx.Rngs(0))
  attn.to_q.lora_b.set_value(jnp.ones((2, 32)))
  zeroed(model, keep=lambda p: 'lora_a' in p or 'lora_b' in p)
  dlib.load_into(model, MEDIUM)  # base weights under their names, LoRA kept
  src = tensors(MEDIUM)
  np.testing.assert_array_equal(np.asarray(attn.to_q.base_module.kernel[...]),
                                src['transformer_blocks.0.attn.to_q.weight'].T)
  np.testing.assert_array_equal(np.asarray(attn.to_q.lora_b[...]), 1.0)
  with pytest.raises(ValueError, match='merge them'):
    dlib.export(model, str(tmp_path / 'unmerged'))
  base = attn.to_q.base_module  # merge: W + A B
  base.kernel.set_value(base.kernel[...] + attn.to_q.lora_a[...] @ attn.to_q.lora_b[...])
  merged = np.asarray(base.kernel[...])
  attn.to_q = base
  dlib.export(model, str(tmp_path / 'merged'))
  np.testing.assert_array_equal(tensors(str(tmp_path / 'merged'))[
      'transformer_blocks.0.attn.to_q.weight'], merged.T)
