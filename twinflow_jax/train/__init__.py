"""The TwinFlow trainer: `python -m twinflow_jax.main --config configs/X.py --workdir DIR`.

Modules (import what you need; importing this package imports nothing heavy):
  config      every config section with its defaults, and validation.
  mesh        the ('data', 'fsdp', 'tensor') device mesh and shardings from the config.
  optim       AdamW / RAdam, LR schedules, clipping, gradient accumulation.
  state       the TrainState pytree, sharded init, the model's apply_fn.
  step        one train step: conditions, EMA teacher, loss, guarded update.
  checkpoint  verified Orbax checkpoints (state, Grain iterator, config, checksums),
              multi-process restore agreement, and a read-only entry point.
  metrics     metric writers, metrics.jsonl, progress line.
  images      PNG sample grids (zlib + struct).
  preemption  SIGTERM / preemption-notice handling.
  loop        `train(config, workdir)`: build or resume, compile, run, save.
  faults      test-only fault injection (TWINFLOW_FAULTS).
"""
