"""Caption embeddings of the t2i families against diffusers' own `encode_prompt`.

The references in tests/fixtures/text_encoders/expected.npz come from running the SD3,
Flux and Qwen-Image pipelines' `encode_prompt` with the tiny random encoders of the same
folders (tools/make_text_encoder_fixture.py), so tokenisation, truncation, padding,
concatenation and masks are checked, not only the encoders. No torch here.
"""

import os

import numpy as np
import pytest

from twinflow_jax.data import captions
from twinflow_jax.data import records

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "text_encoders")
LENGTH = {"sd3": 12, "flux": 12, "qwen_image": 10}  # the fixture's max_sequence_length
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "expected.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def caps(ref):
  return [str(c) for c in ref["captions"]]


_LOADED = {}


def _encoders(family, **kw):
  key = (family, tuple(sorted(kw.items())))
  if key not in _LOADED:
    _LOADED[key] = captions.load_text_encoders(family, os.path.join(FIXTURES, family),
                                               batch_size=4, **kw)
  return _LOADED[key]


def _expected(ref, family):
  txt, mask = ref[f"{family}/txt"], ref[f"{family}/txt_mask"]
  if family == "qwen_image":  # not from the pipeline: the documented masked mean
    pooled = (txt * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  else:
    pooled = ref[f"{family}/pooled"]
  return {"txt": txt, "txt_mask": mask, "pooled": pooled}


def _check(out, want, tol=TOL):
  for k in ("txt", "pooled"):
    assert out[k].dtype == np.float32 and out[k].shape == want[k].shape, k
    err = float(np.max(np.abs(out[k] - want[k])))
    assert err < tol, (k, err)
  np.testing.assert_array_equal(out["txt_mask"], want["txt_mask"])


@pytest.mark.parametrize("family", captions.FAMILIES)
def test_embeddings_match_diffusers_encode_prompt(ref, caps, family):
  enc = _encoders(family)
  out = captions.embed_captions(caps, family, enc, max_length=LENGTH[family])
  want = _expected(ref, family)
  _check(out, want)
  shapes = enc.embedding_shapes(LENGTH[family])
  assert {k: v.shape[1:] for k, v in out.items()} == shapes
  # The records of the t2i schema hold them as they are.
  spec = records.t2i_spec((2, 2, 4), *shapes["txt"], shapes["pooled"][0])
  rec = spec.decode(spec.encode({"latent": np.zeros((2, 2, 4)), "txt": out["txt"][0],
                                 "txt_mask": out["txt_mask"][0],
                                 "pooled": out["pooled"][0]}))
  np.testing.assert_array_equal(rec["txt"], out["txt"][0])
  if family == "qwen_image":
    mask = out["txt_mask"]
    assert not mask[2].all() and mask[3].all()  # short prompt padded, long one truncated
    assert not np.any(out["txt"][~mask])  # zeros on padding
  else:
    assert out["txt_mask"].all()  # the pipelines attend to every token


def test_batch_composition_and_chunking_do_not_change_rows(ref, caps):
  enc = _encoders("qwen_image")  # batch_size 4
  want = _expected(ref, "qwen_image")
  alone = captions.embed_captions([caps[2]], "qwen_image", enc, max_length=10)
  _check(alone, {k: v[2:3] for k, v in want.items()})
  order = [3, 1, 0, 2, 2, 1]  # two calls of 4
  many = captions.embed_captions([caps[i] for i in order], "qwen_image", enc,
                                 max_length=10)
  _check(many, {k: v[order] for k, v in want.items()})


def test_sharded_over_the_mesh_with_fsdp_weights(ref, caps):
  mesh = captions.local_mesh(fsdp=2)  # 8 CPU devices: data 4 x fsdp 2
  enc = _encoders("qwen_image", mesh=mesh)
  assert enc.batch_size == 8
  kernel = enc.params["qwen"]["layers"][0]["gate"]["kernel"][...]
  assert kernel.sharding.spec[0] == "fsdp"  # 'embed' -> fsdp
  out = captions.embed_captions(caps, "qwen_image", enc, max_length=10)
  _check(out, _expected(ref, "qwen_image"))


def test_bfloat16(ref, caps):
  enc = _encoders("flux", dtype="bfloat16")
  assert enc.params["t5"]["embedding"][...].dtype == "bfloat16"
  out = captions.embed_captions(caps, "flux", enc, max_length=12)
  want = _expected(ref, "flux")
  for k in ("txt", "pooled"):
    assert out[k].dtype == np.float32
    # bfloat16 keeps 8 significant bits; through these random encoders (T5's unscaled
    # logits are sharp) the error is about 1% RMS of the float32 result.
    rel = np.sqrt(np.mean((out[k] - want[k])**2) / np.mean(want[k]**2))
    assert 1e-4 < rel < 0.03, (k, rel)


def test_cli_writes_prompt_npz(ref, caps, tmp_path, capsys):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(f"{caps[0]}\n\n{caps[3]}\n{caps[1]}\n", encoding="utf-8")
  out = tmp_path / "p" / "prompts.npz"
  rc = captions.main(["--family", "qwen_image", "--model-dir",
                      os.path.join(FIXTURES, "qwen_image"), "--prompts", str(prompts),
                      "--out", str(out), "--max-length", "10", "--batch-size", "2"])
  assert rc == 0, capsys.readouterr().err
  assert "embedded 3/3 prompts" in capsys.readouterr().out
  want = {k: v[[0, 3, 1]] for k, v in _expected(ref, "qwen_image").items()}
  with np.load(out) as z:
    assert list(z["prompts"]) == [caps[0], caps[3], caps[1]]
    _check({k: z[k] for k in ("txt", "txt_mask", "pooled")}, want)


@pytest.mark.parametrize("args,message", [
    (["--family", "sd3", "--model-dir", "/nonexistent"], "model folder /nonexistent"),
    (["--family", "sd3", "--model-dir", os.path.join(FIXTURES, "flux")],
     "holds a FluxPipeline"),
    (["--family", "qwen_image", "--model-dir", FIXTURES], "lacks text_encoder, tokenizer"),
    (["--family", "flux", "--model-dir", os.path.join(FIXTURES, "flux"),
      "--max-length", "600"], "max_length must be in [1, 512]"),
    (["--family", "flux", "--model-dir", os.path.join(FIXTURES, "flux"),
      "--prompts", "/nonexistent.txt"], "prompt file /nonexistent.txt"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
  prompts = tmp_path / "p.txt"
  prompts.write_text("a cat\n")
  argv = ["--prompts", str(prompts), "--out", str(tmp_path / "o.npz")] + args
  assert captions.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not (tmp_path / "o.npz").exists()


def test_cli_help(capsys):
  with pytest.raises(SystemExit) as e:
    captions.main(["--help"])
  assert e.value.code == 0 and "--model-dir" in capsys.readouterr().out


def test_api_errors():
  with pytest.raises(ValueError, match="unknown text-to-image family 'sdxl'"):
    captions.load_text_encoders("sdxl", FIXTURES)
  enc = _encoders("qwen_image")
  with pytest.raises(ValueError, match="loaded for family 'qwen_image', not 'flux'"):
    captions.embed_captions(["a"], "flux", enc)
  with pytest.raises(ValueError, match="captions must be strings"):
    captions.embed_captions(["a", None], "qwen_image", enc)
