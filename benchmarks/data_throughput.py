r"""Throughput of the twinflow_jax.data pipeline (examples per second, this machine).

Measures the full per-process pipeline (shuffle, decode, augment, batch) for
  * toy 2-D points (gaussians8),
  * 32 x 32 pixels: the bundled MNIST digits (32 x 32 x 1, padded) and pixel records
    (uint8 32 x 32 x 3 in ArrayRecord, as written by the image-folder mode),
  * 32 x 32 x 4 latents: float32 and float16 latent records in ArrayRecord,
  * prepared latents: records written by `python -m twinflow_jax.data.prepare` (with
    their metadata.json, which the pipeline checks): --prepared_images synthetic
    64 x 64 PNGs encoded by the tiny fixture VAE (tests/fixtures/vae_sd, downsampling 2)
    into 32 x 32 x 4 float32 latents, with --hflip (two records per image),
with in-process reading and with Grain worker processes. Records are random data
written to a temporary folder first.

  python benchmarks/data_throughput.py [--seconds=3] [--batch_size=256] \
      [--worker_counts=0,2] [--num_records=16384] [--prepared_images=1024]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

from twinflow_jax import data
from twinflow_jax.data import arrayrecord_io
from twinflow_jax.data import prepare

TINY_VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                        "fixtures", "vae_sd")


def _measure(config, batch_size: int, seconds: float) -> tuple[float, float]:
  """(examples/s after the first batch, seconds to the first batch)."""
  start = time.perf_counter()
  it = data.create_train_iterator(config, global_batch_size=batch_size, seed=0)
  next(it)
  first = time.perf_counter() - start
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    n += batch_size
  rate = n / (time.perf_counter() - start)
  if hasattr(it, "close"):
    it.close()
  return rate, first


def _write_records(folder: str, num_records: int) -> dict[str, str]:
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 1000, num_records)
  out = {}
  for name, latent in [
      ("pixels_u8", rng.integers(0, 256, (num_records, 32, 32, 3), dtype=np.uint8)),
      ("latents_f32", rng.standard_normal((num_records, 32, 32, 4), np.float32)),
      ("latents_f16", rng.standard_normal((num_records, 32, 32, 4),
                                          np.float32).astype(np.float16)),
  ]:
    prefix = os.path.join(folder, name)
    arrayrecord_io.write_arrays(prefix, "latents", {"latent": latent, "label": labels},
                                num_shards=4)
    out[name] = f"{prefix}-*.array_record"
  return out


def _prepare_latents(folder: str, num_images: int) -> tuple[dict, float]:
  """Runs the preparation command on synthetic PNGs; (config.data fields, images/s)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  for c in range(4):
    os.makedirs(os.path.join(folder, "img", f"class{c}"))
  for i in range(num_images):
    Image.fromarray(rng.integers(0, 256, (72, 64, 3), dtype=np.uint8)).save(
        os.path.join(folder, "img", f"class{i % 4}", f"{i:06d}.png"))
  out = os.path.join(folder, "prepared")
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # its summary is not wanted here
    code = prepare.main([f"--vae={TINY_VAE}", f"--image_folder={folder}/img",
                         "--image_size=64", f"--output={out}", "--hflip",
                         "--batch_size=64", "--shard_size=256", "--quiet"])
  took = time.perf_counter() - start
  if code:
    raise RuntimeError("prepare failed")
  with open(os.path.join(out, "metadata.json")) as f:
    fields = json.load(f)["config_data"]
  fields["latent_shape"] = tuple(fields["latent_shape"])
  return fields, num_images / took


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--worker_counts", default="0,2")
  p.add_argument("--num_records", type=int, default=16384)
  p.add_argument("--prepared_images", type=int, default=1024,
                 help="images for the prepared-latents case (0: skip it)")
  args = p.parse_args(argv)
  workers = [int(w) for w in args.worker_counts.split(",")]

  with tempfile.TemporaryDirectory() as folder:
    paths = _write_records(folder, args.num_records)
    cases = [
        ("toy2d", "2 float32", dict(source="toy2d", name="gaussians8")),
        ("mnist (bundled)", "32x32x1 uint8 -> f32", dict(source="mnist")),
        ("pixel records", "32x32x3 uint8 -> f32", dict(
            source="arrayrecord_latents", paths=paths["pixels_u8"],
            latent_shape=(32, 32, 3), latent_dtype="uint8", num_classes=1000,
            hflip=True)),
        ("latent records", "32x32x4 float32", dict(
            source="arrayrecord_latents", paths=paths["latents_f32"],
            latent_shape=(32, 32, 4), num_classes=1000, latent_scale=0.5)),
        ("latent records", "32x32x4 float16", dict(
            source="arrayrecord_latents", paths=paths["latents_f16"],
            latent_shape=(32, 32, 4), latent_dtype="float16", num_classes=1000,
            latent_scale=0.5)),
    ]
    if args.prepared_images:
      fields, rate = _prepare_latents(folder, args.prepared_images)
      print(f"prepare: {args.prepared_images} PNGs 72x64 -> {2 * args.prepared_images} "
            f"records of 32x32x4 float32 at {rate:.1f} images/s (tiny VAE, including "
            "compilation)")
      cases.append(("prepared latents", "32x32x4 float32", dict(**fields)))
    print(f"batch {args.batch_size}, {os.cpu_count()} CPUs, {args.seconds:g} s per case")
    print(f"{'source':<16} {'example':<22} {'workers':>7} {'examples/s':>12} "
          f"{'first batch s':>14}")
    for name, shape, fields in cases:
      for w in workers:
        c = data.default_config()
        c.update(fields)
        c.worker_count = w
        rate, first = _measure(c, args.batch_size, args.seconds)
        print(f"{name:<16} {shape:<22} {w:>7} {rate:>12,.0f} {first:>14.2f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
