"""Sampling throughput per head kind and batch size, with and without the KV cache.

  python benchmarks/sampling_speed.py                          # tiny preset, ImageNet shapes
  python benchmarks/sampling_speed.py --size=B --shapes=16x16384 --batches=1,8,32 --heads=global

Times the jitted raster sampler (`sampling.sample`: prefill, N steps, the head evaluated for
one position per step) from class labels to token grids, once with the KV cache (the
backbone consumes one token per step) and once recomputing it (`use_kv_cache=False`: the
backbone reruns over the whole sequence at every step), in the same run; `cache gain` is
the ratio of the two times. The tokenizer's decode is not included (tokenizer_throughput.py).
One key per sample, as sample mode uses. Median of --repeats calls after a warm-up
(compilation excluded), on whatever devices JAX sees.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from absl import app, flags

from _util import build_model, median_time
from heptapod_jax import sampling

_SIZE = flags.DEFINE_string('size', 'tiny', 'Size preset.')
_SHAPES = flags.DEFINE_list('shapes', ['16x16384'],
                            'GRIDxVOCAB settings: 8x64 = the demo (8x8 grid, 64 codes), '
                            '16x16384 = ImageNet 256 with VQ-16.')
_HEADS = flags.DEFINE_list('heads', ['global', 'local', 'next_token'], 'Head kinds.')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Samples per call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median reported).')


def main(argv):
  del argv
  print(f'preset={_SIZE.value} devices={jax.devices()[0].device_kind} x{jax.device_count()}')
  print(f'{"grid x vocab":>14s} {"head":>11s} {"batch":>5s} {"img/s cached":>12s} '
        f'{"img/s no cache":>14s} {"cache gain":>10s} {"tokens/s cached":>15s}')
  for shape in _SHAPES.value:
    grid, vocab = (int(v) for v in shape.lower().split('x'))
    for kind in _HEADS.value:
      model, params = build_model(_SIZE.value, grid=grid, vocab=vocab, kind=kind,
                                  num_classes=1000 if vocab > 1000 else 10)
      for batch in (int(b) for b in _BATCHES.value):
        labels = np.arange(batch, dtype=np.int32) % model.config.num_classes
        keys = sampling.example_keys(0, np.arange(batch))
        seconds = {}
        for cache in (True, False):
          config = sampling.SamplingConfig(use_kv_cache=cache)
          fn = jax.jit(functools.partial(sampling.sample, model, config=config))
          seconds[cache] = median_time(fn, params, labels, keys, repeats=_REPEATS.value)
        rate = {c: batch / s for c, s in seconds.items()}
        print(f'{grid}x{grid} x {vocab:<5d} {kind:>11s} {batch:5d} {rate[True]:12.2f} '
              f'{rate[False]:14.2f} {seconds[False] / seconds[True]:9.2f}x '
              f'{rate[True] * grid * grid:15.0f}', flush=True)


if __name__ == '__main__':
  app.run(main)
