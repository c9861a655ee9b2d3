r"""Caption embeddings of the text-to-image families, computed in JAX.

The text encoders of a diffusers pipeline folder are loaded into the Flax encoders of
`twinflow_jax.models` (CLIP, T5, Qwen2) and run jitted, batch-sharded over the local
devices. `embed_captions` returns what the family's diffusers pipeline `encode_prompt`
gives the transformer, padded to a fixed length for the t2i ArrayRecord schema
(`data/records.py`): txt [B, L, D], txt_mask [B, L] and pooled [B, P], float32.

  family       txt (L x D)                                   pooled (P)
  sd3          CLIP-L and CLIP-G penultimate hidden states,  CLIP-L and CLIP-G projected
               concatenated on the width, zero-padded to     EOS vectors, concatenated
               T5's width, then T5-XXL's last hidden state   (768 + 1280)
               on the sequence: (77 + max_length) x 4096
  flux         T5-XXL's last hidden state: max_length x 4096 CLIP-L EOS vector,
                                                             unprojected (768)
  qwen_image   Qwen2.5-VL's last hidden state of the prompt   masked mean of txt (3584;
               in Qwen-Image's chat template, template        not part of Qwen-Image)
               prefix (34 tokens) dropped: max_length x 3584

Masks: the SD3 and Flux pipelines give their transformers no text mask (padding tokens
are attended to, and T5 runs without an attention mask), so txt_mask is all True there.
Qwen-Image masks padding: txt_mask is True on the prompt's tokens, txt is zero elsewhere.
docs/text-embeddings.md has the details.

Embedding a prompt file for sampling:

  python -m twinflow_jax.data.captions --family sd3 --model-dir /models/sd3-medium \
      --prompts prompts.txt --out prompts.npz

writes prompts.npz with txt, txt_mask, pooled (float32, one row per non-empty line of the
prompt file) and prompts (the lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from twinflow_jax.data.text_tokenizers import TextTokenizer, load_tokenizer
from twinflow_jax.models.convert import hf_text

FAMILIES = ("sd3", "flux", "qwen_image")
# The pipelines' default max_sequence_length (T5 tokens for sd3 / flux, prompt tokens
# after the template for qwen_image).
DEFAULT_MAX_LENGTH = {"sd3": 256, "flux": 512, "qwen_image": 512}
# The pipelines reject longer ones.
MAX_LENGTH_LIMIT = {"sd3": 512, "flux": 512, "qwen_image": 1024}
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_DROP = 34  # tokens of the template before the prompt (QwenImagePipeline)

# (component, encoder folder, tokenizer folder, kind) of each family's pipeline folder.
_COMPONENTS = {
    "sd3": (("clip_l", "text_encoder", "tokenizer", "clip"),
            ("clip_g", "text_encoder_2", "tokenizer_2", "clip"),
            ("t5", "text_encoder_3", "tokenizer_3", "t5")),
    "flux": (("clip", "text_encoder", "tokenizer", "clip"),
             ("t5", "text_encoder_2", "tokenizer_2", "t5")),
    "qwen_image": (("qwen", "text_encoder", "tokenizer", "qwen2"),),
}
_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
              "QwenImagePipeline": "qwen_image"}
_BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass
class TextEncoders:
  """The loaded encoders and tokenizers of one family (from `load_text_encoders`).

  Attributes:
    family: 'sd3', 'flux' or 'qwen_image'.
    model_dir: the pipeline folder.
    tokenizers: component name -> TextTokenizer.
    graphdef: the encoders' graph (a dict component -> module, split).
    params: their parameters (on the mesh's devices).
    configs: component -> encoder config.
    dtype: compute dtype.
    mesh: the mesh over this process's devices, or None (one device).
    batch_size: captions per jitted call; every call is padded to it (one compile).
    clip_length: CLIP token length (the CLIP tokenizer's model_max_length, 77), or None.
  """
  family: str
  model_dir: str
  tokenizers: dict[str, TextTokenizer]
  graphdef: Any
  params: Any
  configs: dict[str, Any]
  dtype: Any
  mesh: jax.sharding.Mesh | None
  batch_size: int
  clip_length: int | None

  def embedding_shapes(self, max_length: int | None = None) -> dict[str, tuple[int, ...]]:
    """Per-caption shapes {'txt': (L, D), 'txt_mask': (L,), 'pooled': (P,)}."""
    length = _check_length(self.family, max_length)
    c = self.configs
    if self.family == "sd3":
      shapes = ((self.clip_length + length, c["t5"].d_model),
                c["clip_l"].projection_dim + c["clip_g"].projection_dim)
    elif self.family == "flux":
      shapes = ((length, c["t5"].d_model), c["clip"].hidden_size)
    else:
      shapes = ((length, c["qwen"].hidden_size), c["qwen"].hidden_size)
    return {"txt": shapes[0], "txt_mask": shapes[0][:1], "pooled": (shapes[1],)}


def _check_family(family: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f"unknown text-to-image family {family!r}; choose one of {FAMILIES}")


def _check_length(family: str, max_length: int | None) -> int:
  _check_family(family)
  length = DEFAULT_MAX_LENGTH[family] if max_length is None else int(max_length)
  if not 1 <= length <= MAX_LENGTH_LIMIT[family]:
    raise ValueError(f"max_length must be in [1, {MAX_LENGTH_LIMIT[family]}] for family "
                     f"{family!r} (as its diffusers pipeline), got {length}")
  return length


def local_mesh(fsdp: int = 1) -> jax.sharding.Mesh:
  """('data', 'fsdp', 'tensor') mesh over this process's devices: data x fsdp x 1.

  fsdp > 1 shards the encoders' weights over that many devices (for encoders that do
  not fit one device, e.g. Qwen2.5-VL-7B in bfloat16 on a 16 GB chip).
  """
  devices = jax.local_devices()
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} does not divide the {len(devices)} local devices")
  grid = np.array(devices).reshape(len(devices) // fsdp, fsdp, 1)
  return jax.sharding.Mesh(grid, ("data", "fsdp", "tensor"))


def _batch_ways(mesh: jax.sharding.Mesh | None) -> int:
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in _BATCH_AXES if a in mesh.shape]))


def load_text_encoders(family: str, model_dir: str, *, dtype: str = "float32",
                       mesh: jax.sharding.Mesh | None = None,
                       batch_size: int = 32) -> TextEncoders:
  """Loads the text encoders and tokenizers of a diffusers pipeline folder.

  Reads (no network, no torch): sd3: text_encoder/ (CLIP-L with projection),
  text_encoder_2/ (CLIP-G with projection), text_encoder_3/ (T5), tokenizer/,
  tokenizer_2/, tokenizer_3/; flux: text_encoder/ (CLIP-L), text_encoder_2/ (T5),
  tokenizer/, tokenizer_2/; qwen_image: text_encoder/ (Qwen2.5-VL), tokenizer/. Other
  sub-folders (transformer, vae, ...) are not touched.

  Args:
    family: 'sd3', 'flux' or 'qwen_image'.
    model_dir: the pipeline folder.
    dtype: 'float32' or 'bfloat16' (parameters and compute; norms and softmax in
      float32; the returned embeddings are float32 either way).
    mesh: mesh over this process's devices (see `local_mesh`); batches are split over
      its 'data' x 'fsdp' axes, weights sharded by their logical names (replicated when
      fsdp = tensor = 1). None: one device.
    batch_size: captions per jitted call (rounded up to a multiple of the batch ways).

  Returns:
    TextEncoders for `embed_captions`.

  Raises:
    ValueError / FileNotFoundError: unknown family, a missing folder or file (named),
      a folder of another pipeline, an encoder of the wrong kind.
  """
  _check_family(family)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f"model folder {model_dir} does not exist")
  if mesh is not None:
    foreign = set(mesh.devices.flat) - set(jax.local_devices())
    if foreign:
      raise ValueError("the text-encoder mesh must hold only this process's devices "
                       "(each process embeds its own captions); use local_mesh()")
  index = os.path.join(model_dir, "model_index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      cls = json.load(f).get("_class_name")
    if _PIPELINES.get(cls, family) != family:
      raise ValueError(f"{model_dir} holds a {cls} (family {_PIPELINES[cls]!r}), not a "
                       f"{family!r} pipeline")
  needed = [p for comp in _COMPONENTS[family] for p in comp[1:3]]
  missing = [p for p in needed if not os.path.isdir(os.path.join(model_dir, p))]
  if missing:
    raise FileNotFoundError(
        f"{model_dir} lacks {', '.join(missing)}: a {family} pipeline folder needs "
        f"{', '.join(needed)} (diffusers layout)")
  jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  models, tokenizers, configs = {}, {}, {}
  for name, enc_dir, tok_dir, kind in _COMPONENTS[family]:
    models[name] = hf_text.load_text_encoder(os.path.join(model_dir, enc_dir), kind,
                                             dtype=jdtype, mesh=mesh)
    configs[name] = models[name].config
    tokenizers[name] = load_tokenizer(os.path.join(model_dir, tok_dir), kind)
  clip_length = None
  if family in ("sd3", "flux"):
    # The pipelines tokenise both CLIPs to the first tokenizer's model_max_length.
    first = "clip_l" if family == "sd3" else "clip"
    clip_length = tokenizers[first].model_max_length or 77
    for name in ("clip_l", "clip_g", "clip"):
      if name in configs and configs[name].max_positions < clip_length:
        raise ValueError(f"{model_dir}: tokenizer model_max_length {clip_length} exceeds "
                         f"the {name} encoder's {configs[name].max_positions} positions")
  if family == "sd3":
    for name, folder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
      if not configs[name].projection_dim:
        raise ValueError(f"{model_dir}/{folder} has no text_projection: SD3 needs "
                         "CLIPTextModelWithProjection encoders")
    width = configs["clip_l"].hidden_size + configs["clip_g"].hidden_size
    if width > configs["t5"].d_model:
      raise ValueError(f"{model_dir}: CLIP widths ({width}) exceed T5's d_model "
                       f"({configs['t5'].d_model}); SD3 zero-pads CLIP to T5's width")
  graphdef, params = nnx.split(models)
  ways = _batch_ways(mesh)
  return TextEncoders(family, model_dir, tokenizers, graphdef, params, configs, jdtype,
                      mesh, -(-batch_size // ways) * ways, clip_length)


@functools.partial(jax.jit, static_argnums=0)
def _forward(family: str, graphdef, params, inputs: dict[str, jax.Array]):
  """The family's pipeline arithmetic on token arrays; float32 outputs."""
  m = nnx.merge(graphdef, params)
  f32 = lambda x: x.astype(jnp.float32)
  if family == "sd3":
    lo = m["clip_l"](inputs["clip_l"])
    go = m["clip_g"](inputs["clip_g"])
    t5 = m["t5"](inputs["t5"])
    clip = jnp.concatenate([lo["hidden_states"][-2], go["hidden_states"][-2]], -1)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
    txt = jnp.concatenate([clip, t5], axis=1)
    pooled = jnp.concatenate([lo["text_embeds"], go["text_embeds"]], -1)
    mask = jnp.ones(txt.shape[:2], bool)
  elif family == "flux":
    pooled = m["clip"](inputs["clip"])["pooler_output"]
    txt = m["t5"](inputs["t5"])
    mask = jnp.ones(txt.shape[:2], bool)
  else:
    hidden = m["qwen"](inputs["qwen"], inputs["qwen_mask"])
    mask = inputs["qwen_mask"][:, QWEN_DROP:]
    txt = jnp.where(mask[..., None], f32(hidden[:, QWEN_DROP:]), 0.0)
    count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
    pooled = jnp.sum(txt, axis=1) / count
  return {"txt": f32(txt), "txt_mask": mask, "pooled": f32(pooled)}


def _tokenize(encoders: TextEncoders, captions: Sequence[str],
              length: int) -> dict[str, np.ndarray]:
  tok = encoders.tokenizers
  if encoders.family == "sd3":
    c = encoders.clip_length
    return {"clip_l": tok["clip_l"](captions, c)[0], "clip_g": tok["clip_g"](captions, c)[0],
            "t5": tok["t5"](captions, length)[0]}
  if encoders.family == "flux":
    return {"clip": tok["clip"](captions, encoders.clip_length)[0],
            "t5": tok["t5"](captions, length)[0]}
  # The model is causal, so truncating after the first QWEN_DROP + length tokens leaves
  # them exactly as the pipeline computes them (it truncates at 1024 + 34 and then
  # keeps max_sequence_length).
  ids, mask = tok["qwen"]([QWEN_TEMPLATE.format(c) for c in captions], QWEN_DROP + length)
  return {"qwen": ids, "qwen_mask": mask}


def embed_captions(captions: Sequence[str], family: str, encoders: TextEncoders,
                   max_length: int | None = None) -> dict[str, np.ndarray]:
  """Embeds captions as the family's diffusers pipeline `encode_prompt` does.

  Args:
    captions: B strings (empty strings are valid: the unconditional prompt).
    family: 'sd3', 'flux' or 'qwen_image'; must be the family of `encoders`.
    encoders: from `load_text_encoders`.
    max_length: T5 tokens (sd3, flux) or prompt tokens after the template (qwen_image);
      default the pipeline's default (256, 512, 512). Longer captions are truncated.

  Returns:
    {'txt': float32 [B, L, D], 'txt_mask': bool [B, L], 'pooled': float32 [B, P]}
    (numpy, on the host) with L, D, P as `encoders.embedding_shapes(max_length)`.
  """
  _check_family(family)
  if family != encoders.family:
    raise ValueError(f"encoders were loaded for family {encoders.family!r}, not {family!r}")
  length = _check_length(family, max_length)
  captions = list(captions)
  bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
  if bad:
    raise ValueError(f"captions must be strings; caption {bad[0]} is "
                     f"{type(captions[bad[0]]).__name__}")
  shapes = encoders.embedding_shapes(length)
  n, bs = len(captions), encoders.batch_size
  out = {k: np.zeros((n,) + s, bool if k == "txt_mask" else np.float32)
         for k, s in shapes.items()}
  sharding = (None if encoders.mesh is None else NamedSharding(
      encoders.mesh, PartitionSpec(tuple(a for a in _BATCH_AXES
                                         if a in encoders.mesh.shape))))
  for start in range(0, n, bs):
    chunk = captions[start:start + bs]
    inputs = _tokenize(encoders, chunk + [""] * (bs - len(chunk)), length)
    inputs = {k: jax.device_put(v, sharding) for k, v in inputs.items()}
    result = jax.device_get(_forward(family, encoders.graphdef, encoders.params, inputs))
    for k in out:
      out[k][start:start + len(chunk)] = result[k][:len(chunk)]
  return out


# ---------------------------------------------------------------------------
# Command line: a prompt file -> .npz for sampling.


def read_prompts(path: str) -> list[str]:
  """Non-empty lines of a UTF-8 text file, without their line ends."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    prompts = [line.rstrip("\r\n") for line in f]
  prompts = [p for p in prompts if p.strip()]
  if not prompts:
    raise ValueError(f"prompt file {path} has no non-empty line")
  return prompts


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m twinflow_jax.data.captions",
      description="Embeds a prompt file (one prompt per line) with the text encoders of "
                  "a diffusers pipeline folder, for the sample command.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--family", required=True, choices=FAMILIES,
                 help="text-to-image family: which encoders and which conventions")
  p.add_argument("--model-dir", required=True,
                 help="diffusers pipeline folder (text_encoder*/, tokenizer*/)")
  p.add_argument("--prompts", required=True,
                 help="UTF-8 text file, one prompt per line (empty lines skipped)")
  p.add_argument("--out", required=True, help="output .npz (txt, txt_mask, pooled, prompts)")
  p.add_argument("--max-length", type=int, default=None,
                 help="T5 tokens (sd3, flux) or prompt tokens (qwen_image); default the "
                      f"pipeline's: {DEFAULT_MAX_LENGTH}")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="encoder weights and compute (outputs are float32)")
  p.add_argument("--batch-size", type=int, default=16, help="prompts per jitted call")
  p.add_argument("--fsdp", type=int, default=1,
                 help="shard the encoder weights over this many local devices")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    _check_length(args.family, args.max_length)
    if not args.out.endswith(".npz"):
      raise ValueError(f"--out must end in .npz, got {args.out}")
    prompts = read_prompts(args.prompts)
    t0 = time.time()
    encoders = load_text_encoders(args.family, args.model_dir, dtype=args.dtype,
                                  mesh=local_mesh(args.fsdp), batch_size=args.batch_size)
    print(f"loaded the {args.family} text encoders from {args.model_dir} in "
          f"{time.time() - t0:.1f}s", flush=True)
    t0, parts = time.time(), []
    for start in range(0, len(prompts), encoders.batch_size):
      parts.append(embed_captions(prompts[start:start + encoders.batch_size], args.family,
                                  encoders, args.max_length))
      done = min(start + encoders.batch_size, len(prompts))
      print(f"embedded {done}/{len(prompts)} prompts "
            f"({done / (time.time() - t0):.1f} prompts/s)", flush=True)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, prompts=np.array(prompts), **out)
  print(f"wrote {args.out}: txt {out['txt'].shape}, txt_mask {out['txt_mask'].shape}, "
        f"pooled {out['pooled'].shape}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
