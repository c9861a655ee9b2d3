"""`python -m twinflow_jax.data.prepare`: ADM crop, records, metadata, resume, processes,
bad input, captions, decoding (tiny VAEs of tests/fixtures, tiny images)."""

import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from twinflow_jax import data
from twinflow_jax.data import arrayrecord_io
from twinflow_jax.data import captions
from twinflow_jax.data import latent_metadata
from twinflow_jax.data import prep_images
from twinflow_jax.data import prepare
from twinflow_jax.data import vae_codec
from twinflow_jax.models import vae as vae_lib
from twinflow_jax.models.convert import diffusers_vae

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SD_VAE = os.path.join(FIXTURES, "vae_sd")
QWEN_VAE = os.path.join(FIXTURES, "vae_qwen")


def _adm_reference(image, size):
  """guided-diffusion's center_crop_arr, re-stated step by step."""
  while min(image.size) >= 2 * size:
    image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)),
                       resample=Image.BICUBIC)
  a = np.array(image)
  y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[y:y + size, x:x + size]


def test_center_crop_matches_adm():
  rng = np.random.default_rng(0)
  for h, w in [(130, 70), (64, 64), (17, 40), (8, 12)]:
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = prep_images.center_crop_arr(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _adm_reference(image, 16))
  prepared = prep_images.prepare_image(np.zeros((8, 12, 3), np.uint8), 16)
  assert prepared.upscaled and prepared.mode == "RGB"
  # Two BOX halvings (130x70 -> 65x35 -> 32x17) before the bicubic resize: a constant
  # image stays constant, and a vertical edge lands in the middle of the crop.
  edge = np.zeros((70, 130, 3), np.uint8)
  edge[:, 65:] = 200
  out = prep_images.center_crop_arr(Image.fromarray(edge), 16)
  assert out[:, 0].max() == 0 and out[:, -1].min() == 200


def _make_folder(root, rng):
  """2 classes of small RGB PNGs, plus grey, RGBA, CMYK, small, truncated, fake files."""
  pixels = {}
  for c in ("cat", "dog"):
    os.makedirs(os.path.join(root, c))
    for i in range(3):
      a = rng.integers(0, 256, (20 + 4 * i, 18 + 6 * i, 3), dtype=np.uint8)
      path = os.path.join(root, c, f"{i}.png")
      Image.fromarray(a).save(path)
      pixels[path] = a
  Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(
      os.path.join(root, "cat", "grey.png"))
  Image.fromarray(rng.integers(0, 256, (18, 18, 4), dtype=np.uint8)).save(
      os.path.join(root, "dog", "alpha.png"))
  Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).convert("CMYK").save(
      os.path.join(root, "dog", "cmyk.jpg"))
  Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(
      os.path.join(root, "dog", "small.png"))
  blob = open(os.path.join(root, "cat", "0.png"), "rb").read()
  open(os.path.join(root, "cat", "trunc.png"), "wb").write(blob[:len(blob) // 2])
  open(os.path.join(root, "dog", "fake.jpg"), "w").write("not an image")
  return pixels


def _args(**flags):
  argv = [f"--{k}={v}" if v is not True else f"--{k}" for k, v in flags.items()]
  return prepare._parser().parse_args(argv + ["--quiet"])


def _encode(vae, pixels, batch=8):
  """(mean, logvar), on the sharded encoder and padded batch that `prepare` compiled."""
  x = prep_images.to_unit_range(np.stack(pixels))
  x = np.concatenate([x, np.zeros((batch - len(x),) + x.shape[1:], x.dtype)])
  mean, logvar = vae_lib.make_encode_fn(vae, vae_lib.batch_mesh())(x)
  return np.asarray(mean)[:len(pixels)], np.asarray(logvar)[:len(pixels)]


def _encode_mean(vae, pixels, batch=8):
  return _encode(vae, pixels, batch)[0]


def test_image_folder_records_metadata_and_decoding(tmp_path, capsys):
  pixels = _make_folder(str(tmp_path / "img"), np.random.default_rng(0))
  out = str(tmp_path / "out")
  assert prepare.main([f"--vae={SD_VAE}", f"--image_folder={tmp_path / 'img'}",
                       "--image_size=16", f"--output={out}", "--batch_size=4",
                       "--shard_size=4", "--hflip", "--quiet"]) == 0
  printed = capsys.readouterr().out
  assert "config.data.latent_scale = 0.18215" in printed
  meta = latent_metadata.read_metadata(out)
  assert meta["counts"] == {"inputs": 12, "images": 10, "records": 20,
                            "skipped_unreadable": 2, "skipped_small": 0,
                            "upscaled_small": 1,
                            "converted_to_rgb": {"L": 1, "RGBA": 1, "CMYK": 1}}
  assert (meta["latent_shape"], meta["num_classes"], meta["num_shards"]) == (
      [8, 8, 4], 2, 3)
  assert meta["stored"] == "posterior_mean" and meta["hflip_records"]
  assert (tmp_path / "out" / "classes.txt").read_text().split() == ["cat", "dog"]
  skipped = (tmp_path / "out" / "skipped.txt").read_text()
  assert "trunc.png\tunreadable: OSError" in skipped and "fake.jpg" in skipped

  back = arrayrecord_io.read_arrays(os.path.join(out, meta["records"]))
  # Sorted order: cat/0,1,2,grey then dog/0,1,2,alpha,cmyk,small; each twice (flip).
  np.testing.assert_array_equal(back["label"], [0] * 8 + [1] * 12)
  vae = diffusers_vae.load_diffusers_vae(SD_VAE)
  cat0 = prep_images.center_crop_arr(
      Image.fromarray(pixels[str(tmp_path / "img" / "cat" / "0.png")]), 16)
  want = _encode_mean(vae, [cat0, cat0[:, ::-1]], batch=16)
  np.testing.assert_allclose(back["latent"][:2], want, atol=1e-5)

  # The data pipeline reads them with the printed fields, and refuses wrong ones.
  c = data.default_config()
  c.update(dict(source="arrayrecord_latents", paths=os.path.join(out, meta["records"]),
                latent_shape=(8, 8, 4), num_classes=2, latent_scale=0.18215,
                shuffle=False, label_dropout=0.0))
  batch = next(data.create_train_iterator(c, global_batch_size=4, seed=0))
  np.testing.assert_allclose(batch["x"], back["latent"][:4] * 0.18215, rtol=1e-6)
  for field, value, match in [("latent_scale", 1.0, "need latent_scale=0.18215"),
                              ("latent_shape", (8, 8, 16), r"\(8, 8, 4\).*4 channels"),
                              ("latent_dtype", "bfloat16", "latent_dtype='float32'"),
                              ("source", "arrayrecord_t2i", "arrayrecord_latents")]:
    bad = c.copy_and_resolve_references()
    bad[field] = value
    if field == "source":
      bad.update(dict(txt_len=4, txt_dim=4, pooled_dim=4))
    with pytest.raises(ValueError, match=match):
      data.create_train_iterator(bad, global_batch_size=4, seed=0)

  # Decoding API: model-space x -> the VAE decoder's images, as uint8.
  images = vae_codec.decode(batch["x"], vae, meta)
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
  direct = np.asarray(vae_lib.make_decode_fn(vae)(back["latent"][:4]))
  np.testing.assert_array_equal(images, np.round((np.clip(direct, -1, 1) + 1) * 127.5))
  decoder = vae_codec.decoder_for_data(c, mesh=vae_lib.batch_mesh())
  np.testing.assert_allclose(decoder(batch["x"][:3], output="float"),
                             np.clip(direct[:3], -1, 1), atol=1e-5)


def test_processes_split_and_resume(tmp_path):
  _make_folder(str(tmp_path / "img"), np.random.default_rng(1))
  out = str(tmp_path / "out")
  flags = dict(vae=SD_VAE, image_folder=tmp_path / "img", image_size=16, output=out,
               batch_size=2, shard_size=3, store="sample", seed=7)
  # Two "processes", one after the other: each writes its shards; process 0 (last)
  # checks they are all there and writes the metadata.
  assert prepare.prepare(_args(**flags), process_index=1, process_count=2) is None
  files = sorted(os.listdir(out))
  assert [f for f in files if f.endswith(".array_record")] == [
      "records-00001-of-00004.array_record", "records-00003-of-00004.array_record"]
  with pytest.raises(prepare.PrepareError, match="other settings.*image_size"):
    prepare.prepare(_args(**{**flags, "image_size": 32}), process_index=0,
                    process_count=2)
  meta = prepare.prepare(_args(**flags), process_index=0, process_count=2)
  assert meta["num_records"] == 10 and meta["stored"] == "posterior_sample"
  paths = os.path.join(out, meta["records"])
  first = arrayrecord_io.read_arrays(paths)
  assert len(first["label"]) == 10  # 12 inputs, 2 unreadable: none lost or repeated
  np.testing.assert_array_equal(first["label"], [0] * 4 + [1] * 6)

  # Posterior draws depend on the image index only: recompute image 1 (cat/1.png).
  vae = diffusers_vae.load_diffusers_vae(SD_VAE)
  cat1 = prep_images.center_crop_arr(
      Image.open(tmp_path / "img" / "cat" / "1.png").convert("RGB"), 16)
  mean, logvar = _encode(vae, [cat1])
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(7), 2), mean.shape[1:])
  np.testing.assert_allclose(first["latent"][1], mean[0] + np.exp(0.5 * logvar[0]) * noise,
                             atol=1e-5)

  # A kill leaves a shard as .tmp (never renamed) and no stats: the rerun redoes only it.
  victim = prepare.shard_path(out, 2, 4)
  os.replace(victim, victim + ".tmp")
  os.remove(os.path.join(out, prepare.PROGRESS_DIR, "shard-00002.json"))
  kept = {k: os.stat(prepare.shard_path(out, k, 4)).st_mtime_ns for k in (0, 1, 3)}
  meta = prepare.prepare(_args(**flags), process_index=0, process_count=1)
  assert meta["num_records"] == 10
  assert {k: os.stat(prepare.shard_path(out, k, 4)).st_mtime_ns for k in (0, 1, 3)} == kept
  second = arrayrecord_io.read_arrays(paths)
  for k in first:
    np.testing.assert_array_equal(second[k], first[k])
  assert prepare.shards_of_process(7, 2, 3) == [2, 5]


def _run_main(argv, capsys):
  code = prepare.main(argv + ["--quiet"])
  err = capsys.readouterr().err
  return code, err


def test_user_mistakes_give_one_line(tmp_path, capsys):
  _make_folder(str(tmp_path / "img"), np.random.default_rng(2))
  base = [f"--vae={SD_VAE}", "--image_size=16"]
  folder = [f"--image_folder={tmp_path / 'img'}"]
  cases = [
      (base + folder + ["--on_bad_image=fail"], "cannot read image .*trunc.png"),
      (base + folder + ["--small_images=fail"], "image .*small.png: short side below"),
      (base + folder + ["--image_size=15"], "--image_size=15 is not a multiple.*2"),
      ([f"--vae={tmp_path}/none"] + folder,
       "VAE folder .*none.* does not exist"),
      (base, "give exactly one input"),
      (base + [f"--image_folder={tmp_path}/missing"], "is not a directory"),
  ]
  labels = tmp_path / "labels.csv"
  labels.write_text("cat/0.png,0\ncat/1.png,x\n")
  cases.append((base + [f"--labels_file={labels}", f"--image_dir={tmp_path / 'img'}"],
                "labels.csv:2: expected"))
  for i, (argv, match) in enumerate(cases):
    code, err = _run_main(argv + [f"--output={tmp_path}/out{i}"], capsys)
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and re.search(match, err), (match, err)


def _write_jsonl(tmp_path, rng, n=3, bad_line=None):
  lines = []
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(
        tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "caption": f"picture {i}"}))
  if bad_line is not None:
    lines[bad_line] = json.dumps({"image": "0.png"})
  path = tmp_path / "pairs.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_jsonl_captions_with_qwen_vae(tmp_path, capsys):
  rng = np.random.default_rng(3)
  jsonl = _write_jsonl(tmp_path, rng)
  emb = {"txt": rng.standard_normal((3, 5, 6)).astype(np.float32),
         "txt_mask": rng.random((3, 5)) < 0.5,
         "pooled": rng.standard_normal((3, 7)).astype(np.float32)}
  np.savez(tmp_path / "emb.npz", **emb)
  out = str(tmp_path / "out")
  assert prepare.main([f"--vae={QWEN_VAE}", f"--jsonl={jsonl}", "--image_size=16",
                       f"--output={out}", f"--caption_embeddings={tmp_path / 'emb.npz'}",
                       "--txt_dtype=float32", "--quiet"]) == 0
  meta = latent_metadata.read_metadata(out)
  assert meta["kind"] == "t2i" and (meta["txt_len"], meta["txt_dim"],
                                    meta["pooled_dim"]) == (5, 6, 7)
  assert (meta["latent_scale"], meta["latent_shift"]) == (1.0, 0.0)
  qwen = json.load(open(os.path.join(QWEN_VAE, "config.json")))
  assert meta["stored_normalization"] == {"mean": qwen["latents_mean"],
                                          "std": qwen["latents_std"]}
  back = arrayrecord_io.read_arrays(os.path.join(out, meta["records"]))
  for k in emb:
    np.testing.assert_array_equal(back[k], emb[k])
  vae = diffusers_vae.load_diffusers_vae(QWEN_VAE)
  crop = prep_images.center_crop_arr(Image.open(tmp_path / "0.png").convert("RGB"), 16)
  z = _encode_mean(vae, [crop])[0]
  stored = (z - np.asarray(qwen["latents_mean"])) / np.asarray(qwen["latents_std"])
  np.testing.assert_allclose(back["latent"][0], stored, atol=1e-5)
  np.testing.assert_allclose(vae_codec.to_vae_latents(back["latent"][0], meta), z,
                             atol=1e-5)

  # Captions embedded by a pipeline's text encoders (tiny Qwen-Image fixture), in JAX.
  text_dir = os.path.join(FIXTURES, "text_encoders", "qwen_image")
  assert prepare.main([f"--vae={QWEN_VAE}", f"--jsonl={jsonl}", "--image_size=16",
                       f"--output={tmp_path / 'out2'}", f"--text_encoder={text_dir}",
                       "--text_family=qwen_image", "--txt_len=10", "--quiet"]) == 0
  meta2 = latent_metadata.read_metadata(str(tmp_path / "out2"))
  back2 = arrayrecord_io.read_arrays(os.path.join(tmp_path, "out2", meta2["records"]))
  encoders = captions.load_text_encoders("qwen_image", text_dir, batch_size=8,
                                         mesh=captions.local_mesh())  # as prepare
  want = captions.embed_captions(["picture 0", "picture 1", "picture 2"], "qwen_image",
                                 encoders, 10)
  assert back2["txt"].dtype.name == "bfloat16" and back2["txt"].shape[1] == 10
  np.testing.assert_array_equal(back2["txt_mask"], want["txt_mask"])
  np.testing.assert_allclose(back2["txt"].astype(np.float32), want["txt"], rtol=1e-2,
                             atol=1e-2)  # stored as bfloat16
  np.testing.assert_array_equal(back2["latent"], back["latent"])
  code, err = _run_main([f"--vae={QWEN_VAE}", f"--jsonl={jsonl}", "--image_size=16",
                         f"--output={tmp_path / 'out3'}", f"--text_encoder={text_dir}"],
                        capsys)
  assert code == 2 and "--text_family" in err
  code, err = _run_main([f"--vae={QWEN_VAE}", f"--jsonl={jsonl}", "--image_size=16",
                         f"--output={tmp_path / 'out3'}", f"--text_encoder={text_dir}",
                         "--text_family=sd3"], capsys)
  assert code == 2 and err.startswith("error: --text_encoder") and err.count("\n") == 1
  code, err = _run_main([f"--vae={QWEN_VAE}", f"--jsonl={jsonl}", "--image_size=16",
                         f"--output={tmp_path / 'out3'}"], capsys)
  assert code == 2 and "needs caption embeddings" in err
  bad = _write_jsonl(tmp_path, rng, bad_line=1)
  code, err = _run_main([f"--vae={QWEN_VAE}", f"--jsonl={bad}", "--image_size=16",
                         f"--output={tmp_path / 'out3'}",
                         f"--caption_embeddings={tmp_path / 'emb.npz'}"], capsys)
  assert code == 2 and "pairs.jsonl:2: caption missing" in err


def test_tfds_input(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "out")
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    meta = prepare.prepare(_args(vae=SD_VAE, tfds="cifar10", image_size=16, output=out,
                                 batch_size=4))
    raw = tfds.data_source("cifar10", split="train")
    expected = [raw[i] for i in range(5)]
  assert meta["num_classes"] == 10 and meta["counts"]["images"] == 5
  assert meta["input"]["type"] == "tfds"
  back = arrayrecord_io.read_arrays(os.path.join(out, meta["records"]))
  np.testing.assert_array_equal(back["label"], [int(e["label"]) for e in expected])
  vae = diffusers_vae.load_diffusers_vae(SD_VAE)
  crop = prep_images.center_crop_arr(Image.fromarray(expected[3]["image"]), 16)
  np.testing.assert_allclose(back["latent"][3], _encode_mean(vae, [crop])[0], atol=1e-5)


def test_model_space_round_trip():
  rng = np.random.default_rng(4)
  z = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  plain = {"latent_shift": 0.1159, "latent_scale": 0.3611, "stored_normalization": None}
  per_channel = {"latent_shift": 0.0, "latent_scale": 2.0, "stored_normalization": {
      "mean": [0.1, -0.2, 0.3, 0.0], "std": [1.0, 2.0, 0.5, 1.5]}}
  np.testing.assert_allclose(vae_codec.to_model_space(z, plain), (z - 0.1159) * 0.3611,
                             rtol=1e-6)
  x = vae_codec.to_model_space(z, per_channel)
  np.testing.assert_allclose(x[..., 1], (z[..., 1] + 0.2) / 2.0 * 2.0, rtol=1e-6)
  for meta in (plain, per_channel):
    np.testing.assert_allclose(
        vae_codec.to_vae_latents(vae_codec.to_model_space(z, meta), meta), z, atol=1e-6)
