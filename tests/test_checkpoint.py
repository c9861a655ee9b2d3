"""The checkpoint module's parts: checksums, save refusal, rotation, read-only restore."""

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from twinflow_jax import errors
from twinflow_jax.train import checkpoint as ckpt_lib
from twinflow_jax.train import config as config_lib
from twinflow_jax.train import faults


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  return {"f32": rng.standard_normal((16, 8)).astype(np.float32),
          "bf16": rng.standard_normal((8, 4)).astype(jnp.bfloat16),
          "i32": rng.integers(-5, 5, (8,)).astype(np.int32),
          "u32": rng.integers(0, 2**32, (2,), dtype=np.uint32),
          "scalar": np.float32(0.5)}


def _summaries(tree):
  return dict(zip(ckpt_lib.leaf_names(tree), ckpt_lib._summaries(jax.tree.leaves(tree))))


def test_checksums_are_exact_on_any_mesh_and_see_every_flipped_bit():
  host = _arrays()
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  specs = {"f32": jax.P("data", ("fsdp", "tensor")), "bf16": jax.P(("data", "fsdp"), None),
           "i32": jax.P("tensor"), "u32": jax.P(), "scalar": jax.P()}
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k]))
             for k, v in host.items()}
  one = {k: jax.device_put(v, jax.devices()[0]) for k, v in host.items()}
  assert _summaries(sharded) == _summaries(one)
  ref = _summaries(one)
  rng = np.random.default_rng(1)
  for key in ("f32", "bf16", "i32"):
    for _ in range(6):
      flipped = dict(host)
      raw = host[key].copy().view(np.uint8).reshape(-1)
      i = int(rng.integers(raw.size))
      raw[i] ^= np.uint8(1 << int(rng.integers(8)))
      flipped[key] = raw.view(host[key].dtype).reshape(host[key].shape)
      got = _summaries(flipped)
      assert got[key]["checksum"] != ref[key]["checksum"], (key, i)
  nan = dict(host, f32=np.where(np.arange(128).reshape(16, 8) == 5, np.nan, host["f32"]))
  assert _summaries(nan)["f32"]["nonfinite"] == 1


def _state(nan=False):
  params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
  if nan:
    params = dict(params, b=params["b"].at[2].set(jnp.inf))
  return {"params": params, "ema": jax.tree.map(lambda a: a * 2, params),
          "step": jnp.int32(3)}


def test_a_non_finite_state_is_never_saved(tmp_path):
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "c"), save_every=1, keep=2)
  ckpt.save(1, _state(), None, {"a": 1})
  with pytest.raises(errors.NonFiniteError, match=r"refusing to save checkpoint 2: the "
                     r"state holds non-finite values in ema/b \(1\), params/b \(1\); the "
                     r"existing checkpoints \[1\] are kept"):
    ckpt.save(2, _state(nan=True), None, {"a": 1})
  ckpt.close()
  assert ckpt_lib.restorable_steps(str(tmp_path / "c")) == [1]


def test_a_checkpoint_that_fails_read_back_never_rotates_out_the_good_one(tmp_path,
                                                                         monkeypatch):
  directory = str(tmp_path / "c")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=1)
  ckpt.save(1, _state(), None, {"a": 1})
  ckpt.finish()                              # read back, verified
  monkeypatch.setenv(faults.ENV, "readback_error@2")
  ckpt.save(2, _state(), None, {"a": 1})
  with pytest.raises(errors.CheckpointSaveError, match="checkpoint 2 .* does not read back"):
    ckpt.finish()
  ckpt.close()
  assert ckpt_lib.restorable_steps(directory) == [1, 2]   # keep=1, yet 1 is not deleted
  monkeypatch.delenv(faults.ENV)
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=1)
  ckpt.save(3, _state(), None, {"a": 1})
  ckpt.finish()
  ckpt.close()
  assert ckpt_lib.restorable_steps(directory) == [3]


def _listing(root):
  return sorted((str(p), p.stat().st_size) for p in pathlib.Path(root).rglob("*"))


def test_restore_items_is_read_only_and_verified(tmp_path):
  directory = str(tmp_path / "c")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=3)
  ckpt.save(5, _state(), None, {"a": 1})
  ckpt.close()
  assert ckpt_lib.restorable_steps(directory) == [5]
  before = _listing(directory)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                          {"params": _state()["params"], "ema": _state()["ema"]})
  out = ckpt_lib.restore_items(directory, 5, abstract)
  assert sorted(out) == ["ema", "params"]
  np.testing.assert_array_equal(out["ema"]["w"], 2 * np.arange(12.0).reshape(3, 4))
  # A damaged record (as a damaged array would) fails verification; nothing is touched.
  record = epath.Path(directory) / "5" / "integrity" / "metadata"
  data = json.loads(record.read_text())
  data["arrays"]["params/w"]["checksum"] = "0" * 16
  record.write_text(json.dumps(data))
  before = _listing(directory)
  with pytest.raises(errors.CheckpointRestoreError, match=r"5 fails verification: "
                     r"params/w: checksum"):
    ckpt_lib.restore_items(directory, 5, abstract)
  with pytest.raises(errors.CheckpointRestoreError, match="cannot read checkpoint"):
    ckpt_lib.restore_items(directory, 7, abstract)
  assert _listing(directory) == before


def test_data_position_of_another_process_count(tmp_path):
  data_dir = epath.Path(tmp_path)
  for i in range(2):
    (data_dir / f"process_{i}-of-2.json").write_text('{"next_index": 5}')
  state, note = ckpt_lib._data_state(data_dir, data_dir / "process_0-of-1.json")
  assert state == {"next_index": 5} and "2 process(es)" in note
  # A missing file of the same process count is an error naming it.
  with pytest.raises(FileNotFoundError, match="process_2-of-2.json is missing"):
    ckpt_lib._data_state(data_dir, data_dir / "process_2-of-2.json")
  (data_dir / "process_0-of-3.json").write_text('{"next_ind')    # cut short
  with pytest.raises(ValueError, match="process_0-of-3.json is unreadable"):
    ckpt_lib._data_state(data_dir, data_dir / "process_0-of-3.json")
  (data_dir / "process_0-of-3.json").unlink()
  (data_dir / "process_1-of-2.json").write_text('{"next_index": 6}')
  with pytest.raises(FileNotFoundError, match="process_0-of-1.json is missing"):
    ckpt_lib._data_state(data_dir, data_dir / "process_0-of-1.json")


def test_resume_differences_allow_schedule_length_and_mesh_only():
  saved = ckpt_lib.config_to_json(config_lib.base_config())
  now = ckpt_lib.config_to_json(config_lib.base_config())
  now["train"].update(num_steps=5, log_every=7, checkpoint_every=3, sample_every=0)
  now["mesh"].update(data=2, fsdp=4)
  assert config_lib.resume_differences(saved, now) == []
  now["train"]["global_batch_size"] = 128
  now["data"]["shuffle_seed"] = 3
  now["optim"]["lr"] = 1.0
  now["seed"] = 1
  assert config_lib.resume_differences(saved, now) == [
      "data.shuffle_seed: None -> 3", "optim.lr: 0.0001 -> 1.0",
      "seed: 0 -> 1", "train.global_batch_size: 64 -> 128"]
  del now["loss"]["delta"]
  assert "loss.delta: 0.01 -> '<absent>'" in config_lib.resume_differences(saved, now)
  assert os.environ.get(faults.ENV) is None


def _raise_from(filename: str) -> BaseException:
  """An exception whose traceback has one frame in `filename`."""
  try:
    exec(compile("raise ValueError('OUT_OF_RANGE')", filename, "exec"))
  except ValueError as cause:
    try:
      raise Exception("Encountered error while reading array index") from cause
    except Exception as e:  # pylint: disable=broad-except
      return e


@pytest.mark.parametrize("message, filename, dropped", [
    # A gathering future's repr names only the exception: its traceback says Orbax.
    ("_GatheringFuture exception was never retrieved", "/site/orbax/checkpoint/io.py", True),
    ("Task exception was never retrieved", "/site/orbax/checkpoint/io.py", True),
    ("Exception in callback _chain_future", "/site/orbax/checkpoint/io.py", True),
    ("_GatheringFuture exception was never retrieved", "/site/mylib/io.py", False),
    ("Exception in callback _chain_future", "/site/mylib/io.py", False),
])
def test_asyncio_filter_drops_only_abandoned_orbax_reads(message, filename, dropped):
  import logging
  e = _raise_from(filename.replace("/", os.sep))
  record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                             f"{message}\nfuture: <finished exception={e!r}>", None,
                             (type(e), e, e.__traceback__))
  assert ckpt_lib._not_an_abandoned_read(record) is not dropped
  plain = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Unclosed client session",
                            None, None)
  assert ckpt_lib._not_an_abandoned_read(plain)
  closed = RuntimeError("Event loop is closed")
  assert not ckpt_lib._not_an_abandoned_read(logging.LogRecord(
      "asyncio", logging.ERROR, __file__, 1, "Exception in callback", None,
      (RuntimeError, closed, None)))
