"""A small MLP with twin-time conditioning, for toy 2-D data and vectors.

`F(x_t, t, r, cond)` follows the TwinFlow convention: signed current time `t`, signed target
time `r`, both [B]. As in the transformers, the target time enters through a second embedder
whose output is scaled by `(t - r)`, so it contributes nothing when `r == t`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.embeddings import timestep_embedding


class MLP(nnx.Module):
  """Twin-time conditioned MLP: x [B, D] -> F [B, D].

  Attributes:
    data_dim: D.
    hidden: width of the hidden layers.
    depth: number of hidden layers (>= 1).
    num_classes: number of real classes; the embedding has one more row for the null class
      (id `num_classes`). 0 makes the model unconditional (cond is ignored).
  """

  def __init__(self, data_dim: int, *, hidden: int = 256, depth: int = 3,
               num_classes: int = 0, time_dim: int = 64, rngs: nnx.Rngs):
    if depth < 1:
      raise ValueError(f"depth must be >= 1, got {depth}")
    if time_dim % 2:
      raise ValueError(f"time_dim must be even, got {time_dim}")
    self.data_dim, self.num_classes, self.time_dim = data_dim, num_classes, time_dim
    self.t_embed = nnx.Linear(time_dim, hidden, rngs=rngs)
    self.r_embed = nnx.Linear(time_dim, hidden, rngs=rngs)
    self.class_embed = (nnx.Embed(num_classes + 1, hidden, rngs=rngs)
                        if num_classes > 0 else None)
    self.x_in = nnx.Linear(data_dim, hidden, rngs=rngs)
    self.hidden = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(depth)])
    self.out = nnx.Linear(hidden, data_dim, rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, r: jax.Array, cond=None) -> jax.Array:
    """Average velocity F(x_t, t, r, cond), same shape as x_t ([B, D])."""
    if x_t.ndim != 2 or x_t.shape[-1] != self.data_dim:
      raise ValueError(f"MLP expects x_t of shape [B, {self.data_dim}], got {x_t.shape}")
    # Same sinusoids as the transformers (time scaled by 1000).
    emb = self.t_embed(timestep_embedding(1000.0 * t, self.time_dim))
    emb = emb + (t - r)[:, None] * self.r_embed(timestep_embedding(1000.0 * r, self.time_dim))
    if self.class_embed is not None:
      emb = emb + self.class_embed(cond)
    h = self.x_in(x_t) + emb
    for layer in self.hidden:
      h = layer(jax.nn.silu(h)) + emb
    return self.out(jax.nn.silu(h))
