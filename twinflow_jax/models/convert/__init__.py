"""Weight import and export, one module per source format.

  state_dict      reading PyTorch-style state dicts as numpy (.npz, .safetensors, .pt).
  sit             PyTorch DiT / SiT state dicts -> `DiT` parameters.
  inception       pytorch-fid's FID Inception (pt_inception-2015-12-05) -> `InceptionV3`
                  (.npz); its own CLI: `python -m twinflow_jax.models.convert.inception`.
  hf_text         Hugging Face text encoders (CLIP, T5, Qwen2.5-VL) -> the JAX encoders.
  diffusers_vae   diffusers VAE folders (AutoencoderKL, AutoencoderKLQwenImage) in and out.
  safetensors_io  lazy sliced reading / streamed sharded writing of .safetensors folders.
  diffusers       diffusers model folders in (sharded, tensor by tensor) and out: the
                  family-independent framework (`DiffusersFamily`, `load_model`,
                  `load_into`, `export`).
  diffusers_sd3   the SD3 / SD3.5 family (`SD3Transformer2DModel` names).
  diffusers_flux  the Flux.1 family (`FluxTransformer2DModel` names).
  diffusers_qwen_image  the Qwen-Image family (`QwenImageTransformer2DModel` names).
  cli             `python -m twinflow_jax.models.convert`: a checkpoint -> a pretrained
                  directory that the trainer starts from (`--config.train.init_from`),
                  and the diffusers import / export commands.

Models live in `twinflow_jax.models`; nothing here is imported by them, so the networks
stay free of conversion code.
"""

from twinflow_jax.models.convert.cli import convert, main, parser

__all__ = ['convert', 'main', 'parser']
