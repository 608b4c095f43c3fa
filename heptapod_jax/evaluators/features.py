"""Feature extraction for the generative metrics: the `FeatureExtractor` protocol and its runner.

A feature extractor is any callable mapping uint8 images [B, H, W, 3] to a dict
of per-image float features ('pool', optionally 'spatial' and 'logits');
`extract_features` runs one over many images in chunks, and
`extract_features_resumable` does so in parts saved as it goes, so that a
killed job (reference statistics of ImageNet's train split take an hour)
resumes where it stopped and gives the same features. `check_features`
validates a float[N, D] feature array for the metrics of `fid`,
`inception_score`, `precision_recall` and `metrics`.
"""
from __future__ import annotations

import math
import os
import zipfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

import numpy as np
from absl import logging

from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths

ProgressFn = Callable[[int, 'int | None'], None]


class FeatureExtractor(Protocol):
  """What the metrics need from a feature network.

  Called on uint8 images [B, H, W, 3] in [0, 255] (any B >= 1; the network
  resizes/normalises as it was trained to), it returns per-image float
  features, numpy or jax arrays, with B rows each:

    'pool':    [B, D]   required; FID and precision/recall.
    'spatial': [B, D_s] optional; sFID. Higher-rank [B, ...] outputs are flattened.
    'logits':  [B, K]   optional; Inception Score and class accuracy.

  Extra keys are carried along by `extract_features` and ignored by the metrics.
  """

  def __call__(self, images: np.ndarray) -> Mapping[str, Any]:
    ...


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """Re-chunks an array or an iterable of arrays into batch_size batches (the last may be short)."""
  if isinstance(images, np.ndarray):
    for start in range(0, images.shape[0], batch_size):
      yield images[start:start + batch_size]
    return
  pending: list[np.ndarray] = []
  count = 0
  for batch in images:
    batch = np.asarray(batch)
    _check_image_batch(batch)
    while batch.shape[0]:
      take = min(batch_size - count, batch.shape[0])
      pending.append(batch[:take])
      count += take
      batch = batch[take:]
      if count == batch_size:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)
        pending, count = [], 0
  if count:
    yield pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)


def _check_image_batch(batch: np.ndarray) -> None:
  if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
    raise ValueError('extract_features: expected uint8 images [B, H, W, 3]; got '
                     f'{batch.dtype} {batch.shape}.')


def extract_features(extractor: FeatureExtractor,
                     images: np.ndarray | Iterable[np.ndarray],
                     batch_size: int = 256,
                     *,
                     progress: ProgressFn | None = None,
                     pad_to_batch: bool = False) -> dict[str, np.ndarray]:
  """Runs a feature extractor over many images in chunks and concatenates its outputs.

  Args:
    extractor: a `FeatureExtractor`.
    images: uint8 [N, H, W, 3], or an iterable of uint8 [b, H, W, 3] batches of
      any sizes (e.g. a generator reading from disk); re-chunked into batch_size.
    batch_size: images per extractor call.
    progress: called after each chunk as progress(images_done, total), with
      total None when `images` is an iterable.
    pad_to_batch: zero-pad a short last chunk to batch_size (its extra rows are
      dropped), so that a jitted extractor sees a single batch shape. Only for
      extractors that treat images independently (inference-mode networks).
  Returns:
    {key: float[N, ...]} for every key of the extractor's output; 'spatial' and
    any other outputs of rank > 2 are flattened to [N, -1].
  """
  if batch_size < 1:
    raise ValueError(f'extract_features: batch_size must be >= 1, got {batch_size}.')
  if isinstance(images, np.ndarray):
    total: int | None = images.shape[0]
    _check_image_batch(images)
  else:
    total = None  # len() of an iterable of batches, if any, counts batches, not images.
  outputs: dict[str, list[np.ndarray]] = {}
  done = 0
  for batch in _batches(images, batch_size):
    _check_image_batch(batch)
    n = batch.shape[0]
    if pad_to_batch and n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)])
    feats = extractor(batch)
    if not isinstance(feats, Mapping) or 'pool' not in feats:
      keys = sorted(feats) if isinstance(feats, Mapping) else type(feats).__name__
      raise ValueError(f"extract_features: the extractor must return a dict with a 'pool' entry; "
                       f'got {keys}.')
    if outputs and set(feats) != set(outputs):
      raise ValueError(f'extract_features: the extractor returned keys {sorted(feats)} after '
                       f'{sorted(outputs)} for earlier batches.')
    for key, value in feats.items():
      value = np.asarray(value)
      if value.ndim == 0 or value.shape[0] != batch.shape[0]:
        raise ValueError(f"extract_features: the extractor's '{key}' has shape {value.shape} for "
                         f'a batch of {batch.shape[0]} images.')
      outputs.setdefault(key, []).append(value[:n].reshape(n, -1))
    done += n
    if progress is not None:
      progress(done, total)
  if not outputs:
    raise ValueError('extract_features: no images.')
  return {key: np.concatenate(values, axis=0) for key, values in outputs.items()}


# Saved beside the features in each part: how they were cut. A part written with another
# batch size (whose features may differ in the last bits) or cut differently is not reused.
_PART_META = ('part_batch_size', 'part_every', 'part_total')


def _part_path(directory: str, index: int) -> str:
  return paths.join(directory, f'part-{index:06d}.npz')


def _skip(images: Iterable[np.ndarray], count: int) -> Iterator[np.ndarray]:
  """The images of an iterable of batches after its first `count` (read, not computed)."""
  for batch in images:
    batch = np.asarray(batch)
    if count >= batch.shape[0]:
      count -= batch.shape[0]
      continue
    yield batch[count:]
    count = 0


def _read_parts(directory: str, meta: dict[str, int]) -> list[dict[str, np.ndarray]]:
  """The parts saved in `directory`, in order from the first, up to the first missing one.

  A damaged part is moved aside (`<name>.bad-<time>`) and computed again with those after it;
  parts of another cut (batch size, part size, image count) are all removed (logged).
  """
  parts = []
  while True:
    path = _part_path(directory, len(parts))
    if not paths.exists(path):
      return parts
    try:
      with paths.open(path, 'rb') as f:
        with zipfile.ZipFile(f) as archive:
          keys = tuple(os.path.splitext(n)[0] for n in archive.namelist())
        part = artifacts.read_npz(f, keys, path)
    except FileNotFoundError:  # Process 0 removed the parts as this process read them.
      return parts
    except (zipfile.BadZipFile, OSError, artifacts.DamagedFileError) as e:
      moved = artifacts.move_aside(path)
      logging.warning('%s is damaged (%s): moved to %s; its features are computed again.',
                      path, e, moved)
      return parts
    found = {key: int(part.pop(key)) if key in part else None for key in _PART_META}
    if found != meta:
      saved = len(paths.glob(paths.join(directory, 'part-??????.npz')))
      logging.warning('%s was cut with %s, this run with %s: its %d saved parts are not reused.',
                      directory, found, meta, saved)
      paths.rmtree(directory)
      return []
    parts.append(part)


def extract_features_resumable(extractor: FeatureExtractor,
                               images: np.ndarray | Iterable[np.ndarray],
                               batch_size: int,
                               directory: str,
                               *,
                               every: int | None = None,
                               total: int | None = None,
                               write: bool = True,
                               progress: ProgressFn | None = None,
                               pad_to_batch: bool = False) -> dict[str, np.ndarray]:
  """`extract_features` in parts of `every` images, each saved to `directory` when computed.

  A rerun after a kill reads the saved parts, skips their images and computes the rest:
  the result equals an uninterrupted run's, bit for bit (the same batches, cut the same way).
  The caller removes `directory` once it has saved what it made of the features.

  Args:
    extractor, images, batch_size, progress, pad_to_batch: as `extract_features`.
    directory: where the parts go (`part-000000.npz`, ...); created when needed.
    every: images per part, rounded up to a multiple of batch_size; by default about a
      twentieth of the images (64 batches when their number is not known).
    total: the number of images of an iterable `images`, when known (for `every`'s default).
    write: save the parts (False on every process but the first of a multi-host job: they
      read the parts the first one saved, when the directory is shared, and save nothing).
  Returns:
    As `extract_features`.
  """
  if batch_size < 1:
    raise ValueError(f'extract_features: batch_size must be >= 1, got {batch_size}.')
  if isinstance(images, np.ndarray):
    total = images.shape[0]
  if every is None:
    every = math.ceil(total / 20) if total else 64 * batch_size
  every = max(1, math.ceil(every / batch_size)) * batch_size
  meta = {'part_batch_size': batch_size, 'part_every': every,
          'part_total': -1 if total is None else total}
  parts = _read_parts(directory, meta)
  done = sum(next(iter(p.values())).shape[0] for p in parts)
  if parts:
    logging.info('%s: %d parts (%d images) saved by an earlier run, not computed again.',
                 directory, len(parts), done)
  rest = images[done:] if isinstance(images, np.ndarray) else _skip(images, done)
  for segment in _batches(rest, every):
    offset = done
    part = extract_features(
        extractor, segment, batch_size, pad_to_batch=pad_to_batch,
        progress=None if progress is None else lambda n, _: progress(offset + n, total))
    if write:
      artifacts.save_npz(_part_path(directory, len(parts)), **part,
                         **{key: np.asarray(value) for key, value in meta.items()})
    parts.append(part)
    done += segment.shape[0]
  if not parts:
    raise ValueError('extract_features: no images.')
  return {key: np.concatenate([p[key] for p in parts], axis=0) for key in parts[0]}


def check_features(features: Any, name: str, min_rows: int = 1) -> np.ndarray:
  """Returns `features` as an array after checking it is real, finite [N >= min_rows, D]."""
  x = np.asarray(features)
  if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
    raise ValueError(f'{name}: expected features [N, D] with N >= {min_rows}; got shape {x.shape}.')
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f'{name}: expected real features, got dtype {x.dtype}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: features contain NaN or inf.')
  return x


__all__ = ['FeatureExtractor', 'check_features', 'extract_features', 'extract_features_resumable']
