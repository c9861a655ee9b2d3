"""Sources of twinflow_jax.data: bundled MNIST, toy 2-D, TFDS (mocked), image ops."""

import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from twinflow_jax import data
from twinflow_jax.data import image_ops
from twinflow_jax.data import sources


def _config(**fields):
  c = data.default_config()
  for k, v in fields.items():
    c[k] = v
  return c


def _first_batches(c, n, batch=16, seed=0, **kwargs):
  it = data.create_train_iterator(c, global_batch_size=batch, seed=seed, **kwargs)
  return [next(it) for _ in range(n)]


def test_import_does_not_load_tensorflow():
  code = ("import sys, twinflow_jax.data; "
          "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.split() == ["False", "False"]


def test_bundled_mnist_asset():
  images, labels = sources.load_mnist()
  assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
  assert np.array_equal(np.bincount(labels), np.full(10, 500))
  assert images.max() == 255 and images[:, 0, :].max() == 0  # Ink, empty top row.


def test_mnist_default_config_batches():
  c = data.default_config()
  assert c.source == "mnist"
  spec = data.get_data_spec(c)
  assert spec == data.DataSpec((32, 32, 1), 10, "class")
  (batch,) = _first_batches(_config(shuffle=False, label_dropout=0.0), 1)
  want = spec.batch_struct(16)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in want.items()}
  images, labels = sources.load_mnist()
  # Unshuffled: the first examples in order, padded by 2 pixels of background (-1).
  np.testing.assert_array_equal(batch["label"], labels[:16])
  np.testing.assert_allclose(batch["x"][:, 2:30, 2:30, 0], images[:16] / 127.5 - 1,
                             atol=1e-6)
  assert np.all(batch["x"][:, :2] == -1) and np.all(batch["x"][:, :, 30:] == -1)


def test_mnist_rgb_and_resize():
  c = _config(channels=3, image_size=16)
  assert data.get_data_spec(c).x_shape == (16, 16, 3)
  (batch,) = _first_batches(c, 1, batch=4)
  x = batch["x"]
  assert x.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  assert x.min() >= -1 and x.max() <= 1


def test_toy2d_source_matches_generator():
  c = _config(source="toy2d", name="moons", toy2d_size=64, shuffle=False,
              label_dropout=0.0, toy2d_seed=3)
  assert data.get_data_spec(c) == data.DataSpec((2,), 1, "class")
  batches = _first_batches(c, 4)
  want = data.sample_toy2d("moons", 64, np.random.default_rng(3))
  np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), want)
  assert all(np.all(b["label"] == 0) for b in batches)


@pytest.mark.parametrize("name, image_size", [("cifar10", 32), ("imagenet2012", 24)])
def test_tfds_mock_data(name, image_size):
  c = _config(source="tfds", name=name, image_size=image_size, shuffle=False,
              label_dropout=0.0, data_dir="/nonexistent")
  num_classes = {"cifar10": 10, "imagenet2012": 1000}[name]
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    spec = data.get_data_spec(c)
    assert spec == data.DataSpec((image_size, image_size, 3), num_classes, "class")
    (batch,) = _first_batches(c, 1, batch=8)
    raw = tfds.data_source(name, split="train")
    expected = [raw[i] for i in range(8)]
  assert batch["x"].shape == (8, image_size, image_size, 3)
  assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["label"], [int(e["label"]) for e in expected])
  for x, e in zip(batch["x"], expected):
    image = image_ops.square_resize_uint8(e["image"], image_size)
    np.testing.assert_allclose(x, image / 127.5 - 1, atol=1e-6)
  assert batch["x"].min() >= -1 and batch["x"].max() <= 1


def test_tfds_processes_split_each_global_batch():
  # 13 fake examples; every process opens the whole split and keeps its rows of each
  # global batch, so two processes together read exactly the one-process batches.
  n = 13
  examples = [{"image": np.full((32, 32, 3), i, np.uint8), "label": np.int64(i % 10)}
              for i in range(n)]
  requested = []

  def fake_data_source(name, *, split, data_dir, download):
    assert (name, download) == ("cifar10", False)
    requested.append(split)
    return examples

  c = _config(source="tfds", name="cifar10", label_dropout=0.0, num_epochs=1)

  def ids_of(index, count):
    it = data.create_train_iterator(c, global_batch_size=6, seed=0,
                                    process_index=index, process_count=count)
    return [[int(round((x[0, 0, 0] + 1) * 127.5)) for x in b["x"]] for b in it]

  with mock.patch.object(tfds, "data_source", fake_data_source):
    one = ids_of(0, 1)
    two = [ids_of(i, 2) for i in range(2)]
  assert requested == ["train"] * 3
  assert len(one) == 2 and all(len(b) == 6 for b in one)   # 12 of 13: last batch dropped
  assert [a + b for a, b in zip(*two)] == one
  assert len(set(sum(one, []))) == 12


def test_tfds_not_prepared_says_how(tmp_path):
  c = _config(source="tfds", name="cifar10", data_dir=str(tmp_path), channels=3,
              num_classes=10)
  with pytest.raises(FileNotFoundError, match="tfds build cifar10.*array_record"):
    data.create_train_iterator(c, global_batch_size=8, seed=0)
  assert not (tmp_path / "downloads").exists()  # Nothing was downloaded.


def test_tfds_num_classes_mismatch():
  c = _config(source="tfds", name="cifar10", num_classes=100)
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="num_classes=100"):
      data.create_train_iterator(c, global_batch_size=4, seed=0)


def test_resize_preserves_constants_and_ramps():
  const = np.full((37, 23, 2), 7.0, np.float32)
  np.testing.assert_allclose(image_ops.resize(const, 10, 50), 7.0, rtol=1e-6)
  ramp = np.tile(np.arange(64, dtype=np.float32)[None, :, None], (4, 1, 1))
  out = image_ops.resize(ramp, 4, 32)[0, :, 0]
  # Away from the borders a linear ramp stays linear (centres at 2i + 0.5).
  np.testing.assert_allclose(out[2:-2], 2 * np.arange(2, 30) + 0.5, atol=1e-4)
  image = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
  assert image_ops.center_crop_square(image).shape == (5, 5, 3)
  np.testing.assert_array_equal(image_ops.center_crop_square(image), image[:, 1:6])


def test_bad_config_fields():
  with pytest.raises(ValueError, match="unknown config.data fields"):
    data.validate_config({"sorce": "mnist"})
  with pytest.raises(ValueError, match="source"):
    data.validate_config(_config(source="imagenet"))
  with pytest.raises(ValueError, match="label_dropout"):
    data.validate_config(_config(label_dropout=1.5))
  with pytest.raises(ValueError, match="gaussians8"):
    data.validate_config(_config(source="toy2d", name="spiral"))
  with pytest.raises(ValueError, match="num_classes"):
    data.validate_config(_config(source="arrayrecord_latents", paths="x",
                                 latent_shape=(4, 4, 4)))
