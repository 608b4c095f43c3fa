"""Sample mode: N class-balanced samples from a trained run, sharded, resumable, ADM's .npz.

  python -m heptapod_jax.main --mode=sample --config=configs/imagenet256.py:size=H --workdir=RUN \
      --config.evaluator.features=inception --config.evaluator.inception_weights=inception_fid.npz \
      --config.evaluator.reference=VIRTUAL_imagenet256_labeled.npz

  from heptapod_jax.sampling import sample_mode
  summary = sample_mode.sample_and_evaluate(config, workdir)  # also from Colab

Protocol (ADM): `config.sample.num_per_class` samples per class (50 -> 50,000
for ImageNet), labels cycling through the classes (sample i has class
i mod C, so every prefix of the file is as balanced as it can be), no
guidance unless `config.sampling.cfg_scale` says so. Sample i is drawn with a
key folded from (`config.sample.seed`, i): the samples do not depend on the
chunk size, the number of devices or hosts, or on interruptions.

Every chunk of `config.sample.chunk_size` samples is one jitted call over the
whole mesh (all devices of all hosts) and one file, `<out_dir>/chunks/`,
written atomically by process 0. Rerunning the same command skips the
chunks already on disk, so an interrupted run resumes; `<out_dir>/manifest.json`
records the settings and refuses to mix chunks made with other ones. At the
end: `<out_dir>/samples_<N>x<S>x<S>x3.npz` with `arr_0` (uint8 images) and
`arr_1` (int64 labels), the layout ADM's evaluator reads; optional PNGs; and
the metrics of `config.evaluator` in `<out_dir>/metrics.json`.

Sample mode is a thin layer over `runs.restore_params`, `generation.generate` and the
evaluators; the command line for a few images to look at is heptapod_jax/sample.py.
"""
from __future__ import annotations

import json
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from heptapod_jax import images as images_lib
from heptapod_jax.sampling import generation
from heptapod_jax.sampling.image_sampler import ImageSampler
from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths
from heptapod_jax.storage import runs


def write_pngs(images: np.ndarray, labels: np.ndarray, directory: str, count: int) -> int:
  n = len(images) if count < 0 else min(count, len(images))
  for i in range(n):
    images_lib.save_png(images[i], paths.join(directory, f'{i:06d}_class{int(labels[i])}.png'))
  return n


def sample_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Sample mode: generate config.sample's samples from the workdir's checkpoint, write the
  .npz (and PNGs), run config.evaluator on them. Returns a summary dict."""
  from heptapod_jax.evaluators import generative

  workdir = paths.resolve(workdir, 'workdir')
  sampler = ImageSampler(config)
  s = config.sample
  num_classes = sampler.model_config.num_classes
  num_samples = generation.num_samples_of(config, num_classes)
  chunk = s.chunk_size or config.train.global_batch_size
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
    params, step, key = runs.restore_params(sampler, workdir, s.checkpoint_step)
    out_dir = (paths.resolve(s.out_dir, 'config.sample.out_dir') if s.out_dir
               else paths.join(workdir, f'samples_{step:07d}_seed{s.seed}'))
    manifest = {'checkpoint_step': step, 'params_key': key,
                'sampling': config.sampling.to_dict(), 'model': config.model.to_dict(),
                'tokenizer': config.tokenizer.to_dict(), 'image_size': config.data.image_size,
                'num_classes': num_classes, 'workdir': workdir}
    manifest = json.loads(json.dumps(manifest, default=list))  # Tuples -> lists, as on disk.
    t0 = time.time()
    imgs, labels = generation.generate(sampler, params, num_samples=num_samples, seed=s.seed,
                                       chunk_size=chunk, out_dir=out_dir, manifest=manifest)
    seconds = time.time() - t0
  size = config.data.image_size
  npz = paths.join(out_dir, f'samples_{num_samples}x{size}x{size}x3.npz')
  summary: dict[str, Any] = {'workdir': workdir, 'step': step, 'out_dir': out_dir, 'npz': npz,
                             'num_samples': num_samples, 'seconds': seconds}
  if jax.process_index() == 0:
    artifacts.save_npz(npz, arr_0=imgs, arr_1=labels.astype(np.int64))
    if s.num_png:
      summary['png'] = write_pngs(imgs, labels, paths.join(out_dir, 'png'), s.num_png)
    cols = min(num_classes, 10)
    grid_idx = np.concatenate([np.arange(r * num_classes, r * num_classes + cols)
                               for r in range(min(4, num_samples // num_classes))] or [np.arange(0)])
    if len(grid_idx):
      summary['grid'] = images_lib.save_png(images_lib.make_grid(imgs[grid_idx], ncols=cols),
                                            paths.join(out_dir, 'grid.png'))
  if s.evaluate and config.evaluator.features:
    evaluator = generative.GenerativeEvaluator(config, workdir)
    metrics = evaluator.evaluate(imgs, labels)
    summary['metrics'] = metrics
    if config.evaluator.real_baseline:
      summary['generative_real'] = evaluator.real_baseline(sampler.tokenizer,
                                                           sampler.tokenizer_params)
    summary['evaluator'] = dict(evaluator.info)
    if jax.process_index() == 0:
      paths.write_json(paths.join(out_dir, 'metrics.json'),
                       {'metrics': metrics, 'real_baseline': summary.get('generative_real'),
                        'evaluator': evaluator.info, 'npz': npz, 'step': step}, indent=2)
  return summary
