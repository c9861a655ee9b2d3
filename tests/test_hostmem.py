"""The resident-malloc restart of the command-line entry points (twinflow_jax/hostmem.py)."""

import os
import subprocess
import sys

import pytest

from twinflow_jax import hostmem

ALL = ":".join(f"{name}={value}" for name, value in hostmem.TUNABLES)


def _env(environ, glibc=True, accelerator=False):
  return hostmem.resident_malloc_env(environ, linux_glibc=glibc, accelerator=accelerator)


def test_adds_the_tunables_on_a_cpu_host_and_keeps_the_users():
  assert _env({})["GLIBC_TUNABLES"] == ALL
  assert _env({"JAX_PLATFORMS": "cpu"})["GLIBC_TUNABLES"] == ALL
  # Accelerator present but JAX told to use the CPU: still the CPU's buffers.
  assert _env({"JAX_PLATFORMS": "cpu"}, accelerator=True)["GLIBC_TUNABLES"] == ALL
  # 'large' adds one arena (blocks over 64 MiB stay resident).
  large = _env({hostmem.MODE_ENV: "large"})["GLIBC_TUNABLES"]
  assert large == "glibc.malloc.arena_max=1:" + ALL
  # The user's own tunables stay first; a value the user set is not overridden.
  mine = "glibc.malloc.mmap_max=4:glibc.pthread.rseq=0"
  env = _env({"GLIBC_TUNABLES": mine, "HOME": "/h"})
  assert env["HOME"] == "/h"
  assert env["GLIBC_TUNABLES"] == mine + ":glibc.malloc.trim_threshold=" + str(2**62)


def test_unknown_mode_is_an_error():
  with pytest.raises(ValueError, match="TWINFLOW_RESIDENT_MALLOC='big'"):
    _env({hostmem.MODE_ENV: "big"})


@pytest.mark.parametrize("environ,glibc,accelerator", [
    ({"GLIBC_TUNABLES": ALL}, True, False),               # already set: no restart loop
    ({}, False, False),                                   # not glibc
    ({}, True, True),                                     # an accelerator JAX will use
    ({"JAX_PLATFORMS": "tpu,cpu"}, True, False),
    ({"JAX_PLATFORMS": "cuda"}, True, False),
    ({hostmem.MODE_ENV: "0"}, True, False),
    ({hostmem.MODE_ENV: "off"}, True, False),
])
def test_leaves_the_process_alone(environ, glibc, accelerator):
  assert _env(environ, glibc, accelerator) is None


@pytest.mark.skipif(not hostmem.on_linux_glibc(), reason="a glibc setting")
def test_restart_keeps_pid_and_arguments():
  code = ("import os, sys; from twinflow_jax import hostmem; "
          "print('start', os.getpid(), sys.argv[1:], flush=True); "
          "hostmem.reexec_with_resident_malloc(); "
          "print('run', os.getpid(), sys.argv[1:], hostmem.resident_malloc_active())")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", hostmem.MODE_ENV)}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, check=True,
                       capture_output=True, text=True).stdout.split("\n")
  starts = [ln for ln in out if ln.startswith("start")]
  runs = [ln for ln in out if ln.startswith("run")]
  assert len(starts) == 2 and len(runs) == 1     # restarted once, then ran
  pid = starts[0].split()[1]
  assert starts[1].split()[1] == pid
  assert runs[0] == f"run {pid} ['a', '--b=1'] True"
  env[hostmem.MODE_ENV] = "0"
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.count("start") == 1 and out.strip().endswith("False")
  env[hostmem.MODE_ENV] = "big"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and "start" in proc.stdout
  assert proc.stderr.strip().splitlines() == [
      "error: TWINFLOW_RESIDENT_MALLOC='big': use 1 (default), large or 0"]


def test_large_buffer_hint_only_where_it_helps():
  on = {"GLIBC_TUNABLES": ALL}
  big, small = 2 * 2**30, 63 * 2**20
  hint = hostmem.large_buffer_hint(big, "cpu", on)
  assert "2.00 GiB" in hint and "TWINFLOW_RESIDENT_MALLOC=large" in hint
  assert hostmem.large_buffer_hint(small, "cpu", on) is None        # fits an arena heap
  assert hostmem.large_buffer_hint(None, "cpu", on) is None
  assert hostmem.large_buffer_hint(big, "gpu", on) is None
  assert hostmem.large_buffer_hint(big, "cpu", {}) is None          # resident malloc off
  large = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:" + ALL}
  assert hostmem.large_buffer_hint(big, "cpu", large) is None       # already one arena
