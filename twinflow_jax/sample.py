r"""Samples from a training run, read-only: `python -m twinflow_jax.sample --workdir DIR`.

  python -m twinflow_jax.sample --workdir /tmp/mnist                  # 100 digits, 1 NFE
  python -m twinflow_jax.sample --workdir /tmp/mnist --preset any4 --num 1000 \
      --labels 3 --weights online --seed 1 --out /tmp/threes.npz
  python -m twinflow_jax.sample --workdir /tmp/t2i --cond-file prompts.npz --preset 4nfe
  python -m twinflow_jax.sample --workdir /runs/flux_lora --cond-file prompts.npz --guidance 3.5
  python -m twinflow_jax.sample --diffusers /hf/Qwen-Image/transformer --latent-size 64,64 \
      --cond-file prompts.npz --preset 4nfe
  python -m twinflow_jax.sample --workdir /tmp/in256 --num 5000 --vae /models/sd-vae \
      --metrics inception --inception-weights fid_inception.npz --reference in256_ref.npz

Reads the run's own config (DIR/config.json), builds its model, reads only the chosen
weights of one checkpoint (default: the newest) and generates on all local devices with
per-sample seeds (sample i depends only on --seed and i, not on the device count or
--batch). Writes OUT.npz (samples in model space, labels or text conditions, preset, step,
weights, seed) and OUT.png (a grid; one class per column for class-conditional runs). It
never writes into, moves or deletes anything in DIR: an unreadable checkpoint is reported
and the command exits with status 1 (pick another with --step).

LoRA runs (configs sd35_twinflow.py:lora, qwen_image_twinflow_lora.py, flux_twinflow_lora.py)
sample without an export: the frozen base is read from the run's config.train.init_from (or
--base, if it moved), checked against the run's lora.base_fingerprint, and the network is the
trainer's (adapters on the base, the run's lora.time_input); --weights defaults to 'online'.

Latent runs (data prepared by `python -m twinflow_jax.data.prepare`, whose metadata.json
names the VAE) are decoded through that VAE (or the one given with --vae): OUT.npz also
holds `images` (uint8 [N, H, W, 3]), and the grid and the metrics show decoded images.
--metrics judges the samples with the evaluators of the trainer's `config.eval.metrics`
('mnist', 'toy2d', 'inception'); the values are printed and stored in OUT.npz
(`metrics`, JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

from twinflow_jax import hostmem

EXIT_ERROR = 1
EXIT_USAGE = 2
_INCEPTION_METRICS = "fid,inception_score"   # --inception-metrics default


class UserError(Exception):
  """A mistake in the flags, paths or files given: reported as one line."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m twinflow_jax.sample", description=__doc__.split("\n\n")[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="the --workdir of a twinflow_jax.main run")
  src.add_argument("--diffusers", default=None,
                   help="instead of a run: a diffusers transformer folder (config.json + "
                        "safetensors) of sd3 / flux / qwen_image, sampled as it is (a base "
                        "release gets its TwinFlow r-embedder initialised as in training); "
                        "needs --latent-size and --cond-file")
  p.add_argument("--latent-size", "--latent_size", dest="latent_size", default=None,
                 help="--diffusers: latent H,W (e.g. 64,64 for 512 px with an 8x VAE)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="--diffusers: weight and compute dtype (default bfloat16)")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the newest complete one)")
  p.add_argument("--weights", default=None,
                 help="'ema' (the TwinFlow EMA; the default), 'online' (the trained parameters; "
                      "the default for LoRA runs) or 'ema_<decay>' (an evaluation EMA of "
                      "train.eval_ema_decays)")
  p.add_argument("--base", default=None,
                 help="LoRA runs: the frozen base transformer folder, if it moved since "
                      "training (default: the run's config.train.init_from); it must be the "
                      "base the run was trained on (checked by lora.base_fingerprint)")
  p.add_argument("--preset", default="1nfe",
                 help="sampler preset: 1nfe, 2nfe, 4nfe, any4 (the few-step preset "
                      "recommended for the default MNIST model), multi30 (official) or "
                      "small4 (ours: more accurate, less varied); default 1nfe")
  p.add_argument("--num", type=int, default=None,
                 help="number of samples (default 100; for text runs, the rows of --cond-file)")
  p.add_argument("--labels", default=None,
                 help="class labels, comma-separated, cycled to --num (default: 0, 1, ..., "
                      "num_classes - 1 repeated, one class per grid column)")
  p.add_argument("--cond-file", "--cond_file", dest="cond_file", default=None,
                 help="text-conditional runs: .npz of precomputed embeddings with 'txt' "
                      "[N, L, D], 'txt_mask' [N, L] and 'pooled' [N, P]")
  p.add_argument("--cfg-scale", "--cfg_scale", dest="cfg_scale", type=float, default=None,
                 help="classifier-free guidance scale at inference (TwinFlow needs none: its "
                      "guidance is trained in); uses the null class / null text")
  p.add_argument("--guidance", type=float, default=None,
                 help="Flux.1-dev (guidance_embeds) runs: the embedded guidance value (default: "
                      "the model config's default_guidance, 3.5 as the diffusers pipeline)")
  p.add_argument("--seed", type=int, default=0, help="base seed; sample i uses fold_in(seed, i)")
  p.add_argument("--batch", type=int, default=256,
                 help="samples per device call across all devices (does not change samples)")
  p.add_argument("--vae", default=None,
                 help="latent runs: the VAE folder that decodes the samples (default: the one "
                      "recorded in the data's metadata.json)")
  p.add_argument("--no-decode", "--no_decode", dest="decode", action="store_false",
                 help="latent runs: keep the samples as latents (no VAE needed)")
  p.add_argument("--metrics", default="",
                 help="comma-separated metrics of the samples: mnist, toy2d, inception "
                      "(FID / Inception Score of the (decoded) images)")
  p.add_argument("--reference", default="",
                 help="--metrics inception: FID reference statistics .npz (evaluation.fid_stats)")
  p.add_argument("--inception-weights", "--inception_weights", dest="inception_weights",
                 default="", help="--metrics inception: converted FID Inception weights .npz")
  p.add_argument("--inception-metrics", "--inception_metrics", dest="inception_metrics",
                 default=_INCEPTION_METRICS,
                 help="--metrics inception: any of fid, inception_score, precision, recall")
  p.add_argument("--out", default=None,
                 help="output .npz (a .png grid is written next to it); default "
                      "./samples_<run>_step<S>_<preset>_<weights>.npz")
  return p


def _fail(msg: str, code: int = EXIT_ERROR):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _parse_labels(text: str | None, num: int, num_classes: int) -> np.ndarray:
  from twinflow_jax import generate  # pylint: disable=g-import-not-at-top
  if text is None:
    return generate.class_labels(num, num_classes)
  try:
    given = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
  except ValueError:
    raise UserError(f"--labels must be comma-separated integers, got {text!r}") from None
  bad = [v for v in given if not 0 <= v < num_classes]
  if not given or bad:
    raise UserError(f"--labels must lie in [0, {num_classes}) for this run, got {text!r}")
  return np.resize(np.asarray(given, np.int32), num)


# Pretrained families take any text length; Qwen-Image ignores the pooled vector.
_ANY_TEXT_LENGTH = ("sd3", "flux", "qwen_image")
_NO_POOLED = ("qwen_image",)


def _load_text_conditions(path: str | None, spec: Any, num: int | None,
                          model: str = "") -> dict[str, np.ndarray]:
  if not path:
    raise UserError("this run is text-conditional: give --cond-file, an .npz of precomputed "
                    "embeddings with 'txt' [N, L, D], 'txt_mask' [N, L] and 'pooled' [N, P]")
  if not os.path.isfile(path):
    raise UserError(f"--cond-file {path} does not exist")
  try:
    with np.load(path) as f:
      cond = {k: np.asarray(f[k]) for k in ("txt", "txt_mask", "pooled") if k in f}
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"--cond-file {path} is not a readable .npz ({e})") from e
  missing = [k for k in ("txt", "txt_mask", "pooled") if k not in cond]
  if missing:
    raise UserError(f"--cond-file {path} lacks {missing}; it needs 'txt', 'txt_mask', 'pooled'")
  n = len(cond["txt"])
  length = spec.txt_shape[0]
  if model in _ANY_TEXT_LENGTH and cond["txt"].ndim == 3:
    length = cond["txt"].shape[1]     # these transformers take any prompt length
  want = {"txt": (n, length, spec.txt_shape[1]), "txt_mask": (n, length),
          "pooled": (n, spec.pooled_dim)}
  if model in _NO_POOLED and cond["pooled"].ndim == 2:
    want["pooled"] = cond["pooled"].shape   # accepted and ignored by the model
  for k, shape in want.items():
    if cond[k].shape != shape:
      raise UserError(f"--cond-file {path}: '{k}' has shape {cond[k].shape}, this run needs "
                      f"{shape} (N = {n})")
  cond = {"txt": cond["txt"].astype(np.float32), "txt_mask": cond["txt_mask"].astype(bool),
          "pooled": cond["pooled"].astype(np.float32)}
  num = n if num is None else num
  if num > n:
    raise UserError(f"--num {num} exceeds the {n} conditions in --cond-file {path}")
  return {k: v[:num] for k, v in cond.items()}


def _model_field(run_, field: str) -> Any:
  """A field of the run's resolved model config (the family's defaults included)."""
  from twinflow_jax import models  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models import families  # pylint: disable=g-import-not-at-top
  d = run_.config.model.to_dict()
  family = families.FAMILIES.get(d.get("name"))
  cfg = family.resolve(d) if family else models.resolve_config(d)
  return getattr(cfg, field, None)


def _metric_names(args: argparse.Namespace) -> tuple[str, ...]:
  """--metrics as names; refuses Inception flags that would be ignored. Raises UserError."""
  metrics = tuple(m for m in args.metrics.replace(" ", "").split(",") if m)
  if "inception" not in metrics:
    given = [flag for flag, value, unset in (
        ("--reference", args.reference, ""),
        ("--inception-weights", args.inception_weights, ""),
        ("--inception-metrics", args.inception_metrics, _INCEPTION_METRICS)) if value != unset]
    if given:
      raise UserError(f"{', '.join(given)} given without --metrics inception; add it to "
                      "--metrics or drop the flag")
  return metrics


def _decoder_and_evaluators(args: argparse.Namespace, run_: Any,
                            metrics: tuple[str, ...]):
  """(VAE decoder or None, {metric: evaluator}) for this run and the flags."""
  from twinflow_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  decoder = None
  if args.decode:
    try:
      decoder = evaluation.latent_decoder(run_.config, vae_dir=args.vae)
    except ValueError as e:
      raise UserError(str(e).replace("set --config.eval.vae_dir to", "give --vae")) from e
    if decoder is None and args.vae:
      raise UserError(f"--vae {args.vae} given, but the run's data (config.data.source="
                      f"{run_.config.data.source!r}, paths={run_.config.data.get('paths')!r}) "
                      "have no metadata.json naming latents to decode")
  if not metrics:
    return decoder, {}
  from twinflow_jax.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
  if "inception" in metrics and not args.inception_weights:
    raise UserError("--metrics inception needs --inception-weights (the converted FID "
                    "Inception .npz of python -m twinflow_jax.models.convert.inception)")
  shape = evaluation.decoded_shape(decoder, tuple(run_.spec.x_shape))
  try:
    evaluators = sample_metrics.make_evaluators(
        metrics, run_.config.data, shape, inception_weights=args.inception_weights,
        reference=args.reference, mesh=run_.mesh,
        inception_metrics=tuple(m for m in args.inception_metrics.split(",") if m))
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"--metrics: {e}") from e
  return decoder, evaluators


def _inside(path: str, folder: str) -> bool:
  """Whether `path` lies in `folder`, symbolic links resolved on both sides."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def _out_path(out: str, source: str, source_flag: str) -> str:
  """The absolute OUT.npz (OUT.png beside it), checked before anything is generated."""
  root, ext = os.path.splitext(out)
  out = os.path.abspath((root if ext in (".npz", ".png") else out) + ".npz")
  if _inside(out, source):
    raise UserError(f"--out {out} lies inside {source_flag}; this command never writes there")
  for path in (out, out[:-len(".npz")] + ".png"):
    if os.path.isdir(path):
      raise UserError(f"--out: {path} is a directory; give a file name, e.g. {path}/x.npz")
  try:   # the folder is made here, so a path that cannot be written fails before sampling
    os.makedirs(os.path.dirname(out), exist_ok=True)
  except OSError as e:
    raise UserError(f"--out: cannot create the folder {os.path.dirname(out)} "
                    f"({type(e).__name__}: {e.strerror or e})") from e
  return out


def default_out(workdir: str, step: int, preset: str, weights: str) -> str:
  run = os.path.basename(os.path.normpath(workdir)) or "run"
  return os.path.abspath(f"samples_{run}_step{step}_{preset}_{weights}.npz")


def run(args: argparse.Namespace) -> str:
  """Does the work of the command; returns the .npz path. Raises UserError."""
  if args.num is not None and args.num < 1:
    raise UserError(f"--num must be >= 1, got {args.num}")
  if args.batch < 1:
    raise UserError(f"--batch must be >= 1, got {args.batch}")
  from twinflow_jax import sampling  # pylint: disable=g-import-not-at-top
  if args.preset not in sampling.PRESETS:
    raise UserError(f"unknown --preset {args.preset!r}; choose one of {tuple(sampling.PRESETS)}")

  import jax  # pylint: disable=g-import-not-at-top
  from twinflow_jax import generate  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import images  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import readonly  # pylint: disable=g-import-not-at-top

  metric_names = _metric_names(args)   # before anything is read: flag mistakes fail at once
  if args.diffusers:
    if metric_names:
      raise UserError("--metrics applies to --workdir runs, not to --diffusers (whose "
                      "samples are undecoded latents); drop --metrics")
    return _run_diffusers(args)
  t0 = time.perf_counter()
  try:
    run_ = readonly.load_run(args.workdir, args.step,
                             None if args.weights is None else (args.weights,),
                             base=args.base)
  except readonly.CheckpointReadError as e:
    steps = readonly.complete_steps(args.workdir)
    step = args.step if args.step is not None else (steps[-1] if steps else None)
    older = [s for s in steps if step is not None and s < step]
    hint = f" (an older checkpoint: --step {older[-1]})" if older else ""
    raise UserError(f"{e}{hint}") from e
  except ValueError as e:
    raise UserError(str(e)) from e
  spec, step = run_.spec, run_.step
  weights = next(iter(run_.weights))   # the run's default when none was named

  model_name = run_.config.model.get("name", "")
  if args.guidance is not None and not (model_name == "flux"
                                        and _model_field(run_, "guidance_embeds")):
    raise UserError("--guidance applies to Flux models with a guidance embedder "
                    f"(guidance_embeds=True); this run's model is {model_name!r}")
  if spec.conditioning == "text":
    cond = _load_text_conditions(args.cond_file, spec, args.num, model_name)
    num = len(cond["txt"])
    labels = None
    if model_name == "flux" and _model_field(run_, "guidance_embeds"):
      g = args.guidance if args.guidance is not None else _model_field(run_, "default_guidance")
      cond["guidance"] = np.full((num,), g, np.float32)
  else:
    if args.cond_file:
      raise UserError("--cond-file is for text-conditional runs; this run is class-conditional")
    if args.labels is not None and spec.num_classes <= 1:
      raise UserError("this run is unconditional; --labels does not apply")
    num = 100 if args.num is None else args.num
    labels = (_parse_labels(args.labels, num, spec.num_classes) if spec.num_classes > 1
              else None)
    cond = labels
  if args.cfg_scale is not None and cond is None:
    raise UserError("--cfg-scale needs a conditional run")
  decoder, evaluators = _decoder_and_evaluators(args, run_, metric_names)
  out = _out_path(args.out or default_out(args.workdir, step, args.preset, weights),
                  args.workdir, "--workdir")
  _log(f"run {args.workdir}: model {run_.config.model.name}, samples {tuple(spec.x_shape)}; "
       f"read the {weights} weights of step {step} (of {run_.steps}) in "
       f"{time.perf_counter() - t0:.1f}s; mesh {dict(run_.mesh.shape)}")
  _log(f"generating {num} samples with preset {args.preset} (seed {args.seed}) on "
       f"{jax.device_count()} device(s)")

  uncond = (generate.null_conditions(cond, spec.num_classes)
            if args.cfg_scale is not None else None)
  if uncond is not None and isinstance(cond, dict) and "guidance" in cond:
    uncond["guidance"] = cond["guidance"]   # the null text keeps the embedded guidance
  t0 = time.perf_counter()
  samples = generate.generate(
      run_.apply_fn, run_.weights[weights], cond, args.preset, key=args.seed,
      x_shape=spec.x_shape, num=num, mesh=run_.mesh, rules=run_.rules, batch_size=args.batch,
      uncond=uncond, cfg_scale=args.cfg_scale, progress=True)
  _log(f"generated {num} samples in {time.perf_counter() - t0:.1f}s")
  shown = samples
  if decoder is not None:
    t0 = time.perf_counter()
    shown = decoder(samples, output="float")
    _log(f"decoded {num} latents to images {tuple(shown.shape[1:])} in "
         f"{time.perf_counter() - t0:.1f}s")
  metrics = {}
  if evaluators:
    from twinflow_jax.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    metrics = sample_metrics.evaluate(shown, labels, evaluators)
    _log(f"metrics ({time.perf_counter() - t0:.1f}s): " +
         ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))

  if jax.process_index() == 0:   # out's folder exists: _out_path made it
    cfg = sampling.get_config(args.preset)
    record = {"samples": samples, "preset": np.asarray(args.preset), "step": np.asarray(step),
              "weights": np.asarray(weights), "seed": np.asarray(args.seed),
              "cfg_scale": np.asarray(np.nan if args.cfg_scale is None else args.cfg_scale),
              "sampler": np.asarray(json.dumps(cfg.__dict__)),
              "workdir": np.asarray(os.path.abspath(args.workdir))}
    if decoder is not None:
      from twinflow_jax.evaluation import preprocess  # pylint: disable=g-import-not-at-top
      record["images"] = preprocess.samples_to_uint8(shown)   # as the FID sees them
    if metrics:
      record["metrics"] = np.asarray(json.dumps(metrics))
    if labels is not None:
      record["labels"] = labels
    elif isinstance(cond, dict):
      record.update(cond)
    np.savez(out, **record)
    cycled = labels is not None and args.labels is None and 1 < spec.num_classes <= 32
    png = out[:-4] + ".png"
    images.write_png(png, images.samples_to_image(
        shown, ncols=spec.num_classes if cycled else None))
    _log(f"wrote {out} and {png}")
  return out


def _run_diffusers(args: argparse.Namespace) -> str:
  """Samples a diffusers folder's model (FSDP over all devices) with the presets."""
  import jax  # pylint: disable=g-import-not-at-top
  from twinflow_jax import generate  # pylint: disable=g-import-not-at-top
  from twinflow_jax import sampling  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert import diffusers  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import images  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  if args.base:
    raise UserError("--base applies to --workdir of a LoRA run, not to --diffusers")
  path = os.path.abspath(args.diffusers)
  if not diffusers.is_diffusers_dir(path):
    raise UserError(f"--diffusers {args.diffusers} is not a diffusers model folder "
                    "(config.json + diffusion_pytorch_model*.safetensors)")
  try:
    h, w = (int(v) for v in (args.latent_size or "").split(","))
  except ValueError:
    raise UserError("--diffusers needs --latent-size H,W (latent pixels, e.g. 64,64)"
                    ) from None
  mesh = jax.make_mesh((1, jax.device_count(), 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  t0 = time.perf_counter()
  try:
    model = diffusers.load_model(path, {"dtype": args.dtype, "param_dtype": args.dtype},
                                 mesh=mesh)
  except (ValueError, FileNotFoundError) as e:
    raise UserError(f"--diffusers {args.diffusers}: {e}") from e
  cfg = model.config
  name = cfg.name
  channels = cfg.latent_channels if name in ("flux", "qwen_image") else cfg.in_channels
  pooled = getattr(cfg, "pooled_projection_dim", 0) or 1
  spec = argparse.Namespace(txt_shape=(1, cfg.joint_attention_dim), pooled_dim=pooled)
  cond = _load_text_conditions(args.cond_file, spec, args.num, name)
  num = len(cond["txt"])
  if args.guidance is not None and not (name == "flux" and cfg.guidance_embeds):
    raise UserError(f"--guidance applies to Flux models with a guidance embedder; "
                    f"{args.diffusers} is {name!r}")
  if name == "flux" and cfg.guidance_embeds:
    g = args.guidance if args.guidance is not None else cfg.default_guidance
    cond["guidance"] = np.full((num,), g, np.float32)
  graphdef, params = state_lib.split_model(model)
  apply_fn = state_lib.make_apply_fn(graphdef)
  out = _out_path(args.out or f"samples_{os.path.basename(path)}_{args.preset}.npz",
                  path, "--diffusers")
  _log(f"{name} from {path} ({args.dtype}) read in {time.perf_counter() - t0:.1f}s; "
       f"generating {num} samples [{h}, {w}, {channels}] with preset {args.preset}")
  uncond = None
  if args.cfg_scale is not None:
    uncond = generate.null_conditions(cond, 0)
    if "guidance" in cond:
      uncond["guidance"] = cond["guidance"]
  samples = generate.generate(
      apply_fn, params, cond, args.preset, key=args.seed, x_shape=(h, w, channels), num=num,
      mesh=mesh, rules=(), batch_size=args.batch, uncond=uncond, cfg_scale=args.cfg_scale,
      progress=True)
  if jax.process_index() == 0:   # out's folder exists: _out_path made it
    np.savez(out, samples=samples, preset=np.asarray(args.preset), seed=np.asarray(args.seed),
             weights=np.asarray("diffusers"), diffusers=np.asarray(path),
             cfg_scale=np.asarray(np.nan if args.cfg_scale is None else args.cfg_scale),
             sampler=np.asarray(json.dumps(sampling.get_config(args.preset).__dict__)),
             **cond)
    png = out[:-4] + ".png"
    images.write_png(png, images.samples_to_image(samples))
    _log(f"wrote {out} and {png}")
  return out


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except UserError as e:
    _fail(str(e))
  return 0


def _cli() -> None:
  try:
    code = main()
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else EXIT_ERROR
    if code:
      # After a failed checkpoint read, Orbax/TensorStore callbacks still pending at
      # interpreter shutdown print "Event loop is closed" tracebacks under the one-line
      # error; there is nothing left to clean up, so leave at once.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  hostmem.reexec_with_resident_malloc()
  _cli()
