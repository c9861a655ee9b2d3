"""Inception activations of many images: jitted, sharded over the mesh, gathered.

  model = load_inception('fid_inception.npz')          # models/convert/inception.py
  extract = ActivationExtractor(model, mesh=mesh, batch_size=256)
  acts = extract(images)      # this process's images: uint8 NHWC or samples in [-1, 1]
  acts.pool                   # float32 [N_total, 2048], every process, global order
  acts.logits                 # float32 [N_total, 1008] unbiased logits (for IS)

Each call is collective: every process calls it (with its own images, any count, even
0) the same number of times. Per step every process contributes batch_size /
process_count images; they form one global batch split over the mesh's batch axes
('data', and 'fsdp' when present; other axes replicate). The last batch is padded with
black images whose rows are dropped afterwards. Outputs are all-gathered across
processes (`multihost_utils.process_allgather`) and returned in global order: process
0's images first, then process 1's, ... Images go to the devices as uint8 (4x less
traffic than float); quantisation of float samples, resizing to 299 and scaling
happen as documented in `preprocess.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from twinflow_jax.evaluation import preprocess as pre

BATCH_AXES = ('data', 'fsdp')
DEFAULT_PER_SHARD_BATCH = 32


class Activations(NamedTuple):
  """Inception outputs of a set of images, in input order."""
  pool: np.ndarray  # float32 [N, 2048] pool_3 features (FID, precision/recall)
  logits: np.ndarray  # float32 [N, 1008] unbiased logits (Inception Score)


def _default_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


class ActivationExtractor:
  """Runs an Inception-like model over image sets; see the module docstring.

  Args:
    model: an NNX module mapping [B, S, S, 3] images in [-1, 1] to an object with
      `.pool` [B, F] and `.logits_unbiased` [B, K] (e.g. `InceptionV3`).
    mesh: device mesh; default: all devices on one 'data' axis.
    batch_size: global images per step; must divide by the number of batch shards and
      by the process count. Default: 32 per batch shard.
    preprocess: 'adm' (default) or 'pytorch_fid', see `preprocess.py`.
    image_size: Inception input side (299; smaller only in tests).
  """

  def __init__(self, model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None,
               batch_size: int | None = None, preprocess: str = 'adm',
               image_size: int = pre.INCEPTION_SIZE):
    if preprocess not in pre.MODES:
      raise ValueError(f'unknown preprocessing mode {preprocess!r}; use one of '
                       f'{pre.MODES}')
    self.mesh = _default_mesh() if mesh is None else mesh
    axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)
    if not axes:
      raise ValueError(f'the mesh {self.mesh.axis_names} has none of the batch axes '
                       f'{BATCH_AXES}')
    shards = math.prod(self.mesh.shape[a] for a in axes)
    self.batch_size = DEFAULT_PER_SHARD_BATCH * shards if batch_size is None else int(
        batch_size)
    procs = jax.process_count()
    if self.batch_size < 1 or self.batch_size % shards or self.batch_size % procs:
      raise ValueError(f'evaluation batch size {self.batch_size} must be a positive '
                       f'multiple of the {shards} batch shards (mesh axes {axes}) and of '
                       f'the {procs} processes')
    self.local_batch = self.batch_size // procs
    self.preprocess = preprocess
    self.image_size = image_size
    self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(axes))
    replicated = NamedSharding(self.mesh, PartitionSpec())
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, replicated)

    def forward(state, images):
      out = nnx.merge(graphdef, state)(pre.inception_input(images, preprocess, image_size))
      return out.pool, out.logits_unbiased

    self._forward = jax.jit(forward, in_shardings=(replicated, self._batch_sharding),
                            out_shardings=(self._batch_sharding, self._batch_sharding))

  def _global(self, local: np.ndarray) -> jax.Array:
    shape = (self.batch_size,) + local.shape[1:]
    return jax.make_array_from_process_local_data(self._batch_sharding, local, shape)

  def __call__(self, images, progress: Callable[[int, int], None] | None = None
               ) -> Activations:
    """Activations of this process's `images`, gathered over all processes.

    Args:
      images: array-like [N, H, W(, C)] (numpy array, memmap, ...): uint8 pixels or
        float samples in [-1, 1]; C in {1, 3}. N may differ between processes. A
        `jax.Array` (e.g. sharded samples from the sampler) is first reduced to the
        rows this process holds (`host_local_rows`).
      progress: optional callback(done, total) with global image counts, after
        every step.

    Returns:
      Activations of all processes' images (global order), on every process.
    """
    if isinstance(images, jax.Array):
      images = host_local_rows(images)
    n_local = len(images)
    counts = np.asarray(multihost_utils.process_allgather(np.int64(n_local))).reshape(-1)
    offset = int(counts[:jax.process_index()].sum())
    total = int(counts.sum())
    if not total:
      raise ValueError('no images to compute Inception activations of')
    steps = -(-int(counts.max()) // self.local_batch)
    pools, logits, order, done = [], [], [], 0
    sample_shape = None
    for step in range(steps):
      lo = min(step * self.local_batch, n_local)
      hi = min(lo + self.local_batch, n_local)
      if hi > lo:
        batch = pre.as_uint8_nhwc(images[lo:hi])
        sample_shape = batch.shape[1:]
      else:  # this process has run out: it still joins the collective step
        if sample_shape is None:
          sample_shape = self._probe_shape(images)
        batch = np.zeros((0,) + sample_shape, np.uint8)
      if batch.shape[1:] != sample_shape:
        raise ValueError(f'images {lo}..{hi} have shape {batch.shape[1:]}, earlier ones '
                         f'{sample_shape}; all images must have the same size')
      pad = self.local_batch - len(batch)
      index = np.concatenate([np.arange(offset + lo, offset + hi), np.full(pad, -1)])
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + sample_shape, np.uint8)])
      pool, logit = self._forward(self._state, self._global(batch))
      gathered = multihost_utils.process_allgather(
          (pool, logit, self._global(index.astype(np.int32))), tiled=True)
      pools.append(np.asarray(gathered[0]))
      logits.append(np.asarray(gathered[1]))
      order.append(np.asarray(gathered[2]))
      done += int((order[-1] >= 0).sum())
      if progress is not None:
        progress(done, total)
    order = np.concatenate(order)
    keep = order >= 0
    perm = np.argsort(order[keep], kind='stable')
    return Activations(np.concatenate(pools)[keep][perm].astype(np.float32),
                       np.concatenate(logits)[keep][perm].astype(np.float32))

  def _probe_shape(self, images) -> tuple[int, ...]:
    """Image shape for a process without images: from the array's own shape."""
    shape = getattr(images, 'shape', None)
    if shape is None or len(shape) < 3:
      raise ValueError('a process with no images must pass an empty array of the image '
                       'shape, e.g. np.zeros((0, H, W, 3), np.uint8)')
    dummy = pre.as_uint8_nhwc(np.zeros((1,) + tuple(shape[1:]), np.uint8))
    return dummy.shape[1:]


def host_local_rows(x: jax.Array) -> np.ndarray:
  """The rows of a (batch-sharded) global array that this process holds, in order.

  Fully addressable arrays (one process) come back whole. Otherwise the addressable
  shards are de-duplicated by their row range (replicas on other mesh axes) and
  concatenated; with the usual batch sharding, process p holds the p-th block of rows,
  so the extractor's global order equals the array's.
  """
  if x.is_fully_addressable:
    return np.asarray(x)
  blocks = {}
  for shard in x.addressable_shards:
    rows = shard.index[0] if shard.index else slice(None)
    blocks.setdefault(rows.start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


class Throughput:
  """Progress callback printing 'what: done/total images, rate img/s' every `every` s."""

  def __init__(self, what: str, every: float = 10.0,
               printer: Callable[[str], None] = print):
    self.what, self.every, self.printer = what, every, printer
    self.start = time.perf_counter()
    self.last = -math.inf

  def __call__(self, done: int, total: int) -> None:
    now = time.perf_counter()
    if now - self.last >= self.every or done >= total:
      self.last = now
      rate = done / max(now - self.start, 1e-9)
      self.printer(f'{self.what}: {done}/{total} images, {rate:.1f} img/s')
