"""benchmarks/op_profile.py: operations grouped by shape, products with their FLOPs."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "op_profile.py"
_spec = importlib.util.spec_from_file_location("op_profile", _PATH)
op_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(op_profile)


def test_groups_products_with_their_flops():
  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w) * 2.0 + 1.0).lower(x, w).compile()
  hlo = compiled.as_text()
  entry = hlo[hlo.index("ENTRY"):]
  ops = [line.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%")
         for line in entry.splitlines()[1:] if " = " in line and "parameter(" not in line]
  rows = op_profile.group_ops(hlo, {n: 1_000_000 for n in ops})   # 1 ms each
  assert abs(sum(r[1] for r in rows) - 1e-3 * len(ops)) < 1e-9
  dots = [r for r in rows if r[0].startswith("dot")]
  assert len(dots) == 1
  sig, _, _, flops = dots[0]
  assert "f32[64,32] x f32[32,48] -> f32[64,48]" in sig
  assert flops == 2 * 64 * 32 * 48
