"""TwinFlow networks in Flax NNX: DiT, SD3-style MMDiT, pretrained SD3/SD3.5, Flux.1,
Qwen-Image, the toy MLP.

Every model is called as `F = model(x_t, t, r, cond)` with NHWC images
(the MLP: [B, 2] points), signed TwinFlow times t, r of shape [B]
(t = 1 noise, t = 0 data, t < 0 fake trajectory) and F of x_t's shape.

  model = create_model({'name': 'DiT-XL/2', 'in_channels': 4,
                        'input_size': 32}, rngs=nnx.Rngs(0))
  graphdef, params, rest = split_model(model)
  apply_fn = as_apply_fn(graphdef, rest)   # apply_fn(params, x_t, t, r, cond)

The FID InceptionV3 used by `twinflow_jax.evaluation` lives in `inception.py`
(not imported here; load it with `twinflow_jax.models.convert.inception`).
Sharded init and the default logical-axis rules: see `sharding.py`.
Starting from PyTorch DiT/SiT weights: `python -m twinflow_jax.models.convert`
(see `convert/`), then `load_pretrained(model, path)`. Pretrained diffusers transformers
(`create_model({'name': 'sd3' | 'flux' | 'qwen_image', 'pretrained': DIR})`) load
straight from their folder with `load_pretrained(model, DIR)` or
`convert.diffusers.load_model(DIR, mesh=...)`.
"""

from twinflow_jax.models.attention import (dot_product_attention,
                                           register_attention)
from twinflow_jax.models.configs import (DiTConfig, MMDiTConfig,
                                         REMAT_POLICIES, resolve_config)
from twinflow_jax.models.dit import DiT, drop_labels
from twinflow_jax.models.embeddings import TIME_CONVENTIONS
from twinflow_jax.models.factory import (as_apply_fn, create_model,
                                         split_model)
from twinflow_jax.models.flops import flops_per_forward
from twinflow_jax.models.flux import Flux, FluxConfig
from twinflow_jax.models.mlp import MLP
from twinflow_jax.models.mmdit import MMDiT
from twinflow_jax.models.qwen_image import QwenImage, QwenImageConfig
from twinflow_jax.models.sd3 import SD3Config, SD3Transformer
from twinflow_jax.models.pretrained import (load_model_config, load_pretrained,
                                            save_pretrained)
from twinflow_jax.models.sharding import (DEFAULT_LOGICAL_AXIS_RULES,
                                          MESH_AXES, constrain,
                                          logical_to_mesh_spec)


__all__ = [
    'DEFAULT_LOGICAL_AXIS_RULES', 'DiT', 'DiTConfig', 'Flux', 'FluxConfig',
    'MESH_AXES', 'MLP', 'MMDiT', 'MMDiTConfig', 'QwenImage', 'QwenImageConfig',
    'REMAT_POLICIES', 'SD3Config', 'SD3Transformer',
    'TIME_CONVENTIONS',
    'as_apply_fn', 'constrain', 'create_model', 'dot_product_attention',
    'drop_labels', 'flops_per_forward', 'load_model_config', 'load_pretrained',
    'logical_to_mesh_spec', 'register_attention', 'resolve_config',
    'save_pretrained', 'split_model',
]
