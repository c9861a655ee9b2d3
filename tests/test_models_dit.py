"""DiT: config validation, adaLN-Zero init, twin-time behaviour, options.

Runtime about 25 s on 2 CPU cores (mostly XLA compiles of a tiny DiT).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.models import (as_apply_fn, create_model, drop_labels,
                                 resolve_config, split_model)

TINY = dict(name='DiT-S/2', depth=2, hidden_size=32, num_heads=4,
            input_size=8, in_channels=3, num_classes=5)

# Jitted calls: eager op-by-op dispatch compiles every op on CPU.
forward = nnx.jit(lambda model, x, t, r, cond: model(x, t, r, cond))


def randomize(model, seed=0):
  """Replaces every parameter with noise so no output is trivially zero."""
  # numpy noise: no XLA compile per parameter shape.
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(
      lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
      state))
  return model


def inputs(b=4, c=3, s=8, seed=1):
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (b, s, s, c))
  t = jax.random.uniform(kt, (b,), minval=0.05, maxval=1.0)
  y = jnp.arange(b, dtype=jnp.int32) % 6  # includes the null class 5
  return x, t, y


@pytest.fixture(scope='module')
def random_model():
  return randomize(create_model(TINY, rngs=nnx.Rngs(0)))


def test_named_sizes():
  for name, (depth, hidden, heads) in {'DiT-S/2': (12, 384, 6),
                                       'DiT-B/4': (12, 768, 12),
                                       'DiT-L/8': (24, 1024, 16),
                                       'DiT-XL/2': (28, 1152, 16)}.items():
    cfg = resolve_config({'name': name})
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (depth, hidden,
                                                           heads)
    assert cfg.patch_size == int(name[-1])


@pytest.mark.parametrize('override, field', [
    ({'name': 'DiT-M/2'}, 'name'),
    ({'name': 'DiT-S/3'}, 'name'),
    ({'dtype': 'int8'}, 'dtype'),
    ({'remat': 'sometimes'}, 'remat'),
    ({'r_embedder_init': 'zeros'}, 'r_embedder_init'),
    ({'time_convention': 'ddpm'}, 'time_convention'),
    ({'attention': 'flash9'}, 'attention'),
    ({'input_size': 9}, 'input_size'),
    ({'num_heads': 5}, 'hidden_size'),
    ({'num_classes': 0}, 'num_classes'),
    ({'scan_blocks': 1}, 'scan_blocks'),
    ({'colour': 'red'}, 'colour'),
])
def test_bad_config_names_the_field(override, field):
  with pytest.raises(ValueError, match=field):
    create_model(dict(TINY, **override), rngs=nnx.Rngs(0))


def test_adaln_zero_outputs_zero_at_init():
  model = create_model(TINY, rngs=nnx.Rngs(0))
  x, t, y = inputs()
  out = forward(model, x, t, 0.5 * t, y)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_signed_time_and_r_embedder(random_model):
  model = random_model
  x, t, y = inputs()
  f_pos = forward(model, x, t, t, y)
  f_neg = forward(model, x, -t, -t, y)
  # Negative time is the fake trajectory: a different embedding and output,
  # on every row.
  assert float(jnp.abs(f_pos - f_neg).mean(axis=(1, 2, 3)).min()) > 1e-3
  # r != t changes the output through the r-embedder.
  assert float(jnp.abs(forward(model, x, t, 0.3 * t, y) - f_pos).mean()) > 1e-3
  # r == t: the r-embedder contributes nothing, whatever its weights.
  model = nnx.clone(random_model)
  r_emb = model.time_embedder.r_embedder
  nnx.update(r_emb, jax.tree.map(lambda a: a + 7.0,
                                 nnx.state(r_emb, nnx.Param)))
  np.testing.assert_array_equal(np.asarray(forward(model, x, t, t, y)),
                                np.asarray(f_pos))
  np.testing.assert_array_equal(np.asarray(forward(model, x, -t, -t, y)),
                                np.asarray(f_neg))
  assert float(jnp.abs(forward(model, x, t, 0.3 * t, y) - f_pos).mean()) > 1


def test_r_embedder_init_options():
  model = create_model(dict(TINY, r_embedder_init='copy'), rngs=nnx.Rngs(0))
  te = nnx.to_pure_dict(nnx.state(model.time_embedder.t_embedder, nnx.Param))
  re_ = nnx.to_pure_dict(nnx.state(model.time_embedder.r_embedder, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, te, re_)
  small = create_model(dict(TINY, r_embedder_init='small'), rngs=nnx.Rngs(0))
  k = small.time_embedder.r_embedder.fc1.kernel[...]
  assert 0.015 < float(jnp.std(k)) < 0.025  # N(0, 0.02^2)
  assert not np.allclose(k, small.time_embedder.t_embedder.fc1.kernel[...])


def test_labels_null_class_and_dropout(random_model):
  assert random_model.y_embedder.embedding.shape == (6, 32)  # classes + null
  x, t, _ = inputs()
  a = forward(random_model, x, t, t, jnp.full((4,), 2, jnp.int32))
  b = forward(random_model, x, t, t, jnp.full((4,), 5, jnp.int32))
  assert float(jnp.abs(a - b).mean()) > 1e-3
  labels = jnp.arange(1000) % 5
  dropped = drop_labels(labels, jax.random.key(0), 0.1, 5)
  assert 0.06 < float(jnp.mean(dropped == 5)) < 0.14
  kept = np.asarray(dropped != 5)
  np.testing.assert_array_equal(np.asarray(dropped)[kept],
                                np.asarray(labels)[kept])
  with pytest.raises(ValueError, match='prob'):
    drop_labels(labels, jax.random.key(0), 1.5, 5)


def test_apply_fn_adapter_matches_module_and_differentiates(random_model):
  graphdef, params, rest = split_model(random_model)
  apply_fn = jax.jit(as_apply_fn(graphdef, rest))
  x, t, y = inputs()
  r = 0.5 * t
  out = apply_fn(params, x, t, r, y)
  np.testing.assert_allclose(out, forward(random_model, x, t, r, y),
                             atol=1e-6)
  # A pure dict of params works too.
  np.testing.assert_allclose(apply_fn(nnx.to_pure_dict(params), x, t, r, y),
                             out, atol=1e-6)
  grads = jax.jit(jax.grad(
      lambda p: jnp.mean(as_apply_fn(graphdef, rest)(p, x, t, r, y)**2)))(
          params)
  g = grads['blocks'][0]['mlp']['fc1']['kernel'][...]
  assert float(jnp.abs(g).sum()) > 0


def test_bad_inputs_raise(random_model):
  x, t, y = inputs()
  with pytest.raises(ValueError, match='x_t'):
    random_model(x[..., :2], t, t, y)
  with pytest.raises(ValueError, match='shape'):
    random_model(x, t[:2], t, y)


def test_bfloat16_compute_and_remat(random_model):
  params = nnx.state(random_model, nnx.Param)
  x, t, y = inputs()
  ref = forward(random_model, x, t, 0.5 * t, y)
  bf16 = create_model(dict(TINY, dtype='bfloat16'), rngs=nnx.Rngs(1))
  nnx.update(bf16, params)
  assert bf16.blocks[0].mlp.fc1.kernel[...].dtype == jnp.float32
  out = forward(bf16, x, t, 0.5 * t, y)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).mean())
  assert err < 0.02 * float(jnp.abs(ref).mean())  # bf16 rounding only
  assert not np.array_equal(np.asarray(out), np.asarray(ref))

  def loss(m):
    return jnp.mean(m(x, t, 0.5 * t, y)**2)

  grad = nnx.jit(nnx.grad(loss))
  remat = create_model(dict(TINY, remat='dots'), rngs=nnx.Rngs(1))
  nnx.update(remat, params)
  g, g_ref = grad(remat), grad(random_model)
  np.testing.assert_allclose(g['blocks'][0]['qkv']['proj']['kernel'][...],
                             g_ref['blocks'][0]['qkv']['proj']['kernel'][...],
                             atol=1e-6)


@pytest.mark.parametrize('remat', ['none', 'dots'])
def test_scan_blocks_is_the_same_function(random_model, remat):
  # One lax.scan over the stacked block weights = the unrolled loop, values
  # and gradients; the parameter tree (checkpoints, sharding) is unchanged.
  params = nnx.state(random_model, nnx.Param)
  scanned = create_model(dict(TINY, depth=2, scan_blocks=True, remat=remat),
                         rngs=nnx.Rngs(1))
  assert jax.tree.structure(nnx.state(scanned, nnx.Param)) == \
      jax.tree.structure(params)
  nnx.update(scanned, params)
  x, t, y = inputs()
  np.testing.assert_allclose(forward(scanned, x, t, 0.5 * t, y),
                             forward(random_model, x, t, 0.5 * t, y),
                             atol=1e-5)

  def loss(m):
    return jnp.mean(m(x, t, 0.5 * t, y)**2)

  grad = nnx.jit(nnx.grad(loss))
  g, g_ref = grad(scanned), grad(random_model)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert float(jnp.abs(g['blocks'][1]['mlp']['fc2']['kernel'][...]).sum()) > 0


@pytest.mark.parametrize('scan', [False, True])
def test_residual_grad_boundary_is_exact_and_in_the_backward(random_model,
                                                              monkeypatch,
                                                              scan):
  # On CPU each block's input materialises the residual stream's gradient
  # (one conditional per block in the compiled backward); values and gradients
  # are bit for bit those without it.
  from twinflow_jax.models import dit
  params = nnx.state(random_model, nnx.Param)
  model = create_model(dict(TINY, scan_blocks=scan), rngs=nnx.Rngs(1))
  nnx.update(model, params)
  x, t, y = inputs()
  graphdef, p, rest = split_model(model)
  loss = lambda p: jnp.mean(as_apply_fn(graphdef, rest)(p, x, t, 0.5 * t, y)**2)
  compile_grad = lambda: jax.jit(jax.grad(loss)).lower(p).compile()  # traces anew
  with_boundary = compile_grad()
  monkeypatch.setattr(dit, 'residual_grad_boundary', lambda h: h)
  without = compile_grad()
  count = lambda c: c.as_text().count(' conditional(')
  assert count(with_boundary) - count(without) == (1 if scan else TINY['depth'])
  for a, b in zip(jax.tree.leaves(with_boundary(p)), jax.tree.leaves(without(p))):
    np.testing.assert_array_equal(a, b)


def test_residual_grad_boundary_keeps_a_nan_gradient_non_finite():
  from twinflow_jax.models.layers import residual_grad_boundary
  f = lambda x, w: jnp.sum(w * residual_grad_boundary(x))
  x = jnp.ones((2, 3))
  g = jax.jit(jax.grad(f))(x, jnp.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(g, np.arange(6.0).reshape(2, 3))
  g = jax.jit(jax.grad(f))(x, jnp.full((2, 3), jnp.nan).at[1, 1].set(1.0))
  assert not np.isfinite(np.asarray(g)).any()


def test_non_square_and_other_sizes(random_model):
  # Positions are built for the actual token grid, e.g. 8 x 4 pixels.
  x = jax.random.normal(jax.random.key(0), (2, 8, 4, 3))
  t = jnp.array([0.3, 0.9])
  out = forward(random_model, x, t, t, jnp.array([0, 1], jnp.int32))
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_factory_builds_the_toy_mlp():
  model = create_model({'name': 'mlp', 'data_dim': 2, 'hidden': 16,
                        'depth': 1}, rngs=nnx.Rngs(0))
  x = jnp.ones((3, 2))
  t = jnp.array([0.2, 0.5, -0.5])
  assert model(x, t, t, None).shape == (3, 2)
  with pytest.raises(ValueError, match='width'):
    create_model({'name': 'mlp', 'data_dim': 2, 'width': 16},
                 rngs=nnx.Rngs(0))
