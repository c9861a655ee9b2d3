"""SD3 / SD3.5 transformer: parity with diffusers, TwinFlow r-embedder, sharding.

Fixtures tests/fixtures/sd3_medium, sd35_medium (MMDiT-X dual attention, qk RMS-norm,
bfloat16 weights) and sd35_large (qk RMS-norm, official TwinFlow wrapper with
time_text_embed_2, sharded files) come from tools/make_pretrained_fixture.py (diffusers
0.42.1 forward in float32); torch is not needed here.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.models import MESH_AXES, create_model, flops_per_forward, sd3
from twinflow_jax.models.convert import diffusers as dlib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
VARIANTS = ('sd3_medium', 'sd35_medium', 'sd35_large')
TXT_LENS = (7, 11)
forward = nnx.jit(lambda model, x, t, r, cond: model(x, t, r, cond))


def fixture(variant):
  folder = os.path.join(FIXTURES, variant)
  with np.load(os.path.join(folder, 'reference.npz')) as z:
    data = {k: z[k] for k in z.files}
  return folder, data


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def cond_of(data, n):
  return {'txt': jnp.asarray(data[f'txt_{n}']), 'pooled': jnp.asarray(data['pooled'])}


@pytest.mark.parametrize('variant', VARIANTS)
def test_matches_diffusers(variant):
  folder, data = fixture(variant)
  model = dlib.load_model(folder)
  assert model.time_text_embed_2 is not None  # the r-embedder is always there
  x, t = nhwc(data['latents']), jnp.asarray(data['t'])
  for n in TXT_LENS:  # two text lengths
    want = nhwc(data[f'out_{n}'])
    assert np.abs(want).max() > 1.0
    out = forward(model, x, t, t, cond_of(data, n))
    assert out.shape == want.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=0)


def test_r_embedder_matches_official_wrapper():
  folder, data = fixture('sd35_large')
  model = dlib.load_model(folder)
  x, t = nhwc(data['latents']), jnp.asarray(data['t'])
  for n in TXT_LENS:
    r = jnp.asarray(data[f'r_{n}'])
    out = forward(model, x, t, r, cond_of(data, n))
    np.testing.assert_allclose(np.asarray(out), nhwc(data[f'out_r_{n}']), atol=1e-4,
                               rtol=0)
    base = forward(model, x, t, t, cond_of(data, n))
    assert float(jnp.abs(out - base).mean(axis=(1, 2, 3)).min()) > 1e-2


def test_base_checkpoint_gets_small_r_embedder():
  folder, data = fixture('sd3_medium')
  model = dlib.load_model(folder, seed=3)
  te2 = model.time_text_embed_2
  k = np.asarray(te2.timestep_embedder.linear_1.kernel[...])
  assert 0.015 < k.std() < 0.025  # N(0, 0.02^2) as the official init
  np.testing.assert_array_equal(np.asarray(te2.text_embedder.linear_2.bias[...]), 0.0)
  x, t = nhwc(data['latents']), jnp.asarray(data['t'])
  cond = cond_of(data, 7)
  base = forward(model, x, t, t, cond)
  np.testing.assert_allclose(np.asarray(base), nhwc(data['out_7']), atol=1e-4, rtol=0)
  # r != t changes the output; scaling the r-embedder does nothing at r = t.
  moved = forward(model, x, t, 0.5 * t, cond)
  assert float(jnp.abs(moved - base).mean()) > 1e-4
  nnx.update(te2, jax.tree.map(lambda a: 3.0 * a + 0.1, nnx.state(te2, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(forward(model, x, t, t, cond)),
                                np.asarray(base))
  # Without the r-embedder: same base output, r ignored.
  plain = dlib.load_model(folder, {'r_embedder': False})
  assert plain.time_text_embed_2 is None
  np.testing.assert_array_equal(np.asarray(forward(plain, x, t, 0.5 * t, cond)),
                                np.asarray(base))


def test_sharded_forward_equals_single_device():
  folder, data = fixture('sd35_medium')
  single = dlib.load_model(folder)
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = dlib.load_model(folder, mesh=mesh)
  k = sharded.transformer_blocks[0].ff.fc1.kernel[...]
  assert k.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  q = sharded.transformer_blocks[0].attn.to_q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
  x = nhwc(data['latents'])[:2]
  t = jnp.asarray(data['t'])[:2]
  cond = {k: v[:2] for k, v in cond_of(data, 11).items()}
  want = forward(single, x, t, 0.5 * t, cond)
  with jax.set_mesh(mesh):
    got = forward(sharded, x, t, 0.5 * t, cond)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_config_from_folder_and_errors(tmp_path):
  folder, _ = fixture('sd35_medium')
  cfg = sd3.resolve_sd3_config({'name': 'sd3', 'pretrained': folder, 'dtype': 'bfloat16'})
  assert (cfg.num_layers, cfg.qk_norm, cfg.dual_attention_layers) == (3, 'rms_norm', (0, 1))
  model = create_model({'name': 'sd3', 'pretrained': folder, 'remat': 'full',
                        'dtype': 'bfloat16'}, rngs=nnx.Rngs(0))
  assert model.transformer_blocks[0].attn2 is not None
  assert model.transformer_blocks[2].attn2 is None
  assert model.transformer_blocks[2].ff_context is None  # context pre-only
  assert model.transformer_blocks[2].attn.to_add_out is None
  with pytest.raises(ValueError, match='caption_projection_dim'):
    sd3.resolve_sd3_config({'name': 'sd3', 'caption_projection_dim': 7})
  with pytest.raises(ValueError, match='qk_norm'):
    sd3.resolve_sd3_config({'name': 'sd3', 'qk_norm': 'layer_norm'})
  with pytest.raises(ValueError, match='dual_attention_layers'):
    sd3.resolve_sd3_config({'name': 'sd3', 'num_layers': 2, 'dual_attention_layers': [3]})
  with pytest.raises(ValueError, match='unknown model config field'):
    sd3.resolve_sd3_config({'name': 'sd3', 'depth': 2})
  with pytest.raises(FileNotFoundError):
    sd3.resolve_sd3_config({'name': 'sd3', 'pretrained': str(tmp_path)})
  assert flops_per_forward({'name': 'sd3', 'pretrained': folder}, 2, (8, 12),
                           txt_len=7) > 0
