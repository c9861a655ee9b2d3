"""TwinFlow fine-tuning of Stable Diffusion 3.5 (medium) at 512 px: full or LoRA.

The official recipes, `inclusionAI/TwinFlow` `src/configs/sd_task/`:
  full          sd35_full.yaml: every weight trained, EMA teacher (0.99), r-embedder
                (`aux_time_embed: true`), N = 2, lr 1e-5, 16 images per GPU on 8 GPUs.
  lora          sd35_lora_2order.yaml: rank-64 / alpha-64 LoRA on the attention
                projections and the timestep MLP, EMA of the adapters (0.99), N = 2,
                lr 1e-4, 8 per GPU on 8 GPUs, no r-embedder (`aux_time_embed: false`).
  lora_1order   sd35_lora_1order.yaml: as lora with N = 1 and no EMA (emd = 0: the
                online model is its own teacher).
Select one with the config argument: `--config configs/sd35_twinflow.py:lora` (default
'full'). Common to all (the yamls' `method`): transport Linear, consistc_ratio 1.0,
enhanced_ratio 0.8 over enhanced_range [0, 1], time_dist_ctrl [1, 1, 1], barron
reweighting (alpha 1), dist_match_cof 0.5; AdamW, betas (0.9, 0.99), weight decay 0,
max_grad_norm 1.0, constant lr (the steerers use no schedule); the 8-GPU batch is
`row_blocks` = 8 official per-GPU sub-batches (each GPU computes its own TwinFlow loss).

What it needs:
  * the diffusers transformer folder of SD3.5-medium, given twice:
    --config.model.pretrained=DIR (architecture) --config.train.init_from=DIR (weights;
    for LoRA the frozen base, recorded in every checkpoint with a fingerprint);
  * ArrayRecord records of SD3-VAE latents [64, 64, 16] with SD3 text features (77 CLIP +
    256 T5-XXL rows: 'txt' [333, 4096], 'pooled' [2048]; official max_sequence_length
    256), made with `python -m twinflow_jax.data.prepare --text_family=sd3 ...`:
    --config.data.paths=GLOB.
Deviations from the official trainer: the unconditional e is the null text (zero
embeddings, `train.uncond='zeros'`) instead of the encoded negative prompt "Generate an
image." (records hold no negative prompt); training runs for `train.num_steps` instead of
4 epochs of the official data.

  python -m twinflow_jax.main --config configs/sd35_twinflow.py:lora \\
      --config.model.pretrained=/hf/sd3.5-medium/transformer \\
      --config.train.init_from=/hf/sd3.5-medium/transformer \\
      --config.data.paths='/data/t2i/*.array_record' --workdir /runs/sd35_lora
"""

from twinflow_jax.train.config import base_config

# lora_target_modules of sd35_lora_{1,2}order.yaml (diffusers names, PEFT suffix rule).
SD35_LORA_TARGETS = ("timestep_embedder.linear_1,timestep_embedder.linear_2,"
                     "attn.add_k_proj,attn.add_v_proj,attn.add_q_proj,attn.to_add_out,"
                     "attn.to_k,attn.to_out.0,attn.to_q,attn.to_v")
VARIANTS = ("full", "lora", "lora_1order")
NUM_GPUS = 8   # NPROC_PER_NODE of src/scripts/sd3/train_ddp*.sh


def get_config(variant: str | None = None):
  variant = variant or "full"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of sd35_twinflow.py; choose one of "
                     f"{VARIANTS} (e.g. --config configs/sd35_twinflow.py:lora)")
  lora = variant != "full"
  c = base_config()
  c.seed = 42                                   # train.seed
  c.model = dict(name="sd3", pretrained="",     # --config.model.pretrained=DIR
                 r_embedder=not lora,           # model.aux_time_embed
                 dtype="bfloat16",              # bf16 autocast of the steerers
                 param_dtype="bfloat16" if lora else "float32",   # frozen base in bf16
                 remat="dots")                  # gradient checkpointing

  c.data.source = "arrayrecord_t2i"
  c.data.paths = None
  c.data.latent_shape = (64, 64, 16)            # data.height = width = 512
  c.data.latent_dtype = "bfloat16"
  c.data.latent_shift = 0.0609                  # SD3 VAE shift_factor
  c.data.latent_scale = 1.5305                  # SD3 VAE scaling_factor
  c.data.txt_len = 333                          # 77 CLIP + 256 T5 (modeling_sd_3.py)
  c.data.txt_dim = 4096
  c.data.pooled_dim = 2048
  c.data.txt_dtype = "bfloat16"
  c.data.label_dropout = 0.0                    # the official trainer drops no prompts
  c.data.read_threads = 16
  c.data.prefetch_buffer_size = 1024
  c.train.uncond = "zeros"

  # method: (all three yamls)
  c.loss.consistency_ratio = 1.0                # consistc_ratio
  c.loss.enhanced_ratio = 0.8                   # enhanced_ratio
  c.loss.enhanced_range = (0.0, 1.0)            # enhanced_range
  c.loss.time_dist = (1.0, 1.0, 1.0)            # time_dist_ctrl
  c.loss.metric = "barron"                      # loss_func_type: barron_reweighting
  c.loss.barron_alpha = 1.0                     #   alpha: 1.0
  c.loss.rect_coef = 0.5                        # dist_match_cof
  c.loss.estimate_order = 1 if variant == "lora_1order" else 2   # estimate_order
  c.loss.ema_decay = 0.0 if variant == "lora_1order" else 0.99   # ema_decay_rate
  c.loss.row_blocks = NUM_GPUS                  # one official sub-batch per GPU
  c.loss.one_group = lora                       # twinflow_lora.py: groups e2e|mul|any|adv|one

  # train:
  c.optim.name = "adamw"
  c.optim.lr = 1e-4 if lora else 1e-5
  c.optim.b1, c.optim.b2 = 0.9, 0.99            # betas
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0                       # max_grad_norm
  c.optim.schedule = "constant"
  c.optim.accum_steps = 1                       # grad_accumulation_steps
  c.train.global_batch_size = (8 if lora else 16) * NUM_GPUS   # micro_batch_size x GPUs
  c.train.num_steps = 20_000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.sample_every = 1000
  c.train.num_samples = 16
  # The official LoRA trainer samples with the trained ('default') adapter; with
  # emd = 0 the EMA slot holds the online factors anyway.
  c.train.sample_from = "params" if lora else "ema"

  if lora:
    c.lora.rank = 64                            # lora_rank
    c.lora.alpha = 64.0                         # lora_alpha
    c.lora.target_modules = SD35_LORA_TARGETS   # lora_target_modules
    c.lora.time_input = "t_minus_half_r"        # TwinFlow_LoRA.forward: t - tt / 2

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
