"""The one attention entry point of the models.

All models call `dot_product_attention`; the implementation is picked by name,
so a TPU kernel (e.g. splash attention) can be slotted in later with
`register_attention('splash', fn)` without touching the model code.

Implementations:
  'xla'     `jax.nn.dot_product_attention(implementation='xla')`.
  'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')`, NVIDIA GPUs.
  'einsum'  softmax attention written out in the [B, N, T, H] layout (batch and
            heads leading, as matrix kernels want them), float32 logits and
            softmax, and a backward that keeps only q, k, v, the output and
            the log-sum-exp of each query row and recomputes the probabilities
            (like flash attention): the [B, N, T, S] logits and probabilities
            are never saved for the backward pass (on CPU `backward.after`
            keeps XLA from merging the recomputation with the forward's). In
            bfloat16 on CPU every product is laid out so that XLA:CPU runs it
            on the bfloat16 dot instructions (see `_attention_bnth_fwd`).
  'auto'    'einsum' on CPU, `jax.nn.dot_product_attention` with its own
            choice elsewhere (cuDNN where it applies on GPUs, XLA on TPUs).
All of them compute the same function; 'einsum' matches 'xla' to float32
rounding (its backward to about 1e-6 relative).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from twinflow_jax.models.backward import after

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


def _logits_dtype(q):
  return jnp.promote_types(q.dtype, jnp.float32)


def _apply_key_mask(logits, key_mask, key_axis):
  """Masked keys' logits set to a large negative value (as jax.nn's masking value)."""
  if key_mask is None:
    return logits
  shape = [key_mask.shape[0], 1, 1, 1]
  shape[key_axis] = key_mask.shape[1]
  return jnp.where(key_mask.reshape(shape), logits, jnp.finfo(logits.dtype).min * 0.7)


def narrow_on_cpu(x: jax.Array) -> bool:
  """bfloat16 (or narrower) on CPU, where XLA:CPU needs other product layouts and gradient
  forms (this module's attention, `layers.QKVProjection`'s q/k/v split)."""
  return x.dtype != _logits_dtype(x) and jax.default_backend() == 'cpu'


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_bnth(q, k, v, key_mask, scale):
  return _attention_bnth_fwd(q, k, v, key_mask, scale)[0]


def _to_bnth(a):   # [B, T, N, H] <-> [B, N, T, H]
  return jnp.transpose(a, (0, 2, 1, 3))


# On CPU one elementwise pass over the [B, N, T, S] logits costs about as much as the
# product that makes them (12 ms each at 16 x 6 x 256 x 256 on 2 cores), so work moves to
# the H-sized arrays where it can: the scale onto q (exact for power-of-two scales such as
# 1/8 at H = 64), the softmax normaliser onto the output, the logits' gradient scale onto dq.
# Inputs, output and gradients are [B, T, N, H]; the products run in [B, N, T, H].
#
# bfloat16 on CPU: XLA:CPU runs a narrow product on the CPU's bfloat16 instructions
# (twice the float32 rate here) only in its canonical form, batch dimensions first and
# the left operand contracting its last axis, with operands it has materialised itself.
# It folds an explicit transpose of an operand into the product's dimension numbers,
# and a product it cannot run narrow it runs in float32 after converting the operands
# (DiT-S/2's bfloat16 backward ran all five attention products so). So the forward
# multiplies straight from [B, T, N, H] (XLA makes its own transposed copies), and the
# backward reads its [B, N, T, H] operands through `after` (copies XLA cannot fold back)
# and computes the probabilities transposed, [B, N, S, T], so that every product has
# the canonical form. (The forward's output is [B, N, T, H] and transposed after: with the
# output in [B, T, N, H] XLA computes o^T = v^T.p^T, 1.7x slower than p.v here.)
def _attention_bnth_fwd(q, k, v, key_mask, scale):
  dt = _logits_dtype(q)
  qs = q * jnp.asarray(scale, q.dtype)
  narrow = narrow_on_cpu(q)
  if narrow:
    logits = jnp.einsum('btnh,bsnh->bnts', qs, k, preferred_element_type=dt)
  else:
    qs, k, v = _to_bnth(qs), _to_bnth(k), _to_bnth(v)
    logits = jnp.einsum('bnth,bnsh->bnts', qs, k, preferred_element_type=dt)
  logits = _apply_key_mask(logits, key_mask, 3)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - m)
  s = jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum('bnts,bsnh->bnth' if narrow else 'bnts,bnsh->bnth', e.astype(v.dtype), v,
                 preferred_element_type=dt)
  o = _to_bnth((o / s).astype(v.dtype))                   # [B, T, N, H]
  lse = m + jnp.log(s)                                    # [B, N, T, 1]
  return o, (qs, k, v, key_mask, o, lse)   # qs, k, v: [B, T, N, H] if narrow


def _attention_bnth_bwd(scale, res, do):
  qs, k, v, key_mask, o, lse = res
  dt = _logits_dtype(do)
  # Behind `after`, XLA recomputes the probabilities here instead of merging this
  # product with the forward's and keeping every block's logits alive (backward.py).
  narrow = narrow_on_cpu(do)
  if narrow:   # the transposes too, as copies XLA cannot fold into the products
    qs, k, v, do_t, o, lse = after(
        do, (_to_bnth(qs), _to_bnth(k), _to_bnth(v), _to_bnth(do), o, lse))
  else:
    qs, k, v, o, lse = after(do, (qs, k, v, o, lse))
    do_t = _to_bnth(do)
  delta = _to_bnth(jnp.sum(do.astype(dt) * o.astype(dt), axis=-1, keepdims=True))
  products = _narrow_cpu_backward if narrow else _backward_products
  dq, dk, dv = products(qs, k, v, do_t, key_mask, lse, delta)
  return (_to_bnth((dq * scale).astype(qs.dtype)), _to_bnth(dk.astype(k.dtype)),
          _to_bnth(dv.astype(v.dtype)), None)


def _backward_products(qs, k, v, do, key_mask, lse, delta):
  """dq / scale, dk, dv from [B, N, ., .] operands, the probabilities recomputed."""
  dt = _logits_dtype(qs)
  p = jnp.exp(_apply_key_mask(
      jnp.einsum('bnth,bnsh->bnts', qs, k, preferred_element_type=dt), key_mask, 3) - lse)
  dv = jnp.einsum('bnts,bnth->bnsh', p.astype(v.dtype), do, preferred_element_type=dt)
  dp = jnp.einsum('bnth,bnsh->bnts', do, v, preferred_element_type=dt)
  ds = (p * (dp - delta)).astype(qs.dtype)                 # d loss / d logits
  dq = jnp.einsum('bnts,bnsh->bnth', ds, k, preferred_element_type=dt)
  dk = jnp.einsum('bnts,bnth->bnsh', ds, qs, preferred_element_type=dt)
  return dq, dk, dv


def _narrow_cpu_backward(qs, k, v, do, key_mask, lse, delta):
  """`_backward_products` with every product in canonical form (see above)."""
  dt = _logits_dtype(qs)
  logits_t = jnp.einsum('bnsh,bnth->bnst', k, qs, preferred_element_type=dt)
  p_t = jnp.exp(_apply_key_mask(logits_t, key_mask, 2) - jnp.swapaxes(lse, 2, 3))
  dv = jnp.einsum('bnst,bnth->bnsh', p_t.astype(v.dtype), do, preferred_element_type=dt)
  dp_t = jnp.einsum('bnsh,bnth->bnst', v, do, preferred_element_type=dt)
  ds_t = (p_t * (dp_t - jnp.swapaxes(delta, 2, 3))).astype(qs.dtype)
  dk = jnp.einsum('bnst,bnth->bnsh', ds_t, qs, preferred_element_type=dt)
  ds = after(dk, jnp.swapaxes(ds_t, 2, 3))                     # [B, N, T, S]
  dq = jnp.einsum('bnts,bnsh->bnth', ds, k, preferred_element_type=dt)
  return dq, dk, dv


_attention_bnth.defvjp(_attention_bnth_fwd, _attention_bnth_bwd)


def _einsum_attention(q, k, v, key_mask):
  """Softmax attention in the [B, N, T, H] layout; see the module doc."""
  return _attention_bnth(q, k, v, key_mask, 1.0 / math.sqrt(q.shape[-1]))


def _auto_attention(q, k, v, key_mask):
  if jax.default_backend() == 'cpu':
    return _einsum_attention(q, k, v, key_mask)
  return _jax_attention(None)(q, k, v, key_mask)


_REGISTRY: dict[str, AttentionFn] = {
    'xla': _jax_attention('xla'),  # CPU and TPU
    'cudnn': _jax_attention('cudnn'),  # NVIDIA GPUs only
    'einsum': _einsum_attention,  # any backend; the fastest on CPU
    'auto': _auto_attention,  # einsum on CPU, else jax.nn's own choice
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
    impl: registered implementation name ('xla', 'cudnn', 'einsum', 'auto', ...).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  if impl not in _REGISTRY:
    raise ValueError(
        f'attention impl {impl!r} unknown; choose from {attention_names()}')
  if key_mask is not None:
    key_mask = jnp.asarray(key_mask, bool)
  return _REGISTRY[impl](q, k, v, key_mask)
