"""ArrayRecord latents: schema, writer / reader round trips, CLI, config mismatches."""

import json
import struct

import numpy as np
import pytest

from twinflow_jax import data
from twinflow_jax import errors
from twinflow_jax.data import arrayrecord_io
from twinflow_jax.data import image_ops
from twinflow_jax.data import records
from twinflow_jax.data import write_arrayrecord


def _latents_arrays(n=24, rng=None):
  rng = rng or np.random.default_rng(0)
  return {"latent": rng.standard_normal((n, 4, 4, 4)).astype(np.float16),
          "label": rng.integers(0, 5, n)}


def _t2i_arrays(n=20, rng=None):
  rng = rng or np.random.default_rng(1)
  return {"latent": rng.standard_normal((n, 4, 4, 4)).astype(np.float32),
          "txt": rng.standard_normal((n, 6, 8)).astype(np.float32),
          "txt_mask": rng.random((n, 6)) < 0.6,
          "pooled": rng.standard_normal((n, 3)).astype(np.float32)}


def _config(**fields):
  c = data.default_config()
  for k, v in fields.items():
    c[k] = v
  return c


def _latents_config(prefix, **fields):
  return _config(**{"source": "arrayrecord_latents", "paths": f"{prefix}-*.array_record",
                    "latent_shape": (4, 4, 4), "latent_dtype": "float16",
                    "num_classes": 5, **fields})


def _t2i_config(prefix, **fields):
  return _config(**{"source": "arrayrecord_t2i",
                    "paths": [f"{prefix}-00000-of-00001.array_record"],
                    "latent_shape": (4, 4, 4), "txt_len": 6, "txt_dim": 8,
                    "pooled_dim": 3, **fields})


def test_record_encode_decode_and_header():
  spec = records.t2i_spec((2, 2, 1), 3, 2, 4, "bfloat16", "float16")
  example = {"latent": np.arange(4, dtype=np.float32).reshape(2, 2, 1),
             "txt": np.ones((3, 2)), "txt_mask": np.array([True, False, True]),
             "pooled": np.full(4, 0.5)}
  blob = spec.encode(example)
  assert blob[:4] == b"TWF1"
  assert records.read_header(blob) == spec
  out = spec.decode(blob)
  assert out["latent"].dtype.name == "bfloat16" and out["txt"].dtype == np.float16
  np.testing.assert_array_equal(out["latent"].astype(np.float32), example["latent"])
  np.testing.assert_array_equal(out["txt_mask"], example["txt_mask"])
  # The payload is exactly the raw little-endian field bytes after the header.
  assert len(blob) == len(spec.header) + 4 * 2 + 6 * 2 + 3 + 4 * 2 == spec.nbytes

  # Another writer's equivalent header (spaced JSON) decodes the same, in batches too.
  body = json.dumps({"kind": "t2i", "fields": [
      ["latent", "bfloat16", [2, 2, 1]], ["txt", "float16", [3, 2]],
      ["txt_mask", "bool", [3]], ["pooled", "float16", [4]]]}).encode()
  other = b"TWF1" + struct.pack("<I", len(body)) + body + blob[len(spec.header):]
  batch = spec.decode_batch([blob, other, blob])
  assert batch["txt"].shape == (3, 3, 2)
  for k in out:
    np.testing.assert_array_equal(batch[k][1], out[k])
    np.testing.assert_array_equal(batch[k][0], out[k])
  # A mismatched record in a batch is named.
  wrong = records.t2i_spec((2, 2, 1), 3, 2, 5, "bfloat16", "float16").encode(
      {**example, "pooled": np.zeros(5)})
  with pytest.raises(ValueError, match=r"record 1 of the batch: field 'pooled'.*\(5,\)"):
    spec.decode_batch([blob, wrong], "record")


def test_latents_round_trip(tmp_path):
  arrays = _latents_arrays()
  prefix = str(tmp_path / "lat" / "train")
  paths = arrayrecord_io.write_arrays(prefix, "latents", arrays, num_shards=3,
                                      compression="zstd")
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      f"train-0000{i}-of-00003.array_record" for i in range(3)]
  back = arrayrecord_io.read_arrays(paths)
  np.testing.assert_array_equal(back["latent"], arrays["latent"])
  np.testing.assert_array_equal(back["label"], arrays["label"])
  assert back["label"].dtype == np.int32

  # Through the pipeline, unshuffled: x = (latent - shift) * scale, labels kept.
  c = _latents_config(prefix, shuffle=False, label_dropout=0.0, latent_scale=0.5,
                      latent_shift=0.25)
  assert data.get_data_spec(c) == data.DataSpec((4, 4, 4), 5, "class")
  it = data.create_train_iterator(c, global_batch_size=8, seed=0)
  xs, labels = zip(*[(b["x"], b["label"]) for b in (next(it) for _ in range(3))])
  np.testing.assert_allclose(np.concatenate(xs),
                             (arrays["latent"].astype(np.float32) - 0.25) * 0.5)
  np.testing.assert_array_equal(np.concatenate(labels), arrays["label"])


def test_t2i_round_trip_and_text_dropout(tmp_path):
  arrays = _t2i_arrays()
  prefix = str(tmp_path / "t2i")
  paths = arrayrecord_io.write_arrays(prefix, "t2i", arrays, compression="uncompressed")
  back = arrayrecord_io.read_arrays(paths)
  for k in arrays:
    np.testing.assert_array_equal(back[k], arrays[k])

  c = _t2i_config(prefix, shuffle=False, label_dropout=0.0)
  spec = data.get_data_spec(c)
  assert spec == data.DataSpec((4, 4, 4), 0, "text", (6, 8), 3)
  it = data.create_train_iterator(c, global_batch_size=10, seed=0)
  batch = next(it)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in spec.batch_struct(10).items()}
  for k, name in [("x", "latent"), ("txt", "txt"), ("txt_mask", "txt_mask"),
                  ("pooled", "pooled")]:
    np.testing.assert_array_equal(batch[k], arrays[name][:10])

  # Dropped rows carry the null text: zero embeddings, empty mask, zero pooled.
  c = _t2i_config(prefix, shuffle=False, label_dropout=0.5)
  batch = next(data.create_train_iterator(c, global_batch_size=20, seed=0))
  kept = np.all(batch["txt"] == arrays["txt"], axis=(1, 2))
  assert (~kept).any() and kept.any()
  assert np.all(batch["txt"][~kept] == 0) and np.all(batch["pooled"][~kept] == 0)
  assert not batch["txt_mask"][~kept].any()
  np.testing.assert_array_equal(batch["txt_mask"][kept], arrays["txt_mask"][kept])
  np.testing.assert_array_equal(batch["pooled"][kept], arrays["pooled"][kept])
  np.testing.assert_array_equal(batch["x"], arrays["latent"])  # Latents untouched.


def test_cli_from_npz_and_npy(tmp_path, capsys):
  t2i = _t2i_arrays(n=9)
  np.savez(tmp_path / "t2i.npz", **t2i)
  prefix = str(tmp_path / "out" / "t2i")
  assert write_arrayrecord.main([f"--output={prefix}", "--kind=t2i",
                                 f"--npz={tmp_path / 't2i.npz'}", "--dtype=float16"]) == 0
  assert "config.data.txt_dtype = 'float16'" in capsys.readouterr().out
  back = arrayrecord_io.read_arrays(f"{prefix}-*.array_record")
  assert back["txt"].dtype == np.float16
  np.testing.assert_allclose(back["txt"], t2i["txt"], atol=2e-3)

  lat = _latents_arrays(n=10)
  np.save(tmp_path / "lat.npy", lat["latent"])
  np.save(tmp_path / "lab.npy", lat["label"])
  prefix = str(tmp_path / "out" / "lat")
  write_arrayrecord.main([f"--output={prefix}", f"--latent={tmp_path / 'lat.npy'}",
                          f"--label={tmp_path / 'lab.npy'}", "--num_shards=2"])
  assert "config.data.latent_dtype = 'float16'" in capsys.readouterr().out
  back = arrayrecord_io.read_arrays(f"{prefix}-*.array_record")
  np.testing.assert_array_equal(back["latent"], lat["latent"])
  # A missing input is one line naming the flag, exit status 2, no traceback.
  assert write_arrayrecord.main([f"--output={prefix}",
                                 f"--latent={tmp_path / 'lat.npy'}"]) == 2
  assert capsys.readouterr().err == "error: --kind=latents needs --npz or --label\n"


def _write_ppm(path, image):
  h, w, _ = image.shape
  path.write_bytes(b"P6\n# test\n%d %d\n255\n" % (w, h) + image.tobytes())


def test_image_folder_mode(tmp_path):
  rng = np.random.default_rng(2)
  folder = tmp_path / "images"
  images = {}
  for name in ("cat", "dog"):
    (folder / name).mkdir(parents=True)
    for i in range(3):
      image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
      images[(name, i)] = image
      if i % 2:
        np.save(folder / name / f"{i}.npy", image[..., 0])  # Grey .npy image.
      else:
        _write_ppm(folder / name / f"{i}.ppm", image)
  (folder / "dog" / "notes.txt").write_text("not an image")
  prefix = str(tmp_path / "px" / "train")
  write_arrayrecord.main([f"--image_folder={folder}", "--image_size=8",
                          f"--output={prefix}"])
  assert (tmp_path / "px" / "train.classes.txt").read_text().split() == ["cat", "dog"]
  back = arrayrecord_io.read_arrays(f"{prefix}-*.array_record")
  assert back["latent"].shape == (6, 8, 8, 3) and back["latent"].dtype == np.uint8
  np.testing.assert_array_equal(back["label"], [0, 0, 0, 1, 1, 1])
  # cat/0.ppm: the central 12 x 12 square, resized to 8 x 8.
  expected = np.rint(image_ops.resize(images[("cat", 0)][:, 2:14], 8, 8))
  np.testing.assert_array_equal(back["latent"][0], expected)
  grey = back["latent"][1]  # cat/1.npy, stored grey, tiled to RGB.
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])

  c = _config(source="arrayrecord_latents", paths=f"{prefix}-*.array_record",
              latent_shape=(8, 8, 3), latent_dtype="uint8", num_classes=2,
              shuffle=False, label_dropout=0.0)
  batch = next(data.create_train_iterator(c, global_batch_size=6, seed=0))
  np.testing.assert_allclose(batch["x"], back["latent"] / 127.5 - 1, atol=1e-6)


def test_mismatched_records_fail_clearly(tmp_path):
  prefix = str(tmp_path / "lat")
  arrayrecord_io.write_arrays(prefix, "latents", _latents_arrays())
  with pytest.raises(ValueError, match=r"shape \(4, 4, 4\).*expects.*\(8, 8, 4\)"):
    data.create_train_iterator(_latents_config(prefix, latent_shape=(8, 8, 4)),
                               global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="dtype float16.*expects dtype float32"):
    data.create_train_iterator(_latents_config(prefix, latent_dtype="float32"),
                               global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="'latents' record but the config reads 't2i'"):
    data.create_train_iterator(_t2i_config(prefix, latent_dtype="float16"),
                               global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="outside"):  # Labels 0..4 but 3 classes.
    it = data.create_train_iterator(_latents_config(prefix, num_classes=3),
                                    global_batch_size=24, seed=0)
    next(it)
  with pytest.raises(FileNotFoundError, match="write_arrayrecord"):
    data.create_train_iterator(_latents_config(str(tmp_path / "missing")),
                               global_batch_size=4, seed=0)


def test_unreadable_files_and_folders_are_named(tmp_path):
  # Corrupt, cut-short or too-small files and folders: user errors that name the path.
  prefix = str(tmp_path / "lat")
  good = arrayrecord_io.write_arrays(prefix, "latents", _latents_arrays())[0]
  blob = open(good, "rb").read()
  bad = {"cut": blob[:len(blob) // 2], "tiny": b"xy",
         "noise": np.random.default_rng(0).bytes(len(blob))}
  for name, content in bad.items():
    path = tmp_path / f"{name}.array_record"
    path.write_bytes(content)
    c = _latents_config(prefix, paths=[good, str(path)])
    with pytest.raises(errors.DataError, match=f"cannot read ArrayRecord file {path}"):
      data.create_train_iterator(c, global_batch_size=4, seed=0)
    with pytest.raises(errors.DataError, match=f"ArrayRecord file {path}"):
      arrayrecord_io.read_arrays([str(path)])
  folder = tmp_path / "shards"
  folder.mkdir()
  with pytest.raises(errors.PathError, match=f"names the folder '{folder}'.*{folder}/\\*"):
    data.create_train_iterator(_latents_config(prefix, paths=str(folder)),
                               global_batch_size=4, seed=0)
  with pytest.raises(errors.PathError, match="matches only folders"):
    data.create_train_iterator(_latents_config(prefix, paths=str(tmp_path / "sh*")),
                               global_batch_size=4, seed=0)
