"""Device mesh from the config, and the shardings that the trainer derives from it.

The mesh always has the three axes `('data', 'fsdp', 'tensor')`. Batches are split over
`data` x `fsdp`; parameters are split by the model's logical axis names through the
logical-axis rules (FSDP shards weights over `fsdp`, tensor parallelism over `tensor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _fill_sizes(sizes: Sequence[int], total: int, what: str) -> tuple[int, ...]:
  """Replaces at most one -1 in `sizes` so that their product is `total`."""
  sizes = [int(s) for s in sizes]
  names = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{what} sizes must be positive or -1, got {names}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one {what} size may be -1, got {names}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(
          f"{what} sizes {names} cannot fill {total} devices: {total} is not divisible "
          f"by {known}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(
        f"{what} sizes {names} multiply to {math.prod(sizes)}, but there are {total} "
        "devices")
  return tuple(sizes)


def mesh_shape(mesh_config: Any, num_devices: int,
               num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Resolves the in-slice (ICI) and across-slice (DCN) mesh shapes.

  Args:
    mesh_config: has `data`, `fsdp`, `tensor` (in-slice sizes, one may be -1) and optionally
      `dcn_data`, `dcn_fsdp`, `dcn_tensor` (across-slice sizes, default 1, one may be -1).
    num_devices: total number of devices.
    num_slices: number of slices (TPU multi-slice); 1 elsewhere.

  Returns:
    (ici_shape, dcn_shape), each a 3-tuple; the mesh shape is their product.
  """
  if num_devices % num_slices:
    raise ValueError(f"{num_devices} devices do not split into {num_slices} slices")
  dcn = [mesh_config.get(f"dcn_{a}", 1) for a in MESH_AXES]
  dcn = _fill_sizes(dcn, num_slices, "across-slice (dcn_*) mesh")
  ici = _fill_sizes([mesh_config.get(a, 1) for a in MESH_AXES], num_devices // num_slices,
                    "in-slice mesh")
  return ici, dcn


def create_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None
                ) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh described by `mesh_config`.

  Axes are `AxisType.Auto` so that logical sharding constraints inside models work.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = {getattr(d, "slice_index", 0) for d in devices}
  ici, dcn = mesh_shape(mesh_config, len(devices), len(slices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(slices) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=axis_types)
  shape = tuple(i * d for i, d in zip(ici, dcn))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                           axis_types=axis_types)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """Number of ways a global batch is split (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh,
                     process_count: int | None = None, accum_steps: int = 1) -> None:
  """Fails early, naming the numbers, when the batch does not divide the mesh."""
  process_count = jax.process_count() if process_count is None else process_count
  shards = batch_shards(mesh)
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  if global_batch_size % shards:
    raise ValueError(
        f"global batch size {global_batch_size} does not divide the {shards} batch shards "
        f"of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} does not divide the "
                     f"{process_count} processes")
  del accum_steps  # every call of the step is one (micro-)batch of this size


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def spec_shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  """Tree of PartitionSpec -> tree of NamedSharding on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, PartitionSpec))


def check_shardable(abstract_tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> None:
  """Raises ValueError naming the first array whose dims do not divide its mesh axes.

  Args:
    abstract_tree: tree of arrays / ShapeDtypeStructs.
    specs: matching tree of PartitionSpec.
    mesh: the mesh.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  if len(flat) != len(flat_specs):
    raise ValueError(f"{len(flat_specs)} partition specs for {len(flat)} arrays")
  for (path, leaf), spec in zip(flat, flat_specs):
    shape = tuple(leaf.shape)
    if len(spec) > len(shape):
      raise ValueError(f"{jax.tree_util.keystr(path)}: partition spec {spec} has more "
                       f"entries than the array's shape {shape}")
    for dim, axes in zip(shape, spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      unknown = [a for a in axes if a not in mesh.shape]
      if unknown:
        raise ValueError(f"{jax.tree_util.keystr(path)}: partition spec {spec} names mesh "
                         f"axes {unknown} that are not in the mesh {dict(mesh.shape)}")
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
        raise ValueError(
            f"cannot shard {jax.tree_util.keystr(path)} of shape {shape} with spec {spec}: "
            f"dimension {dim} is not divisible by {sizes} = {ways}")


def logical_rules(config_rules: Any, default_rules: Sequence[tuple[str, Any]]
                  ) -> tuple[tuple[str, Any], ...]:
  """Config rules (list of (logical, mesh axes) pairs or a mapping) override defaults.

  Raises:
    ValueError: naming config.mesh.logical_axis_rules, for a rule that is not a pair or
      a mesh axis that does not exist. (A logical name the defaults lack is allowed, for
      models of your own, with a warning: it may be a typo.)
  """
  rules = dict(default_rules)
  field = "config.mesh.logical_axis_rules"
  if config_rules:
    items = config_rules.items() if isinstance(config_rules, Mapping) else config_rules
    for rule in items:
      if not isinstance(rule, (tuple, list)) or len(rule) != 2:
        raise ValueError(f"{field}: each rule must be a pair (logical name, mesh axes), "
                         f"got {rule!r}")
      name, axes = rule
      if name not in rules:
        logging.warning("%s: logical axis %r is not one the shipped models use (%s)",
                        field, name, ", ".join(sorted(dict(default_rules))))
      if isinstance(axes, list):
        axes = tuple(axes)
      named = axes if isinstance(axes, tuple) else (axes,)
      bad = [a for a in named if a is not None and a not in MESH_AXES]
      if bad:
        raise ValueError(f"{field}: rule {name!r} names mesh axes {bad}; the mesh axes "
                         f"are {MESH_AXES} (or None)")
      rules[name] = axes
  return tuple(rules.items())
