"""PyTorch DiT/SiT import: parity with the reference forward, CLI, loading.

The fixture tests/fixtures/dit_sit_ref.npz comes from
tools/make_dit_fixture.py (reference PyTorch DiT/SiT code, random weights,
float64 forward); torch is not needed here. Runtime about 20 s on 2 CPU cores.
"""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.models import (MESH_AXES, create_model, load_model_config,
                                 load_pretrained)
from twinflow_jax.models import convert
from twinflow_jax.models.convert.sit import load_torch_dit
from twinflow_jax.models.convert.state_dict import (read_state_dict,
                                               write_safetensors)

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures',
                       'dit_sit_ref.npz')
forward = nnx.jit(lambda model, x, t, r, cond: model(x, t, r, cond))


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as z:
    data = {k: z[k] for k in z.files}
  cfg = json.loads(str(data.pop('config')))
  sd = {k[3:]: data.pop(k) for k in list(data) if k.startswith('sd/')}
  return cfg, sd, data


def model_config(cfg, **kw):
  base = dict(name='DiT-S/2', depth=cfg['depth'],
              hidden_size=cfg['hidden_size'], num_heads=cfg['num_heads'],
              input_size=cfg['input_size'], in_channels=cfg['in_channels'],
              num_classes=cfg['num_classes'], time_convention='sit')
  base.update(kw)
  return base


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def test_raw_output_matches_reference(ref):
  cfg, sd, data = ref
  model = create_model(model_config(cfg, learn_sigma=True), rngs=nnx.Rngs(0))
  load_torch_dit(model, sd)
  raw = nnx.jit(lambda m, x, t, y: m.network_forward(x, t, y))(
      model, nhwc(data['x']), data['t_sit'], data['y'])
  assert raw.shape == (4, 8, 8, 8)  # velocity + sigma halves
  want = nhwc(data['raw'])
  assert np.abs(want).max() > 0.3
  np.testing.assert_allclose(np.asarray(raw), want, atol=1e-4, rtol=0)


def test_twinflow_velocity_matches_reference(ref, tmp_path):
  cfg, sd, data = ref
  np.savez(tmp_path / 'sd.npz', **sd)
  sd_npz = read_state_dict(str(tmp_path / 'sd.npz'))
  model = create_model(model_config(cfg), rngs=nnx.Rngs(0))
  load_torch_dit(model, sd_npz)  # drops the sigma half
  assert model.final_layer.linear.kernel.shape == (32, 2 * 2 * 4)
  t = jnp.asarray(data['t_twinflow'])  # = 1 - t_sit
  f = forward(model, nhwc(data['x']), t, t, data['y'])
  # F_twinflow = -v_sit at t = 1 - t_sit.
  np.testing.assert_allclose(np.asarray(f), data['f_twinflow'], atol=1e-4,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(f), -nhwc(data['raw'])[..., :4],
                             atol=1e-4, rtol=0)
  # The r-embedder starts as a copy of the time embedder ...
  te = model.time_embedder
  np.testing.assert_array_equal(te.r_embedder.fc2.kernel[...],
                                te.t_embedder.fc2.kernel[...])
  # ... and contributes once r != t.
  f_r = forward(model, nhwc(data['x']), t, 0.5 * t, data['y'])
  assert float(jnp.abs(f_r - f)[:3].mean()) > 1e-4


def test_cli_safetensors_to_orbax_and_load(ref, tmp_path):
  cfg, sd, data = ref
  src = str(tmp_path / 'sit.safetensors')
  write_safetensors(src, sd)
  back = read_state_dict(src)
  assert set(back) == set(sd)
  np.testing.assert_array_equal(back['blocks.1.attn.qkv.weight'],
                                sd['blocks.1.attn.qkv.weight'])
  out = str(tmp_path / 'converted')
  argv = ['--src', src, '--model', 'DiT-S/2', '--out', out,
          '--set', f"depth={cfg['depth']}",
          '--set', f"hidden_size={cfg['hidden_size']}",
          '--set', f"num_heads={cfg['num_heads']}"]
  assert convert.main(argv) == 0
  stored = load_model_config(out)
  # Sizes read from the checkpoint, time mapping recorded.
  assert (stored['in_channels'], stored['input_size'], stored['num_classes'],
          stored['time_convention'], stored['learn_sigma']) == (
              4, 8, 10, 'sit', False)
  model = create_model(stored, rngs=nnx.Rngs(5))
  load_pretrained(model, out)
  t = jnp.asarray(data['t_twinflow'])
  f = forward(model, nhwc(data['x']), t, t, data['y'])
  np.testing.assert_allclose(np.asarray(f), data['f_twinflow'], atol=1e-4,
                             rtol=0)

  # Restoring straight into a sharded model keeps the rules' placement.
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    sharded = create_model(stored, rngs=nnx.Rngs(6))
  load_pretrained(sharded, out)
  fc1 = sharded.blocks[0].mlp.fc1.kernel[...]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  np.testing.assert_array_equal(np.asarray(fc1),
                                np.asarray(model.blocks[0].mlp.fc1.kernel[...]))

  # Mismatches are reported clearly.
  with pytest.raises(ValueError, match='shape mismatches'):
    load_pretrained(create_model(dict(stored, num_classes=7),
                                 rngs=nnx.Rngs(0)), out)
  with pytest.raises(ValueError, match='time_convention'):
    load_pretrained(create_model(dict(stored, time_convention='twinflow'),
                                 rngs=nnx.Rngs(0)), out)
  with pytest.raises(FileNotFoundError):
    load_pretrained(model, str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match='already holds'):
    convert.convert(convert.parser().parse_args(argv))


def test_cli_rejects_ddpm_dit_and_bad_sizes(ref, tmp_path, capsys):
  cfg, sd, _ = ref
  src = str(tmp_path / 'sd.npz')
  np.savez(src, **sd)
  out = str(tmp_path / 'o')
  assert convert.main(['--src', src, '--model', 'DiT-S/2', '--out', out,
                       '--source', 'dit']) == 1
  assert 'singular at t = 1' in capsys.readouterr().err
  # The named size DiT-S/2 (depth 12, width 384) does not fit the file.
  assert convert.main(['--src', src, '--model', 'DiT-S/2', '--out', out]) == 1
  assert "'depth'" in capsys.readouterr().err
  assert convert.main(['--src', src + '.missing', '--model', 'DiT-S/2',
                       '--out', out]) == 1
  assert 'not found' in capsys.readouterr().err
  assert not os.path.exists(out)
  (tmp_path / 'afile').write_text('x')
  assert convert.main(['--src', src, '--model', 'DiT-S/2', '--out',
                       str(tmp_path / 'afile')]) == 1
  assert 'is a file; give a directory' in capsys.readouterr().err

  model = create_model(model_config(cfg), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='in_channels'):
    load_torch_dit(create_model(model_config(cfg, in_channels=3),
                                rngs=nnx.Rngs(0)), sd)
  with pytest.raises(ValueError, match='does not use'):
    load_torch_dit(model, dict(sd, extra=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match='missing'):
    load_torch_dit(model, {k: v for k, v in sd.items()
                           if k != 'blocks.0.mlp.fc2.bias'})
  with pytest.raises(ValueError, match='learn_sigma'):
    no_sigma = dict(sd)
    w = sd['final_layer.linear.weight'].reshape(2, 2, 8, 32)[:, :, :4]
    no_sigma['final_layer.linear.weight'] = w.reshape(16, 32)
    no_sigma['final_layer.linear.bias'] = sd['final_layer.linear.bias'][:16]
    load_torch_dit(create_model(model_config(cfg, learn_sigma=True),
                                rngs=nnx.Rngs(0)), no_sigma)


def test_torch_checkpoint_unwrapping(ref, tmp_path, monkeypatch):
  """`.pt` reading without torch: a stand-in module records the call."""
  _, sd, _ = ref
  calls = []

  def fake_load(path, map_location, weights_only):
    calls.append((map_location, weights_only))
    return {'model': {}, 'ema': {'module.' + k: v for k, v in sd.items()},
            'args': None}

  monkeypatch.setitem(sys.modules, 'torch', types.SimpleNamespace(
      load=fake_load))
  path = tmp_path / 'ckpt.pt'
  path.write_bytes(b'')
  got = read_state_dict(str(path))
  assert calls == [('cpu', True)]  # no arbitrary unpickling by default
  assert set(got) == set(sd)  # EMA weights, 'module.' prefix removed
  read_state_dict(str(path), allow_pickle=True)
  assert calls[-1] == ('cpu', False)
  other = tmp_path / 'weights.txt'
  other.write_text('')
  with pytest.raises(ValueError, match='format'):
    read_state_dict(str(other))
