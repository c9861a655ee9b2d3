"""SD3-style multimodal DiT (MMDiT) with TwinFlow twin-time conditioning.

Image tokens and text tokens keep separate weights (adaLN, q/k/v, output
projection, MLP) and meet in one joint attention over [image | text] tokens.
Modulation comes from the twin-time embedding plus a projection of the pooled
text vector. Text conditions are precomputed embeddings:
  cond = {'txt': [B, L, txt_dim] float, 'txt_mask': [B, L] bool (True = real
          token; optional, default all real), 'pooled': [B, pooled_dim] float}.
As in SD3, the last block is "context pre-only": text tokens only provide keys
and values there, so its text MLP and output projection do not exist.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.attention import dot_product_attention
from twinflow_jax.models.configs import MMDiTConfig
from twinflow_jax.models.dit import TOKENS, FinalLayer
from twinflow_jax.models.embeddings import (TIME_CONVENTIONS,
                                            TwinTimeEmbedder, patchify,
                                            sincos_2d_pos_embed, unpatchify)
from twinflow_jax.models.layers import (Dense, FeedForward, Modulation,
                                        QKVProjection, check_text_cond, gated,
                                        modulated_layer_norm)
from twinflow_jax.models.sharding import constrain


class MMDiTBlock(nnx.Module):
  """Joint-attention block over image tokens [B, Ti, D] and text [B, Tt, D]."""

  def __init__(self, cfg: MMDiTConfig, *, context_pre_only: bool,
               rngs: nnx.Rngs):
    d, n = cfg.hidden_size, cfg.num_heads
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              rngs=rngs)
    self.attention = cfg.attention
    self.context_pre_only = context_pre_only
    self.img_modulation = Modulation(d, 6, **kw)
    self.img_qkv = QKVProjection(d, n, qk_norm=cfg.qk_norm, **kw)
    self.img_attn_out = Dense((n, d // n), d, ('heads', 'kv', 'embed'), **kw)
    self.img_mlp = FeedForward(d, cfg.mlp_dim, **kw)
    self.txt_modulation = Modulation(d, 2 if context_pre_only else 6, **kw)
    self.txt_qkv = QKVProjection(d, n, qk_norm=cfg.qk_norm, **kw)
    if context_pre_only:
      self.txt_attn_out = self.txt_mlp = None
    else:
      self.txt_attn_out = Dense((n, d // n), d, ('heads', 'kv', 'embed'),
                                **kw)
      self.txt_mlp = FeedForward(d, cfg.mlp_dim, **kw)

  def __call__(self, img: jax.Array, txt: jax.Array, c: jax.Array,
               key_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """img [B, Ti, D], txt [B, Tt, D], c [B, D], key_mask [B, Ti + Tt] ->
    (img, txt); txt is returned unchanged by a context-pre-only block."""
    ti = img.shape[1]
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = (
        self.img_modulation(c))
    t_mod = self.txt_modulation(c)
    qi, ki, vi = self.img_qkv(modulated_layer_norm(img, i_shift1, i_scale1))
    qt, kt, vt = self.txt_qkv(modulated_layer_norm(txt, t_mod[0], t_mod[1]))
    k = jnp.concatenate([ki, kt], axis=1)
    v = jnp.concatenate([vi, vt], axis=1)
    # Text queries are only needed when text tokens are updated.
    q = qi if self.context_pre_only else jnp.concatenate([qi, qt], axis=1)
    o = dot_product_attention(q, k, v, key_mask, impl=self.attention)
    attn_img = constrain(self.img_attn_out(o[:, :ti]), TOKENS)
    img = constrain(img + gated(i_gate1, attn_img), TOKENS)
    img = img + gated(i_gate2, self.img_mlp(
        modulated_layer_norm(img, i_shift2, i_scale2)))
    img = constrain(img, TOKENS)
    if self.context_pre_only:
      return img, txt
    _, _, t_gate1, t_shift2, t_scale2, t_gate2 = t_mod
    attn_txt = constrain(self.txt_attn_out(o[:, ti:]), TOKENS)
    txt = txt + gated(t_gate1, attn_txt)
    txt = txt + gated(t_gate2, self.txt_mlp(
        modulated_layer_norm(txt, t_shift2, t_scale2)))
    return img, constrain(txt, TOKENS)


class MMDiT(nnx.Module):
  """MMDiT called as `F = model(x_t, t, r, cond)` (cond: see module doc).

  x_t: [B, H, W, C]; t, r: [B] signed TwinFlow times. Returns F
  [B, H, W, C] float32.
  """

  def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              rngs=rngs)
    self.x_embedder = Dense(p * p * cfg.in_channels, d, ('patch', 'embed'),
                            **kw)
    self.context_embedder = Dense(cfg.txt_dim, d, ('txt_embed', 'embed'), **kw)
    self.time_embedder = TwinTimeEmbedder(
        d, time_convention=cfg.time_convention, r_init=cfg.r_embedder_init,
        freq_dim=cfg.freq_dim, **kw)
    self.pooled_fc1 = Dense(cfg.pooled_dim, d, ('pooled', 'embed'), **kw)
    self.pooled_fc2 = Dense(d, d, ('mlp', 'embed'), **kw)
    self.blocks = nnx.List([
        MMDiTBlock(cfg, context_pre_only=i == cfg.depth - 1, rngs=rngs)
        for i in range(cfg.depth)])
    self.final_layer = FinalLayer(d, p * p * cfg.in_channels, **kw)

  def _check(self, x, t, r, cond) -> None:
    cfg = self.config
    b, p = x.shape[0], cfg.patch_size
    if (x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % p
        or x.shape[2] % p):
      raise ValueError(
          f'MMDiT expects x_t [B, H, W, {cfg.in_channels}] with H, W '
          f'divisible by {p}; got {x.shape}')
    if jnp.shape(t) != (b,) or jnp.shape(r) != (b,):
      raise ValueError(f'MMDiT expects t, r of shape [{b}]; got '
                       f'{jnp.shape(t)}, {jnp.shape(r)}')
    if not isinstance(cond, Mapping) or not {'txt', 'pooled'} <= set(cond):
      raise ValueError("MMDiT cond must be a dict with 'txt' [B, L, D_txt], "
                       "'pooled' [B, P] and optionally 'txt_mask' [B, L]")
    check_text_cond(cond, b, cfg.txt_dim)
    pooled = cond['pooled']
    if pooled.shape != (b, cfg.pooled_dim):
      raise ValueError(f"cond['pooled'] must be [{b}, {cfg.pooled_dim}], got "
                       f'{pooled.shape}')

  def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array,
               cond: Mapping[str, jax.Array]) -> jax.Array:
    """F(x_t, t, r, cond) -> [B, H, W, C] float32 (see class doc)."""
    self._check(x_t, t, r, cond)
    cfg = self.config
    dt, p = cfg.compute_dtype, cfg.patch_size
    b, gh, gw = x_t.shape[0], x_t.shape[1] // p, x_t.shape[2] // p
    pooled = self.pooled_fc2(jax.nn.silu(self.pooled_fc1(cond['pooled'])))
    c = constrain((self.time_embedder(t, r) + pooled).astype(dt),
                  ('activation_batch', 'activation_embed'))
    pos = jnp.asarray(sincos_2d_pos_embed(cfg.hidden_size, gh, gw), dt)
    img = constrain(self.x_embedder(patchify(x_t.astype(dt), p)) + pos[None],
                    TOKENS)
    txt = constrain(self.context_embedder(cond['txt']), TOKENS)
    txt_mask = cond.get('txt_mask')
    if txt_mask is None:
      txt_mask = jnp.ones(txt.shape[:2], bool)
    key_mask = jnp.concatenate(
        [jnp.ones((b, gh * gw), bool), jnp.asarray(txt_mask, bool)], axis=1)

    def call(block, img, txt, c, key_mask):
      return block(img, txt, c, key_mask)

    if cfg.remat_policy is not None:
      call = nnx.remat(call, policy=cfg.remat_policy, prevent_cse=True)
    for block in self.blocks:
      img, txt = call(block, img, txt, c, key_mask)
    out = unpatchify(self.final_layer(img, c), gh, gw, p, cfg.in_channels)
    sign = TIME_CONVENTIONS[cfg.time_convention].out_sign
    return sign * out.astype(jnp.float32)
