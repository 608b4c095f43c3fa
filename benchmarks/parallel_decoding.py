"""Parallel decoding (`sampling.parallel_tokens = k`): sample quality against speed.

  python benchmarks/parallel_decoding.py                       # the trained demo, k = 1,2,4,8
  python benchmarks/parallel_decoding.py --ks=1,4 --num_samples=100 --batch=50

For each k, from the run's checkpoint (EMA parameters when train.sample_with_ema, as sample
mode uses): `--num_samples` class-balanced samples drawn exactly as sample mode draws them
(`generation.generate`: one key per sample from the run's sample seed, so k = 1 reproduces the
run's own sample-mode metrics), scored by the run's evaluator (`GenerativeEvaluator`: for
the built-in digits the feature net under <workdir>/feature_net, against the train split),
and the throughput of one --batch call of the jitted class-labels -> decoded-images function,
the median of --repeats calls after a warm-up (compilation excluded). Head calls per image =
ceil(N / k); the backbone also runs ceil(N / k) cached calls of k tokens. The k tokens of a
chunk are drawn independently from the head's marginals at the chunk's first step (see
heptapod_jax/sampling/decode.py), so any quality lost is the price of the speed-up.
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from _util import median_time
from heptapod_jax.evaluators import generative
from heptapod_jax.sampling import generation
from heptapod_jax.sampling.image_sampler import ImageSampler
from heptapod_jax.storage import paths
from heptapod_jax.storage import runs

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'The run\'s recipe.',
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/demo', 'Trained run (checkpoints/, and '
                               'feature_net/ for the built-in data).')
_KS = flags.DEFINE_list('ks', ['1', '2', '4', '8'], 'sampling.parallel_tokens values.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 300, 'Class-balanced samples per k.')
_BATCH = flags.DEFINE_integer('batch', 100, 'Samples per call (generation and timing).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per k (median reported).')


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = paths.resolve(_WORKDIR.value, '--workdir')
  sampler = ImageSampler(config)
  n = sampler.model_config.num_positions
  evaluator = generative.GenerativeEvaluator(config, workdir)
  seed = config.sample.seed
  rows = []
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
    params, step, key = runs.restore_params(sampler, workdir, config.sample.checkpoint_step)
    print(f'{workdir} step {step} ({key}), head {config.model.head.kind}, N = {n}, '
          f'{_NUM_SAMPLES.value} samples, batch {_BATCH.value}, '
          f'devices {jax.devices()[0].device_kind} x{jax.device_count()}', flush=True)
    for k in (int(v) for v in _KS.value):
      config.sampling.parallel_tokens = k
      sampler.__dict__.pop('_generate_fn', None)  # Rebuilt (and recompiled) for this k.
      labels = generation.class_balanced_labels(_BATCH.value, sampler.model_config.num_classes)
      seconds = median_time(
          lambda: sampler.sample_images(params, labels, seed=seed, pad_to=_BATCH.value),
          repeats=_REPEATS.value)
      t0 = time.time()
      imgs, img_labels = generation.generate(sampler, params, num_samples=_NUM_SAMPLES.value,
                                             seed=seed, chunk_size=_BATCH.value, progress=False)
      gen_seconds = time.time() - t0
      metrics = evaluator.evaluate(imgs, img_labels)
      rows.append((k, -(-n // k), _BATCH.value / seconds, metrics))
      print(f'k={k}: {_BATCH.value / seconds:.1f} images/s, generation of '
            f'{_NUM_SAMPLES.value} in {gen_seconds:.1f} s; '
            f'{generative.format_metrics(metrics)}', flush=True)
  base = rows[0][2]
  print()
  print(f'{"k":>3s} {"head calls/img":>14s} {"images/s":>9s} {"speed-up":>8s} {"FID":>7s} '
        f'{"precision":>9s} {"recall":>6s} {"class acc":>9s}')
  for k, calls, rate, m in rows:
    print(f'{k:3d} {calls:14d} {rate:9.1f} {rate / base:7.2f}x {m["fid"]:7.2f} '
          f'{m.get("precision", np.nan):9.3f} {m.get("recall", np.nan):6.3f} '
          f'{m.get("class_accuracy", np.nan):9.3f}')


if __name__ == '__main__':
  app.run(main)
