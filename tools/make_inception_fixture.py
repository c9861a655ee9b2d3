r"""Writes tests/fixtures/inception_ref.npz: pytorch-fid's FID Inception on random weights.

Needs torch, torchvision and pytorch-fid (only this script; the test reads the npz):
  /work/venv-tools/bin/python tools/make_inception_fixture.py [--out ...] [--seed 0]

The network is pytorch-fid's own `InceptionV3([3], use_fid_inception=True)` (its
`fid_inception_v3()`: torchvision's Inception3 with FIDInceptionA/C/E_1/E_2 and the
1008-way fc). The weight download is replaced by random weights made from `--seed` with
tools/fid_inception_random.py (plain numpy), so the fixture stores the seed and the
outputs only (~100 kB instead of ~95 MB); the test regenerates the same weights. The
forward runs in float64.

Saved arrays:
  seed, recipe         the weight recipe (tools/fid_inception_random.py)
  shapes_json          {torch state-dict name: shape} of pytorch-fid's network
  checksums            float64 sum of every weight tensor, sorted by name
  x_checksum           sum of the input images
  x_shape              [2, 139, 171, 3]: NHWC input in [-1, 1) (random_images(seed))
                       fed with resize_input=False, normalize_input=False; non-square so
                       that H/W mix-ups in the 1x7 / 7x1 kernels show, and large enough
                       (7b/7c run at 3 x 4) that the E blocks' pooling borders matter
  pool                 [2, 2048] pool_3 features
  logits               [2, 1008] fc(pool) (with bias)
  logits_unbiased      [2, 1008] pool @ fc.weight^T
  e2e_src              uint8 [2, 24, 20, 3] images
  e2e_pool             [2, 2048] pytorch-fid's full path on e2e_src / 255: bilinear
                       resize to 299 (align_corners=False), 2x - 1, network
  resize_up_src        uint8 [2, 11, 13, 3]; resize_up_out [2, 37, 29, 3]
  resize_down_src      uint8 [1, 40, 50, 3]; resize_down_out [1, 29, 37, 3]
                       F.interpolate(src / 255, bilinear, align_corners=False), the
                       resize of pytorch-fid's InceptionV3.forward, at small sizes
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as pfid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fid_inception_random as recipe  # noqa: E402  pylint: disable=g-import-not-at-top

_RANDOM = object()  # returned by the patched download; replaced by random weights


def build_random_fid_inception(seed: int):
  """pytorch-fid's InceptionV3 with random weights; returns (net, full model, sd)."""
  captured = {}
  original = torchvision.models.inception.Inception3.load_state_dict

  def load_random(self, state_dict, *args, **kwargs):
    if state_dict is not _RANDOM:
      return original(self, state_dict, *args, **kwargs)
    shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()
              if not k.endswith('num_batches_tracked')}
    sd = recipe.random_state_dict(shapes, seed)
    captured.update(model=self, sd=sd)
    full = {k: torch.from_numpy(v) for k, v in sd.items()}
    for k, v in self.state_dict().items():
      if k.endswith('num_batches_tracked'):
        full[k] = torch.zeros_like(v)
    return original(self, full, strict=True)

  pfid.load_state_dict_from_url = lambda *a, **k: _RANDOM
  torchvision.models.inception.Inception3.load_state_dict = load_random
  try:
    net = pfid.InceptionV3([3], resize_input=False, normalize_input=False,
                           use_fid_inception=True)
    e2e = pfid.InceptionV3([3], resize_input=True, normalize_input=True,
                           use_fid_inception=True)
  finally:
    torchvision.models.inception.Inception3.load_state_dict = original
  return net.double().eval(), e2e.double().eval(), captured['model'].double().eval(), \
      captured['sd']


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).double()


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'tests', 'fixtures', 'inception_ref.npz'))
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args()
  torch.set_num_threads(2)

  net, e2e, full, sd = build_random_fid_inception(args.seed)
  x = recipe.random_images(args.seed, (2, 139, 171, 3))
  with torch.no_grad():
    pool = net(nchw(x))[0].flatten(1)
    w, b = full.fc.weight, full.fc.bias
    logits_unbiased = pool @ w.T
    logits = logits_unbiased + b

  rng = np.random.default_rng(args.seed)
  e2e_src = rng.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
  with torch.no_grad():
    e2e_pool = e2e(nchw(e2e_src) / 255.0)[0].flatten(1)
  resize = {}
  for name, shape, size in (('up', (2, 11, 13, 3), (37, 29)),
                            ('down', (1, 40, 50, 3), (29, 37))):
    src = rng.integers(0, 256, shape, dtype=np.uint8)
    out = F.interpolate(nchw(src) / 255.0, size=size, mode='bilinear',
                        align_corners=False)
    resize[f'resize_{name}_src'] = src
    resize[f'resize_{name}_out'] = nhwc(out).astype(np.float32)

  f32 = lambda t: t.detach().numpy().astype(np.float32)
  out = dict(
      seed=np.int64(args.seed), recipe=np.array(recipe.RECIPE),
      shapes_json=np.array(json.dumps({k: list(v.shape) for k, v in sorted(sd.items())})),
      checksums=recipe.checksums(sd), x_checksum=np.sum(x, dtype=np.float64),
      x_shape=np.array(x.shape), pool=f32(pool), logits=f32(logits),
      logits_unbiased=f32(logits_unbiased), e2e_src=e2e_src, e2e_pool=f32(e2e_pool),
      **resize)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(f'wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} kB): '
        f'{len(sd)} weight tensors from seed {args.seed}; pool mean {pool.mean():.4f} '
        f'std {pool.std():.4f}, logits std {logits.std():.4f}, e2e pool std '
        f'{e2e_pool.std():.4f}')


if __name__ == '__main__':
  main()
