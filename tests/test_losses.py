"""The TwinFlow loss: exactness against the official code, and independent checks."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twinflow_jax import losses
from twinflow_jax.losses import TwinFlowConfig, TwinFlowDraws

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
LAYERS = (0, 2, 4)   # nn.Sequential indices of the fixture MLP's linear layers


# ----------------------------------------------------------------------------- the MLP
# The fixture network: concat(x_t, t, r, one_hot(c, 3)) -> 32 -> SiLU -> 32 -> SiLU -> d.


def mlp_apply(p, x, t, r, c):
  h = jnp.concatenate([x.reshape(x.shape[0], -1), t[:, None], r[:, None],
                       jax.nn.one_hot(c, 3, dtype=x.dtype)], axis=-1)
  for i, k in enumerate(LAYERS):
    h = h @ p[f"{k}.w"] + p[f"{k}.b"]
    if i < 2:
      h = jax.nn.silu(h)
  return h.reshape(x.shape)


def mlp_numpy(p, x, t, r, c):
  h = np.concatenate([x.reshape(x.shape[0], -1), t[:, None], r[:, None],
                      np.eye(3)[c]], axis=-1)
  for i, k in enumerate(LAYERS):
    h = h @ np.asarray(p[f"{k}.w"]) + np.asarray(p[f"{k}.b"])
    if i < 2:
      h = h / (1 + np.exp(-h))
  return h.reshape(x.shape)


def fixture_params(d, prefix):
  # PyTorch layout [out, in] -> x @ W layout [in, out].
  out = {}
  for k in LAYERS:
    out[f"{k}.w"] = d[f"{prefix}/net.{k}.weight"].T
    out[f"{k}.b"] = d[f"{prefix}/net.{k}.bias"]
  return out


def load_fixture(name):
  d = np.load(FIXTURES / f"twinflow_ref_{name}.npz")
  draws = TwinFlowDraws(*(d[f"draw/{k}"] for k in
                          ("t0", "u_tt", "u_tmin", "z_adv", "z", "z_dm", "t_dm")))
  return d, draws


# ----------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("name", ["a", "b"])
def test_matches_official_float64(name):
  d, draws = load_fixture(name)
  cfg_json = json.loads(str(d["config"]))
  config = TwinFlowConfig(estimate_order=cfg_json["N"], enhanced_ratio=cfg_json["enr"],
                          rect_coef=cfg_json["dmc"], ema_decay=cfg_json["emd"])
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    params, teacher = to64(fixture_params(d, "param")), to64(fixture_params(d, "ema_used"))
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p: losses.twinflow_loss(mlp_apply, p, teacher, jnp.asarray(d["x"]),
                                       jnp.asarray(d["labels"]),
                                       jnp.asarray(d["uncond_labels"]), to64(draws), config),
        has_aux=True))
    (loss, aux), grads = grad_fn(params)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), float(d["loss"]), rtol=0, atol=1e-10)
    for k in LAYERS:
      np.testing.assert_allclose(np.asarray(grads[f"{k}.w"]).T, d[f"grad/net.{k}.weight"],
                                 rtol=0, atol=1e-10)
      np.testing.assert_allclose(np.asarray(grads[f"{k}.b"]), d[f"grad/net.{k}.bias"],
                                 rtol=0, atol=1e-10)
    np.testing.assert_allclose(float(aux["loss_main"]) + 0.5 * float(aux["loss_rect"]),
                               float(d["loss"]), atol=1e-10)


@pytest.mark.parametrize("name", ["a", "b"])
def test_matches_official_float32(name):
  d, draws = load_fixture(name)
  to32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  params, teacher = to32(fixture_params(d, "param")), to32(fixture_params(d, "ema_used"))
  (loss, _), grads = jax.value_and_grad(
      lambda p: losses.twinflow_loss(mlp_apply, p, teacher, jnp.asarray(d["x"], jnp.float32),
                                     jnp.asarray(d["labels"]),
                                     jnp.asarray(d["uncond_labels"]), to32(draws)),
      has_aux=True)(params)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), float(d["loss"]), rtol=1e-5)
  for k in LAYERS:
    ref = d[f"grad/net.{k}.weight"]
    err = np.abs(np.asarray(grads[f"{k}.w"]).T - ref).max() / np.abs(ref).max()
    assert err < 1e-5, (k, err)


# ----------------------------------------------------------------------------- reference
# An independent, row-by-row numpy statement of TWINFLOW.md section 2 (float64), used to
# test the settings the fixtures do not cover.


def reference_sizes(b, props=(1, 1, 1, 1)):
  sizes = [int(round(b * p / sum(props))) for p in props[:3]]
  return sizes + [b - sum(sizes)]


def barron(pred, target, alpha=1.0, c=1e-3):
  mse = np.mean((pred - target) ** 2)
  weight = (mse / (c**2 + 1e-8) / abs(alpha - 2) + 1) ** ((alpha - 2) / 2)
  return mse * weight / c


def reference_loss(net, p, p_t, x, c, e, dr, cfg):
  """Returns loss, and the constants a surrogate needs to reproduce the gradient."""
  b = x.shape[0]
  sizes = reference_sizes(b)
  group = sum(([g] * n for g, n in zip(("e2e", "mul", "any", "adv"), sizes)), [])
  cor, enr, n_ord, delta = (cfg.consistency_ratio, cfg.enhanced_ratio, cfg.estimate_order,
                            cfg.delta)
  f1 = lambda params, xx, t, r, cc: net(params, xx[None], np.array([t]), np.array([r]),
                                         np.array([cc]))[0]
  teacher = p if cfg.ema_decay == 0 else p_t
  chain_p = p if cfg.ema_decay == 1 else teacher
  t = dr.t.copy()
  r = t * (1 - cor * dr.u_any)
  x = x.copy()
  if cfg.image_free:
    x = np.stack([dr.z_data[i] - f1(p, dr.z_data[i], 1.0, 0.0, c[i]) for i in range(b)])
  k_adv = 0
  for i, g in enumerate(group):
    if g == "e2e":
      t[i], r[i] = 1.0, 0.0
    elif g == "mul":
      r[i] = t[i] * (1 - min(0.05, cor) * dr.u_mul[i])
    elif g == "adv":
      r[i] = -t[i]
      x[i] = dr.z_fake[k_adv] - f1(p, dr.z_fake[k_adv], 1.0, 0.0, c[i])
      k_adv += 1
  x_t = np.stack([t[i] * dr.z[i] + (1 - t[i]) * x[i] for i in range(b)])
  v = dr.z - x
  t = np.where(np.array(group) == "adv", -t, t)
  f = np.stack([f1(p, x_t[i], t[i], r[i], c[i]) for i in range(b)])
  rcgm_on = n_ord >= 1 and cor != 0 and (sizes[0] + sizes[2]) > 0
  targets, weights = [], []
  for i, g in enumerate(group):
    target = v[i]
    if g != "adv":
      if enr != 0 and 0 < t[i] < 1:
        fc, fe = f1(teacher, x_t[i], t[i], t[i], c[i]), f1(teacher, x_t[i], t[i], t[i], e[i])
        target = (enr * (fc - fe) + fe if (cfg.image_free and cfg.ema_decay == 1)
                  else v[i] + enr * (fc - fe))
      if rcgm_on:
        t_m = max(t[i] - delta, r[i])
        xc, d_sum = x_t[i] - delta * target, 0.0
        taus = [t_m + (r[i] - t_m) * k / n_ord for k in range(n_ord + 1)]
        for tc, tn in zip(taus[:-1], taus[1:]):
          fk = f1(chain_p, xc, tc, tn, c[i])
          xc, d_sum = xc - (tc - tn) * fk, d_sum + (tc - tn) * fk
        if t[i] - r[i] >= delta:
          resid = ((t[i] - r[i]) * f[i] - d_sum - delta * target) / delta
        else:
          resid = f[i] - target
        target = f[i] - np.clip(resid, -1, 1)
    targets.append(target)
    weights.append(1.0 if g == "adv" else math.tan((1 - (abs(t[i]) - abs(r[i]))) * math.pi / 2.5) + 1)
  rows = [weights[i] * barron(f[i], targets[i]) for i in range(b)]
  if n_ord >= 1:
    loss = np.mean(rows)
    train_rows = list(range(b))
  else:
    train_rows = [i for i, g in enumerate(group) if g in ("mul", "adv")]
    loss = np.mean([rows[i] for i in train_rows])
  rect_targets = []
  if cor == 1 and sizes[0] > 0:
    rect = []
    for k in range(sizes[0]):
      x_e = x_t[k] - f[k]
      s = dr.s_rect[k]
      x_s = s * dr.z_rect[k] + (1 - s) * x_e
      g = (f1(p, x_s, -s, -s, c[k]) - f1(p, x_s, s, s, c[k])).astype(np.float32)
      rect_targets.append(f[k] - np.clip(g, -1, 1).astype(np.float64))
      rect.append(barron(f[k], rect_targets[-1]))
    loss = loss + cfg.rect_coef * np.mean(rect)
  return loss, dict(x_t=x_t, t=t, r=r, targets=np.stack(targets), weights=np.array(weights),
                    train_rows=train_rows, rect_targets=rect_targets)


def random_problem(b, seed, image_free=False, feat=(8,)):
  rng = np.random.default_rng(seed)
  d_in = int(np.prod(feat))
  shapes = {"0.w": (d_in + 5, 32), "0.b": (32,), "2.w": (32, 32), "2.b": (32,),
            "4.w": (32, d_in), "4.b": (d_in,)}
  p = {k: 0.3 * rng.standard_normal(s) for k, s in shapes.items()}
  p_t = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in p.items()}
  n_e2e, _, _, n_adv = reference_sizes(b)
  dr = TwinFlowDraws(t=rng.random(b), u_any=rng.random(b), u_mul=rng.random(b),
                     z_fake=rng.standard_normal((n_adv, *feat)),
                     z=rng.standard_normal((b, *feat)),
                     z_rect=rng.standard_normal((n_e2e, *feat)), s_rect=rng.random(n_e2e),
                     z_data=rng.standard_normal((b, *feat)) if image_free else None)
  x = rng.standard_normal((b, *feat))
  return p, p_t, x, rng.integers(0, 3, b), rng.integers(0, 3, b), dr


def check_against_reference(b, config, seed, feat=(8,)):
  p, p_t, x, c, e, dr = random_problem(b, seed, config.image_free, feat)
  ref_loss, ref = reference_loss(mlp_numpy, p, p_t, x, c, e, dr, config)
  with jax.enable_x64(True):
    j = lambda tree: jax.tree.map(jnp.asarray, tree)
    loss_fn = lambda q: losses.twinflow_loss(mlp_apply, q, j(p_t), j(x), j(c), j(e), j(dr),
                                             config)[0]
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(j(p))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-9, atol=1e-9)

    # The gradient must be that of the student forward against constant targets.
    def surrogate(q):
      f = mlp_apply(q, j(ref["x_t"]), j(ref["t"]), j(ref["r"]), j(c))
      rows = [ref["weights"][i] * barron_jax(f[i], ref["targets"][i])
              for i in ref["train_rows"]]
      out = jnp.mean(jnp.stack(rows))
      if ref["rect_targets"]:
        rect = [barron_jax(f[k], ref["rect_targets"][k]) for k in range(len(ref["rect_targets"]))]
        out = out + config.rect_coef * jnp.mean(jnp.stack(rect))
      return out
    want = jax.jit(jax.grad(surrogate))(j(p))
    for k in grads:
      np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want[k]), rtol=1e-7,
                                 atol=1e-9, err_msg=k)


def barron_jax(pred, target, alpha=1.0, c=1e-3):
  mse = jnp.mean((pred - target) ** 2)
  weight = (mse / (c**2 + 1e-8) / abs(alpha - 2) + 1) ** ((alpha - 2) / 2)
  return mse * jax.lax.stop_gradient(weight) / c


@pytest.mark.parametrize("b", [4, 5, 6, 7, 9, 10, 13, 17])
def test_reference_batch_sizes(b):
  check_against_reference(b, TwinFlowConfig(), seed=b)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_reference_estimate_order(n):
  check_against_reference(10, TwinFlowConfig(estimate_order=n), seed=20 + n)


@pytest.mark.parametrize("kw", [dict(enhanced_ratio=0.0), dict(rect_coef=0.25),
                                dict(ema_decay=0.0), dict(ema_decay=1.0, enhanced_ratio=4.0),
                                dict(image_free=True), dict(image_free=True, ema_decay=1.0)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_reference_settings(kw):
  check_against_reference(11, TwinFlowConfig(**kw), seed=7)


def test_reference_image_shaped_input():
  # Rank-4 input ([B, H, W, C]); the loss reduces over every non-batch axis.
  check_against_reference(6, TwinFlowConfig(), seed=3, feat=(2, 2, 2))


# ----------------------------------------------------------------------------- structure


def test_group_sizes_half_to_even():
  for b in range(4, 18):
    q = round(b / 4)   # Python's round: half to even
    assert losses.group_sizes(b) == (q, q, q, b - 3 * q), b
  assert losses.group_sizes(10) == (2, 2, 2, 4)
  assert losses.group_sizes(6) == (2, 2, 2, 0)   # round(1.5) = 2, no adv rows
  assert losses.group_sizes(9, (1, 1, 1, 0)) == (3, 3, 3, 0)
  assert losses.group_sizes(8, (0, 1, 0, 0)) == (0, 8, 0, 0)
  with pytest.raises(ValueError, match="at least 4"):
    losses.group_sizes(3)
  # Official LoRA layout (twinflow_lora.py): all four rounded, cut at the batch end; the
  # rows left over are the fifth group 'one' (r = 0) after adv.
  for b, want in ((5, (1, 1, 1, 1)), (6, (2, 2, 2, 0)), (7, (2, 2, 2, 1)), (9, (2, 2, 2, 2)),
                  (10, (2, 2, 2, 2)), (13, (3, 3, 3, 3)), (14, (4, 4, 4, 2))):
    assert losses.group_sizes(b, one_group=True) == want, b
  for b in range(4, 41):   # equal to the full layout whenever 'one' is empty
    sizes = losses.group_sizes(b, one_group=True)
    assert sum(sizes) == b and sizes == losses.group_sizes(b) or sum(sizes) < b, b
  # B = 10, one 2 rows: the teacher calls cover them (enhanced, RCGM), as the non-adv rows.
  assert losses.count_network_rows(10, TwinFlowConfig(one_group=True)) == {
      "ours": 10 + 2 + 2 * 6 + 2 * 8 + 2 * 2, "official": 10 + 2 + 2 * 10 + 2 * 10 + 2 * 2}
  with pytest.raises(ValueError, match="one_group must be a bool"):
    TwinFlowConfig(one_group=1)


def counting_apply(counter):
  def apply_fn(p, x, t, r, c):
    counter.append(x.shape[0])   # runs at trace time: shapes are static
    return mlp_apply(p, x, t, r, c)
  return apply_fn


@pytest.mark.parametrize("b,config", [(8, TwinFlowConfig()), (10, TwinFlowConfig()),
                                      (16, TwinFlowConfig(estimate_order=3)),
                                      (12, TwinFlowConfig(enhanced_ratio=0.0))])
def test_network_rows_per_step(b, config):
  p, p_t, x, c, e, dr = random_problem(b, 0)
  j = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  calls = []
  jax.grad(lambda q: losses.twinflow_loss(counting_apply(calls), q, j(p_t), j(x),
                                          jnp.asarray(c), jnp.asarray(e), j(dr),
                                          config)[0])(j(p))
  n_e2e, n_mul, n_any, n_adv = losses.group_sizes(b, one_group=config.one_group)
  n_one = b - (n_e2e + n_mul + n_any + n_adv)
  n_ord = config.estimate_order
  enh = 2 * (n_mul + n_any + n_one) if config.enhanced_ratio else 0
  assert sum(calls) == b + n_adv + enh + n_ord * (b - n_adv) + 2 * n_e2e
  # The official count (TWINFLOW.md): teacher on all B rows for each call.
  official = b + n_adv + (2 * b if config.enhanced_ratio else 0) + n_ord * b + 2 * n_e2e
  assert losses.count_network_rows(b, config) == {"ours": sum(calls), "official": official}
  # Batched calls: student, fake, enhanced (cond+uncond in one), N chain calls, rect (one).
  assert len(calls) == 1 + 1 + (1 if config.enhanced_ratio else 0) + n_ord + 1
  assert sum(calls) < official


def test_autoguidance_replaces_the_teacher_on_e_by_the_guide_on_c():
  # A guide whose class embedding rows all equal the teacher's row of e = 2 computes
  # F_W(c) = F_T(e) on every row, so autoguidance must give the official loss exactly; a
  # guide equal to the teacher cancels the guidance (the enhanced_ratio = 0 loss).
  b, d_in = 12, 8
  p, p_t, x, c, _, dr = random_problem(b, 5)
  e = np.full_like(c, 2)
  guide = dict(p_t)
  guide["0.w"] = p_t["0.w"].copy()
  guide["0.w"][d_in + 2:d_in + 5] = p_t["0.w"][d_in + 4]
  with jax.enable_x64(True):
    j = lambda tree: jax.tree.map(jnp.asarray, tree)
    def loss(guide_params, config=TwinFlowConfig(), uncond=e):
      return float(losses.twinflow_loss(mlp_apply, j(p), j(p_t), j(x), j(c), j(uncond), j(dr),
                                        config, guide_params=guide_params)[0])
    official = loss(None)
    np.testing.assert_allclose(loss(j(guide), uncond=c), official, rtol=1e-12)
    unguided = loss(None, TwinFlowConfig(enhanced_ratio=0.0))
    np.testing.assert_allclose(loss(j(p_t)), unguided, rtol=1e-12)
    assert abs(official - unguided) > 1e-5   # the guidance matters here
  calls = []
  jax.eval_shape(lambda q: losses.twinflow_loss(
      counting_apply(calls), q, j(p_t), j(x), j(c), j(e), j(dr), guide_params=j(guide))[0],
                 j(p))
  assert sum(calls) == losses.count_network_rows(b)["ours"]   # same rows, two calls


def test_jit_grad_vmap_and_no_nan_on_equal_times():
  b = 8
  p, p_t, x, c, e, dr = random_problem(b, 1)
  j = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  # u_mul = 0 gives r = t on the mul rows and t0 = 0 gives t = r = 0: the official code
  # divides by t - r there; our gradient must stay finite.
  dr = dr._replace(u_mul=np.zeros(b), t=np.where(np.arange(b) == 5, 0.0, dr.t))
  fn = jax.jit(jax.value_and_grad(
      lambda q, xx, dd: losses.twinflow_loss(mlp_apply, q, j(p_t), xx, jnp.asarray(c),
                                             jnp.asarray(e), dd)[0]))
  loss, grads = fn(j(p), j(x), j(dr))
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # vmap over a leading axis of independent problems.
  stacked_x = jnp.stack([j(x), 2 * j(x)])
  stacked_dr = jax.tree.map(lambda a: jnp.stack([a, a]), j(dr))
  vloss, _ = jax.vmap(fn, in_axes=(None, 0, 0))(j(p), stacked_x, stacked_dr)
  np.testing.assert_allclose(float(vloss[0]), float(loss), rtol=1e-6)
  assert np.isfinite(np.asarray(vloss)).all()


def test_bfloat16_inputs_and_params():
  d, draws = load_fixture("a")
  bf = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), tree)
  (loss, aux), grads = jax.value_and_grad(
      lambda q: losses.twinflow_loss(mlp_apply, q, bf(fixture_params(d, "ema_used")),
                                     jnp.asarray(d["x"], jnp.bfloat16),
                                     jnp.asarray(d["labels"]), jnp.asarray(d["uncond_labels"]),
                                     bf(draws)), has_aux=True)(bf(fixture_params(d, "param")))
  # Targets are computed in float32 even with bfloat16 inputs and network.
  assert loss.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(float(loss), float(d["loss"]), rtol=0.1)


@pytest.mark.slow
def test_cond_pytree_and_sample_draws():
  b, key = 12, jax.random.key(0)
  config = TwinFlowConfig()
  dr = losses.sample_draws(key, (b, 4, 4, 3), config)
  assert dr.t.shape == (b,) and dr.z.shape == (b, 4, 4, 3)
  assert dr.z_fake.shape == (3, 4, 4, 3) and dr.z_rect.shape == (3, 4, 4, 3)
  assert dr.s_rect.shape == (3,) and dr.z_data is None
  assert losses.sample_draws(key, (b, 2), config.replace(image_free=True)).z_data.shape == (b, 2)
  assert float(dr.t.min()) >= 0 and float(dr.t.max()) <= 1
  beta = losses.sample_draws(key, (4096, 2), config.replace(time_dist=(2.0, 2.0, 0.5)))
  assert 0.2 < float(beta.t.mean()) < 0.3   # E[Beta(2, 2)] * 0.5 = 0.25

  # A dict condition (text-to-image style), uncond of the same structure.
  def apply_fn(p, x, t, r, cond):
    return x * p + cond["pooled"][:, :, None, None] * (t - r)[:, None, None, None]
  cond = {"pooled": jnp.ones((b, 4)), "mask": jnp.ones((b, 3), bool)}
  uncond = jax.tree.map(jnp.zeros_like, cond)
  loss, aux = losses.twinflow_loss(apply_fn, jnp.float32(0.5), jnp.float32(0.4),
                                   jnp.zeros((b, 4, 4, 3)), cond, uncond, dr, config)
  assert np.isfinite(float(loss))
  assert {"loss", "loss_main", "loss_rect", "loss_adv", "group/e2e", "group/mul",
          "group/any", "group/adv"} <= set(aux)


def test_bad_inputs_raise_clear_errors():
  b = 8
  p, p_t, x, c, e, dr = random_problem(b, 0)
  j = lambda tree: jax.tree.map(jnp.asarray, tree)
  with pytest.raises(ValueError, match="draws.z has shape"):
    losses.twinflow_loss(mlp_apply, j(p), j(p_t), j(x), j(c), j(e),
                         j(dr._replace(z=dr.z[:4])))
  with pytest.raises(ValueError, match="leading batch axis"):
    losses.twinflow_loss(mlp_apply, j(p), j(p_t), j(x), j(c[:4]), j(e), j(dr))
  with pytest.raises(ValueError, match="teacher_params is None"):
    losses.twinflow_loss(mlp_apply, j(p), None, j(x), j(c), j(e), j(dr))
  with pytest.raises(ValueError, match="at least 4"):
    losses.sample_draws(jax.random.key(0), (3, 2))
  for field, value in [("estimate_order", -1), ("enhanced_ratio", -0.1), ("metric", "l1"),
                       ("consistency_ratio", 1.5), ("delta", 0.0),
                       ("group_proportions", (1, 1, 1)), ("time_dist", (1, 1, 2)),
                       ("ema_decay", 1.2), ("barron_c", 0.0)]:
    with pytest.raises(ValueError, match=f"TwinFlowConfig.{field}"):
      TwinFlowConfig(**{field: value})
  with pytest.raises(ValueError, match="unknown TwinFlow preset"):
    losses.preset("meanflow")


def test_flow_matching_and_rcgm_presets():
  b = 8
  p, p_t, x, c, e, dr = random_problem(b, 4)
  j = lambda tree: jax.tree.map(jnp.asarray, tree)
  with jax.enable_x64(True):
    # Plain flow matching: every row r = t; l2 metric gives the classic loss (times the
    # constant official weight tan(0.4 pi) + 1).
    config = losses.preset("flow_matching", metric="l2")
    assert losses.group_sizes(b, config.group_proportions) == (0, b, 0, 0)
    dr = dr._replace(z_fake=dr.z_fake[:0], z_rect=dr.z_rect[:0], s_rect=dr.s_rect[:0])
    loss, aux = losses.twinflow_loss(mlp_apply, j(p), None, j(x), j(c), j(e), j(dr), config)
    t = dr.t[:, None]
    x_t = t * dr.z + (1 - t) * x
    f = np.asarray(mlp_apply(j(p), j(x_t), j(dr.t), j(dr.t), j(c)))
    want = (math.tan(0.4 * math.pi) + 1) * np.mean((f - (dr.z - x)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-10)
    # RCGM only: no adv rows and no rectification term.
    rc = losses.preset("rcgm")
    assert losses.group_sizes(9, rc.group_proportions) == (3, 3, 3, 0)
    dr9 = losses.sample_draws(jax.random.key(1), (9, 8), rc, jnp.float64)
    loss, aux = losses.twinflow_loss(mlp_apply, j(p), j(p_t), jnp.ones((9, 8)),
                                     jnp.zeros(9, int), jnp.zeros(9, int), dr9, rc)
    assert "group/adv" not in aux and float(aux["loss_rect"]) == 0.0
    np.testing.assert_allclose(float(loss), float(aux["loss_main"]))


def test_metrics():
  pred, target = jnp.array([[0.3, -0.1]]), jnp.array([[0.0, 0.0]])
  mse = 0.05
  cfg = TwinFlowConfig()
  l2 = losses.row_distance(pred, target, cfg.replace(metric="l2"))
  np.testing.assert_allclose(float(l2[0]), mse, rtol=1e-6)
  ph = losses.row_distance(pred, target, cfg.replace(metric="pseudo_huber", huber_c=0.1))
  np.testing.assert_allclose(float(ph[0]), math.sqrt(mse + 0.01) - 0.1, rtol=1e-6)
  br = losses.row_distance(pred, target, cfg)
  np.testing.assert_allclose(float(br[0]), float(barron_jax(pred[0], target[0])), rtol=1e-6)
  # Barron with alpha 1 is about sqrt(mse) for mse >> c^2 (the official 1e-8 added to c^2
  # makes it sqrt(1.01 mse)).
  np.testing.assert_allclose(float(br[0]), math.sqrt(1.01 * mse), rtol=1e-4)


def test_ema_schedule_and_modes():
  cmd, seen = 0.0, []
  for _ in range(4):
    seen.append(cmd)
    cmd = losses.ema_warmup_decay(cmd, 0.99)
  np.testing.assert_allclose(seen, [0.0, 0.495, 0.6199875, 0.6902922], atol=1e-7)
  for _ in range(2000):
    cmd = losses.ema_warmup_decay(cmd, 0.99)
  assert abs(cmd - 0.99) < 1e-3
  ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  new, c1 = losses.teacher_update(ema, params, 0.0, 0.99)   # first call copies params
  np.testing.assert_allclose(new["w"], 1.0)
  assert c1 == 0.495
  new, _ = losses.teacher_update(ema, params, 0.5, 0.99)
  np.testing.assert_allclose(new["w"], 0.5)
  frozen, c = losses.teacher_update(ema, params, 0.3, 1.0)
  assert frozen is ema and c == 0.3
  online, _ = losses.teacher_update(ema, params, 0.3, 0.0)
  assert online is params
  np.testing.assert_allclose(losses.ema_update(ema, params, 0.9)["w"], 0.1, rtol=1e-6)


# ----------------------------------------------------------------------------- row blocks
# row_blocks = G: the batch is G official sub-batches of B / G rows, each with its own
# groups and draws; the loss is the mean of their losses.


def block_problem(nb, g, seed, config=TwinFlowConfig()):
  """G independent official problems of nb rows (one network), block after block."""
  blocks = [random_problem(nb, seed + k, config.image_free) for k in range(g)]
  p, p_t = blocks[0][0], blocks[0][1]
  cat = lambda i: np.concatenate([blk[i] for blk in blocks])
  dr = TwinFlowDraws(*(None if blocks[0][5][f] is None else
                       np.concatenate([blk[5][f] for blk in blocks])
                       for f in range(len(TwinFlowDraws._fields))))
  return p, p_t, cat(2), cat(3), cat(4), dr, blocks


@pytest.mark.parametrize("nb,g,kw", [(4, 3, {}), (6, 2, {}), (5, 2, dict(estimate_order=0)),
                                     (7, 2, dict(image_free=True))],
                         ids=["4x3", "6x2", "5x2-order0", "7x2-image-free"])
def test_row_blocks_are_the_mean_of_official_blocks(nb, g, kw):
  config = TwinFlowConfig(row_blocks=g, **kw)
  p, p_t, x, c, e, dr, blocks = block_problem(nb, g, seed=40 + nb, config=config)
  # Value: the mean of the independent numpy reference over the blocks.
  ref = np.mean([reference_loss(mlp_numpy, p, p_t, *blk[2:], config.replace(row_blocks=1))[0]
                 for blk in blocks])
  with jax.enable_x64(True):
    j = lambda tree: jax.tree.map(jnp.asarray, tree)
    loss_fn = lambda q, cfg, xx, cc, ee, dd: losses.twinflow_loss(mlp_apply, q, j(p_t), xx, cc,
                                                                  ee, dd, cfg)[0]
    vg = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
    loss, grads = vg(j(p), config, j(x), j(c), j(e), j(dr))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-9, atol=1e-9)
    # Gradient: the mean of the official (G = 1) gradients of the blocks.
    one = config.replace(row_blocks=1)
    per_block = [vg(j(p), one, *(j(a) for a in blk[2:]))[1] for blk in blocks]
    want = jax.tree.map(lambda *gs: sum(gs) / g, *per_block)
    for k in grads:
      np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(want[k]), rtol=1e-9,
                                 atol=1e-12, err_msg=k)


def test_row_blocks_layout_draws_and_errors():
  config = TwinFlowConfig(row_blocks=8)
  assert losses.block_layout(40, config) == (8, 5, (1, 1, 1, 2))
  dr = losses.sample_draws(jax.random.key(0), (40, 3), config)
  assert dr.z_fake.shape == (16, 3) and dr.z_rect.shape == (8, 3) and dr.s_rect.shape == (8,)
  # The official rounding of B = 40 would give (10, 10, 10, 10); blocks round B / G.
  assert losses.group_sizes(40) == (10, 10, 10, 10)
  with pytest.raises(ValueError, match=r"row_blocks=3 does not divide the batch of 16"):
    losses.block_layout(16, TwinFlowConfig(row_blocks=3))
  with pytest.raises(ValueError, match=r"row_blocks=8 leaves 2 rows per block .* "
                     r"use row_blocks <= 4"):
    losses.sample_draws(jax.random.key(0), (16, 3), config)
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="TwinFlowConfig.row_blocks must be an integer >= 1"):
      TwinFlowConfig(row_blocks=bad)


def test_row_blocks_count_rows_and_keep_calls_batched():
  b, g = 24, 3
  config = TwinFlowConfig(row_blocks=g)
  p, p_t, x, c, e, dr, _ = block_problem(8, g, seed=0)
  j = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  calls = []
  jax.eval_shape(jax.grad(lambda q: losses.twinflow_loss(counting_apply(calls), q, j(p_t),
                                                         j(x), jnp.asarray(c), jnp.asarray(e),
                                                         j(dr), config)[0]), j(p))
  one_block = losses.count_network_rows(8)["ours"]
  assert sum(calls) == g * one_block == losses.count_network_rows(b, config)["ours"]
  assert losses.count_network_rows(b, config)["official"] == losses.count_network_rows(b)[
      "official"]
  assert len(calls) == 6   # still one call per kind: student, fake, enhanced, 2 chain, rect


@pytest.mark.parametrize("g, guided", [(1, False), (4, False), (8, False), (8, True)])
def test_row_blocks_do_not_depend_on_the_mesh(g, guided):
  # The same loss and gradient on one device and with the batch over 8 devices (guided:
  # autoguidance by a perturbed copy of the teacher).
  b = 32
  config = TwinFlowConfig(row_blocks=g)
  p, p_t, x, c, e, dr, _ = block_problem(b // g, g, seed=g)
  j = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32)
                                if np.asarray(a).dtype.kind == "f" else jnp.asarray(a), tree)
  guide = jax.tree.map(lambda a: a * 0.9, j(p_t)) if guided else None
  fn = lambda q, xx, cc, ee, dd: losses.twinflow_loss(mlp_apply, q, j(p_t), xx, cc, ee, dd,
                                                      config, batch_axes=("data", "fsdp"),
                                                      guide_params=guide)
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  (loss1, aux1), g1 = jax.jit(grad_fn)(j(p), j(x), j(c), j(e), j(dr))
  mesh = jax.make_mesh((4, 2, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rows = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
  put = lambda tree: jax.tree.map(lambda a: jax.device_put(a, rows), j(tree))
  with jax.set_mesh(mesh):
    (loss8, aux8), g8 = jax.jit(grad_fn)(j(p), put(x), put(c), put(e), put(dr))
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  for k in aux1:
    np.testing.assert_allclose(float(aux8[k]), float(aux1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
  for k in g1:   # float32 sums over 8 devices in another order: 1e-5 absolute
    np.testing.assert_allclose(np.asarray(g8[k]), np.asarray(g1[k]), rtol=1e-5, atol=1e-5)
