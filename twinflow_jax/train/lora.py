"""LoRA fine-tuning in the trainer: frozen base, trainable adapters, the official time input.

Enabled by `config.lora.rank > 0` (see `train.config.base_config`). The model of
`config.model` (a diffusers family) gets `models.lora.LoRADense` adapters on
`config.lora.target_modules`; then
  * the TrainState's `params`, `opt_state`, `ema` and `eval_emas` hold the LoRA factors
    only (the `nnx.LoRAParam`s), so the optimizer keeps no state for the base and the
    checkpoints hold the trainable part only;
  * the frozen base (every other parameter) is a separate pytree, read from
    `config.train.init_from` straight into the same shardings as a full fine-tune, passed
    to the jitted step as an argument (never differentiated, never donated);
  * the checkpoint's config records the base: `train.init_from` (the path) and
    `lora.base_fingerprint`, an exact checksum of the loaded base computed on the devices;
    resuming, exporting or sampling (`readonly.load_run`, which reads the base with the
    same `read_base`) against other base weights is an error naming both;
  * the EMA teacher is an EMA of the LoRA factors on the shared base, started at zero
    factors: with `loss.ema_decay = 1` it stays zero, i.e. the teacher is the base model
    with its adapters disabled (official `mod_original`); with 0 < emd < 1 the first
    update copies the factors (decay 0), then it follows the official warm-up (the
    official 'old' adapter, `update_ema_lora`); with emd = 0 the online model teaches;
  * `lora.time_input = 't_minus_half_r'` calls the network as the official
    `TwinFlow_LoRA.forward` does: one time `t - r / 2` (`model(x_t, t=q - tt / 2)`), no
    target-time input (the official LoRA configs set `aux_time_embed: false`). It is
    passed as both times, so an r-embedder, if the model has one, adds exactly zero;
  * the official LoRA row groups e2e|mul|any|adv|one are `loss.one_group = True` (set by
    the LoRA configs; see losses.TwinFlowConfig.one_group).

See docs/pretrained-models.md ("LoRA") for the comparison with full fine-tuning;
tests/test_lora.py matches this path to the official `twinflow_lora.py` in float64.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax import errors
from twinflow_jax import models
from twinflow_jax.models import lora as lora_lib
from twinflow_jax.models.families import FAMILIES
from twinflow_jax.train import mesh as mesh_lib
from twinflow_jax.train.state import TrainState
from twinflow_jax.train.state import eval_ema_name

PyTree = Any
TIME_INPUTS = ("t_r", "t_minus_half_r")


def enabled(config: Any) -> bool:
  return "lora" in config and int(config.lora.get("rank", 0)) > 0


def spec_of(config: Any) -> lora_lib.LoRASpec:
  c = config.lora
  return lora_lib.LoRASpec(rank=int(c.rank), alpha=float(c.alpha),
                           target_modules=lora_lib.parse_targets(c.target_modules))


def validate(config: Any) -> None:
  """Checks the `lora` section (raises errors.ConfigError naming the field)."""
  c = config.lora
  known = {"rank", "alpha", "target_modules", "time_input", "base_fingerprint"}
  extra = sorted(set(c.keys()) - known)
  if extra:
    raise errors.ConfigError(f"unknown config.lora fields {extra}; known: {sorted(known)}")
  if not (isinstance(c.rank, int) and not isinstance(c.rank, bool) and c.rank >= 0):
    raise errors.ConfigError(f"config.lora.rank must be an int >= 0 (0 = full fine-tune), "
                             f"got {c.rank!r}")
  if c.time_input not in TIME_INPUTS:
    raise errors.ConfigError(f"config.lora.time_input must be one of {TIME_INPUTS}, got "
                             f"{c.time_input!r}")
  if not c.rank:
    return
  if not float(c.alpha) > 0:
    raise errors.ConfigError(f"config.lora.alpha must be > 0, got {c.alpha!r}")
  if not lora_lib.parse_targets(c.target_modules):
    raise errors.ConfigError("config.lora.target_modules is empty; give the diffusers "
                             "module names to adapt, comma-separated (e.g. 'to_q,to_k')")
  if config.model.get("name") not in FAMILIES:
    raise errors.ConfigError(f"config.lora needs a pretrained family model "
                             f"(config.model.name in {sorted(FAMILIES)}), got "
                             f"{config.model.get('name')!r}")
  if not config.train.init_from:
    raise errors.ConfigError("config.train.init_from must name the base weights (a "
                             "diffusers transformer folder) of a LoRA run (config.lora.rank "
                             f"= {c.rank})")


def model_fn(config: Any) -> Callable[[nnx.Rngs], nnx.Module]:
  """`rngs -> model` with the LoRA adapters of `config.lora` in place."""
  model_config = config.model.to_dict()
  spec = spec_of(config)

  def build(rngs: nnx.Rngs) -> nnx.Module:
    model = models.create_model(model_config, rngs=rngs)
    lora_lib.wrap(model, spec, rngs)
    return model

  return build


def param_specs(build: Callable[[nnx.Rngs], nnx.Module], mesh: jax.sharding.Mesh,
                rules) -> tuple[nnx.GraphDef, PyTree, PyTree, PyTree, PyTree]:
  """(graphdef, abstract LoRA params, their PartitionSpecs, abstract base, its specs)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(params=0)))
    graphdef, train_p, frozen_p, rest = nnx.split(abstract, lora_lib.TRAINABLE,
                                                  lora_lib.FROZEN, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the trainer supports models whose state is all nnx.Param")
    out = (nnx.to_pure_dict(train_p), nnx.to_pure_dict(nnx.get_partition_spec(train_p)),
           nnx.to_pure_dict(frozen_p), nnx.to_pure_dict(nnx.get_partition_spec(frozen_p)))
  return (graphdef,) + out


def _split(model: nnx.Module) -> tuple[PyTree, PyTree]:
  _, train_p, frozen_p = nnx.split(model, lora_lib.TRAINABLE, lora_lib.FROZEN)
  return nnx.to_pure_dict(train_p), nnx.to_pure_dict(frozen_p)


def init_state(build: Callable[[nnx.Rngs], nnx.Module], tx, key: jax.Array,
               eval_ema_decays: tuple[float, ...] = ()) -> TrainState:
  """The TrainState of a LoRA run (call under `jax.jit` with output shardings).

  `params` are the fresh LoRA factors (A gaussian, B zero); the EMA teacher starts at zero
  factors (= the base model; see the module docstring).
  """
  k_model, k_train = jax.random.split(key)
  params, _ = _split(build(nnx.Rngs(params=k_model)))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema=jax.tree.map(jnp.zeros_like, params),
      ema_cmd=jnp.zeros((), jnp.float32),
      eval_emas={eval_ema_name(d): jax.tree.map(jnp.copy, params) for d in eval_ema_decays},
      rng=jax.random.key_data(k_train),
      skipped=jnp.zeros((), jnp.int32))


def init_frozen(build: Callable[[nnx.Rngs], nnx.Module], key: jax.Array) -> PyTree:
  """The base parameters of a fresh model (`read_base` keeps those a folder lacks)."""
  k_model, _ = jax.random.split(key)
  return _split(build(nnx.Rngs(params=k_model)))[1]


def make_apply_fn(graphdef: nnx.GraphDef, time_input: str) -> Callable:
  """`apply_fn((lora, base), x_t, t, r, cond) -> F`, the losses' convention.

  time_input 't_minus_half_r': the network sees the single time t - r / 2 (official
  TwinFlow_LoRA); 't_r': t and r as in a full fine-tune. F is float32 (float64 from a
  float64 model, so the loss can be checked against the official code in float64).
  """
  if time_input not in TIME_INPUTS:
    raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")

  def apply_fn(params, x_t, t, r, cond):
    trainable, frozen = params
    model = nnx.merge(graphdef, trainable, frozen)
    if time_input == "t_minus_half_r":
      t = t - r / 2
      r = t
    out = model(x_t, t, r, cond)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))

  return apply_fn


def read_base(frozen_init_fn: Callable[[jax.Array], PyTree], graphdef: nnx.GraphDef,
              adapters: PyTree, frozen_shardings: PyTree, path: str, seed: int) -> PyTree:
  """The frozen base of a LoRA model, read from `path` straight into `frozen_shardings`.

  The one way the base is made, by the trainer and by read-only consumers (sampling). Each
  parameter the folder holds is read into its sharding; those it lacks (an r-embedder)
  take the model's init with `seed` (config.seed; only they are computed), so the base and
  its `fingerprint` depend only on the folder and the seed. Call under the mesh and
  logical-axis rules.

  Args:
    frozen_init_fn: `key -> base params` (`functools.partial(init_frozen, build)`).
    graphdef: the LoRA model's graphdef (from `param_specs`).
    adapters: the LoRA factors, abstract (ShapeDtypeStructs) or not; not read.
    frozen_shardings: NamedShardings of the base parameters.
    path: diffusers folder or pretrained directory (config.train.init_from).
    seed: the run's config.seed.
  """
  key = jax.random.key(seed)
  target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        jax.eval_shape(frozen_init_fn, key), frozen_shardings)
  model = nnx.merge(graphdef, adapters, target)
  models.load_pretrained(model, path)
  _, loaded = _split(model)
  leaves, treedef = jax.tree.flatten(loaded)
  absent = [i for i, a in enumerate(leaves) if isinstance(a, jax.ShapeDtypeStruct)]
  if absent:   # XLA keeps only the init of these
    init = lambda k: [jax.tree.leaves(frozen_init_fn(k))[i] for i in absent]
    values = jax.jit(init, out_shardings=[leaves[i].sharding for i in absent])(key)
    for i, v in zip(absent, values):
      leaves[i] = v
  return jax.jit(lambda p: p, out_shardings=frozen_shardings)(
      jax.tree.unflatten(treedef, leaves))


def fingerprint(frozen: PyTree) -> str:
  """An exact, sharding-independent identity of the base weights (16 hex digits).

  The checkpoint module's per-array checksums (computed on the devices, a global
  computation: every process calls it), hashed together with names, shapes and dtypes.
  """
  from twinflow_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  record = ckpt_lib.integrity_record(frozen, 0)["arrays"]
  blob = json.dumps(record, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def check_fingerprint(config: Any, got: str, what: str,
                      fix: str = "point config.train.init_from at the original base") -> None:
  """Raises errors.ConfigError if `config.lora.base_fingerprint` is set and differs.

  `fix` ends the message: what the user should do.
  """
  want = config.lora.get("base_fingerprint", "") if "lora" in config else ""
  if want and want != got:
    raise errors.ConfigError(
        f"the base weights at {config.train.init_from} (fingerprint {got}) are not those "
        f"{what} (fingerprint {want}); {fix}")


def frozen_shardings(specs: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  return mesh_lib.spec_shardings(specs, mesh)
