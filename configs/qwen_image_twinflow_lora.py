"""TwinFlow LoRA fine-tuning of Qwen-Image (20B) at 512 px.

The official recipes, `inclusionAI/TwinFlow` `src/configs/qwenimage_task/`:
  2order (default)  qwenimage_lora_2order.yaml: EMA of the adapters (0.99) as teacher,
                    N = 2, enhanced_ratio 0.8.
  1order            qwenimage_lora_1order.yaml: fixed teacher = the base model with the
                    adapters disabled (ema_decay_rate 1.0), N = 1, enhanced_ratio 4.0.
Select with `--config configs/qwen_image_twinflow_lora.py:1order`. Common: rank 64, alpha
64 on the yaml's lora_target_modules (attention q/k/v/out of both streams, both MLPs,
the timestep MLP), no r-embedder (`aux_time_embed: false`; the network sees t - r / 2, the
official TwinFlow_LoRA forward), consistc_ratio 1.0, enhanced_range [0, 1],
time_dist_ctrl [1, 1, 1], barron reweighting (alpha 1), dist_match_cof 0.5; AdamW lr 1e-4,
betas (0.9, 0.99), weight decay 0, max_grad_norm 1.0; micro_batch_size 4 on 8 GPUs
(src/scripts/qwenimage/train_ddp_lora.sh), i.e. a global batch of 32 as 8 row blocks.
The base stays bfloat16 (the official trainer keeps it in bf16, the adapters in fp32).

What it needs: the diffusers `transformer/` folder of Qwen-Image, given as
--config.model.pretrained=DIR and --config.train.init_from=DIR (the frozen base), and
ArrayRecord records of Qwen-Image-VAE latents [64, 64, 16] (normalised per channel by
`twinflow_jax.data.prepare`; pass it `--text_family=qwen_image --txt_len=1024`, its
default is the diffusers pipeline's 512) with Qwen2.5-VL text states 'txt' [1024, 3584] and
'txt_mask' (official max_sequence_length 1024; 'pooled' is required by the record format
and ignored by the model): --config.data.paths=GLOB. A 20B base needs FSDP over many
chips (benchmarks/memory_plan.py).
Deviations: unconditional e = the null text (zero states, all-False mask) instead of the
encoded "Generate an image."; `train.num_steps` instead of 4 epochs.

  python -m twinflow_jax.main --config configs/qwen_image_twinflow_lora.py \\
      --config.model.pretrained=/hf/Qwen-Image/transformer \\
      --config.train.init_from=/hf/Qwen-Image/transformer \\
      --config.data.paths='/data/t2i/*.array_record' --workdir /runs/qwen_lora
"""

from twinflow_jax.train.config import base_config

# lora_target_modules of qwenimage_lora_{1,2}order.yaml.
QWEN_LORA_TARGETS = ("to_k,to_q,to_v,to_out.0,img_mlp.net.0.proj,img_mlp.net.2,add_k_proj,"
                     "add_q_proj,add_v_proj,txt_mlp.net.0.proj,txt_mlp.net.2,attn.to_add_out,"
                     "timestep_embedder.linear_1,timestep_embedder.linear_2")
VARIANTS = ("2order", "1order")
NUM_GPUS = 8


def lora_recipe(variant: str | None, config_file: str, model: dict, targets: str):
  """The official Qwen-Image LoRA recipe (module doc) for `model` with LoRA on `targets`.

  Also the base of configs/flux_twinflow_lora.py. The caller sets the data fields of its
  model family (latents, text widths); `config_file` names it in the variant error.
  """
  variant = variant or "2order"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of {config_file}; choose one of "
                     f"{VARIANTS}")
  first = variant == "1order"
  c = base_config()
  c.seed = 42
  c.model = dict(model, pretrained="", r_embedder=False, dtype="bfloat16",
                 param_dtype="bfloat16", remat="dots")

  c.data.source = "arrayrecord_t2i"
  c.data.paths = None
  c.data.latent_shape = (64, 64, 16)            # 512 px
  c.data.latent_dtype = "bfloat16"
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
  c.train.sample_from = "params"                # the trained ('default') adapter

  c.lora.rank = 64
  c.lora.alpha = 64.0
  c.lora.target_modules = targets
  c.lora.time_input = "t_minus_half_r"

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c


def get_config(variant: str | None = None):
  c = lora_recipe(variant, "qwen_image_twinflow_lora.py", dict(name="qwen_image"),
                  QWEN_LORA_TARGETS)
  c.data.latent_shift = 0.0                     # per-channel normalisation done at prep
  c.data.latent_scale = 1.0
  c.data.txt_len = 1024                         # max_sequence_length (modeling_qwen_image.py)
  c.data.txt_dim = 3584
  c.data.pooled_dim = 3584
  return c
