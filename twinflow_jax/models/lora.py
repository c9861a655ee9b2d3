"""LoRA adapters on the projections of the pretrained families, with PEFT's semantics.

The official TwinFlow LoRA trainers (`src/steerers/*/sft_ddp_lora.py`) wrap the diffusers
transformer with PEFT: `LoraConfig(r, lora_alpha, init_lora_weights='gaussian',
target_modules=[...])`. Reproduced here on the NNX families (`sd3`, `flux`, `qwen_image`),
whose module trees mirror diffusers' names:

  * targets: a layer is adapted when its diffusers module name equals a target or ends
    with '.' + target (PEFT's suffix rule), e.g. 'attn.to_q' adapts every
    `transformer_blocks.<i>.attn.to_q` but not the MMDiT-X `attn2.to_q`, and 'to_q' both.
    The names are the checkpoint's (`img_mlp.net.0.proj`, not this package's `fc1`).
  * layer: `y = W x + b + (alpha / rank) B A x`, A [in, rank] ~ N(0, 1 / rank^2) (PEFT's
    'gaussian': std 1 / r), B [rank, out] = 0, so a fresh adapter is exactly the base.
  * LoRA factors are `nnx.LoRAParam` (float32 master weights); the wrapped layer keeps its
    weights under `base_module`, so the diffusers loader reads them under the layer's name
    and `merge` folds the factors back for export.
  * sharding: A takes the base kernel's input axis name, B its output axis name; the rank
    axis is replicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd

from twinflow_jax.models.layers import Dense
from twinflow_jax.models.sharding import DEFAULT_LOGICAL_AXIS_RULES

# Separates the trainable factors from the frozen rest of a wrapped model.
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """What to adapt and how (the official yaml's `lora_rank`, `lora_alpha`,
  `lora_target_modules`)."""
  rank: int
  alpha: float
  target_modules: tuple[str, ...]

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """'a,b, c' (the yaml's comma-separated string) or a sequence -> ('a', 'b', 'c')."""
  items = targets.split(',') if isinstance(targets, str) else list(targets)
  return tuple(t.strip() for t in items if str(t).strip())


def matches(name: str, targets: Sequence[str]) -> bool:
  """PEFT's rule: the module name equals a target or ends with '.' + target."""
  return any(name == t or name.endswith('.' + t) for t in targets)


class LoRADense(nnx.LoRA):
  """A 2-D `Dense` plus a scaled low-rank update: `base(x) + scale (x A) B`.

  Computes in the base layer's dtype; A and B are float32 `nnx.LoRAParam`s.
  """

  def __init__(self, base: Dense, rank: int, alpha: float, *, rngs: nnx.Rngs):
    kernel = base.kernel
    if base.n_in != 1 or kernel.ndim != 2:
      raise ValueError(f'LoRA needs a 2-D Dense kernel, got shape {kernel.shape}')
    names = tuple(getattr(kernel, 'out_sharding', None) or (None, None))
    super().__init__(
        kernel.shape[0], rank, kernel.shape[1], base_module=base, dtype=base.dtype,
        param_dtype=jnp.float32,
        a_initializer=jax.nn.initializers.normal(1.0 / rank),
        b_initializer=jax.nn.initializers.zeros, rngs=rngs,
        a_metadata={'out_sharding': (names[0], None)},
        b_metadata={'out_sharding': (None, names[1])})
    self.scale = float(alpha) / rank

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.base_module(x)
    dt = self.dtype
    h = (x.astype(dt) @ self.lora_a[...].astype(dt)) @ self.lora_b[...].astype(dt)
    return y + (self.scale * h).astype(y.dtype)


def _get(parent: Any, key: Any) -> Any:
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent: Any, key: Any, value: Any) -> None:
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def _module_at(model: nnx.Module, path: tuple) -> Any:
  node = model
  for key in path:
    node = _get(node, key)
  return node


def diffusers_name(model: nnx.Module, path: tuple) -> str:
  """The diffusers module name of the `Dense` at `path` (e.g. 'transformer_blocks.0.attn.to_q')."""
  from twinflow_jax.models.convert import diffusers  # pylint: disable=g-import-not-at-top
  fam, cfg = diffusers._family_of_model(model)  # pylint: disable=protected-access
  key, _ = fam.param_key(cfg, tuple(path) + ('kernel',))
  return key[:-len('.weight')] if key.endswith('.weight') else key


def _dense_layers(model: nnx.Module) -> list[tuple[tuple, Dense]]:
  return [(tuple(p), m) for p, m in nnx.iter_modules(model)
          if isinstance(m, Dense) and 'base_module' not in p]


def wrap(model: nnx.Module, spec: LoRASpec, rngs: nnx.Rngs) -> list[str]:
  """Replaces every targeted `Dense` of `model` by a `LoRADense`, in place.

  Args:
    model: a model of a diffusers family (`sd3`, `flux`, `qwen_image`).
    spec: rank, alpha and target module names (diffusers names, PEFT suffix rule).
    rngs: for the A factors.

  Returns:
    The diffusers names of the adapted layers, sorted.

  Raises:
    ValueError: a bad rank / alpha, or a target that matches no 2-D projection (named).
  """
  if not (isinstance(spec.rank, int) and spec.rank >= 1):
    raise ValueError(f'LoRA rank must be an int >= 1, got {spec.rank!r}')
  if not spec.alpha > 0:
    raise ValueError(f'LoRA alpha must be > 0, got {spec.alpha!r}')
  if not spec.target_modules:
    raise ValueError('LoRA target_modules is empty; name the projections to adapt, e.g. '
                     "'attn.to_q,attn.to_k,attn.to_v,attn.to_out.0'")
  layers = [(p, m, diffusers_name(model, p)) for p, m in _dense_layers(model)]
  unused = [t for t in spec.target_modules if not any(matches(n, (t,)) for _, _, n in layers)]
  if unused:
    raise ValueError(f'LoRA target_modules {unused} match no projection of the '
                     f'{model.config.name} model (diffusers names, e.g. '
                     f'{sorted({n.split(".")[-1] for _, _, n in layers})[:8]} ...)')
  done = []
  with _creation_context():
    for path, layer, name in layers:
      if matches(name, spec.target_modules) and layer.n_in == 1 and layer.kernel.ndim == 2:
        _set(_module_at(model, path[:-1]), path[-1],
             LoRADense(layer, spec.rank, spec.alpha, rngs=rngs))
        done.append(name)
  return sorted(done)


def _creation_context() -> contextlib.AbstractContextManager:
  """As `create_model`: unsharded without a mesh, default rules when none are active."""
  if jax.sharding.get_abstract_mesh().empty:
    return nnx.use_eager_sharding(False)
  if not core_spmd.get_logical_axis_rules():
    return nnx.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES)
  return contextlib.nullcontext()


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every `LoRADense` into its base layer (`W + scale A B`) and unwraps it, in place.

  The product is formed in float32 and cast to the kernel's dtype; the result has no
  `nnx.LoRAParam` left, so `convert.diffusers.export` writes it under the base names.
  """
  wrapped = [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRADense)]
  for path, m in wrapped:
    base = m.base_module
    k = base.kernel[...]
    delta = m.scale * (m.lora_a[...].astype(jnp.float32) @ m.lora_b[...].astype(jnp.float32))
    base.kernel.set_value((k.astype(jnp.float32) + delta).astype(k.dtype))
    _set(_module_at(model, path[:-1]), path[-1], base)
  return model


def adapted_layers(model: nnx.Module) -> list[str]:
  """Diffusers names of the layers wrapped by `LoRADense`."""
  return sorted(diffusers_name(model, tuple(p) + ('base_module',))
                for p, m in nnx.iter_modules(model) if isinstance(m, LoRADense))
