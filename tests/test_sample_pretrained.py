"""The sample command on a run of a pretrained family (a tiny random Flux.1-dev)."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from twinflow_jax import generate
from twinflow_jax import sample
from twinflow_jax import sampling
from twinflow_jax.train import checkpoint as ckpt_lib
from twinflow_jax.train import config as config_lib
from twinflow_jax.train import loop
from twinflow_jax.train import readonly


def _flux_run(workdir):
  """A run directory as the trainer leaves it (config.json + checkpoint 1), random init."""
  c = config_lib.base_config()
  c.model = dict(name="flux", num_layers=1, num_single_layers=1, num_attention_heads=2,
                 attention_head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=16,
                 joint_attention_dim=8, pooled_projection_dim=6, guidance_embeds=True,
                 attention="einsum")
  c.data.source = "arrayrecord_t2i"
  c.data.paths = "/nonexistent/t2i.array_record"   # only the shapes are read
  c.data.latent_shape = (4, 6, 4)
  c.data.txt_len, c.data.txt_dim, c.data.pooled_dim = 4, 8, 6
  c.train.global_batch_size = 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  setup = loop.build(c)
  state = loop.init_state(setup, 0)
  # adaLN-Zero starts with zero modulation (time and guidance would not matter): perturb
  # every weight so that t, r, guidance and text all change F.
  rng = np.random.default_rng(1)
  noisy = lambda a: jax.device_put(
      np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(a.dtype), a.sharding)
  state = state.replace(ema=jax.tree.map(noisy, state.ema))
  config_json = ckpt_lib.config_to_json(c)
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), save_every=1, keep=1,
                               async_save=False)
  ckpt.save(1, state, None, config_json, force=True)
  ckpt.close()
  with open(f"{workdir}/config.json", "w") as f:
    json.dump(config_json, f)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained") / "flux_run")
  _flux_run(workdir)
  return workdir


@pytest.fixture
def loaded_once(monkeypatch):
  """readonly.load_run memoised, so every command call reuses one compiled sampler."""
  cache, real = {}, readonly.load_run

  def load_run(workdir, step=None, weights=None, devices=None, base=None):
    key = (workdir, step, weights and tuple(weights), base)
    if key not in cache:
      cache[key] = real(workdir, step, weights, devices, base)
    return cache[key]

  monkeypatch.setattr(readonly, "load_run", load_run)
  return load_run


def test_flux_run_samples_with_guidance_and_any_text_length(flux_run, loaded_once, tmp_path):
  rng = np.random.default_rng(0)
  n, length = 3, 5                      # the run trained on 4 text tokens; Flux takes any
  cond = {"txt": rng.standard_normal((n, length, 8)).astype(np.float32),
          "txt_mask": np.ones((n, length), bool),
          "pooled": rng.standard_normal((n, 6)).astype(np.float32)}
  np.savez(tmp_path / "prompts.npz", **cond)
  argv = ["--workdir", flux_run, "--cond-file", str(tmp_path / "prompts.npz"), "--seed", "3",
          "--preset", "1nfe"]
  assert sample.main(argv + ["--out", str(tmp_path / "out" / "s.npz")]) == 0
  got = np.load(tmp_path / "out" / "s.npz")
  assert (tmp_path / "out" / "s.png").is_file()
  assert got["samples"].shape == (n, 4, 6, 4)
  # No flag: the model config's default guidance (3.5, the diffusers pipeline's).
  np.testing.assert_array_equal(got["guidance"], np.full(n, 3.5, np.float32))

  run = loaded_once(flux_run)
  want = generate.generate(run.apply_fn, run.weights["ema"], dict(cond, guidance=got["guidance"]),
                           "1nfe", key=3, x_shape=(4, 6, 4), mesh=run.mesh, rules=run.rules)
  np.testing.assert_array_equal(got["samples"], want)

  # The model's own time convention: x = z - t F(z, t, r) at the preset's (t, r), the model
  # called directly (F at network time 1000 t, as the diffusers-parity tests fix it).
  (t, r), = sampling.call_times(sampling.get_config("1nfe"))
  z = np.asarray(generate.initial_noise(3, np.arange(n), (4, 6, 4)))
  graphdef = run.apply_fn.__closure__[0].cell_contents
  model = nnx.merge(graphdef, jax.device_get(run.weights["ema"]))
  f = np.asarray(model(z, np.full(n, t, np.float32), np.full(n, r, np.float32),
                       dict(cond, guidance=np.full(n, 3.5, np.float32))))
  np.testing.assert_allclose(got["samples"], z - t * f, rtol=1e-5, atol=1e-5)

  # --guidance reaches the guidance embedder.
  assert sample.main(argv + ["--guidance", "2.0", "--out", str(tmp_path / "g.npz")]) == 0
  g = np.load(tmp_path / "g.npz")
  np.testing.assert_array_equal(g["guidance"], np.full(n, 2.0, np.float32))
  assert np.abs(g["samples"] - got["samples"]).max() > 1e-4


def test_text_width_must_match(flux_run, loaded_once, tmp_path, capsys):
  np.savez(tmp_path / "p.npz", txt=np.zeros((1, 4, 7), np.float32),
           txt_mask=np.ones((1, 4), bool), pooled=np.zeros((1, 6), np.float32))
  with pytest.raises(SystemExit) as e:
    sample.main(["--workdir", flux_run, "--cond-file", str(tmp_path / "p.npz"),
                 "--out", str(tmp_path / "x.npz")])
  assert e.value.code == 1
  assert "'txt' has shape (1, 4, 7), this run needs (1, 4, 8)" in capsys.readouterr().err


def test_diffusers_folder_samples_straight(tmp_path):
  """--diffusers: the base model of a diffusers folder, 1 NFE = z - t F(z, t, r)."""
  from twinflow_jax.models.convert import diffusers  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(__file__).parent / "fixtures" / "flux_dev_tiny"
  ref = np.load(folder / "reference.npz")
  cond = {"txt": ref["txt"], "txt_mask": ref["txt_mask"], "pooled": ref["pooled"]}
  np.savez(tmp_path / "p.npz", **cond)
  out = tmp_path / "d.npz"
  assert sample.main(["--diffusers", str(folder), "--latent-size", "4,6", "--dtype", "float32",
                      "--cond-file", str(tmp_path / "p.npz"), "--guidance", "4.0",
                      "--seed", "5", "--out", str(out)]) == 0
  got = np.load(out)
  assert (tmp_path / "d.png").is_file() and got["samples"].shape == (2, 4, 6, 4)
  model = diffusers.load_model(str(folder), {"dtype": "float32"})
  (t, r), = sampling.call_times(sampling.get_config("1nfe"))
  z = np.asarray(generate.initial_noise(5, np.arange(2), (4, 6, 4)))
  f = np.asarray(model(z, np.full(2, t, np.float32), np.full(2, r, np.float32),
                       dict(cond, guidance=np.full(2, 4.0, np.float32))))
  np.testing.assert_allclose(got["samples"], z - t * f, rtol=1e-5, atol=1e-5)


def test_diffusers_folder_refuses_metrics(tmp_path, capsys):
  folder = pathlib.Path(__file__).parent / "fixtures" / "flux_dev_tiny"
  with pytest.raises(SystemExit) as e:
    sample.main(["--diffusers", str(folder), "--latent-size", "4,6", "--metrics", "mnist",
                 "--out", str(tmp_path / "d.npz")])
  assert e.value.code == 1
  assert "--metrics applies to --workdir runs" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())
