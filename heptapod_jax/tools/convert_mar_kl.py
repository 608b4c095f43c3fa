"""Imports MAR's KL-16 VAE weights (kl16.ckpt) into a tokenizer checkpoint.

  python -m heptapod_jax.tools.convert_mar_kl --src kl16.ckpt --dst DIR [--image_size 256]

MAR loads `torch.load(path)['model']` (non-strictly); a bare state dict also
works. Every key is mapped (conv OIHW -> HWIO, GroupNorm weight -> scale);
keys of LDM's training loss (`loss.*`: LPIPS / discriminator / logvar), which
LDM checkpoints may carry, are skipped; anything else unmapped or missing
aborts naming the keys. torch is needed only here (CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Mapping, Sequence

from heptapod_jax.models.tokenizers import autoencoder as ae
from heptapod_jax.models.tokenizers import kl as kl_lib
from heptapod_jax.tools.convert_llamagen_vq import load_torch_state_dict

IGNORED_PREFIXES = ('loss.',)


def convert_state_dict(state_dict: Mapping[str, Any], config: kl_lib.KLConfig) -> dict[str, Any]:
  """MAR AutoencoderKL state dict {key: float array (OIHW)} -> KLModel params (numpy float32).

  Raises:
    ValueError naming unmapped torch keys, missing Flax parameters or the first
    shape mismatch.
  """
  return ae.torch_state_dict_to_params(state_dict, kl_lib.abstract_params(config),
                                       ignore=lambda k: k.startswith(IGNORED_PREFIXES),
                                       source='MAR KL state dict')


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry point."""
  from heptapod_jax.storage import tokenizer_checkpoint as tok_io

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--src', required=True, help="MAR's kl16.ckpt.")
  p.add_argument('--dst', required=True, help='Output tokenizer checkpoint directory.')
  p.add_argument('--key', default='model', help='State dict entry of the checkpoint.')
  p.add_argument('--image_size', type=int, default=256)
  p.add_argument('--embed_dim', type=int, default=16)
  p.add_argument('--allow_pickle', action='store_true', help='Allow full unpickling of --src.')
  args = p.parse_args(argv)
  config = kl_lib.KLConfig(image_size=args.image_size, embed_dim=args.embed_dim)
  state_dict = load_torch_state_dict(args.src, args.key, args.allow_pickle)
  params = convert_state_dict(state_dict, config)
  tok_io.save_tokenizer(args.dst, 'kl', config, params)
  n = sum(v.size for v in ae.flatten_params(params).values())
  print(f'wrote {args.dst}: KL tokenizer, {n:,} parameters, config {dataclasses.asdict(config)}')


if __name__ == '__main__':
  main(sys.argv[1:])
