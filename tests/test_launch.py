"""launch/: every script parses, names configs that exist, and starts a trainer command that
twinflow_jax.main's own flag parser accepts (so a renamed flag or config field fails here).

The scripts are run with DRY_RUN=1, which prints each command (shell-quoted) instead of
running it; the trainer's argv is recovered by letting bash itself unquote those lines.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCH = os.path.join(_ROOT, "launch")
_SCRIPTS = sorted(f for f in os.listdir(_LAUNCH) if f.endswith((".sh", ".sbatch")))
_EXTRA = "--config.optim.lr=3e-5"   # an extra trainer flag every script must pass through

# Parses each argv with main.parse_flags in one process; ml_collections reads the
# --config.* overrides from sys.argv, hence the assignment.
_PARSER = r"""
import contextlib, io, json, sys
from absl import flags
from twinflow_jax import main
out = []
for argv in json.load(sys.stdin):
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)   # override flags are defined anew by each parse
  sys.argv = ["main"] + argv
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):   # parse_flags reports a bad flag there
      main.parse_flags(sys.argv)
    c = flags.FLAGS.config
    out.append({"ok": True, "model": c.model.get("name"), "lr": c.optim.lr,
                "workdir": flags.FLAGS.workdir, "distributed": flags.FLAGS.distributed,
                "dcn_data": c.mesh.dcn_data, "num_processes": flags.FLAGS.num_processes,
                "cache": c.train.compilation_cache_dir})
  except BaseException as e:  # SystemExit from a flag error, OSError for a missing file
    out.append({"ok": False, "error": f"{type(e).__name__}: {e} {err.getvalue()}"})
print("RESULT " + json.dumps(out))
"""


def test_expected_launchers_exist():
  assert set(_SCRIPTS) >= {"tpu_vm.sh", "tpu_pod.sh", "tpu_multislice.sh",
                           "gpu_single_host.sh", "gpu_slurm.sbatch", "gpu_multinode.sh"}


@pytest.mark.parametrize("script", _SCRIPTS)
def test_bash_syntax_and_shellcheck(script):
  path = os.path.join(_LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  if shutil.which("shellcheck"):
    proc = subprocess.run(["shellcheck", "-s", "bash", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", _SCRIPTS)
def test_every_config_named_exists(script):
  with open(os.path.join(_LAUNCH, script), encoding="utf-8") as f:
    named = set(re.findall(r"configs/[A-Za-z0-9_]+\.py", f.read()))
  assert named, f"{script} names no config"
  for config in named:
    assert os.path.isfile(os.path.join(_ROOT, config)), f"{script}: {config} does not exist"


def _bash_words(line: str) -> list[str]:
  """The words of a shell-quoted command line, unquoted by bash itself."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                       capture_output=True, text=True, check=True).stdout
  return out.split("\0")[:-1]


def _trainer_argv(words: list[str]) -> list[str] | None:
  """The flags given to `python3 -m twinflow_jax.main` in a command, also inside a
  `--command=` script run remotely (whose last line is the trainer)."""
  if "twinflow_jax.main" in words:
    return words[words.index("twinflow_jax.main") + 1:]
  for w in words:
    if w.startswith("--command=") and "twinflow_jax.main" in w:
      return _trainer_argv(_bash_words(w[len("--command="):].rstrip().splitlines()[-1]))
  return None


def _dry_run(script: str) -> list[str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(DRY_RUN="1", HOME="/home/user", TMPDIR="/tmp")
  proc = subprocess.run(["bash", os.path.join(_LAUNCH, script), _EXTRA], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(l.startswith("+ ") for l in lines), proc.stdout
  argvs = [a for a in (_trainer_argv(_bash_words(l[2:])) for l in lines) if a is not None]
  assert len(argvs) == 1, proc.stdout
  return argvs[0]


def _parse(argvs: list[list[str]]) -> list[dict]:
  proc = subprocess.run([sys.executable, "-c", _PARSER], input=json.dumps(argvs), cwd=_ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert result, proc.stderr[-3000:]
  return json.loads(result[0][len("RESULT "):])


def test_dry_run_trainer_commands_parse_with_main_flags():
  argvs = {s: _dry_run(s) for s in _SCRIPTS}
  for script, argv in argvs.items():
    assert argv[-1] == _EXTRA, (script, argv)
    assert all(a.startswith("--") for a in argv), (script, argv)
  # A renamed flag must fail the same check: rename one flag and one config field.
  renamed = [["--distributed_mode=on" if a.startswith("--distributed=") else a
              for a in argvs["tpu_pod.sh"]],
             [a.replace("compilation_cache_dir", "compile_cache_dir")
              for a in argvs["gpu_slurm.sbatch"]]]
  results = _parse(list(argvs.values()) + renamed)
  for (script, argv), r in zip(argvs.items(), results):
    assert r["ok"], (script, argv, r)
    assert r["lr"] == 3e-5 and r["cache"] == r["workdir"] + "/jax_cache", (script, r)
  assert not results[-2]["ok"] and "distributed_mode" in results[-2]["error"]
  assert not results[-1]["ok"] and "compile_cache_dir" in results[-1]["error"]

  by_name = dict(zip(argvs, results))
  for script in ("tpu_pod.sh", "tpu_multislice.sh", "gpu_slurm.sbatch", "gpu_multinode.sh"):
    assert by_name[script]["distributed"] == "on", script
  for script in ("tpu_vm.sh", "gpu_single_host.sh"):
    assert by_name[script]["distributed"] == "off", script
  assert by_name["tpu_multislice.sh"]["dcn_data"] == 2
  assert by_name["gpu_multinode.sh"]["num_processes"] == 1
