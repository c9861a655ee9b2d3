"""The compiled DiT train step keeps the loss's rows on their batch shards.

With `loss.row_blocks` = the number of batch shards, the train step on (8, 1, 1),
(2, 2, 2) and (1, 8, 1) meshes moves no activations between devices: its HLO has no
all-gather, all-to-all or collective-permute of token activations or image rows (FSDP
weight gathers and per-row vectors [rows, width] are allowed; tensor-parallel all-reduces
are not counted), and XLA reports no involuntary full rematerialisation. The official
layout (row_blocks = 1) on the same data-parallel mesh does move image rows, which shows
that the check can fail. Autoguidance (`train.guide_from`, one more network call with an
evaluation EMA's weights) and the bfloat16 model (whose attention takes another layout on
CPU) are checked on the (2, 2, 2) mesh. How activations are told from weights: `hlo_collectives.py`.

The six compiles run in one subprocess (the warnings are C++ logging on stderr) with
LLVM's optimisation turned down, which leaves XLA's partitioning untouched; about 45 s of
CPU on 2 cores.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import hlo_collectives  # noqa: E402  pylint: disable=g-import-not-at-top

import cpu_env

LOCAL = [((8, 1, 1), 8), ((2, 2, 2), 4), ((1, 8, 1), 8)]   # row_blocks = data x fsdp
OFFICIAL = ((8, 1, 1), 1)
# Autoguidance (train.guide_from) adds a network call with the evaluation EMA's weights.
GUIDED = ((2, 2, 2), 4)
GUIDE = {"train.eval_ema_decays": (0.999,), "train.guide_from": "0.999"}
# The bfloat16 model: on CPU its attention takes another layout (models/attention.py).
BF16 = ((2, 2, 2), 4)


def test_activation_shapes_are_told_from_weights():
  act = hlo_collectives.moves_activations
  assert act((1, 16, 10, 10, 1)) and act((4, 25, 32)) and act((2, 100)) and act((3, 800))
  assert not any(act(s) for s in [(32, 96), (8, 32), (256, 16), (32, 3, 1, 16), (11, 32),
                                  (4, 192), (1, 4, 1, 96), (32,)])
  text = ("  %all-gather.2 = f32[16,32]{0,1} all-gather(%wrapped_copy.2), channel_id=6\n"
          "  %cp = f32[1,2,10,10,1]{4,3,2,1,0} collective-permute(%x), channel_id=7\n"
          "  %a2a = (f32[1,4,1,32]{3,2,1,0}, f32[1,4,1,32]{3,2,1,0}) all-to-all(%a, %b)\n"
          "  %ar = f32[4,25,32]{2,1,0} all-reduce(%y), to_apply=%add\n")
  assert hlo_collectives.collectives(text) == [
      ("all-gather", [(16, 32)]), ("collective-permute", [(1, 2, 10, 10, 1)]),
      ("all-to-all", [(1, 4, 1, 32), (1, 4, 1, 32)])]


@pytest.fixture(scope="module")
def compiled_cases():
  cases = [{"mesh": list(m), "row_blocks": g} for m, g in LOCAL + [OFFICIAL]]
  cases.append({"mesh": list(GUIDED[0]), "row_blocks": GUIDED[1], "overrides": GUIDE})
  cases.append({"mesh": list(BF16[0]), "row_blocks": BF16[1], "model": {"dtype": "bfloat16"}})
  env = cpu_env.subprocess_env(8)
  out = subprocess.run([sys.executable, str(HERE / "hlo_collectives.py"), json.dumps(cases)],
                       capture_output=True, text=True, env=env, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(results) == len(cases), out.stdout[-2000:]
  # stderr between "### case i" and the next marker belongs to case i.
  logs = out.stderr.split("### case ")[1:]
  assert len(logs) == len(cases)
  variant = lambda c: "guided" if c.get("overrides") else "bf16" if c.get("model") else ""
  return {(tuple(r["case"]["mesh"]), r["case"]["row_blocks"], variant(r["case"])):
          (r["collectives"], log) for r, log in zip(results, logs)}


@pytest.mark.slow
@pytest.mark.parametrize("mesh,row_blocks,variant", [c + ("",) for c in LOCAL] +
                         [GUIDED + ("guided",), BF16 + ("bf16",)], ids=lambda v: str(v))
def test_shard_local_rows_move_no_activations(compiled_cases, mesh, row_blocks, variant):
  found, log = compiled_cases[(mesh, row_blocks, variant)]
  moving = [(op, s) for op, shapes in found for s in shapes
            if hlo_collectives.moves_activations(tuple(s))]
  assert not moving, moving
  assert "Involuntary full rematerialization" not in log, log[-3000:]
  if mesh != (8, 1, 1):
    # FSDP gathers weights there: the parser does see the step's collectives.
    assert any(op == "all-gather" for op, _ in found)


@pytest.mark.slow
def test_official_layout_moves_image_rows(compiled_cases):
  found, _ = compiled_cases[OFFICIAL + ("",)]
  assert any(hlo_collectives.moves_activations(tuple(s)) for _, shapes in found
             for s in shapes)
