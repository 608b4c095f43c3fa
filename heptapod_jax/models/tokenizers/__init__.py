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

KINDS = ('pixel', 'vq')


def _local_abspath(path: str) -> str:
  """Orbax needs absolute local paths; URLs (gs://...) stay as given."""
  return path if '://' in path else os.path.abspath(path)


def stored_vq_config(tokenizer_config: Any):
  """The VQConfig saved in `tokenizer_config.checkpoint` (read from metadata, no arrays)."""
  from heptapod_jax.models.tokenizers import io
  if not tokenizer_config.checkpoint:
    raise ValueError('config.tokenizer.checkpoint is empty: kind="vq" needs a tokenizer '
                     'checkpoint (train one with `python -m heptapod_jax.main '
                     '--config=configs/vq_*.py`, or import LlamaGen\'s with '
                     '`python -m heptapod_jax.tools.convert_llamagen_vq`).')
  kind, config = io.read_tokenizer_config(_local_abspath(tokenizer_config.checkpoint),
                                         key=tokenizer_config.checkpoint_key)
  if kind != 'vq':
    raise ValueError(f'config.tokenizer.checkpoint={tokenizer_config.checkpoint} holds a {kind!r} '
                     'tokenizer; config.tokenizer.kind="vq" needs a VQ one.')
  return config


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
  raise ValueError(f'config.tokenizer.kind={tokenizer_config.kind!r} is not one of {list(KINDS)}.')
