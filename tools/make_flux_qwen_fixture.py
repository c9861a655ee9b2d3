r"""Writes tiny random Flux and Qwen-Image diffusers models + reference outputs.

Needs torch and diffusers (the tools venv), not the tests:
  /work/venv-tools/bin/python tools/make_flux_qwen_fixture.py [--out tests/fixtures]

Writes, each in diffusers' `save_pretrained` layout (config.json +
diffusion_pytorch_model*.safetensors, float32):
  flux_dev_tiny/       FluxTransformer2DModel, guidance_embeds=True,
                       2 double + 3 single blocks.
  flux_schnell_tiny/   guidance_embeds=False, 1 double + 1 single block.
  qwen_image_tiny/     QwenImageTransformer2DModel, 3 blocks, saved in two
                       shards with an index (the large-checkpoint layout).
Every weight is random and non-zero (`randomize` of make_pretrained_fixture.py:
q/k norm scales 1 + noise), so each one changes the output. The TwinFlow
target-time embedder is stored under `time_text_embed_2.timestep_embedder.*`
(official Qwen-Image key names; the same names for Flux), with random weights
of its own (not a copy), so a mix-up of the two embedders shows.

reference.npz in each folder (float32; x NHWC, as the twinflow_jax models):
  x [B, H, W, C], t [B], r [B], txt [B, L, D_txt], and
  flux:  pooled [B, P], guidance [B] (dev), txt_mask [B, L] (for the masked
         variant), out_base (diffusers at timestep t, r unused), out_twin
         (temb + temb_2(r) (t - r), the official wrapper formula inside the
         diffusers forward), out_masked (out_twin with the text mask as
         attention_mask, for use_txt_mask=True).
  qwen:  txt_mask [B, L] (sample 1 padded; padded rows hold large noise),
         out_base, out_twin (both with the mask as encoder_hidden_states_mask),
         out_base_unpadded_1 (sample 1 alone with only its real tokens, no
         mask: padding + mask must equal the unpadded text).
The diffusers forwards run in float64 (RoPE tables in float32, as diffusers
computes them).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import nn

from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.transformers.transformer_qwenimage import (
    QwenTimestepProjEmbeddings)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_pretrained_fixture import randomize  # noqa: E402  (shared with SD3)

FLUX_DEV = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2,
                num_single_layers=3, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24,
                pooled_projection_dim=12, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))
FLUX_SCHNELL = dict(FLUX_DEV, num_layers=1, num_single_layers=1,
                    guidance_embeds=False)
QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
            attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, guidance_embeds=False,
            axes_dims_rope=(4, 6, 6))
# Latent batch: odd token-grid height (5 x 6) so that the Qwen-Image RoPE
# centring and any H/W mix-up show.
B, C, H, W, L = 2, 4, 10, 12, 7
T = np.array([0.73, -0.41], np.float32)  # signed TwinFlow times
R = np.array([0.2, -0.9], np.float32)


class FluxTimeEmbed2(nn.Module):
  """TwinFlow r-embedder for Flux: Timesteps(256) + TimestepEmbedding."""

  def __init__(self, dim):
    super().__init__()
    self.time_proj = Timesteps(256, flip_sin_to_cos=True,
                               downscale_freq_shift=0)
    self.timestep_embedder = TimestepEmbedding(256, dim)

  def forward(self, r_net):
    return self.timestep_embedder(self.time_proj(r_net).to(r_net.dtype))


class TwinTime(nn.Module):
  """Stands in for `time_text_embed`: temb(t, ...) + temb_2(r) * (t - r).

  Flux: the model calls it with timestep = 1000 t; Qwen-Image with t (it
  scales by 1000 inside). `r_fn(r)` gives temb_2.
  """

  def __init__(self, base, r_fn, t, r):
    super().__init__()
    self.base, self.r_fn = base, r_fn
    self.t, self.r = t, r

  def forward(self, *args):
    temb = self.base(*args)
    return temb + self.r_fn(self.r) * (self.t - self.r)[:, None]


def nchw(x_nhwc):
  return torch.from_numpy(np.ascontiguousarray(
      x_nhwc.transpose(0, 3, 1, 2))).double()


def to_nhwc(x):
  return x.detach().float().numpy().transpose(0, 2, 3, 1)


def flux_forward(model, emb2, x, t, r, txt, pooled, guidance=None, mask=None):
  """diffusers Flux forward on NHWC numpy latents -> NHWC numpy output."""
  lat = nchw(x)
  b, c, h, w = lat.shape
  packed = FluxPipeline._pack_latents(lat, b, c, h, w)
  img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, 'cpu',
                                                   torch.float64)
  txt_ids = torch.zeros(txt.shape[1], 3, dtype=torch.float64)
  t_ = torch.from_numpy(t).double()
  kw = {}
  if guidance is not None:
    kw['guidance'] = torch.from_numpy(guidance).double()
  if mask is not None:
    full = np.concatenate([mask, np.ones((b, packed.shape[1]), bool)], 1)
    kw['joint_attention_kwargs'] = {
        'attention_mask': torch.from_numpy(full)[:, None, None, :]}
  base = model.time_text_embed
  if r is not None:
    r_ = torch.from_numpy(r).double()
    model.time_text_embed = TwinTime(base, lambda rr: emb2(1000 * rr), t_, r_)
  try:
    with torch.no_grad():
      out = model(hidden_states=packed,
                  encoder_hidden_states=torch.from_numpy(txt).double(),
                  pooled_projections=torch.from_numpy(pooled).double(),
                  timestep=t_, img_ids=img_ids, txt_ids=txt_ids,
                  return_dict=False, **kw)[0]
  finally:
    model.time_text_embed = base
  return to_nhwc(FluxPipeline._unpack_latents(out, h * 8, w * 8, 8))


def qwen_forward(model, emb2, x, t, r, txt, mask):
  """diffusers Qwen-Image forward on NHWC numpy latents -> NHWC numpy."""
  lat = nchw(x)
  b, c, h, w = lat.shape
  packed = QwenImagePipeline._pack_latents(lat, b, c, h, w)
  t_ = torch.from_numpy(t).double()
  base = model.time_text_embed
  if r is not None:
    r_ = torch.from_numpy(r).double()
    model.time_text_embed = TwinTime(base, lambda rr: emb2(rr, packed), t_,
                                     r_)
  try:
    with torch.no_grad():
      out = model(hidden_states=packed,
                  encoder_hidden_states=torch.from_numpy(txt).double(),
                  encoder_hidden_states_mask=(
                      None if mask is None else torch.from_numpy(mask)),
                  timestep=t_, img_shapes=[(1, h // 2, w // 2)] * b,
                  return_dict=False)[0]
  finally:
    model.time_text_embed = base
  out = QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]
  return to_nhwc(out)


def save(model, emb2, out_dir, **kw):
  """save_pretrained with the r-embedder as `time_text_embed_2`."""
  model.time_text_embed_2 = emb2
  model.float().save_pretrained(out_dir, safe_serialization=True, **kw)
  del model.time_text_embed_2
  model.double()


def make_flux(out_dir, cfg, seed):
  gen = torch.Generator().manual_seed(seed)
  model = FluxTransformer2DModel(**cfg)
  emb2 = FluxTimeEmbed2(model.inner_dim)
  randomize(model, gen)
  randomize(emb2, gen)
  model.double().eval()
  emb2.double()
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, H, W, C)).astype(np.float32)
  txt = rng.standard_normal((B, L, cfg['joint_attention_dim'])).astype(
      np.float32)
  pooled = rng.standard_normal((B, cfg['pooled_projection_dim'])).astype(
      np.float32)
  ref = dict(x=x, t=T, r=R, txt=txt, pooled=pooled)
  g = None
  if cfg['guidance_embeds']:
    g = ref['guidance'] = np.array([3.5, 1.7], np.float32)
  ref['out_base'] = flux_forward(model, emb2, x, T, None, txt, pooled, g)
  ref['out_twin'] = flux_forward(model, emb2, x, T, R, txt, pooled, g)
  mask = np.ones((B, L), bool)
  mask[1, 4:] = False
  ref['txt_mask'] = mask
  ref['out_masked'] = flux_forward(model, emb2, x, T, R, txt, pooled, g, mask)
  save(model, emb2, out_dir)
  return ref


def make_qwen(out_dir, cfg, seed):
  gen = torch.Generator().manual_seed(seed)
  model = QwenImageTransformer2DModel(**cfg)
  emb2 = QwenTimestepProjEmbeddings(embedding_dim=model.inner_dim)
  randomize(model, gen)
  randomize(emb2, gen)
  model.double().eval()
  emb2.double()
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, H, W, C)).astype(np.float32)
  txt = rng.standard_normal((B, L, cfg['joint_attention_dim'])).astype(
      np.float32)
  mask = np.ones((B, L), bool)
  mask[1, 4:] = False  # sample 1: 4 real tokens, 3 padding
  txt[1, 4:] = 50.0 * rng.standard_normal((L - 4, txt.shape[2]))
  ref = dict(x=x, t=T, r=R, txt=txt, txt_mask=mask)
  ref['out_base'] = qwen_forward(model, emb2, x, T, None, txt, mask)
  ref['out_twin'] = qwen_forward(model, emb2, x, T, R, txt, mask)
  ref['out_base_unpadded_1'] = qwen_forward(model, emb2, x[1:], T[1:], None,
                                            txt[1:, :4], None)
  save(model, emb2, out_dir, max_shard_size='300KB')
  return ref


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='tests/fixtures',
                      help='parent folder of the fixture folders')
  args = parser.parse_args()
  jobs = [('flux_dev_tiny', make_flux, FLUX_DEV, 1),
          ('flux_schnell_tiny', make_flux, FLUX_SCHNELL, 2),
          ('qwen_image_tiny', make_qwen, QWEN, 3)]
  for name, fn, cfg, seed in jobs:
    out_dir = os.path.join(args.out, name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # no stale shards
      os.remove(os.path.join(out_dir, f))
    ref = fn(out_dir, cfg, seed)
    for k in ('out_base', 'out_twin'):
      assert np.abs(ref[k]).mean() > 0.05, (name, k)
    assert np.abs(ref['out_twin'] - ref['out_base']).mean() > 1e-3, name
    np.savez(os.path.join(out_dir, 'reference.npz'), **ref)
    size = sum(os.path.getsize(os.path.join(out_dir, f))
               for f in os.listdir(out_dir))
    print(f'wrote {out_dir}: {sorted(os.listdir(out_dir))}, {size} bytes, '
          f"|out| {np.abs(ref['out_base']).mean():.3f}")
    with open(os.path.join(out_dir, 'config.json')) as f:
      print('  config:', json.load(f))


if __name__ == '__main__':
  main()
