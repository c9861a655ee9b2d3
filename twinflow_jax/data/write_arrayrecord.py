r"""Writes ArrayRecord shards for the 'arrayrecord_latents' / 'arrayrecord_t2i' sources.

From numpy arrays (.npy files, or one .npz holding the fields by name):

  python -m twinflow_jax.data.write_arrayrecord --output=/data/in256/train \
      --latent=latents.npy --label=labels.npy --num_shards=16
  python -m twinflow_jax.data.write_arrayrecord --kind=t2i --output=/data/t2i/train \
      --npz=encoded.npz --dtype=float16        # fields latent, txt, txt_mask, pooled

From an image folder (<folder>/<class>/<image>; labels follow sorted class names),
stored as uint8 pixels [S, S, 3] that the pipeline maps to [-1, 1]:

  python -m twinflow_jax.data.write_arrayrecord --image_folder=/data/imagenet/train \
      --image_size=64 --output=/data/in64/train --num_shards=64

The record schema is documented in `twinflow_jax/data/records.py`. The command prints
the `config.data` fields that read the written files.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from twinflow_jax import errors
from twinflow_jax.data import arrayrecord_io
from twinflow_jax.data import records

_FIELDS = {"latents": ("latent", "label"), "t2i": ("latent", "txt", "txt_mask", "pooled")}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m twinflow_jax.data.write_arrayrecord",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--output", required=True,
                 help="path prefix; writes PREFIX-0000k-of-0000N.array_record")
  p.add_argument("--kind", choices=tuple(_FIELDS), default="latents",
                 help="record kind: class-conditional latents or text-to-image")
  p.add_argument("--num_shards", type=int, default=1)
  p.add_argument("--compression", choices=arrayrecord_io.COMPRESSIONS, default="snappy")
  p.add_argument("--npz", help=".npz file holding the kind's fields by name")
  for name in ("latent", "label", "txt", "txt_mask", "pooled"):
    p.add_argument(f"--{name}", help=f".npy file of the stacked '{name}' field")
  p.add_argument("--dtype", choices=("keep", "float32", "float16", "bfloat16"),
                 default="keep", help="store latent / txt / pooled in this dtype")
  p.add_argument("--image_folder", help="folder of class subfolders of images")
  p.add_argument("--image_size", type=int, default=32,
                 help="image folder mode: side of the centre-cropped, resized images")
  return p


def _load_arrays(args: argparse.Namespace) -> dict[str, np.ndarray]:
  names = _FIELDS[args.kind]
  if args.npz:
    with np.load(args.npz) as data:
      missing = [n for n in names if n not in data]
      if missing:
        raise ValueError(f"{args.npz} lacks fields {missing} (has {list(data.keys())})")
      arrays = {n: data[n] for n in names}
  else:
    missing = [n for n in names if getattr(args, n) is None]
    if missing:
      raise ValueError(f"--kind={args.kind} needs --npz or --{' --'.join(missing)}")
    arrays = {n: np.load(getattr(args, n), mmap_mode="r") for n in names}
  return arrays


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _write(args)
  except (errors.UserError, ValueError, FileNotFoundError) as e:
    # Mistakes in the inputs: one line naming the file or field, no traceback.
    print(f"error: {errors.one_line(e)}", file=sys.stderr)
    return errors.EXIT_USER_ERROR


def _write(args: argparse.Namespace) -> int:
  pattern = f"{args.output}-*-of-{args.num_shards:05d}.array_record"
  if args.image_folder:
    paths, classes, n = arrayrecord_io.write_image_folder(
        args.image_folder, args.output, args.image_size, args.num_shards,
        args.compression)
    fields = dict(source="arrayrecord_latents", paths=pattern,
                  latent_shape=(args.image_size,) * 2 + (3,), latent_dtype="uint8",
                  num_classes=len(classes))
    print(f"wrote {n} records to {len(paths)} shards; class names in "
          f"{args.output}.classes.txt")
  else:
    arrays = _load_arrays(args)
    float_dtype = None if args.dtype == "keep" else args.dtype
    spec = records.spec_from_arrays(args.kind, arrays, float_dtype)
    paths = arrayrecord_io.write_arrays(args.output, args.kind, arrays, args.num_shards,
                                        args.compression, float_dtype)
    f = {field.name: field for field in spec.fields}
    fields = dict(source=f"arrayrecord_{args.kind}", paths=pattern,
                  latent_shape=f["latent"].shape, latent_dtype=f["latent"].dtype)
    if args.kind == "latents":
      # Largest label + 1: raise it if some classes are absent from these files.
      fields["num_classes"] = int(np.max(arrays["label"])) + 1
    else:
      fields.update(txt_len=f["txt"].shape[0], txt_dim=f["txt"].shape[1],
                    pooled_dim=f["pooled"].shape[0], txt_dtype=f["txt"].dtype)
    print(f"wrote {len(arrays['latent'])} records to {len(paths)} shards")
  print("config.data fields to read them:")
  for k, v in fields.items():
    print(f"  config.data.{k} = {v!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
