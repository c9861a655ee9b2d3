"""CIFAR-10 in pixel space: a class-conditional DiT-B/2 trained from scratch with TwinFlow.

What it is for: a small real benchmark on one GPU / TPU host (32 x 32 x 3 pixels, 10
classes, 1-NFE samples); scale out with `--config.mesh.*` and the launch scripts.
What it needs: the TFDS `cifar10` dataset prepared in ArrayRecord format, read without
TensorFlow through `tfds.data_source`:
    tfds build cifar10 --file_format=array_record [--data_dir DIR]
(building needs TensorFlow once, e.g. on another machine; then copy DIR over), and
`--config.data.data_dir=DIR` unless it is the TFDS default. An accelerator: about 1 s per
step on an A100-class GPU at batch 256 in bfloat16 is a rough expectation.

  python -m twinflow_jax.main --config configs/cifar10_dit.py --workdir gs://bucket/cifar
"""

from twinflow_jax.train.config import base_config


def get_config():
  c = base_config()
  c.seed = 0
  c.model = dict(name="DiT-B/2", in_channels=3, input_size=32, num_classes=10,
                 dtype="bfloat16", param_dtype="float32")

  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.split = "train"
  c.data.image_size = 32
  c.data.channels = 3
  c.data.num_classes = 10         # known: no need to read the dataset's metadata
  c.data.hflip = True
  c.data.label_dropout = 0.1      # from scratch: learn the null class (UCGM uses 10%)
  c.data.read_threads = 16
  c.data.prefetch_buffer_size = 1024

  # Official TwinFlow loss (TWINFLOW.md section 2); e = the null class.
  c.train.uncond = "null"

  c.optim.name = "adamw"
  c.optim.lr = 2e-4
  c.optim.schedule = "warmup_constant"
  c.optim.warmup_steps = 2000
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0

  c.train.global_batch_size = 256
  c.train.num_steps = 400_000
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 5000
  c.train.num_samples = 100
  c.train.eval_ema_decays = (0.9999,)
  c.train.sample_from = "0.9999"

  c.mesh.data = -1
  return c
