"""Imports LlamaGen's VQ tokenizer weights (e.g. vq_ds16_c2i.pt) into a tokenizer checkpoint.

  python -m heptapod_jax.tools.convert_llamagen_vq --src vq_ds16_c2i.pt --dst DIR [--image_size 256]

The .pt file is what LlamaGen's trainer saves, `{'model': state_dict, ...}`
(its samplers load `checkpoint['model']`); a bare state dict also works.
`--key ema` picks the EMA weights of a training checkpoint instead. Every key is
mapped (conv OIHW -> HWIO, GroupNorm weight -> scale, codebook -> embedding);
only the `quantize.codebook_used` usage buffer is skipped, and anything
unmapped or missing aborts the import naming the keys. torch is needed only
here (CPU), never by the library.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from heptapod_jax.models.tokenizers import autoencoder as ae
from heptapod_jax.models.tokenizers import vq as vq_lib

# Buffers of the original that are not parameters.
IGNORED_KEYS = ('quantize.codebook_used',)


def convert_state_dict(state_dict: Mapping[str, Any], config: vq_lib.VQConfig) -> dict[str, Any]:
  """LlamaGen VQModel state dict {key: float array (NCHW/OIHW)} -> VQModel params (numpy float32).

  Raises:
    ValueError naming unmapped torch keys, missing Flax parameters or the first
    shape mismatch (e.g. a wrong ch_mult or codebook size in `config`).
  """
  return ae.torch_state_dict_to_params(state_dict, vq_lib.abstract_params(config),
                                       ignore=lambda k: k in IGNORED_KEYS,
                                       source='LlamaGen VQ state dict')


def load_torch_state_dict(path: str, key: str = 'model', allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint on CPU and returns {key: float32 numpy array} of its state dict `key`.

  Loads with weights_only=True (argparse.Namespace, which LlamaGen's trainer
  stores as 'args', is allow-listed); `allow_pickle` falls back to full
  unpickling for files you trust that hold other objects.
  """
  import torch

  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    if not allow_pickle:
      raise RuntimeError(f'could not load {path} with weights_only=True ({e}); if you trust the '
                         'file, rerun with --allow_pickle.') from e
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
  if isinstance(checkpoint, Mapping) and key in checkpoint and isinstance(checkpoint[key], Mapping):
    state_dict = checkpoint[key]
  elif isinstance(checkpoint, Mapping) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
    state_dict = checkpoint  # A bare state dict.
  else:
    keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f'{path} has no state dict under {key!r} (top-level keys: {keys}).')
  return {k: v.detach().to(torch.float32).numpy() for k, v in state_dict.items()
          if isinstance(v, torch.Tensor)}


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry point."""
  from heptapod_jax.storage import tokenizer_checkpoint as tok_io

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--src', required=True, help='LlamaGen .pt checkpoint (e.g. vq_ds16_c2i.pt).')
  p.add_argument('--dst', required=True, help='Output tokenizer checkpoint directory.')
  p.add_argument('--key', default='model', help="State dict entry of the .pt: 'model' or 'ema'.")
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--codebook_size', type=int, default=16384)
  p.add_argument('--codebook_embed_dim', type=int, default=8)
  p.add_argument('--ch_mult', default='1,1,2,2,4', help="Comma-separated; '1,2,2,4' for VQ-8.")
  p.add_argument('--allow_pickle', action='store_true', help='Allow full unpickling of --src.')
  args = p.parse_args(argv)
  config = vq_lib.VQConfig(image_size=args.image_size, codebook_size=args.codebook_size,
                           codebook_embed_dim=args.codebook_embed_dim,
                           ch_mult=tuple(int(m) for m in args.ch_mult.split(',')))
  state_dict = load_torch_state_dict(args.src, args.key, args.allow_pickle)
  params = convert_state_dict(state_dict, config)
  tok_io.save_tokenizer(args.dst, 'vq', config, params)
  n = sum(v.size for v in ae.flatten_params(params).values())
  print(f'wrote {args.dst}: VQ tokenizer, {n:,} parameters, config {dataclasses.asdict(config)}')


if __name__ == '__main__':
  main(sys.argv[1:])
