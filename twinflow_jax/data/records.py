"""Binary schema of the ArrayRecord examples (precomputed latents), without TensorFlow.

Each ArrayRecord record holds one example, serialised as

  offset 0       4 bytes   magic b"TWF1"
  offset 4       4 bytes   H: header length, uint32 little-endian
  offset 8       H bytes   header: UTF-8 JSON
                           {"kind": KIND, "fields": [[name, dtype, shape], ...]}
  offset 8 + H   payload   the fields' raw bytes, in header order, C order,
                           little-endian, no padding

Kinds and their fields (shapes per example):

  "latents" (class-conditional): latent [H, W, C], label int32 [].
  "t2i" (text-to-image): latent [H, W, C], txt [L, D] (text-encoder token
      embeddings), txt_mask bool [L] (True on real tokens), pooled [P] (pooled
      text vector).

`latent` is float32, float16 or bfloat16 for VAE latents, or uint8 for raw pixels
(written by the image-folder mode of `write_arrayrecord`); `txt` and `pooled` are
float32, float16 or bfloat16. The writer emits a canonical header (compact JSON, keys
in the order above) so that the reader can validate a record by comparing its header
bytes with the one expected from the config; other writers may emit any equivalent
JSON, which is parsed and checked field by field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

MAGIC = b"TWF1"
KINDS = ("latents", "t2i")
LATENT_DTYPES = ("float32", "float16", "bfloat16", "uint8")
EMBEDDING_DTYPES = ("float32", "float16", "bfloat16")

_FIELD_ORDER = {
    "latents": ("latent", "label"),
    "t2i": ("latent", "txt", "txt_mask", "pooled"),
}


def _np_dtype(name: str) -> np.dtype:
  """numpy dtype of a schema dtype name, little-endian."""
  if name == "bfloat16":
    return np.dtype(jnp.bfloat16)
  return np.dtype(name).newbyteorder("<")


def _dtype_name(dtype: np.dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype == np.dtype(jnp.bfloat16):
    return "bfloat16"
  return dtype.name


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """Name, dtype name and per-example shape of one record field."""
  name: str
  dtype: str
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * _np_dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  """The fields of one record kind; validates, encodes and decodes records."""
  kind: str
  fields: tuple[FieldSpec, ...]

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown record kind {self.kind!r}; choose one of {KINDS}")
    names = tuple(f.name for f in self.fields)
    if names != _FIELD_ORDER[self.kind]:
      raise ValueError(
          f"record kind {self.kind!r} has fields {_FIELD_ORDER[self.kind]}, got {names}")

  @functools.cached_property
  def header(self) -> bytes:
    """Canonical header bytes (magic, length, JSON) of this spec."""
    body = json.dumps(
        {"kind": self.kind,
         "fields": [[f.name, f.dtype, list(f.shape)] for f in self.fields]},
        separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(body)) + body

  def encode(self, example: Mapping[str, np.ndarray]) -> bytes:
    """Serialises one example (a dict with this spec's fields) to record bytes."""
    parts = [self.header]
    for f in self.fields:
      if f.name not in example:
        raise ValueError(f"example lacks field {f.name!r} of record kind {self.kind!r}")
      value = np.asarray(example[f.name])
      if value.shape != f.shape:
        raise ValueError(
            f"field {f.name!r} has shape {value.shape}, the record spec says {f.shape}")
      parts.append(np.ascontiguousarray(value, dtype=_np_dtype(f.dtype)).tobytes())
    return b"".join(parts)

  @functools.cached_property
  def nbytes(self) -> int:
    """Length of a record with the canonical header."""
    return len(self.header) + sum(f.nbytes for f in self.fields)

  def decode_batch(self, batch: Sequence[bytes],
                   where: str = "record") -> dict[str, np.ndarray]:
    """Parses records into stacked arrays [b, ...] of this spec.

    Records with the canonical header are decoded with one vectorised view of their
    joined bytes; any other record sends the batch through `decode` one by one (which
    accepts equivalent headers and raises the clear error for mismatched ones).
    """
    header = self.header
    if all(len(r) == self.nbytes for r in batch):
      table = np.frombuffer(b"".join(batch), np.uint8).reshape(len(batch), self.nbytes)
      if np.array_equal(table[:, :len(header)],
                        np.broadcast_to(np.frombuffer(header, np.uint8),
                                        (len(batch), len(header)))):
        out, offset = {}, len(header)
        for f in self.fields:
          column = np.ascontiguousarray(table[:, offset:offset + f.nbytes])
          out[f.name] = column.view(_np_dtype(f.dtype)).reshape(len(batch), *f.shape)
          offset += f.nbytes
        return out
    examples = [self.decode(r, f"{where} {i} of the batch") for i, r in enumerate(batch)]
    return {f.name: np.stack([e[f.name] for e in examples]) for f in self.fields}

  def decode(self, record: bytes, where: str = "record") -> dict[str, np.ndarray]:
    """Parses record bytes into a dict of numpy arrays of this spec.

    Raises:
      ValueError: if the record's kind, field shapes or dtypes differ from this spec
        (the message names the field, both specs and `where`).
    """
    header = self.header
    if record[:len(header)] == header:
      offset = len(header)
    else:
      offset = self._check_header(record, where)
    out = {}
    for f in self.fields:
      n = f.nbytes
      chunk = record[offset:offset + n]
      if len(chunk) != n:
        raise ValueError(f"{where}: truncated payload for field {f.name!r}")
      out[f.name] = np.frombuffer(chunk, dtype=_np_dtype(f.dtype)).reshape(f.shape)
      offset += n
    if offset != len(record):
      raise ValueError(f"{where}: {len(record) - offset} unexpected trailing bytes")
    return out

  def _check_header(self, record: bytes, where: str) -> int:
    """Validates a non-canonical header; returns the payload offset."""
    found = read_header(record, where)
    if found.kind != self.kind:
      raise ValueError(
          f"{where} is a {found.kind!r} record but the config reads {self.kind!r} "
          "records (config.data.source arrayrecord_latents vs arrayrecord_t2i)")
    for want, got in zip(self.fields, found.fields):
      if (want.dtype, want.shape) != (got.dtype, got.shape):
        raise ValueError(
            f"{where}: field {got.name!r} has dtype {got.dtype} and shape {got.shape}, "
            f"but config.data expects dtype {want.dtype} and shape {want.shape} "
            f"(see {_CONFIG_FIELDS[want.name]})")
    (length,) = struct.unpack("<I", record[4:8])
    return 8 + length


_CONFIG_FIELDS = {
    "latent": "config.data.latent_shape / latent_dtype",
    "label": "the record schema: labels are int32 scalars",
    "txt": "config.data.txt_len / txt_dim / txt_dtype",
    "txt_mask": "config.data.txt_len (masks are bool [txt_len])",
    "pooled": "config.data.pooled_dim / txt_dtype",
}


def read_header(record: bytes, where: str = "record") -> RecordSpec:
  """Parses the header of record bytes into the RecordSpec it was written with."""
  if record[:4] != MAGIC:
    raise ValueError(
        f"{where} does not start with {MAGIC!r}: not written by "
        "twinflow_jax.data.write_arrayrecord (see twinflow_jax/data/records.py)")
  (length,) = struct.unpack("<I", record[4:8])
  try:
    header = json.loads(record[8:8 + length].decode("utf-8"))
    fields = tuple(FieldSpec(str(n), str(d), tuple(int(s) for s in shape))
                   for n, d, shape in header["fields"])
    return RecordSpec(str(header["kind"]), fields)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where} has a malformed header: {e}") from e


def latents_spec(latent_shape, latent_dtype: str = "float32") -> RecordSpec:
  """Spec of class-conditional records: latent [H, W, C] and int32 label."""
  _check_dtype("latent_dtype", latent_dtype, LATENT_DTYPES)
  return RecordSpec("latents", (
      FieldSpec("latent", latent_dtype, _shape("latent_shape", latent_shape, 3)),
      FieldSpec("label", "int32", ()),
  ))


def t2i_spec(latent_shape, txt_len: int, txt_dim: int, pooled_dim: int,
             latent_dtype: str = "float32", txt_dtype: str = "float32") -> RecordSpec:
  """Spec of text-to-image records: latent, txt [L, D], txt_mask [L], pooled [P]."""
  _check_dtype("latent_dtype", latent_dtype, LATENT_DTYPES)
  _check_dtype("txt_dtype", txt_dtype, EMBEDDING_DTYPES)
  return RecordSpec("t2i", (
      FieldSpec("latent", latent_dtype, _shape("latent_shape", latent_shape, 3)),
      FieldSpec("txt", txt_dtype, _shape("(txt_len, txt_dim)", (txt_len, txt_dim), 2)),
      FieldSpec("txt_mask", "bool", _shape("txt_len", (txt_len,), 1)),
      FieldSpec("pooled", txt_dtype, _shape("pooled_dim", (pooled_dim,), 1)),
  ))


def spec_from_arrays(kind: str, arrays: Mapping[str, np.ndarray],
                     float_dtype: str | None = None) -> RecordSpec:
  """Spec to store stacked arrays ([N, ...] per field) as records of `kind`.

  Labels are stored as int32 and masks as bool. Floating fields (latent, txt, pooled)
  are stored as `float_dtype` if given, else in their own dtype (float64 as float32;
  txt and pooled share txt's dtype); uint8 latents stay uint8 pixels.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; choose one of {KINDS}")
  missing = [n for n in _FIELD_ORDER[kind] if n not in arrays]
  if missing:
    raise ValueError(f"record kind {kind!r} needs arrays {missing}")

  def stored(a) -> str:
    name = _dtype_name(a.dtype)
    if float_dtype is not None and name != "uint8":
      return float_dtype
    return "float32" if name == "float64" else name

  latent = arrays["latent"]
  if kind == "latents":
    if not np.issubdtype(arrays["label"].dtype, np.integer):
      raise ValueError(f"labels must be integers, got {arrays['label'].dtype}")
    return latents_spec(latent.shape[1:], stored(latent))
  txt = arrays["txt"]
  if txt.ndim != 3:
    raise ValueError(f"txt must be [N, L, D], got {txt.shape}")
  return t2i_spec(latent.shape[1:], txt.shape[1], txt.shape[2], arrays["pooled"].shape[-1],
                  stored(latent), stored(txt))


def _check_dtype(what: str, name: str, allowed) -> None:
  if name not in allowed:
    raise ValueError(f"{what} must be one of {allowed}, got {name!r}")


def _shape(what: str, shape, ndim: int) -> tuple[int, ...]:
  if shape is None:
    raise ValueError(f"config.data.{what} must be set for ArrayRecord sources")
  shape = tuple(int(s) for s in shape)
  if len(shape) != ndim or any(s <= 0 for s in shape):
    raise ValueError(f"{what} must be {ndim} positive ints, got {shape}")
  return shape
