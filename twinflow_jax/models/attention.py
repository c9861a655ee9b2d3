"""The one attention entry point of the models.

All models call `dot_product_attention`; the implementation is picked by name,
so a TPU kernel (e.g. splash attention) can be slotted in later with
`register_attention('splash', fn)` without touching the model code.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# fn(q [B,T,N,H], k [B,S,N,H], v [B,S,N,H], key_mask [B,S] bool | None)
#   -> [B,T,N,H]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None],
                       jax.Array]


def _jax_attention(implementation: str | None) -> AttentionFn:
  """`jax.nn.dot_product_attention` with a fixed implementation."""

  def fn(q, k, v, key_mask):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, implementation=implementation)

  return fn


_REGISTRY: dict[str, AttentionFn] = {
    'xla': _jax_attention('xla'),  # CPU and TPU
    'cudnn': _jax_attention('cudnn'),  # NVIDIA GPUs only
    'auto': _jax_attention(None),  # cuDNN where it applies, else XLA
}


def register_attention(name: str, fn: AttentionFn) -> None:
  """Adds an attention implementation selectable by `attention=name`."""
  _REGISTRY[name] = fn


def attention_names() -> tuple[str, ...]:
  """Names accepted by `dot_product_attention(..., impl=)`."""
  return tuple(_REGISTRY)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None = None,
    *,
    impl: str = 'xla',
) -> jax.Array:
  """Multi-head softmax attention, scale 1/sqrt(head_dim).

  Args:
    q: queries [B, T, N, H].
    k: keys [B, S, N, H].
    v: values [B, S, N, H].
    key_mask: [B, S] bool, True = key may be attended to; None = all.
    impl: registered implementation name ('xla', 'cudnn', 'auto', ...).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  if impl not in _REGISTRY:
    raise ValueError(
        f'attention impl {impl!r} unknown; choose from {attention_names()}')
  if key_mask is not None:
    key_mask = jnp.asarray(key_mask, bool)
  return _REGISTRY[impl](q, k, v, key_mask)
