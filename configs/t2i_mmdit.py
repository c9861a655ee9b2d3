"""Text-to-image in latent space: an SD3-style MMDiT on precomputed latents and text
embeddings, trained (or fine-tuned) with TwinFlow.

What it is for: the paper's text-to-image setting at a configurable scale; the default
is an SD3-medium-sized MMDiT ('MMDiT-d24/2', ~2B parameters) at 512 px.
What it needs:
  * data: ArrayRecord files of SD3-VAE latents [64, 64, 16] plus text features: 'txt'
    [txt_len, 4096] (77 CLIP-L/G rows + the T5-XXL tokens: 333 with `data.prepare
    --text_family=sd3`'s default), 'txt_mask' [txt_len], 'pooled' [2048] (CLIP-L + CLIP-G),
    made with `python -m twinflow_jax.data.prepare --vae=SD3/vae --jsonl=PAIRS
    --text_encoder=SD3 --text_family=sd3 --image_size=512 --latent_dtype=bfloat16
    --output=DIR` (it prints the config.data fields to use) or written with
    `python -m twinflow_jax.data.write_arrayrecord` (schema in
    `twinflow_jax/data/records.py`); pass them with --config.data.paths=GLOB. The text
    encoders never run during training.
  * optionally pretrained weights converted to this package's layout
    (--config.train.init_from=DIR); without them the MMDiT trains from scratch.
  * a TPU pod slice or multi-GPU node: FSDP over all chips, bfloat16 compute, remat.
Unconditional e = the null text (zero embeddings, all-False mask), which the data
pipeline also substitutes for 10% of the prompts. The rectification weight follows the
official OpenUni text-to-image configs (dmc = 0.75, EMA 0.99; TWINFLOW.md sections 2, 4).

  python -m twinflow_jax.main --config configs/t2i_mmdit.py \\
      --config.data.paths='gs://bucket/t2i/*.array_record' --workdir gs://bucket/t2i_run
"""

from twinflow_jax.train.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.model = dict(name="MMDiT-d24/2", in_channels=16, input_size=64, txt_dim=4096,
                 pooled_dim=2048, qk_norm=True, r_embedder_init="small",
                 dtype="bfloat16", param_dtype="float32", remat="dots")

  c.data.source = "arrayrecord_t2i"
  c.data.paths = None              # --config.data.paths=GLOB (required)
  c.data.latent_shape = (64, 64, 16)
  c.data.latent_dtype = "bfloat16"
  c.data.latent_shift = 0.0609     # SD3 VAE
  c.data.latent_scale = 1.5305
  c.data.txt_len = 333            # 77 CLIP + 256 T5 tokens, as data.prepare --text_family=sd3
  c.data.txt_dim = 4096
  c.data.pooled_dim = 2048
  c.data.txt_dtype = "bfloat16"
  c.data.label_dropout = 0.1
  c.data.read_threads = 16
  c.data.prefetch_buffer_size = 1024

  c.loss.rect_coef = 0.75          # OpenUni configs
  c.loss.ema_decay = 0.99
  c.train.uncond = "zeros"

  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  c.train.global_batch_size = 256
  c.train.num_steps = 50_000
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 2500
  c.train.num_samples = 16         # prompts: the first 16 of the first batch

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
