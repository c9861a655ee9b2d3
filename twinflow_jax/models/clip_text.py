"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection).

Used by SD3 (OpenAI CLIP-L/14 and OpenCLIP bigG/14, both with the text projection) and
Flux (CLIP-L/14, pooled output without projection). Pre-LayerNorm transformer with
learnt absolute positions and a causal mask; the pooled vector is the final-normed hidden
state at the end-of-text token, found as transformers does: with the legacy config
`eos_token_id == 2` at the largest token id of the row (the EOS has the largest id in the
CLIP vocabularies), otherwise at the first occurrence of `eos_token_id`.

Weights come from a transformers folder through `models/convert/hf_text.py`.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from twinflow_jax.models.layers import Dense, normal_002
from twinflow_jax.models.text_layers import LayerNorm, activation, attention, causal_mask


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Sizes of a CLIP text tower (the fields of transformers' CLIPTextConfig).

  Attributes:
    vocab_size: token table rows.
    hidden_size: width D.
    intermediate_size: MLP hidden width.
    num_layers: transformer layers.
    num_heads: attention heads (D % num_heads == 0).
    max_positions: learnt positions (77 for the released models).
    hidden_act: 'quick_gelu' (OpenAI CLIP) or 'gelu' (OpenCLIP bigG).
    layer_norm_eps: LayerNorm epsilon.
    eos_token_id: config EOS id; 2 selects the legacy argmax pooling.
    projection_dim: width of `text_projection`, None for CLIPTextModel.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  max_positions: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2
  projection_dim: int | None = None

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'CLIP hidden_size {self.hidden_size} is not divisible by '
                       f'num_attention_heads {self.num_heads}')
    activation(self.hidden_act)  # validates the name


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with q/k/v/out biases, scale 1/sqrt(head_dim)."""

  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, n = cfg.hidden_size, cfg.num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.head_dim = d // n
    self.q = Dense(d, (n, d // n), ('embed', 'heads', 'kv'), **kw)
    self.k = Dense(d, (n, d // n), ('embed', 'heads', 'kv'), **kw)
    self.v = Dense(d, (n, d // n), ('embed', 'heads', 'kv'), **kw)
    self.out = Dense((n, d // n), d, ('heads', 'kv', 'embed'), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    o = attention(self.q(x), self.k(x), self.v(x), scale=self.head_dim**-0.5,
                  mask=mask)
    return self.out(o)


class CLIPLayer(nnx.Module):
  """x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = cfg.hidden_size
    self.act = activation(cfg.hidden_act)
    self.ln1 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.attn = CLIPAttention(cfg, **kw)
    self.ln2 = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.fc1 = Dense(d, cfg.intermediate_size, ('embed', 'mlp'), **kw)
    self.fc2 = Dense(cfg.intermediate_size, d, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x), mask)
    return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class CLIPTextEncoder(nnx.Module):
  """CLIP text transformer; `__call__(input_ids)` returns all it computes.

  Call: input_ids int [B, T] (T <= max_positions) -> dict
    hidden_states      tuple of num_layers + 1 arrays [B, T, D]: the embeddings, then
                       each layer's output (transformers' `hidden_states`; SD3 uses
                       hidden_states[-2], the penultimate layer)
    last_hidden_state  [B, T, D] final LayerNorm of the last layer
    pooler_output      [B, D] last_hidden_state at the EOS token
    text_embeds        [B, projection_dim] text_projection(pooler_output) (only with a
                       projection)
  Outputs are in the compute dtype; unused ones are dropped by jit.
  """

  def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.dtype = dtype
    d = cfg.hidden_size
    self.token_embedding = nnx.Param(
        normal_002(rngs.params(), (cfg.vocab_size, d), param_dtype),
        out_sharding=(None, 'embed'))
    self.position_embedding = nnx.Param(
        normal_002(rngs.params(), (cfg.max_positions, d), param_dtype),
        out_sharding=(None, 'embed'))
    self.layers = nnx.List([
        CLIPLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.text_projection = (
        Dense(d, cfg.projection_dim, ('embed', None), use_bias=False, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
        if cfg.projection_dim else None)

  def __call__(self, input_ids: jax.Array) -> dict:
    cfg = self.config
    b, t = input_ids.shape
    if t > cfg.max_positions:
      raise ValueError(f'CLIP takes at most {cfg.max_positions} tokens, got {t}')
    x = (jnp.take(self.token_embedding[...], input_ids, axis=0)
         + self.position_embedding[:t]).astype(self.dtype)
    mask = causal_mask(t)
    hidden = [x]
    for layer in self.layers:
      x = layer(x, mask)
      hidden.append(x)
    last = self.final_layer_norm(x)
    if cfg.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = last[jnp.arange(b), eos]
    out = {'hidden_states': tuple(hidden), 'last_hidden_state': last,
           'pooler_output': pooled}
    if self.text_projection is not None:
      out['text_embeds'] = self.text_projection(pooled)
    return out
