"""Pretrained model families selected by `name` in the model config.

Each entry maps a name (e.g. 'sd3') to its config resolver, its NNX module and its FLOP
count; `create_model` and `flops_per_forward` look names up here before the DiT / MMDiT
size names. A family's config dict has the checkpoint's config.json fields (or
'pretrained': DIR to read them) plus runtime fields (dtype, param_dtype, remat, attention).
Weight import/export for a family lives in `models/convert/diffusers_<family>.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from twinflow_jax.models import flux, qwen_image, sd3


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build one family.

  Attributes:
    resolve: config dict -> frozen, validated config (raises ValueError naming the field).
    build: (config, rngs) -> module called as `F = model(x_t, t, r, cond)`.
    flops: (config, batch, h, w, txt_len) -> matmul FLOPs of one forward.
    config_type: the frozen config class (to recognise a model's config).
  """
  resolve: Callable[[Mapping[str, Any]], Any]
  build: Callable[[Any, nnx.Rngs], nnx.Module]
  flops: Callable[[Any, int, int, int, int], int]
  config_type: type


FAMILIES: dict[str, Family] = {
    'sd3': Family(resolve=sd3.resolve_sd3_config,
                  build=lambda cfg, rngs: sd3.SD3Transformer(cfg, rngs=rngs),
                  flops=sd3.flops_per_forward, config_type=sd3.SD3Config),
    'flux': Family(resolve=flux.resolve_flux_config,
                   build=lambda cfg, rngs: flux.Flux(cfg, rngs=rngs),
                   flops=flux.flops_per_forward, config_type=flux.FluxConfig),
    'qwen_image': Family(
        resolve=qwen_image.resolve_qwen_image_config,
        build=lambda cfg, rngs: qwen_image.QwenImage(cfg, rngs=rngs),
        flops=qwen_image.flops_per_forward,
        config_type=qwen_image.QwenImageConfig),
}


def family_of_config(cfg: Any) -> str | None:
  """Family name of a resolved config (None for DiT / MMDiT / others)."""
  for name, fam in FAMILIES.items():
    if isinstance(cfg, fam.config_type):
      return name
  return None
