"""Training FLOPs per image of each size preset, and the wall time they imply for a recipe.

  python benchmarks/flops.py [--steps_per_image=8] [--epochs=800] [--chips=256] [--mfu=0.4]

FLOPs come from XLA's cost analysis of the jitted forward + backward of the
loss (one image, ImageNet shapes: 16x16 grid, 16384 codes; tokenizer and
optimizer update excluded), lowered on this machine without running it.
The wall time is an ESTIMATE: FLOPs x images / (chips x peak x MFU), with the
peak of a TPU v5e chip (197 bf16 TFLOP/s) unless --peak_tflops says otherwise
and an assumed model-FLOPs utilisation; measure with the real step time
(benchmarks on the hardware) before committing a budget.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from heptapod_jax import presets
from heptapod_jax.models.config import BackboneConfig, HeadConfig, ModelConfig
from heptapod_jax.models.heptapod import Heptapod, compute_loss, init_params

_STEPS = flags.DEFINE_integer('steps_per_image', 8, 'Sampled steps per image (global/local heads).')
_EPOCHS = flags.DEFINE_integer('epochs', 800, 'ImageNet epochs.')
_CHIPS = flags.DEFINE_integer('chips', 256, 'Accelerator chips.')
_PEAK = flags.DEFINE_float('peak_tflops', 197.0, 'Peak bf16 TFLOP/s per chip (v5e: 197).')
_MFU = flags.DEFINE_float('mfu', 0.4, 'Assumed model-FLOPs utilisation.')
_BATCH = 4  # Images in the lowered step (FLOPs are divided by it).
IMAGENET_TRAIN_IMAGES = 1_281_167


def train_flops_per_image(size: str, kind: str, steps_per_image: int) -> float:
  s = presets.size_overrides(size)
  cfg = ModelConfig(vocab_size=16384, grid_size=(16, 16), num_classes=1000, scan_unroll=64,
                    backbone=BackboneConfig(**s['backbone']),
                    head=dataclasses.replace(HeadConfig(**s['head']), kind=kind, window=32,
                                             steps_per_image=steps_per_image if kind != 'next_token'
                                             else -1))
  model = Heptapod(cfg)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  tokens = jax.ShapeDtypeStruct((_BATCH, cfg.num_positions), jnp.int32)
  labels = jax.ShapeDtypeStruct((_BATCH,), jnp.int32)
  grad = jax.jit(jax.grad(lambda p, t, y: compute_loss(model, p, t, y, jax.random.key(0))[0]))
  cost = grad.lower(params, tokens, labels).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) / _BATCH


def main(argv):
  del argv
  images = _EPOCHS.value * IMAGENET_TRAIN_IMAGES
  rate = _CHIPS.value * _PEAK.value * 1e12 * _MFU.value
  print(f'{_EPOCHS.value} epochs, {_CHIPS.value} chips x {_PEAK.value} TFLOP/s x MFU {_MFU.value} '
        '(estimate)')
  print(f'{"size":5s} {"head":11s} {"GFLOP/image":>12s} {"est. days":>10s}')
  for size in ('B', 'L', 'XL', 'H'):
    for kind in ('global', 'next_token'):
      f = train_flops_per_image(size, kind, _STEPS.value)
      print(f'{size:5s} {kind:11s} {f / 1e9:12.1f} {f * images / rate / 86400:10.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)
