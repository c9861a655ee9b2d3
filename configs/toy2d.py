"""Toy 2-D run: the twin-time MLP on a 2-D distribution (seconds on a laptop CPU).

What it is for: checking the algorithm and the trainer end to end, fast research
iterations, and the tests (which shrink it further through overrides).
What it needs: nothing beyond the core install; the data is generated in code.
Outputs: workdir/samples/step_*_{1nfe,2nfe,4nfe}.png are density images of 4096 samples
on [-3, 3]^2 (dark = dense), next to metrics.jsonl and checkpoints/. Every 1000 steps and
at the end, 2048 samples at 1 and 2 NFE are compared with the true distribution (sliced
Wasserstein distance, MMD): the `eval/ema/*/toy2d/*` records of metrics.jsonl.

  python -m twinflow_jax.main --config configs/toy2d.py --workdir /tmp/toy2d
  python -m twinflow_jax.main --config configs/toy2d.py:moons --workdir /tmp/moons
"""

from twinflow_jax.train.config import base_config


def get_config(arg: str | None = None):
  """`arg` picks the distribution: 'gaussians8' (default), 'checkerboard' or 'moons'."""
  c = base_config()
  c.seed = 0
  c.model = dict(name="mlp", data_dim=2, hidden=256, depth=3, num_classes=0, time_dim=64)

  c.data.source = "toy2d"
  c.data.name = arg or "gaussians8"
  c.data.label_dropout = 0.0     # unconditional
  c.data.read_threads = 1
  c.data.prefetch_buffer_size = 64
  c.data.toy2d_size = 65536

  # The official production loss; no training-time guidance for an unconditional model.
  c.loss.enhanced_ratio = 0.0
  c.train.uncond = "none"

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 100
  c.optim.min_lr_ratio = 0.1

  c.train.global_batch_size = 256
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1000
  c.train.num_samples = 4096
  c.train.keep_checkpoints = 2

  c.eval.metrics = ("toy2d",)
  c.eval.every = 1000
  c.eval.presets = ("1nfe", "2nfe")
  c.eval.num_samples = 2048

  c.mesh.data = -1
  return c
