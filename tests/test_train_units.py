"""Unit tests of the trainer's parts: mesh, optimizer, PNG writer, metrics, preemption."""

import json
import os
import signal
import struct
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from twinflow_jax.train import images
from twinflow_jax.train import mesh as mesh_lib
from twinflow_jax.train import metrics
from twinflow_jax.train import optim
from twinflow_jax.train import preemption


def _mesh_cfg(**kw):
  base = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


# ------------------------------------------------------------------------------ mesh


def test_mesh_fills_minus_one_and_uses_all_devices():
  mesh = mesh_lib.create_mesh(_mesh_cfg(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh_lib.batch_shards(mesh) == 4
  one = mesh_lib.create_mesh(_mesh_cfg(data=1), devices=jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_multislice_shapes():
  ici, dcn = mesh_lib.mesh_shape(_mesh_cfg(data=1, fsdp=-1, tensor=2, dcn_data=-1),
                                 num_devices=32, num_slices=4)
  assert ici == (1, 4, 2) and dcn == (4, 1, 1)


@pytest.mark.parametrize("kw, match", [
    (dict(data=3), r"data=3.*multiply to 3, but there are 8 devices"),
    (dict(data=-1, fsdp=3), r"cannot fill 8 devices: 8 is not divisible by 3"),
    (dict(data=-1, fsdp=-1), r"at most one in-slice mesh size may be -1"),
    (dict(data=0), r"must be positive or -1"),
])
def test_bad_mesh_sizes(kw, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.create_mesh(_mesh_cfg(**kw))


def test_batch_must_divide_mesh():
  mesh = mesh_lib.create_mesh(_mesh_cfg(data=4, fsdp=2))
  mesh_lib.check_batch_size(16, mesh, process_count=1)
  with pytest.raises(ValueError, match=r"global batch size 12 does not divide the 8 batch "
                     r"shards of the mesh \(data=4 x fsdp=2\)"):
    mesh_lib.check_batch_size(12, mesh, process_count=1)


def test_row_blocks_hint_on_meshes():
  from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
  assert loop.row_blocks_hint(1, 1) is None and loop.row_blocks_hint(3, 1) is None
  assert loop.row_blocks_hint(8, 8) is None and loop.row_blocks_hint(16, 8) is None
  hint = loop.row_blocks_hint(1, mesh_lib.batch_shards(mesh_lib.create_mesh(
      _mesh_cfg(data=2, fsdp=2, tensor=2))))
  assert hint.startswith("loss.row_blocks=1 on a mesh with 4 batch shards")
  assert "--config.loss.row_blocks=4 keeps" in hint
  assert loop.row_blocks_hint(4, 8) is not None


def test_check_shardable_names_array_and_numbers():
  mesh = mesh_lib.create_mesh(_mesh_cfg(data=2, fsdp=4))
  tree = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32)}
  mesh_lib.check_shardable(tree, {"w": jax.P("fsdp", None)}, mesh)
  with pytest.raises(ValueError, match=r"\['w'\] of shape \(8, 6\).*dimension 6 is not "
                     r"divisible by fsdp=4 = 4"):
    mesh_lib.check_shardable(tree, {"w": jax.P(None, "fsdp")}, mesh)


def test_logical_rules_override_defaults():
  rules = mesh_lib.logical_rules([("embed", None), ("new", ["data", "fsdp"])],
                                 (("embed", "fsdp"), ("mlp", "tensor")))
  assert dict(rules) == {"embed": None, "mlp": "tensor", "new": ("data", "fsdp")}
  for bad, match in ((["abc"], "each rule must be a pair"),
                     ([("embed", "bar")], r"rule 'embed' names mesh axes \['bar'\]")):
    with pytest.raises(ValueError, match=r"config.mesh.logical_axis_rules: " + match):
      mesh_lib.logical_rules(bad, (("embed", "fsdp"),))


# ------------------------------------------------------------------------------ optim


def _optim_cfg(**kw):
  base = dict(name="adamw", lr=1e-2, schedule="constant", warmup_steps=0, min_lr_ratio=0.0,
              b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0, accum_steps=1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_schedules():
  _, const = optim.create_optimizer(_optim_cfg(), 100)
  assert float(const(0)) == float(const(99)) == pytest.approx(1e-2)
  _, cos = optim.create_optimizer(
      _optim_cfg(schedule="warmup_cosine", warmup_steps=10, min_lr_ratio=0.1), 100)
  assert float(cos(0)) == 0.0
  assert float(cos(10)) == pytest.approx(1e-2)
  assert float(cos(100)) == pytest.approx(1e-3)
  # With accumulation the schedule counts optimizer updates: 100 steps / 4 = 25 updates.
  _, acc = optim.create_optimizer(
      _optim_cfg(schedule="warmup_cosine", warmup_steps=5, accum_steps=4), 100)
  assert float(acc(25)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", ["adamw", "radam"])
def test_optimizers_clip_and_step(name):
  tx, _ = optim.create_optimizer(_optim_cfg(name=name, grad_clip=1.0), 10)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  updates, _ = tx.update({"w": jnp.full(3, 100.0)}, state, params)
  assert np.all(np.isfinite(updates["w"])) and np.all(updates["w"] < 0)


def test_accumulation_updates_every_k_with_the_mean_gradient():
  tx, _ = optim.create_optimizer(_optim_cfg(accum_steps=2, grad_clip=0.0), 10)
  ref, _ = optim.create_optimizer(_optim_cfg(accum_steps=1, grad_clip=0.0), 10)
  params = {"w": jnp.zeros(2)}
  s = tx.init(params)
  u1, s = tx.update({"w": jnp.array([1.0, 3.0])}, s, params)
  assert np.all(u1["w"] == 0)        # first micro-batch: no update yet
  u2, s = tx.update({"w": jnp.array([3.0, 1.0])}, s, params)
  u_ref, _ = ref.update({"w": jnp.array([2.0, 2.0])}, ref.init(params), params)
  np.testing.assert_allclose(u2["w"], u_ref["w"], rtol=1e-6)


@pytest.mark.parametrize("kw, match", [
    (dict(name="sgd"), r"unknown optim.name 'sgd'"),
    (dict(schedule="linear"), r"unknown optim.schedule 'linear'"),
    (dict(lr=0.0), r"optim.lr must be > 0"),
    (dict(accum_steps=0), r"optim.accum_steps must be >= 1"),
    (dict(b2=1.0), r"optim.b2 must be in \[0, 1\)"),
    (dict(schedule="warmup_cosine", warmup_steps=50), r"more updates \(10\) than warmup"),
])
def test_bad_optim_config(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.create_optimizer(_optim_cfg(**kw), 10)


# ------------------------------------------------------------------------------ PNG


def _decode_png(data: bytes) -> np.ndarray:
  """Minimal PNG reader for 8-bit, filter-0 images (what encode_png writes)."""
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  pos, idat, header = 8, b"", None
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
    assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
    if tag == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif tag == b"IDAT":
      idat += body
    pos += 12 + length
  width, height, depth, color = header[:4]
  channels = {0: 1, 2: 3, 6: 4}[color]
  assert depth == 8
  raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * channels)
  assert np.all(raw[:, 0] == 0)
  return raw[:, 1:].reshape(height, width, channels)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (4, 3, 4)])
def test_png_roundtrip(shape, tmp_path):
  img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
  path = str(tmp_path / "x.png")
  images.write_png(path, img)
  with open(path, "rb") as f:
    back = _decode_png(f.read())
  np.testing.assert_array_equal(back.reshape(img.shape), img)


def test_grid_and_scatter_images():
  x = np.linspace(-1, 1, 6 * 4 * 4 * 1, dtype=np.float32).reshape(6, 4, 4, 1)
  grid = images.samples_to_image(x)
  # 2 x 3 tiles, each 4 x 4 enlarged 16x to 64 x 64, 2-pixel padding.
  assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 1) and grid.dtype == np.uint8
  plain = images.make_grid(images.to_uint8(x))
  assert plain.shape == (2 * 6 + 2, 3 * 6 + 2, 1)
  assert grid[2, 2, 0] == 0 and grid[0, 0, 0] == 255   # -1 -> black, padding white
  pts = np.array([[0.0, 0.0]] * 10 + [[2.9, 2.9]], np.float32)
  img = images.scatter_image(pts, size=6, extent=3.0)
  # (0, 0) falls in bin 3 of 6 on both axes; rows count down from the top (y up).
  assert img[2, 3] == 0 and img[0, 5] < 255 and img[5, 0] == 255
  with pytest.raises(ValueError, match=r"cannot render samples of shape \(3, 5\)"):
    images.samples_to_image(np.zeros((3, 5)))
  with pytest.raises(ValueError, match="uint8"):
    images.encode_png(np.zeros((2, 2), np.float32))


# ------------------------------------------------------------------------------ metrics


def test_jsonl_truncate_and_progress_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  w = metrics.JsonlWriter(path)
  for step in (1, 2, 3):
    w.write(step, {"loss": np.float32(step), "nan": float("nan")})
  with open(path, "a") as f:
    f.write('{"step": 4, "lo')          # a line cut short by a kill
  w.truncate_after(2)
  recs = metrics.read_jsonl(path)
  assert [r["step"] for r in recs] == [1, 2] and recs[0]["nan"] == "nan"
  line = metrics.progress_line(50, 200, {"loss": 0.5, "learning_rate": 1e-4,
                                         "steps_per_sec": 2.0, "skipped_steps": 3}, 75.0)
  assert line.startswith("step 50/200 (25.0%)") and "skipped 3" in line
  assert line.endswith("ETA 01:15")
  json.dumps(recs)


def test_writer_fallback_without_tensorflow(tmp_path):
  w = metrics.create_writer(str(tmp_path), is_main=True, use_tensorboard=False)
  assert isinstance(w, metrics.LoggingWriter)
  w.write_scalars(1, {"loss": 1.0})
  assert isinstance(metrics.create_writer(str(tmp_path), is_main=False), metrics.NullWriter)


# ------------------------------------------------------------------------------ signals


def test_sigterm_sets_the_stop_flag_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequest() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_name == "SIGTERM"
    assert preemption.should_stop(stop, manager=None, step=3, multi_process=False)
  assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------------ skips


def test_skip_monitor_stops_after_the_limit_naming_the_first_skipped_step():
  from twinflow_jax import errors
  from twinflow_jax.train import loop
  monitor = loop.SkipMonitor(limit=3)
  reasons = {1: 0, 2: 1 | 2, 3: 0, 4: 8, 5: 8 | 4}
  for step, reason in reasons.items():
    monitor.push(step, {"skip_reason": jnp.int32(reason)})
  monitor.flush()
  assert monitor.streak == 2 and monitor.first == 4   # step 3 broke the first streak
  monitor.push(6, {"skip_reason": jnp.int32(1)})
  with pytest.raises(errors.NonFiniteError, match=r"3 consecutive steps were skipped "
                     r"\(config.train.max_consecutive_skips=3\), the first at step 4 "
                     r"\(not finite: new optimizer state\)\. Nothing was saved"):
    monitor.flush()


def test_one_line_drops_tensorstore_spec_dumps():
  from twinflow_jax import errors
  e = Exception("Encountered error while reading array index: (slice(0, 64, 1),). See full "
                "TensorStore details: <bound method spec of TensorStore({\n  'base': {\n"
                "    'driver': 'zarr',\n  },\n})>.")
  assert errors.one_line(e) == "Encountered error while reading array index: (slice(0, 64, 1),)."
  assert errors.one_line(ValueError("a\n  b\n")) == "a; b"
