"""Class-conditional DiT (Peebles & Xie) with TwinFlow twin-time conditioning.

Same layers as `facebookresearch/DiT` and `willisma/SiT` (patch embedding,
fixed 2-D sin-cos positions, adaLN-Zero blocks, final adaLN layer, label table
with a null class), so their checkpoints load one-to-one (`convert/sit.py`).
Images are NHWC. The time embedding is the twin-time one of `embeddings.py`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.attention import dot_product_attention
from twinflow_jax.models.configs import DiTConfig
from twinflow_jax.models.embeddings import (LabelEmbedder, TIME_CONVENTIONS,
                                            TwinTimeEmbedder, patchify,
                                            sincos_2d_pos_embed, unpatchify)
from twinflow_jax.models.layers import (Dense, FeedForward, Modulation,
                                        QKVProjection, gated, modulated_layer_norm,
                                        residual_grad_boundary, zeros)
from twinflow_jax.models.sharding import constrain

TOKENS = ('activation_batch', 'activation_length', 'activation_embed')


def apply_blocks(blocks, policy, x, *args, scan: bool = False):
  """Runs `x = block(x, *args)` over blocks, each rematerialised by policy.

  With `scan`, the blocks (all of one structure) run as one `lax.scan` over
  their weights stacked on a leading axis; same function, one block to compile.
  """
  if not scan:
    def call(block, x, *args):
      return block(x, *args)

    if policy is not None:
      call = nnx.remat(call, policy=policy, prevent_cse=True)
    for block in blocks:
      x = call(block, residual_grad_boundary(x), *args)
    return x

  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                         *(nnx.state(b) for b in blocks))

  def body(x, state):
    return nnx.merge(graphdef, state)(residual_grad_boundary(x), *args), None

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  x, _ = jax.lax.scan(body, x, stacked)
  return x


class DiTBlock(nnx.Module):
  """adaLN-Zero transformer block on image tokens [B, T, D]."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, n = cfg.hidden_size, cfg.num_heads
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              rngs=rngs)
    self.attention = cfg.attention
    self.modulation = Modulation(d, 6, **kw)
    self.qkv = QKVProjection(d, n, qk_norm=False, **kw)
    self.attn_out = Dense((n, d // n), d, ('heads', 'kv', 'embed'), **kw)
    self.mlp = FeedForward(d, cfg.mlp_dim, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x [B, T, D], c [B, D] -> [B, T, D]."""
    shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
    q, k, v = self.qkv(modulated_layer_norm(x, shift1, scale1))
    o = dot_product_attention(q, k, v, impl=self.attention)
    x = constrain(x + gated(gate1, constrain(self.attn_out(o), TOKENS)),
                  TOKENS)
    x = x + gated(gate2, self.mlp(modulated_layer_norm(x, shift2, scale2)))
    return constrain(x, TOKENS)


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) + zero-initialised linear to p*p*out channels."""

  def __init__(self, dim: int, out_dim: int, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.modulation = Modulation(dim, 2, **kw)
    self.linear = Dense(dim, out_dim, ('embed', 'patch'), kernel_init=zeros,
                        **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """x [B, T, D], c [B, D] -> [B, T, out_dim]."""
    shift, scale = self.modulation(c)
    return self.linear(modulated_layer_norm(x, shift, scale))


class DiT(nnx.Module):
  """DiT called as `F = model(x_t, t, r, labels)`.

  x_t: [B, H, W, C] float; t, r: [B] signed TwinFlow times (t = 1 noise,
  t = 0 data, t < 0 fake trajectory); labels: int [B] in [0, num_classes]
  (num_classes = null class). Returns F [B, H, W, C] float32.
  """

  def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
    cfg = config
    self.config = cfg
    d, p = cfg.hidden_size, cfg.patch_size
    self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
              rngs=rngs)
    # Default xavier over the flattened patch, as DiT's conv initialisation.
    self.x_embedder = Dense(p * p * cfg.in_channels, d, ('patch', 'embed'),
                            **kw)
    self.time_embedder = TwinTimeEmbedder(
        d, time_convention=cfg.time_convention, r_init=cfg.r_embedder_init,
        freq_dim=cfg.freq_dim, **kw)
    self.y_embedder = LabelEmbedder(cfg.num_classes, d, **kw)
    self.blocks = nnx.List([DiTBlock(cfg, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.final_layer = FinalLayer(d, p * p * self.out_channels, **kw)

  def _check_x(self, x: jax.Array) -> None:
    cfg = self.config
    p = cfg.patch_size
    if (x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % p
        or x.shape[2] % p):
      raise ValueError(
          f'DiT expects x_t [B, H, W, {cfg.in_channels}] with H, W divisible '
          f'by {p}; got {x.shape}')

  def backbone(self, x: jax.Array, c: jax.Array) -> jax.Array:
    """Network body: x [B, H, W, C] and conditioning c [B, D] ->
    raw output [B, H, W, out_channels] float32 (no time mapping)."""
    self._check_x(x)
    cfg = self.config
    p = cfg.patch_size
    gh, gw = x.shape[1] // p, x.shape[2] // p
    pos = jnp.asarray(sincos_2d_pos_embed(cfg.hidden_size, gh, gw),
                      cfg.compute_dtype)
    h = self.x_embedder(patchify(x.astype(cfg.compute_dtype), p)) + pos[None]
    h = constrain(h, TOKENS)
    c = constrain(c.astype(cfg.compute_dtype),
                  ('activation_batch', 'activation_embed'))
    h = apply_blocks(self.blocks, cfg.remat_policy, h, c,
                     scan=cfg.scan_blocks)
    out = self.final_layer(h, c)
    return unpatchify(out, gh, gw, p, self.out_channels).astype(jnp.float32)

  def network_forward(self, x: jax.Array, t_net: jax.Array,
                      labels: jax.Array) -> jax.Array:
    """The reference DiT/SiT forward in the network's own time.

    Args:
      x: [B, H, W, C].
      t_net: [B] network time (SiT: t_sit; TwinFlow convention: 1000 t).
      labels: int [B].

    Returns:
      Raw output [B, H, W, out_channels] float32 (incl. the sigma half when
      learn_sigma); the r-embedder is not used.
    """
    c = self.time_embedder.t_embedder(t_net) + self.y_embedder(labels)
    return self.backbone(x, c)

  def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array,
               cond: jax.Array) -> jax.Array:
    """F(x_t, t, r, labels) -> [B, H, W, C] float32 (see class doc)."""
    self._check_x(x_t)
    b = x_t.shape[0]
    if jnp.shape(t) != (b,) or jnp.shape(r) != (b,) or jnp.shape(cond) != (b,):
      raise ValueError(f'DiT expects t, r, labels of shape [{b}]; got '
                       f'{jnp.shape(t)}, {jnp.shape(r)}, {jnp.shape(cond)}')
    c = self.time_embedder(t, r) + self.y_embedder(cond)
    out = self.backbone(x_t, c)[..., :self.config.in_channels]
    return TIME_CONVENTIONS[self.config.time_convention].out_sign * out


def drop_labels(labels: jax.Array, key: jax.Array, prob: float,
                num_classes: int) -> jax.Array:
  """Label dropout: replaces each label by the null id with probability prob.

  Args:
    labels: int [B].
    key: PRNG key.
    prob: dropout probability in [0, 1].
    num_classes: the null class id.

  Returns:
    int [B].
  """
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f'label dropout prob must be in [0, 1], got {prob}')
  drop = jax.random.uniform(key, labels.shape) < prob
  return jnp.where(drop, num_classes, labels)
