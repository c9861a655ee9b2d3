r"""Images (and captions) -> VAE latents in ArrayRecord, with metadata the trainer checks.

  # Class-conditional (ImageNet-style folder <dir>/<class>/<image>):
  python -m twinflow_jax.data.prepare --vae=/models/sd-vae-ft-ema \
      --image_folder=/data/imagenet/train --image_size=256 --output=/data/in256 --hflip
  # A labels file (`<path>,<label>` per line) or a prepared TFDS dataset:
  python -m twinflow_jax.data.prepare --vae=DIR --labels_file=labels.csv --output=OUT
  python -m twinflow_jax.data.prepare --vae=DIR --tfds=imagenet2012 --tfds_split=train \
      --tfds_data_dir=/data/tfds --output=OUT
  # Text-to-image: a JSONL of {"image": path, "caption": text} per line; captions
  # embedded by the pipeline's text encoders in JAX (twinflow_jax.data.captions), or
  # precomputed in an .npz (txt [N, L, D], txt_mask [N, L], pooled [N, P]):
  python -m twinflow_jax.data.prepare --vae=/models/sd3/vae --jsonl=pairs.jsonl \
      --text_encoder=/models/sd3 --text_family=sd3 --image_size=512 \
      --latent_dtype=bfloat16 --output=OUT

What it does (details: docs/data-preparation.md): decodes each image, converts it to
RGB, centre-crops and resizes it as ADM / DiT do (`prep_images.center_crop_arr`), maps
pixels to [-1, 1] and encodes them with the Flax VAE of a diffusers folder on all local
devices (batch sharded). It stores the posterior mean (--store=sample: one posterior draw
with a fixed seed per image), unscaled; for VAEs with per-channel statistics (Qwen-Image)
the stored latent is (z - latents_mean) / latents_std. --hflip also stores the mirror
image's latent as the next record. Output folder:
  records-0000k-of-0000K.array_record   the records (schema: records.py), one shard per
                                        --shard_size inputs, written to .tmp and renamed
  metadata.json                         VAE, normalisation, shapes, counts; the data
                                        pipeline checks configs against it
  classes.txt, skipped.txt              class names; inputs skipped and why
  .progress/                            the settings and per-shard counts (resume)
Rerunning the same command continues after a kill: complete shards are kept, the rest
are redone. With several processes (jax.distributed, --distributed), process p writes
the shards k with k % process_count == p, and process 0 writes metadata.json once all
are done (the output folder must be shared).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from twinflow_jax.data import latent_metadata
from twinflow_jax.data import prep_images
from twinflow_jax.data import prep_inputs
from twinflow_jax.data import records

RECORDS_PREFIX = 'records'
PROGRESS_DIR = '.progress'
COMPRESSIONS = ('snappy', 'zstd', 'uncompressed')


class PrepareError(ValueError):
  """A user mistake found while preparing (one line, names the file or flag)."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m twinflow_jax.data.prepare',
      description=__doc__.split('\n\n')[0],
      epilog=__doc__.split('\n\n', 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group('input (exactly one)')
  g.add_argument('--image_folder', help='folder of class sub-folders of images')
  g.add_argument('--labels_file', help='lines "<image path>,<int label>"')
  g.add_argument('--tfds', help='name of a prepared TFDS image dataset')
  g.add_argument('--jsonl', help='lines {"image": path, "caption": text}')
  g.add_argument('--image_dir', help='root of relative paths in --labels_file / --jsonl '
                 '(default: that file\'s folder)')
  g.add_argument('--tfds_split', default='train')
  g.add_argument('--tfds_data_dir', default=None)
  g.add_argument('--tfds_image_key', default='image')
  g.add_argument('--tfds_label_key', default='label', help="'' = unconditional")
  g.add_argument('--jsonl_image_field', default='image')
  g.add_argument('--jsonl_caption_field', default='caption')
  g = p.add_argument_group('captions (--jsonl)')
  g.add_argument('--caption_embeddings', help='.npz with txt [N, L, D], txt_mask [N, L], '
                 'pooled [N, P] for the N lines of --jsonl, in order')
  g.add_argument('--text_encoder', help='diffusers pipeline folder whose text encoders '
                 '(text_encoder*/, tokenizer*/) embed the captions, in JAX '
                 '(twinflow_jax.data.captions)')
  g.add_argument('--text_family', choices=('sd3', 'flux', 'qwen_image'),
                 help='with --text_encoder: which encoders and conventions')
  g.add_argument('--txt_len', type=int, default=None,
                 help='with --text_encoder: T5 tokens (sd3, flux) or prompt tokens '
                 '(qwen_image); default the pipeline\'s')
  g.add_argument('--text_dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='text encoder weights and compute')
  g.add_argument('--txt_dtype', choices=records.EMBEDDING_DTYPES, default='bfloat16')
  g = p.add_argument_group('VAE and output')
  g.add_argument('--vae', required=True, help='diffusers-format VAE folder (config.json + '
                 'diffusion_pytorch_model.safetensors)')
  g.add_argument('--output', required=True, help='output folder')
  g.add_argument('--image_size', type=int, default=256)
  g.add_argument('--store', choices=('mean', 'sample'), default='mean',
                 help='posterior mean, or one posterior draw per image (seeded by index)')
  g.add_argument('--seed', type=int, default=0, help='seed of --store=sample')
  g.add_argument('--hflip', action='store_true',
                 help='also store the mirrored image\'s latent (the next record)')
  g.add_argument('--latent_dtype', choices=('float32', 'float16', 'bfloat16'),
                 default='float32')
  g.add_argument('--vae_dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='VAE compute dtype')
  g.add_argument('--batch_size', type=int, default=64,
                 help='inputs per encoder call and process (rounded up to a multiple '
                 'of the local device count)')
  g.add_argument('--shard_size', type=int, default=4096, help='inputs per output shard')
  g.add_argument('--compression', choices=COMPRESSIONS, default='snappy')
  g.add_argument('--limit', type=int, default=None, help='only the first N inputs')
  g.add_argument('--workers', type=int, default=8, help='image decoding threads')
  g = p.add_argument_group('bad input')
  g.add_argument('--on_bad_image', choices=('skip', 'fail'), default='skip',
                 help='unreadable / truncated / missing images: skip and count, or stop')
  g.add_argument('--small_images', choices=('upscale', 'skip', 'fail'), default='upscale',
                 help='images whose short side is below --image_size: upscale (ADM), '
                 'skip and count, or stop')
  g.add_argument('--alpha', choices=prep_images.ALPHA_MODES, default='drop',
                 help='transparent images: drop alpha (torchvision) or composite on white')
  g.add_argument('--distributed', choices=('auto', 'on', 'off'), default='auto',
                 help='jax.distributed.initialize(): see `python -m twinflow_jax.main`')
  g.add_argument('--quiet', action='store_true', help='no progress bar')
  return p


# ----------------------------------------------------------------------------------------
# Inputs and captions.


def _open_inputs(args: argparse.Namespace) -> prep_inputs.InputSet:
  given = [f for f in ('image_folder', 'labels_file', 'tfds', 'jsonl') if getattr(args, f)]
  if len(given) != 1:
    raise PrepareError('give exactly one input: --image_folder, --labels_file, --tfds or '
                       f'--jsonl (got {["--" + g for g in given] or "none"})')
  if args.image_folder:
    inputs = prep_inputs.image_folder(args.image_folder)
  elif args.labels_file:
    inputs = prep_inputs.labels_file(args.labels_file, args.image_dir)
  elif args.tfds:
    inputs = prep_inputs.tfds_input(args.tfds, args.tfds_split, args.tfds_data_dir,
                                    args.tfds_image_key, args.tfds_label_key)
  else:
    inputs = prep_inputs.jsonl(args.jsonl, args.image_dir, args.jsonl_image_field,
                               args.jsonl_caption_field)
  if args.limit is not None:
    if args.limit < 1:
      raise PrepareError(f'--limit={args.limit} must be >= 1')
    inputs.items = inputs.items[:args.limit]
  return inputs


class _CaptionEmbeddings:
  """txt / txt_mask / pooled for items, from an .npz or the captions module."""

  def __init__(self, args: argparse.Namespace, num_items: int):
    self.npz, self.fn = None, None
    if args.caption_embeddings and args.text_encoder:
      raise PrepareError('give --caption_embeddings or --text_encoder, not both')
    if args.caption_embeddings:
      path = args.caption_embeddings
      if not os.path.isfile(path):
        raise PrepareError(f'--caption_embeddings {path!r} does not exist')
      with np.load(path) as z:
        missing = [k for k in ('txt', 'txt_mask', 'pooled') if k not in z.files]
        if missing:
          raise PrepareError(f'{path} lacks arrays {missing} (has {z.files})')
        self.npz = {k: z[k] for k in ('txt', 'txt_mask', 'pooled')}
      n = {k: len(v) for k, v in self.npz.items()}
      if set(n.values()) != {num_items} and not (args.limit and
                                                  min(n.values()) >= num_items):
        raise PrepareError(f'{path} holds {n} rows but --jsonl has {num_items} captions')
      txt, mask, pooled = self.npz['txt'], self.npz['txt_mask'], self.npz['pooled']
      if txt.ndim != 3 or mask.shape != txt.shape[:2] or pooled.ndim != 2:
        raise PrepareError(f'{path}: expected txt [N, L, D], txt_mask [N, L], pooled '
                           f'[N, P]; got {txt.shape}, {mask.shape}, {pooled.shape}')
      self.source = {'type': 'npz', 'path': os.path.abspath(path)}
    elif args.text_encoder:
      if not args.text_family:
        raise PrepareError('--text_encoder needs --text_family (sd3, flux or qwen_image)')
      from twinflow_jax.data import captions  # pylint: disable=g-import-not-at-top
      try:
        encoders = captions.load_text_encoders(
            args.text_family, args.text_encoder, dtype=args.text_dtype,
            mesh=captions.local_mesh(), batch_size=args.batch_size)
        encoders.embedding_shapes(args.txt_len)  # checks --txt_len for the family
      except (ValueError, FileNotFoundError, ImportError) as e:
        raise PrepareError(f'--text_encoder {args.text_encoder}: {e}') from e
      self.fn = lambda texts: captions.embed_captions(texts, args.text_family, encoders,
                                                      args.txt_len)
      self.source = {'type': 'text_encoder', 'path': os.path.abspath(args.text_encoder),
                     'family': args.text_family, 'max_length': args.txt_len,
                     'dtype': args.text_dtype}
    else:
      raise PrepareError('--jsonl needs caption embeddings: --caption_embeddings=NPZ '
                         '(precomputed) or --text_encoder=PIPELINE_DIR --text_family=...')

  def __call__(self, items: Sequence[prep_inputs.Item]) -> dict[str, np.ndarray]:
    if self.npz is not None:
      idx = np.asarray([i.index for i in items])
      return {k: v[idx] for k, v in self.npz.items()}
    out = self.fn([i.caption for i in items])
    return {k: np.asarray(out[k]) for k in ('txt', 'txt_mask', 'pooled')}


# ----------------------------------------------------------------------------------------
# The plan: shards, their owners, the settings a resume must share.


def shard_ranges(num_items: int, shard_size: int) -> list[tuple[int, int]]:
  """[start, end) input indices of each shard."""
  return [(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def shards_of_process(num_shards: int, process_index: int,
                      process_count: int) -> list[int]:
  """Shards written by one process: k with k % process_count == process_index."""
  return list(range(process_index, num_shards, process_count))


def shard_path(output: str, k: int, num_shards: int) -> str:
  return os.path.join(output, f'{RECORDS_PREFIX}-{k:05d}-of-{num_shards:05d}.array_record')


def _stats_path(output: str, k: int) -> str:
  return os.path.join(output, PROGRESS_DIR, f'shard-{k:05d}.json')


def _shard_done(output: str, k: int, num_shards: int) -> bool:
  return os.path.isfile(shard_path(output, k, num_shards)) and os.path.isfile(
      _stats_path(output, k))


def _write_json(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _check_plan(output: str, plan: dict[str, Any]) -> None:
  """Refuses to continue a preparation made with other settings; the first process to
  start records them (every process computes the same plan)."""
  path = os.path.join(output, PROGRESS_DIR, 'plan.json')
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    if diff:
      raise PrepareError(
          f'{output} holds a preparation with other settings ({", ".join(diff)} differ, '
          f'see {path}); rerun with the same flags to resume, or use a new --output')
  else:
    _write_json(path, plan)


# ----------------------------------------------------------------------------------------
# Encoding.


@dataclasses.dataclass
class _Encoder:
  """Pads batches to a fixed size, runs the sharded VAE, post-processes latents."""
  encode: Any
  batch: int  # images per call (fixed: one compilation)
  store: str
  seed: int
  channel_mean: np.ndarray | None
  channel_std: np.ndarray | None

  def __call__(self, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """images uint8 [n, S, S, 3], ids int [n] (sampling seeds) -> latents float32."""
    n = len(images)
    x = prep_images.to_unit_range(images)
    if n < self.batch:
      x = np.concatenate([x, np.zeros((self.batch - n,) + x.shape[1:], x.dtype)])
    mean, logvar = self.encode(x)
    z = np.asarray(jax.device_get(mean))[:n]
    if self.store == 'sample':
      std = np.exp(0.5 * np.asarray(jax.device_get(logvar))[:n])
      ids = np.concatenate([ids, np.zeros(self.batch - n, ids.dtype)])  # one shape
      z = z + std * np.asarray(_posterior_noise(self.seed, ids, z.shape[1:]))[:n]
    if self.channel_mean is not None:
      z = (z - self.channel_mean) / self.channel_std
    return z.astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _posterior_noise(seed: int, ids: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """N(0, 1) noise [n, *shape]; row i depends only on (seed, ids[i])."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape))(ids)


def _load_one(inputs, item, args) -> tuple[Any, ...]:
  """('ok', PreparedImage, label) | ('bad', reason) | ('small', size)."""
  try:
    source, label = inputs.load(item)
    if isinstance(source, str) and not os.path.isfile(source):
      raise prep_images.BadImage('file does not exist')
    prepared = prep_images.prepare_image(source, args.image_size, args.alpha)
  except prep_images.BadImage as e:
    return ('bad', str(e))
  if prepared.upscaled and args.small_images != 'upscale':
    return ('small', prepared)
  return ('ok', prepared, label)


def _prefetched(pool, inputs, items, args, window: int) -> Iterator[tuple[Any, ...]]:
  """Loads items in threads, yielding results in order, `window` ahead."""
  queue = collections.deque()
  it = iter(items)
  for item in it:
    queue.append((item, pool.submit(_load_one, inputs, item, args)))
    if len(queue) >= window:
      break
  while queue:
    item, future = queue.popleft()
    nxt = next(it, None)
    if nxt is not None:
      queue.append((nxt, pool.submit(_load_one, inputs, nxt, args)))
    yield item, future.result()


def _write_shard(k: int, bounds: tuple[int, int], num_shards: int, inputs, args,
                 encoder: _Encoder, embed, spec: records.RecordSpec, pool,
                 progress) -> None:
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = shard_path(args.output, k, num_shards)
  tmp = path + '.tmp'
  writer = array_record_module.ArrayRecordWriter(tmp, f'group_size:1,{args.compression}')
  counts = collections.Counter()
  converted = collections.Counter()
  skipped = []
  items = inputs.items[bounds[0]:bounds[1]]
  step = encoder.batch // (2 if args.hflip else 1)

  def flush(batch):
    if not batch:
      return
    pixels = [p.pixels for _, p, _ in batch]
    ids = [2 * it.index for it, _, _ in batch]
    if args.hflip:
      pixels = [q for p in pixels for q in (p, p[:, ::-1])]
      ids = [q for i in ids for q in (i, i + 1)]
    latents = encoder(np.stack(pixels), np.asarray(ids, np.int32))
    text = embed([it for it, _, _ in batch]) if embed is not None else None
    copies = 2 if args.hflip else 1
    for j, (item, _, label) in enumerate(batch):
      for c in range(copies):
        example = {'latent': latents[copies * j + c]}
        if spec.kind == 'latents':
          example['label'] = np.int32(label)
        else:
          example.update({f: text[f][j] for f in ('txt', 'txt_mask', 'pooled')})
        writer.write(spec.encode(example))
        counts['records'] += 1
    progress.update(len(batch))

  try:
    batch = []
    for item, result in _prefetched(pool, inputs, items, args, window=2 * step):
      if result[0] == 'bad':
        if args.on_bad_image == 'fail':
          raise PrepareError(f'cannot read image {item.name}: {result[1]} (pass '
                             '--on_bad_image=skip to skip and count such files)')
        counts['skipped_unreadable'] += 1
        skipped.append([item.name, f'unreadable: {result[1]}'])
        progress.skip(item.name, result[1])
        continue
      prepared = result[1]
      if prepared.mode != 'RGB':
        converted[prepared.mode] += 1
      if result[0] == 'small':
        msg = f'short side below --image_size={args.image_size}'
        if args.small_images == 'fail':
          raise PrepareError(f'image {item.name}: {msg} (pass --small_images=upscale '
                             'or skip)')
        counts['skipped_small'] += 1
        skipped.append([item.name, msg])
        progress.skip(item.name, msg)
        continue
      counts['upscaled'] += int(prepared.upscaled)
      counts['images'] += 1
      batch.append((item, prepared, result[2]))
      if len(batch) == step:
        flush(batch)
        batch = []
    flush(batch)
  finally:
    writer.close()
  stats = {'shard': k, 'inputs': list(bounds), 'records': counts['records'],
           'counts': dict(counts), 'converted': dict(converted), 'skipped': skipped,
           'fields': [[f.name, f.dtype, list(f.shape)] for f in spec.fields]}
  _write_json(_stats_path(args.output, k), stats)
  os.replace(tmp, path)  # The shard exists only once complete.


class _Progress:
  """tqdm bar (images/s and ETA) on the main process; skipped files printed there."""

  def __init__(self, total: int, done: int, enabled: bool):
    self.bar = None
    self.shown = 0
    if enabled:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        self.bar = tqdm(total=total, initial=done, unit='img', smoothing=0.05,
                        dynamic_ncols=True, file=sys.stderr,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)
      except ImportError:
        self.bar = _LineProgress(total, done)

  def update(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def skip(self, name: str, why: str) -> None:
    self.update(1)
    self.shown += 1
    if self.bar is not None and self.shown <= 20:
      self.bar.write(f'skipped {name}: {why}')

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _LineProgress:
  """Fallback without tqdm: a line every 30 s with images/s and ETA."""

  def __init__(self, total: int, done: int):
    self.total, self.n, self.start_n = total, done, done
    self.start = self.last = time.perf_counter()

  def update(self, n: int) -> None:
    self.n += n
    now = time.perf_counter()
    if now - self.last >= 30 or self.n == self.total:
      rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
      eta = (self.total - self.n) / max(rate, 1e-9)
      print(f'{self.n}/{self.total} images, {rate:.1f} img/s, ETA {eta / 60:.1f} min',
            file=sys.stderr, flush=True)
      self.last = now

  def write(self, msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

  def close(self) -> None:
    pass


# ----------------------------------------------------------------------------------------
# The command.


def prepare(args: argparse.Namespace, process_index: int | None = None,
            process_count: int | None = None) -> dict[str, Any] | None:
  """Runs the preparation; returns the metadata on the process that writes it.

  process_index / process_count default to JAX's; tests pass them to run several
  "processes" one after the other on one machine (then there is no barrier, and the
  last one to run as process 0 writes the metadata).
  """
  from twinflow_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert import diffusers_vae  # pylint: disable=g-import-not-at-top

  simulated = process_index is not None
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if os.path.exists(args.output) and not os.path.isdir(args.output):
    raise PrepareError(f'--output {args.output} is a file; give a directory for the records')
  for flag in ('image_size', 'batch_size', 'shard_size', 'workers'):
    if getattr(args, flag) < 1:
      raise PrepareError(f'--{flag}={getattr(args, flag)} must be >= 1')

  inputs = _open_inputs(args)
  n = len(inputs)
  vae_config = diffusers_vae.vae_config_from_diffusers(
      diffusers_vae.read_vae_config(args.vae), dtype=args.vae_dtype)
  factor = vae_config.downsample_factor
  if args.image_size % factor:
    raise PrepareError(f'--image_size={args.image_size} is not a multiple of the VAE\'s '
                       f'downsampling factor {factor} ({args.vae})')
  side = args.image_size // factor
  latent_shape = (side, side, vae_config.latent_channels)
  shift, scale = vae_config.latent_normalization()
  channel_mean = channel_std = None
  if isinstance(shift, list):
    # Per-channel statistics (Qwen-Image; KL VAEs with latents_mean / latents_std):
    # records hold (z - mean) / std, and the config keeps a scalar scale (the KL VAE's
    # scaling_factor, 1 for Qwen-Image), so config.data needs no per-channel fields.
    channel_mean = np.asarray(vae_config.latents_mean, np.float32)
    channel_std = np.asarray(vae_config.latents_std, np.float32)
    shift = 0.0
    scale = float(getattr(vae_config, 'scaling_factor', 1.0))
  embed = _CaptionEmbeddings(args, n) if inputs.kind == 't2i' else None
  if inputs.kind != 't2i' and (args.caption_embeddings or args.text_encoder):
    raise PrepareError('--caption_embeddings / --text_encoder go with --jsonl')

  fingerprint = diffusers_vae.vae_fingerprint(args.vae)
  plan = {'input': inputs.description, 'num_inputs': n, 'shard_size': args.shard_size,
          'image_size': args.image_size, 'store': args.store,
          'seed': args.seed if args.store == 'sample' else None, 'hflip': args.hflip,
          'latent_dtype': args.latent_dtype, 'vae_dtype': args.vae_dtype,
          'vae': fingerprint, 'alpha': args.alpha, 'small_images': args.small_images,
          'text': embed.source if embed else None,
          'txt_dtype': args.txt_dtype if embed else None}
  os.makedirs(os.path.join(args.output, PROGRESS_DIR), exist_ok=True)
  _check_plan(args.output, plan)

  ranges = shard_ranges(n, args.shard_size)
  mine = shards_of_process(len(ranges), pi, pc)
  todo = [k for k in mine if not _shard_done(args.output, k, len(ranges))]
  total = sum(ranges[k][1] - ranges[k][0] for k in mine)
  done = total - sum(ranges[k][1] - ranges[k][0] for k in todo)

  spec = None
  if todo:
    vae = diffusers_vae.load_diffusers_vae(args.vae, dtype=args.vae_dtype)
    mesh = vae_lib.batch_mesh()
    div = vae_lib.batch_divisor(mesh)
    per_call = args.batch_size * (2 if args.hflip else 1)
    per_call += -per_call % (div * (2 if args.hflip else 1))
    encoder = _Encoder(vae_lib.make_encode_fn(vae, mesh), per_call, args.store, args.seed,
                       channel_mean, channel_std)
    if inputs.kind == 'latents':
      spec = records.latents_spec(latent_shape, args.latent_dtype)
    else:
      probe = embed(inputs.items[:1])
      spec = records.t2i_spec(latent_shape, probe['txt'].shape[1], probe['txt'].shape[2],
                              probe['pooled'].shape[1], args.latent_dtype, args.txt_dtype)
    progress = _Progress(total, done, enabled=pi == 0 and not args.quiet)
    try:
      with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        for k in todo:
          _write_shard(k, ranges[k], len(ranges), inputs, args, encoder, embed, spec,
                       pool, progress)
    finally:
      progress.close()

  if pc > 1 and not simulated:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('twinflow_jax.data.prepare: shards written')
  if pi != 0:
    return None
  return _finalize(args, inputs, ranges, latent_shape, shift, scale, channel_mean,
                   channel_std, vae_config, fingerprint, embed)


def _finalize(args, inputs, ranges, latent_shape, shift, scale, channel_mean, channel_std,
              vae_config, fingerprint, embed) -> dict[str, Any]:
  """Process 0: checks every shard is complete, sums counts, writes metadata.json."""
  missing = [k for k in range(len(ranges)) if not _shard_done(args.output, k, len(ranges))]
  if missing:
    raise PrepareError(f'{len(missing)} shard(s) of {args.output} are not complete '
                       f'(first: {shard_path(args.output, missing[0], len(ranges))}); '
                       'rerun the same command (on every process) to finish them')
  counts, converted, skipped = collections.Counter(), collections.Counter(), []
  fields = {}
  for k in range(len(ranges)):
    with open(_stats_path(args.output, k)) as f:
      stats = json.load(f)
    counts.update(stats['counts'])
    converted.update(stats['converted'])
    skipped.extend(stats['skipped'])
    fields = {name: shape for name, _, shape in stats['fields']}
  if counts['records'] == 0:
    raise PrepareError(f'no image of the input could be used ({len(skipped)} skipped, '
                       f'see {os.path.join(args.output, "skipped.txt")})')
  with open(os.path.join(args.output, 'skipped.txt'), 'w', encoding='utf-8') as f:
    f.writelines(f'{name}\t{why}\n' for name, why in skipped)
  if inputs.class_names:
    with open(os.path.join(args.output, 'classes.txt'), 'w', encoding='utf-8') as f:
      f.writelines(f'{c}\n' for c in inputs.class_names)
  metadata = {
      'format': latent_metadata.FORMAT,
      'kind': inputs.kind,
      'records': f'{RECORDS_PREFIX}-*-of-{len(ranges):05d}.array_record',
      'num_shards': len(ranges),
      'num_records': counts['records'],
      'latent_shape': list(latent_shape),
      'latent_dtype': args.latent_dtype,
      'latent_shift': shift,
      'latent_scale': scale,
      'stored': 'posterior_mean' if args.store == 'mean' else 'posterior_sample',
      'sample_seed': args.seed if args.store == 'sample' else None,
      'stored_normalization': None if channel_mean is None else {
          'mean': list(vae_config.latents_mean), 'std': list(vae_config.latents_std)},
      'hflip_records': args.hflip,
      'vae': {'path': os.path.abspath(args.vae), 'class': type(vae_config).__name__,
              'kind': vae_config.kind, 'latent_channels': vae_config.latent_channels,
              'downsample_factor': vae_config.downsample_factor,
              'compute_dtype': args.vae_dtype, **fingerprint},
      'preprocessing': {
          'image_size': args.image_size,
          'crop': 'adm_center_crop: BOX halving while short side >= 2 x size, BICUBIC '
                  'resize of the short side to size, central crop',
          'rgb': 'PIL convert("RGB")', 'alpha': args.alpha,
          'small_images': args.small_images, 'on_bad_image': args.on_bad_image,
          'pixel_range': '[-1, 1] = uint8 / 127.5 - 1'},
      'input': inputs.description,
      'counts': {'inputs': len(inputs), 'images': counts['images'],
                 'records': counts['records'],
                 'skipped_unreadable': counts['skipped_unreadable'],
                 'skipped_small': counts['skipped_small'],
                 'upscaled_small': counts['upscaled'],
                 'converted_to_rgb': dict(converted)},
  }
  if inputs.kind == 'latents':
    metadata['num_classes'] = inputs.num_classes
    metadata['classes_file'] = 'classes.txt' if inputs.class_names else None
  else:
    metadata.update(txt_len=fields['txt'][0], txt_dim=fields['txt'][1],
                    pooled_dim=fields['pooled'][0], txt_dtype=args.txt_dtype,
                    text=embed.source)
  metadata['config_data'] = latent_metadata.config_fields(metadata, args.output)
  latent_metadata.write_metadata(args.output, metadata)
  return metadata


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from twinflow_jax.models.convert import diffusers_vae  # pylint: disable=g-import-not-at-top
  try:
    if args.distributed != 'off':
      from twinflow_jax import main as main_lib  # pylint: disable=g-import-not-at-top
      main_lib.maybe_initialize_distributed(args.distributed)
    metadata = prepare(args)
  except (PrepareError, prep_inputs.InputError, diffusers_vae.VaeFolderError,
          FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if metadata is not None:
    c = metadata['counts']
    print(f'wrote {c["records"]} records of {c["images"]} images ({c["inputs"]} inputs: '
          f'{c["skipped_unreadable"]} unreadable and {c["skipped_small"]} small skipped, '
          f'{c["upscaled_small"]} upscaled, converted to RGB: {c["converted_to_rgb"]}) to '
          f'{args.output}')
    print('config.data fields to read them:')
    for k, v in metadata['config_data'].items():
      print(f'  config.data.{k} = {v!r}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
