"""Pieces the benchmark scripts share: model construction from a preset, the ImageNet
recipe's model at a preset, a jitted train step, median timing."""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable

from heptapod_jax import console as _console

# Every benchmark that shares these pieces: libtpu (installed for the AOT TPU compiles) would
# probe for a TPU at JAX's first use and print its initialisation errors on a machine without
# one, and TensorFlow its start-up notices. Before any backend starts, so it still applies.
_console.quiet_dependencies()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from heptapod_jax import config_lib, presets  # noqa: E402
from heptapod_jax.models.config import BackboneConfig, HeadConfig, ModelConfig  # noqa: E402
from heptapod_jax.models.heptapod import Heptapod, init_params  # noqa: E402
from heptapod_jax.training import optim, steps  # noqa: E402


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


def imagenet_model_config(size: str, kind: str, *, dtype: str = 'float32', steps_per_image: int = 4,
                          window: int = 32, scan_unroll: int = 0, attention_impl: str = 'xla',
                          remat_policy: str = 'none', dropout: float = 0.0, grid: int = 16,
                          vocab: int = 16384, **head_over) -> ModelConfig:
  """Preset `size` at ImageNet 256 shapes (grid x grid, `vocab` codes, 1000 classes) with the
  2D heads as configs/imagenet256.py sets them (steps_per_image, window, the preset's head);
  `dropout` sets the backbone's residual and token dropout (the recipe: 0.1), `scan_unroll` 0
  unrolls every layer, `head_over` replaces HeadConfig fields."""
  preset = presets.size_overrides(size)
  head = dataclasses.replace(HeadConfig(**preset['head']), kind=kind, window=window,
                             steps_per_image=-1 if kind == 'next_token' else steps_per_image)
  head = dataclasses.replace(head, **head_over)
  backbone = dataclasses.replace(BackboneConfig(**preset['backbone']), dropout=dropout,
                                 token_dropout=dropout)
  cfg = ModelConfig(vocab_size=vocab, grid_size=(grid, grid), num_classes=1000, backbone=backbone,
                    head=head, dtype=dtype, scan_unroll=scan_unroll or max(backbone.depth, head.depth),
                    attention_impl=attention_impl, remat_policy=remat_policy)
  cfg.validate()
  return cfg


def make_train_step(cfg: ModelConfig, batch_size: int) -> Callable[[], Any]:
  """A no-argument function running one jitted, state-donating `steps.train_step` (loss,
  gradients, clipped AdamW update, EMA; the recipe's optimizer settings) on a fixed batch of
  random codes; it returns the loss. The first call compiles."""
  model = Heptapod(cfg)
  optim_config = config_lib.base_config().optim
  tx, schedule = optim.make_optimizer(optim_config, 1000)
  state = jax.jit(functools.partial(steps.init_train_state, model, tx))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'tokens': jnp.asarray(rng.integers(0, cfg.vocab_size, (batch_size, *cfg.grid_size)),
                                 jnp.int32),
           'label': jnp.asarray(rng.integers(0, cfg.num_classes, (batch_size,)), jnp.int32)}
  step = jax.jit(functools.partial(steps.train_step, model=model, tokenizer=None, tx=tx,
                                   schedule=schedule, ema_decay=optim_config.ema_decay),
                 donate_argnums=0)
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], batch, {})
    return metrics['loss_value']

  return run


def time_sampler(model: Heptapod, params: Any, batch: int, config: Any, repeats: int
                 ) -> dict[str, float]:
  """Times `decode.sample` (jitted, one key per sample, labels 0..batch-1) from labels to
  token grids: {'seconds': median call time, 'compile': first call's time}."""
  from heptapod_jax.sampling import decode  # pylint: disable=g-import-not-at-top
  labels = np.arange(batch, dtype=np.int32) % model.config.num_classes
  keys = decode.example_keys(0, np.arange(batch))
  fn = jax.jit(functools.partial(decode.sample, model, config=config))
  start = time.perf_counter()
  jax.block_until_ready(fn(params, labels, keys))
  compile_seconds = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, labels, keys))
    times.append(time.perf_counter() - start)
  return {'seconds': statistics.median(times), 'compile': compile_seconds}


def decode_roofline(cfg: ModelConfig, batch: int, seconds: float, peak: float, bandwidth: float,
                    parallel_tokens: int = 1, param_bytes: int = 4) -> dict[str, float]:
  """Where one decoding step stands against the machine's limits, from a sampling call of
  `seconds` for `batch` images: ms per step (call / N), the bytes a step must read at the
  least (flops.sampling_bytes_per_step) over its time and against the measured `bandwidth`,
  and the analytic FLOPs of a step over its time and against the measured matmul `peak`."""
  from heptapod_jax import flops  # pylint: disable=g-import-not-at-top
  n = cfg.num_positions
  step = seconds / n
  need = flops.sampling_bytes_per_step(cfg, batch, param_bytes, param_bytes)['total']
  work = flops.sampling_flops_per_image(cfg, parallel_tokens)['total'] * batch / n
  return {'ms_step': 1e3 * step, 'mb_step': need / 1e6, 'gbps': need / step / 1e9,
          'of_bandwidth': need / step / bandwidth, 'gflop_step': work / 1e9,
          'tflops': work / step / 1e12, 'of_peak': work / step / peak}
