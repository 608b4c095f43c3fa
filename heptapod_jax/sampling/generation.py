"""Class-conditional image generation over a sampler: class-balanced and resumable in chunks
(what sample mode, `sampling/sample_mode.py`, and the trainer's periodic evaluation,
`training/train.py`, both run), or for chosen classes (the sampling command line and the
notebooks).

  images, labels = generation.generate(sampler, params, num_samples=..., seed=..., chunk_size=...,
                                       out_dir=...)
  images, labels = generation.sample_classes(run, classes=[3, 7], num=16, seed=0)

`sampler` is an `image_sampler.ImageSampler` (or the trainer, which is one): anything with
`model_config`, `config.data.image_size` and `sample_images(params, labels, seed=,
start_index=, pad_to=)`. Sample i has class i mod C and its own key from (seed, i), so chunks of
`chunk_size` are independent: each is one call and, with `out_dir`, one file
`<out_dir>/chunks/chunk_<start>_<end>.npz` written whole by process 0 (a local file renamed into
place, or one object uploaded to a bucket: `storage.paths`). A rerun skips the
chunks on disk and `<out_dir>/manifest.json` refuses to mix chunks made with other settings. A
chunk that does not read back whole (truncated, a zip checksum mismatch) or holds other than
the uint8 images of its range's class-balanced labels is never used: it is moved aside to
`<name>.bad-<UTC time>`, with a warning naming it and what is wrong, and made again.
"""
from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from heptapod_jax import console
from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths

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
  return paths.join(out_dir, 'chunks', f'chunk_{start:08d}_{end:08d}.npz')


def _load_chunk(path: str, start: int, labels: np.ndarray, image_size: int) -> np.ndarray | None:
  """The images of a finished chunk of samples [start, start + len(labels)), or None when it
  is missing or damaged (then it is made again).

  A chunk that does not read back whole (truncated, a checksum mismatch: `artifacts.read_npz`)
  or holds other than uint8[n, S, S, 3] images of exactly the class-balanced `labels` of its
  range is never used: the warning names it and what is wrong, and process 0 moves it aside
  to `<name>.bad-<UTC time>` (kept for inspection) so that the new chunk does not overwrite it.
  """
  if not paths.exists(path):
    return None
  try:
    found = artifacts.read_npz(path, ('images', 'labels'), path)
  except FileNotFoundError:  # Moved aside by process 0 since: damaged.
    return None
  except artifacts.DamagedFileError as e:
    return _set_chunk_aside(path, str(e))
  imgs, got = found['images'], found['labels']
  want = (len(labels), image_size, image_size, 3)
  if imgs.shape != want or imgs.dtype != np.uint8:
    return _set_chunk_aside(path, f'{path} holds images {imgs.dtype}{list(imgs.shape)}, '
                                  f'expected uint8{list(want)}')
  if got.shape != labels.shape or got.dtype.kind not in 'iu' or (got != labels).any():
    where = ''
    if got.shape == labels.shape and got.dtype.kind in 'iu':
      i = int(np.flatnonzero(got != labels)[0])
      where = f': sample {start + i} has class {got[i]} instead of {labels[i]}'
    return _set_chunk_aside(
        path, f'{path} holds labels {got.dtype}{list(got.shape)} that are not the class-balanced '
              f'labels int32[{len(labels)}] of samples [{start}, {start + len(labels)}){where}')
  return imgs


def _set_chunk_aside(path: str, problem: str) -> None:
  """Logs why a chunk is not used and (process 0) renames it to `<path>.bad-<UTC time>`."""
  if jax.process_index() != 0:  # One file system for all hosts: process 0 moves it.
    logging.warning('%s; generating the chunk again.', problem)
    return None
  try:
    aside = artifacts.move_aside(path)
  except OSError as e:
    raise OSError(f'{problem}; could not move it aside ({e}), and generating it again would '
                  'overwrite it: move it away by hand and rerun') from e
  logging.warning('%s; moved it aside to %s (kept for inspection, delete it when no longer '
                  'needed), generating the chunk again.', problem, aside)
  return None


def _read_manifest(path: str) -> dict[str, Any]:
  """An existing manifest; DamagedFileError naming it when it is not a JSON object."""
  advice = ('the samples beside it cannot be checked against this run: use another '
            'config.sample.out_dir, or delete it when sure that they are of this run')
  text = paths.read_text(path)
  try:
    old = json.loads(text)
  except ValueError as e:
    raise artifacts.DamagedFileError(f'{path} is not valid JSON ({e}); {advice}') from e
  if not isinstance(old, dict):
    raise artifacts.DamagedFileError(f'{path} holds a JSON {type(old).__name__}, not an object; '
                                     f'{advice}')
  return old


def _check_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
  """Writes `<out_dir>/manifest.json`, or checks this run's settings against an existing one.

  Raises:
    ValueError naming the manifest, the first differing field (dotted, e.g. `model.num_layers`)
    and both values; artifacts.DamagedFileError when the manifest is not a JSON object.
  """
  path = paths.join(out_dir, MANIFEST)
  if paths.exists(path):
    old = _read_manifest(path)
    for key in _MANIFEST_FIELDS:
      field = artifacts.first_difference(old.get(key), manifest.get(key), key)
      if field:
        raise ValueError(
            f'{path}: the samples in {out_dir} were made with '
            f'{field}={artifacts.lookup(old, field)!r}, this run has '
            f'{field}={artifacts.lookup(manifest, field)!r}; use another config.sample.out_dir '
            '(or delete that one) instead of mixing them.')
  elif jax.process_index() == 0:
    paths.write_json(path, manifest, indent=2, sort_keys=True)


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
      chunks[i] = _load_chunk(_chunk_path(out_dir, s, e), s, labels[s:e], size)
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
      artifacts.save_npz(_chunk_path(out_dir, s, e), images=imgs, labels=labels[s:e])
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
