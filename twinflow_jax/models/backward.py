"""Control over what XLA:CPU keeps for a hand-written backward pass.

A custom VJP names the arrays its backward needs, but XLA decides what stays in
memory: its common-subexpression pass merges a backward recomputation with the
forward's identical computation (so the forward's result stays alive instead), its
fusion pass copies cheap elementwise producers into each consumer (so their inputs
stay alive as well as the saved result), and its scheduler may compute the
backward's recomputations during the forward. `after` stops all three on CPU. Used
by the attention's and the normalisations' backwards (attention.py, layers.py): at
DiT-S/2 with 16 rows XLA's temporaries of a forward + backward went from 2125 to
1393 MiB, those of the TwinFlow train step from 2335 to 1591 MiB
(docs/performance.md, "Backward memory").
"""

import jax
import jax.numpy as jnp


def after(x: jax.Array, operands):
  """`operands` unchanged, but only once `x` exists, and opaque to XLA:CPU's passes.

  Implemented as a conditional on x's first element (taken by indexing, which on a
  mesh reads one shard; a reshape would gather x): XLA neither merges its results
  with earlier uses of the operands nor moves it before x is computed (an
  optimization_barrier does neither on XLA:CPU, which expands it before fusion). The
  branches must differ or XLA drops the conditional: when that element is NaN the
  operands become NaN. Use it where x is the incoming gradient, which is then
  non-finite anyway (the trainer skips such a step). Other backends get the operands
  as they are.

  Args:
    x: any array, typically the cotangent a backward rule receives.
    operands: a pytree of arrays (the residuals the backward is about to use).

  Returns:
    operands, unchanged.
  """
  if jax.default_backend() != 'cpu':
    return operands
  return jax.lax.cond(jnp.isnan(x[(0,) * x.ndim]),   # no reshape: x may be sharded
                      lambda ops: jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), ops),
                      lambda ops: ops, operands)
