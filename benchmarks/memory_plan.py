r"""Memory and FLOP plan of a TwinFlow fine-tune on a device mesh, without any device.

For a model, a training setting and meshes it prints, per device, the bytes of
  params      the trainer's parameters (float32 master weights; LoRA: the frozen base in
              its param_dtype plus the adapters),
  opt         the optimizer state (AdamW mu and nu; LoRA: adapters only),
  ema         the TwinFlow EMA teacher and any evaluation EMAs (LoRA: adapters only),
  teacher     the step's new teacher (the EMA updated before the loss, as the official
              code does), held next to the old one until the step's non-finite select;
              none with ema_decay 0 or 1,
  grads       the gradients (sharded like the parameters, reduce-scattered),
  update      the new parameters, optimizer state and evaluation EMAs: the non-finite check
              reduces over all new parameters before it selects between new and old, so
              they exist next to the old state,
  acts        activations the student forward keeps for its backward at the per-device
              batch under the configured remat policy and tensor sharding,
  work        the backward's transient working set: with remat, one block recomputed (its
              activations without remat), its weights and the next block's FSDP-gathered
              and its unreduced gradients; without remat under FSDP, every gathered weight
              (the forward's and the backward's all-gather of a shard are merged by XLA),
and the per-device total, the larger of two peaks:
  backward    params + opt + ema + teacher + max(acts, grads) + work (activations are freed
              block by block as the gradients accumulate: the sum is largest at an end),
  update      params + opt + ema + teacher + update,
against each device's memory; plus the FLOPs of one step.

How each figure is obtained:
  * params / opt / ema / grads / update: the trainer's own abstract `TrainState`
    (`jax.eval_shape` of the configured optimizer's init) and the PartitionSpecs the
    trainer derives from the models' logical-axis rules (`train.state.param_specs`, or
    `train.lora.param_specs` for LoRA; the config's `mesh.logical_axis_rules` over
    `models.DEFAULT_LOGICAL_AXIS_RULES`); bytes per device are each array's shard size on
    the target mesh. Exact: the test suite matches the argument size of the compiled step.
    Arrays whose dimensions the mesh axes do not divide are reported (the trainer refuses
    them).
  * acts: the residuals JAX saves for the backward of the student forward
    (`saved_residuals` of the real model, traced abstractly at the per-device batch with
    the configured remat policy; nothing is allocated). Residuals with a heads axis
    (..., heads, ..., head_dim) or an MLP-hidden last axis are divided by the tensor axis
    (the 'activation_heads' / 'activation_mlp' rules); the rest (the residual stream, and
    the attention output before its projection, which has the model width's shape) count
    whole.
  * tests/test_memory_plan.py compiles a trainer-like step on 8 CPU devices and checks the
    total against XLA's peak (arguments + outputs - aliased + temporaries) within 10% on
    data-parallel, FSDP and FSDP x tensor meshes and for LoRA (docs/memory-plan.md).
  * FLOPs per step: `models.flops_per_forward` of one row times (network rows of the loss,
    `losses.count_network_rows`, + 2 x batch for the student's backward); LoRA: + 1 x batch
    (gradients flow to the activations; weight gradients only for the adapters, counted
    as 0).

LoRA (`--mode lora`): the trainer's `config.lora` adapters (`models.lora.LoRADense`, A [in,
rank] and B [rank, out] in float32, sharded like the kernel's in / out dimension) on the
official targets of `qwenimage_lora_*.yaml` that the model has (to_q, to_k, to_v, to_out.0,
add_q/k/v_proj, to_add_out, img_mlp / txt_mlp net.0.proj and net.2,
timestep_embedder.linear_1 / linear_2; FLUX / SD3 ff / ff_context alike; rank 64, alpha
64); the base stays frozen in bfloat16 with no gradient, optimizer state or EMA.

  python3 benchmarks/memory_plan.py                       # the paper's Qwen-Image-20B setting
  python3 benchmarks/memory_plan.py --model qwen_image_20b --mode full,lora \
      --meshes v5p:64,v5p:256,v5p:512,h100:8,h100:64,h200:8,h200:64 --per-device-batch 4 \
      --image-size 512 --txt-len 512 --remat full [--json out.json] [--markdown]
  python3 benchmarks/memory_plan.py --config configs/t2i_mmdit.py --meshes v5p:64

Architecture sizes of the released models (`--model`) are their diffusers config.json
values, written below (no download). Meshes are FSDP over all chips (data = 1, fsdp = n,
tensor = 1) unless given as `kind:data x fsdp x tensor`, e.g. `v5p:2x128x1`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

GIB = 2**30
# Memory per chip (GiB) of the devices the plan knows.
DEVICE_MEMORY_GIB = {"v5p": 95.0, "h100": 80.0, "h200": 141.0, "v5e": 16.0, "v6e": 32.0,
                     "a100": 80.0}
# Share of a chip's memory the plan lets the program use (runtime, fragmentation).
USABLE_FRACTION = 0.9

# transformer/config.json of the released diffusers checkpoints (the architecture fields).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen-Image transformer/config.json (QwenImageTransformer2DModel, 20.4B).
    "qwen_image_20b": dict(
        name="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=60,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
        guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    # black-forest-labs/FLUX.1-dev transformer/config.json (FluxTransformer2DModel, 11.9B).
    "flux_dev": dict(
        name="flux", patch_size=1, in_channels=64, out_channels=None, num_layers=19,
        num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)),
    # stabilityai/stable-diffusion-3.5-large transformer/config.json (8.1B).
    "sd35_large": dict(
        name="sd3", sample_size=128, patch_size=2, in_channels=16, num_layers=38,
        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
        caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm", dual_attention_layers=()),
    # stabilityai/stable-diffusion-3.5-medium transformer/config.json (2.5B).
    "sd35_medium": dict(
        name="sd3", sample_size=128, patch_size=2, in_channels=16, num_layers=24,
        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13))),
}
# Latent channels (NHWC) and pooled width the data of each family has.
_FAMILY_DATA = {"qwen_image": (16, 3584), "flux": (16, 768), "sd3": (16, 2048)}

# Official LoRA targets (qwenimage_lora_1order.yaml), diffusers module names (PEFT suffix
# rule, as config.lora.target_modules); the FLUX / SD3 feed-forward names alike. A model
# gets those of them it has.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                "add_v_proj", "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mlp.net.0.proj", "txt_mlp.net.2", "timestep_embedder.linear_1",
                "timestep_embedder.linear_2", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2")
LORA_RANK = 64


@dataclasses.dataclass
class Setting:
  """One training setting: a trainer config plus how it is planned."""
  config: Any                 # ml_collections ConfigDict of twinflow_jax.main
  per_device_batch: int
  lora_rank: int = 0          # 0: full fine-tune


def _config_from_file(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("plan_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_setting(model: str, mode: str, *, per_device_batch: int, image_size: int,
                  txt_len: int, remat: str) -> Setting:
  """The paper-style setting of a released model: 'full' or 'lora' fine-tune.

  Full: official `qwenimage_full.yaml` (estimate_order 2, enhanced_ratio 0.8, ema_decay 0,
  the r-embedder, lr 1e-5), bfloat16 compute on float32 master weights, AdamW.
  LoRA: `qwenimage_lora_1order.yaml` (rank 64, no r-embedder, estimate_order 1,
  enhanced_ratio 4, ema_decay 1), base weights bfloat16.
  """
  from twinflow_jax.train.config import base_config  # pylint: disable=g-import-not-at-top
  if model not in ARCHITECTURES:
    raise ValueError(f"--model {model!r}: choose one of {tuple(ARCHITECTURES)}")
  arch = dict(ARCHITECTURES[model])
  channels, pooled = _FAMILY_DATA[arch["name"]]
  c = base_config()
  lora = mode == "lora"
  c.model = dict(arch, dtype="bfloat16", param_dtype="bfloat16" if lora else "float32",
                 remat=remat, attention="xla", r_embedder=not lora)
  lat = image_size // 8
  c.data.source = "arrayrecord_t2i"
  c.data.paths = "/nonexistent/plan.array_record"      # only shapes are read
  c.data.latent_shape = (lat, lat, channels)
  c.data.txt_len = txt_len
  c.data.txt_dim = arch["joint_attention_dim"]
  c.data.pooled_dim = pooled
  c.optim.name = "adamw"
  c.optim.b1, c.optim.b2 = 0.9, 0.99
  c.optim.weight_decay = 0.0
  if lora:
    c.loss.estimate_order = 1
    c.loss.enhanced_ratio = 4.0
    c.loss.ema_decay = 1.0
    c.lora.alpha = float(LORA_RANK)
    c.lora.time_input = "t_minus_half_r"     # official TwinFlow_LoRA forward
  else:
    c.loss.estimate_order = 2
    c.loss.enhanced_ratio = 0.8
    c.loss.ema_decay = 0.0     # official ema_decay_rate 0: the online network teaches
  return Setting(c, per_device_batch, LORA_RANK if lora else 0)


def parse_mesh(text: str) -> tuple[str, dict[str, int]]:
  """'v5p:256' -> ('v5p', {data 1, fsdp 256, tensor 1}); 'h100:2x4x1' -> explicit axes."""
  m = re.fullmatch(r"([a-z0-9]+):(\d+)(?:x(\d+)x(\d+))?", text.strip().lower())
  if not m or m.group(1) not in DEVICE_MEMORY_GIB:
    raise ValueError(f"mesh {text!r}: use KIND:N or KIND:DATAxFSDPxTENSOR with KIND one of "
                     f"{tuple(DEVICE_MEMORY_GIB)}")
  if m.group(3) is None:
    return m.group(1), {"data": 1, "fsdp": int(m.group(2)), "tensor": 1}
  return m.group(1), {"data": int(m.group(2)), "fsdp": int(m.group(3)),
                      "tensor": int(m.group(4))}


def _spec_ways(spec, mesh_shape: dict[str, int]) -> list[int]:
  ways = []
  for axes in spec:
    if axes is None:
      ways.append(1)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    ways.append(math.prod(mesh_shape.get(a, 1) for a in axes))
  return ways


def shard_bytes(shape, dtype, spec, mesh_shape: dict[str, int]) -> tuple[int, bool]:
  """(bytes of one device's shard, whether the mesh divides every sharded dimension)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ways = _spec_ways(tuple(spec), mesh_shape) + [1] * (len(shape) - len(tuple(spec)))
  even = all(d % w == 0 for d, w in zip(shape, ways))
  n = math.prod(-(-d // w) for d, w in zip(shape, ways))
  return n * np.dtype(dtype).itemsize, even


def tree_bytes(tree, specs, mesh_shape, *, max_itemsize: int | None = None,
               only_axis: str | None = None) -> tuple[int, list[str]]:
  """Per-device bytes of a tree of ShapeDtypeStructs with a matching tree of specs.

  max_itemsize caps each element's size (e.g. weights gathered in the compute dtype);
  only_axis counts only the leaves that the spec shards over that mesh axis.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  total, uneven = 0, []
  for (path, leaf), spec in zip(flat, flat_specs, strict=True):
    if only_axis is not None and not any(
        a == only_axis or (isinstance(a, tuple) and only_axis in a) for a in spec):
      continue
    dtype = leaf.dtype
    if max_itemsize is not None and np.dtype(dtype).itemsize > max_itemsize:
      dtype = {2: np.float16, 4: np.float32}[max_itemsize]
    b, even = shard_bytes(leaf.shape, dtype, spec, mesh_shape)
    total += b
    if not even:
      uneven.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {spec}")
  return total, uneven


def _saved_residual_bytes(fn, *args, heads: int = 0, head_dim: int = 0,
                          mlp_dims: frozenset[int] = frozenset()):
  """Bytes of what the backward of fn(*args) keeps, arguments excluded (JAX level).

  Returns [other, per-head, MLP-hidden] bytes (a numpy vector): residuals whose trailing
  axes are (heads, ..., head_dim) or whose last axis is an MLP hidden width are the ones
  the 'activation_heads' / 'activation_mlp' rules split over the tensor axis.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax._src import ad_checkpoint  # pylint: disable=g-import-not-at-top
  total = np.zeros(3, np.int64)
  for aval, why in ad_checkpoint.saved_residuals(fn, *args):
    if "argument" in why:   # parameters and inputs: live anyway
      continue
    shape = tuple(aval.shape)
    kind = 0
    if len(shape) >= 3 and shape[-1] in mlp_dims:
      kind = 2
    elif heads and len(shape) >= 3 and shape[-1] in (head_dim, 1) and heads in shape[1:-1]:
      kind = 1
    total[kind] += aval.size * aval.dtype.itemsize
  return total


def _tensor_share(parts, tensor: int, heads: int, mlp_dims) -> int:
  """Per-device bytes of [other, per-head, MLP] residuals under `tensor`-way sharding
  (a dimension the axis does not divide stays replicated, as `models.constrain` does)."""
  th = tensor if heads and heads % tensor == 0 else 1
  tm = tensor if mlp_dims and all(m % tensor == 0 for m in mlp_dims) else 1
  return int(parts[0] + -(-parts[1] // th) + -(-parts[2] // tm))


def _dense_paths(abs_params) -> list[tuple[tuple[str, ...], tuple[int, int]]]:
  """(module path, kernel shape) of every 2-D Dense kernel."""
  import jax  # pylint: disable=g-import-not-at-top
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(abs_params)[0]:
    keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    if keys[-1] == "kernel" and len(leaf.shape) == 2:
      out.append((keys[:-1], tuple(leaf.shape)))
  return out


def plan_setting(setting: Setting, meshes: list[tuple[str, dict[str, int]]]) -> dict:
  """Per-device memory of every component and the step FLOPs on each mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from twinflow_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax import losses  # pylint: disable=g-import-not-at-top
  from twinflow_jax import models  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models import lora as lora_models  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.layers import Dense  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import optim  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import lora as lora_train  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  c = setting.config
  model_config = c.model.to_dict()
  rules = mesh_lib.logical_rules(c.mesh.get("logical_axis_rules", ()),
                                 models.DEFAULT_LOGICAL_AXIS_RULES)
  # PartitionSpecs depend on the axis names only; a 1-device mesh with the trainer's axes.
  mesh1 = jax.make_mesh((1, 1, 1), models.MESH_AXES,
                        axis_types=(jax.sharding.AxisType.Auto,) * 3,
                        devices=jax.devices()[:1])
  model_fn = lambda rngs: models.create_model(model_config, rngs=rngs)
  graphdef, abs_params, p_specs = state_lib.param_specs(model_fn, mesh1, rules)
  tx, _ = optim.create_optimizer(c.optim, int(c.train.num_steps))
  decays = tuple(float(d) for d in c.train.eval_ema_decays)
  lora = setting.lora_rank > 0

  # Identical blocks: models of 1 and 2 blocks (each kind) are traced and the results
  # extrapolated linearly, exact for a stack of equal blocks and far faster than 60 blocks.
  if "transformer_blocks" in abs_params:      # diffusers families: count the built blocks
    layer_key = "num_layers"
    model_config.setdefault(layer_key, len(abs_params["transformer_blocks"]))
    if "single_transformer_blocks" in abs_params:
      model_config.setdefault("num_single_layers", len(abs_params["single_transformer_blocks"]))
  else:
    layer_key = "num_layers" if "num_layers" in model_config else "depth"
    if layer_key not in model_config:
      model_config[layer_key] = models.resolve_config(model_config).depth
  n_layers = int(model_config[layer_key])
  n_single = int(model_config.get("num_single_layers", 0) or 0)
  pieces = [(1, 0), (2, 0)] + ([(1, 1)] if n_single else [])

  def extrapolate(value):
    """value(layers, single) of the small models -> the full model's."""
    v1 = value(1, 0)
    out = v1 + (n_layers - 1) * (value(2, 0) - v1)
    return out + n_single * (value(1, 1) - v1) if n_single else out

  def small_config(remat, layers, single=0):
    mc = dict(model_config, remat=remat, **{layer_key: layers})
    if "num_single_layers" in model_config:
      mc["num_single_layers"] = single
    if "dual_attention_layers" in model_config:
      mc["dual_attention_layers"] = ()
    return mc

  import optax  # pylint: disable=g-import-not-at-top
  rep = jax.sharding.NamedSharding(mesh1, P())

  def opt_of(tree, specs):
    """Abstract optimizer state of `tree` and its PartitionSpecs (`state_shardings`)."""
    abs_opt = jax.eval_shape(tx.init, tree)
    shard = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh1, s), specs,
                         is_leaf=lambda s: isinstance(s, P))
    opt_specs = jax.tree.map(lambda s: s.spec, optax.tree_map_params(
        tx, lambda _, s: s, abs_opt, shard, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)),
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    return abs_opt, opt_specs

  if lora:
    # The trainer's own LoRA (train/lora.py): LoRADense adapters A [in, r], B [r, out]
    # (float32) on the official targets this model has, sharded like the kernel's in / out
    # dimension; the base is a separate frozen tree (the same arrays as the full model's).
    with jax.set_mesh(mesh1), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
      abstract = nnx.eval_shape(lambda: models.create_model(
          small_config("none", 1, min(n_single, 1)), rngs=nnx.Rngs(0)))
      names = [lora_models.diffusers_name(abstract, tuple(path))
               for path, m in nnx.iter_modules(abstract) if isinstance(m, Dense)]
    targets = [t for t in LORA_TARGETS if any(lora_models.matches(n, (t,)) for n in names)]
    if not targets:
      raise ValueError(f"none of the LoRA targets {LORA_TARGETS} is a projection of "
                       f"{model_config.get('name')}")
    c = copy.deepcopy(c)
    c.lora.rank = setting.lora_rank
    c.lora.alpha = float(c.lora.get("alpha", 0.0) or setting.lora_rank)
    if not c.lora.get("target_modules"):      # a --config's own targets win
      c.lora.target_modules = ",".join(targets)
    lora_spec = lora_train.spec_of(c)
    time_input = c.lora.get("time_input", "t_r")
    lora_trees = {}

    def lora_small(remat, layers, single=0):
      """(graphdef, adapters, their specs, base) of a small LoRA model. Built small: the
      abstract LoRA model of 60 blocks takes minutes to trace (its rng counters)."""
      if (remat, layers, single) not in lora_trees:
        mc = small_config(remat, layers, single)

        def build(rngs):
          model = models.create_model(mc, rngs=rngs)
          lora_models.wrap(model, lora_spec, rngs)
          return model
        gd, tr, ts, fr, _ = lora_train.param_specs(build, mesh1, rules)
        lora_trees[(remat, layers, single)] = (gd, tr, ts, fr)
      return lora_trees[(remat, layers, single)]

    trainable = {k: lora_small("none", *k)[1:3] for k in pieces}
    trainable = {k: (tr, ts) + opt_of(tr, ts) for k, (tr, ts) in trainable.items()}

    def trainable_bytes(shape):
      train_b = extrapolate(lambda *k: tree_bytes(*trainable[k][:2], shape)[0])
      opt_b = extrapolate(lambda *k: tree_bytes(*trainable[k][2:], shape)[0])
      return train_b, opt_b
    n_train = extrapolate(lambda *k: state_lib.num_params(trainable[k][0]))
  else:
    abs_opt, opt_specs = opt_of(abs_params, p_specs)

    def trainable_bytes(shape):
      return tree_bytes(abs_params, p_specs, shape)[0], tree_bytes(abs_opt, opt_specs, shape)[0]
    n_train = state_lib.num_params(abs_params)

  # Activations at the per-device batch: residuals of the student forward's backward.
  spec = data_lib.get_data_spec(c.data)
  b = setting.per_device_batch
  x = jax.ShapeDtypeStruct((b, *spec.x_shape), jnp.float32)
  txt_len, txt_dim = spec.txt_shape
  cond = {"txt": jax.ShapeDtypeStruct((b, txt_len, txt_dim), jnp.float32),
          "txt_mask": jax.ShapeDtypeStruct((b, txt_len), jnp.bool_),
          "pooled": jax.ShapeDtypeStruct((b, spec.pooled_dim), jnp.float32)}
  tvec = jax.ShapeDtypeStruct((b,), jnp.float32)

  # Head count, head width and MLP widths, for the tensor-parallel share of the residuals.
  heads = int(model_config.get("num_attention_heads", model_config.get("num_heads", 0)) or 0)
  head_dim = int(model_config.get("attention_head_dim", 0) or 0)
  mlp_dims = frozenset(shape[1] for path, shape in _dense_paths(abs_params)
                       if path[-1] == "fc1")
  traced = {}

  def small(remat, layers, single=0):
    """Saved-residual bytes [other, per-head, MLP] of a small model."""
    if (remat, layers, single) not in traced:     # 'none' traces repeat under remat 'none'
      if lora:
        gd, tr, _, fr = lora_small(remat, layers, single)
        apply = lora_train.make_apply_fn(gd, time_input)
        # Traced with the base differentiated too, so that its weights stay arguments (a
        # stop_gradient would turn them into saved values); the extra residuals this adds
        # are the inputs of the few untargeted projections (an upper bound).
        loss = lambda p, f, xx, tt, rr, cc: jnp.sum(apply((p, f), xx, tt, rr, cc))
        args = (tr, fr, x, tvec, tvec, cond)
      else:
        mc = small_config(remat, layers, single)
        gd, ap, _ = state_lib.param_specs(lambda rngs: models.create_model(mc, rngs=rngs),
                                          mesh1, rules)
        apply = state_lib.make_apply_fn(gd)
        loss = lambda p, xx, tt, rr, cc: jnp.sum(apply(p, xx, tt, rr, cc))
        args = (ap, x, tvec, tvec, cond)
      traced[(remat, layers, single)] = _saved_residual_bytes(
          loss, *args, heads=heads, head_dim=head_dim, mlp_dims=mlp_dims)
    return traced[(remat, layers, single)]

  t0 = time.perf_counter()
  policy = model_config.get("remat", "none")
  acts = extrapolate(lambda *k: small(policy, *k))
  block_acts = small("none", 2) - small("none", 1)
  trace_s = time.perf_counter() - t0
  compute_bytes = np.dtype(jnp.dtype(model_config.get("dtype", "float32"))).itemsize
  # FLOPs of one step.
  tf_config = config_lib.tf_config(c)
  ema_decay = float(tf_config.ema_decay)
  rows = lambda batch: losses.count_network_rows(
      batch, tf_config.replace(row_blocks=1))["ours"]
  fwd = models.flops_per_forward(model_config, 1, spec.x_shape[:2], txt_len=txt_len)
  n_params = state_lib.num_params(abs_params)

  # Largest block's weights (for the FSDP working set).
  blocks = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abs_params)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if len(keys) > 1 and keys[1].isdigit():
      blocks.setdefault((keys[0], keys[1]), 0)
      blocks[(keys[0], keys[1])] += math.prod(leaf.shape)
  block_params = max(blocks.values()) if blocks else 0

  out = {"model": model_config.get("name"), "mode": "lora" if lora else "full",
         "params": n_params, "trainable_params": n_train, "lora_rank": setting.lora_rank,
         "lora_targets": c.lora.target_modules if lora else "", "per_device_batch": b,
         "x_shape": list(spec.x_shape), "txt_len": txt_len,
         "remat": model_config.get("remat", "none"), "dtype": model_config.get("dtype"),
         "param_dtype": model_config.get("param_dtype"), "layers": n_layers,
         "flops_per_row_forward": fwd, "trace_s": trace_s, "meshes": []}
  for kind, shape in meshes:
    n = math.prod(shape.values())
    batch_shards = shape["data"] * shape["fsdp"]
    gb = b * batch_shards
    base, uneven = tree_bytes(abs_params, p_specs, shape)
    train_b, opt_b = trainable_bytes(shape)
    ema_b = train_b * (1 + len(decays))
    grads_b = train_b
    # The step's teacher: the EMA updated from the old parameters before the loss (official
    # order) lives next to the old EMA until the non-finite select; decay 0 (the online
    # network) and 1 (frozen) make no new tree.
    teacher_b = train_b if 0.0 < ema_decay < 1.0 else 0
    # New parameters, optimizer state and evaluation EMAs, next to the old ones.
    update_b = train_b * (1 + len(decays)) + opt_b
    params_b = base + (train_b if lora else 0)
    fsdp = shape["fsdp"] > 1
    acts_b = _tensor_share(acts, shape["tensor"], heads, mlp_dims)
    if model_config.get("remat", "none") == "none":
      # No remat: the backward all-gathers the same shards as the forward, XLA merges the
      # two (CSE), so every gathered weight lives from its forward use to its backward use.
      work_b = tree_bytes(abs_params, p_specs, dict(shape, fsdp=1),
                          max_itemsize=compute_bytes, only_axis="fsdp")[0] if fsdp else 0
    else:
      # Remat: the recomputed block re-gathers its weights behind an optimisation barrier
      # (no CSE), so the working set is per block: its activations without remat, its
      # weights gathered (and the next block's, prefetched), its unreduced gradients.
      gathered = block_params * compute_bytes * min(2, len(blocks)) * fsdp
      unreduced = 0 if lora else block_params * 4 * fsdp
      work_b = (_tensor_share(block_acts, shape["tensor"], heads, mlp_dims) + gathered
                + unreduced)
    state_b = params_b + opt_b + ema_b
    # Two peaks. Backward: the saved activations are freed block by block while the
    # gradients accumulate, so at most max(acts, grads) (equal blocks: linear in between)
    # plus the working set. Update: the non-finite check reduces over all the new
    # parameters before it selects between new and old state, so the new parameters and
    # optimizer state exist next to the old (`update`).
    backward_peak = state_b + teacher_b + max(acts_b, grads_b) + work_b
    update_peak = state_b + teacher_b + update_b
    total = max(backward_peak, update_peak)
    step_rows = rows(gb) + (1 if lora else 2) * gb
    cap = DEVICE_MEMORY_GIB[kind] * GIB
    out["meshes"].append({
        "device": kind, "devices": n, "mesh": shape, "global_batch": gb,
        "bytes": {"params": params_b, "opt": opt_b, "ema": ema_b, "teacher": teacher_b,
                  "grads": grads_b, "update": update_b, "acts": acts_b, "work": work_b,
                  "total": total},
        "peak": "backward" if backward_peak >= update_peak else "update",
        "device_memory_gib": DEVICE_MEMORY_GIB[kind],
        "fits": total <= USABLE_FRACTION * cap and not uneven,
        "unshardable": uneven[:3],
        "network_rows_per_step": rows(gb),
        "flops_per_step": fwd * step_rows, "flops_per_device": fwd * step_rows / n})
  return out


def format_table(plans: list[dict], markdown: bool = False) -> str:
  cols = ("model", "mode", "mesh", "batch", "params", "opt", "ema", "teacher", "grads",
          "update", "acts", "work", "total", "peak", "mem", "fits", "PFLOP/step")
  rows = []
  for p in plans:
    for m in p["meshes"]:
      by = m["bytes"]
      shape = m["mesh"]
      mesh = (f"{m['device']}:{m['devices']}" if shape["data"] == shape["tensor"] == 1
              else f"{m['device']}:{shape['data']}x{shape['fsdp']}x{shape['tensor']}")
      g = lambda k: f"{by[k] / GIB:.2f}"
      rows.append((p["model"], p["mode"], mesh, str(m["global_batch"]), g("params"), g("opt"),
                   g("ema"), g("teacher"), g("grads"), g("update"), g("acts"), g("work"),
                   g("total"), m["peak"], f"{m['device_memory_gib']:.0f}",
                   "yes" if m["fits"] else "NO",
                   f"{m['flops_per_step'] / 1e15:.1f}"))
  if markdown:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
  widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
  fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))
  return "\n".join([fmt(cols)] + [fmt(r) for r in rows])


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Memory columns are GiB per device.")
  p.add_argument("--model", default="qwen_image_20b",
                 help=f"a released model: {', '.join(ARCHITECTURES)} (ignored with --config)")
  p.add_argument("--config", default=None,
                 help="a twinflow_jax.main config file instead of --model (its model, loss, "
                      "optimizer, remat and batch; --per-device-batch overrides the batch)")
  p.add_argument("--mode", default=None,
                 help="full, lora or both (comma list); default both, or full for a --config "
                      "whose model is not a diffusers family (LoRA needs one)")
  p.add_argument("--meshes", default="v5p:64,v5p:256,v5p:512,h100:8,h100:64,h200:8,h200:64",
                 help="comma list of KIND:N (FSDP over N chips) or KIND:DATAxFSDPxTENSOR")
  p.add_argument("--per-device-batch", type=int, default=4,
                 help="rows per device per step (official micro_batch_size 4)")
  p.add_argument("--image-size", type=int, default=512, help="pixels (latent = size / 8)")
  p.add_argument("--txt-len", type=int, default=512, help="text tokens per prompt")
  p.add_argument("--remat", default="full", help="remat policy: none, full, dots, dots_no_batch")
  p.add_argument("--lora-rank", type=int, default=LORA_RANK,
                 help="LoRA rank (a --config with lora.rank > 0 keeps its own rank and targets)")
  p.add_argument("--json", default=None, help="also write the plans as JSON")
  p.add_argument("--markdown", action="store_true", help="print a Markdown table")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from twinflow_jax.models.families import FAMILIES  # pylint: disable=g-import-not-at-top
  try:
    meshes = [parse_mesh(m) for m in args.meshes.split(",") if m.strip()]
    if args.mode is None:
      family = not args.config or not os.path.isfile(args.config) or (
          _config_from_file(args.config).model.get("name") in FAMILIES)
      args.mode = "full,lora" if family else "full"
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in ("full", "lora") for m in modes):
      raise ValueError(f"--mode {args.mode!r}: use full, lora or full,lora")
    if args.per_device_batch < 1:
      raise ValueError(f"--per-device-batch must be >= 1, got {args.per_device_batch}")
    settings = []
    for mode in modes:
      if args.config:
        if not os.path.isfile(args.config):
          raise ValueError(f"--config {args.config} does not exist")
        c = _config_from_file(args.config)
        if c.data.source.startswith("arrayrecord") and not c.data.get("paths"):
          c.data.paths = "/nonexistent/plan.array_record"   # only the shapes are read
        if mode == "lora":
          if c.model.get("name") not in FAMILIES:
            raise ValueError(f"--mode lora plans the trainer's LoRA, which needs a diffusers "
                             f"family model (config.model.name in {sorted(FAMILIES)}); "
                             f"{args.config} has {c.model.get('name')!r}")
          c.model.param_dtype = "bfloat16"
        rank = int(c.lora.get("rank", 0)) if "lora" in c else 0
        settings.append(Setting(c, args.per_device_batch,
                                (rank or args.lora_rank) if mode == "lora" else 0))
      else:
        s = model_setting(args.model, mode, per_device_batch=args.per_device_batch,
                          image_size=args.image_size, txt_len=args.txt_len, remat=args.remat)
        if mode == "lora":
          s.lora_rank = args.lora_rank
        settings.append(s)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  plans = []
  for s in settings:
    print(f"planning {s.config.model.get('name')} ({'lora' if s.lora_rank else 'full'}) ...",
          file=sys.stderr, flush=True)
    plans.append(plan_setting(s, meshes))
  print(format_table(plans, markdown=args.markdown))
  p0 = plans[0]
  print(f"\nper-device batch {p0['per_device_batch']}, latents {p0['x_shape']}, text "
        f"{p0['txt_len']} tokens, remat {p0['remat']}, compute {p0['dtype']}; fits = total "
        f"<= {USABLE_FRACTION:.0%} of the device memory. Params: "
        + ", ".join(f"{p['mode']} {p['params'] / 1e9:.2f}B ({p['trainable_params'] / 1e6:.1f}M "
                    "trainable)" for p in plans))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(plans, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
