"""Image tokenizers behind one contract (maskgit's):

  tokenizer.grid_size -> (H, W);  tokenizer.vocab_size -> int
  tokenizer.encode_to_indices(params, images: float32[B, S, S, 3] in [-1, 1]) -> int32[B, H, W]
  tokenizer.decode_from_indices(params, indices: int32[B, H, W]) -> float32[B, S, S, 3] in [-1, 1]

Both are pure functions of (params, inputs) so the trainer can call them frozen
inside its jitted, sharded step. `make_tokenizer(config.tokenizer, image_size)`
builds the one the config names, with its (possibly empty) parameters.
"""
from __future__ import annotations

from typing import Any

from heptapod_jax.models.tokenizers.pixel import PixelTokenizer


def make_tokenizer(tokenizer_config: Any, image_size: int) -> tuple[Any, Any]:
  """Returns (tokenizer, params) for `config.tokenizer`."""
  if tokenizer_config.kind == 'pixel':
    return PixelTokenizer(image_size=image_size, patch=tokenizer_config.patch,
                          levels=tokenizer_config.levels), {}
  raise ValueError(f'config.tokenizer.kind={tokenizer_config.kind!r} is not available; '
                   "valid kinds: ['pixel'].")
