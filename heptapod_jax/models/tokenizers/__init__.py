"""Image tokenizers behind one contract (maskgit's):

  tokenizer.grid_size -> (H, W);  tokenizer.vocab_size -> int
  tokenizer.encode_to_indices(params, images: float32[B, S, S, 3] in [-1, 1]) -> int32[B, H, W]
  tokenizer.decode_from_indices(params, indices: int32[B, H, W]) -> float32[B, S, S, 3] in [-1, 1]

Both are pure functions of (params, inputs) so the trainer can call them frozen
inside its jitted, sharded step. The kinds:

  pixel  gray levels of image patches, no parameters (tiny data sets)
  vq     a learned VQ autoencoder (vq.py, LlamaGen's VQ-16 architecture)
  kl     a KL autoencoder (kl.py) whose scaled latents are continuous tokens (LatentTokenizer)

This package holds the modules and pure functions only. Building the tokenizer a config
names, with its parameters read from a tokenizer checkpoint (one trained by
`heptapod_jax.training.train_tokenizer`, or LlamaGen's / MAR's weights imported by the tools), is
`heptapod_jax.storage.tokenizer_checkpoint.make_tokenizer`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from heptapod_jax.models.tokenizers.pixel import PixelTokenizer  # noqa: F401  (public API)

KINDS = ('pixel', 'vq', 'kl')


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


def batch_tokens(batch: dict[str, Any], tokenizer: Any, tokenizer_params: Any,
                 rng: Any = None) -> Any:
  """int32[B, N] codes of a batch: pre-tokenized ('tokens') or encoded on the fly ('image').
  Continuous tokenizers give float32[B, N, C] latents (posterior samples drawn with `rng`),
  on the fly or from pre-tokenized moments ('latent_mean', 'latent_std'), the same way."""
  if 'latent_mean' in batch:  # Pre-tokenized KL moments: sample (or take the mean), then scale.
    mean = batch['latent_mean'].astype(jnp.float32)
    if tokenizer.sample_posterior and rng is not None:
      mean = mean + batch['latent_std'].astype(jnp.float32) * jax.random.normal(rng, mean.shape)
    tokens = mean * tokenizer.scale
  elif 'tokens' in batch:
    tokens = batch['tokens'].astype(jnp.int32)
  else:
    tokens = jax.lax.stop_gradient(encode_images(tokenizer, tokenizer_params, batch['image'], rng))
  if tokens.ndim == 4:  # [B, h, w, C] latents.
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])
  return tokens.reshape(tokens.shape[0], -1)
