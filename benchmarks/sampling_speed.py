"""Sampling throughput (images/s, tokens/s) of a size preset, per head kind.

  python benchmarks/sampling_speed.py                          # tiny preset, demo and ImageNet shapes
  python benchmarks/sampling_speed.py --size=B --shapes=16x16384 --batch=32 --heads=global

Times the jitted KV-cached sampler (`sampling.sample`: prefill, N raster steps,
the head evaluated for one position per step) from class labels to token
grids; the tokenizer's decode is not included (see tokenizer_throughput.py).
One key per sample, as sample mode uses. Median of `--repeats` calls after a
warm-up call (compilation excluded), on whatever devices JAX sees.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from absl import app, flags

from _util import build_model, median_time
from heptapod_jax import sampling

_SIZE = flags.DEFINE_string('size', 'tiny', 'Size preset.')
_SHAPES = flags.DEFINE_list('shapes', ['8x64', '16x16384'],
                            'GRIDxVOCAB settings: 8x64 = the demo (8x8 grid, 64 codes), '
                            '16x16384 = ImageNet 256 with VQ-16.')
_HEADS = flags.DEFINE_list('heads', ['global', 'local', 'next_token'], 'Head kinds.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Samples per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median reported).')


def main(argv):
  del argv
  print(f'preset={_SIZE.value} batch={_BATCH.value} devices={jax.devices()[0].device_kind} '
        f'x{jax.device_count()}')
  print(f'{"grid x vocab":>14s} {"head":>11s} {"s/batch":>9s} {"img/s":>9s} {"tokens/s":>10s}')
  for shape in _SHAPES.value:
    grid, vocab = (int(v) for v in shape.lower().split('x'))
    for kind in _HEADS.value:
      model, params = build_model(_SIZE.value, grid=grid, vocab=vocab, kind=kind,
                                  num_classes=1000 if vocab > 1000 else 10)
      labels = np.arange(_BATCH.value, dtype=np.int32) % model.config.num_classes
      keys = sampling.example_keys(0, np.arange(_BATCH.value))
      fn = jax.jit(functools.partial(sampling.sample, model))
      seconds = median_time(fn, params, labels, keys, repeats=_REPEATS.value)
      rate = _BATCH.value / seconds
      print(f'{grid}x{grid} x {vocab:<5d} {kind:>11s} {seconds:9.3f} {rate:9.2f} '
            f'{rate * grid * grid:10.0f}', flush=True)


if __name__ == '__main__':
  app.run(main)
