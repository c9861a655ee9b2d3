"""The Grain pipeline: determinism, resume, process sharding, augmentations, global batches."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from twinflow_jax import data
from twinflow_jax.data import arrayrecord_io


def _config(**fields):
  c = data.default_config()
  for k, v in fields.items():
    c[k] = v
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_determinism_and_seed_dependence():
  c = _config(hflip=True, label_dropout=0.2)
  run = lambda seed: _take(data.create_train_iterator(c, global_batch_size=32,
                                                      seed=seed), 3)
  _assert_same(run(0), run(0))
  other = run(1)
  assert not np.array_equal(run(0)[0]["label"], other[0]["label"])
  # shuffle_seed, when set, overrides the run seed.
  c.shuffle_seed = 7
  _assert_same(run(0), run(1))


def test_epochs_are_reshuffled_permutations():
  c = _config(source="toy2d", name="gaussians8", toy2d_size=40, label_dropout=0.0)
  batches = _take(data.create_train_iterator(c, global_batch_size=20, seed=0), 4)
  points = data.sample_toy2d("gaussians8", 40, np.random.default_rng(0))
  key = lambda xs: sorted(map(tuple, xs))
  epoch1 = np.concatenate([b["x"] for b in batches[:2]])
  epoch2 = np.concatenate([b["x"] for b in batches[2:]])
  assert key(epoch1) == key(epoch2) == key(points)
  assert not np.array_equal(epoch1, epoch2)  # A new order each epoch.
  # Batches larger than the data span several epochs, each a permutation.
  c.toy2d_size = 5
  (batch,) = _take(data.create_train_iterator(c, global_batch_size=15, seed=0), 1)
  points = data.sample_toy2d("gaussians8", 5, np.random.default_rng(0))
  for epoch in np.split(batch["x"], 3):
    assert key(epoch) == key(points)


def _save_restore(tmp_path, c, seed, steps_before=3, steps_after=4):
  """Checkpoints the iterator in an Orbax Composite and resumes in a new iterator."""
  it = data.create_train_iterator(c, global_batch_size=16, seed=seed)
  _take(it, steps_before)
  state = {"step": np.array(steps_before, np.int32)}
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(steps_before, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    uninterrupted = _take(it, steps_after)
    resumed_it = data.create_train_iterator(c, global_batch_size=16, seed=seed)
    restored = mngr.restore(steps_before, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=grain.checkpoint.CheckpointRestore(resumed_it)))
  assert int(restored.state["step"]) == steps_before
  resumed = _take(resumed_it, steps_after)
  for i in (it, resumed_it):
    if hasattr(i, "close"):
      i.close()
  return uninterrupted, resumed


def test_resume_equals_uninterrupted_run(tmp_path):
  c = _config(hflip=True, label_dropout=0.3)
  uninterrupted, resumed = _save_restore(tmp_path, c, seed=5)
  _assert_same(uninterrupted, resumed)


def test_resume_with_worker_processes(tmp_path):
  c = _config(label_dropout=0.3, worker_count=2, read_threads=2,
              prefetch_buffer_size=16)
  uninterrupted, resumed = _save_restore(tmp_path, c, seed=2, steps_before=5)
  _assert_same(uninterrupted, resumed)
  # Worker processes do not change the batches.
  c.worker_count = 0
  _assert_same(uninterrupted,
               _take(data.create_train_iterator(c, global_batch_size=16, seed=2), 9)[5:])


def _epoch_of_each_process(c, process_count, global_batch_size):
  out = []
  for index in range(process_count):
    it = data.create_train_iterator(c, global_batch_size=global_batch_size, seed=3,
                                    process_index=index, process_count=process_count)
    out.append([b for b in it])
  return out


def test_two_process_shards_are_disjoint_and_cover_toy_data():
  c = _config(source="toy2d", name="checkerboard", toy2d_size=100, num_epochs=1,
              label_dropout=0.0)
  per_process = _epoch_of_each_process(c, 2, global_batch_size=20)
  points = [set(map(tuple, np.concatenate([b["x"] for b in batches])))
            for batches in per_process]
  assert len(per_process[0]) == len(per_process[1]) == 5  # 50 examples, batch 10.
  assert not points[0] & points[1]
  all_points = data.sample_toy2d("checkerboard", 100, np.random.default_rng(0))
  assert points[0] | points[1] == set(map(tuple, all_points))


def test_two_process_shards_of_records(tmp_path):
  # Example i stores the value i everywhere, so ids can be read back from x.
  n = 30
  latent = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                           (n, 2, 2, 1))
  prefix = str(tmp_path / "ids")
  arrayrecord_io.write_arrays(prefix, "latents",
                              {"latent": latent, "label": np.arange(n) % 3}, num_shards=2)
  c = _config(source="arrayrecord_latents", paths=f"{prefix}-*", latent_shape=(2, 2, 1),
              num_classes=3, num_epochs=1, label_dropout=0.0)
  per_process = _epoch_of_each_process(c, 2, global_batch_size=6)
  ids = [[int(x[0, 0, 0]) for b in batches for x in b["x"]] for batches in per_process]
  assert len(ids[0]) == len(ids[1]) == 15
  assert not set(ids[0]) & set(ids[1])
  assert set(ids[0]) | set(ids[1]) == set(range(n))
  labels = np.concatenate([b["label"] for b in per_process[0]])
  np.testing.assert_array_equal(labels, np.array(ids[0]) % 3)


@pytest.mark.parametrize("count", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(count):
  # Rows of process p are rows [p b, (p + 1) b) of the one-process batch, augmentations
  # (flips, label drops) included: a multi-host run trains on the same batches.
  c = _config(source="mnist", image_size=8, hflip=True, label_dropout=0.3)
  one = _take(data.create_train_iterator(c, global_batch_size=16, seed=5), 3)
  parts = [_take(data.create_train_iterator(c, global_batch_size=16, seed=5,
                                            process_index=i, process_count=count), 3)
           for i in range(count)]
  for k in range(3):
    for key in ("x", "label"):
      np.testing.assert_array_equal(np.concatenate([p[k][key] for p in parts]), one[k][key])
  # A process whose devices hold scattered rows loads exactly those rows.
  rows = [1, 5, 6, 12]
  mine = _take(data.create_train_iterator(c, global_batch_size=16, seed=5, rows=rows,
                                          process_index=0, process_count=count), 3)
  for k in range(3):
    np.testing.assert_array_equal(mine[k]["x"], one[k]["x"][rows])


def test_processes_draw_independent_orders_and_augmentations():
  # The bundled MNIST is sorted by class: with one permutation shared by all processes,
  # the two processes would read neighbouring records (same class) at every position.
  c = _config(source="mnist", label_dropout=0.5, num_epochs=1)
  first = [next(data.create_train_iterator(c, global_batch_size=512, seed=3,
                                           process_index=i, process_count=2))
           for i in range(2)]
  same_label = np.mean(first[0]["label"] == first[1]["label"])
  assert same_label < 0.5, same_label   # dropped labels (1/2) plus 1/10 chance agreement
  dropped = [b["label"] == 10 for b in first]
  assert 0.3 < np.mean(dropped[0] == dropped[1]) < 0.7


def test_label_dropout_ratio():
  c = _config(label_dropout=0.25)
  labels = np.concatenate([b["label"] for b in _take(
      data.create_train_iterator(c, global_batch_size=250, seed=0), 16)])
  assert labels.dtype == np.int32
  dropped = np.mean(labels == 10)
  # 4000 draws: standard deviation 0.0068, the tolerance is over 4 of them.
  assert abs(dropped - 0.25) < 0.03
  assert labels.min() >= 0 and labels.max() <= 10
  assert len(np.unique(labels[labels < 10])) == 10
  c.label_dropout = 0.0
  labels = next(data.create_train_iterator(c, global_batch_size=500, seed=0))["label"]
  assert labels.max() < 10


def test_hflip_flips_about_half():
  plain = next(data.create_train_iterator(_config(label_dropout=0.0),
                                          global_batch_size=200, seed=4))
  flipped = next(data.create_train_iterator(_config(label_dropout=0.0, hflip=True),
                                            global_batch_size=200, seed=4))
  np.testing.assert_array_equal(plain["label"], flipped["label"])
  same = np.all(plain["x"] == flipped["x"], axis=(1, 2, 3))
  mirrored = np.all(plain["x"][:, :, ::-1] == flipped["x"], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert 0.35 < np.mean(mirrored & ~same) < 0.65


def test_batch_must_divide_process_count():
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    data.create_train_iterator(_config(), global_batch_size=10, seed=0,
                               process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.create_train_iterator(_config(), global_batch_size=8, seed=0,
                               process_index=2, process_count=2)


def test_make_global_batch_shards_over_batch_axes():
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = next(data.create_train_iterator(_config(), global_batch_size=16, seed=0))
  out = data.make_global_batch(batch, mesh)
  assert out.keys() == batch.keys()
  for k, v in out.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape
    assert v.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert len(v.addressable_shards) == 8
    assert v.addressable_shards[0].data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(v), batch[k])
  data_only = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  assert data.make_global_batch(batch, data_only)["x"].sharding.spec == (
      jax.sharding.PartitionSpec(("data",)))
  with pytest.raises(ValueError, match="not divisible"):
    data.make_global_batch({"x": np.zeros((12, 2))}, mesh)
  with pytest.raises(ValueError, match="none of the batch axes"):
    data.make_global_batch(batch, mesh, batch_axes=("replica",))
