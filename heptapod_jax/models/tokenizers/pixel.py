"""A parameter-free tokenizer for tiny data: gray levels of image patches.

Each `patch x patch` block is averaged over pixels and channels and its gray
level in [-1, 1] is quantised to one of `levels` uniform bins; decoding paints
the bin centre back over the block. On the built-in 32x32 digits with patch 4
this recovers the original 8x8 digits almost exactly (they were rendered from
8x8), so the demo's tokens are real content, not a toy.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange, repeat

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PixelTokenizer:
  image_size: int
  patch: int = 4
  levels: int = 16

  def __post_init__(self):
    if self.image_size % self.patch:
      raise ValueError(f'tokenizer.patch={self.patch} does not divide image_size={self.image_size}.')
    if self.levels < 2:
      raise ValueError(f'tokenizer.levels={self.levels}: need at least 2.')

  @property
  def grid_size(self) -> tuple[int, int]:
    side = self.image_size // self.patch
    return side, side

  @property
  def vocab_size(self) -> int:
    return self.levels

  def encode_to_indices(self, params, images: Array) -> Array:
    """float[B, S, S, C] in [-1, 1] -> int32[B, S/p, S/p]."""
    del params
    gray = rearrange(images.astype(jnp.float32), 'b (h p) (w q) c -> b h w (p q c)',
                     p=self.patch, q=self.patch).mean(-1)
    unit = (jnp.clip(gray, -1.0, 1.0) + 1.0) / 2.0
    return jnp.clip(jnp.floor(unit * self.levels), 0, self.levels - 1).astype(jnp.int32)

  def decode_from_indices(self, params, indices: Array) -> Array:
    """int[B, H, W] -> float32[B, H*p, W*p, 3] in [-1, 1] (bin centres, painted over blocks)."""
    del params
    gray = (indices.astype(jnp.float32) + 0.5) / self.levels * 2.0 - 1.0
    return repeat(gray, 'b h w -> b (h p) (w q) c', p=self.patch, q=self.patch, c=3)
