"""Prints the parameter counts (backbone, head, total) of every size preset.

  python -m heptapod_jax.tools.param_count [--vocab_size=16384] [--grid=16] [--head=global]
"""
from __future__ import annotations

import dataclasses

from absl import app, flags

from heptapod_jax import presets
from heptapod_jax.models.config import HEAD_KINDS, BackboneConfig, HeadConfig, ModelConfig

_VOCAB = flags.DEFINE_integer('vocab_size', 16384, 'Codebook size.')
_GRID = flags.DEFINE_integer('grid', 16, 'Token grid side (16 = 256x256 images, stride 16).')
_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Number of classes.')
_HEAD = flags.DEFINE_enum('head', 'global', HEAD_KINDS, 'Head kind.')


def preset_config(size: str, *, vocab_size: int, grid: int, num_classes: int, head: str) -> ModelConfig:
  """The ModelConfig of preset `size` with the given data-dependent fields."""
  s = presets.size_overrides(size)
  return ModelConfig(vocab_size=vocab_size, grid_size=(grid, grid), num_classes=num_classes,
                     backbone=BackboneConfig(**s['backbone']),
                     head=dataclasses.replace(HeadConfig(**s['head']), kind=head))


def main(argv):
  del argv
  print(f'vocab={_VOCAB.value} grid={_GRID.value}x{_GRID.value} classes={_CLASSES.value} '
        f'head={_HEAD.value}')
  print(f'{"size":6s} {"backbone":>14s} {"head":>14s} {"total":>14s}  paper')
  for size in presets.SIZES:
    cfg = preset_config(size, vocab_size=_VOCAB.value, grid=_GRID.value,
                        num_classes=_CLASSES.value, head=_HEAD.value)
    c = presets.param_counts(cfg)
    paper = presets.PAPER_PARAMS.get(size)
    note = f'{paper / 1e6:.0f}M ({(c["total"] / paper - 1) * 100:+.2f}%)' if paper else ''
    print(f'{size:6s} {c["backbone"]:14,d} {c["head"]:14,d} {c["total"]:14,d}  {note}')


if __name__ == '__main__':
  app.run(main)
