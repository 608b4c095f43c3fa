"""Sample mode: N class-balanced samples from a trained run, sharded, resumable, ADM's .npz.

  python -m heptapod_jax.main --mode=sample --config=configs/imagenet256.py:size=H --workdir=RUN \
      --config.evaluator.features=inception --config.evaluator.inception_weights=inception_fid.npz \
      --config.evaluator.reference=VIRTUAL_imagenet256_labeled.npz

  from heptapod_jax import sample
  summary = sample.sample_and_evaluate(config, workdir)       # also from Colab

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
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from heptapod_jax import checkpoint as ckpt_lib
from heptapod_jax import images as images_lib
from heptapod_jax import trainlib

MANIFEST = 'manifest.json'
# Settings that change the pixels: a resumed run must agree on all of them.
_MANIFEST_FIELDS = ('num_samples', 'chunk_size', 'seed', 'checkpoint_step', 'params_key',
                    'sampling', 'model', 'tokenizer', 'image_size', 'num_classes')


def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """int32[N]: sample i asks for class i mod C (balanced when C divides N)."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def num_samples_of(config: ml_collections.ConfigDict, num_classes: int) -> int:
  s = config.sample
  return s.num_samples or s.num_per_class * num_classes


class Progress:
  """One line of progress: done/total, images per second, ETA; redrawn in place on a terminal."""

  def __init__(self, total: int, done: int = 0, label: str = 'sampling', stream=None):
    self.total, self.start_done, self.done, self.label = total, done, done, label
    self.stream = stream or sys.stderr
    self.t0 = time.time()
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()

  def update(self, done: int) -> str:
    self.done = done
    elapsed = max(time.time() - self.t0, 1e-9)
    rate = (done - self.start_done) / elapsed
    eta = (self.total - done) / rate if rate > 0 else float('nan')
    width = 30
    filled = int(width * done / max(self.total, 1))
    eta_s = time.strftime('%H:%M:%S', time.gmtime(eta)) if np.isfinite(eta) else '--:--:--'
    line = (f'{self.label} [{"#" * filled}{"." * (width - filled)}] {done}/{self.total} '
            f'{rate:.2f} img/s ETA {eta_s}')
    if jax.process_index() == 0:
      if self.tty:
        self.stream.write('\r' + line + ('\n' if done >= self.total else ''))
        self.stream.flush()
      else:
        logging.info('%s', line)
    return line


def _chunk_path(out_dir: str, start: int, end: int) -> str:
  return os.path.join(out_dir, 'chunks', f'chunk_{start:08d}_{end:08d}.npz')


def _load_chunk(path: str, count: int, image_size: int) -> tuple[np.ndarray, np.ndarray] | None:
  """A finished chunk, or None when missing or damaged (then it is made again)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      imgs, labels = f['images'], f['labels']
  except Exception as e:  # noqa: BLE001  A torn or foreign file: redo that chunk.
    logging.warning('Chunk %s is unreadable (%s); generating it again.', path, e)
    return None
  if imgs.shape != (count, image_size, image_size, 3) or imgs.dtype != np.uint8:
    logging.warning('Chunk %s holds %s %s, expected %s uint8; generating it again.', path,
                    imgs.shape, imgs.dtype, (count, image_size, image_size, 3))
    return None
  return imgs, labels


def _save_atomic(path: str, **arrays: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _check_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
  path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for key in _MANIFEST_FIELDS:
      if old.get(key) != manifest.get(key):
        raise ValueError(
            f'{out_dir} holds samples made with {key}={old.get(key)!r}, this run has '
            f'{key}={manifest.get(key)!r}; use another config.sample.out_dir (or delete that one) '
            'instead of mixing them.')
  elif jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def generate(trainer: Any, params: Any, *, num_samples: int, seed: int, chunk_size: int,
             out_dir: str | None = None, manifest: dict[str, Any] | None = None,
             progress: bool = True, stop_after_chunks: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Class-balanced samples: (uint8[N, S, S, 3], int32[N]).

  Args:
    trainer: a `train.Trainer` (model, tokenizer, mesh); call inside its mesh context.
    params: model parameters, sharded like the trainer's state.
    num_samples, seed, chunk_size: see the module docstring.
    out_dir: when given, each chunk is written there and reused on a rerun.
    manifest: settings recorded in out_dir (checked against an existing one).
    stop_after_chunks: generate at most this many new chunks, then return what
      exists so far (for tests of interruption); None = all.
  """
  num_classes = trainer.model_config.num_classes
  size = trainer.config.data.image_size
  labels = class_balanced_labels(num_samples, num_classes)
  bounds = [(s, min(s + chunk_size, num_samples)) for s in range(0, num_samples, chunk_size)]
  if out_dir is not None:
    _check_manifest(out_dir, dict(manifest or {}, num_samples=num_samples, chunk_size=chunk_size,
                                  seed=seed))
  chunks: list[np.ndarray | None] = [None] * len(bounds)
  if out_dir is not None:
    for i, (s, e) in enumerate(bounds):
      found = _load_chunk(_chunk_path(out_dir, s, e), e - s, size)
      if found is not None:
        chunks[i] = found[0]
    if jax.process_count() > 1:  # Every host must agree on what is left to do.
      from jax.experimental import multihost_utils
      have = multihost_utils.broadcast_one_to_all(np.array([c is not None for c in chunks]))
      chunks = [c if h else None for c, h in zip(chunks, have)]
      for i, (s, e) in enumerate(bounds):
        if chunks[i] is None and have[i]:
          raise RuntimeError(f'{_chunk_path(out_dir, s, e)} exists on process 0 only: sample '
                             'mode needs out_dir on a file system every host sees.')
  done = sum(e - s for (s, e), c in zip(bounds, chunks) if c is not None)
  bar = Progress(num_samples, done) if progress else None
  new = 0
  for i, (s, e) in enumerate(bounds):
    if chunks[i] is not None:
      continue
    if stop_after_chunks is not None and new >= stop_after_chunks:
      break
    imgs = trainer.sample_images(params, labels[s:e], seed=seed, start_index=s, pad_to=chunk_size)
    chunks[i] = imgs
    new += 1
    if out_dir is not None and jax.process_index() == 0:
      _save_atomic(_chunk_path(out_dir, s, e), images=imgs, labels=labels[s:e])
    done += e - s
    if bar:
      bar.update(done)
  have = [c for c in chunks if c is not None]
  count = sum(len(c) for c in have)
  if count < num_samples:  # Stopped early (stop_after_chunks): only a prefix is complete.
    prefix = []
    for c in chunks:
      if c is None:
        break
      prefix.append(c)
    imgs = np.concatenate(prefix) if prefix else np.zeros((0, size, size, 3), np.uint8)
    return imgs, labels[:len(imgs)]
  return np.concatenate(have), labels


def restore_params(trainer: Any, workdir: str, step: int = -1) -> tuple[Any, int, str]:
  """(params, step, key) from the workdir's checkpoint: the EMA tree if train.sample_with_ema."""
  directory = os.path.join(workdir, 'checkpoints')
  key = 'ema_params' if trainer.config.train.sample_with_ema else 'params'
  shardings = trainer.state_shardings()
  abstract = getattr(trainer.abstract_state(shardings), key)
  steps = ckpt_lib.checkpoint_steps(directory)
  if not steps:
    raise FileNotFoundError(f'sample mode: no checkpoint in {directory} (train first, or point '
                            '--workdir at a trained run).')
  if step < 0:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'config.sample.checkpoint_step={step}: {directory} has steps {steps}.')
  params = ckpt_lib.load_params(directory, abstract, step=step, key=key)
  return params, step, key


def write_pngs(images: np.ndarray, labels: np.ndarray, directory: str, count: int) -> int:
  n = len(images) if count < 0 else min(count, len(images))
  for i in range(n):
    images_lib.save_png(images[i], os.path.join(directory, f'{i:06d}_class{int(labels[i])}.png'))
  return n


def sample_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Sample mode: generate config.sample's samples from the workdir's checkpoint, write the
  .npz (and PNGs), run config.evaluator on them. Returns a summary dict."""
  from heptapod_jax import train
  from heptapod_jax.evaluators import generative

  workdir = trainlib.resolve_workdir(workdir)
  trainer = train.Trainer(config, workdir)
  s = config.sample
  num_classes = trainer.model_config.num_classes
  num_samples = num_samples_of(config, num_classes)
  chunk = s.chunk_size or config.train.global_batch_size
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    params, step, key = restore_params(trainer, workdir, s.checkpoint_step)
    out_dir = s.out_dir or os.path.join(workdir, f'samples_{step:07d}_seed{s.seed}')
    manifest = {'checkpoint_step': step, 'params_key': key,
                'sampling': config.sampling.to_dict(), 'model': config.model.to_dict(),
                'tokenizer': config.tokenizer.to_dict(), 'image_size': config.data.image_size,
                'num_classes': num_classes, 'workdir': workdir}
    manifest = json.loads(json.dumps(manifest, default=list))  # Tuples -> lists, as on disk.
    t0 = time.time()
    imgs, labels = generate(trainer, params, num_samples=num_samples, seed=s.seed, chunk_size=chunk,
                            out_dir=out_dir, manifest=manifest)
    seconds = time.time() - t0
  size = config.data.image_size
  npz = os.path.join(out_dir, f'samples_{num_samples}x{size}x{size}x3.npz')
  summary: dict[str, Any] = {'workdir': workdir, 'step': step, 'out_dir': out_dir, 'npz': npz,
                             'num_samples': num_samples, 'seconds': seconds}
  if jax.process_index() == 0:
    _save_atomic(npz, arr_0=imgs, arr_1=labels.astype(np.int64))
    if s.num_png:
      summary['png'] = write_pngs(imgs, labels, os.path.join(out_dir, 'png'), s.num_png)
    cols = min(num_classes, 10)
    grid_idx = np.concatenate([np.arange(r * num_classes, r * num_classes + cols)
                               for r in range(min(4, num_samples // num_classes))] or [np.arange(0)])
    if len(grid_idx):
      summary['grid'] = images_lib.save_png(images_lib.make_grid(imgs[grid_idx], ncols=cols),
                                            os.path.join(out_dir, 'grid.png'))
  if s.evaluate and config.evaluator.features:
    evaluator = generative.GenerativeEvaluator(config, workdir)
    metrics = evaluator.evaluate(imgs, labels)
    summary['metrics'] = metrics
    if config.evaluator.real_baseline:
      summary['generative_real'] = evaluator.real_baseline(trainer.tokenizer,
                                                           trainer.tokenizer_params)
    summary['evaluator'] = dict(evaluator.info)
    if jax.process_index() == 0:
      with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump({'metrics': metrics, 'real_baseline': summary.get('generative_real'),
                   'evaluator': evaluator.info, 'npz': npz, 'step': step}, f, indent=2)
  return summary
