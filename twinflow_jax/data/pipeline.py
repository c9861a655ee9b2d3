"""The Grain input pipeline: the trainer's entry point to training data.

Stages, per process, all Grain datasets: the batch index k (`MapDataset.range`) ->
this process's rows of global batch k, taken from a seeded shuffle (a new permutation
every epoch) of the whole dataset, repeated over epochs -> load and decode those rows
(pixels to [-1, 1], or latent scale / shift) -> random augmentation (horizontal flip,
label dropout) -> read threads -> optional worker processes (`mp_prefetch`).
`make_global_batch` then assembles the processes' rows into global `jax.Array`s sharded
over the mesh's batch axes.

The global batch does not depend on the number of processes: every process computes the
same permutation and the same augmentation draws for the whole global batch k and keeps
its contiguous slice of rows (process p of P: rows [p B / P, (p + 1) B / P)). So a run on
2 hosts sees exactly the batches of the same run on 1 host (and a checkpointed position
k means the same data on any number of processes).

Why whole batches: Grain's per-example shuffle, map and batch cost about 10 us per
example in Python, which caps small examples (toy points, MNIST) near 1e5 examples/s
on two cores; indexing a permutation and decoding with one numpy call per batch does
not. All randomness is a function of (seed, batch index), so the iterator state is just
a position: it goes into Orbax checkpoints through `grain.checkpoint.CheckpointSave` /
`CheckpointRestore` and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Sequence

import grain
import jax
import ml_collections
import numpy as np

from twinflow_jax import errors
from twinflow_jax.data import config as config_lib
from twinflow_jax.data import sources

# Batches in an endless stream (num_epochs None); far beyond any run.
_ENDLESS = 2**62


@dataclasses.dataclass(frozen=True)
class BatchIndices:
  """Source indices of this process's rows of global batch k.

  Global batch k holds positions [k B, (k + 1) B) of the epoch-shuffled stream; this
  process takes positions k B + rows. Position p lies in epoch p // count at slot
  p % count; epoch e visits the data in the order `permutation_e` (seeded by (seed, e);
  identity if not shuffled). Slot j is source index offset + j * stride.

  Attributes:
    count: examples in the stream's epoch.
    batch_size: b, this process's rows per batch.
    seed: shuffle seed (the same on every process).
    shuffle: permute each epoch (else read in order).
    offset, stride: slot -> source index map.
    global_batch_size: B, rows of the global batch (default b: one process).
    rows: this process's global rows, sorted (default [0, b)).
  """
  count: int
  batch_size: int
  seed: int
  shuffle: bool
  offset: int = 0
  stride: int = 1
  global_batch_size: int | None = None
  rows: tuple[int, ...] | None = None

  def __call__(self, k: int) -> np.ndarray:
    rows = (np.arange(self.batch_size, dtype=np.int64) if self.rows is None
            else np.asarray(self.rows, np.int64))
    positions = k * (self.global_batch_size or self.batch_size) + rows
    epochs, slots = np.divmod(positions, self.count)
    if self.shuffle:
      for e in np.unique(epochs):
        at = epochs == e
        slots[at] = self._permutation(int(e))[slots[at]]
    return self.offset + slots * self.stride

  def _permutation(self, epoch: int) -> np.ndarray:
    key = (self.count, self.seed, epoch)
    perm = _PERMUTATIONS.get(key)
    if perm is None:
      # Read threads may race to compute the same permutation; results are identical.
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.count)
      with _PERMUTATIONS_LOCK:
        _PERMUTATIONS[key] = perm
        while len(_PERMUTATIONS) > _MAX_PERMUTATIONS:
          _PERMUTATIONS.pop(next(iter(_PERMUTATIONS)))
    return perm


# Per-process cache of epoch permutations keyed by (count, seed, epoch), oldest first.
# A batch needs at most two epochs; a few more serve other live iterators. It stays
# out of pickled datasets, so worker processes build their own.
_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}
_PERMUTATIONS_LOCK = threading.Lock()
_MAX_PERMUTATIONS = 8


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random horizontal flip and label dropout of a decoded batch (picklable).

  The draws are made for the whole global batch (the same on every process, whose
  generators share a seed) and this process keeps the ones of its rows.

  Attributes:
    hflip: flip each 'x' [b, H, W, C] along W with probability 1/2.
    label_dropout: probability of dropping an example's condition: its 'label'
      becomes `null_class`, or its text becomes the null text (zero embeddings,
      all-False mask, zero pooled vector).
    null_class: id of the null class (= num_classes).
    global_batch_size: B, rows of the global batch (default: this batch's rows).
    rows: this process's global rows, sorted (default: all rows of the batch).
  """
  hflip: bool
  label_dropout: float
  null_class: int
  global_batch_size: int | None = None
  rows: tuple[int, ...] | None = None

  def __call__(self, batch: dict[str, np.ndarray],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    b = len(batch["x"])
    n = self.global_batch_size or b
    rows = slice(0, b) if self.rows is None else np.asarray(self.rows, np.int64)
    # Always draw both so the random stream does not depend on the options.
    flip = (rng.random(n) < 0.5)[rows]
    drop = (rng.random(n) < self.label_dropout)[rows]
    batch = dict(batch)
    if self.hflip and flip.any():
      x = batch["x"].copy()
      x[flip] = x[flip][:, :, ::-1]
      batch["x"] = x
    if drop.any():
      if "label" in batch:
        batch["label"] = np.where(drop, np.int32(self.null_class), batch["label"])
      else:
        for k in ("txt", "txt_mask", "pooled"):
          v = batch[k].copy()
          v[drop] = 0
          batch[k] = v
    return batch


def _seeds(seed: int, shuffle_seed: int | None) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the augmentations.

  The same on every process: processes read disjoint rows of one global batch drawn from
  one permutation (the third entry, 0, keeps the stream of earlier one-process runs).
  """
  base = seed if shuffle_seed is None else shuffle_seed
  state = np.random.SeedSequence([int(base) % 2**63, 0x7A1F, 0]).generate_state(2)
  return int(state[0]), int(state[1])


def create_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: Sequence[int] | None = None,
) -> grain.DatasetIterator:
  """Returns a checkpointable iterator over this process's training batches.

  Args:
    data_config: the `config.data` section (fields: `config.default_config`).
    global_batch_size: examples per step over all processes; must be divisible by
      process_count.
    seed: the run's seed; drives shuffle and augmentations unless
      `data_config.shuffle_seed` is set.
    process_index, process_count: this process and the number of processes; default
      `jax.process_index()` / `jax.process_count()` (override to simulate hosts).
    rows: the rows of each global batch that this process loads, i.e. the rows its
      devices hold (`process_rows`); default [p b, (p + 1) b) for process p, b =
      global_batch_size / process_count.

  Returns:
    A `grain.DatasetIterator` of dicts of numpy arrays with b = len(rows) rows: 'x'
    float32 [b, *spec.x_shape] and 'label' int32 [b] (class data, null class =
    num_classes), or 'txt' float32 [b, L, D], 'txt_mask' bool [b, L], 'pooled' float32
    [b, P] (text data). Use it with `grain.checkpoint.CheckpointSave` /
    `CheckpointRestore` inside an Orbax `ocp.args.Composite`. The global batch is the
    same for any process count; the last partial global batch of a finite run
    (num_epochs set) is dropped.

  Raises:
    ValueError: bad config, a batch not divisible by the process count, too little data.
    FileNotFoundError: a TFDS dataset that is not prepared, missing ArrayRecord files.
  """
  config_lib.validate_config(data_config)
  c = config_lib.resolve_config(data_config)
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                     f"of the number of processes ({process_count})")
  if rows is None:
    b = global_batch_size // process_count
    rows = range(process_index * b, (process_index + 1) * b)
  rows = tuple(sorted(int(r) for r in rows))
  if not rows or rows[0] < 0 or rows[-1] >= global_batch_size or len(set(rows)) < len(rows):
    raise ValueError(f"rows must be distinct rows of the global batch of "
                     f"{global_batch_size}, got {rows}")
  batch_size = len(rows)
  spec = config_lib.get_data_spec(c)

  source = sources.open_source(c, spec, process_index, process_count)
  if source.sharded:
    # A source that holds only this process's shard cannot give equal global batches.
    if process_count > 1:
      raise ValueError(f"source {c.source!r} was opened per process; the pipeline needs "
                       "the whole dataset on every process")
  count = source.size
  if count == 0:
    raise errors.DataError(f"{c.source!r} has no examples")
  num_batches = (_ENDLESS if c.num_epochs is None
                 else count * c.num_epochs // global_batch_size)
  if num_batches == 0:
    raise errors.ConfigError(
        f"config.data.num_epochs={c.num_epochs} epoch(s) of {count} examples do not fill "
        f"one global batch of {global_batch_size} (config.train.global_batch_size)")
  shuffle_seed, augment_seed = _seeds(seed, c.shuffle_seed)
  null_class = spec.num_classes if spec.conditioning == "class" else 0
  ds = (grain.MapDataset.range(num_batches)
        .map(BatchIndices(count, batch_size, shuffle_seed, bool(c.shuffle),
                          global_batch_size=global_batch_size, rows=rows))
        .map(source.load)
        .random_map(Augment(bool(c.hflip), float(c.label_dropout), null_class,
                            global_batch_size, rows),
                    seed=augment_seed))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.read_threads,
                                            prefetch_buffer_size=c.prefetch_buffer_size))
  if c.worker_count > 0:
    _mark_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=c.worker_count, per_worker_buffer_size=c.worker_buffer_size))
  return iter(it)


def _mark_flags_parsed() -> None:
  """Grain's worker code reads absl flags; scripts without absl.app never parse them."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> list[int]:
  """The rows of a global batch that this process's devices hold under `sharding`.

  `make_global_batch` expects a process's batch to be exactly these rows, in order; so
  the pipeline loads them (`create_train_iterator(rows=...)`) and the global batch does
  not depend on how the devices are spread over processes.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  return sorted(rows)


def make_global_batch(
    batch: dict[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    global_batch_size: int | None = None,
) -> dict[str, jax.Array]:
  """Assembles every process's batch into global arrays sharded along the batch axis.

  Args:
    batch: this process's batch, dict of numpy arrays with leading axis b.
    mesh: the device mesh.
    batch_axes: mesh axes the batch axis is split over; axes absent from the mesh are
      ignored (at least one must be present).
    global_batch_size: rows of the global batch (default: the local rows times the
      number of processes).

  Returns:
    dict of `jax.Array`s of leading size b * jax.process_count(), partitioned as
    `P(batch_axes)` on the leading axis and replicated on the others.

  Raises:
    ValueError: no batch axis in the mesh, or a global batch not divisible by the
      number of batch shards.
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"none of the batch axes {tuple(batch_axes)} is in the mesh "
                     f"{mesh.axis_names}")
  num_shards = math.prod(mesh.shape[a] for a in axes)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))

  def to_global(x: np.ndarray) -> jax.Array:
    x = np.asarray(x)
    rows = global_batch_size or x.shape[0] * jax.process_count()
    global_shape = (rows, *x.shape[1:])
    if global_shape[0] % num_shards:
      raise ValueError(f"global batch {global_shape[0]} is not divisible by the "
                       f"{num_shards} shards of mesh axes {axes}")
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return {k: to_global(v) for k, v in batch.items()}
