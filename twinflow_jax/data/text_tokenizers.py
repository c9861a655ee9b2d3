"""Tokenizers of the text encoders, with the `tokenizers` package (Rust, no torch).

A tokenizer folder of a diffusers pipeline (tokenizer/, tokenizer_2/, ...) holds either a
`tokenizer.json` (a serialised `tokenizers.Tokenizer`, loaded as is: what transformers'
fast tokenizers do) or, for the byte-level BPE tokenizers, `vocab.json` + `merges.txt`
(SD3's and Flux's CLIP tokenizers, Qwen-Image's Qwen2 tokenizer). From those two files the
tokenizer is rebuilt exactly as transformers 5's `CLIPTokenizer` / `Qwen2Tokenizer` build
it:

  clip   normalise NFC, collapse whitespace, lowercase; split on CLIP's word regex;
         byte-level BPE with the '</w>' end-of-word suffix; '<|startoftext|> ...
         <|endoftext|>' around every text.
  qwen2  normalise NFC; split on Qwen2's regex; byte-level BPE without suffix; no tokens
         added around the text.

The tokens of `tokenizer_config.json`'s `added_tokens_decoder` and of `added_tokens.json`
(Qwen's <|im_start|>, <|im_end|>, ...) are added with their flags and checked to keep
their ids. T5's sentencepiece `spiece.model` is not read: T5 folders need their
`tokenizer.json` (the SD3 and Flux repositories ship it).

Texts are always padded on the right to a fixed length with the folder's pad token, and
truncated on the right keeping the special tokens (the end-of-text token stays last).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

KINDS = ("clip", "t5", "qwen2")
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
               r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"""
                r"""[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_DEFAULT_PAD = {"clip": "<|endoftext|>", "t5": "<pad>", "qwen2": "<|endoftext|>"}


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        'caption embedding needs the `tokenizers` package: pip install -e ".[prep]" '
        "(or pip install tokenizers)") from e
  return tokenizers


@dataclasses.dataclass
class TextTokenizer:
  """A `tokenizers.Tokenizer` with the pad token and length of its folder.

  Attributes:
    tokenizer: the Rust tokenizer.
    pad_id: id of the padding token.
    model_max_length: `model_max_length` of tokenizer_config.json (CLIP: 77), or None.
    folder: where it was read from (for messages).
  """
  tokenizer: object
  pad_id: int
  pad_token: str
  model_max_length: int | None
  folder: str

  def __call__(self, texts: Sequence[str],
               max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises with special tokens, right-truncated and right-padded to max_length.

    Returns:
      ids int32 [B, max_length] and mask bool [B, max_length] (True on real tokens).
    """
    tok = self.tokenizer
    tok.enable_truncation(max_length=max_length, direction="right")
    tok.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token,
                       length=max_length)
    encodings = tok.encode_batch(list(texts), add_special_tokens=True)
    ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), max_length)
    mask = np.array([e.attention_mask for e in encodings],
                    bool).reshape(len(texts), max_length)
    return ids, mask


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_str(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value


def _read_merges(path: str) -> list[tuple[str, str]]:
  merges = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      line = line.rstrip("\r\n")
      if not line or (i == 0 and line.startswith("#version")):
        continue
      parts = line.split(" ")
      if len(parts) != 2:
        raise ValueError(f"{path}:{i + 1}: a merge must be two tokens, got {line!r}")
      merges.append((parts[0], parts[1]))
  return merges


def _build_bpe(folder: str, kind: str, config: dict):
  """CLIP / Qwen2 byte-level BPE from vocab.json + merges.txt (transformers 5 layout)."""
  tk = _tokenizers()
  vocab_path = os.path.join(folder, "vocab.json")
  merges_path = os.path.join(folder, "merges.txt")
  for p in (vocab_path, merges_path):
    if not os.path.isfile(p):
      raise FileNotFoundError(
          f"tokenizer folder {folder} has neither tokenizer.json nor {os.path.basename(p)}")
  vocab = _read_json(vocab_path)
  merges = _read_merges(merges_path)
  if kind == "clip":
    unk = _token_str(config.get("unk_token")) or "<|endoftext|>"
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, dropout=None,
                                     continuing_subword_prefix="",
                                     end_of_word_suffix="</w>", fuse_unk=False,
                                     unk_token=unk))
    tok.normalizer = tk.normalizers.Sequence([
        tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
        tk.normalizers.Lowercase()])
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = tk.decoders.ByteLevel()
  else:
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, dropout=None,
                                     unk_token=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False,
                                     byte_fallback=False))
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space")),
                                    use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
  return tok


def _add_tokens(tok, folder: str, config: dict) -> None:
  """Adds the folder's added / special tokens; checks that they keep their ids."""
  tk = _tokenizers()
  declared: dict[str, tuple[int | None, dict]] = {}
  for i, spec in sorted((config.get("added_tokens_decoder") or {}).items(),
                        key=lambda kv: int(kv[0])):
    declared[spec["content"]] = (int(i), spec)
  for content, i in _read_json(os.path.join(folder, "added_tokens.json")).items():
    declared.setdefault(content, (int(i), {}))
  names = ["bos_token", "eos_token", "unk_token", "pad_token"]
  specials = [_token_str(config.get(n)) for n in names]
  specials += [_token_str(t) for t in config.get("additional_special_tokens") or []]
  for content in specials:
    if content and content not in declared:
      declared[content] = (None, {"special": True})
  for content, (want, spec) in sorted(declared.items(),
                                      key=lambda kv: (kv[1][0] is None, kv[1][0] or 0)):
    token = tk.AddedToken(content, single_word=spec.get("single_word", False),
                          lstrip=spec.get("lstrip", False),
                          rstrip=spec.get("rstrip", False),
                          normalized=spec.get("normalized", not spec.get("special", True)),
                          special=spec.get("special", True))
    if spec.get("special", True):
      tok.add_special_tokens([token])
    else:
      tok.add_tokens([token])
    got = tok.token_to_id(content)
    if want is not None and got != want:
      raise ValueError(f"{folder}: added token {content!r} got id {got}, the tokenizer "
                       f"config says {want} (vocab.json and tokenizer_config.json disagree)")


def load_tokenizer(folder: str, kind: str) -> TextTokenizer:
  """Reads a tokenizer folder of a diffusers pipeline.

  Args:
    folder: tokenizer/ (or tokenizer_2/, ...) folder.
    kind: 'clip', 't5' or 'qwen2' (how to build it when there is no tokenizer.json).

  Returns:
    The TextTokenizer.

  Raises:
    FileNotFoundError: missing folder or files (names the folder and what is needed).
    ValueError: unknown kind, inconsistent files, unknown pad token.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {KINDS}")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
  tk = _tokenizers()
  config = {**_read_json(os.path.join(folder, "special_tokens_map.json")),
            **_read_json(os.path.join(folder, "tokenizer_config.json"))}
  path = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(path):
    tok = tk.Tokenizer.from_file(path)
  elif kind == "t5":
    raise FileNotFoundError(
        f"T5 tokenizer folder {folder} has no tokenizer.json (a spiece.model alone is not "
        "read); write one next to it, once and offline, by loading this folder with "
        "transformers' T5TokenizerFast and saving it back")
  else:
    tok = _build_bpe(folder, kind, config)
  _add_tokens(tok, folder, config)
  if kind == "clip" and not os.path.isfile(path):
    bos = _token_str(config.get("bos_token")) or "<|startoftext|>"
    eos = _token_str(config.get("eos_token")) or "<|endoftext|>"
    ids = [tok.token_to_id(t) for t in (bos, eos)]
    if None in ids:
      raise ValueError(f"{folder}: vocab.json lacks {bos!r} or {eos!r}")
    tok.post_processor = tk.processors.RobertaProcessing(
        (eos, ids[1]), (bos, ids[0]), trim_offsets=False, add_prefix_space=False)
  pad = _token_str(config.get("pad_token")) or _DEFAULT_PAD[kind]
  pad_id = tok.token_to_id(pad)
  if pad_id is None:
    raise ValueError(f"{folder}: pad token {pad!r} is not in the vocabulary")
  length = config.get("model_max_length")
  length = int(length) if isinstance(length, (int, float)) and length < 1e9 else None
  return TextTokenizer(tok, pad_id, pad, length, folder)
