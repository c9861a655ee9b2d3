"""notebooks/: stored without outputs, load their configs from configs/, and run headless.

A notebook is executed as Colab would run it top to bottom, by a minimal runner: every code
cell in order in one namespace, in a fresh Python process on CPU, in the reduced mode
TWINFLOW_NOTEBOOK_QUICK=1 (a few training steps). A cell that raises fails the test and is
named. The notebooks hold plain Python only (no `%` / `!` magics), so no Jupyter is needed.
"""

import json
import os
import subprocess
import sys

import pytest

import cpu_env

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOKS = ("quickstart.ipynb", "twinflow_loss.ipynb")

_RUNNER = r"""
import json, sys, time, traceback
nb = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
for i, cell in enumerate(nb["cells"]):
  if cell["cell_type"] != "code":
    continue
  start = time.perf_counter()
  try:
    exec(compile("".join(cell["source"]), f"<cell {i}>", "exec"), namespace)
  except BaseException:
    traceback.print_exc()
    print(f"CELL FAILED: {i}", flush=True)
    sys.exit(1)
  print(f"CELL OK: {i} ({time.perf_counter() - start:.1f}s)", flush=True)
"""


def _load(name):
  with open(os.path.join(_ROOT, "notebooks", name), encoding="utf-8") as f:
    return json.load(f)


def test_only_the_expected_notebooks():
  found = sorted(f for f in os.listdir(os.path.join(_ROOT, "notebooks")) if f.endswith(".ipynb"))
  assert found == sorted(_NOTEBOOKS)


@pytest.mark.parametrize("name", _NOTEBOOKS)
def test_stored_stripped_plain_python_and_configs_from_files(name):
  nb = _load(name)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code
  for c in code:
    assert c["outputs"] == [] and c["execution_count"] is None, "strip the outputs"
    for line in "".join(c["source"]).splitlines():
      assert not line.lstrip().startswith(("%", "!")), f"IPython magic in {name}: {line}"
  for c in nb["cells"]:
    assert "attachments" not in c
  source = "".join("".join(c["source"]) for c in code)
  # Configs come from configs/, not restated in the notebook.
  assert 'load_config("configs/' in source
  assert "base_config(" not in source
  for path in {s.split('"')[0] for s in source.split('load_config("')[1:]}:
    assert os.path.isfile(os.path.join(_ROOT, path)), path


@pytest.mark.slow
@pytest.mark.parametrize("name", _NOTEBOOKS)
def test_runs_headless_on_cpu_in_quick_mode(name):
  env = cpu_env.subprocess_env(None, TWINFLOW_NOTEBOOK_QUICK="1")
  proc = subprocess.run([sys.executable, "-c", _RUNNER, os.path.join("notebooks", name)],
                        cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  code_cells = sum(c["cell_type"] == "code" for c in _load(name)["cells"])
  assert out.count("CELL OK:") == code_cells, out[-4000:]
