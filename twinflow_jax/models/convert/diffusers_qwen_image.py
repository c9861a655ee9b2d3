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

from twinflow_jax.models import qwen_image
from twinflow_jax.models.convert import diffusers as dlib

RENAMES = (
    (r'\.(img_mod|txt_mod)\.proj$', r'.\1.1'),
    (r'^norm_out\.proj$', 'norm_out.linear'),
    (r'\.(img_mlp|txt_mlp)\.fc1$', r'.\1.net.0.proj'),
    (r'\.(img_mlp|txt_mlp)\.fc2$', r'.\1.net.2'),
)

FAMILY = dlib.r_embedder_family(
    'qwen_image',
    ('QwenImageTransformer2DModel', 'QwenImageTransformer2DModelWrapper'),
    qwen_image.QwenImageConfig, RENAMES)
dlib.register_family(FAMILY)
