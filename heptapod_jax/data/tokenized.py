"""Pre-tokenized training data (LlamaGen-style): the reader.

The file format of a directory of codes (or KL latent moments) and its checks:
heptapod_jax/data/codes_format.py; `python -m heptapod_jax.tools.tokenize_dataset`
writes it.

Size: the reader holds its process's slice in memory: moments take
2 * C * 4 bytes (float32) per position per view, e.g. KL-16 at 256px with
--variants=flip: 1.28M * 2 * 256 * 32 * 4 bytes = 84 GB for ImageNet (42 GB in
bfloat16), divided over the processes; ten_crop is five times that.

The reader (`create_train_iterator`) replays the image pipeline's record order
(`record_order.RecordOrder`) and view choice (`record_order.variant_fn`),
so for the same data config, seed and batch size it yields the codes (moments) of
exactly the images the image pipeline would yield, with the same `get_state()`.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from absl import logging
import numpy as np
import tensorflow as tf

from heptapod_jax.data import record_order
from heptapod_jax.data.codes_format import (METADATA_FILE, check_data_config, check_header,
                                            header_fields, load_shard, read_metadata, shard_path)
from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths


class TokenizedTrainIterator:
  """Endless iterator over this process's pre-tokenized training batches.

  `next(it)` returns numpy arrays for this process:
    payload 'codes':    {'tokens': int32[b, h, w], 'label': int32[b]}
    payload 'moments':  {'latent_mean': float32[b, h, w, C], 'latent_std': float32[b, h, w, C],
                         'label': int32[b]}  (unscaled, as stored)
  with b = global_batch_size // process_count: the codes (moments) of the views
  the image pipeline (`input_pipeline.TrainIterator`) would return for the same
  config, seed and state. `get_state()` is the same dict as the image pipeline's.
  """

  def __init__(self, index_batches: tf.data.Dataset, *, codes: np.ndarray, labels: np.ndarray,
               row_of: np.ndarray, slice_start: int, position: int, num_skipped: int,
               local_batch_size: int, metadata: dict[str, Any]):
    self._index_iter = index_batches.as_numpy_iterator()
    # codes: [kept examples of the slice, V, h, w] (moments: [..., 2, C]);
    # row_of[source - slice_start] = row or -1.
    self._codes, self._labels, self._row_of = codes, labels, row_of
    self._slice_start = slice_start
    self._position = position
    self._num_emitted = position - num_skipped
    # Records read from the index stream but not yet returned (kept ones only).
    self._pending = {k: np.zeros((0,), np.int64) for k in ('record', 'row', 'variant')}
    self.local_batch_size = local_batch_size
    self.metadata = metadata
    self.num_classes = int(metadata['num_classes'])
    self.image_size = int(metadata['image_size'])
    self.grid_size = tuple(metadata['grid_size'])
    self.payload = metadata['payload']
    # vocab_size: payload 'codes' only; latent_channels: payload 'moments' only (else None).
    self.vocab_size = int(metadata['vocab_size']) if 'vocab_size' in metadata else None
    self.latent_channels = (int(metadata['latent_channels']) if 'latent_channels' in metadata
                            else None)
    self.num_train_examples = int(metadata['num_examples'])
    self.num_local_examples = len(row_of)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    b = self.local_batch_size
    while len(self._pending['record']) < b:
      record, source, variant = next(self._index_iter)
      rows = self._row_of[source - self._slice_start]
      # Dropped examples are consumed records that emit nothing, as with ignore_errors.
      keep = rows >= 0
      for key, value in (('record', record), ('row', rows), ('variant', variant)):
        self._pending[key] = np.concatenate([self._pending[key], value[keep].astype(np.int64)])
    take = {k: v[:b] for k, v in self._pending.items()}
    self._pending = {k: v[b:] for k, v in self._pending.items()}
    self._position = int(take['record'][-1]) + 1
    self._num_emitted += b
    if self.payload == 'moments':
      moments = self._codes[take['row'], take['variant']]  # [b, h, w, 2, C]
      return {'latent_mean': moments[..., 0, :].astype(np.float32),
              'latent_std': moments[..., 1, :].astype(np.float32),
              'label': self._labels[take['row']]}
    return {'tokens': self._codes[take['row'], take['variant']].astype(np.int32),
            'label': self._labels[take['row']]}

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable data position after the batches returned so far."""
    return {'position': self._position, 'num_skipped': self._position - self._num_emitted}


def _check_rows(path: str, data: dict[str, Any], payload: str, first: int, end: int,
                num_classes: int) -> None:
  """The rows of a shard read back: one per kept example of [first, end), in source order.

  Raises:
    artifacts.DamagedFileError naming the shard and the first inconsistency.
  """
  n = len(data[payload])
  lengths = {k: len(data[k]) for k in ('labels', 'source_index')}
  if any(length != n for length in lengths.values()):
    raise artifacts.DamagedFileError(f'{path}: {n} rows of {payload} but {lengths}')
  index = data['source_index']
  if n and (index[0] < first or index[-1] >= end or (np.diff(index) <= 0).any()):
    raise artifacts.DamagedFileError(
        f'{path}: source_index is not increasing within the shard\'s examples [{first}, {end}) '
        f'(it runs from {index[0]} to {index[-1]})')
  labels = data['labels']
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise artifacts.DamagedFileError(f'{path}: labels in [{labels.min()}, {labels.max()}], '
                                     f'outside the num_classes={num_classes} classes')


def _load_slice(directory: str, metadata: dict[str, Any], start: int, end: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source examples [start, end): (codes[k, V, h, w], labels int32[k], row_of int64[end - start]).

  (Payload 'moments': moments[k, V, h, w, 2, C] in place of the codes.)
  row_of[i] is the row of source example start + i, or -1 when it was left out.

  Every shard is refused, naming it, unless it reads back whole (each member's zip CRC-32),
  its header agrees with metadata.json's and its rows are those of its range: a damaged or
  foreign shard never reaches training.
  """
  shard_size = int(metadata['shard_size'])
  payload = metadata['payload']
  where = os.path.join(directory, METADATA_FILE)
  want_header = {k: metadata.get(k) for k in header_fields(payload)}
  want_shape = (int(metadata['num_variants']), *metadata['grid_size'])
  if payload == 'moments':
    want_shape += (2, int(metadata['latent_channels']))
  codes, labels, sources = [], [], []
  for shard in range(start // shard_size, (end - 1) // shard_size + 1):
    path = shard_path(directory, shard)
    if not paths.exists(path):
      raise FileNotFoundError(f'{path} is missing although {METADATA_FILE} says the directory '
                              f'is complete; delete {METADATA_FILE} and rerun tokenize_dataset '
                              'on it (existing shards are kept)')
    try:
      data = load_shard(path, (payload, 'labels', 'source_index', 'header'))
      array = data[payload]
      if array.shape[1:] != want_shape or array.dtype.name != metadata['dtype']:
        raise artifacts.DamagedFileError(
            f'{path}: {payload} {array.dtype}{list(array.shape)}, metadata says '
            f'{metadata["dtype"]}[n, {", ".join(map(str, want_shape))}]')
      _check_rows(path, data, payload, shard * shard_size,
                  min((shard + 1) * shard_size, int(metadata['num_examples'])),
                  int(metadata['num_classes']))
    except artifacts.DamagedFileError as e:
      raise artifacts.DamagedFileError(
          f'{e}; delete {where} and rerun tokenize_dataset on {directory}: it moves damaged '
          'shards aside and encodes them again') from e
    check_header(data['header'], want_header, path, theirs=f'{where} says',
                 advice='shards of another tokenization do not mix: tokenize into a fresh '
                        'directory')
    inside = (data['source_index'] >= start) & (data['source_index'] < end)
    codes.append(array[inside])
    labels.append(data['labels'][inside])
    sources.append(data['source_index'][inside])
  sources = np.concatenate(sources)
  row_of = np.full((end - start,), -1, np.int64)
  row_of[sources - start] = np.arange(len(sources))
  return np.concatenate(codes), np.concatenate(labels).astype(np.int32), row_of


def open_metadata(directory: str) -> dict[str, Any]:
  """metadata.json of a complete tokenized directory, with an actionable error otherwise."""
  metadata = read_metadata(directory)
  if metadata is None:
    raise FileNotFoundError(
        f'{os.path.join(directory, METADATA_FILE)} does not exist: {directory!r} is not a '
        'complete tokenized data set (tokenize_dataset writes it last; rerun it to finish)')
  return metadata


def create_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                          state: dict | None = None, process_index: int | None = None,
                          process_count: int | None = None) -> TokenizedTrainIterator:
  """This process's endless training iterator over the codes (or moments) in the directory.

  Same arguments, record order, process slices, epochs and state as
  `input_pipeline.create_train_iterator` on images (which calls this when
  `data_config.tokenized_dir` is set); the images are never opened.

  Args:
    data_config: see `schema.default_data_config`; source, train_split,
      image_size and augment must match the directory's metadata.
    global_batch_size: examples per step over all processes.
    seed: data seed.
    state: a previous `get_state()` (of either iterator); continues with the next batch.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.

  Returns:
    A `TokenizedTrainIterator`.
  """
  process_index, process_count = record_order.resolve_process(process_index, process_count)
  local_batch_size = record_order.per_process_batch_size(global_batch_size, process_count)
  directory = data_config.tokenized_dir
  metadata = open_metadata(directory)
  check_data_config(metadata, data_config, directory)
  variant_of = record_order.variant_fn(data_config.augment, seed, process_index)
  position, num_skipped = record_order.parse_data_state(state)
  order = record_order.train_record_order(
      data_config, num_examples=int(metadata['num_examples']), seed=seed,
      process_index=process_index, process_count=process_count)
  codes, labels, row_of = _load_slice(directory, metadata, order.slice_start,
                                      order.slice_start + order.num_records)
  if not len(codes):
    raise ValueError(f'process {process_index} of {process_count}: every example of its slice '
                     f'was dropped as unreadable when {directory!r} was written')
  logging.info('tokenized data %s: %d examples of this slice (%d dropped), %s %s%s',
               directory, len(codes), order.num_records - len(codes), metadata['payload'],
               codes.dtype, list(codes.shape))

  ds = order.stream(position)
  ds = ds.map(record_order.traced_as_written(
      lambda record, source: (record, source, variant_of(record))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Index chunks; the iterator cuts them into batches of kept records.
  ds = ds.batch(max(local_batch_size, 256))
  ds = ds.prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return TokenizedTrainIterator(ds, codes=codes, labels=labels, row_of=row_of,
                                slice_start=order.slice_start, position=position,
                                num_skipped=num_skipped, local_batch_size=local_batch_size,
                                metadata=metadata)
