"""TwinFlow LoRA fine-tuning of FLUX.1-dev at 512 px (no official recipe: our choice).

The official code fine-tunes no Flux model, so this config takes the official recipe of
the closest model, Qwen-Image LoRA (`qwenimage_lora_2order.yaml`): Flux.1 is the other
large dual-stream, guidance-distilled flow transformer (the same block math,
models/dual_stream.py) and the yaml even names FLUX.1-dev as its commented-out
alternative. Hence: rank 64, alpha 64, EMA of the adapters (0.99) as teacher, N = 2,
enhanced_ratio 0.8, consistc_ratio 1, barron (alpha 1), dist_match_cof 0.5, AdamW lr 1e-4,
betas (0.9, 0.99), max_grad_norm 1, 4 images per GPU on 8 GPUs, no r-embedder (network
time t - r / 2, the official TwinFlow_LoRA forward). Targets: diffusers' own Flux LoRA
list (examples/dreambooth/train_dreambooth_lora_flux.py: attention q/k/v/out of both
streams, which also covers the single-stream blocks' attn.to_q/k/v, and both MLPs of the
double-stream blocks) plus the timestep MLP as in both official lists. The guidance input
stays at the pipeline default 3.5 (`model.default_guidance`). The variant '1order' is the
fixed-teacher setting of qwenimage_lora_1order.yaml (base with adapters disabled, N = 1,
enhanced_ratio 4).
Built on `lora_recipe` of configs/qwen_image_twinflow_lora.py; only the targets and the
data fields are Flux's.

What it needs: the diffusers `transformer/` folder of FLUX.1-dev as
--config.model.pretrained=DIR and --config.train.init_from=DIR, and ArrayRecord records of
Flux-VAE latents [64, 64, 16] (shift 0.1159, scale 0.3611) with T5-XXL 'txt' [512, 4096]
and CLIP 'pooled' [768] (`python -m twinflow_jax.data.prepare --text_family=flux`):
--config.data.paths=GLOB.

  python -m twinflow_jax.main --config configs/flux_twinflow_lora.py \\
      --config.model.pretrained=/hf/FLUX.1-dev/transformer \\
      --config.train.init_from=/hf/FLUX.1-dev/transformer \\
      --config.data.paths='/data/t2i/*.array_record' --workdir /runs/flux_lora
"""

import importlib.util
import os

FLUX_LORA_TARGETS = ("attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,"
                     "attn.add_q_proj,attn.add_v_proj,attn.to_add_out,ff.net.0.proj,ff.net.2,"
                     "ff_context.net.0.proj,ff_context.net.2,timestep_embedder.linear_1,"
                     "timestep_embedder.linear_2")


def _qwen_image_config():
  """configs/qwen_image_twinflow_lora.py, loaded by path as config loaders load this file
  (configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "qwen_image_twinflow_lora.py")
  spec = importlib.util.spec_from_file_location("qwen_image_twinflow_lora", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(variant: str | None = None):
  c = _qwen_image_config().lora_recipe(variant, "flux_twinflow_lora.py", dict(name="flux"),
                                       FLUX_LORA_TARGETS)
  c.data.latent_shift = 0.1159                  # Flux VAE shift_factor
  c.data.latent_scale = 0.3611                  # Flux VAE scaling_factor
  c.data.txt_len = 512
  c.data.txt_dim = 4096
  c.data.pooled_dim = 768
  return c
