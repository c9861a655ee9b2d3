"""Weight import and export, one module per source format.

  state_dict      reading PyTorch-style state dicts as numpy (.npz, .safetensors, .pt).
  sit             PyTorch DiT / SiT state dicts -> `DiT` parameters.
  safetensors_io  lazy sliced reading / streamed sharded writing of .safetensors folders.
  diffusers       diffusers model folders in (sharded, tensor by tensor) and out: the
                  family-independent framework (`DiffusersFamily`, `load_model`,
                  `load_into`, `export`).
  diffusers_sd3   the SD3 / SD3.5 family (`SD3Transformer2DModel` names).
  cli             `python -m twinflow_jax.models.convert`: a checkpoint -> a pretrained
                  directory that the trainer starts from (`--config.train.init_from`),
                  and the diffusers import / export commands.

Models live in `twinflow_jax.models`; nothing here is imported by them, so the networks
stay free of conversion code.
"""

from twinflow_jax.models.convert.cli import convert, main, parser

__all__ = ['convert', 'main', 'parser']
