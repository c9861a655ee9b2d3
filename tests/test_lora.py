"""LoRA: PEFT-style adapters on the diffusers families, the trainer's frozen base, and the
official TwinFlow_LoRA loss (teacher and time input) pinned against a direct restatement.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from twinflow_jax import losses
from twinflow_jax.models import lora
from twinflow_jax.models.convert import diffusers as dlib
from twinflow_jax.models.layers import Dense

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
SD35M = os.path.join(FIXTURES, 'sd35_medium')   # dual attention (attn2), bf16
SD3M = os.path.join(FIXTURES, 'sd3_medium')     # float32
# sd35_lora_*.yaml lora_target_modules
SD35_TARGETS = ('timestep_embedder.linear_1,timestep_embedder.linear_2,attn.add_k_proj,'
                'attn.add_v_proj,attn.add_q_proj,attn.to_add_out,attn.to_k,attn.to_out.0,'
                'attn.to_q,attn.to_v')


def inputs(b=2, txt=24, pooled=16):
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (b, 8, 12, 4))
  t = jnp.array([0.3, 0.8][:b])
  c = {'txt': jax.random.normal(k[1], (b, 5, txt)), 'pooled': jax.random.normal(k[2], (b, pooled))}
  return x, t, c


def randomize_b(model, seed=1):
  """Non-zero B factors, so that every adapter changes the output."""
  for i, (_, m) in enumerate(nnx.iter_modules(model)):
    if isinstance(m, lora.LoRADense):
      m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(seed + i), m.lora_b.shape))


def test_targets_follow_peft_names_and_merge_exports(tmp_path):
  model = dlib.load_model(SD35M, {'r_embedder': False, 'param_dtype': 'float32'})
  x, t, c = inputs()
  base_out = model(x, t, t, c)
  spec = lora.LoRASpec(4, 8.0, lora.parse_targets(SD35_TARGETS))
  names = lora.wrap(model, spec, nnx.Rngs(0))
  # 'attn.to_q' adapts attn.to_q of every block but not the MMDiT-X attn2 (PEFT suffix rule);
  # the last (context-pre-only) block has no to_add_out.
  assert 'transformer_blocks.0.attn.to_q' in names
  assert not any('attn2' in n for n in names)
  assert 'time_text_embed.timestep_embedder.linear_1' in names
  assert len(names) == 8 + 8 + 7 + 2 and names == lora.adapted_layers(model)
  q = model.transformer_blocks[0].attn.to_q
  assert q.lora_a.shape == (32, 4) and q.lora_b.shape == (4, 32) and q.scale == 2.0
  assert float(jnp.std(q.lora_a[...])) == pytest.approx(1 / 4, rel=0.3)   # N(0, 1/r)
  np.testing.assert_array_equal(model(x, t, t, c), base_out)   # B = 0: exactly the base
  randomize_b(model)
  lora_out = model(x, t, t, c)
  assert float(jnp.abs(lora_out - base_out).max()) > 1e-3
  want_q = np.asarray(q.base_module.kernel[...] + 2.0 * q.lora_a[...] @ q.lora_b[...])
  lora.merge(model)
  assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
  np.testing.assert_allclose(model(x, t, t, c), lora_out, atol=2e-5)
  np.testing.assert_allclose(np.asarray(model.transformer_blocks[0].attn.to_q.kernel[...]),
                             want_q, atol=1e-6)
  dlib.export(model, str(tmp_path / 'merged'))
  again = dlib.load_model(str(tmp_path / 'merged'), {'r_embedder': False})
  np.testing.assert_allclose(again(x, t, t, c), lora_out, atol=2e-5)
  with pytest.raises(ValueError, match=r"\['attn.nope'\] match no projection"):
    lora.wrap(dlib.load_model(SD3M, {'r_embedder': False}),
              lora.LoRASpec(2, 2.0, ('attn.to_q', 'attn.nope')), nnx.Rngs(0))


# ----------------------------------------------------------------------------- official loss
# tests/fixtures/twinflow_lora_ref.npz (tools/make_twinflow_lora_fixture.py): the official
# TwinFlow_LoRA.training_step, float64, on a tiny MLP with PEFT adapters wrapped as the
# official LoRA trainers wrap their transformer, every draw recorded.
LORA_REF = os.path.join(FIXTURES, 'twinflow_lora_ref.npz')


class TinyNet(nnx.Module):
  """The fixture's network: concat(x_t, time, one_hot(c)) -> fc0 -> SiLU -> fc1 -> SiLU -> fc2.

  One time input, as the official LoRA runs (aux_time_embed false): r is not used.
  """

  def __init__(self, d, k, h, *, dtype, rngs):
    dense = lambda i, o: Dense(i, o, (None, None), dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.k = k
    self.fc0, self.fc1, self.fc2 = dense(d + 1 + k, h), dense(h, h), dense(h, d)

  def __call__(self, x_t, t, r, c):
    del r
    h = jnp.concatenate([x_t, t[:, None].astype(x_t.dtype),
                         jax.nn.one_hot(c, self.k, dtype=x_t.dtype)], axis=-1)
    return self.fc2(jax.nn.silu(self.fc1(jax.nn.silu(self.fc0(h)))))


def official_lora_net(d, meta, dtype=jnp.float64):
  """TinyNet with the fixture's base weights and fresh adapters (float64: under x64)."""
  with nnx.use_eager_sharding(False):   # no mesh: unsharded, as models.create_model
    model = TinyNet(meta['D'], meta['K'], meta['H'], dtype=dtype, rngs=nnx.Rngs(0))
    for name in meta['targets']:
      setattr(model, name, lora.LoRADense(getattr(model, name), meta['rank'], meta['alpha'],
                                          rngs=nnx.Rngs(1)))
  for name in ('fc0', 'fc1', 'fc2'):   # torch Linear: weight [out, in]
    layer = getattr(model, name)
    layer = getattr(layer, 'base_module', layer)
    layer.kernel.set_value(jnp.asarray(d[f'base/{name}.weight'].T, dtype))
    layer.bias.set_value(jnp.asarray(d[f'base/{name}.bias'], dtype))
  return model


def shipped_config(name, variant):
  """configs/<name>'s get_config(variant) (test_lora_configs.load_config, without its
  heavy imports)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def adapter_tree(d, prefix, targets, dtype=None):
  """{'fc0': {'lora_a': A.T, 'lora_b': B.T}, ...} from the fixture's PEFT layout."""
  return {n: {'lora_a': jnp.asarray(d[f'{prefix}/{n}.lora_A'].T, dtype),
              'lora_b': jnp.asarray(d[f'{prefix}/{n}.lora_B'].T, dtype)} for n in targets}


# test case -> the fixture runs it holds as row blocks (b10a, b10b: two GPUs of one step).
LORA_CASES = {'q1': ('q1',), 's2': ('s2',), 'b7': ('b7',), 'b6': ('b6',), 'n0': ('n0',),
              'b10x2': ('b10a', 'b10b')}


@pytest.mark.parametrize('case', list(LORA_CASES))
def test_lora_loss_matches_official_twinflow_lora(case):
  """The trainer's LoRA loss path = official TwinFlow_LoRA.training_step, float64.

  Cases (tools/make_twinflow_lora_fixture.py): q1 = qwenimage_lora_1order.yaml (teacher:
  the base with adapters disabled, RCGM chain online, N = 1, enr = 4); s2 =
  sd35_lora_2order.yaml (teacher: the 'old' adapter after its EMA update, second step);
  b7 = B 7 (adv cut to 1 row), emd 0 (the online model teaches); b6 = B 6 (half-to-even
  groups, no adv rows), first EMA step, enr 0; n0 = N 0; b10x2 = two official B = 10 runs
  (groups 2|2|2|2 and 'one' 2|, third EMA step) as row_blocks = 2, i.e. a 2-GPU step.
  Every network call sees the single time t - r / 2. Run through what the trainer runs:
  the shipped LoRA config's loss section (config.tf_config), LoRADense adapters split
  into (adapters, base), make_apply_fn of config.lora.time_input, teacher_update on the
  adapters, twinflow_loss with the base as a constant.
  """
  from twinflow_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top
  d = np.load(LORA_REF)
  meta = json.loads(str(d['config']))
  runs = LORA_CASES[case]
  cm = meta['cases'][runs[0]]
  assert all(meta['cases'][run] == cm for run in runs)
  emd = cm['ema_decay_rate']
  c = shipped_config('qwen_image_twinflow_lora.py', '1order' if emd == 1.0 else '2order')
  settings = lambda: (c.loss.estimate_order, c.loss.enhanced_ratio, c.loss.ema_decay)
  want = (cm['estimate_order'], cm['enhanced_ratio'], emd)
  if case in ('q1', 's2'):   # the official yaml settings: the shipped configs hold them
    assert settings() == want
  c.loss.estimate_order, c.loss.enhanced_ratio, c.loss.ema_decay = want
  c.loss.row_blocks = len(runs)
  common = meta['common']
  assert (c.loss.consistency_ratio, c.loss.rect_coef, c.loss.metric, c.loss.barron_alpha,
          list(c.loss.enhanced_range), list(c.loss.time_dist), c.loss.one_group,
          c.lora.time_input) == (
              common['consistc_ratio'], common['dist_match_cof'], 'barron',
              common['loss_func_type']['alpha'], common['enhanced_range'],
              common['time_dist_ctrl'], True, 't_minus_half_r')
  tf_config = config_lib.tf_config(c)
  cat = lambda k: jnp.asarray(np.concatenate([d[f'{run}/{k}'] for run in runs]))
  mean = lambda k: np.mean([d[f'{run}/{k}'] for run in runs], axis=0)   # DDP: the mean
  b = len(cat('labels'))
  _, _, sizes = losses.block_layout(b, tf_config)   # the official masks, 'one' included
  assert sizes + (b // len(runs) - sum(sizes),) == tuple(d[f'{runs[0]}/sizes']), sizes
  with jax.enable_x64(True):
    model = official_lora_net(d, meta)
    graphdef, adapters, base = nnx.split(model, lora.TRAINABLE, lora.FROZEN)
    adapters, base = nnx.to_pure_dict(adapters), nnx.to_pure_dict(base)
    online = adapter_tree(d, 'default', meta['targets'])
    assert jax.tree.structure(online) == jax.tree.structure(adapters)
    # The TrainState's EMA: zero factors at the start (init_state: the base, official
    # mod_original); the official 'old' adapter when the EMA is running.
    if emd in (0.0, 1.0):
      ema = jax.tree.map(jnp.zeros_like, online)
    else:
      ema = adapter_tree(d, 'old', meta['targets'])
    teacher, new_cmd = losses.teacher_update(ema, online, float(d[f'{runs[0]}/cmd_before']),
                                             emd)
    np.testing.assert_allclose(float(new_cmd), float(d[f'{runs[0]}/cmd_after']), rtol=1e-15)
    if 0 < emd < 1:   # official update_ema_lora on the 'old' adapter
      for run in runs:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-15),
                     teacher, adapter_tree(d, f'{run}/old_after', meta['targets']))
    draws = losses.TwinFlowDraws(
        t=cat('draw/t0'), u_any=cat('draw/u_tt'), u_mul=cat('draw/u_tmin'),
        z_fake=cat('draw/z_adv'), z=cat('draw/z'), z_rect=cat('draw/z_dm'),
        s_rect=cat('draw/t_dm'))
    apply_fn = lora_train.make_apply_fn(graphdef, c.lora.time_input)

    def loss_fn(p, teacher_p):   # as train.step: the base is a constant of the step
      apply = lambda q, *args: apply_fn((q, base), *args)
      return losses.twinflow_loss(apply, p, teacher_p, cat('x'), cat('labels'),
                                  cat('uncond_labels'), draws, tf_config)[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = step(online, teacher)
    assert loss.dtype == jnp.float64
    ref = float(mean('loss'))
    assert abs(float(loss) - ref) <= 1e-10 * abs(ref), (float(loss), ref)
    for name in meta['targets']:
      for ours, theirs in (('lora_a', 'lora_A'), ('lora_b', 'lora_B')):
        want = mean(f'grad/{name}.{theirs}').T
        got = np.asarray(grads[name][ours])
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), (name, ours)
    # The fixture tells the teachers apart: the official loss with the online model as
    # teacher (mod_original / mod_ema replaced) is ours with the online adapters as teacher.
    wrong = float(mean('loss_online_teacher'))
    got_wrong, _ = step(online, online)
    assert abs(float(got_wrong) - wrong) <= 1e-10 * abs(wrong)
    if case in ('q1', 's2', 'n0', 'b10x2'):
      assert abs(wrong - ref) > 1e-3 * abs(ref)


def _q1_train_step(monkeypatch, **step_kwargs):
  """The trainer's LoRA step on the fixture's q1 case, with its recorded draws.

  Returns (train_step, state, batch, base, online adapters, fixture, meta); `tx` is SGD
  with rate 1, so new params = params - grads.
  """
  from twinflow_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  d = np.load(LORA_REF)
  meta = json.loads(str(d['config']))
  c = shipped_config('qwen_image_twinflow_lora.py', '1order')
  c.loss.row_blocks = 1
  for k, v in step_kwargs.pop('loss', {}).items():
    c.loss[k] = v
  tf_config = config_lib.tf_config(c)
  f32 = lambda k: jnp.asarray(d[f'q1/{k}'], jnp.float32)
  build = lambda rngs: official_lora_net(d, meta, jnp.float32)
  graphdef, _, base = nnx.split(build(None), lora.TRAINABLE, lora.FROZEN)
  tx = optax.sgd(1.0)
  state = lora_train.init_state(build, tx, jax.random.key(0),
                                step_kwargs.get('eval_ema_decays', ()))
  assert all(not np.any(a) for a in jax.tree.leaves(state.ema))
  online = adapter_tree(d, 'default', meta['targets'], jnp.float32)
  state = state.replace(params=online)
  draws = losses.TwinFlowDraws(
      t=f32('draw/t0'), u_any=f32('draw/u_tt'), u_mul=f32('draw/u_tmin'),
      z_fake=f32('draw/z_adv'), z=f32('draw/z'), z_rect=f32('draw/z_dm'), s_rect=f32('draw/t_dm'))
  monkeypatch.setattr(step_lib.losses, 'sample_draws', lambda *args, **kwargs: draws)
  train_step = step_lib.make_train_step(
      lora_train.make_apply_fn(graphdef, c.lora.time_input), tf_config, tx,
      optax.constant_schedule(1.0), num_classes=meta['K'] - 1, uncond='null', **step_kwargs)
  batch = {'x': f32('x'), 'label': jnp.asarray(d['q1/labels'], jnp.int32)}
  return jax.jit(train_step), state, batch, nnx.to_pure_dict(base), online, d, meta


def test_lora_train_step_runs_the_official_loss(monkeypatch):
  """The trainer's step on the fixture's q1 (qwenimage_lora_1order: the base teaches), float32.

  `make_train_step` as the loop builds it for LoRA (adapters in the TrainState of
  `init_state`, whose EMA slot starts at zero factors = the base, the base as the step's
  third argument, conditions from the labels with train.uncond 'null' = the fixture's e),
  with the recorded draws in place of `sample_draws`: the official loss and gradients to
  float32 precision, and the frozen-base teacher stays the base.
  """
  train_step, state, batch, base, online, d, meta = _q1_train_step(monkeypatch)
  assert np.all(d['q1/uncond_labels'] == meta['K'] - 1)   # the null class
  new_state, metrics = train_step(state, batch, base)
  assert int(metrics['skip_reason']) == 0
  np.testing.assert_allclose(float(metrics['loss']), float(d['q1/loss']), rtol=1e-5)
  for name in meta['targets']:
    for ours, theirs in (('lora_a', 'lora_A'), ('lora_b', 'lora_B')):
      want = d[f'q1/grad/{name}.{theirs}'].T
      got = np.asarray(online[name][ours] - new_state.params[name][ours])
      assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (name, ours)
  assert all(not np.any(a) for a in jax.tree.leaves(new_state.ema))   # still the base


def test_lora_autoguidance_runs_the_guide_on_the_frozen_base(monkeypatch):
  """train.guide_from with LoRA: the guide is an evaluation EMA of the adapters, applied on
  the frozen base like the teacher. A guide equal to the teacher (zero factors = the base)
  cancels the guidance (the enhanced_ratio = 0 loss); the trained adapters as the guide do
  not."""
  loss_of = {}
  for name, kw in (('off', {'loss': {'enhanced_ratio': 0.0}}),
                   ('auto', {'eval_ema_decays': (0.9,), 'guide_from': 'ema_0p9'})):
    train_step, state, batch, base, online, _, _ = _q1_train_step(monkeypatch, **kw)
    if name == 'auto':
      assert state.eval_emas['ema_0p9'].keys() == online.keys()
      as_teacher = state.replace(eval_emas={'ema_0p9': jax.tree.map(jnp.zeros_like, online)})
      _, m = train_step(as_teacher, batch, base)
      loss_of['auto_teacher'] = float(m['loss'])
      as_online = state.replace(eval_emas={'ema_0p9': online})
      _, m = train_step(as_online, batch, base)
      loss_of['auto_online'] = float(m['loss'])
    else:
      loss_of[name] = float(train_step(state, batch, base)[1]['loss'])
  assert loss_of['auto_teacher'] == pytest.approx(loss_of['off'], rel=1e-6)
  assert abs(loss_of['auto_online'] - loss_of['off']) > 1e-4 * abs(loss_of['off'])


def test_frozen_base_is_sharded_like_the_full_model_and_holds_no_optimizer_state(tmp_path):
  import test_lora_configs as cfgs  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.param_tree import flatten  # pylint: disable=g-import-not-at-top

  def setup_of(variant):
    (tmp_path / variant).mkdir()
    c = cfgs.tiny(cfgs.load_config('sd35_twinflow.py', variant), SD35M, tmp_path / variant,
                  (8, 12, 4), 16, cut=False)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    if variant == 'full':
      c.model.r_embedder = False
    return loop.build(c)

  full, lo = setup_of('full'), setup_of('lora')
  spec = lambda s: s.spec
  full_specs = {tuple(map(str, p)): spec(s) for p, s in flatten(full.shardings.params).items()}
  base_specs = {tuple(str(k) for k in p if str(k) != 'base_module'): spec(s)
                for p, s in flatten(lo.frozen_shardings).items()}
  assert base_specs == full_specs   # every base weight, sharded as in a full fine-tune
  assert any(s != jax.sharding.PartitionSpec() for s in base_specs.values())
  # TrainState: adapters only (params, EMA, optimizer moments).
  names = ['/'.join(map(str, p)) for p in flatten(lo.abstract_state.params)]
  assert names and all(n.endswith(('lora_a', 'lora_b')) for n in names)
  opt = [a.shape for a in jax.tree.leaves(lo.abstract_state.opt_state) if a.ndim]
  lora_shapes = [a.shape for a in jax.tree.leaves(lo.abstract_state.params)]
  assert sorted(opt) == sorted(lora_shapes * 2)   # Adam mu and nu of the factors
  assert jax.tree.structure(lo.abstract_state.ema) == jax.tree.structure(
      lo.abstract_state.params)
