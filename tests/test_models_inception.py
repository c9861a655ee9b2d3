"""FID InceptionV3: parity with pytorch-fid on random weights, converter, preprocessing.

The fixture tests/fixtures/inception_ref.npz comes from tools/make_inception_fixture.py
(pytorch-fid's own network, float64 forward). It stores a seed, not weights: the same
weights are made here with tools/fid_inception_random.py. torch is not needed.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.evaluation import preprocess as pre
from twinflow_jax.models.convert import inception as convert_inception
from twinflow_jax.models.convert.state_dict import write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'inception_ref.npz')
RTOL = 1e-4  # max |jax - torch| / max |torch| per output, float32 vs float64 reference


def _recipe():
  spec = importlib.util.spec_from_file_location(
      'fid_inception_random', os.path.join(ROOT, 'tools', 'fid_inception_random.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


recipe = _recipe()
forward = nnx.jit(lambda model, x: model(x))


def rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def ref():
  with np.load(FIXTURE) as z:
    data = {k: z[k] for k in z.files}
  assert str(data['recipe']) == recipe.RECIPE, 'fixture from another weight recipe'
  data['shapes'] = {k: tuple(v) for k, v in json.loads(str(data['shapes_json'])).items()}
  sd = recipe.random_state_dict(data['shapes'], int(data['seed']))
  np.testing.assert_allclose(recipe.checksums(sd), data['checksums'], rtol=1e-10,
                             err_msg='regenerated random weights differ from the tool\'s')
  data['sd'] = sd
  return data


@pytest.fixture(scope='module')
def converted(ref, tmp_path_factory):
  """The random state dict as .safetensors, converted by the CLI, loaded from .npz."""
  d = tmp_path_factory.mktemp('inception')
  src, out = str(d / 'random.safetensors'), str(d / 'fid_inception.npz')
  write_safetensors(src, ref['sd'])
  assert convert_inception.main(['--src', src, '--out', out]) == 0
  return convert_inception.load_inception(out), out


def test_state_dict_names_and_shapes_match_pytorch_fid(ref):
  assert convert_inception.expected_state_dict_shapes() == ref['shapes']
  assert len(ref['shapes']) == 472


def test_forward_matches_pytorch_fid(ref, converted):
  model, _ = converted
  x = recipe.random_images(int(ref['seed']), tuple(ref['x_shape']))
  np.testing.assert_allclose(np.sum(x, dtype=np.float64), ref['x_checksum'], rtol=1e-12)
  out = forward(model, jnp.asarray(x))
  for name in ('pool', 'logits', 'logits_unbiased'):
    err = rel_err(getattr(out, name), ref[name])
    assert err < RTOL, (name, err)
  # The logits really differ by the bias (the fixture would catch a swapped head).
  assert rel_err(out.logits_unbiased, ref['logits']) > 1e-2


def test_pytorch_fid_full_pipeline_at_299(ref, converted):
  """uint8 -> /255 -> bilinear 299 (align_corners=False) -> 2x-1 -> network."""
  model, _ = converted
  x = pre.inception_input(jnp.asarray(ref['e2e_src']), 'pytorch_fid')
  assert x.shape == (2, 299, 299, 3)
  err = rel_err(forward(model, x).pool, ref['e2e_pool'])
  assert err < RTOL, err


@pytest.mark.parametrize('case', ['up', 'down'])
def test_pytorch_fid_resize_matches_torch(ref, case):
  src, want = ref[f'resize_{case}_src'], ref[f'resize_{case}_out']
  got = pre.resize_bilinear(jnp.asarray(src, jnp.float32) / 255.0, want.shape[1:3],
                            'pytorch_fid')
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_resize_grids_on_known_values():
  row = jnp.array([0.0, 10.0, 20.0]).reshape(1, 1, 3, 1)
  # TF1 legacy (ADM): source x = dst * 3/6, upper neighbour clamped to the edge.
  np.testing.assert_allclose(pre.resize_bilinear(row, (1, 6), 'adm').ravel(),
                             [0, 5, 10, 15, 20, 20])
  # Half-pixel (pytorch-fid): source x = (dst + 0.5) * 3/6 - 0.5, clamped at 0.
  np.testing.assert_allclose(pre.resize_bilinear(row, (1, 6), 'pytorch_fid').ravel(),
                             [0, 2.5, 7.5, 12.5, 17.5, 20])
  img = jnp.asarray(np.random.default_rng(0).random((2, 7, 5, 3)), jnp.float32)
  for mode in pre.MODES:  # same size: identity
    np.testing.assert_allclose(pre.resize_bilinear(img, (7, 5), mode), img, atol=1e-6)


def test_adm_input_scaling_and_quantisation():
  assert pre.samples_to_uint8(np.array([-1.0, -0.999, 0.0, 0.999, 1.0, 2.0, -3.0])
                              ).tolist() == [0, 0, 127, 254, 255, 255, 0]
  u8 = np.array([[[[0, 128, 255]]]], np.uint8)
  x = pre.inception_input(jnp.asarray(u8), 'adm', size=1)  # (x - 128) / 128
  np.testing.assert_allclose(np.asarray(x).ravel(), [-1.0, 0.0, 127 / 128])
  grey = pre.inception_input(jnp.asarray(u8[..., :1]), 'adm', size=1)
  assert grey.shape == (1, 1, 1, 3)


def test_network_architecture_details():
  from twinflow_jax.models import inception  # pylint: disable=g-import-not-at-top
  x = jnp.arange(2 * 3 * 3 * 1, dtype=jnp.float32).reshape(2, 3, 3, 1)
  avg = inception.avg_pool_exclude_pad(x)
  # Corner: mean of the 4 real pixels, not / 9.
  np.testing.assert_allclose(avg[0, 0, 0, 0], np.mean([0, 1, 3, 4]))
  np.testing.assert_allclose(inception.max_pool(-x - 1, 3, 1, 1)[0, 0, 0, 0], -1.0)
  model = inception.abstract_inception()
  assert model.Mixed_7b.pool == 'avg' and model.Mixed_7c.pool == 'max'
  assert model.Conv2d_1a_3x3.bn.epsilon == 1e-3
  assert model.fc.kernel.shape == (2048, 1008)
  with pytest.raises(ValueError, match='at least 75'):
    model.features(jnp.zeros((1, 74, 80, 3)))


def test_converter_errors(ref, tmp_path):
  sd = dict(ref['sd'])
  sd['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  with pytest.raises(ValueError, match='torchvision'):
    convert_inception.convert_state_dict(sd)
  sd = dict(ref['sd'])
  sd['fc.weight'] = sd['fc.weight'][:1000]
  with pytest.raises(ValueError, match="'fc.weight' has shape"):
    convert_inception.convert_state_dict(sd)
  assert convert_inception.main(['--src', str(tmp_path / 'missing.pth'),
                                 '--out', str(tmp_path / 'x.npz')]) == 1
  with pytest.raises(FileNotFoundError, match='pytorch-fid'):
    convert_inception.load_inception(str(tmp_path / 'nothing.npz'))


def test_converted_file_is_torch_free_npz(converted):
  _, path = converted
  with np.load(path, allow_pickle=False) as z:
    assert str(z['__format__']) == convert_inception.FORMAT
    assert z['Mixed_6b/branch7x7_2/conv/kernel'].shape == (1, 7, 128, 128)
    assert z['Mixed_6b/branch7x7_3/conv/kernel'].shape == (7, 1, 128, 192)
