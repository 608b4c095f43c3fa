"""Training throughput and MFU of the full train step, with the peak measured in the same run.

  python benchmarks/train_throughput.py                                  # B preset, three heads
  python benchmarks/train_throughput.py --sizes=B --heads=next_token --batch=16
  python benchmarks/train_throughput.py --ablation                       # + the head-cost table

Times `train.train_step` (loss, gradients, AdamW update, EMA; jitted with the state donated)
on pre-tokenized batches at ImageNet shapes (16x16 grid, 16384 codes; --grid / --vocab),
median of --repeats calls after a warm-up. Columns:

  s/step        median wall time of one step
  img/s, tok/s  images and tokens (N per image) per second
  TFLOP/step    analytic model FLOPs of the step (heptapod_jax/flops.py; fwd + bwd, remat not
                counted), the backbone's and the head's share
  TFLOP/s       achieved model FLOP/s
  MFU           achieved / peak, where the peak is a chain of square matmuls of the same dtype
                timed on the same device in the same run (on CPU the table of chips has no
                entry: this measured peak is the honest denominator), so MFU is a ratio of two
                measurements taken side by side.

--ablation adds the cost of the 2D head: the global and local step times over the next_token
step time at the same backbone, for a grid of (steps_per_image, head depth, head width).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _util import build_model, median_time
from heptapod_jax import flops, optim, train
from heptapod_jax.models.config import HeadConfig

_SIZES = flags.DEFINE_list('sizes', ['B'], 'Size presets.')
_HEADS = flags.DEFINE_list('heads', ['next_token', 'local', 'global'], 'Head kinds.')
_GRID = flags.DEFINE_integer('grid', 16, 'Token grid side.')
_VOCAB = flags.DEFINE_integer('vocab', 16384, 'Codebook size.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Global batch.')
_STEPS = flags.DEFINE_integer('steps_per_image', 0, 'Steps per image of the 2D heads; 0 = the '
                              'preset default (HeadConfig).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_UNROLL = flags.DEFINE_integer('scan_unroll', 1, 'Layers per nn.scan iteration.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed steps (median).')
_ATTN = flags.DEFINE_string('attention_impl', 'xla', 'model.attention_impl.')
_ABLATION = flags.DEFINE_bool('ablation', False, 'Also print the head-cost ablation table.')
_ABL_STEPS = flags.DEFINE_list('ablation_steps', ['2', '4', '8'], 'steps_per_image values.')
_ABL_DEPTHS = flags.DEFINE_list('ablation_depths', ['2', '4'], 'Head depths.')
_ABL_WIDTHS = flags.DEFINE_list('ablation_widths', ['384', '512', '768'], 'Head widths.')
_ABL_SIZE = flags.DEFINE_string('ablation_size', 'B', 'Backbone preset of the ablation.')
_ABL_KINDS = flags.DEFINE_list('ablation_heads', ['global', 'local'], 'Head kinds of the ablation.')
_ABL_SETTINGS = flags.DEFINE_list('ablation_settings', [], 'Explicit STEPSxDEPTHxWIDTH settings '
                                  '(e.g. 4x2x384); overrides the product of the three lists.')


def step_time(size: str, kind: str, **head_over) -> tuple[float, dict]:
  """(median seconds of one train step, analytic per-image FLOPs) for a preset and head."""
  steps = head_over.pop('steps_per_image', _STEPS.value or HeadConfig.steps_per_image)
  model, params = build_model(size, grid=_GRID.value, vocab=_VOCAB.value, kind=kind,
                              steps_per_image=-1 if kind == 'next_token' else steps,
                              window=16, num_classes=1000, dtype=_DTYPE.value,
                              scan_unroll=_UNROLL.value, attention_impl=_ATTN.value)
  if head_over:
    cfg = dataclasses.replace(model.config, head=dataclasses.replace(model.config.head, **head_over))
    cfg.validate()
    model = type(model)(cfg)
    from heptapod_jax.models.heptapod import init_params
    import flax.linen as nn
    params = nn.unbox(init_params(model, jax.random.key(0)))
  del params
  optim_cfg = _OptimConfig()
  tx, schedule = optim.make_optimizer(optim_cfg, 1000)
  state = jax.jit(functools.partial(train.init_train_state, model, tx))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {'tokens': jnp.asarray(rng.integers(0, _VOCAB.value, (_BATCH.value, _GRID.value, _GRID.value)),
                                 jnp.int32),
           'label': jnp.asarray(rng.integers(0, 1000, (_BATCH.value,)), jnp.int32)}
  fn = jax.jit(functools.partial(train.train_step, model=model, tokenizer=None, tx=tx,
                                 schedule=schedule, ema_decay=0.9999), donate_argnums=0)
  holder = {'state': state}

  def run():
    holder['state'], metrics = fn(holder['state'], batch, {})
    return metrics['loss_value']

  seconds = median_time(run, repeats=_REPEATS.value)
  return seconds, flops.train_flops_per_image(model.config)


@dataclasses.dataclass
class _OptimConfig:
  lr: float = 1e-4
  warmup_steps: int = 10
  schedule: str = 'constant'
  min_lr_ratio: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.05
  grad_clip: float = 1.0


def main(argv):
  del argv
  device = jax.devices()[0]
  dtype = jnp.dtype(_DTYPE.value)
  peak = flops.measure_peak_matmul_flops(dtype=dtype, device=device)
  print(f'device: {device.device_kind} ({device.platform}), 1 device; {_DTYPE.value}; '
        f'measured peak {peak / 1e12:.3f} TFLOP/s (chain of square matmuls, same run)')
  print(f'shapes: {_GRID.value}x{_GRID.value} grid, {_VOCAB.value} codes, batch {_BATCH.value}')
  header = (f'{"size":5s} {"head":11s} {"s/step":>8s} {"img/s":>8s} {"tok/s":>9s} '
            f'{"TFLOP/step":>11s} {"backbone":>9s} {"head":>6s} {"TFLOP/s":>8s} {"MFU":>6s}')
  print(header)
  for size, kind in itertools.product(_SIZES.value, _HEADS.value):
    seconds, f = step_time(size, kind)
    total = f['total'] * _BATCH.value
    achieved = total / seconds
    n = _GRID.value ** 2
    print(f'{size:5s} {kind:11s} {seconds:8.3f} {_BATCH.value / seconds:8.2f} '
          f'{_BATCH.value * n / seconds:9.0f} {total / 1e12:11.3f} '
          f'{f["backbone"] / f["total"]:9.0%} {(f["head"] + f["diffusion"]) / f["total"]:6.0%} '
          f'{achieved / 1e12:8.3f} {achieved / peak:6.2f}', flush=True)
  # The peak again at the end: how much the machine's speed drifted during the run.
  peak_end = flops.measure_peak_matmul_flops(dtype=dtype, device=device)
  print(f'peak at the end of the run: {peak_end / 1e12:.3f} TFLOP/s '
        f'({peak_end / peak - 1:+.1%} vs the start)')

  if _ABLATION.value:
    size = _ABL_SIZE.value
    base, base_flops = step_time(size, 'next_token')
    print(f'\nhead-cost ablation: {size} backbone, step time over the next_token step '
          f'({base:.3f} s); in parentheses the same ratio of analytic FLOPs')
    kinds = _ABL_KINDS.value
    print(f'{"steps/img":>9s} {"depth":>5s} {"width":>5s} '
          + ' '.join(f'{k + " (FLOPs)":>18s}' for k in kinds))
    settings = ([tuple(x.split('x')) for x in _ABL_SETTINGS.value] or
                list(itertools.product(_ABL_STEPS.value, _ABL_DEPTHS.value, _ABL_WIDTHS.value)))
    for steps, depth, width in settings:
      heads = max(1, int(width) // 64)
      cells = []
      for kind in kinds:
        seconds, f = step_time(size, kind, steps_per_image=int(steps), depth=int(depth),
                               width=int(width), num_heads=heads)
        cells.append(f'{seconds / base:9.2f} ({f["total"] / base_flops["total"]:4.2f})')
      print(f'{steps:>9s} {depth:>5s} {width:>5s} ' + ' '.join(f'{c:>18s}' for c in cells),
            flush=True)


if __name__ == '__main__':
  app.run(main)
