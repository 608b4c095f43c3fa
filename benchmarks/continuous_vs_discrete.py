"""Continuous tokens (diffusion loss) vs discrete tokens (cross-entropy), side by side.

  python benchmarks/continuous_vs_discrete.py                    # tiny preset, demo + ImageNet shapes
  python benchmarks/continuous_vs_discrete.py --size=B --shapes=16 --batch=8

For each grid shape and token type, in one process: the training step
(forward + backward of the loss, jitted) and the sampling time per image (the
jitted KV-cached sampler from labels to tokens; for continuous tokens every
position runs the diffusion head's DDPM loop). Medians of `--repeats` calls
after a warm-up call (compilation excluded). The discrete model has the VQ
codebook of the shape (64 codes at 8x8 as the demo, 16384 at 16x16); the
continuous one has the matching KL latent (4 channels at 8x8 as the demo, 16 at
16x16) and a diffusion MLP of `--diff_width` x `--diff_depth`.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from absl import app, flags

from _util import build_model, median_time
from heptapod_jax.models.diffusion import DiffusionConfig
from heptapod_jax.models.heptapod import compute_loss
from heptapod_jax.sampling import decode

_SIZE = flags.DEFINE_string('size', 'tiny', 'Size preset.')
_SHAPES = flags.DEFINE_list('shapes', ['8', '16'], 'Grid sides.')
_HEAD = flags.DEFINE_string('head', 'global', 'Head kind.')
_STEPS = flags.DEFINE_integer('steps_per_image', 4, 'Sampled steps per image (training).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Images per training step / sampling call.')
_DIFF_WIDTH = flags.DEFINE_integer('diff_width', 256, 'Diffusion MLP width.')
_DIFF_DEPTH = flags.DEFINE_integer('diff_depth', 3, 'Diffusion MLP residual blocks.')
_DIFF_STEPS = flags.DEFINE_integer('diff_sampling_steps', 100, 'DDPM steps per token.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median reported).')

_VQ = {8: 64, 16: 16384}
_KL = {8: 4, 16: 16}


def _measure(grid: int, continuous: bool) -> tuple[float, float]:
  fields = {}
  if continuous:
    fields = dict(tokens='kl', token_dim=_KL.get(grid, 16),
                  diffusion=DiffusionConfig(width=_DIFF_WIDTH.value, depth=_DIFF_DEPTH.value,
                                            batch_mul=4, num_sampling_steps=_DIFF_STEPS.value))
  model, params = build_model(_SIZE.value, grid=grid, vocab=_VQ.get(grid, 16384), kind=_HEAD.value,
                              steps_per_image=_STEPS.value if _HEAD.value != 'next_token' else -1,
                              num_classes=10, **fields)
  cfg = model.config
  b = _BATCH.value
  key = jax.random.key(1)
  if continuous:
    tokens = jax.random.normal(key, (b, cfg.num_positions, cfg.token_dim))
  else:
    tokens = jax.random.randint(key, (b, cfg.num_positions), 0, cfg.vocab_size)
  labels = np.arange(b, dtype=np.int32) % 10
  step = jax.jit(jax.grad(lambda p: compute_loss(model, p, tokens, labels, key)[0]))
  t_step = median_time(step, params, repeats=_REPEATS.value)
  keys = decode.example_keys(0, np.arange(b))
  sample = jax.jit(functools.partial(decode.sample, model))
  t_sample = median_time(sample, params, labels, keys, repeats=_REPEATS.value)
  return t_step, t_sample / b


def main(argv):
  del argv
  print(f'preset={_SIZE.value} head={_HEAD.value} steps_per_image={_STEPS.value} '
        f'batch={_BATCH.value} diffusion MLP {_DIFF_WIDTH.value}x{_DIFF_DEPTH.value}, '
        f'{_DIFF_STEPS.value} DDPM steps; devices={jax.devices()[0].device_kind} x{jax.device_count()}')
  print(f'{"grid":>6s} {"tokens":>22s} {"train step (s)":>15s} {"sampling s/image":>17s}')
  for shape in _SHAPES.value:
    grid = int(shape)
    rows = {}
    for continuous in (False, True):
      rows[continuous] = _measure(grid, continuous)
      label = (f'continuous ({_KL.get(grid, 16)} ch)' if continuous
               else f'discrete ({_VQ.get(grid, 16384)} codes)')
      print(f'{grid}x{grid:<3d} {label:>22s} {rows[continuous][0]:15.3f} {rows[continuous][1]:17.4f}',
            flush=True)
    print(f'{"":6s} {"continuous / discrete":>22s} {rows[True][0] / rows[False][0]:14.2f}x '
          f'{rows[True][1] / rows[False][1]:16.2f}x', flush=True)


if __name__ == '__main__':
  app.run(main)
