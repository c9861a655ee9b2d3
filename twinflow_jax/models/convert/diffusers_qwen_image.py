"""diffusers `QwenImageTransformer2DModel` <-> `models.qwen_image.QwenImage`.

The NNX tree mirrors diffusers, so most names map by joining the path with
dots (kernel -> `.weight`, transposed). The exceptions:
  */img_mod/proj, */txt_mod/proj             *.img_mod.1, *.txt_mod.1
                                             (nn.Sequential(SiLU, Linear))
  norm_out/proj                              norm_out.linear
  */img_mlp/fc1, */img_mlp/fc2 (txt_mlp)     *.img_mlp.net.0.proj, *.net.2
  */norm_q/scale, txt_norm/scale (RMS)       *.norm_q.weight, txt_norm.weight
The TwinFlow r-embedder is `time_text_embed_2.timestep_embedder.*`, the names
of the official `QwenImageTransformer2DModelWrapper`. A base checkpoint lacks
it; it is then initialised by `r_embedder_init` ('copy', the official
`init_time_embed_2_weights`: from the checkpoint's `time_text_embed`).
"""

from __future__ import annotations

from typing import Any

from twinflow_jax.models import qwen_image
from twinflow_jax.models.convert import diffusers as dlib

RENAMES = (
    (r'\.(img_mod|txt_mod)\.proj$', r'.\1.1'),
    (r'^norm_out\.proj$', 'norm_out.linear'),
    (r'\.(img_mlp|txt_mlp)\.fc1$', r'.\1.net.0.proj'),
    (r'\.(img_mlp|txt_mlp)\.fc2$', r'.\1.net.2'),
)
R_EMBEDDER = 'time_text_embed_2'


def param_key(cfg: qwen_image.QwenImageConfig, path: tuple
              ) -> tuple[str, dlib.Transform]:
  """Parameter path -> (diffusers key, layout transform)."""
  del cfg
  return dlib.standard_param_key(path, RENAMES)


def init_from(cfg: qwen_image.QwenImageConfig, path: tuple) -> str | None:
  """'copy' init of an absent r-embedder: read the time embedder's tensor."""
  names = [str(p) for p in path if str(p) != 'base_module']
  if cfg.r_embedder_init != 'copy' or names[0] != R_EMBEDDER:
    return None
  key, _ = param_key(cfg, ('time_text_embed',) + tuple(path[1:]))
  return key


def optional(cfg: qwen_image.QwenImageConfig, path: tuple) -> bool:
  """The r-embedder may be absent (a base Qwen-Image checkpoint)."""
  del cfg
  return str(path[0]) == R_EMBEDDER


def model_config(dcfg: dict[str, Any]) -> dict[str, Any]:
  """diffusers config.json -> our model config dict."""
  out = {'name': 'qwen_image'}
  out.update({k: dcfg[k] for k in qwen_image.QwenImageConfig.DIFFUSERS_FIELDS
              if k in dcfg})
  return out


FAMILY = dlib.DiffusersFamily(
    name='qwen_image',
    class_names=('QwenImageTransformer2DModel',
                 'QwenImageTransformer2DModelWrapper'),
    model_config=model_config,
    diffusers_config=lambda cfg: cfg.diffusers_config(),
    param_key=param_key,
    optional=optional,
    init_from=init_from,
)
dlib.register_family(FAMILY)
