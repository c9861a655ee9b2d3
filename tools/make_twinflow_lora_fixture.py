r"""Writes tests/fixtures/twinflow_lora_ref.npz: the official TwinFlow_LoRA training step.

Runs the official `TwinFlow_LoRA.training_step` (repository inclusionAI/TwinFlow,
`src/methodes/twinflow/twinflow_lora.py`, unmodified, imported from a temporary `git archive`
of the local mirror, never copied into this repository) in float64 on CPU, on a tiny MLP
wrapped the way the official LoRA trainers wrap their transformer
(`src/steerers/*/sft_ddp_lora.py`):

  wrapped = Wrapper(transformer = DDP(peft.get_peft_model(net, LoraConfig(...))))
  transformer.add_adapter('old', ...); set_adapter('default'); base frozen, 'default'
  factors trainable, 'old' factors frozen (the in-model EMA of `update_ema_lora`)

so that the official teacher choice runs as written: `mod_original` (adapters disabled,
ema_decay_rate 1), `mod_ema` (adapter 'old' after `update_ema_lora`, 0 < emd < 1) and
`model.transformer` (emd 0), the RCGM chain on the online model when emd = 1, and the single
network time `t - tt / 2`. The `DDP` here is a plain module with a `.module` attribute (no
process group), which is all the official code touches.

Needs torch and peft (only this script; the tests read the npz):
  /work/venv-tools/bin/pip install peft
  /work/venv-tools/bin/python tools/make_twinflow_lora_fixture.py \
      [--mirror /work/.mirror/inclusionAI+TwinFlow/repo] [--out tests/fixtures/...npz]

The network (K = 3 classes + a null class): `h = concat([x_t (B, D), time (B, 1),
one_hot(c, K) (B, K)])` -> fc0 (D+1+K -> H) -> SiLU -> fc1 (H -> H) -> SiLU -> fc2 (H -> D);
one time input (the official LoRA configs set `aux_time_embed: false`). LoRA (rank R,
alpha A, PEFT 'gaussian' init, then random non-zero factors) on fc0 and fc2; fc1 stays a
frozen base layer. The torch
`torch.cuda.get_rng_state` / `set_rng_state` calls of the official code (they re-seed
dropout between teacher calls; the MLP has none) are no-ops on CPU.

Every random draw of a step is recorded in the official order (see TWINFLOW.md) so that a
port can replay it. Saved arrays (torch layout: weights [out, in]):
  base/fc{0,1,2}.{weight,bias}              the frozen base
  default/fc{0,2}.lora_{A,B}                the online adapter (the only trainable params)
  old/fc{0,2}.lora_{A,B}                    adapter 'old' before the step (the EMA teacher)
  <case>/x, <case>/labels, <case>/uncond_labels   data [B, D], c [B] in 0..K-2, e [B] = K-1
  <case>/draw/{t0,u_tt,u_tmin,z_adv,z,z_dm,t_dm}  the draws (shapes as twinflow_ref_*.npz)
  <case>/loss                               the official loss
  <case>/grad/fc{0,2}.lora_{A,B}            d loss / d online adapter
  <case>/old_after/fc{0,2}.lora_{A,B}       adapter 'old' after the step's EMA update
  <case>/cmd_before, <case>/cmd_after       the official warm-up decay before / after
  <case>/sizes                              official group sizes e2e, mul, any, adv, one
  <case>/loss_online_teacher                the loss with the online model as teacher
                                            (shows the fixture tells the teachers apart)
  config                                    JSON: model sizes, cases and their settings,
                                            official commit, torch / peft versions
"""

import argparse
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

D, K, H = 6, 4, 16          # features, one-hot width (3 classes + the null class 3), hidden
RANK, ALPHA = 4, 8.0        # PEFT scale alpha / rank = 2
TARGETS = ["fc0", "fc2"]
# name: batch, official method kwargs, warm-up decay cmd before the step.
CASES = {
    # qwenimage_lora_1order.yaml: frozen base teacher (adapters disabled), N = 1, enr = 4.
    "q1": (8, dict(estimate_order=1, enhanced_ratio=4.0, ema_decay_rate=1.0), 0.0),
    # sd35_lora_2order.yaml: EMA adapter 'old' (second step, cmd = 0.495), N = 2, enr = 0.8.
    "s2": (8, dict(estimate_order=2, enhanced_ratio=0.8, ema_decay_rate=0.99), 0.495),
    # emd = 0 (the online transformer teaches); B = 7: groups 2|2|2|1 (adv = remainder).
    "b7": (7, dict(estimate_order=2, enhanced_ratio=0.8, ema_decay_rate=0.0), 0.0),
    # First EMA step (cmd = 0: 'old' becomes a copy); B = 6: round(1.5) = 2 (half to even),
    # groups 2|2|2|0 (no adv rows); enhanced target off.
    "b6": (6, dict(estimate_order=1, enhanced_ratio=0.0, ema_decay_rate=0.99), 0.0),
    # N = 0: the loss of the mul and adv rows only; the base teacher shows unclipped.
    "n0": (8, dict(estimate_order=0, enhanced_ratio=4.0, ema_decay_rate=1.0), 0.0),
    # B = 10: round(2.5) = 2, so the fifth group 'one' (r = 0) gets the last 2 rows:
    # 2|2|2|2|2. Two runs with the same weights and EMA state but their own data and draws,
    # i.e. two GPUs of a DDP step (whose gradient is the mean): a port's row_blocks = 2.
    "b10a": (10, dict(estimate_order=2, enhanced_ratio=0.8, ema_decay_rate=0.99), 0.62),
    "b10b": (10, dict(estimate_order=2, enhanced_ratio=0.8, ema_decay_rate=0.99), 0.62),
}
COMMON = dict(consistc_ratio=1.0, enhanced_range=[0.0, 1.0], time_dist_ctrl=[1.0, 1.0, 1.0],
              loss_func_type={"type": "barron_reweighting", "alpha": 1.0},
              dist_match_cof=0.5)


class TinyNet(nn.Module):
  """The transformer stand-in: `forward(x_t, t, c, tt=None)` as the official GenTransformer."""

  def __init__(self):
    super().__init__()
    self.fc0 = nn.Linear(D + 1 + K, H)
    self.fc1 = nn.Linear(H, H)
    self.fc2 = nn.Linear(H, D)

  def forward(self, x_t, t, c, tt=None):
    del tt   # aux_time_embed: false
    h = torch.cat([x_t, t.reshape(-1, 1).to(x_t), F.one_hot(c[0], K).to(x_t)], dim=-1)
    return self.fc2(F.silu(self.fc1(F.silu(self.fc0(h)))))


class DDPLike(nn.Module):
  """What the official code uses of DistributedDataParallel: `.module` and forward."""

  def __init__(self, module):
    super().__init__()
    self.module = module

  def forward(self, *args, **kwargs):
    return self.module(*args, **kwargs)


class Wrapper(nn.Module):
  """The official model wrapper (e.g. StableDiffusion3): forward = transformer forward."""

  def __init__(self, transformer):
    super().__init__()
    self.transformer = transformer

  def forward(self, x_t, t, c, tt=None):
    return self.transformer(x_t, t, c, tt)


def official_module(mirror):
  """Imports twinflow_lora from a `git archive` of the mirror's HEAD in a temp dir."""
  commit = subprocess.check_output(["git", "-C", mirror, "rev-parse", "HEAD"],
                                   text=True).strip()
  tmp = tempfile.mkdtemp(prefix="twinflow_official_")
  atexit.register(shutil.rmtree, tmp, ignore_errors=True)
  tar_path = os.path.join(tmp, "src.tar")
  subprocess.check_call(["git", "-C", mirror, "archive", "-o", tar_path, "HEAD", "src"])
  with tarfile.open(tar_path) as tar:
    tar.extractall(tmp)
  sys.path.insert(0, os.path.join(tmp, "src"))
  # CPU run: the official code saves / restores the CUDA RNG around teacher calls.
  torch.cuda.get_rng_state = lambda *a, **k: torch.zeros(1, dtype=torch.uint8)
  torch.cuda.set_rng_state = lambda *a, **k: None
  from methodes.twinflow import twinflow_lora  # pylint: disable=g-import-not-at-top
  return twinflow_lora, commit


def weights(seed):
  """Random non-zero base weights and adapters (numpy, torch layout)."""
  rng = np.random.default_rng(seed)
  w = {}
  for name, (i, o) in {"fc0": (D + 1 + K, H), "fc1": (H, H), "fc2": (H, D)}.items():
    w[f"base/{name}.weight"] = rng.normal(0, 1.0 / np.sqrt(i), (o, i))
    w[f"base/{name}.bias"] = rng.normal(0, 0.1, (o,))
  for adapter, scale in (("default", 0.15), ("old", 0.1)):
    for name in TARGETS:
      i, o = {"fc0": (D + 1 + K, H), "fc2": (H, D)}[name]
      w[f"{adapter}/{name}.lora_A"] = rng.normal(0, 1.0 / RANK, (RANK, i))
      w[f"{adapter}/{name}.lora_B"] = rng.normal(0, scale, (o, RANK))
  return w


def build_model(w):
  """The official LoRA setup (sft_ddp_lora.py) on TinyNet, float64, weights from `w`."""
  from peft import LoraConfig, get_peft_model  # pylint: disable=g-import-not-at-top
  net = TinyNet().double()
  with torch.no_grad():
    for name in ("fc0", "fc1", "fc2"):
      getattr(net, name).weight.copy_(torch.from_numpy(w[f"base/{name}.weight"]))
      getattr(net, name).bias.copy_(torch.from_numpy(w[f"base/{name}.bias"]))
  net.requires_grad_(False)
  config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                      target_modules=TARGETS)
  peft_model = get_peft_model(net, config)
  peft_model.add_adapter("old", config)
  peft_model.set_adapter("default")
  for n, p in peft_model.named_parameters():
    if "lora" not in n or ("lora" in n and "old" in n):
      p.requires_grad = False
    if "lora" in n and "default" in n:
      p.requires_grad = True
  peft_model.double()
  with torch.no_grad():
    for adapter in ("default", "old"):
      for name in TARGETS:
        layer = getattr(peft_model.base_model.model, name)
        layer.lora_A[adapter].weight.copy_(torch.from_numpy(w[f"{adapter}/{name}.lora_A"]))
        layer.lora_B[adapter].weight.copy_(torch.from_numpy(w[f"{adapter}/{name}.lora_B"]))
        assert layer.scaling[adapter] == ALPHA / RANK
  return Wrapper(DDPLike(peft_model)), peft_model


def adapter_arrays(peft_model, adapter, grad=False):
  out = {}
  for name in TARGETS:
    layer = getattr(peft_model.base_model.model, name)
    for key, mod in (("lora_A", layer.lora_A[adapter]), ("lora_B", layer.lora_B[adapter])):
      t = mod.weight.grad if grad else mod.weight
      out[f"{name}.{key}"] = t.detach().numpy().copy()
  return out


@contextlib.contextmanager
def recorded_draws(method, log):
  """Records every torch.rand_like / randn_like / method.sample_beta draw, in order."""
  rand_like, randn_like, sample_beta = torch.rand_like, torch.randn_like, method.sample_beta

  def wrap(kind, fn):
    def drawn(*args, **kwargs):
      out = fn(*args, **kwargs)
      log.append((kind, out.detach().clone()))
      return out
    return drawn

  torch.rand_like, torch.randn_like = wrap("rand", rand_like), wrap("randn", randn_like)
  method.sample_beta = wrap("beta", sample_beta)
  try:
    yield
  finally:
    torch.rand_like, torch.randn_like = rand_like, randn_like
    del method.sample_beta


def name_draws(log, n_adv, n_e2e):
  """Official order: t0, u_tt, u_tmin, [z_adv], z, [z_dm, t_dm] (TWINFLOW.md)."""
  names = [("beta", "t0"), ("rand", "u_tt"), ("rand", "u_tmin")]
  names += [("randn", "z_adv")] if n_adv else []
  names += [("randn", "z")]
  names += [("randn", "z_dm"), ("beta", "t_dm")] if n_e2e else []
  kinds = [k for k, _ in log]
  assert kinds == [k for k, _ in names], (kinds, names)
  out = {name: t.numpy().copy() for (_, name), (_, t) in zip(names, log)}
  for name in ("t0", "u_tt", "u_tmin", "t_dm"):
    if name in out:
      out[name] = out[name].reshape(-1)
  out.setdefault("z_adv", np.zeros((0, D)))
  out.setdefault("z_dm", np.zeros((0, D)))
  out.setdefault("t_dm", np.zeros((0,)))
  return out


def official_sizes(b):
  """The group sizes the official LoRA loss uses (its masks), for the draw shapes."""
  lens = [int(round(b * v / 4)) for v in (1, 1, 1, 1, 0)]
  lens[-1] = b - sum(lens[:-1])
  sizes, cursor = [], 0
  for n in lens:
    sizes.append(max(0, min(n, b - cursor)))
    cursor += n
  return sizes   # e2e, mul, any, adv, one


def run_case(tfl, w, b, kwargs, cmd, seed, online_teacher=False):
  model, peft_model = build_model(w)
  method = tfl.TwinFlow(**COMMON, **kwargs)
  method.cmd = cmd
  if online_teacher:   # the wrong teacher: the online (adapted) model
    method.mod_original = method.mod_ema = lambda *a, **k: method.model(*a, **k)
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 0.5, (b, D))
  labels = rng.integers(0, K - 1, (b,))
  uncond = np.full((b,), K - 1)   # e = the null class (the trainer's train.uncond='null')
  torch.manual_seed(seed)
  log = []
  with recorded_draws(method, log):
    loss = method.training_step(
        model, torch.from_numpy(x.copy()), c=[torch.from_numpy(labels)],
        e=[torch.from_numpy(uncond)], step=0, v=None)
  loss.backward()
  assert loss.dtype == torch.float64
  for n, p in peft_model.named_parameters():   # only the 'default' factors get gradients
    assert (p.grad is not None) == ("default" in n and "lora" in n), n
  n_e2e, _, _, n_adv, _ = official_sizes(b)
  out = {"x": x, "labels": labels, "uncond_labels": uncond, "loss": loss.item(),
         "sizes": np.asarray(official_sizes(b)),
         "cmd_before": cmd, "cmd_after": float(method.cmd)}
  for k, v in name_draws(log, n_adv, n_e2e).items():
    out[f"draw/{k}"] = v
  for k, v in adapter_arrays(peft_model, "default", grad=True).items():
    out[f"grad/{k}"] = v
  for k, v in adapter_arrays(peft_model, "old").items():
    out[f"old_after/{k}"] = v
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--mirror", default="/work/.mirror/inclusionAI+TwinFlow/repo",
                  help="git repository of inclusionAI/TwinFlow (read with git archive)")
  ap.add_argument("--out", default="tests/fixtures/twinflow_lora_ref.npz")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  import peft  # pylint: disable=g-import-not-at-top
  tfl, commit = official_module(args.mirror)
  torch.set_default_dtype(torch.float64)
  w = weights(args.seed)
  arrays = dict(w)
  for i, (case, (b, kwargs, cmd)) in enumerate(CASES.items()):
    out = run_case(tfl, w, b, kwargs, cmd, seed=args.seed + 100 + i)
    wrong = run_case(tfl, w, b, kwargs, cmd, seed=args.seed + 100 + i, online_teacher=True)
    out["loss_online_teacher"] = wrong["loss"]
    for k, v in out.items():
      arrays[f"{case}/{k}"] = np.asarray(v)
    print(f"{case}: B={b} {kwargs} cmd={cmd}: loss {out['loss']:.12g} "
          f"(online teacher {wrong['loss']:.12g})")
  config = dict(D=D, K=K, H=H, rank=RANK, alpha=ALPHA, targets=TARGETS, common=COMMON,
                cases={k: dict(batch=b, cmd=cmd, **kw) for k, (b, kw, cmd) in CASES.items()},
                official_commit=commit, torch=torch.__version__, peft=peft.__version__)
  arrays["config"] = np.asarray(json.dumps(config))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
  main()
