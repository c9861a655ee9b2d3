"""Model-space latents <-> images through the VAE named by prepared-data metadata.

The trainer and the sampler work in "model space": x = (latent - latent_shift) *
latent_scale, where `latent` is what the records store. This module undoes that (and
the per-channel standardisation some VAEs need, see `latent_metadata`) and runs the
VAE decoder, jitted and sharded over the batch:

  metadata = latent_metadata.read_metadata('/data/in256')      # or find_metadata(paths)
  vae = vae_codec.load_vae(metadata)                           # checks it is the same VAE
  images = vae_codec.decode(x, vae, metadata)                  # uint8 [B, H, W, 3]

For repeated calls build one `LatentDecoder(vae, metadata, mesh)` (compiles once per
batch shape). `decoder_for_data(config.data)` does all of it from a data config, or
returns None when the records have no metadata (e.g. pixels, or latents written
elsewhere).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from twinflow_jax.data import latent_metadata
from twinflow_jax.models import vae as vae_lib


def _normalization(metadata: dict[str, Any]):
  shift = np.asarray(metadata['latent_shift'], np.float32)
  scale = np.asarray(metadata['latent_scale'], np.float32)
  norm = metadata.get('stored_normalization')
  if norm:
    return shift, scale, np.asarray(norm['mean'], np.float32), np.asarray(norm['std'],
                                                                           np.float32)
  return shift, scale, None, None


def to_model_space(z: Any, metadata: dict[str, Any]) -> Any:
  """Raw VAE latents z [..., C] -> model inputs x (what the pipeline gives the model)."""
  shift, scale, mean, std = _normalization(metadata)
  stored = z if mean is None else (z - mean) / std
  return (stored - shift) * scale


def to_vae_latents(x: Any, metadata: dict[str, Any]) -> Any:
  """Model-space x [..., C] -> raw VAE latents z, the decoder's input."""
  shift, scale, mean, std = _normalization(metadata)
  stored = x / scale + shift
  return stored if mean is None else stored * std + mean


def load_vae(metadata: dict[str, Any], *, vae_dir: str | None = None,
             dtype: str = 'float32', verify: bool = True):
  """Loads the VAE that made the latents (its diffusers folder, recorded in metadata).

  Args:
    metadata: from `latent_metadata.read_metadata` / `find_metadata`.
    vae_dir: the VAE folder, if it moved since preparation (default: the recorded path).
    dtype: compute dtype of the VAE.
    verify: check that config.json and the weights are byte-identical to the ones used
      for preparation (sha256; a second per GB).

  Raises:
    ValueError: the folder is missing or holds another VAE (names both).
  """
  from twinflow_jax.models.convert import diffusers_vae  # pylint: disable=g-import-not-at-top
  folder = vae_dir or metadata['vae']['path']
  if not os.path.isdir(folder):
    raise ValueError(f'the VAE folder {folder!r} recorded in {metadata.get("_path")} does '
                     'not exist here; pass its new location (vae_dir=...)')
  if verify:
    found = diffusers_vae.vae_fingerprint(folder)
    for key in ('config_sha256', 'weights_sha256'):
      if found[key] != metadata['vae'][key]:
        raise ValueError(f'the VAE in {folder} is not the one that made the latents of '
                         f'{metadata.get("_path")} ({key} differs)')
  return diffusers_vae.load_diffusers_vae(folder, dtype=dtype)


class LatentDecoder:
  """Jitted model-space latents -> images, batch-sharded over a mesh.

  Args:
    vae: the VAE (`load_vae`).
    metadata: the data's metadata (normalisation).
    mesh: mesh whose ('data', 'fsdp') axes split the batch; None = default device.
  """

  def __init__(self, vae, metadata: dict[str, Any], mesh: jax.sharding.Mesh | None = None):
    self.metadata = metadata
    self.mesh = mesh
    self._decode = vae_lib.make_decode_fn(vae, mesh)
    self._divisor = 1 if mesh is None else vae_lib.batch_divisor(mesh)

  def __call__(self, x: Any, output: str = 'uint8') -> np.ndarray:
    """x [B, h, w, C] model-space latents -> images [B, H, W, 3] (host numpy).

    output: 'uint8' (0..255, rounded) or 'float' ([-1, 1], clipped).
    """
    if output not in ('uint8', 'float'):
      raise ValueError(f"output={output!r}; choose 'uint8' or 'float'")
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    z = to_vae_latents(_pad(x, self._divisor), self.metadata).astype(np.float32)
    images = np.clip(np.asarray(jax.device_get(self._decode(z)))[:n], -1.0, 1.0)
    if output == 'float':
      return images
    return np.round((images + 1.0) * 127.5).astype(np.uint8)


def decode(latents: Any, vae, metadata: dict[str, Any], *,
           mesh: jax.sharding.Mesh | None = None, output: str = 'uint8') -> np.ndarray:
  """One-shot `LatentDecoder(vae, metadata, mesh)(latents, output)`."""
  return LatentDecoder(vae, metadata, mesh)(latents, output)


def decoder_for_data(data_config: Any, *, mesh: jax.sharding.Mesh | None = None,
                     vae_dir: str | None = None,
                     dtype: str = 'float32') -> LatentDecoder | None:
  """The decoder of an 'arrayrecord_*' data config whose records have metadata.

  Returns None when the records carry no metadata.json (pixels or foreign latents) or
  cannot be found here.
  """
  from twinflow_jax.data import sources  # pylint: disable=g-import-not-at-top
  if not str(data_config.source).startswith('arrayrecord') or not data_config.paths:
    return None
  try:
    paths = sources.expand_paths(data_config.paths)
  except (FileNotFoundError, ValueError):
    # The records are not where the run read them (sampling on another machine): there is
    # no metadata to read, so nothing to decode with.
    return None
  metadata = latent_metadata.find_metadata(paths)
  if metadata is None:
    return None
  return LatentDecoder(load_vae(metadata, vae_dir=vae_dir, dtype=dtype), metadata, mesh)


def encode_images(images: Any, vae, metadata: dict[str, Any],
                  mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """uint8 or [-1, 1] images [B, H, W, 3] -> model-space latents (posterior mean)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  n = len(images)
  divisor = 1 if mesh is None else vae_lib.batch_divisor(mesh)
  images = _pad(images.astype(np.float32), divisor)
  mean, _ = vae_lib.make_encode_fn(vae, mesh)(images)
  return to_model_space(np.asarray(mean)[:n], metadata)


def _pad(x: np.ndarray, divisor: int) -> np.ndarray:
  """Repeats the last row so that len(x) is a multiple of divisor."""
  pad = -len(x) % divisor
  return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
