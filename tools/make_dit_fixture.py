r"""Writes tests/fixtures/dit_sit_ref.npz: a tiny reference DiT/SiT forward.

Needs PyTorch (only this script; the tests read the npz):
  pip install torch==2.13.0
  python tools/make_dit_fixture.py [--out tests/fixtures/dit_sit_ref.npz]

The network below re-states the architecture of `facebookresearch/DiT` and
`willisma/SiT` `models.py` (timm PatchEmbed / Attention / Mlp inlined), with
the same state-dict names, so the saved state dict is what those repositories
would produce. Weights are random (the adaLN-Zero and output layers too, so
the output is not trivially zero); the forward runs in float64.

Saved arrays:
  sd/<name>   float32 state dict (incl. the pos_embed buffer), learn_sigma=True
  x           [B, C, H, W] input (NCHW, as the reference)
  t_sit       [B] SiT times (t_sit = 1 data, 0 noise)
  y           [B] labels (the last one is the null class)
  raw         [B, 2C, H, W] reference output (velocity half + sigma half)
  t_twinflow  [B] = 1 - t_sit
  f_twinflow  [B, H, W, C] = -raw[:, :C] in NHWC: TwinFlow's F at t_twinflow
  config      JSON of the small config
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
              depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10,
              learn_sigma=True)


def sincos_pos_embed(dim, grid):
  """MAE/DiT get_2d_sincos_pos_embed: first half encodes w, second h."""

  def one_d(d, pos):
    omega = 1.0 / 10000**(np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32),
                           np.arange(grid, dtype=np.float32)), 0)
  return np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], 1)


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):

  def __init__(self, p, c, d):
    super().__init__()
    self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p, bias=True)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)  # [N, T, D], row-major


class TimestepEmbedder(nn.Module):

  def __init__(self, d, freq=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(freq, d), nn.SiLU(), nn.Linear(d, d))
    self.freq = freq

  def forward(self, t):
    half = self.freq // 2
    freqs = torch.exp(-math.log(10000) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(d, 3 * d, bias=True)
    self.proj = nn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)
    return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, d, hidden):
    super().__init__()
    self.fc1 = nn.Linear(d, hidden)
    self.act = nn.GELU(approximate='tanh')
    self.fc2 = nn.Linear(hidden, d)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, d, heads, mlp_ratio):
    super().__init__()
    self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(d, heads)
    self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(d, int(d * mlp_ratio))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

  def forward(self, x, c):
    s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
    return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):

  def __init__(self, d, p, c_out):
    super().__init__()
    self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(d, p * p * c_out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):

  def __init__(self, input_size, patch_size, in_channels, hidden_size, depth,
               num_heads, mlp_ratio, num_classes, learn_sigma):
    super().__init__()
    self.p, self.c_out = patch_size, in_channels * (2 if learn_sigma else 1)
    self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = nn.Module()
    self.y_embedder.embedding_table = nn.Embedding(num_classes + 1,
                                                   hidden_size)
    grid = input_size // patch_size
    self.pos_embed = nn.Parameter(
        torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float()[None],
        requires_grad=False)
    self.blocks = nn.ModuleList(
        [Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.c_out)

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed
    c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
    for block in self.blocks:
      x = block(x, c)
    x = self.final_layer(x, c)
    n, t_len, p, c_out = x.shape[0], x.shape[1], self.p, self.c_out
    h = int(t_len**0.5)
    x = x.reshape(n, h, h, p, p, c_out)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(n, c_out, h * p, h * p)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default=os.path.join(
      os.path.dirname(__file__), '..', 'tests', 'fixtures', 'dit_sit_ref.npz'))
  ap.add_argument('--seed', type=int, default=0)
  args = ap.parse_args()

  torch.manual_seed(args.seed)
  model = DiT(**CONFIG)
  with torch.no_grad():
    for name, prm in model.named_parameters():
      if name == 'pos_embed':
        continue
      # Random everywhere (no zero-init) so every weight matters.
      fan_in = prm.shape[-1] if prm.ndim > 1 else 1
      std = 0.02 if 'embedding_table' in name else (
          0.3 / math.sqrt(fan_in) if prm.ndim > 1 else 0.05)
      if 'x_embedder' in name and prm.ndim == 4:
        std = 1.0 / math.sqrt(prm[0].numel())
      prm.normal_(0.0, std)
  sd = {k: v.detach().float().numpy().copy()
        for k, v in model.state_dict().items()}

  b, c, s = 4, CONFIG['in_channels'], CONFIG['input_size']
  gen = torch.Generator().manual_seed(args.seed + 1)
  x = torch.randn(b, c, s, s, generator=gen, dtype=torch.float32)
  t_sit = torch.tensor([0.0, 0.25, 0.8, 1.0], dtype=torch.float32)
  y = torch.tensor([0, 3, 9, CONFIG['num_classes']], dtype=torch.int64)
  model = model.double().eval()
  with torch.no_grad():
    raw = model(x.double(), t_sit.double(), y).numpy()

  f_tw = -raw[:, :c].transpose(0, 2, 3, 1)
  out = {f'sd/{k}': v for k, v in sd.items()}
  out.update(x=x.numpy(), t_sit=t_sit.numpy(), y=y.numpy().astype(np.int32),
             raw=raw.astype(np.float32),
             t_twinflow=(1.0 - t_sit.double()).numpy().astype(np.float32),
             f_twinflow=f_tw.astype(np.float32),
             config=np.array(json.dumps(CONFIG)))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes), '
        f'|raw| max {np.abs(raw).max():.3f}')


if __name__ == '__main__':
  main()
