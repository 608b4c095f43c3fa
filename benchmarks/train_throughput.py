"""Training throughput and MFU of the full train step, with the peak measured side by side.

  python benchmarks/train_throughput.py                                # B, three heads + ablation
  python benchmarks/train_throughput.py --heads=next_token --batch=16 --noablation
  python benchmarks/train_throughput.py --quick                        # a few minutes on 2 cores

Times `steps.train_step` (loss, gradients, clipped AdamW update, EMA; jitted with the state
donated) on pre-tokenized batches at ImageNet shapes (16x16 grid, 16384 codes: --grid,
--vocab), with the 2D heads as configs/imagenet256.py sets them (steps_per_image 4, window
32, the preset's head width and depth). Before and after every timed step the peak is
measured on the same device in the same dtype (`flops.measure_peak_matmul_flops`: a chain
of square matmuls, the achievable peak; on CPU no table entry makes sense), so each MFU is a
ratio of two measurements taken seconds apart, robust to other processes slowing the
machine down. Columns of the first table (medians over --repeats steps after a warm-up):

  s/step        wall time of one step
  img/s, tok/s  images and tokens (N per image) per second
  TFLOP/step    analytic model FLOPs of the step (heptapod_jax/flops.py: fwd + bwd = 3 x fwd,
                remat recomputation not counted, optimizer not counted)
  bb%, head%    shares of the backbone and of the head (+ diffusion head) in those FLOPs
  TFLOP/s       achieved model FLOP/s
  peak          the measured matmul peak around the steps, TFLOP/s
  MFU           achieved / peak, the median of the per-step ratios

The head ablation (--ablation, on by default) times the step of the `global` and `local` heads
on the same backbone (--ablation_size) at a smaller batch (--ablation_batch) for several
(steps_per_image, head depth, head width) settings, and prints each over the next_token step
time (in parentheses: the same ratio of analytic FLOPs). --quick varies one factor at a time
around the default (4 steps, 2 layers, width 512) with fewer repeats.
"""
from __future__ import annotations

import itertools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from _util import imagenet_model_config, make_train_step
from heptapod_jax import flops
from heptapod_jax.models.config import ModelConfig

_SIZES = flags.DEFINE_list('sizes', ['B'], 'Size presets (heptapod_jax/presets.py).')
_HEADS = flags.DEFINE_list('heads', ['next_token', 'local', 'global'], 'Head kinds.')
_GRID = flags.DEFINE_integer('grid', 16, 'Token grid side.')
_VOCAB = flags.DEFINE_integer('vocab', 16384, 'Codebook size.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Images per step.')
_STEPS = flags.DEFINE_integer('steps_per_image', 4, 'Steps per image of the 2D heads.')
_WINDOW = flags.DEFINE_integer('window', 32, 'Window of the local head.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype of the model and of the peak matmul.')
_UNROLL = flags.DEFINE_integer('scan_unroll', 0, 'Layers per nn.scan iteration; 0 = all of '
                               'them (no loop; measurably faster on CPU).')
_ATTN = flags.DEFINE_string('attention_impl', 'xla', 'model.attention_impl.')
_REMAT = flags.DEFINE_string('remat_policy', 'none', 'model.remat_policy.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed steps per row (median).')
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer ablation settings and repeats.')
_ABLATION = flags.DEFINE_bool('ablation', True, 'Also print the head-cost ablation table.')
_ABL_SIZE = flags.DEFINE_string('ablation_size', 'B', 'Backbone preset of the ablation.')
_ABL_BATCH = flags.DEFINE_integer('ablation_batch', 2, 'Images per step in the ablation.')
_ABL_KINDS = flags.DEFINE_list('ablation_heads', ['global', 'local'], 'Head kinds of the ablation.')
_ABL_STEPS = flags.DEFINE_list('ablation_steps', ['2', '4', '8'], 'steps_per_image values.')
_ABL_DEPTHS = flags.DEFINE_list('ablation_depths', ['2', '4'], 'Head depths.')
_ABL_WIDTHS = flags.DEFINE_list('ablation_widths', ['384', '512', '768'], 'Head widths.')
_ABL_SETTINGS = flags.DEFINE_list('ablation_settings', [], 'Explicit STEPSxDEPTHxWIDTH settings '
                                  '(e.g. 4x2x384); override the product of the three lists.')
# One factor at a time around the default (4 steps, 2 layers, 512 wide).
_QUICK_SETTINGS = ('2x2x512', '4x2x512', '8x2x512', '4x4x512', '4x2x384', '4x2x768')


def model_config(size: str, kind: str, **head_over) -> ModelConfig:
  """The preset at this benchmark's shapes and settings; `head_over` replaces HeadConfig fields."""
  return imagenet_model_config(size, kind, dtype=_DTYPE.value, steps_per_image=_STEPS.value,
                               window=_WINDOW.value, scan_unroll=_UNROLL.value,
                               attention_impl=_ATTN.value, remat_policy=_REMAT.value,
                               vocab=_VOCAB.value, grid=_GRID.value, **head_over)


def time_step(run, flops_per_step: float, repeats: int, with_peak: bool = True) -> dict[str, float]:
  """Median step seconds, and (with_peak) the median per-step MFU against the peak measured
  right before and right after that step, and the median of those peaks."""
  jax.block_until_ready(run())  # Compilation.
  seconds, ratios, peaks = [], [], []
  dtype = jnp.dtype(_DTYPE.value)
  for _ in range(repeats):
    before = flops.measure_peak_matmul_flops(dtype, repeats=2) if with_peak else 0.0
    start = time.perf_counter()
    jax.block_until_ready(run())
    seconds.append(time.perf_counter() - start)
    if with_peak:
      peak = 0.5 * (before + flops.measure_peak_matmul_flops(dtype, repeats=2))
      peaks.append(peak)
      ratios.append(flops_per_step / seconds[-1] / peak)
  out = {'seconds': statistics.median(seconds)}
  if with_peak:
    out.update(mfu=statistics.median(ratios), peak=statistics.median(peaks))
  return out


def throughput_table() -> None:
  n = _GRID.value ** 2
  batch = _BATCH.value
  print(f'\ntrain step: {_GRID.value}x{_GRID.value} grid, {_VOCAB.value} codes, batch {batch}, '
        f'{_DTYPE.value}, scan_unroll {_UNROLL.value or "all"}, attention {_ATTN.value}, '
        f'remat {_REMAT.value}; 2D heads: steps_per_image {_STEPS.value}, window {_WINDOW.value}')
  print(f'{"size":5s} {"head":11s} {"s/step":>7s} {"img/s":>7s} {"tok/s":>7s} {"TFLOP/step":>10s} '
        f'{"bb%":>4s} {"head%":>5s} {"TFLOP/s":>7s} {"peak":>6s} {"MFU":>5s}')
  for size, kind in itertools.product(_SIZES.value, _HEADS.value):
    cfg = model_config(size, kind)
    f = flops.train_flops_per_image(cfg)
    per_step = f['total'] * batch
    r = time_step(make_train_step(cfg, batch), per_step, _REPEATS.value)
    s = r['seconds']
    print(f'{size:5s} {kind:11s} {s:7.3f} {batch / s:7.2f} {batch * n / s:7.0f} '
          f'{per_step / 1e12:10.3f} {f["backbone"] / f["total"]:4.0%} '
          f'{(f["head"] + f["diffusion"]) / f["total"]:5.0%} {per_step / s / 1e12:7.3f} '
          f'{r["peak"] / 1e12:6.3f} {r["mfu"]:5.2f}', flush=True)


def ablation_table() -> None:
  size, batch = _ABL_SIZE.value, _ABL_BATCH.value
  repeats = 2 if _QUICK.value else _REPEATS.value
  base_cfg = model_config(size, 'next_token')
  base_flops = flops.train_flops_per_image(base_cfg)['total']
  base = time_step(make_train_step(base_cfg, batch), 0.0, repeats, with_peak=False)['seconds']
  kinds = _ABL_KINDS.value
  print(f'\nhead ablation: {size} backbone, batch {batch}; step time over the next_token step '
        f'({base:.3f} s), in parentheses the ratio of analytic FLOPs')
  print(f'{"steps":>5s} {"depth":>5s} {"width":>5s} ' + ' '.join(f'{k:>13s}' for k in kinds))
  if _ABL_SETTINGS.value:
    settings = _ABL_SETTINGS.value
  elif _QUICK.value:
    settings = _QUICK_SETTINGS
  else:
    settings = ['x'.join(s) for s in itertools.product(
        _ABL_STEPS.value, _ABL_DEPTHS.value, _ABL_WIDTHS.value)]
  for setting in settings:
    steps, depth, width = (int(v) for v in setting.split('x'))
    cells = []
    for kind in kinds:
      cfg = model_config(size, kind, steps_per_image=steps, depth=depth, width=width,
                         num_heads=max(1, width // 64))
      seconds = time_step(make_train_step(cfg, batch), 0.0, repeats, with_peak=False)['seconds']
      ratio = flops.train_flops_per_image(cfg)['total'] / base_flops
      cells.append(f'{seconds / base:6.2f} ({ratio:4.2f})')
    print(f'{steps:5d} {depth:5d} {width:5d} ' + ' '.join(f'{c:>13s}' for c in cells), flush=True)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({device.platform}); one device timed; '
        f'{_DTYPE.value} peak measured side by side')
  throughput_table()
  if _ABLATION.value:
    ablation_table()


if __name__ == '__main__':
  app.run(main)
