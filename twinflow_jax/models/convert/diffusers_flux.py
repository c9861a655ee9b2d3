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

from twinflow_jax.models import flux
from twinflow_jax.models.convert import diffusers as dlib

RENAMES = (
    (r'(^|\.)(norm1|norm1_context|norm|norm_out)\.proj$', r'\1\2.linear'),
    (r'\.(ff|ff_context)\.fc1$', r'.\1.net.0.proj'),
    (r'\.(ff|ff_context)\.fc2$', r'.\1.net.2'),
)

FAMILY = dlib.r_embedder_family('flux', ('FluxTransformer2DModel',),
                                flux.FluxConfig, RENAMES)
dlib.register_family(FAMILY)
