"""Text encoders (CLIP, T5, Qwen2) and their tokenizers against transformers.

References: tests/fixtures/text_encoders/, written by tools/make_text_encoder_fixture.py
with transformers (tiny random encoders, every weight non-zero). No torch here.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from twinflow_jax.data.captions import QWEN_TEMPLATE
from twinflow_jax.data.text_tokenizers import load_tokenizer
from twinflow_jax.models.convert import hf_text
from twinflow_jax.models.convert.state_dict import write_safetensors
from twinflow_jax.models.t5 import relative_position_buckets

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "text_encoders")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  with np.load(os.path.join(FIXTURES, "expected.npz")) as z:
    return {k: z[k] for k in z.files}


def _jit(model):
  """model(*args), compiled once (eager dispatch of the many small ops is slower)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  return lambda *args: fn(state, *args)


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)))


# Flux's CLIP (no projection) and T5 are checked through the Flux pipeline embeddings
# in test_captions.py.
@pytest.mark.parametrize("folder,key", [("sd3/text_encoder", "sd3/clip_l"),  # quick_gelu
                                        ("sd3/text_encoder_2", "sd3/clip_g")])  # gelu
def test_clip_matches_transformers(ref, folder, key):
  model = _jit(hf_text.load_text_encoder(os.path.join(FIXTURES, folder), "clip"))
  out = model(jnp.asarray(ref[f"{key}/input_ids"]))
  assert _err(out["hidden_states"][-2], ref[f"{key}/penultimate"]) < TOL
  assert _err(out["last_hidden_state"], ref[f"{key}/last_hidden_state"]) < TOL
  if f"{key}/text_embeds" in ref:  # CLIPTextModelWithProjection
    assert _err(out["text_embeds"], ref[f"{key}/text_embeds"]) < TOL
  else:
    assert "text_embeds" not in out
    assert _err(out["pooler_output"], ref[f"{key}/pooler_output"]) < TOL


def test_t5_matches_transformers_with_and_without_mask(ref):
  model = _jit(hf_text.load_text_encoder(os.path.join(FIXTURES, "sd3", "text_encoder_3"),
                                         "t5"))
  ids, mask = ref["sd3/t5/input_ids"], ref["sd3/t5/attention_mask"]
  assert _err(model(jnp.asarray(ids)), ref["sd3/t5/last_hidden_state"]) < TOL
  masked = model(jnp.asarray(ids), jnp.asarray(mask))
  assert _err(masked, ref["sd3/t5/last_hidden_state_masked"]) < TOL


def test_t5_position_buckets_match_transformers_for_t5_xxl(ref):
  # T5-XXL's 32 buckets / distance 128, offsets -1100..1100 (float32 log edges).
  buckets = relative_position_buckets(1101, 32, 128)
  want = ref["t5_buckets_32_128"]
  np.testing.assert_array_equal(buckets[0], want[1100:])  # key - query = 0..1100
  np.testing.assert_array_equal(buckets[-1], want[:1101])  # -1100..0


def test_qwen2_language_model_matches_transformers(ref):
  model = _jit(hf_text.load_text_encoder(
      os.path.join(FIXTURES, "qwen_image", "text_encoder"), "qwen2"))
  ids, mask = ref["qwen_image/lm/input_ids"], ref["qwen_image/lm/attention_mask"]
  assert not mask.all()  # right padding in the reference batch
  hidden = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert float(np.abs(hidden - ref["qwen_image/lm/last_hidden_state"])[mask].max()) < TOL
  # Left padding gives the same states: positions count real tokens only.
  n = int(mask[2].sum())
  left_ids = np.concatenate([ids[2, n:], ids[2, :n]])[None]
  left_mask = np.concatenate([mask[2, n:], mask[2, :n]])[None]
  left = np.asarray(model(jnp.asarray(left_ids), jnp.asarray(left_mask)))
  assert _err(left[0, -n:], hidden[2, :n]) < TOL


@pytest.mark.parametrize("folder,kind,key,eos", [
    ("sd3/tokenizer", "clip", "sd3/clip_l", "<|endoftext|>"),  # vocab.json + merges.txt
    ("sd3/tokenizer_2", "clip", "sd3/clip_g", "<|endoftext|>"),  # pad '!', special
    ("flux/tokenizer", "clip", "flux/clip", "<|endoftext|>"),  # tokenizer.json
    ("sd3/tokenizer_3", "t5", "sd3/t5", "</s>"),
    ("qwen_image/tokenizer", "qwen2", "qwen_image/lm", None),  # + added chat tokens
])
def test_tokenizers_match_transformers(ref, folder, kind, key, eos):
  tok = load_tokenizer(os.path.join(FIXTURES, folder), kind)
  captions = [str(c) for c in ref["captions"]]
  if kind == "qwen2":
    captions = [QWEN_TEMPLATE.format(c) for c in captions]
  want = ref[f"{key}/input_ids"]
  ids, mask = tok(captions, want.shape[1])
  np.testing.assert_array_equal(ids, want)
  if f"{key}/attention_mask" in ref:
    np.testing.assert_array_equal(mask, ref[f"{key}/attention_mask"])
  # The long caption is truncated and still ends with the end-of-text token.
  assert mask[3].all()
  if eos is not None:
    assert ids[3, -1] == tok.tokenizer.token_to_id(eos)


def test_sharded_bfloat16_safetensors(tmp_path):
  """An index of two bf16 shards loads to the same weights as the bf16 values."""
  src = os.path.join(FIXTURES, "sd3", "text_encoder")
  weights = hf_text.SafetensorsFolder(src)
  keys = sorted(weights.keys())
  bf16 = {k: np.asarray(weights.get(k), jnp.bfloat16) for k in keys}
  halves = (keys[:len(keys) // 2], keys[len(keys) // 2:])
  weight_map = {}
  for i, part in enumerate(halves):
    name = f"model-0000{i + 1}-of-00002.safetensors"
    write_safetensors(str(tmp_path / name), {k: bf16[k] for k in part})
    weight_map.update({k: name for k in part})
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
  reread = hf_text.SafetensorsFolder(str(tmp_path))
  for k in keys:
    assert reread.get(k).dtype == jnp.bfloat16
    np.testing.assert_array_equal(reread.get(k), bf16[k])
  model = hf_text.load_text_encoder(str(tmp_path), "clip", dtype=jnp.bfloat16)
  assert model.token_embedding[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(model.layers[0].attn.q.kernel[...], np.float32),
      bf16["text_model.encoder.layers.0.self_attn.q_proj.weight"].astype(np.float32).T
      .reshape(16, 2, 8))


def test_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_text.load_text_encoder(str(tmp_path / "nope"), "clip")
  with pytest.raises(ValueError, match="unknown text encoder kind"):
    hf_text.load_text_encoder(str(tmp_path), "bert")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf_text.load_text_encoder(str(tmp_path), "t5")
  # A CLIP folder read as T5: the missing config field is named.
  with pytest.raises(ValueError, match="config.json lacks 'd_model'"):
    hf_text.load_text_encoder(os.path.join(FIXTURES, "sd3", "text_encoder"), "t5")
  # CLIP config with T5 weights: the missing tensors are named.
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  shutil.copy(os.path.join(FIXTURES, "sd3", "text_encoder", "config.json"), mixed)
  shutil.copy(os.path.join(FIXTURES, "sd3", "text_encoder_3", "model.safetensors"), mixed)
  with pytest.raises(ValueError, match="lacks tensors.*embeddings.position_embedding"):
    hf_text.load_text_encoder(str(mixed), "clip")
  # A truncated weights file.
  shutil.copy(os.path.join(FIXTURES, "sd3", "text_encoder", "config.json"), tmp_path)
  with open(tmp_path / "model.safetensors", "wb") as f:
    f.write(b"\x10\x00")
  with pytest.raises(ValueError, match="too short"):
    hf_text.load_text_encoder(str(tmp_path), "clip")
  # T5 tokenizer without tokenizer.json.
  t5_dir = tmp_path / "tok"
  t5_dir.mkdir()
  (t5_dir / "spiece.model").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_tokenizer(str(t5_dir), "t5")
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
    load_tokenizer(str(t5_dir), "clip")
