"""MMDiT: zero init, text mask, pooled vector, twin time, qk-norm.

Runtime about 15 s on 2 CPU cores.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.models import MMDiT, create_model, resolve_config

TINY = dict(name='MMDiT-S/2', depth=2, hidden_size=32, num_heads=4,
            input_size=8, in_channels=4, txt_dim=24, pooled_dim=16)

forward = nnx.jit(lambda model, x, t, r, cond: model(x, t, r, cond))


def randomize(model, seed=0):
  """Replaces every parameter with numpy noise (no compile per shape)."""
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.map(
      lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
      nnx.state(model, nnx.Param)))
  return model


def inputs(b=2, seed=1):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (b, 8, 8, 4))
  t = jax.random.uniform(ks[1], (b,), minval=0.1, maxval=1.0)
  mask = jnp.array([[True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
  cond = {'txt': jax.random.normal(ks[2], (b, 7, 24)), 'txt_mask': mask,
          'pooled': jax.random.normal(ks[3], (b, 16))}
  return x, t, cond


@pytest.fixture(scope='module')
def random_model():
  return randomize(create_model(TINY, rngs=nnx.Rngs(0)))


def test_names_and_structure():
  cfg = resolve_config({'name': 'MMDiT-d24/2'})  # SD3-medium sizes
  assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (24, 1536, 24)
  model = create_model(TINY, rngs=nnx.Rngs(0))
  assert isinstance(model, MMDiT)
  # SD3: the last block only gives text keys/values.
  assert model.blocks[-1].txt_mlp is None and model.blocks[0].txt_mlp
  assert model.blocks[0].img_qkv.q_norm is not None  # qk_norm default on
  with pytest.raises(ValueError, match='name'):
    resolve_config({'name': 'DiT-d24/2'})
  with pytest.raises(ValueError, match='txt_dim'):
    create_model(dict(TINY, txt_dim=0), rngs=nnx.Rngs(0))


def test_zero_at_init():
  model = create_model(TINY, rngs=nnx.Rngs(0))
  x, t, cond = inputs()
  out = forward(model, x, t, 0.5 * t, cond)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_text_mask_pooled_and_time(random_model):
  model = random_model
  x, t, cond = inputs()
  ref = forward(model, x, t, t, cond)
  # Padded text tokens (mask False) do not influence the image.
  noisy = dict(cond, txt=jnp.where(cond['txt_mask'][..., None], cond['txt'],
                                   100.0))
  np.testing.assert_allclose(forward(model, x, t, t, noisy), ref, atol=1e-5)
  # Real text tokens do.
  changed = dict(cond, txt=cond['txt'].at[:, 0].add(1.0))
  assert float(jnp.abs(forward(model, x, t, t, changed) - ref).mean()) > 1e-3
  # Without a mask every token counts.
  no_mask = {k: v for k, v in noisy.items() if k != 'txt_mask'}
  assert float(jnp.abs(forward(model, x, t, t, no_mask) - ref).mean()) > 1e-3
  # Pooled vector modulates.
  pooled = dict(cond, pooled=cond['pooled'] + 1.0)
  assert float(jnp.abs(forward(model, x, t, t, pooled) - ref).mean()) > 1e-3
  # Signed time and the r term.
  assert float(jnp.abs(forward(model, x, -t, -t, cond) - ref).mean()) > 1e-3
  assert float(jnp.abs(forward(model, x, t, 0.2 * t, cond) - ref).mean()
               ) > 1e-3
  clone = nnx.clone(model)
  r_emb = clone.time_embedder.r_embedder
  nnx.update(r_emb, jax.tree.map(lambda a: a * 3.0 + 1.0,
                                 nnx.state(r_emb, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(forward(clone, x, t, t, cond)),
                                np.asarray(ref))


def test_bad_cond_raises(random_model):
  x, t, cond = inputs()
  with pytest.raises(ValueError, match='pooled'):
    random_model(x, t, t, {'txt': cond['txt']})
  with pytest.raises(ValueError, match='txt'):
    random_model(x, t, t, dict(cond, txt=cond['txt'][..., :5]))
  with pytest.raises(ValueError, match='txt_mask'):
    random_model(x, t, t, dict(cond, txt_mask=cond['txt_mask'][:, :3]))


def test_without_qk_norm_and_bf16(random_model):
  x, t, cond = inputs()
  ref = forward(random_model, x, t, t, cond)
  model = create_model(dict(TINY, qk_norm=False, dtype='bfloat16',
                            remat='full'), rngs=nnx.Rngs(0))
  assert model.blocks[0].img_qkv.q_norm is None
  # Same weights minus the norm scales.
  state = nnx.to_pure_dict(nnx.state(random_model, nnx.Param))
  for blk in state['blocks'].values():
    for s in ('img_qkv', 'txt_qkv'):
      blk[s].pop('q_norm')
      blk[s].pop('k_norm')
  nnx.update(model, state)
  out = forward(model, x, t, t, cond)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.abs(out - ref).mean()) > 1e-3  # the qk-norm matters
