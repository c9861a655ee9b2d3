"""The full experiment config: defaults of every section and their validation.

Config files in `configs/` start from `base_config()` and change what they need; any field
can be overridden on the command line (`--config.optim.lr=1e-4`). Sections:
  seed            base seed (model init, step keys, data order).
  model           `twinflow_jax.models` config ('name' plus overrides).
  data            `twinflow_jax.data` config (see `twinflow_jax.data.config`).
  loss            `twinflow_jax.losses.TwinFlowConfig` fields.
  optim           optimizer (`twinflow_jax.train.optim`).
  train           loop: steps, batch, logging, checkpoints, samples, EMAs.
  mesh            device mesh and logical-axis rules (`twinflow_jax.train.mesh`).
  lora            LoRA fine-tuning (`twinflow_jax.train.lora`); rank 0 = full fine-tune.
  eval            evaluation during training (`twinflow_jax.train.evaluation`) and the VAE
                  that decodes latent samples for grids and metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from twinflow_jax import errors
from twinflow_jax import losses
from twinflow_jax.train import step as step_lib
from twinflow_jax.train.state import eval_ema_name

SAMPLE_PRESETS = ("1nfe", "2nfe", "4nfe", "any4", "multi30", "small4")
SAMPLE_FROM = ("ema", "params")


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; config files override from here."""
  from twinflow_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "mlp"})
  c.data = data_config.default_config()
  c.loss = ml_collections.ConfigDict(dataclasses.asdict(losses.TwinFlowConfig()))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",            # 'adamw' | 'radam' (the paper's two)
      lr=1e-4,
      schedule="constant",     # 'constant' (official) | 'warmup_cosine' | 'warmup_constant'
      warmup_steps=0,          # optimizer updates
      min_lr_ratio=0.0,        # end of the cosine, as a fraction of lr
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,           # global-norm clipping; <= 0 disables
      accum_steps=1,           # micro-batches per optimizer update (optax.MultiSteps)
  ))

  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=64,    # per train step (micro-batch), across all processes
      num_steps=1000,          # train steps (micro-batches)
      uncond="null",           # unconditional e: 'null' | 'shuffle' | 'zeros' | 'none'
      eval_ema_decays=(),      # extra EMAs kept for evaluation only, e.g. (0.9999,)
      guide_from="",           # '' (official guidance by e) or an eval EMA decay, e.g.
                               # '0.999': autoguidance by that weaker EMA (not official)
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpointing=True,
      sample_every=1000,       # 0 disables sample grids (final grids are still written)
      sample_presets=("1nfe", "2nfe", "4nfe"),
      num_samples=64,
      sample_from="ema",       # 'ema' (TwinFlow EMA), 'params' or an eval EMA, e.g. '0.9999'
      use_tensorboard=True,    # if TensorFlow + tensorboard are installed
      init_from="",            # pretrained directory (models.convert / save_pretrained)
      compilation_cache_dir="",  # persistent XLA cache ("": <workdir>/xla_cache)
      # Faults (docs/checkpoints.md):
      max_consecutive_skips=20,  # stop (exit 3) after this many non-finite steps in a row
      verify_checkpoints=True,   # read each saved checkpoint back before rotating old ones
      allow_data_restart=False,  # resume without the data-iterator state (new data order)
      allow_config_change=False,  # resume although state-relevant fields changed
  ))

  # Evaluation during training (docs/evaluation.md): every `every` steps and/or after the
  # final checkpoint, `num_samples` samples of each preset from each set of weights, with
  # the same per-sample seeds every time, judged by `metrics`. Empty `metrics`: off.
  c.eval = ml_collections.ConfigDict(dict(
      metrics=(),              # 'mnist', 'toy2d', 'inception' (FID / IS on images)
      every=0,                 # train steps between evaluations; 0: none during training
      at_end=True,             # also after the final checkpoint
      presets=("1nfe",),       # sampler presets (twinflow_jax.sampling.PRESETS)
      weights=("ema",),        # 'ema', 'online' or 'ema_<decay>' (train.eval_ema_decays)
      num_samples=1000,        # per preset and weights; classes cycled 0..C-1
      batch_size=256,          # samples per device call (does not change the samples)
      seed=0,                  # sample i uses fold_in(seed, i), as `python -m ...sample`
      reference="",            # 'inception': FID reference statistics .npz (fid_stats)
      inception_weights="",    # 'inception': converted FID Inception .npz
      inception_metrics=("fid", "inception_score"),  # also 'precision', 'recall'
      vae_dir="",              # latent data: VAE folder ('' = the one in metadata.json)
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1,                 # in-slice sizes; one -1 fills the rest
      dcn_data=1, dcn_fsdp=1, dcn_tensor=1,      # across-slice sizes (multi-slice TPU)
      logical_axis_rules=(),                     # (logical, mesh axes) pairs over defaults
  ))
  c.lora = ml_collections.ConfigDict(dict(
      rank=0,                  # > 0: train LoRA adapters of this rank on a frozen base
      alpha=0.0,               # scale alpha / rank (PEFT's lora_alpha)
      target_modules="",       # diffusers module names, comma-separated (PEFT suffix rule)
      time_input="t_r",        # 't_r' | 't_minus_half_r' (official TwinFlow_LoRA forward)
      base_fingerprint="",     # set by the trainer: identity of the base weights
  ))
  return c


def tf_config(config: Any) -> losses.TwinFlowConfig:
  """config.loss -> TwinFlowConfig (which validates the values)."""
  fields = {f.name for f in dataclasses.fields(losses.TwinFlowConfig)}
  given = dict(config.loss)
  unknown = sorted(set(given) - fields)
  if unknown:
    raise errors.ConfigError(f"unknown config.loss fields {unknown}; known: {sorted(fields)}")
  with errors.as_config_errors():
    return losses.TwinFlowConfig(**given)


def _require(ok: bool, field: str, want: str, got: Any) -> None:
  if not ok:
    raise errors.ConfigError(f"config.{field} must be {want}, got {got!r}")


def validate(config: Any) -> None:
  """Checks the train-owned sections; raises errors.ConfigError naming the bad field."""
  known = set(base_config().keys())
  unknown = sorted(set(config.keys()) - known)
  if unknown:
    raise errors.ConfigError(f"unknown config sections {unknown}; known: {sorted(known)}")
  for section in ("train", "optim", "mesh", "lora", "eval"):
    if section not in config:
      continue
    allowed = set(base_config()[section].keys())
    extra = sorted(set(config[section].keys()) - allowed)
    if extra:
      raise errors.ConfigError(
          f"unknown config.{section} fields {extra}; known: {sorted(allowed)}")
  t = config.train
  _require(isinstance(t.global_batch_size, int) and t.global_batch_size >= 4,
           "train.global_batch_size", "an int >= 4 (TwinFlow splits it into 4 groups)",
           t.global_batch_size)
  for f in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
            "num_samples", "max_consecutive_skips"):
    _require(isinstance(t[f], int) and t[f] >= 1, f"train.{f}", "an int >= 1", t[f])
  _check_warmup(config)
  _require(isinstance(t.sample_every, int) and t.sample_every >= 0, "train.sample_every",
           "an int >= 0", t.sample_every)
  _require(t.uncond in step_lib.UNCOND_MODES, "train.uncond",
           f"one of {step_lib.UNCOND_MODES}", t.uncond)
  bad = [p for p in t.sample_presets if p not in SAMPLE_PRESETS]
  _require(not bad, "train.sample_presets", f"a subset of {SAMPLE_PRESETS}",
           t.sample_presets)
  for d in t.eval_ema_decays:
    _require(0.0 < float(d) < 1.0, "train.eval_ema_decays", "decays in (0, 1)",
             t.eval_ema_decays)
  _require(sample_source(config) is not None, "train.sample_from",
           f"one of {SAMPLE_FROM} or one of train.eval_ema_decays (as a string)",
           t.sample_from)
  _require(not t.get("guide_from") or guide_source(config) is not None, "train.guide_from",
           "'' or one of train.eval_ema_decays (as a string, e.g. '0.999')", t.get("guide_from"))
  losses.block_layout(t.global_batch_size, tf_config(config))   # loss.row_blocks fits the batch
  if "lora" in config:
    from twinflow_jax.train import lora  # pylint: disable=g-import-not-at-top
    lora.validate(config)
  if "eval" in config:
    _check_eval(config)


EVAL_METRICS = ("mnist", "toy2d", "inception")
INCEPTION_METRICS = ("fid", "inception_score", "precision", "recall")


def _check_eval(config: Any) -> None:
  """config.eval: names the bad field (files are opened when the evaluator is built)."""
  e = config.eval
  for f in ("metrics", "presets", "weights", "inception_metrics"):
    _require(isinstance(e[f], (tuple, list)) and all(isinstance(v, str) for v in e[f]),
             f"eval.{f}", "a tuple of names", e[f])
  bad = [m for m in e.metrics if m not in EVAL_METRICS]
  _require(not bad, "eval.metrics", f"a subset of {EVAL_METRICS}", e.metrics)
  bad = [m for m in e.inception_metrics if m not in INCEPTION_METRICS]
  _require(not bad, "eval.inception_metrics", f"a subset of {INCEPTION_METRICS}",
           e.inception_metrics)
  from twinflow_jax import sampling  # pylint: disable=g-import-not-at-top
  bad = [p for p in e.presets if p not in sampling.PRESETS]
  _require(not bad and len(e.presets) > 0, "eval.presets",
           f"a non-empty subset of {tuple(sampling.PRESETS)}", e.presets)
  _require(isinstance(e.every, int) and e.every >= 0, "eval.every", "an int >= 0", e.every)
  for f in ("num_samples", "batch_size"):
    _require(isinstance(e[f], int) and e[f] >= 2, f"eval.{f}", "an int >= 2", e[f])
  _require(isinstance(e.seed, int), "eval.seed", "an int", e.seed)
  _require(len(e.weights) > 0, "eval.weights", "a non-empty tuple", e.weights)
  for w in e.weights:
    if eval_weights_source(config, w) is None:
      raise errors.ConfigError(
          f"config.eval.weights has {w!r}; use 'ema', 'online' or 'ema_<decay>' with a decay "
          f"of config.train.eval_ema_decays={tuple(config.train.eval_ema_decays)}")
  if "inception" in e.metrics:
    _require(bool(e.inception_weights), "eval.inception_weights",
             "the converted FID Inception .npz (python -m twinflow_jax.models.convert."
             "inception) for eval.metrics 'inception'", e.inception_weights)
    needs_ref = {"fid", "precision", "recall"} & set(e.inception_metrics)
    _require(bool(e.reference) or not needs_ref, "eval.reference",
             f"reference statistics .npz (python -m twinflow_jax.evaluation.fid_stats) for "
             f"{sorted(needs_ref)}", e.reference)


def eval_weights_source(config: Any, name: str) -> str | None:
  """'ema' -> 'ema', 'online' -> 'params', 'ema_<decay>' -> its eval-EMA key; else None."""
  if name == "ema":
    return "ema"
  if name in ("online", "params"):
    return "params"
  if not name.startswith("ema_"):
    return None
  return _eval_ema_key(config, name[4:].replace("p", "."))


def _eval_ema_key(config: Any, decay_text: str) -> str | None:
  """'0.999' -> 'ema_0p999' if that decay is one of train.eval_ema_decays; else None."""
  try:
    decay = float(decay_text)
  except ValueError:
    return None
  decays = [float(d) for d in config.train.eval_ema_decays]
  return eval_ema_name(decay) if decay in decays else None


def _check_warmup(config: Any) -> None:
  """A warm-up must end before the last update of a cosine schedule (names the fields)."""
  o = config.optim
  accum = o.get("accum_steps", 1)
  if not isinstance(accum, int) or accum < 1:
    return  # optim.create_optimizer names the field
  updates = max(config.train.num_steps // accum, 1)
  warmup = o.get("warmup_steps", 0)
  if o.get("schedule") == "warmup_cosine" and isinstance(warmup, int) and warmup >= updates:
    raise errors.ConfigError(
        f"config.optim.warmup_steps={warmup} must be below the number of optimizer updates "
        f"({updates} = config.train.num_steps {config.train.num_steps} / "
        f"config.optim.accum_steps {accum}) for optim.schedule='warmup_cosine'; lower "
        f"--config.optim.warmup_steps or use --config.optim.schedule=constant")


# Fields that may differ between a checkpoint's config and the config that resumes it:
# they change neither the meaning of the saved state nor the data order. Entries ending in
# '.*' cover a whole section. Everything else (model, batch size, data source and seeds,
# loss, optimizer, EMAs, seed) must match unless train.allow_config_change is set.
RESUME_CHANGEABLE = (
    "train.num_steps",          # also the length of a cosine LR schedule
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpointing", "train.verify_checkpoints",
    "train.sample_every", "train.sample_presets", "train.num_samples", "train.sample_from",
    "train.use_tensorboard", "train.init_from", "train.compilation_cache_dir",
    "train.max_consecutive_skips", "train.allow_data_restart", "train.allow_config_change",
    "mesh.*",                   # checkpoints restore onto any mesh
    "eval.*",                   # evaluation settings never touch the train state
    "model.remat",              # memory only
    "data.read_threads", "data.prefetch_buffer_size", "data.worker_buffer_size",
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def _changeable(key: str) -> bool:
  return any(key == p or (p.endswith(".*") and key.startswith(p[:-1]))
             for p in RESUME_CHANGEABLE)


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Fields whose change would silently alter a resumed run, as 'field: saved -> now'.

  Args:
    saved: the config JSON stored in the checkpoint (`checkpoint.config_to_json`).
    current: the same for the config that resumes it.

  Returns:
    One entry per differing field outside `RESUME_CHANGEABLE`, sorted; a field present on
    one side only shows as '<absent>' on the other.
  """
  a, b = _flat(saved), _flat(current)
  defaults = _flat(base_config().to_dict())
  out = []
  for key in sorted(set(a) | set(b)):
    if _changeable(key):
      continue
    if key not in a and key in defaults and b.get(key) == defaults[key]:
      continue   # a field added later, at its default (e.g. lora.* of older runs)
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va != vb:
      out.append(f"{key}: {va!r} -> {vb!r}")
  return out


def guide_source(config: Any) -> str | None:
  """The eval-EMA key that autoguides the enhanced target (train.guide_from); else None."""
  gf = str(config.train.get("guide_from", ""))
  return _eval_ema_key(config, gf) if gf else None


def sample_source(config: Any) -> str | None:
  """Which weights sample grids use: 'ema', 'params' or an eval-EMA key; None if unknown."""
  sf = str(config.train.sample_from)
  if sf in SAMPLE_FROM:
    return sf
  return _eval_ema_key(config, sf)


def check_model_fits_data(model_config: Any, spec: Any) -> None:
  """Fails at start, naming the fields, when the data cannot feed the model.

  Catches what the network would otherwise report only while the step compiles: a class
  count below the data's (labels beyond the embedding table train to NaN), and for the
  DiT / MMDiT families the image channels and the patch grid.

  Args:
    model_config: config.model.
    spec: the data's `DataSpec`.

  Raises:
    ValueError: naming config.model / config.data fields and the values to use.
  """
  from twinflow_jax.models import configs as model_configs  # pylint: disable=g-import-not-at-top
  classes = model_config.get("num_classes")
  if spec.conditioning == "class" and classes is not None and 0 < classes < spec.num_classes:
    raise ValueError(f"config.model.num_classes={classes} is below the data's "
                     f"{spec.num_classes} classes; set --config.model.num_classes="
                     f"{spec.num_classes}")
  name = str(model_config.get("name", ""))
  if not name.startswith(("DiT-", "MMDiT-")) or len(spec.x_shape) != 3:
    return
  cfg = model_configs.resolve_config(model_config)
  h, w, c = spec.x_shape
  if c != cfg.in_channels:
    raise ValueError(f"config.model.in_channels={cfg.in_channels} does not match the data's "
                     f"{c} channels (examples {h} x {w} x {c}); set "
                     f"--config.model.in_channels={c}")
  if h % cfg.patch_size or w % cfg.patch_size:
    raise ValueError(f"the data's {h} x {w} examples (config.data.image_size or the latent "
                     f"shape) are not divisible by the patch size {cfg.patch_size} of "
                     f"config.model.name={name!r}")
