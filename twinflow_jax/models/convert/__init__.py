"""Weight import and export, one module per source format.

  state_dict   reading PyTorch-style state dicts as numpy (.npz, .safetensors, .pt).
  sit          PyTorch DiT / SiT state dicts -> `DiT` parameters.
  inception    pytorch-fid's FID Inception (pt_inception-2015-12-05) -> `InceptionV3`
               (.npz); its own CLI: `python -m twinflow_jax.models.convert.inception`.
  cli          `python -m twinflow_jax.models.convert`: a checkpoint -> a pretrained
               directory that the trainer starts from (`--config.train.init_from`).

Models live in `twinflow_jax.models`; nothing here is imported by them, so the networks
stay free of conversion code.
"""

from twinflow_jax.models.convert.cli import convert, main, parser

__all__ = ['convert', 'main', 'parser']
