"""Logical axis names, default mesh rules and activation constraints.

Every parameter of the models carries logical axis names in its
`out_sharding` metadata (e.g. ('embed', 'mlp')), and the main activations are
constrained with `constrain` (names 'activation_batch', 'activation_length',
'activation_embed', 'activation_heads', 'activation_kv', 'activation_mlp').
Logical names become mesh axes through rules such as
`DEFAULT_LOGICAL_AXIS_RULES`, written for a mesh ('data', 'fsdp', 'tensor'):
batch over data x fsdp, weights' model width over fsdp (ZeRO-3 style), heads
and MLP width over tensor.

How a trainer builds a sharded model. Keep the rules active wherever logical
names are turned into shardings (creation, `nnx.get_partition_spec`,
`nnx.get_named_sharding`, `nnx.get_abstract_model`) and while tracing the
forward:

  mesh = jax.make_mesh((d, f, t), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
    # 1) Eager: variables are sharded as they are created.
    model = create_model(config, rngs=nnx.Rngs(0))
    # 2) Abstract first, then a jitted init with out_shardings (no device
    #    holds an unsharded copy); also the restore target of checkpoints.
    abstract = nnx.eval_shape(lambda: create_model(config, rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    shardings = nnx.get_named_sharding(nnx.state(abstract, nnx.Param), mesh)
    # Forward / train step: trace inside the same two contexts.

`create_model` applies `DEFAULT_LOGICAL_AXIS_RULES` itself when a mesh is set
and no rules are active, and builds unsharded when no mesh is set; `constrain`
falls back to the default rules under a mesh as well.
`logical_to_mesh_spec` converts names for code outside NNX (e.g. data specs).
"""

from collections.abc import Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical name -> mesh axis (or axes, or None = replicated). Every name used by
# the models appears here: flax passes unknown names through as mesh axes.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None],
                                  ...] = (
    # Activations.
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    # Parameters.
    ('embed', 'fsdp'),  # model width
    ('mlp', 'tensor'),  # MLP hidden width (also hidden of embedder MLPs)
    ('heads', 'tensor'),  # attention heads
    ('kv', None),  # per-head feature
    ('qkv', None),  # the 3 of a fused q/k/v projection
    ('modulation', 'tensor'),  # adaLN output (2 or 6 x width)
    ('freq', None),  # sinusoidal frequency features
    ('patch', None),  # p * p * channels
    ('classes', None),  # label table rows
    ('txt_embed', 'tensor'),  # precomputed text feature width
    ('pooled', 'tensor'),  # pooled text vector width
)


def logical_to_mesh_spec(
    names: Sequence[str | None],
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] | None = None,
) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec` of mesh axes.

  Args:
    names: one logical name (or None) per array dimension.
    rules: (logical, mesh axes) pairs; default `DEFAULT_LOGICAL_AXIS_RULES`.

  Returns:
    The PartitionSpec. Names without a rule are replicated (None).
  """
  table = dict(DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules)
  return PartitionSpec(*(table.get(n) if n is not None else None
                         for n in names))


def mesh_axes(name: str) -> tuple[str, ...] | None:
  """Mesh axes that logical `name` maps to under the active mesh and rules.

  Uses the rules of `nnx.logical_axis_rules(...)` or else
  `DEFAULT_LOGICAL_AXIS_RULES`, keeps only axes the current mesh has, and
  returns None without a mesh or when nothing is left (e.g. the batch axes
  ('data', 'fsdp') for 'activation_batch' under the default rules).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axes = dict(core_spmd.get_logical_axis_rules()
              or DEFAULT_LOGICAL_AXIS_RULES).get(name)
  if axes is None:
    return None
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes)
               if a in mesh.shape)
  return axes or None


def _mesh_axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  return size


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical names; a no-op without a mesh.

  Active inside `jax.set_mesh(mesh)`, with the rules of
  `nnx.logical_axis_rules(...)` or else `DEFAULT_LOGICAL_AXIS_RULES`, so
  single-device code runs unchanged. Mesh axes the mesh lacks are ignored;
  dimensions that the mapped mesh axes do not divide stay replicated.

  Args:
    x: array of rank len(names).
    names: logical axis name (or None) per dimension.

  Returns:
    x, with a `with_sharding_constraint` when a mesh and rules are active.
  """
  if x.ndim != len(names):
    raise ValueError(f'constrain: {x.shape=} does not match {names=}')
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = core_spmd.get_logical_axis_rules() or DEFAULT_LOGICAL_AXIS_RULES
  table = dict(rules)
  spec = []
  for dim, name in zip(x.shape, names):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
      axes_t = tuple(a for a in axes_t if a in mesh.shape)
      axes = axes_t if axes_t and dim % _mesh_axis_size(mesh, axes_t) == 0 \
          else None
    spec.append(axes)
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
