"""Flax VAEs against diffusers (fixtures of tools/make_vae_fixture.py), bf16, sharding."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from twinflow_jax.models import vae as vae_lib
from twinflow_jax.models.convert import diffusers_vae

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ("vae_sd", "vae_flux", "vae_qwen")


def _folder(name):
  return os.path.join(FIXTURES, name)


def _reference(name):
  with np.load(os.path.join(_folder(name), "reference.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_float32(name):
  vae = diffusers_vae.load_diffusers_vae(_folder(name))
  ref = _reference(name)
  mean, logvar = vae_lib.make_encode_fn(vae)(ref["images"])
  decoded = vae_lib.make_decode_fn(vae)(ref["latents"])
  assert mean.shape == ref["mean"].shape and decoded.shape == ref["decoded"].shape
  np.testing.assert_allclose(mean, ref["mean"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(logvar, ref["logvar"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(decoded, ref["decoded"], atol=1e-4, rtol=0)
  # The fixture is not degenerate: outputs vary and the decoder is far from zero.
  assert np.std(ref["mean"]) > 0.05 and np.abs(ref["decoded"]).mean() > 0.1


def test_latent_normalization_from_config():
  configs = {n: diffusers_vae.vae_config_from_diffusers(
      diffusers_vae.read_vae_config(_folder(n))) for n in NAMES}
  assert configs["vae_sd"].latent_normalization() == (0.0, 0.18215)
  assert configs["vae_flux"].latent_normalization() == (0.1159, 0.3611)
  shift, scale = configs["vae_qwen"].latent_normalization()
  qwen = json.load(open(os.path.join(_folder("vae_qwen"), "config.json")))
  np.testing.assert_allclose(shift, qwen["latents_mean"])
  np.testing.assert_allclose(scale, 1 / np.asarray(qwen["latents_std"]))
  assert [c.downsample_factor for c in configs.values()] == [2, 4, 4]
  assert [c.latent_channels for c in configs.values()] == [4, 16, 4]


def test_bfloat16_compute_is_finite_and_close():
  ref = _reference("vae_sd")
  vae = diffusers_vae.load_diffusers_vae(_folder("vae_sd"), dtype="bfloat16")
  mean, logvar = vae_lib.make_encode_fn(vae)(ref["images"])
  decoded = vae_lib.make_decode_fn(vae)(ref["latents"])
  assert mean.dtype == np.float32  # outputs are returned in float32
  for got, want in ((mean, ref["mean"]), (logvar, ref["logvar"]),
                    (decoded, ref["decoded"])):
    got = np.asarray(got)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err < 0.05, err  # bf16 rounding shows, but stays small


def test_sharded_encode_decode_equals_unsharded():
  assert jax.device_count() == 8
  vae = diffusers_vae.load_diffusers_vae(_folder("vae_qwen"))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
  latents = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
  mesh = vae_lib.batch_mesh()
  assert vae_lib.batch_divisor(mesh) == 8
  mean, logvar = vae_lib.make_encode_fn(vae, mesh)(images)
  assert len(mean.sharding.device_set) == 8
  assert mean.addressable_shards[0].data.shape == (1, 4, 4, 4)
  want_mean, want_logvar = vae_lib.make_encode_fn(vae)(images)
  np.testing.assert_allclose(mean, want_mean, atol=1e-5, rtol=0)
  np.testing.assert_allclose(logvar, want_logvar, atol=1e-5, rtol=0)
  np.testing.assert_allclose(vae_lib.make_decode_fn(vae, mesh)(latents),
                             vae_lib.make_decode_fn(vae)(latents), atol=1e-5, rtol=0)


def test_folder_errors_name_the_file(tmp_path):
  with pytest.raises(diffusers_vae.VaeFolderError, match="no config.json"):
    diffusers_vae.load_diffusers_vae(str(tmp_path))
  bad = tmp_path / "bad"
  shutil.copytree(_folder("vae_sd"), bad)
  config = json.load(open(bad / "config.json"))
  json.dump({**config, "_class_name": "UNet2DModel"}, open(bad / "config.json", "w"))
  with pytest.raises(diffusers_vae.VaeFolderError, match="UNet2DModel.*not a supported"):
    diffusers_vae.load_diffusers_vae(str(bad))
  json.dump({**config, "latent_channels": 8}, open(bad / "config.json", "w"))
  with pytest.raises(diffusers_vae.VaeFolderError, match="does not fit"):
    diffusers_vae.load_diffusers_vae(str(bad))
  json.dump({**config, "mid_block_add_attention": False}, open(bad / "config.json", "w"))
  with pytest.raises(diffusers_vae.VaeFolderError, match="unused.*attentions"):
    diffusers_vae.load_diffusers_vae(str(bad))
  os.remove(bad / "diffusion_pytorch_model.safetensors")
  with pytest.raises(diffusers_vae.VaeFolderError, match="neither"):
    diffusers_vae.load_diffusers_vae(str(bad))


def test_bf16_weights_read_as_raw_bytes():
  reader = diffusers_vae.SafetensorsReader(_folder("vae_flux"))
  name = "decoder.conv_in.weight"
  w = reader.get(name)
  assert w.dtype.name == "bfloat16" and w.shape == reader.shape(name) == (8, 16, 3, 3)
  assert np.isfinite(w.astype(np.float32)).all() and np.abs(w.astype(np.float32)).max() > 0
  # The sharded Qwen folder: every indexed tensor reads from its shard.
  qwen = diffusers_vae.SafetensorsReader(_folder("vae_qwen"))
  assert len(qwen.files) > 1
  assert all(qwen.get(n).shape == qwen.shape(n) for n in qwen.names())


def test_export_round_trip_and_chunked_attention(tmp_path, monkeypatch):
  vae = diffusers_vae.load_diffusers_vae(_folder("vae_sd"))
  diffusers_vae.save_diffusers_vae(vae, str(tmp_path / "copy"))
  again = diffusers_vae.load_diffusers_vae(str(tmp_path / "copy"))
  ref = _reference("vae_sd")
  want = vae_lib.make_encode_fn(vae)(ref["images"])[0]
  np.testing.assert_array_equal(vae_lib.make_encode_fn(again)(ref["images"])[0], want)
  # Queries in chunks (as for large latents) give the same attention.
  monkeypatch.setattr(vae_lib, "ATTENTION_QUERY_CHUNK", 24)  # 64 tokens: 3 chunks
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 64, 8)).astype(np.float32) for _ in range(3))
  chunked = vae_lib.single_head_attention(q, k, v, "xla")
  monkeypatch.setattr(vae_lib, "ATTENTION_QUERY_CHUNK", 4096)
  np.testing.assert_allclose(chunked, vae_lib.single_head_attention(q, k, v, "xla"),
                             atol=1e-6)


def test_flops_per_image():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  # SD-VAE encoder at 256 x 256, counted by hand level by level (GFLOPs): conv_in 0.45,
  # 256^2 level 77.3 + downsample 4.8, 128^2 level 68.7 + 4.8, 64^2 level 68.7 + 4.8,
  # 32^2 level 19.3, mid resnets 19.3 + attention 4.3, conv_out 0.08.
  sd = vae_lib.AutoencoderKLConfig()
  assert abs(vae_lib.flops_per_image(sd, 256, 256) / 1e9 - 272.7) < 0.1
  assert vae_lib.flops_per_image(sd, 256, 512) > 2 * vae_lib.flops_per_image(sd, 256, 256)
  # Against XLA's count of a compiled tiny VAE (compiled only, not run).
  cfg = vae_lib.AutoencoderKLConfig(block_out_channels=(8, 16, 16), norm_num_groups=4)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: vae_lib.create_vae(cfg, rngs=nnx.Rngs(0))))
  for part, method, shape in (("encoder", "encode", (1, 32, 32, 3)),
                              ("decoder", "decode", (1, 8, 8, 4))):
    fn = jax.jit(lambda s, x, m=method: getattr(nnx.merge(graphdef, s), m)(x))
    xla = fn.lower(state, jax.ShapeDtypeStruct(shape, jnp.float32)).compile(
    ).cost_analysis()["flops"]
    ours = vae_lib.flops_per_image(cfg, 32, 32, part)
    assert abs(ours - xla) < 0.03 * xla, (part, ours, xla)
  with pytest.raises(ValueError, match="multiple"):
    vae_lib.flops_per_image(sd, 100, 100)
