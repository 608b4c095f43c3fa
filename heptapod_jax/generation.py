"""Class-conditional image generation over a sampler: class-balanced and resumable in chunks
(what sample mode, `sample.py`, and the trainer's periodic evaluation, `train.py`, both run),
or for chosen classes (the sampling command line and the notebooks).

  images, labels = generation.generate(sampler, params, num_samples=..., seed=..., chunk_size=...,
                                       out_dir=...)
  images, labels = generation.sample_classes(run, classes=[3, 7], num=16, seed=0)

`sampler` is an `image_sampler.ImageSampler` (or the trainer, which is one): anything with
`model_config`, `config.data.image_size` and `sample_images(params, labels, seed=,
start_index=, pad_to=)`. Sample i has class i mod C and its own key from (seed, i), so chunks of
`chunk_size` are independent: each is one call and, with `out_dir`, one file
`<out_dir>/chunks/chunk_<start>_<end>.npz` written atomically by process 0. A rerun skips the
chunks on disk (damaged ones are made again) and `<out_dir>/manifest.json` refuses to mix
chunks made with other settings.
"""
from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from heptapod_jax import console

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


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  """np.savez to `path` through a temporary file and a rename: never a torn file."""
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


def generate(sampler: Any, params: Any, *, num_samples: int, seed: int, chunk_size: int,
             out_dir: str | None = None, manifest: dict[str, Any] | None = None,
             progress: bool = True, stop_after_chunks: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Class-balanced samples: (uint8[N, S, S, 3], int32[N]).

  Args:
    sampler: an `ImageSampler` (model, tokenizer, mesh); call inside its mesh context.
    params: model parameters, sharded as `sampler.abstract_params()`.
    num_samples, seed, chunk_size: see the module docstring.
    out_dir: when given, each chunk is written there and reused on a rerun.
    manifest: settings recorded in out_dir (checked against an existing one).
    stop_after_chunks: generate at most this many new chunks, then return what
      exists so far (for tests of interruption); None = all.
  """
  num_classes = sampler.model_config.num_classes
  size = sampler.config.data.image_size
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
  bar = console.progress(num_samples, desc='sampling', initial=done, unit='img') if progress else None
  new = 0
  for i, (s, e) in enumerate(bounds):
    if chunks[i] is not None:
      continue
    if stop_after_chunks is not None and new >= stop_after_chunks:
      break
    imgs = sampler.sample_images(params, labels[s:e], seed=seed, start_index=s, pad_to=chunk_size)
    chunks[i] = imgs
    new += 1
    if out_dir is not None and jax.process_index() == 0:
      save_npz_atomic(_chunk_path(out_dir, s, e), images=imgs, labels=labels[s:e])
    done += e - s
    if bar:
      bar.update(done)
  if bar:
    bar.close()
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


def check_classes(classes: Any, num_classes: int) -> list[int]:
  """The class ids as ints, each in [0, num_classes); ValueError naming the bad ones."""
  classes = [int(c) for c in classes]
  if not classes:
    raise ValueError('--classes is empty; give class ids, e.g. --classes=3,7.')
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f'--classes: {bad} out of range; this model has num_classes={num_classes} '
                     f'(ids 0..{num_classes - 1}).')
  return classes


def default_classes(num_classes: int) -> list[int]:
  """All classes up to 10 of them, else 10 spread evenly over the ids (as training's grids)."""
  cols = min(num_classes, 10)
  return np.linspace(0, num_classes - 1, cols).round().astype(int).tolist()


def sample_classes(run: Any, classes: Any, num: int, *, seed: int = 0,
                   batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(uint8[num, S, S, 3], int32[num]): image i has class classes[i mod C] and key (seed, i).

  `run` is a `runs.LoadedRun` (its `sampler`, `params` and `num_classes`).

  The images depend only on (seed, i, class), not on `batch` or the device count.
  """
  sampler = run.sampler
  classes = check_classes(classes, run.num_classes)
  if num < 1 or batch < 1:
    raise ValueError(f'--n={num} and --batch={batch} must be >= 1.')
  labels = np.asarray([classes[i % len(classes)] for i in range(num)], np.int32)
  batch = min(batch, num)
  out = []
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
    for start in range(0, num, batch):
      out.append(sampler.sample_images(run.params, labels[start:start + batch], seed=seed,
                                       start_index=start, pad_to=batch))
  return np.concatenate(out), labels
