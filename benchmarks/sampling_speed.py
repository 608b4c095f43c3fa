"""Sampling speed per head kind and batch size, against the machine's limits measured in the
same run.

  python benchmarks/sampling_speed.py                  # tiny preset, ImageNet shapes, + no-cache
  python benchmarks/sampling_speed.py --size=B         # B: three heads, batch 1 and 8 (minutes)
  python benchmarks/sampling_speed.py --size=B --heads=global --batches=8 --parallel_tokens=1,4

Times the jitted raster sampler (`decode.sample`: prefill, then per position the head's
prediction and one token through the KV cache; incremental decoding, models/heads.py) from
class labels to token grids, median of --repeats calls after a compiled warm-up, one key per
sample as sample mode uses, temperature 1, no guidance, on whatever device JAX sees first.
The tokenizer's decode is not included (tokenizer_throughput.py). Columns:

  img/s          images per second
  ms/step        one decoding step (one position of every image in the batch): call time / N
  MB/step, GB/s  the bytes an exact step must read at the least (flops.sampling_bytes_per_step:
                 the weights, the KV cache so far, the head's state) and that over the step's
                 time; %bw against the read bandwidth measured in this run
                 (flops.measure_memory_bandwidth): the memory-bound floor of small batches
  GFLOP/step     analytic FLOPs of a step (flops.sampling_flops_per_image / N), TFLOP/s over
                 its time, %peak against the matmul peak measured in this run at large size
                 (flops.measure_peak_matmul_flops): the compute-bound floor
  no cache       --no_cache (on by default for the tiny preset only: at B it takes many
                 minutes): the same samples with the backbone rerun over the prefix instead of
                 the KV cache (`use_kv_cache=False`), and the cache's gain over it
Rows with parallel_tokens k > 1 (beyond the paper; quality: benchmarks/parallel_decoding.py)
read the weights once per k positions, so their byte columns are left out.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import app, flags

from _util import build_model, decode_roofline, time_sampler
from heptapod_jax import flops
from heptapod_jax.sampling import decode

_SIZE = flags.DEFINE_string('size', 'tiny', 'Size preset (heptapod_jax/presets.py).')
_SHAPES = flags.DEFINE_list('shapes', ['16x16384'],
                            'GRIDxVOCAB settings: 8x64 = the demo (8x8 grid, 64 codes), '
                            '16x16384 = ImageNet 256 with VQ-16.')
_HEADS = flags.DEFINE_list('heads', ['next_token', 'local', 'global'], 'Head kinds.')
_WINDOW = flags.DEFINE_integer('window', 32, 'Window of the local head (configs/imagenet256.py).')
_BATCHES = flags.DEFINE_list('batches', ['1', '8'], 'Samples per call.')
_PARALLEL = flags.DEFINE_list('parallel_tokens', ['1'], 'Positions per head call for the 2D '
                              'heads (1 = the exact sampler).')
_NO_CACHE = flags.DEFINE_enum('no_cache', 'auto', ['auto', 'true', 'false'],
                              'Also time the sampler without the KV cache (auto: tiny only).')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed calls per row (median reported).')


def main(argv):
  del argv
  device = jax.devices()[0]
  peak = flops.measure_peak_matmul_flops(jnp.float32)
  bandwidth = flops.measure_memory_bandwidth()
  with_no_cache = _NO_CACHE.value == 'true' or (_NO_CACHE.value == 'auto' and _SIZE.value == 'tiny')
  print(f'preset={_SIZE.value} device={device.device_kind} ({device.platform}) x1, float32; '
        f'measured: matmul peak {peak / 1e12:.3f} TFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s')
  header = (f'{"grid x vocab":>14s} {"head":>10s} {"k":>2s} {"batch":>5s} {"img/s":>8s} '
            f'{"ms/step":>8s} {"MB/step":>8s} {"GB/s":>6s} {"%bw":>4s} {"GFLOP/step":>10s} '
            f'{"TFLOP/s":>7s} {"%peak":>5s}')
  print(header + (f' {"no cache img/s":>14s} {"cache gain":>10s}' if with_no_cache else ''))
  for shape in _SHAPES.value:
    grid, vocab = (int(v) for v in shape.lower().split('x'))
    for kind in _HEADS.value:
      model, params = build_model(_SIZE.value, grid=grid, vocab=vocab, kind=kind,
                                  window=min(_WINDOW.value, grid * grid),
                                  num_classes=1000 if vocab > 1000 else 10)
      ks = [1] if kind == 'next_token' else [int(k) for k in _PARALLEL.value]
      for k in ks:
        for batch in (int(b) for b in _BATCHES.value):
          config = decode.SamplingConfig(parallel_tokens=k)
          seconds = time_sampler(model, params, batch, config, _REPEATS.value)['seconds']
          r = decode_roofline(model.config, batch, seconds, peak, bandwidth, parallel_tokens=k)
          line = (f'{grid}x{grid} x {vocab:<5d} {kind:>10s} {k:2d} {batch:5d} '
                  f'{batch / seconds:8.2f} {r["ms_step"]:8.1f} ')
          line += (f'{r["mb_step"]:8.1f} {r["gbps"]:6.1f} {r["of_bandwidth"]:4.0%} ' if k == 1
                   else f'{"-":>8s} {"-":>6s} {"-":>4s} ')
          line += f'{r["gflop_step"]:10.3f} {r["tflops"]:7.3f} {r["of_peak"]:5.0%}'
          if with_no_cache:
            slow = time_sampler(model, params, batch, dataclasses.replace(config, use_kv_cache=False),
                                _REPEATS.value)['seconds']
            line += f' {batch / slow:14.2f} {slow / seconds:9.2f}x'
          print(line, flush=True)


if __name__ == '__main__':
  app.run(main)
