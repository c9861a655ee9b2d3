r"""Writes tests/fixtures/text_encoders/: tiny text encoders, tokenizers and references.

Needs transformers, tokenizers, diffusers and torch (only this script; the tests read
the written files without torch):

  /work/venv-tools/bin/python tools/make_text_encoder_fixture.py \
      [--out tests/fixtures/text_encoders]

Three diffusers-style pipeline folders are written, each holding only the text
components that `twinflow_jax.data.captions.load_text_encoders` reads:

  sd3/         text_encoder   CLIPTextModelWithProjection, quick_gelu, legacy eos_token_id=2
               text_encoder_2 CLIPTextModelWithProjection, gelu, eos_token_id = the EOS id
               text_encoder_3 T5EncoderModel (gated-gelu, T5 v1.1)
               tokenizer, tokenizer_2   CLIP BPE as vocab.json + merges.txt (pad
                                        '<|endoftext|>' and '!', as SD3 ships them)
               tokenizer_3              T5 Unigram as tokenizer.json
  flux/        text_encoder CLIPTextModel, text_encoder_2 T5EncoderModel, tokenizers as sd3
  qwen_image/  text_encoder Qwen2_5_VLForConditionalGeneration (tiny vision tower too),
               tokenizer Qwen2 byte-level BPE as vocab.json + merges.txt + added tokens

Configs are tiny and every weight (norm scales, biases, T5's relative position table) is
random and non-zero. The BPE tokenizers are learnt on a small corpus by a deterministic
BPE loop (the `tokenizers` trainers are not deterministic), the T5 Unigram vocabulary is
fixed; the Qwen2 one is built so that Qwen-Image's prompt template prefix is the same
34 tokens as with the real vocabulary. Weights are written as float32 safetensors
(`save_pretrained`), the models run in float32.

`expected.npz` holds, for the captions in `CAPTIONS`:
  <fam>/<enc>/input_ids            token ids from the transformers tokenizers
  <fam>/<enc>/...                  encoder outputs (hidden states, pooled vectors)
  <fam>/txt, <fam>/txt_mask, <fam>/pooled
                                   the pipeline-level embeddings from diffusers' own
                                   `encode_prompt` (see docs/text-embeddings.md for the
                                   padding to a fixed length and the masks)
  t5_buckets_32_128                T5's relative position buckets (num_buckets 32,
                                   max_distance 128, bidirectional) for relative
                                   positions -1100..1100, from transformers
"""

import argparse
import collections
import json
import os
import shutil

import diffusers
import numpy as np
import torch
import transformers
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)
from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel,
                          CLIPTextModelWithProjection, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, T5EncoderModel, T5Config)
from transformers.models.t5.modeling_t5 import T5Attention

CAPTIONS = [
    "A red cube on a blue table",
    "Two cats, sleeping on the sofa!!",
    "",
    ("A very long caption about a small red house with a green door, a tall tree, "
     "three birds on the roof, a blue car in front of the house, and many clouds "
     "in the evening sky over the quiet street"),
]
CLIP_LENGTH = 16  # tokenizer model_max_length (77 in the real models)
T5_LENGTH = 12  # max_sequence_length of the SD3 / Flux embeddings in the fixture
QWEN_LENGTH = 10  # max_sequence_length of the Qwen-Image embeddings in the fixture

QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
              r"""[\p{N}]|[^\s\p{L}\p{N}]+""")
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"""
              r"""[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def corpus() -> list[str]:
  plain = QWEN_TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "")
  return ([plain.format(c) for c in CAPTIONS] * 40
          + ["a photo of a dog running on the grass near a river"] * 10)


# ---------------------------------------------------------------------------
# Tokenizers.


def write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False)


def bpe_vocab_merges(normalizer, pre_tokenizer, num_merges, suffix=""):
  """Byte-level BPE merges learnt on the corpus, deterministically.

  (The `tokenizers` trainers break ties between equally frequent pairs differently
  from run to run.) Each step merges the most frequent adjacent pair, ties broken by
  the pair's text; words are the pre-tokenizer's pieces, the suffix marks word ends.
  """
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizer
  words = collections.Counter()
  for text in corpus():
    for piece, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
      symbols = list(piece)
      symbols[-1] += suffix
      words[tuple(symbols)] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    if pairs[best] < 2:
      break
    merges.append(best)
    merged = collections.Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged
  return merges


def byte_alphabet() -> list[str]:
  """The 256 byte-level symbols in GPT-2 / CLIP `bytes_to_unicode` order."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def write_vocab_merges(folder, vocab, merges):
  write_json(os.path.join(folder, "vocab.json"), vocab)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)


def added_decoder(tokens: dict[str, int], normalized: bool) -> dict:
  return {str(i): {"content": t, "lstrip": False, "normalized": normalized,
                   "rstrip": False, "single_word": False, "special": True}
          for t, i in tokens.items()}


def make_clip_tokenizer(folder, pad_token):
  """CLIP layout: 256 bytes, 256 bytes + '</w>', merges, <|startoftext|>, <|endoftext|>."""
  os.makedirs(folder, exist_ok=True)
  normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  pre = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  merges = bpe_vocab_merges(normalizer, pre, 200, suffix="</w>")
  alphabet = byte_alphabet()
  tokens = alphabet + [a + "</w>" for a in alphabet]
  for a, b in merges:
    if a + b not in tokens:
      tokens.append(a + b)
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(tokens)}
  write_vocab_merges(folder, vocab, merges)
  specials = {"<|startoftext|>": vocab["<|startoftext|>"],
              "<|endoftext|>": vocab["<|endoftext|>"]}
  write_json(os.path.join(folder, "tokenizer_config.json"), {
      "added_tokens_decoder": added_decoder(specials, normalized=True),
      "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
      "unk_token": "<|endoftext|>", "pad_token": pad_token,
      "model_max_length": CLIP_LENGTH, "clean_up_tokenization_spaces": True,
      "do_lower_case": True, "errors": "replace", "tokenizer_class": "CLIPTokenizer"})
  write_json(os.path.join(folder, "special_tokens_map.json"), {
      "bos_token": {"content": "<|startoftext|>", "lstrip": False, "normalized": True,
                    "rstrip": False, "single_word": False},
      "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True,
                    "rstrip": False, "single_word": False},
      "pad_token": pad_token, "unk_token": "<|endoftext|>"})
  return len(vocab), vocab["<|endoftext|>"]


def make_t5_tokenizer(folder):
  """T5 layout: <pad>=0, </s>=1, <unk>=2, Unigram pieces; '$A </s>' post-processor."""
  os.makedirs(folder, exist_ok=True)
  # A fixed Unigram vocabulary (the trainer is not deterministic): whole words of the
  # template and a few short words, 3-letter stems of the others, single characters.
  words = sorted({w.lower().strip(",.:!") for w in " ".join(corpus()).split()} - {""})
  pieces = [(f"▁{w}", -2.0 - 0.1 * len(w)) for w in words
            if len(w) <= 4 or w in QWEN_TEMPLATE]
  pieces += [(f"▁{w[:3]}", -6.0) for w in words if len(w) > 4 and w not in QWEN_TEMPLATE]
  chars = sorted(set("".join(words)) | set(",.:!"))
  pieces += [("▁", -3.0)] + [(c, -8.0) for c in chars]
  vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(dict(pieces).items())
  tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
  # No normaliser: the real tokenizer.json has sentencepiece's Precompiled (nmt_nfkc)
  # one, which cannot be made here, and transformers 5 rebuilds T5 tokenizers without
  # any other normaliser, so the ids of transformers and of tokenizer.json agree.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1
  tok.save(os.path.join(folder, "tokenizer.json"))
  write_json(os.path.join(folder, "tokenizer_config.json"), {
      "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0,
      "additional_special_tokens": [], "model_max_length": 512,
      "clean_up_tokenization_spaces": True, "tokenizer_class": "T5Tokenizer"})
  write_json(os.path.join(folder, "special_tokens_map.json"), {
      "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
  return tok.get_vocab_size()


def make_qwen_tokenizer(folder):
  """Qwen2 layout: byte-level BPE vocab.json + merges.txt, chat tokens after the vocab."""
  os.makedirs(folder, exist_ok=True)
  pre = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  merges = bpe_vocab_merges(normalizers.NFC(), pre, 200)
  tokens = byte_alphabet()
  for a, b in merges:
    if a + b not in tokens:
      tokens.append(a + b)
  vocab = {t: i for i, t in enumerate(tokens)}
  write_vocab_merges(folder, vocab, merges)
  specials = {t: len(vocab) + i for i, t in
              enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
  write_json(os.path.join(folder, "added_tokens.json"), specials)
  write_json(os.path.join(folder, "tokenizer_config.json"), {
      "add_prefix_space": False, "added_tokens_decoder": added_decoder(specials, False),
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
      "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
      "clean_up_tokenization_spaces": False, "tokenizer_class": "Qwen2Tokenizer"})
  write_json(os.path.join(folder, "special_tokens_map.json"), {
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  return len(vocab) + len(specials)


# ---------------------------------------------------------------------------
# Models.


def randomise(model, seed):
  """Every parameter random and non-zero (norm scales around 1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g, dtype=torch.float64)
      if "norm" in name:
        v = 1.0 + 0.2 * r
      elif name.endswith("bias") and "relative_attention_bias" not in name:
        v = 0.1 * r
      elif p.ndim == 2 and ("embed" in name or "shared" in name
                            or "relative_attention_bias" in name):
        v = 0.5 * r
      else:
        v = r / np.sqrt(p.shape[-1])
      p.copy_(v.to(p.dtype))
  return model.eval()


def save_model(model, folder):
  model.save_pretrained(folder, safe_serialization=True)


def clip_outputs(model, tokenizer, captions, prefix, out):
  enc = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt")
  with torch.no_grad():
    o = model(enc.input_ids, output_hidden_states=True)
  out[f"{prefix}/input_ids"] = enc.input_ids.numpy().astype(np.int32)
  out[f"{prefix}/penultimate"] = o.hidden_states[-2].numpy()
  out[f"{prefix}/last_hidden_state"] = o.last_hidden_state.numpy()
  if hasattr(o, "text_embeds"):
    out[f"{prefix}/text_embeds"] = o.text_embeds.numpy()
  else:
    out[f"{prefix}/pooler_output"] = o.pooler_output.numpy()


def t5_outputs(model, tokenizer, captions, prefix, out):
  enc = tokenizer(captions, padding="max_length", max_length=T5_LENGTH, truncation=True,
                  return_tensors="pt")
  with torch.no_grad():
    plain = model(enc.input_ids)[0]
    masked = model(enc.input_ids, attention_mask=enc.attention_mask)[0]
  out[f"{prefix}/input_ids"] = enc.input_ids.numpy().astype(np.int32)
  out[f"{prefix}/attention_mask"] = enc.attention_mask.numpy().astype(bool)
  out[f"{prefix}/last_hidden_state"] = plain.numpy()
  out[f"{prefix}/last_hidden_state_masked"] = masked.numpy()


def t5_config(vocab_size, d_model, d_ff):
  return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=d_ff, num_layers=2,
                  num_heads=4, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                  layer_norm_epsilon=1e-6, dropout_rate=0.0, is_encoder_decoder=False,
                  use_cache=False, pad_token_id=0, eos_token_id=1,
                  tie_word_embeddings=False)


def t5_buckets_reference():
  rel = torch.arange(-1100, 1101)
  return T5Attention._relative_position_bucket(  # pylint: disable=protected-access
      rel, bidirectional=True, num_buckets=32, max_distance=128).numpy().astype(np.int8)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="tests/fixtures/text_encoders")
  args = p.parse_args()
  torch.manual_seed(0)
  diffusers.utils.logging.set_verbosity_error()
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  if os.path.isdir(args.out):
    shutil.rmtree(args.out)
  out = {}

  # --- SD3: CLIP-L + CLIP-G (projections) + T5. ---
  sd3 = os.path.join(args.out, "sd3")
  n_clip, eos = make_clip_tokenizer(os.path.join(sd3, "tokenizer"), "<|endoftext|>")
  make_clip_tokenizer(os.path.join(sd3, "tokenizer_2"), "!")
  n_t5 = make_t5_tokenizer(os.path.join(sd3, "tokenizer_3"))
  clip_l = randomise(CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=n_clip, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
      num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
      projection_dim=12, layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1,
      eos_token_id=2)), 1)
  clip_g = randomise(CLIPTextModelWithProjection(CLIPTextConfig(
      vocab_size=n_clip, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
      num_attention_heads=3, max_position_embeddings=CLIP_LENGTH, hidden_act="gelu",
      projection_dim=20, layer_norm_eps=1e-5, bos_token_id=eos - 1, pad_token_id=1,
      eos_token_id=eos)), 2)
  t5 = randomise(T5EncoderModel(t5_config(n_t5, 48, 40)), 3)
  save_model(clip_l, os.path.join(sd3, "text_encoder"))
  save_model(clip_g, os.path.join(sd3, "text_encoder_2"))
  save_model(t5, os.path.join(sd3, "text_encoder_3"))
  write_json(os.path.join(sd3, "model_index.json"),
             {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1"})
  toks = [AutoTokenizer.from_pretrained(os.path.join(sd3, f"tokenizer{s}"))
          for s in ("", "_2", "_3")]
  print("tokenizer classes:", [type(t).__name__ for t in toks])
  clip_outputs(clip_l, toks[0], CAPTIONS, "sd3/clip_l", out)
  clip_outputs(clip_g, toks[1], CAPTIONS, "sd3/clip_g", out)
  t5_outputs(t5, toks[2], CAPTIONS, "sd3/t5", out)
  pipe = StableDiffusion3Pipeline(
      transformer=None, scheduler=None, vae=None, text_encoder=clip_l, tokenizer=toks[0],
      text_encoder_2=clip_g, tokenizer_2=toks[1], text_encoder_3=t5, tokenizer_3=toks[2])
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(
        CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False,
        max_sequence_length=T5_LENGTH)
  out["sd3/txt"] = embeds.numpy()
  out["sd3/pooled"] = pooled.numpy()
  # The pipeline attends to every token (no mask): all True.
  out["sd3/txt_mask"] = np.ones(embeds.shape[:2], bool)

  # --- Flux: CLIP-L pooled (no projection) + T5. ---
  flux = os.path.join(args.out, "flux")
  make_clip_tokenizer(os.path.join(flux, "tokenizer"), "<|endoftext|>")
  make_t5_tokenizer(os.path.join(flux, "tokenizer_2"))
  # This CLIP tokenizer also has a tokenizer.json (transformers' own backend), so both
  # ways of reading a CLIP tokenizer are tested.
  AutoTokenizer.from_pretrained(os.path.join(flux, "tokenizer")).backend_tokenizer.save(
      os.path.join(flux, "tokenizer", "tokenizer.json"))
  clip = randomise(CLIPTextModel(CLIPTextConfig(
      vocab_size=n_clip, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
      layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2)), 4)
  t5f = randomise(T5EncoderModel(t5_config(n_t5, 32, 24)), 5)
  save_model(clip, os.path.join(flux, "text_encoder"))
  save_model(t5f, os.path.join(flux, "text_encoder_2"))
  write_json(os.path.join(flux, "model_index.json"),
             {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"})
  ftoks = [AutoTokenizer.from_pretrained(os.path.join(flux, f"tokenizer{s}"))
           for s in ("", "_2")]
  clip_outputs(clip, ftoks[0], CAPTIONS, "flux/clip", out)
  t5_outputs(t5f, ftoks[1], CAPTIONS, "flux/t5", out)
  fpipe = FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=ftoks[0],
                       text_encoder_2=t5f, tokenizer_2=ftoks[1], transformer=None)
  with torch.no_grad():
    embeds, pooled, _ = fpipe.encode_prompt(CAPTIONS, None, device="cpu",
                                            max_sequence_length=T5_LENGTH)
  out["flux/txt"] = embeds.numpy()
  out["flux/pooled"] = pooled.numpy()
  out["flux/txt_mask"] = np.ones(embeds.shape[:2], bool)

  # --- Qwen-Image: Qwen2.5-VL language model on the templated prompt. ---
  qwen = os.path.join(args.out, "qwen_image")
  n_qwen = make_qwen_tokenizer(os.path.join(qwen, "tokenizer"))
  qtok = AutoTokenizer.from_pretrained(os.path.join(qwen, "tokenizer"))
  prefix = qtok(QWEN_TEMPLATE.format("")).input_ids
  assert len(prefix) == 39, len(prefix)  # 34 dropped + '<|im_end|>\n<|im_start|>assistant\n'
  cfg = Qwen2_5_VLConfig(
      text_config=dict(vocab_size=n_qwen, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       rms_norm_eps=1e-6, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [1, 1, 2]},
                       bos_token_id=n_qwen - 3, eos_token_id=n_qwen - 1),
      vision_config=dict(depth=1, hidden_size=8, intermediate_size=8, num_heads=2,
                         patch_size=2, temporal_patch_size=1, spatial_merge_size=1,
                         window_size=4, out_hidden_size=32, fullatt_block_indexes=[0]),
      tie_word_embeddings=True)
  qwen_model = randomise(Qwen2_5_VLForConditionalGeneration(cfg), 6)
  save_model(qwen_model, os.path.join(qwen, "text_encoder"))
  write_json(os.path.join(qwen, "model_index.json"),
             {"_class_name": "QwenImagePipeline", "_diffusers_version": "0.42.1"})
  texts = [QWEN_TEMPLATE.format(c) for c in CAPTIONS]
  enc = qtok(texts, padding="max_length", max_length=QWEN_LENGTH + 34, truncation=True,
             return_tensors="pt")
  assert qtok.padding_side == "right"
  with torch.no_grad():
    o = qwen_model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   output_hidden_states=True)
  with torch.no_grad():
    base = qwen_model.model.language_model(input_ids=enc.input_ids,
                                           attention_mask=enc.attention_mask)
  assert torch.equal(o.hidden_states[-1], base.last_hidden_state)  # post final norm
  out["qwen_image/lm/input_ids"] = enc.input_ids.numpy().astype(np.int32)
  out["qwen_image/lm/attention_mask"] = enc.attention_mask.numpy().astype(bool)
  out["qwen_image/lm/last_hidden_state"] = o.hidden_states[-1].numpy()
  qpipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=qwen_model,
                            tokenizer=qtok, transformer=None)
  with torch.no_grad():
    embeds, mask = qpipe.encode_prompt(CAPTIONS, device="cpu",
                                       max_sequence_length=QWEN_LENGTH)
  b, n, d = embeds.shape
  mask = torch.ones(b, n, dtype=torch.long) if mask is None else mask
  txt = np.zeros((b, QWEN_LENGTH, d), np.float32)
  txt_mask = np.zeros((b, QWEN_LENGTH), bool)
  txt[:, :n] = embeds.numpy()
  txt_mask[:, :n] = mask.numpy().astype(bool)
  out["qwen_image/txt"] = txt
  out["qwen_image/txt_mask"] = txt_mask

  out["t5_buckets_32_128"] = t5_buckets_reference()
  out["captions"] = np.array(CAPTIONS)
  out["lengths"] = np.array([CLIP_LENGTH, T5_LENGTH, QWEN_LENGTH], np.int32)
  np.savez_compressed(os.path.join(args.out, "expected.npz"), **out)
  total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out)
              for f in fs)
  print(f"wrote {args.out}: {total / 1024:.0f} KiB")
  for k, v in out.items():
    print(f"  {k}: {v.shape} {v.dtype}")


if __name__ == "__main__":
  main()
