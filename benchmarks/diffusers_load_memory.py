r"""Peak host memory of loading (and exporting) a diffusers checkpoint, measured.

Writes a synthetic SD3 checkpoint with random bfloat16 weights (default: width 1536,
10 blocks, ~0.85B parameters, ~1.7 GB, split into 4 shards with an index), then in a
fresh process loads it with `convert.diffusers.load_model` onto a mesh of CPU devices and
exports it again, sampling /proc/self/status every 20 ms:

  python benchmarks/diffusers_load_memory.py [--dir /tmp/sd3_mem] [--layers 10] \
      [--param-dtype bfloat16] [--devices 8] [--mesh 1,8,1]

Reported (MiB): the checkpoint size; the model's own bytes; for each phase the peak of
anonymous memory (RssAnon: what the process itself allocated) above the baseline before
the phase, and the peak of file-backed memory (RssFile: safetensors' memory maps, page
cache that the kernel can drop). On CPU the "devices" live in host memory, so the loaded
model itself is part of the anonymous peak; the loader's own overhead is the rest.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def _status() -> dict[str, int]:
  out = {}
  with open('/proc/self/status') as f:
    for line in f:
      key, _, value = line.partition(':')
      if key in ('VmRSS', 'RssAnon', 'RssFile'):
        out[key] = int(value.split()[0]) * 1024
  return out


class Sampler:
  """Peak of /proc/self/status fields while active."""

  def __init__(self, period: float = 0.02):
    self.period, self.peak, self._stop = period, {}, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      for k, v in _status().items():
        self.peak[k] = max(self.peak.get(k, 0), v)
      time.sleep(self.period)

  def __enter__(self):
    self.base = _status()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    for k, v in _status().items():
      self.peak[k] = max(self.peak.get(k, 0), v)


def model_config(layers: int) -> dict:
  return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
              attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
              caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
              pos_embed_max_size=192, dual_attention_layers=[], qk_norm='rms_norm')


def write_checkpoint(folder: str, layers: int) -> int:
  """Random bf16 SD3 checkpoint written tensor by tensor; returns its bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models import sd3  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert import diffusers_sd3  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert.safetensors_io import (  # pylint: disable=g-import-not-at-top
      TensorOut, write_safetensors_folder)
  from twinflow_jax.models.param_tree import flatten  # pylint: disable=g-import-not-at-top
  cfg = sd3.resolve_sd3_config(dict(model_config(layers), name='sd3', r_embedder=False))
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: sd3.SD3Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  items = []
  for path, a in flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items():
    key, tr = diffusers_sd3.param_key(cfg, path)
    shape = tr.source_shape(tuple(a.shape))
    items.append(TensorOut(key, shape, np.dtype(ml_dtypes.bfloat16), lambda s=shape: (
        0.02 * rng.standard_normal(s, dtype=np.float32)).astype(ml_dtypes.bfloat16)))
  buf = diffusers_sd3.buffers(cfg)['pos_embed.pos_embed']
  bf16 = np.dtype(ml_dtypes.bfloat16)
  items.append(TensorOut('pos_embed.pos_embed', buf.shape, bf16, lambda: (
      c.astype(bf16) for c in buf.chunks())))
  total = sum(t.nbytes for t in items)
  write_safetensors_folder(folder, items, max_shard_bytes=total // 4 + 1)
  dcfg = dict(model_config(layers), _class_name='SD3Transformer2DModel')
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(dcfg, f)
  del jax
  return total


def measure(folder: str, param_dtype: str, mesh_shape: tuple[int, int, int]) -> dict:
  """Runs in a fresh process: load, then export, each under a memory sampler."""
  import jax  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models import MESH_AXES  # pylint: disable=g-import-not-at-top
  from twinflow_jax.models.convert import diffusers as dlib  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh(mesh_shape, MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  out = {'param_dtype': param_dtype, 'mesh': list(mesh_shape)}
  t0 = time.time()
  with Sampler() as s:
    model = dlib.load_model(folder, {'param_dtype': param_dtype, 'r_embedder': False},
                            mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(model))
  out['load_s'] = round(time.time() - t0, 1)
  out['model_bytes'] = dlib.num_bytes(model)
  out['load_anon_peak_above_base'] = s.peak['RssAnon'] - s.base['RssAnon']
  out['load_file_peak'] = s.peak['RssFile']
  out['load_rss_peak_above_base'] = s.peak['VmRSS'] - s.base['VmRSS']
  export_dir = folder.rstrip('/') + '_export'
  t0 = time.time()
  with Sampler() as s:
    dlib.export(model, export_dir)
  out['export_s'] = round(time.time() - t0, 1)
  out['export_anon_peak_above_base'] = s.peak['RssAnon'] - s.base['RssAnon']
  out['export_rss_peak_above_base'] = s.peak['VmRSS'] - s.base['VmRSS']
  largest = max(a.nbytes for a in jax.tree.leaves(model))
  out['largest_param_bytes'] = largest
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dir', default='/tmp/sd3_mem_bench')
  p.add_argument('--layers', type=int, default=10)
  p.add_argument('--param-dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  p.add_argument('--mesh', default='1,8,1', help='data,fsdp,tensor')
  p.add_argument('--measure', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args()
  mesh_shape = tuple(int(v) for v in args.mesh.split(','))
  if args.measure:
    print(json.dumps(measure(args.dir, args.param_dtype, mesh_shape)))
    return 0
  if not os.path.isdir(args.dir):
    t0 = time.time()
    total = write_checkpoint(args.dir, args.layers)
    print(f'wrote {args.dir}: {total / 2**20:.0f} MiB in {time.time() - t0:.0f} s',
          flush=True)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices}')
  cmd = [sys.executable, __file__, '--measure', '--dir', args.dir, '--param-dtype',
         args.param_dtype, '--mesh', args.mesh]
  res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if res.returncode:
    print(res.stdout, res.stderr, file=sys.stderr)
    return res.returncode
  data = json.loads(res.stdout.strip().splitlines()[-1])
  size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir))
  data['checkpoint_bytes'] = size
  mib = {k: (round(v / 2**20) if k.endswith('bytes') or 'peak' in k else v)
         for k, v in data.items()}
  print(json.dumps(mib, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
