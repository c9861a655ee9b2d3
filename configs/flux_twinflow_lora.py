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

What it needs: the diffusers `transformer/` folder of FLUX.1-dev as
--config.model.pretrained=DIR and --config.train.init_from=DIR, and ArrayRecord records of
Flux-VAE latents [64, 64, 16] (shift 0.1159, scale 0.3611) with T5-XXL 'txt' [512, 4096]
and CLIP 'pooled' [768] (`python -m twinflow_jax.data.prepare --text_family=flux`):
--config.data.paths=GLOB.

  python -m twinflow_jax.main --config configs/flux_twinflow_lora.py \\
      --config.model.pretrained=/hf/FLUX.1-dev/transformer \\
      --config.train.init_from=/hf/FLUX.1-dev/transformer \\
      --config.data.paths='/data/t2i/*.arrayrecord' --workdir /runs/flux_lora
"""

from twinflow_jax.train.config import base_config

FLUX_LORA_TARGETS = ("attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,"
                     "attn.add_q_proj,attn.add_v_proj,attn.to_add_out,ff.net.0.proj,ff.net.2,"
                     "ff_context.net.0.proj,ff_context.net.2,timestep_embedder.linear_1,"
                     "timestep_embedder.linear_2")
VARIANTS = ("2order", "1order")
NUM_GPUS = 8


def get_config(variant: str | None = None):
  variant = variant or "2order"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of flux_twinflow_lora.py; choose one "
                     f"of {VARIANTS}")
  first = variant == "1order"
  c = base_config()
  c.seed = 42
  c.model = dict(name="flux", pretrained="", r_embedder=False,
                 dtype="bfloat16", param_dtype="bfloat16", remat="dots")

  c.data.source = "arrayrecord_t2i"
  c.data.paths = None
  c.data.latent_shape = (64, 64, 16)
  c.data.latent_dtype = "bfloat16"
  c.data.latent_shift = 0.1159                  # Flux VAE shift_factor
  c.data.latent_scale = 0.3611                  # Flux VAE scaling_factor
  c.data.txt_len = 512
  c.data.txt_dim = 4096
  c.data.pooled_dim = 768
  c.data.txt_dtype = "bfloat16"
  c.data.label_dropout = 0.0
  c.data.read_threads = 16
  c.data.prefetch_buffer_size = 256
  c.train.uncond = "zeros"

  c.loss.consistency_ratio = 1.0
  c.loss.enhanced_ratio = 4.0 if first else 0.8
  c.loss.enhanced_range = (0.0, 1.0)
  c.loss.time_dist = (1.0, 1.0, 1.0)
  c.loss.metric = "barron"
  c.loss.barron_alpha = 1.0
  c.loss.rect_coef = 0.5
  c.loss.estimate_order = 1 if first else 2
  c.loss.ema_decay = 1.0 if first else 0.99
  c.loss.row_blocks = NUM_GPUS
  c.loss.one_group = True   # twinflow_lora.py row groups e2e|mul|any|adv|one

  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.99
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0
  c.optim.schedule = "constant"
  c.train.global_batch_size = 4 * NUM_GPUS
  c.train.num_steps = 10_000
  c.train.log_every = 20
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  c.train.sample_every = 500
  c.train.num_samples = 8
  c.train.sample_from = "params"

  c.lora.rank = 64
  c.lora.alpha = 64.0
  c.lora.target_modules = FLUX_LORA_TARGETS
  c.lora.time_input = "t_minus_half_r"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
