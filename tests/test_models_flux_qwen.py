"""Flux and Qwen-Image against diffusers: parity, twin time, masks, sharding.

Fixtures: tests/fixtures/{flux_dev,flux_schnell,qwen_image}_tiny, written by
tools/make_flux_qwen_fixture.py (diffusers forwards in float64).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from twinflow_jax.models import (MESH_AXES, create_model, flops_per_forward,
                                 load_pretrained)
from twinflow_jax.models.convert import diffusers as dlib
from twinflow_jax.models.convert.safetensors_io import (SafetensorsFolder,
                                                         TensorOut,
                                                         write_safetensors_folder)
from twinflow_jax.models.param_tree import flatten

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
ATOL = 1e-4


def config(fixture, **overrides):
  """Our model config dict of a fixture folder (as `load` builds it)."""
  return dlib.model_config_from_dir(os.path.join(FIXTURES, fixture), overrides)


def load(fixture, mesh=None, **overrides):
  """The fixture's diffusers folder through the loader framework."""
  return dlib.load_model(os.path.join(FIXTURES, fixture), overrides, mesh=mesh)


forward = nnx.jit(lambda model, x, t, r, cond: model(x, t, r, cond))


def reference(fixture):
  with np.load(os.path.join(FIXTURES, fixture, 'reference.npz')) as z:
    return {k: z[k] for k in z.files}


def cond_of(ref, keys=('txt', 'pooled', 'guidance', 'txt_mask')):
  return {k: jnp.asarray(ref[k]) for k in keys if k in ref}


@pytest.fixture(scope='module')
def flux_dev():
  return load('flux_dev_tiny')


@pytest.fixture(scope='module')
def qwen():
  return load('qwen_image_tiny')


def close(a, b, atol=ATOL):
  np.testing.assert_allclose(np.asarray(a), b, atol=atol, rtol=0)


def test_flux_dev_parity_guidance_and_twin_time(flux_dev):
  ref = reference('flux_dev_tiny')
  x, t, r = (jnp.asarray(ref[k]) for k in ('x', 't', 'r'))
  # The text mask is in cond but ignored by default (as the Flux pipeline):
  # the references were computed without it.
  cond = cond_of(ref)
  base = forward(flux_dev, x, t, t, cond)
  close(base, ref['out_base'])  # r = t: exactly the pretrained Flux
  close(forward(flux_dev, x, t, r, cond), ref['out_twin'])
  assert float(jnp.abs(base - ref['out_twin']).mean()) > 1e-2  # r matters
  # The guidance embedding matters; its default is config-driven.
  other = forward(flux_dev, x, t, t, dict(cond, guidance=cond['guidance'] + 1))
  assert float(jnp.abs(other - base).mean()) > 1e-3
  no_g = {k: v for k, v in cond.items() if k != 'guidance'}
  np.testing.assert_array_equal(
      flux_dev.time_embedding(t, r, no_g),
      flux_dev.time_embedding(t, r, dict(cond, guidance=jnp.full((2,), 3.5))))


def test_flux_schnell_parity():
  ref = reference('flux_schnell_tiny')
  model = load('flux_schnell_tiny')
  assert model.time_text_embed.guidance_embedder is None
  x, t, r = (jnp.asarray(ref[k]) for k in ('x', 't', 'r'))
  cond = cond_of(ref)
  close(forward(model, x, t, t, cond), ref['out_base'])
  close(forward(model, x, t, r, cond), ref['out_twin'])
  with pytest.raises(ValueError, match='guidance'):
    model(x, t, t, dict(cond, guidance=jnp.ones((2,))))


def test_qwen_image_parity_masks_and_twin_time(qwen):
  ref = reference('qwen_image_tiny')
  x, t, r = (jnp.asarray(ref[k]) for k in ('x', 't', 'r'))
  # A pooled vector (as in Flux/SD3 text records) is accepted and ignored.
  cond = dict(cond_of(ref), pooled=jnp.ones((2, 3)))
  base = forward(qwen, x, t, t, cond)
  close(base, ref['out_base'])
  close(forward(qwen, x, t, r, cond), ref['out_twin'])
  assert float(jnp.abs(base - ref['out_twin']).mean()) > 1e-2
  # Variable text length: sample 1's padding (large noise) under the mask
  # gives diffusers' output for its unpadded prompt, and so does our model
  # on the unpadded prompt.
  close(base[1:], ref['out_base_unpadded_1'])
  short = {'txt': cond['txt'][1:, :4]}
  close(forward(qwen, x[1:], t[1:], t[1:], short), ref['out_base_unpadded_1'])


@pytest.mark.parametrize('fixture', ['flux_dev_tiny', 'qwen_image_tiny'])
def test_r_equal_t_ignores_the_r_embedder(tmp_path, fixture):
  """temb(t, r = t) is exactly the base model's, whatever the r-embedder."""
  ref = reference(fixture)
  model = load(fixture)
  t, r = jnp.asarray(ref['t']), jnp.asarray(ref['r'])
  cond = cond_of(ref)
  emb = (lambda m, t, r: m.time_embedding(t, r, cond)) if 'flux' in fixture \
      else (lambda m, t, r: m.time_embedding(t, r))
  same = emb(model, t, t)
  twin = emb(model, t, r)
  # r_embedder=False (official LoRA configs) reads a base checkpoint.
  off = dlib.load_model(base_checkpoint(fixture, tmp_path),
                        {'r_embedder': False})
  assert off.time_text_embed_2 is None
  np.testing.assert_array_equal(emb(off, t, t), same)
  np.testing.assert_array_equal(emb(off, t, r), same)  # r ignored
  r_emb = model.time_text_embed_2
  nnx.update(r_emb, jax.tree.map(lambda a: 3.0 * a + 1.0,
                                 nnx.state(r_emb, nnx.Param)))
  np.testing.assert_array_equal(emb(model, t, t), same)
  assert float(jnp.abs(emb(model, t, r) - twin).mean()) > 1e-2


def test_bf16_with_remat():
  ref = reference('flux_schnell_tiny')
  x, t, r = (jnp.asarray(ref[k]) for k in ('x', 't', 'r'))
  model = load('flux_schnell_tiny', dtype='bfloat16', remat='full')
  out = forward(model, x, t, r, cond_of(ref))
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref['out_twin']).mean())
  assert err < 0.03 * float(np.abs(ref['out_twin']).mean()), err


@pytest.mark.parametrize('fixture', ['flux_schnell_tiny', 'qwen_image_tiny'])
def test_sharded_forward_equals_single_device(fixture):
  """(2, 2, 2) mesh = single device; rows 0-1 are the diffusers references
  (Flux with use_txt_mask=True: diffusers with the mask as attention_mask)."""
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 2, 2), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  ref = reference(fixture)
  over = {'use_txt_mask': True} if 'flux' in fixture else {}
  single = load(fixture, **over)
  b = 8
  x = jnp.tile(jnp.asarray(ref['x']), (4, 1, 1, 1))
  x = x * jnp.repeat(jnp.array([1.0, 0.9, 1.1, 0.8]), 2)[:, None, None, None]
  t = jnp.tile(jnp.asarray(ref['t']), 4) * jnp.repeat(
      jnp.array([1.0, 0.5, -0.7, 0.2]), 2)
  r = jnp.concatenate([jnp.asarray(ref['r']), t[2:] * jnp.linspace(0, 1, 6)])
  cond = {k: jnp.tile(v, (4,) + (1,) * (v.ndim - 1))
          for k, v in cond_of(ref).items()}
  want = forward(single, x, t, r, cond)
  close(want[:2], ref['out_masked' if 'flux' in fixture else 'out_twin'])
  sharded = load(fixture, mesh=mesh, **over)
  with jax.set_mesh(mesh):
    q = sharded.transformer_blocks[0].attn.to_q.kernel[...]
    assert q.sharding.spec == P('fsdp', 'tensor')
    args = jax.device_put((x, t, r, cond),
                          NamedSharding(mesh, P(('data', 'fsdp'))))
    got = forward(sharded, *args)
  assert float(jnp.abs(want[2:] - want[:2].repeat(3, 0)).mean()) > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5,
                             rtol=1e-5)


def params(model):
  return {p: np.asarray(v) for p, v in flatten(nnx.to_pure_dict(
      nnx.state(model, nnx.Param))).items()}


def tensors(folder):
  with SafetensorsFolder(folder) as src:
    return {k: src.read(k) for k in src.keys()}


@pytest.mark.parametrize('fixture', ['flux_dev_tiny', 'flux_schnell_tiny',
                                     'qwen_image_tiny'])
def test_export_round_trip(tmp_path, fixture):
  """diffusers folder -> model -> diffusers folder: same keys (incl. the
  r-embedder under time_text_embed_2.*), values and config."""
  folder = os.path.join(FIXTURES, fixture)
  model = load(fixture)
  out = str(tmp_path / 'out')
  names = dlib.export(model, out, max_shard_bytes=200_000)
  assert len(names) > 2  # shards + index + config.json
  src, got = tensors(folder), tensors(out)
  assert sorted(got) == sorted(src)
  assert any(k.startswith('time_text_embed_2.timestep_embedder.') for k in got)
  for k, v in src.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  want, have = dlib.read_config(folder), dlib.read_config(out)
  assert have['_class_name'] == want['_class_name']
  assert {k: v for k, v in have.items() if not k.startswith('_')} == {
      k: v for k, v in want.items() if not k.startswith('_')}
  again = params(dlib.load_model(out))
  for p, v in params(model).items():
    np.testing.assert_array_equal(again[p], v)


def base_checkpoint(fixture, tmp_path):
  """The fixture without time_text_embed_2.* (a released base model)."""
  base = str(tmp_path / 'base')
  src = tensors(os.path.join(FIXTURES, fixture))
  items = [TensorOut(k, v.shape, v.dtype, lambda v=v: v)
           for k, v in sorted(src.items())
           if not k.startswith('time_text_embed_2.')]
  write_safetensors_folder(base, items)
  shutil.copy(os.path.join(FIXTURES, fixture, 'config.json'), base)
  return base


@pytest.mark.parametrize('fixture', ['flux_schnell_tiny', 'qwen_image_tiny'])
def test_base_checkpoint_r_embedder_init(tmp_path, fixture):
  """A checkpoint without time_text_embed_2 (the released base model): 'copy'
  takes the checkpoint's time embedder (official Qwen-Image init), 'small'
  draws N(0, 0.02^2); filling an existing sharded model does the same."""
  base = base_checkpoint(fixture, tmp_path)
  model = dlib.load_model(base)
  got = params(model)
  for (name, layer, leaf), v in [
      (p[1:], v) for p, v in got.items() if p[0] == 'time_text_embed_2']:
    np.testing.assert_array_equal(v, got[('time_text_embed', name, layer,
                                          leaf)])
  small = params(dlib.load_model(base, {'r_embedder_init': 'small'}, seed=2))
  k = small[('time_text_embed_2', 'timestep_embedder', 'linear_1', 'kernel')]
  assert 0.015 < float(np.std(k)) < 0.025
  assert not small[('time_text_embed_2', 'timestep_embedder', 'linear_1',
                    'bias')].any()
  # The trainer's init_from route: load_pretrained into a sharded model.
  mesh = jax.make_mesh((1, 2, 1), MESH_AXES, devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  target = dlib.load_model(os.path.join(FIXTURES, fixture), mesh=mesh)
  load_pretrained(target, base)
  for p, v in params(target).items():
    np.testing.assert_array_equal(v, got[p], err_msg=str(p))


def test_flops():
  # 1024 px: 64x64 packed tokens (4096) + 512 text tokens, width 3072; per token
  # and block 12 d^2 multiply-adds (double: each stream its own q/k/v/out/MLP;
  # single: q/k/v + proj_mlp (4d) + proj_out (5d)) + attention 4 n^2 d.
  n, d = 4096 + 512, 3072
  per_block = 2 * 12 * d * d * n + 4 * n * n * d
  flux = flops_per_forward({'name': 'flux', 'guidance_embeds': True}, 1, 128,
                           txt_len=512)
  assert abs(flux / (57 * per_block) - 1) < 0.01
  qwen = flops_per_forward({'name': 'qwen_image'}, 1, 128, txt_len=512)
  assert abs(qwen / (60 * per_block) - 1) < 0.01
  tiny = {'name': 'qwen_image', 'pretrained': os.path.join(FIXTURES,
                                                           'qwen_image_tiny')}
  assert flops_per_forward(tiny, 2, (10, 12), txt_len=8) > flops_per_forward(
      tiny, 2, (10, 12), txt_len=7) > 0
  with pytest.raises(ValueError, match='even'):
    flops_per_forward({'name': 'flux'}, 1, (9, 12), txt_len=4)


def test_config_errors_name_the_field():
  qwen = config('qwen_image_tiny')
  cases = [
      (dict(qwen, zero_cond_t=True), 'zero_cond_t'),
      (dict(qwen, axes_dims_rope=[4, 6, 8]), 'axes_dims_rope'),
      (dict(qwen, out_channels=8), 'in_channels'),
      (dict(qwen, num_single_layers=1), 'num_single_layers'),  # Flux-only
      (dict(config('flux_dev_tiny'), in_channels=384, out_channels=64),
       'in_channels'),  # Flux.1-Fill
      (dict(config('flux_dev_tiny'), use_txt_mask=1), 'use_txt_mask'),
      (dict(config('flux_dev_tiny'), r_embedder='yes'), 'r_embedder'),
      (dict(config('flux_dev_tiny'), r_embedder_init='zero'),
       'r_embedder_init'),
  ]
  for cfg, field in cases:
    with pytest.raises(ValueError, match=field):
      create_model(cfg, rngs=nnx.Rngs(0))
