"""benchmarks/cpu_products.py: one run on one core; clear errors for bad --cores, --dtype."""

import json
import math
import os
import pathlib
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_products.py"


def _run(*args):
  return subprocess.run([sys.executable, str(_SCRIPT), *args], capture_output=True, text=True,
                        timeout=300, check=False)


def test_one_core_run_writes_every_product(tmp_path):
  out = tmp_path / "products.json"
  proc = _run("--cores", "1", "--dtype", "float32", "--reps", "1", "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads(out.read_text())
  assert record["backend"].startswith("jax ")
  assert len(record["cores"]) == 1
  assert [r["product"].split()[0:2] for r in record["rows"]] == [
      ["mlp", "in"], ["mlp", "out"], ["qkv", "[4096,384]x[384,1152]"], ["attn", "q.k"],
      ["attn", "p.v"]]
  for row in record["rows"]:
    assert row["dtype"] == "float32" and row["ms"] > 0
    flops = 2 * math.prod(row["batch"]) * row["m"] * row["k"] * row["n"]
    assert abs(row["gflop_s"] - flops / (row["ms"] / 1e3) / 1e9) < 1e-6 * row["gflop_s"]
  assert [(r["batch"], r["m"], r["k"], r["n"]) for r in record["rows"]][3:] == [
      ([16, 6], 256, 64, 256), ([16, 6], 256, 256, 64)]
  assert "1 core(s)" in proc.stdout


def test_user_mistakes_are_one_clear_line():
  n = len(os.sched_getaffinity(0)) + 1
  proc = _run("--cores", str(n))
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert f"--cores {n}: only {n - 1} cores are allowed" in proc.stderr
  proc = _run("--dtype", "float16")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--dtype 'float16': give float32, bfloat16" in proc.stderr
