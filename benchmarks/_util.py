"""Pieces the benchmark scripts share: model construction from a preset, median timing."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax

from heptapod_jax import presets
from heptapod_jax.models.config import BackboneConfig, HeadConfig, ModelConfig
from heptapod_jax.models.heptapod import Heptapod, init_params


def median_time(fn: Callable[..., Any], *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after one warm-up (compilation)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def build_model(size: str, *, grid: int, vocab: int, kind: str, steps_per_image: int = -1,
                window: int = 8, num_classes: int = 10, **model_fields) -> tuple[Heptapod, Any]:
  """A size preset with the given shapes and head, and its (unboxed) random parameters.

  `model_fields` go to ModelConfig as they are (e.g. tokens='kl', token_dim=16,
  diffusion=DiffusionConfig(...)).
  """
  s = presets.size_overrides(size)
  cfg = ModelConfig(
      vocab_size=vocab, grid_size=(grid, grid), num_classes=num_classes,
      backbone=BackboneConfig(**s['backbone']),
      head=dataclasses.replace(HeadConfig(**s['head']), kind=kind, window=window,
                               steps_per_image=steps_per_image), **model_fields)
  cfg.validate()
  model = Heptapod(cfg)
  return model, nn.unbox(init_params(model, jax.random.key(0)))
