"""Collectives of the compiled DiT train step, read from its HLO text (run as a script).

`python tests/hlo_collectives.py CASES_JSON` compiles the shrunk default config (a tiny
DiT on MNIST) for each case `{"mesh": [data, fsdp, tensor], "row_blocks": G}` (optionally
`"overrides": {config field: value}`, optional `"model": {model field: value}`) on 8 simulated CPU devices and prints one JSON line per case with its data-moving collectives
(all-gather, all-to-all, collective-permute: op and result shapes). Before each compile
it writes a `### case <i>` marker to stderr, so that the XLA warnings that follow (C++
logging to stderr, e.g. "Involuntary full rematerialization") belong to that case.

The test model is sized so that activations can be told from weights by shape alone:
10 x 10 x 1 images in 2 x 2 patches give T = 25 tokens, and no weight has a dimension
that 25 divides or that equals the image side 10 (widths are 32, 64, 96, 128, 192, 256,
3, 2, 16, 4 and 11 classes, and their shards).
"""

import json
import os
import re
import sys

TOKENS = 25         # (10 / 2) ** 2
IMAGE_SIDE = 10
BATCH = 32          # 8 blocks of 4 rows on 8 batch shards
MODEL = {"name": "DiT-S/2", "depth": 1, "hidden_size": 32, "num_heads": 2,
         "mlp_ratio": 4.0, "in_channels": 1, "input_size": IMAGE_SIDE, "num_classes": 10}
KINDS = ("all-gather", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(.+?)\s+(all-gather|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """(op, result shapes) of every all-gather, all-to-all and collective-permute."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m:
      shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(m.group(1))]
      out.append((m.group(2), shapes))
  return out


def moves_activations(shape: tuple[int, ...]) -> bool:
  """True for a result holding token activations ([.., T, ..] or T-multiple flattenings)
  or image rows ([.., 10, 10, ..], [.., 100]); per-row vectors [rows, width] and weights
  are not."""
  return any(d % TOKENS == 0 or d == IMAGE_SIDE for d in shape if d > 1)


def _main(cases):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flag = "--xla_force_host_platform_device_count=8"
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  import test_train_loop  # pylint: disable=g-import-not-at-top
  from twinflow_jax.train import loop  # pylint: disable=g-import-not-at-top

  for i, case in enumerate(cases):
    data, fsdp, tensor = case["mesh"]
    cfg = test_train_loop.tiny_dit_config(**{
        "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
        "loss.row_blocks": case["row_blocks"], "train.global_batch_size": BATCH,
        "data.image_size": IMAGE_SIDE, "train.compilation_cache_dir": "",
        **case.get("overrides", {})})
    cfg.model = {**MODEL, **case.get("model", {})}
    sys.stderr.write(f"### case {i}\n")
    sys.stderr.flush()
    text = loop.compile_step(loop.build(cfg)).as_text()
    found = [(op, shapes) for op, shapes in collectives(text)]
    print(json.dumps({"case": case, "collectives": found}), flush=True)
  sys.stderr.write("### end\n")
  sys.stderr.flush()


if __name__ == "__main__":
  _main(json.loads(sys.argv[1]))
