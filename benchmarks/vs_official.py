r"""Side by side on the same cores: this project's JAX step against the official PyTorch step.

Measures, for a class-conditional DiT with the twin-time (target-time) embedder on latents
(default DiT-S/2, 32 x 32 x 4, 1000 classes, batch 16):
  fwd    one forward of the batch, no gradient;
  fm     one plain flow-matching forward + backward (mean squared error to z - x, r = t);
  step   one full TwinFlow training step: the official `TwinFlow.training_step` +
         backward + gradient clipping + AdamW (+ its in-step EMA update) against this
         project's compiled train step (`twinflow_jax.train.loop`: EMA teacher, loss,
         gradient, clipping, AdamW), both with the official loss settings.
Each side runs in its own worker process (JAX under this interpreter, PyTorch under
`--torch-python`); the rounds alternate which side goes first, so both see the same machine.
Peak memory comes from a separate pass per side that only builds the step (JAX: compiled,
or read from `--jax-cache`), warms it up, then resets the kernel's resident-set high-water
mark and runs one more step: "peak RSS while stepping" is what a training run holds; the
process peak including setup and XLA compilation is printed beside it. On a GPU each
worker also reports its allocator's peak device memory over building and timing (run JAX
with XLA_PYTHON_CLIENT_PREALLOCATE=false: both workers share the device).

The PyTorch worker runs with OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`) unless the
environment sets it: with OpenMP's default its idle threads spin on the shared cores while
the JAX worker is timed, which made the JAX side up to 1.6x slower in the measurements
before 2026-11-30 19:30 UTC (docs/performance.md).

Host memory: the JAX workers run with glibc's resident malloc, as `twinflow_jax.main` runs
(twinflow_jax/hostmem.py; without it XLA's CPU runtime faults in and zeroes its temporary
buffer again on every call); `--jax-malloc large` adds one malloc arena
(TWINFLOW_RESIDENT_MALLOC=large), `--jax-malloc default` turns it off, `--torch-malloc`
gives the PyTorch worker the same settings.

The official code is not part of this project: give a checkout of inclusionAI/TwinFlow
with `--official-repo` (its `src/methodes/twinflow/twinflow.py` is loaded from there). On a
machine without CUDA its `torch.cuda.get_rng_state` / `set_rng_state` calls (which replay
dropout masks; the DiT has no dropout) are pointed at the CPU generator.

  python3 benchmarks/vs_official.py --official-repo /path/TwinFlow \
      --torch-python /path/venv-with-torch/bin/python [--what fwd,fm,step] [--rounds 3] \
      [--dtype float32|bfloat16] [--model DiT-S/2] [--batch 16] [--json out.json]

`--dtype bfloat16`: the JAX model computes in bfloat16 with float32 master weights; the
PyTorch side runs under `torch.autocast(bfloat16)` with float32 weights, as the official
training scripts do. `--jax-model` adds JSON overrides of the JAX model config (e.g.
'{"remat": "dots", "attention": "xla"}'); `--jax-path` puts another copy of twinflow_jax
first on the JAX worker's path; `--baseline-path` adds a third worker, `jax_before`, that
runs another copy (e.g. an older version) in the same interleaved rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_hostmem():
  """This checkout's twinflow_jax/hostmem.py (standard library only), loaded by path:
  putting ROOT first on sys.path would shadow the copies that --jax-path and
  --baseline-path put first for the workers."""
  spec = importlib.util.spec_from_file_location("_vs_official_hostmem",
                                                ROOT / "twinflow_jax" / "hostmem.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


hostmem = _load_hostmem()
KINDS = ("fwd", "fm", "step")
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
  """Resets the kernel's resident-set high-water mark (Linux); False if not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _peak_rss_mib() -> float:
  """VmHWM: the peak resident set since start or the last `_reset_peak_rss`."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  return _rss_mib()


# ----------------------------------------------------------------------------- JAX worker


class JaxSide:
  """The JAX functions of each kind, compiled ahead of the timing."""

  def __init__(self, args):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from twinflow_jax import models  # pylint: disable=g-import-not-at-top
    self.jax, self.jnp = jax, jnp
    self.args = args
    b, s, ch = args.batch, args.size, args.channels
    self.model_cfg = {"name": args.model, "in_channels": ch, "input_size": s,
                      "num_classes": 1000, "dtype": args.dtype, **json.loads(args.jax_model)}
    rng = np.random.default_rng(0)
    self.x = jnp.asarray(rng.standard_normal((b, s, s, ch)), jnp.float32)
    self.z = jnp.asarray(rng.standard_normal((b, s, s, ch)), jnp.float32)
    self.t = jnp.asarray(rng.uniform(0, 1, b), jnp.float32)
    self.y = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
    self.info = {"jax": jax.__version__, "model": self.model_cfg}
    self.fns = {}
    self.compiled = {}   # kind -> the compiled program (benchmarks/op_profile.py)
    self.params = self.apply_fn = None
    if set(args.what.split(",")) - {"step"}:   # the step builds its own state
      model = models.create_model(self.model_cfg, rngs=nnx.Rngs(0))
      graphdef, self.params, rest = models.split_model(model)
      self.apply_fn = models.as_apply_fn(graphdef, rest)

  def build(self, kind):
    jax, jnp = self.jax, self.jnp
    t0 = time.perf_counter()
    if kind == "fwd":
      fn = jax.jit(lambda p, x, t, y: self.apply_fn(p, x, t, t, y))
      args = (self.params, self.x, self.t, self.y)
      compiled = fn.lower(*args).compile()
      run = lambda: compiled(*args)
    elif kind == "fm":
      def loss(p, x, z, t, y):
        tb = t[:, None, None, None]
        x_t = tb * z + (1 - tb) * x
        return jnp.mean(jnp.square(self.apply_fn(p, x_t, t, t, y) - (z - x)))
      fn = jax.jit(jax.value_and_grad(loss))
      args = (self.params, self.x, self.z, self.t, self.y)
      compiled = fn.lower(*args).compile()
      run = lambda: compiled(*args)
    else:
      compiled, run = self._build_step()
    self.info[f"{kind}/compile_s"] = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
      self.info[f"{kind}/xla_flops"] = float(cost["flops"])
    mem = compiled.memory_analysis()
    if mem is not None:
      self.info[f"{kind}/temp_mib"] = mem.temp_size_in_bytes / 2**20
    self.fns[kind] = run
    self.compiled[kind] = compiled
    jax.block_until_ready(run())   # warm-up

  def _build_step(self):
    import ml_collections  # pylint: disable=g-import-not-at-top
    jax = self.jax
    from twinflow_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
    from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top
    c = config_lib.base_config()
    c.model = ml_collections.ConfigDict(self.model_cfg)
    c.data.source = "arrayrecord_latents"
    c.data.paths = "/nonexistent/latents.array_record"   # only the shapes are used
    c.data.latent_shape = (self.args.size, self.args.size, self.args.channels)
    c.data.num_classes = 1000
    c.loss.enhanced_ratio = 0.8                         # the official loss settings
    c.optim.grad_clip = 1.0
    c.train.global_batch_size = self.args.batch
    c.mesh.data = 1
    devices = jax.devices()[:1]
    setup = loop.build(c, devices)
    compiled = loop.compile_step(setup)
    state = loop.init_state(setup, 0)
    batch = {"x": self.x, "label": self.y}
    batch = {k: v for k, v in batch.items() if k in setup.batch_struct}
    holder = {"state": state}

    def run():
      holder["state"], m = compiled(holder["state"], batch)
      return m
    return compiled, run

  def time_one(self, kind):
    t0 = time.perf_counter()
    self.jax.block_until_ready(self.fns[kind]())
    return time.perf_counter() - t0

  def peak_device_mib(self):
    dev = self.jax.devices()[0]
    if dev.platform == "cpu":
      return None
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**20


# ----------------------------------------------------------------------------- torch worker


class TorchSide:
  """A PyTorch DiT with the twin-time embedder, run by the official TwinFlow method."""

  def __init__(self, args):
    import torch  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, str(ROOT / "tools"))
    import make_dit_fixture as ref  # pylint: disable=g-import-not-at-top
    self.torch, self.args = torch, args
    self.device = torch.device(args.device)
    if args.device == "cpu":
      torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    family, size = args.model.split("-")
    depth, hidden, heads = SIZES[size.split("/")[0]]
    patch = int(size.split("/")[1])

    class TwinDiT(ref.DiT):
      """F(x, t, tt, c): DiT plus a target-time embedder scaled by (t - tt)."""

      def __init__(self):
        super().__init__(input_size=args.size, patch_size=patch, in_channels=args.channels,
                         hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4.0,
                         num_classes=1000, learn_sigma=False)
        self.r_embedder = ref.TimestepEmbedder(hidden)

      def forward(self, x, t, tt, c):
        h = self.x_embedder(x) + self.pos_embed
        emb = (self.t_embedder(1000 * t) + (t - tt)[:, None] * self.r_embedder(1000 * tt)
               + self.y_embedder.embedding_table(c[0]))
        for block in self.blocks:
          h = block(h, emb)
        h = self.final_layer(h, emb)
        n, p, c_out = h.shape[0], self.p, self.c_out
        g = int(h.shape[1]**0.5)
        h = torch.einsum("nhwpqc->nchpwq", h.reshape(n, g, g, p, p, c_out))
        return h.reshape(n, c_out, g * p, g * p)

    assert family == "DiT", "the PyTorch side has the DiT only"
    import copy  # pylint: disable=g-import-not-at-top
    self.net = TwinDiT().to(self.device)
    self.wrapper = torch.nn.Module()
    self.wrapper.transformer = self.net
    self.wrapper.ema_transformer = copy.deepcopy(self.net).requires_grad_(False)
    self.wrapper.forward = lambda x, t, tt, c: self.net(x, t, tt, c)
    b, s, ch = args.batch, args.size, args.channels
    gen = torch.Generator().manual_seed(0)
    to = lambda a: a.to(self.device)
    self.x = to(torch.randn(b, ch, s, s, generator=gen))
    self.z = to(torch.randn(b, ch, s, s, generator=gen))
    self.t = to(torch.rand(b, generator=gen))
    self.y = to(torch.randint(0, 1000, (b,), generator=gen))
    self.null = to(torch.full((b,), 1000))
    self.bf16 = args.dtype == "bfloat16"
    self.info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    self.fns = {}

  def _autocast(self):
    return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16)

  def build(self, kind):
    torch = self.torch
    if kind == "fwd":
      def run():
        with torch.no_grad(), self._autocast():
          return self.net(self.x, self.t, self.t, [self.y])
    elif kind == "fm":
      def run():
        tb = self.t[:, None, None, None]
        with self._autocast():
          out = self.net(tb * self.z + (1 - tb) * self.x, self.t, self.t, [self.y])
          loss = ((out.float() - (self.z - self.x)) ** 2).mean()
        loss.backward()
        for p in self.net.parameters():
          p.grad = None
        return loss
    else:
      method = self._official_method()
      opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
      counter = [0]

      def run():
        with self._autocast():
          loss = method.training_step(self.wrapper, self.x.clone(), c=[self.y], e=[self.null],
                                      step=counter[0], v=None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter[0] += 1
        return loss
    self.fns[kind] = run
    run()   # warm-up

  def _official_method(self):
    torch = self.torch
    src = pathlib.Path(self.args.official_repo) / "src"
    path = src / "methodes" / "twinflow" / "twinflow.py"
    if not path.is_file():
      raise SystemExit(f"--official-repo: {path} not found; give a checkout of "
                       "inclusionAI/TwinFlow")
    sys.path.insert(0, str(src))
    if not torch.cuda.is_available():
      torch.cuda.get_rng_state = torch.get_rng_state
      torch.cuda.set_rng_state = torch.set_rng_state
    spec = importlib.util.spec_from_file_location("official_twinflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TwinFlow(consistc_ratio=1.0, ema_decay_rate=0.99, enhanced_ratio=0.8,
                           enhanced_range=[0.0, 1.0], time_dist_ctrl=[1.0, 1.0, 1.0],
                           estimate_order=2, loss_func_type={"type": "barron_reweighting"},
                           dist_match_cof=0.5)

  def time_one(self, kind):
    t0 = time.perf_counter()
    self.fns[kind]()
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    return time.perf_counter() - t0

  def peak_device_mib(self):
    if self.device.type == "cuda":
      return self.torch.cuda.max_memory_allocated() / 2**20
    return None


def _worker(args):
  if args.worker == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    jax.devices()   # the runtime is up before the baseline
  else:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  base = _current_rss_mib()
  side = (JaxSide if args.worker == "jax" else TorchSide)(args)
  for kind in args.what.split(","):
    side.build(kind)
  print(json.dumps({"ready": True, "info": side.info, "base_rss_mib": base}), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "time":
      out = [side.time_one(cmd["kind"]) for _ in range(cmd["iters"])]
      print(json.dumps({"times": out}), flush=True)
    elif cmd["op"] == "stats":
      print(json.dumps({"peak_rss_mib": _rss_mib(), "peak_device_mib": side.peak_device_mib()}),
            flush=True)
    elif cmd["op"] == "step_memory":
      # Resident memory while stepping, after setup (compilation, warm-up) is done; heap
      # that setup freed goes back to the system first (glibc keeps it otherwise).
      try:
        import ctypes  # pylint: disable=g-import-not-at-top
        ctypes.CDLL("libc.so.6").malloc_trim(0)
      except OSError:
        pass
      before = _current_rss_mib()
      ok = _reset_peak_rss()
      side.time_one(cmd["kind"])
      print(json.dumps({"rss_before_mib": before, "run_peak_rss_mib":
                        _peak_rss_mib() if ok else None}), flush=True)
    else:
      break


# ----------------------------------------------------------------------------- driver


class Worker:
  """A worker subprocess spoken to in JSON lines."""

  def __init__(self, python, side, args, what):
    kind = "torch" if side == "torch" else "jax"
    cmd = [python, os.path.abspath(__file__), "--worker", kind, "--what", what]
    for k in ("model", "batch", "size", "channels", "threads", "dtype", "official_repo",
              "device"):
      v = getattr(args, k)
      if v is not None:
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ)
    if kind == "jax":
      before = side == "jax_before"
      cmd += ["--jax-model", args.baseline_model if before else args.jax_model]
      env["PYTHONPATH"] = os.pathsep.join(
          p for p in [args.baseline_path if before else args.jax_path, str(ROOT),
                      env.get("PYTHONPATH", "")] if p)
      if args.jax_xla_flags and not before:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.jax_xla_flags).strip()
    if kind == "torch" and args.omp_wait_policy:
      # PyTorch's OpenMP threads otherwise keep spinning between its calls, on the cores
      # the JAX worker is timed on (measured: the JAX fm call 9.3 s beside an idle torch
      # worker with the default policy, 5.9 s with PASSIVE; torch itself was no slower).
      env.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    # Host memory as each side's own command runs it: ours restarts with glibc's resident
    # malloc (twinflow_jax.hostmem), the official scripts do not; `--torch-malloc` gives
    # PyTorch the same settings.
    malloc = args.torch_malloc if kind == "torch" else args.jax_malloc
    if malloc != "default":
      env = hostmem.resident_malloc_env(
          {**env, hostmem.MODE_ENV: "large" if malloc == "large" else "1"},
          linux_glibc=hostmem.on_linux_glibc(),
          accelerator=kind == "jax" and args.device == "cuda") or env
    if kind == "jax" and args.jax_cache:
      # The memory pass compiles the step again: let it come from the cache.
      env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(args.jax_cache, side)
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True)
    self.hello = None

  def wait_ready(self):
    self.hello = self._read()
    return self

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith("{"):
        return json.loads(line)
    raise RuntimeError(f"worker exited with {self.proc.wait()}")

  def ask(self, **cmd):
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
    self.proc.stdin.flush()
    self.proc.wait()


def _flops(args) -> dict:
  """Analytic matmul FLOPs of the three kinds (backward = 2 forwards)."""
  sys.path.insert(0, str(ROOT))
  from twinflow_jax import losses, models  # pylint: disable=g-import-not-at-top
  fwd = models.flops_per_forward({"name": args.model, "in_channels": args.channels,
                                  "input_size": args.size, "num_classes": 1000}, 1, args.size)
  rows = losses.count_network_rows(args.batch)
  return {"fwd": fwd * args.batch, "fm": 3 * fwd * args.batch,
          "step/ours": fwd * (rows["ours"] + 2 * args.batch),
          "step/official": fwd * (rows["official"] + 2 * args.batch)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--official-repo", help="checkout of inclusionAI/TwinFlow (for 'step')")
  ap.add_argument("--torch-python", default=sys.executable,
                  help="interpreter with torch for the PyTorch worker")
  ap.add_argument("--what", default="fwd,fm,step", help="comma list of fwd, fm, step")
  ap.add_argument("--model", default="DiT-S/2")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--size", type=int, default=32, help="latent side")
  ap.add_argument("--channels", type=int, default=4)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                  help="PyTorch device (JAX uses its default backend)")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--iters", type=int, default=2, help="timed calls per side and round")
  ap.add_argument("--sides", default="jax,torch")
  ap.add_argument("--jax-model", default="{}", help="JSON overrides of the JAX model config")
  ap.add_argument("--jax-path", default=None, help="put this twinflow_jax copy first (JAX)")
  ap.add_argument("--jax-xla-flags", default="", help="extra XLA_FLAGS of the JAX worker")
  ap.add_argument("--baseline-path", default=None,
                  help="also run a 'jax_before' worker from this twinflow_jax copy")
  ap.add_argument("--baseline-model", default="{}",
                  help="JSON model overrides of the baseline worker")
  ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
  ap.add_argument("--omp-wait-policy", default="PASSIVE",
                  help="OMP_WAIT_POLICY of the PyTorch worker unless the environment sets "
                       "it ('' = OpenMP's default: its idle threads spin on the cores)")
  ap.add_argument("--jax-malloc", default="resident", choices=("resident", "large", "default"),
                  help="host malloc of the JAX workers: 'resident' as twinflow_jax.main "
                       "runs, 'large' as with TWINFLOW_RESIDENT_MALLOC=large "
                       "(twinflow_jax/hostmem.py), or glibc's default")
  ap.add_argument("--torch-malloc", default="default", choices=("resident", "large", "default"),
                  help="host malloc of the PyTorch worker: glibc's default, as the official "
                       "scripts run, or the same tunables as ours")
  ap.add_argument("--jax-cache", default="", help="persistent compilation cache folder of "
                  "the JAX workers (one per worker; the memory pass then skips compiling)")
  ap.add_argument("--peak-flops", type=float, default=0.0,
                  help="device peak FLOP/s (e.g. from train_throughput.py) to report MFU")
  ap.add_argument("--json", default=None, help="also write the results here")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return _worker(args)
  what = [k for k in args.what.split(",") if k]
  bad = [k for k in what if k not in KINDS]
  if bad:
    ap.error(f"--what: unknown {bad}; choose from {KINDS}")
  sides = args.sides.split(",")
  if args.baseline_path:
    sides.append("jax_before")
  if "step" in what and "torch" in sides and not args.official_repo:
    ap.error("--what step needs --official-repo (a checkout of inclusionAI/TwinFlow)")
  python = {"jax": sys.executable, "jax_before": sys.executable, "torch": args.torch_python}

  print(f"starting the {', '.join(sides)} workers (build, compile, warm-up) ...", flush=True)
  workers = {side: Worker(python[side], side, args, ",".join(what)) for side in sides}
  for w in workers.values():   # they start in parallel
    w.wait_ready()
  times = {(s, k): [] for s in sides for k in what}
  for r in range(args.rounds):
    order = sides if r % 2 == 0 else sides[::-1]
    for kind in what:
      for side in order:
        times[(side, kind)] += workers[side].ask(op="time", kind=kind, iters=args.iters)["times"]
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{s}/{k} {statistics.median(times[(s, k)]):.3f}s" for s in sides for k in what),
        flush=True)
  device_mib = {}
  for side, w in workers.items():
    device_mib[side] = w.ask(op="stats")["peak_device_mib"]   # None on CPU
    w.close()

  result = {"args": {k: v for k, v in vars(args).items() if k != "worker"},
            "uptime": open("/proc/loadavg").read().split()[:3],
            "info": {s: w.hello["info"] for s, w in workers.items()},
            "flops": _flops(args), "median_s": {}, "min_s": {}}
  for side, mib in device_mib.items():
    if mib is not None:   # the peak over building and timing every kind
      result[f"{side}/peak_device_mib"] = mib
  for (s, k), v in times.items():
    result["median_s"][f"{s}/{k}"] = statistics.median(v)
    result["min_s"][f"{s}/{k}"] = min(v)
  if not args.no_memory and "step" in what:
    for side in sides:
      w = Worker(python[side], side, args, "step").wait_ready()
      mem = w.ask(op="step_memory", kind="step")
      result[f"{side}/rss_after_setup_mib"] = mem["rss_before_mib"]
      result[f"{side}/step_run_peak_rss_mib"] = mem["run_peak_rss_mib"]
      result[f"{side}/base_rss_mib"] = w.hello["base_rss_mib"]
      stats = w.ask(op="stats")
      result[f"{side}/step_peak_rss_mib"] = stats["peak_rss_mib"]
      if stats["peak_device_mib"] is not None:
        result[f"{side}/step_peak_device_mib"] = stats["peak_device_mib"]
      w.close()

  print("\nmedian seconds per call (min in brackets)")
  for kind in what:
    row = "  ".join(f"{s} {result['median_s'][f'{s}/{kind}']:.3f} "
                    f"[{result['min_s'][f'{s}/{kind}']:.3f}]" for s in sides)
    ratio = ""
    if "torch" in sides:
      med = result["median_s"]
      ratio = "".join(f"  torch/{s} = {med[f'torch/{kind}'] / med[f'{s}/{kind}']:.2f}x"
                      for s in sides if s != "torch")
    print(f"  {kind:5s} {row}{ratio}")
  if "step" in what:
    for side in sides:
      flops = result["flops"]["step/official" if side == "torch" else "step/ours"]
      achieved = flops / result["median_s"][f"{side}/step"]
      result[f"{side}/step_model_flops_per_s"] = achieved
      mfu = ""
      if args.peak_flops:
        result[f"{side}/step_mfu"] = achieved / args.peak_flops
        mfu = (f", MFU {100 * achieved / args.peak_flops:.1f}% of "
               f"{args.peak_flops / 1e12:.1f} TFLOP/s")
      print(f"  {side} step: {flops / 1e12:.3f} model TFLOP (backward = 2 forwards), "
            f"{achieved / 1e12:.3f} TFLOP/s{mfu}")
  for side in sides:
    if f"{side}/peak_device_mib" in result:
      print(f"  {side} peak device memory over all timed kinds "
            f"{result[f'{side}/peak_device_mib']:.0f} MiB")
  for side in sides:
    if f"{side}/step_peak_rss_mib" in result:
      if f"{side}/step_peak_device_mib" in result:
        print(f"  {side} step peak device memory "
              f"{result[f'{side}/step_peak_device_mib']:.0f} MiB")
      run_peak = result[f"{side}/step_run_peak_rss_mib"]
      print(f"  {side} step: peak RSS while stepping "
            f"{'n/a' if run_peak is None else f'{run_peak:.0f} MiB'} (RSS after setup "
            f"{result[f'{side}/rss_after_setup_mib']:.0f} MiB; process peak incl. setup and "
            f"compilation {result[f'{side}/step_peak_rss_mib']:.0f} MiB; after importing the "
            f"library {result[f'{side}/base_rss_mib']:.0f} MiB)")
  for side in sides:
    if side != "torch":
      print(f"  {side}: " + json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                                        for k, v in result["info"][side].items()}))
  print(f"  load average {' '.join(result['uptime'])}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
