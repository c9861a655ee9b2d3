"""Batched, sharded generation with per-sample seeds: the one way samples are made.

`generate(apply_fn, params, cond, preset, key=..., x_shape=..., mesh=...)` returns N samples
as host numpy. Sample i uses only its own randomness: its initial noise comes from
fold_in(fold_in(key, i), 0) and the noise the sampler re-injects at step j from
fold_in(fold_in(fold_in(key, i), 1), j). So the same N samples come out whatever the batch
size, the number of devices or the mesh (up to float round-off of the batched network), and
sample i of a run of 1000 is sample i of a run of 10.

Batches are split over the mesh's batch axes ('data', 'fsdp') of all devices (every process
of a multi-host job must call with the same arguments); the last batch is padded to the
same shape, so one compiled program serves every call with the same shapes. Parameters
stay where they are when they already live on the mesh (the trainer's sharded params or
EMA); otherwise they are replicated onto it. `iter_batches` yields the global (sharded)
batches for consumers that process them on device (e.g. feature extractors); `generate`
gathers them to the host.

Used by `python -m twinflow_jax.sample`, the evaluation during training and notebooks.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from twinflow_jax import sampling

PyTree = Any
BATCH_AXES = ("data", "fsdp")


def sample_key(key: jax.Array | int, index: int | jax.Array) -> jax.Array:
  """The key that alone determines sample `index` (fold_in of the base key)."""
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  return jax.random.fold_in(key, index)


def initial_noise(key: jax.Array | int, indices: jax.Array, x_shape: Sequence[int]
                  ) -> jax.Array:
  """Initial noise [n, *x_shape] float32 of the samples `indices` [n] (as `generate` uses)."""
  keys = jax.vmap(lambda i: sample_key(key, i))(jnp.asarray(indices))
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), tuple(x_shape),
                                              jnp.float32))(keys)


def _batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES if a in mesh.axis_names)


def _batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def default_mesh() -> jax.sharding.Mesh:
  """All devices on the 'data' axis (with size-1 'fsdp' and 'tensor' axes)."""
  return jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _place_params(params: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Keeps leaves already on the mesh's devices; replicates the others onto the mesh."""
  rep = NamedSharding(mesh, PartitionSpec())
  devices = set(mesh.devices.flat)

  def place(p):
    if isinstance(p, jax.Array) and set(p.sharding.device_set) == devices:
      return p
    return jax.device_put(p, rep)

  return jax.tree.map(place, params)


@functools.lru_cache(maxsize=32)
def _compiled(apply_fn: Callable, cfg: sampling.SamplerConfig, x_shape: tuple[int, ...],
              mesh: jax.sharding.Mesh, with_uncond: bool) -> Callable:
  """jit of (params, key, indices [b], cond [b], uncond [b]) -> samples [b, *x_shape]."""
  out_sharding = _batch_sharding(mesh)

  def run(params, key, indices, cond, uncond):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), x_shape,
                                                 jnp.float32))(keys)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    return sampling.sample(apply_fn, params, noise, cond, cfg, step_keys,
                           uncond if with_uncond else None)

  return jax.jit(run, out_shardings=out_sharding)


def _take(tree: PyTree, idx: np.ndarray) -> PyTree:
  return jax.tree.map(lambda a: np.asarray(a)[idx], tree)


def iter_batches(apply_fn: Callable, params: PyTree, cond: PyTree,
                 preset: sampling.SamplerConfig | str, *, key: jax.Array | int,
                 x_shape: Sequence[int], num: int | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: Sequence[tuple[str, Any]] = (),
                 batch_size: int = 256, uncond: PyTree = None, cfg_scale: float | None = None,
                 start_index: int = 0
                 ) -> Iterator[tuple[int, int, jax.Array]]:
  """Yields (start, stop, samples) with global batches sharded over ('data', 'fsdp').

  Args:
    apply_fn: `apply_fn(params, x_t, t, r, cond) -> F` (the trainer's `setup.apply_fn`).
    params: the weights (e.g. the EMA), sharded on `mesh` or anywhere else (replicated then).
    cond: per-sample conditions with leading axis N: labels int [N], a text dict
      {'txt' [N, L, D], 'txt_mask' [N, L], 'pooled' [N, P]}, or None (unconditional
      models: labels 0 are passed, as the trainer does).
    preset: a sampler preset name or `sampling.SamplerConfig`.
    key: base PRNG key or int seed; sample i depends only on (key, i).
    x_shape: per-sample shape, e.g. (16, 16, 1).
    num: N (required when cond is None).
    mesh: device mesh (default: every device on 'data').
    rules: logical-axis rules of the model (the trainer's `setup.rules`).
    batch_size: samples per call across all devices; rounded up to a multiple of the batch
      shards of the mesh. Does not change the samples.
    uncond: unconditional conditions [N, ...] for classifier-free guidance.
    cfg_scale: guidance scale; None keeps the preset's (no guidance for the presets).
    start_index: index of the first sample (sample i uses fold_in(key, start_index + i)).

  Yields:
    (start, stop, samples [b, *x_shape] jax.Array) in order, b the padded batch size: rows
    0..stop-start-1 are samples start..stop-1 of the set, the rest is padding (slicing is
    left to the consumer, since a multi-host array cannot be sliced in place).
  """
  cfg = sampling.get_config(preset)
  if cfg_scale is not None:
    cfg = cfg.replace(cfg_scale=float(cfg_scale))
  if cfg.cfg_scale is not None and uncond is None:
    raise ValueError("classifier-free guidance (cfg_scale) needs `uncond` conditions")
  leaves = jax.tree.leaves(cond)
  if num is None:
    if not leaves:
      raise ValueError("give `num` when there are no conditions")
    num = len(leaves[0])
  if leaves and any(len(a) != num for a in leaves):
    raise ValueError(f"every condition array needs {num} rows; got "
                     f"{[np.shape(a) for a in leaves]}")
  if cond is None:
    cond = np.zeros((num,), np.int32)
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  mesh = mesh or default_mesh()
  shards = _batch_shards(mesh)
  b = max(shards, -(-min(batch_size, num) // shards) * shards)
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  x_shape = tuple(int(s) for s in x_shape)
  run = _compiled(apply_fn, cfg, x_shape, mesh, uncond is not None)
  batch_sh = _batch_sharding(mesh)
  rep = NamedSharding(mesh, PartitionSpec())
  with jax.set_mesh(mesh), nnx.logical_axis_rules(tuple(rules)):
    params = _place_params(params, mesh)
    key = jax.device_put(key, rep)
    for start in range(0, num, b):
      stop = min(start + b, num)
      # Padding rows repeat the last sample; they are computed and dropped.
      rows = np.minimum(np.arange(start, start + b), num - 1)
      put = lambda a: jax.device_put(np.asarray(a), batch_sh)
      out = run(params, key, put((start_index + rows).astype(np.int32)),
                jax.tree.map(put, _take(cond, rows)),
                None if uncond is None else jax.tree.map(put, _take(uncond, rows)))
      yield start, stop, out


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as host numpy on every process (gathers across processes)."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def generate(apply_fn: Callable, params: PyTree, cond: PyTree,
             preset: sampling.SamplerConfig | str, *, key: jax.Array | int,
             x_shape: Sequence[int], num: int | None = None,
             mesh: jax.sharding.Mesh | None = None, rules: Sequence[tuple[str, Any]] = (),
             batch_size: int = 256, uncond: PyTree = None, cfg_scale: float | None = None,
             start_index: int = 0, progress: bool = False) -> np.ndarray:
  """N samples [N, *x_shape] float32 on the host (every process gets all of them).

  Arguments as `iter_batches`; `progress` prints one line per batch to stderr.
  """
  out, t0 = [], time.perf_counter()
  for start, stop, x in iter_batches(apply_fn, params, cond, preset, key=key, x_shape=x_shape,
                                     num=num, mesh=mesh, rules=rules, batch_size=batch_size,
                                     uncond=uncond, cfg_scale=cfg_scale,
                                     start_index=start_index):
    out.append(to_host(x)[:stop - start])
    if progress and jax.process_index() == 0:
      total = num if num is not None else len(jax.tree.leaves(cond)[0])
      print(f"  samples {stop}/{total} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr,
            flush=True)
  return np.concatenate(out).astype(np.float32)


def class_labels(num: int, num_classes: int) -> np.ndarray:
  """Labels 0, 1, ..., num_classes - 1, 0, 1, ... [num] int32 (one class per grid column)."""
  return (np.arange(num) % max(num_classes, 1)).astype(np.int32)


def null_conditions(cond: PyTree, num_classes: int) -> PyTree:
  """The unconditional counterpart of `cond`: the null class id, or zero text embeddings."""
  if cond is None:
    return None
  if isinstance(cond, dict):
    return {k: np.zeros_like(np.asarray(v)) for k, v in cond.items()}
  return np.full_like(np.asarray(cond), num_classes)
