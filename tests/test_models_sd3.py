"""SD3 / SD3.5 transformer: parity with diffusers, TwinFlow r-embedder, sharding.

Fixtures tests/fixtures/sd3_medium, sd35_medium (MMDiT-X dual attention, qk RMS-norm,
bfloat16 weights) and sd35_large (qk RMS-norm, the official TwinFlow wrapper with
time_text_embed_2, sharded files) come from tools/make_pretrained_fixture.py (diffusers
0.42.1 forward in float32); torch is not needed here. Each distinct input shape costs a
compile, so the tests share shapes.
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
forward = nnx.jit(lambda model, x, t, r, cond: model(x, t, r, cond))


def fixture(variant):
  folder = os.path.join(FIXTURES, variant)
  with np.load(os.path.join(folder, 'reference.npz')) as z:
    data = {k: z[k] for k in z.files}
  return folder, data


def nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def inputs(data, n, rows=None):
  """(x NHWC, t, cond) of text length n, optionally re-indexed rows."""
  rows = slice(None) if rows is None else rows
  cond = {'txt': jnp.asarray(data[f'txt_{n}'][rows]),
          'pooled': jnp.asarray(data['pooled'][rows])}
  return nhwc(data['latents'])[rows], jnp.asarray(data['t'][rows]), cond


# (variant, text lengths, batch rows): sd35_medium runs on 4 rows (row 0 twice) so that
# the sharded test reuses its compile and the batch splits over data x fsdp.
CASES = [('sd3_medium', (7, 11), None), ('sd35_medium', (11,), [0, 1, 2, 0]),
         ('sd35_large', (7,), None)]


@pytest.mark.parametrize('variant,lens,rows', CASES)
def test_matches_diffusers(variant, lens, rows):
  folder, data = fixture(variant)
  model = dlib.load_model(folder)
  assert model.time_text_embed_2 is not None  # the r-embedder is always there
  for n in lens:
    x, t, cond = inputs(data, n, rows)
    out = np.asarray(forward(model, x, t, t, cond))
    want = nhwc(data[f'out_{n}'])
    assert np.abs(want).max() > 1.0 and out.dtype == np.float32
    np.testing.assert_allclose(out[:3], want, atol=1e-4, rtol=0)
    if f'out_r_{n}' in data:  # official SD3Transformer2DModelWrapper with target_timestep
      out_r = np.asarray(forward(model, x, t, jnp.asarray(data[f'r_{n}']), cond))
      np.testing.assert_allclose(out_r, nhwc(data[f'out_r_{n}']), atol=1e-4, rtol=0)
      assert np.abs(out_r - out).mean(axis=(1, 2, 3)).min() > 1e-2


def test_base_checkpoint_gets_small_r_embedder():
  folder, data = fixture('sd3_medium')
  model = dlib.load_model(folder, seed=3)
  te2 = model.time_text_embed_2
  k = np.asarray(te2.timestep_embedder.linear_1.kernel[...])
  assert 0.015 < k.std() < 0.025  # N(0, 0.02^2) as the official init
  np.testing.assert_array_equal(np.asarray(te2.text_embedder.linear_2.bias[...]), 0.0)
  x, t, cond = inputs(data, 7)
  base = forward(model, x, t, t, cond)
  np.testing.assert_allclose(np.asarray(base), nhwc(data['out_7']), atol=1e-4, rtol=0)
  # r != t changes the output; at r = t the r-embedder's weights do not matter at all.
  assert float(jnp.abs(forward(model, x, t, 0.5 * t, cond) - base).mean()) > 1e-4
  nnx.update(te2, jax.tree.map(lambda a: 3.0 * a + 0.1, nnx.state(te2, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(forward(model, x, t, t, cond)),
                                np.asarray(base))
  # Without the r-embedder the time embedding is the base one whatever r is.
  plain = dlib.load_model(folder, {'r_embedder': False})
  assert plain.time_text_embed_2 is None
  np.testing.assert_array_equal(
      np.asarray(plain.time_embedding(t, 0.5 * t, cond['pooled'])),
      np.asarray(model.time_text_embed(1000.0 * t, cond['pooled'])))


def test_bf16_compute_with_remat_and_grad():
  folder, data = fixture('sd3_medium')
  model = dlib.load_model(folder, {'dtype': 'bfloat16', 'remat': 'full'})
  x, t, cond = inputs(data, 7)
  want = nhwc(data['out_7'])

  def loss(m):
    out = m(x, t, 0.5 * t, cond)
    return jnp.mean(jnp.square(out)), out

  grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(model)
  out = np.asarray(out)
  assert out.dtype == np.float32
  # bfloat16 activations: about 1% of the output scale (r != t adds the small r-term).
  assert np.abs(out - want).max() < 0.05 * np.abs(want).max()
  g = grads.time_text_embed_2.timestep_embedder.linear_1.kernel[...]
  assert g.dtype == jnp.float32 and float(jnp.abs(g).max()) > 0  # r-embedder trains


def test_sharded_forward_equals_single_device():
  folder, data = fixture('sd35_medium')
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  sharded = dlib.load_model(folder, mesh=mesh)
  spec = jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert sharded.transformer_blocks[0].ff.fc1.kernel[...].sharding.spec == spec
  assert sharded.transformer_blocks[0].attn2.to_q.kernel[...].sharding.spec == spec
  x, t, cond = inputs(data, 11, [0, 1, 2, 0])
  want = forward(dlib.load_model(folder), x, t, t, cond)
  with jax.set_mesh(mesh):
    got = forward(sharded, x, t, t, cond)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)


def test_config_from_folder_and_errors(tmp_path):
  folder, _ = fixture('sd35_medium')
  cfg = sd3.resolve_sd3_config({'name': 'sd3', 'pretrained': folder, 'dtype': 'bfloat16'})
  assert (cfg.num_layers, cfg.qk_norm, cfg.dual_attention_layers) == (3, 'rms_norm', (0, 1))
  model = nnx.eval_shape(lambda: create_model(
      {'name': 'sd3', 'pretrained': folder, 'remat': 'full'}, rngs=nnx.Rngs(0)))
  blocks = model.transformer_blocks
  assert blocks[0].attn2 is not None and blocks[2].attn2 is None
  assert blocks[2].ff_context is None and blocks[2].attn.to_add_out is None  # pre-only
  assert blocks[2].norm1_context.proj.kernel.shape == (32, 64)  # (scale, shift)
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


def test_flops():
  folder, data = fixture('sd35_medium')
  cfg = sd3.resolve_sd3_config({'name': 'sd3', 'pretrained': folder})
  f7 = flops_per_forward({'name': 'sd3', 'pretrained': folder}, 2, (8, 12), txt_len=7)
  f8 = flops_per_forward({'name': 'sd3', 'pretrained': folder}, 2, (8, 12), txt_len=8)
  assert f8 > f7 > 0
  # SD3.5-large at 1024 px: 4096 image + 333 text tokens, width 2432, 38 blocks; per
  # token and block 12 d^2 multiply-adds (each stream has its own weights) + attention.
  large = dict(name='sd3', num_layers=38, num_attention_heads=38, attention_head_dim=64,
               caption_projection_dim=2432, pos_embed_max_size=192, qk_norm='rms_norm')
  n, d = 4096 + 333, 2432
  approx = 38 * (2 * 12 * d * d * n + 4 * n * n * d)
  assert abs(flops_per_forward(large, 1, 128, txt_len=333) / approx - 1) < 0.03
  assert cfg.dual_attention_layers == (0, 1)
