"""The sample command on a run of a pretrained family (a tiny random Flux.1-dev)."""

import numpy as np
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
  config_json = ckpt_lib.config_to_json(c)
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), save_every=1, keep=1,
                               async_save=False)
  ckpt.save(1, state, None, config_json, force=True)
  ckpt.close()
  with open(f"{workdir}/config.json", "w") as f:
    import json  # pylint: disable=g-import-not-at-top
    json.dump(config_json, f)


def test_flux_run_samples_with_presets_guidance_and_any_text_length(tmp_path):
  workdir = str(tmp_path / "flux_run")
  _flux_run(workdir)
  rng = np.random.default_rng(0)
  n, length = 3, 5                      # the run trained on 4 text tokens; Flux takes any
  cond = {"txt": rng.standard_normal((n, length, 8)).astype(np.float32),
          "txt_mask": np.ones((n, length), bool),
          "pooled": rng.standard_normal((n, 6)).astype(np.float32)}
  np.savez(tmp_path / "prompts.npz", **cond)
  out = str(tmp_path / "out" / "s.npz")
  argv = ["--workdir", workdir, "--cond-file", str(tmp_path / "prompts.npz"), "--seed", "3"]
  assert sample.main(argv + ["--preset", "2nfe", "--guidance", "2.0", "--out", out]) == 0
  got = np.load(out)
  assert (tmp_path / "out" / "s.png").is_file()
  assert got["samples"].shape == (n, 4, 6, 4)
  np.testing.assert_array_equal(got["guidance"], np.full(n, 2.0, np.float32))

  run = readonly.load_run(workdir)
  want = generate.generate(run.apply_fn, run.weights["ema"], dict(cond, guidance=got["guidance"]),
                           "2nfe", key=3, x_shape=(4, 6, 4), mesh=run.mesh, rules=run.rules)
  np.testing.assert_allclose(got["samples"], want, rtol=1e-6, atol=1e-6)

  # 1 NFE in the model's own time convention: x = z - t F(z, t, r) at the preset's (t, r),
  # the model called directly with the default guidance of its config (3.5).
  assert sample.main(argv + ["--out", str(tmp_path / "one.npz")]) == 0
  one = np.load(tmp_path / "one.npz")
  np.testing.assert_array_equal(one["guidance"], np.full(n, 3.5, np.float32))
  (t, r), = sampling.call_times(sampling.get_config("1nfe"))
  z = np.asarray(generate.initial_noise(3, np.arange(n), (4, 6, 4)))
  model = nnx.merge(run.apply_fn.__closure__[0].cell_contents, run.weights["ema"])
  f = np.asarray(model(z, np.full(n, t, np.float32), np.full(n, r, np.float32), cond))
  np.testing.assert_allclose(one["samples"], z - t * f, rtol=1e-5, atol=1e-5)
  assert np.abs(one["samples"] - got["samples"]).max() > 1e-3


def test_guidance_flag_needs_a_guidance_model(tmp_path, capsys):
  workdir = str(tmp_path / "flux_run")
  _flux_run(workdir)
  np.savez(tmp_path / "p.npz", txt=np.zeros((1, 4, 7), np.float32),
           txt_mask=np.ones((1, 4), bool), pooled=np.zeros((1, 6), np.float32))
  try:
    sample.main(["--workdir", workdir, "--cond-file", str(tmp_path / "p.npz"),
                 "--out", str(tmp_path / "x.npz")])
  except SystemExit as e:
    assert e.code == 1
  assert "'txt' has shape (1, 4, 7), this run needs (1, 4, 8)" in capsys.readouterr().err
