"""diffusers `FluxTransformer2DModel` <-> `models.flux.Flux` names.

The NNX tree mirrors diffusers, so most names map by joining the path with
dots (kernel -> `.weight`, transposed). The exceptions:
  */norm1/proj, */norm1_context/proj      *.norm1.linear, *.norm1_context.linear
  single_transformer_blocks.*/norm/proj   *.norm.linear
  norm_out/proj                           norm_out.linear
  */ff/fc1, */ff/fc2 (also ff_context)    *.ff.net.0.proj, *.ff.net.2
  */norm_q/scale (RMS norms)              *.norm_q.weight
The single blocks' `proj_out` is diffusers' fused [attention | MLP] linear,
kept as one kernel [N*H + 4D, D].
The TwinFlow r-embedder `time_text_embed_2/timestep_embedder/...` is written
as `time_text_embed_2.timestep_embedder.*` (Flux has no official TwinFlow
wrapper; these are the names of the official Qwen-Image wrapper's
r-embedder, which has the same module). A base checkpoint lacks it; it is
then initialised by `r_embedder_init` ('copy': from the checkpoint's
`time_text_embed.timestep_embedder`).
"""

from __future__ import annotations

from typing import Any

from twinflow_jax.models import flux
from twinflow_jax.models.convert import diffusers as dlib

RENAMES = (
    (r'(^|\.)(norm1|norm1_context|norm|norm_out)\.proj$', r'\1\2.linear'),
    (r'\.(ff|ff_context)\.fc1$', r'.\1.net.0.proj'),
    (r'\.(ff|ff_context)\.fc2$', r'.\1.net.2'),
)
R_EMBEDDER = 'time_text_embed_2'


def param_key(cfg: flux.FluxConfig, path: tuple
              ) -> tuple[str, dlib.Transform]:
  """Parameter path -> (diffusers key, layout transform)."""
  del cfg
  return dlib.standard_param_key(path, RENAMES)


def init_from(cfg: flux.FluxConfig, path: tuple) -> str | None:
  """'copy' init of an absent r-embedder: read the time embedder's tensor."""
  names = [str(p) for p in path if str(p) != 'base_module']
  if cfg.r_embedder_init != 'copy' or names[0] != R_EMBEDDER:
    return None
  key, _ = param_key(cfg, ('time_text_embed',) + tuple(path[1:]))
  return key


def optional(cfg: flux.FluxConfig, path: tuple) -> bool:
  """The r-embedder may be absent (a base Flux checkpoint)."""
  del cfg
  return str(path[0]) == R_EMBEDDER


def model_config(dcfg: dict[str, Any]) -> dict[str, Any]:
  """diffusers config.json -> our model config dict."""
  out = {'name': 'flux'}
  out.update({k: dcfg[k] for k in flux.FluxConfig.DIFFUSERS_FIELDS
              if k in dcfg})
  return out


FAMILY = dlib.DiffusersFamily(
    name='flux',
    class_names=('FluxTransformer2DModel',),
    model_config=model_config,
    diffusers_config=lambda cfg: cfg.diffusers_config(),
    param_key=param_key,
    optional=optional,
    init_from=init_from,
)
dlib.register_family(FAMILY)
