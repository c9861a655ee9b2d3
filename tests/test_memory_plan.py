"""benchmarks/memory_plan.py against XLA's compiled memory analysis (8 CPU devices)."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from twinflow_jax import models
from twinflow_jax.train import config as config_lib
from twinflow_jax.train import lora as lora_lib
from twinflow_jax.train import mesh as mesh_lib
from twinflow_jax.train import state as state_lib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "memory_plan.py"
_spec = importlib.util.spec_from_file_location("memory_plan", _PATH)
memory_plan = importlib.util.module_from_spec(_spec)
sys.modules["memory_plan"] = memory_plan     # dataclasses look their module up
_spec.loader.exec_module(memory_plan)


def _tiny_config(remat, mesh=(8, 1, 1)):
  c = config_lib.base_config()
  c.model = dict(name="qwen_image", num_layers=1, num_attention_heads=2, attention_head_dim=32,
                 axes_dims_rope=(8, 12, 12), joint_attention_dim=24, in_channels=16,
                 out_channels=4, remat=remat, attention="einsum")
  c.data.source = "arrayrecord_t2i"
  c.data.paths = "/nonexistent/x.array_record"
  c.data.latent_shape = (16, 16, 4)
  c.data.txt_len, c.data.txt_dim, c.data.pooled_dim = 8, 24, 8
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return c


def _compiled_student_step(c, per_device_batch, lora=False):
  """The trainer step's memory skeleton (train/step.py): donated (params, AdamW state, EMA),
  the teacher EMA update before the loss and a teacher forward without gradient, the student
  forward and backward, the AdamW update and the non-finite select. LoRA (`c.lora`): the
  state holds the adapters, the frozen base is a further argument (train/lora.py)."""
  mesh = mesh_lib.create_mesh(c.mesh)
  rules = models.DEFAULT_LOGICAL_AXIS_RULES
  mc = c.model.to_dict()
  if lora:
    graphdef, abs_params, specs, abs_base, base_specs = lora_lib.param_specs(
        lora_lib.model_fn(c), mesh, rules)
    apply_lora = lora_lib.make_apply_fn(graphdef, c.lora.time_input)
  else:
    graphdef, abs_params, specs = state_lib.param_specs(
        lambda rngs: models.create_model(mc, rngs=rngs), mesh, rules)
    apply_fn = state_lib.make_apply_fn(graphdef)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.99, weight_decay=0.0)
  p_sh = mesh_lib.spec_shardings(specs, mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, p_sh,
                                 transform_non_params=lambda _: mesh_lib.replicated(mesh),
                                 is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  b = per_device_batch * mesh_lib.batch_shards(mesh)
  lat = c.data.latent_shape

  def step(state, x, txt, mask, base=None):
    params, opt, ema = state
    apply = apply_fn if base is None else lambda p, *a: apply_lora((p, base), *a)
    t = jnp.full((b,), 0.5)
    cond = {"txt": txt, "txt_mask": mask}
    new_ema = jax.tree.map(lambda e, p: 0.99 * e + 0.01 * p, ema, params)
    target = jax.lax.stop_gradient(apply(new_ema, x, t, t, cond))
    loss_fn = lambda p: jnp.mean((apply(p, x, t, 0.5 * t, cond) - target)**2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, new_opt = tx.update(grads, opt, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(new_params))
    keep = lambda n, o: jax.tree.map(lambda a, z: jnp.where(ok, a, z), n, o)
    return (keep(new_params, params), keep(new_opt, opt), keep(new_ema, ema)), loss

  bs = mesh_lib.batch_sharding(mesh)
  with_sh = state_lib.abstract_with_shardings
  args = ((with_sh(abs_params, p_sh), with_sh(abs_opt, opt_sh), with_sh(abs_params, p_sh)),
          jax.ShapeDtypeStruct((b, *lat), jnp.float32, sharding=bs),
          jax.ShapeDtypeStruct((b, c.data.txt_len, c.data.txt_dim), jnp.float32, sharding=bs),
          jax.ShapeDtypeStruct((b, c.data.txt_len), jnp.bool_, sharding=bs))
  if lora:
    args += (with_sh(abs_base, mesh_lib.spec_shardings(base_specs, mesh)),)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    # keep_unused: the frozen base stays resident even where the step does not read it
    # (the last block's text stream feeds nothing). (The suite's XLA flags, tests/cpu_env.py,
    # pick the faster-compiling CPU emitters; they assign the same buffers.)
    return jax.jit(step, donate_argnums=0, keep_unused=True).lower(*args).compile(
    ).memory_analysis()


# Data parallel, FSDP, FSDP x tensor: (data, fsdp, tensor).
_MESHES = ((8, 1, 1), (1, 8, 1), (1, 4, 2))
_PER_DEVICE_BATCH = 2


@pytest.fixture(scope="module")
def tiny_plan():
  """The plan of the tiny model (remat 'none') on every mesh of _MESHES."""
  return memory_plan.plan_setting(
      memory_plan.Setting(_tiny_config("none"), _PER_DEVICE_BATCH),
      [("h100", dict(zip(("data", "fsdp", "tensor"), m))) for m in _MESHES])


def test_plan_matches_xla_memory_analysis(tiny_plan):
  """Per device, on 8 CPU devices: the plan's state is the compiled step's arguments, and
  its total (max of the backward and update peaks) is XLA's peak within 10%."""
  plan, per_device_batch = tiny_plan, _PER_DEVICE_BATCH
  errors = {}
  for mesh, planned in zip(_MESHES, plan["meshes"]):
    by = planned["bytes"]
    mem = _compiled_student_step(_tiny_config("none", mesh), per_device_batch)
    batch_bytes = per_device_batch * (16 * 16 * 4 * 4 + 8 * 24 * 4 + 8)
    state = by["params"] + by["opt"] + by["ema"]
    # The state is exact: the arguments are the state plus this device's batch.
    assert abs(mem.argument_size_in_bytes - batch_bytes - state) <= 0.01 * state, mesh
    xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    errors[mesh] = (by["total"] + batch_bytes) / xla_peak - 1
  assert all(abs(e) <= 0.10 for e in errors.values()), errors
  # The shardings split the state: FSDP over 8 about 8 ways (biases and norm scales of
  # tensor-axis dimensions stay replicated), and the activations' per-head / MLP parts
  # over the tensor axis.
  replicated, sharded = plan["meshes"][0]["bytes"], plan["meshes"][1]["bytes"]
  assert replicated["params"] == 4 * plan["params"]
  assert replicated["params"] / 8 < sharded["params"] < replicated["params"] / 6
  assert replicated["opt"] / 8 < sharded["opt"] < replicated["opt"] / 6
  assert plan["meshes"][2]["bytes"]["acts"] < 0.9 * replicated["acts"]
  assert plan["meshes"][0]["peak"] == "update" and plan["meshes"][1]["peak"] == "backward"
  assert replicated["teacher"] == replicated["params"]       # ema_decay 0.99: a new tree


def test_lora_plan_matches_xla_and_trains_adapters_only(tiny_plan):
  """The trainer's LoRA (frozen bfloat16 base, float32 adapters): state exact and the
  total within 10% of XLA's peak under FSDP; no optimizer state, EMA or gradients for the
  base."""
  mesh = (1, 8, 1)
  c = _tiny_config("none", mesh)
  c.model.param_dtype = "bfloat16"
  c.lora.time_input = "t_minus_half_r"
  lora = memory_plan.plan_setting(memory_plan.Setting(c, _PER_DEVICE_BATCH, lora_rank=4),
                                  [("v5p", {"data": 8, "fsdp": 1, "tensor": 1}),
                                   ("v5p", dict(zip(("data", "fsdp", "tensor"), mesh)))])
  assert lora["params"] == tiny_plan["params"]
  assert 0 < lora["trainable_params"] < lora["params"] / 5
  by = lora["meshes"][0]["bytes"]
  assert by["params"] == 2 * lora["params"] + 4 * lora["trainable_params"]
  assert by["ema"] == by["grads"] == 4 * lora["trainable_params"]
  # Same global batch: LoRA's step has 1 x batch backward rows, the full fine-tune's 2 x.
  assert lora["meshes"][0]["flops_per_step"] < tiny_plan["meshes"][0]["flops_per_step"]

  c.lora.rank, c.lora.alpha, c.lora.target_modules = 4, 4.0, lora["lora_targets"]
  by = lora["meshes"][1]["bytes"]
  mem = _compiled_student_step(c, _PER_DEVICE_BATCH, lora=True)
  batch_bytes = _PER_DEVICE_BATCH * (16 * 16 * 4 * 4 + 8 * 24 * 4 + 8)
  state = by["params"] + by["opt"] + by["ema"]
  assert abs(mem.argument_size_in_bytes - batch_bytes - state) <= 0.01 * state
  xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  assert abs((by["total"] + batch_bytes) / xla_peak - 1) <= 0.10, (by, xla_peak)
