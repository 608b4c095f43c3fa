"""Image tokenizers behind one contract (maskgit's):

  tokenizer.grid_size -> (H, W);  tokenizer.vocab_size -> int
  tokenizer.encode_to_indices(params, images: float32[B, S, S, 3] in [-1, 1]) -> int32[B, H, W]
  tokenizer.decode_from_indices(params, indices: int32[B, H, W]) -> float32[B, S, S, 3] in [-1, 1]

Both are pure functions of (params, inputs) so the trainer can call them frozen
inside its jitted, sharded step. `make_tokenizer(config.tokenizer, image_size)`
builds the one the config names, with its (possibly empty) parameters:

  pixel  gray levels of image patches, no parameters (tiny data sets)
  vq     a learned VQ autoencoder (vq.py, LlamaGen's VQ-16 architecture) from a tokenizer
         checkpoint: one trained by `heptapod_jax.train_tokenizer`, or LlamaGen's
         vq_ds16_c2i.pt imported by `heptapod_jax.tools.convert_llamagen_vq`
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from heptapod_jax.models.tokenizers.pixel import PixelTokenizer

KINDS = ('pixel', 'vq', 'kl')


def _local_abspath(path: str) -> str:
  """Orbax needs absolute local paths; URLs (gs://...) stay as given."""
  return path if '://' in path else os.path.abspath(path)


def stored_config(tokenizer_config: Any, want: str):
  """The VQConfig / KLConfig saved in `tokenizer_config.checkpoint` (metadata only, no arrays)."""
  from heptapod_jax.models.tokenizers import io
  if not tokenizer_config.checkpoint:
    importer = {'vq': "LlamaGen's with `python -m heptapod_jax.tools.convert_llamagen_vq`",
                'kl': "MAR's with `python -m heptapod_jax.tools.convert_mar_kl`"}[want]
    raise ValueError(f'config.tokenizer.checkpoint is empty: kind="{want}" needs a tokenizer '
                     'checkpoint (train one with `python -m heptapod_jax.main '
                     f'--config=configs/vq_*.py`, or import {importer}).')
  kind, config = io.read_tokenizer_config(_local_abspath(tokenizer_config.checkpoint),
                                         key=tokenizer_config.checkpoint_key)
  if kind != want:
    raise ValueError(f'config.tokenizer.checkpoint={tokenizer_config.checkpoint} holds a {kind!r} '
                     f'tokenizer; config.tokenizer.kind="{want}" needs a {want.upper()} one.')
  return config


def stored_vq_config(tokenizer_config: Any):
  """The VQConfig saved in `tokenizer_config.checkpoint` (read from metadata, no arrays)."""
  return stored_config(tokenizer_config, 'vq')


def make_tokenizer(tokenizer_config: Any, image_size: int) -> tuple[Any, Any]:
  """Returns (tokenizer, params) for `config.tokenizer` at `image_size`."""
  if tokenizer_config.kind == 'pixel':
    return PixelTokenizer(image_size=image_size, patch=tokenizer_config.patch,
                          levels=tokenizer_config.levels), {}
  if tokenizer_config.kind == 'vq':
    from heptapod_jax.models.tokenizers import io
    config = dataclasses.replace(stored_vq_config(tokenizer_config), image_size=image_size)
    params = io.load_tokenizer_params(_local_abspath(tokenizer_config.checkpoint), config,
                                      key=tokenizer_config.checkpoint_key)
    return io.make_tokenizer('vq', config), params
  if tokenizer_config.kind == 'kl':
    from heptapod_jax.models.tokenizers import io
    config = dataclasses.replace(stored_config(tokenizer_config, 'kl'), image_size=image_size)
    params = io.load_tokenizer_params(_local_abspath(tokenizer_config.checkpoint), config,
                                      key=tokenizer_config.checkpoint_key)
    return LatentTokenizer(io.make_tokenizer('kl', config), tokenizer_config.latent_scale,
                           tokenizer_config.sample_posterior), params
  raise ValueError(f'config.tokenizer.kind={tokenizer_config.kind!r} is not one of {list(KINDS)}.')


@dataclasses.dataclass(frozen=True)
class LatentTokenizer:
  """A KL autoencoder as the AR model's continuous tokenizer (MAR's convention).

  Tokens are posterior samples (or means) of the encoder, multiplied by `scale`
  (MAR: 0.2325 for KL-16, bringing the latents to about unit variance);
  decoding divides by it. Hashable, pure, jittable like the discrete tokenizers.
  """
  autoencoder: Any  # kl.KLTokenizer
  scale: float
  sample_posterior: bool

  @property
  def grid_size(self) -> tuple[int, int]:
    return self.autoencoder.grid_size

  @property
  def token_dim(self) -> int:
    return self.autoencoder.latent_channels

  def encode_to_latents(self, params: Any, images: Any, rng: Any = None) -> Any:
    """images float[B, S, S, 3] in [-1, 1] -> float32[B, h, w, C] scaled latents."""
    mean, logvar = self.autoencoder.encode(params, images)
    z = self.autoencoder.sample(mean, logvar, rng) if self.sample_posterior and rng is not None else mean
    return z * self.scale

  def decode_from_latents(self, params: Any, latents: Any) -> Any:
    """float[B, h, w, C] scaled latents -> images float32[B, S, S, 3] in [-1, 1]."""
    return self.autoencoder.decode(params, latents / self.scale)


def encode_images(tokenizer: Any, params: Any, images: Any, rng: Any = None) -> Any:
  """The model's tokens of images: int32[B, h, w] codes, or float32[B, h, w, C] latents."""
  if isinstance(tokenizer, LatentTokenizer):
    return tokenizer.encode_to_latents(params, images, rng)
  return tokenizer.encode_to_indices(params, images)


def decode_tokens(tokenizer: Any, params: Any, tokens: Any) -> Any:
  """Images float32[B, S, S, 3] in [-1, 1] from tokens shaped as `encode_images` returns them."""
  if isinstance(tokenizer, LatentTokenizer):
    return tokenizer.decode_from_latents(params, tokens)
  return tokenizer.decode_from_indices(params, tokens)
