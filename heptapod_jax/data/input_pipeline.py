"""Deterministic, resumable, multi-host tf.data input for training and evaluation.

The sources (where a split's encoded records come from) are `sources.py`; the record
order of training and the processes' shares are `record_order.py`; this module decodes,
counts skipped records, batches, and assembles the global batch.

Design (what the trainer relies on):

* Examples of a split are numbered in its canonical order (the source index:
  TFDS's absolute order, read file by file; an image folder's class then file
  name order). Every process reads its own contiguous range of source indices
  (`record_order.even_split_bounds`: for a one-part split the same slices as
  `tfds.even_splits(split, n=process_count)`; a split such as 'train+test' is
  sliced as one sequence), so processes never see the same example and
  together see all of them.
* The training stream of a process is a pure function of (seed, process slice):
  epoch e is the slice in source order, shuffled with a seed derived from
  (seed, process_index, e); epochs are chained without end. Records are numbered
  in stream order (record index = e * slice_size + position in the epoch).
  `record_order.RecordOrder.stream` is the one definition of this order (the stream of
  (record index, source index) pairs); the pre-tokenized reader
  (`heptapod_jax.data.tokenized`) replays it without touching the images.
* Augmentation (`data.augment`, see `schema.VARIANT_NAMES`) shows each record
  as one of a fixed list of views; the view is a stateless random function of
  (seed, process_index, record index) (`record_order.variant_fn`), so it survives resume and
  can be pre-computed.
* Data state is `{'position': records consumed, 'num_skipped': records skipped}`
  plus, when not empty, `'skipped': {reason: records}` (`SKIP_REASONS`, adding
  up to num_skipped) and `'converted': {kind: records}` (`CONVERSIONS`), a
  small JSON-serialisable dict per process. Resuming skips `position` encoded
  records (whole epochs arithmetically, the rest before decoding), so resume is
  exact and cheap. The state is computed from the record indices and running
  counts carried in the batch returned to the caller, so prefetching never makes
  it run ahead. A state without 'skipped' (older checkpoints, the pre-tokenized
  reader) counts all its skipped records as 'undecodable'.
* Bad images (`preprocess.decode_checked`): grayscale, CMYK, palette and RGBA
  images are converted to RGB and counted per kind; corrupt, truncated and too
  small ones (shorter side below `data.min_image_size`) are skipped and counted
  per reason: each record is mapped to (image, skip reason, conversion), counted
  in stream order, then filtered. A record that passes the checks yet fails to
  decode is dropped by `ignore_errors`, the last safety net, and counted as
  'undecodable' (records consumed - emitted - the other reasons). Skipped
  records are consumed records: `position` and the record indices (hence the
  augmentation and resume) are unaffected.
* A missing or empty image folder, or a prepared TFDS directory whose files are
  gone, stops `create_train_iterator` / `create_eval_dataset` with the path.
* With `data.tokenized_dir` set, `create_train_iterator` returns the
  pre-tokenized reader instead: same records, same state, 'tokens' in place of
  'image'.

The shuffle uses `tf.data.Dataset.shuffle` with an explicit seed; it also depends
on TensorFlow's global seed, so do not call `tf.random.set_seed` in the trainer
(or call it with the same value in every run).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from heptapod_jax.data import preprocess, schema
from heptapod_jax.data.schema import default_data_config  # noqa: F401  (public API)
from heptapod_jax.data.record_order import (parse_data_state, per_process_batch_size,
                                            resolve_process, traced_as_written,
                                            train_record_order, variant_fn)
from heptapod_jax.data.sources import resolve_source

# Why training records are skipped (state 'skipped'): the checks of
# `preprocess.decode_checked`, then 'undecodable' for errors `ignore_errors` drops.
SKIP_REASONS = preprocess.SKIP_REASONS + ("undecodable",)
# Colour conversions counted in state 'converted'.
CONVERSIONS = preprocess.CONVERSIONS
def _count_dict(state: dict, key: str, names: tuple[str, ...]) -> dict[str, int]:
  counts = state.get(key, {})
  if not isinstance(counts, dict) or set(counts) - set(names):
    raise ValueError(f"invalid data state {state}: {key!r} must map names in {list(names)} "
                     "to counts")
  out = {name: int(counts.get(name, 0)) for name in names}
  if min(out.values()) < 0:
    raise ValueError(f"invalid data state {state}: negative count in {key!r}")
  return out


def parse_data_counts(state: dict | None) -> tuple[dict[str, int], dict[str, int]]:
  """Per-reason skip counts and per-kind conversion counts of a `get_state()` dict.

  Args:
    state: a `get_state()` dict of either iterator, or None (the start).

  Returns:
    (skipped, converted): every name of `SKIP_REASONS` (resp. `CONVERSIONS`)
    mapped to its count of records. A state without 'skipped' (older
    checkpoints, the pre-tokenized reader) has all its num_skipped records under
    'undecodable'.
  """
  _, num_skipped = parse_data_state(state)
  state = state or {}
  skipped = _count_dict(state, "skipped", SKIP_REASONS)
  converted = _count_dict(state, "converted", CONVERSIONS)
  if "skipped" not in state:
    skipped["undecodable"] = num_skipped
  if sum(skipped.values()) != num_skipped:
    raise ValueError(f"invalid data state {state}: 'skipped' adds up to "
                     f"{sum(skipped.values())}, not num_skipped={num_skipped}")
  return skipped, converted


def count_metrics(state: dict | None) -> dict[str, int]:
  """The bad-data counts of a `get_state()` dict as flat metrics, zeros included.

  Args:
    state: a `get_state()` dict of either iterator.

  Returns:
    {'skipped_<reason>': records} for every `SKIP_REASONS` entry and
    {'converted_<kind>': records} for every `CONVERSIONS` entry.
  """
  skipped, converted = parse_data_counts(state)
  return {**{f"skipped_{k}": v for k, v in skipped.items()},
          **{f"converted_{k}": v for k, v in converted.items()}}


def _autotune(value: int) -> int:
  return tf.data.AUTOTUNE if value == -1 else int(value)


def _encoded(record: dict[str, tf.Tensor], load_from_path: bool) -> tf.Tensor:
  return tf.io.read_file(record["image"]) if load_from_path else record["image"]


def load_image(record: dict[str, tf.Tensor], load_from_path: bool,
               min_image_size: int = schema.DEFAULT_MIN_IMAGE_SIZE) -> tf.Tensor:
  """uint8[h, w, 3] of a source record (encoded bytes, or a path when load_from_path).

  Raises `tf.errors.InvalidArgumentError` (naming the reason) when the op runs
  on a record the training pipeline skips, so that `ignore_errors` after it
  drops the same records.
  """
  image, skip, _ = preprocess.decode_checked(_encoded(record, load_from_path), min_image_size)
  reason = tf.gather(tf.constant(("",) + preprocess.SKIP_REASONS), skip)
  check = tf.debugging.Assert(tf.equal(skip, 0), ["image skipped:", reason])
  with tf.control_dependencies([check]):
    return tf.identity(image)


def _decode_fn(image_size: int, load_from_path: bool, augment: str,
               variant_of: Callable[[tf.Tensor], tf.Tensor],
               min_image_size: int) -> Callable[..., dict[str, tf.Tensor]]:
  """The map `(index, record) -> example` of both pipelines.

  The example is {'image': float32[S, S, 3], 'label': int32, 'index': int64,
  'skip': int32, 'conversion': int32} (codes of `preprocess.decode_checked`); a
  skipped record's image is zeros, to be filtered out after counting.
  """

  def decode(index, record):
    image, skip, conversion = preprocess.decode_checked(_encoded(record, load_from_path),
                                                        min_image_size)
    view = tf.cond(
        tf.equal(skip, 0),
        lambda: preprocess.to_model_range(
            preprocess.augmented_view(image, image_size, augment, variant_of(index))),
        lambda: tf.zeros([image_size, image_size, 3], tf.float32))
    return {
        "image": view,
        "label": tf.cast(record["label"], tf.int32),
        "index": index,
        "skip": skip,
        "conversion": conversion,
    }

  return traced_as_written(decode)


# Running counts carried by each training example: the checked skip reasons,
# then the conversions ('undecodable' is what is left of num_skipped).
_NUM_CHECKED = len(preprocess.SKIP_REASONS)


def _count(counts: tf.Tensor, example: dict[str, tf.Tensor]
           ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  """Scan step: adds the example's skip reason or conversion to the running counts."""
  # one_hot of -1 (code 0: kept, no conversion) is all zeros.
  counts = counts + tf.concat([
      tf.one_hot(example["skip"] - 1, _NUM_CHECKED, dtype=tf.int64),
      tf.one_hot(example["conversion"] - 1, len(CONVERSIONS), dtype=tf.int64)], axis=0)
  return counts, {**example, "counts": counts}


def _drop_skipped(ds: tf.data.Dataset, keep: tuple[str, ...]) -> tf.data.Dataset:
  ds = ds.filter(traced_as_written(lambda ex: tf.equal(ex["skip"], 0)))
  return ds.map(traced_as_written(lambda ex: {k: ex[k] for k in keep}))


class TrainIterator:
  """Endless iterator over this process's training batches; resumable via `get_state`.

  `next(it)` returns numpy arrays for this process:
    {'image': float32[b, S, S, 3] in [-1, 1], 'label': int32[b]}
  with b = global_batch_size // process_count.
  """

  def __init__(self, dataset: tf.data.Dataset, *, position: int, num_skipped: int,
               local_batch_size: int, num_classes: int, image_size: int,
               num_train_examples: int, num_local_examples: int,
               skipped: dict[str, int] | None = None, converted: dict[str, int] | None = None):
    self._iterator = dataset.as_numpy_iterator()
    self._position = position
    self._num_emitted = position - num_skipped
    # Counts before this iterator's first record (from the resumed state), in the
    # order of the running counts the batches carry.
    skipped, converted = skipped or {}, converted or {}
    self._counts_at_start = np.array(
        [skipped.get(r, 0) for r in preprocess.SKIP_REASONS]
        + [converted.get(c, 0) for c in CONVERSIONS], np.int64)
    self._counts = self._counts_at_start
    self.local_batch_size = local_batch_size
    self.num_classes = num_classes
    self.image_size = image_size
    # Whole train split, all processes.
    self.num_train_examples = num_train_examples
    # This process's slice: records per epoch.
    self.num_local_examples = num_local_examples

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    index = batch.pop("index")
    # Indices increase along the stream, so the last one tells how far the
    # source has been consumed, corrupt records included.
    self._position = int(index[-1]) + 1
    self._num_emitted += len(index)
    # Running counts up to the last example: records skipped after it are
    # counted with the batch that passes them, like `position`.
    self._counts = self._counts_at_start + batch.pop("counts")[-1]
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable data position after the batches returned so far.

    Returns:
      {'position': int, 'num_skipped': int} plus 'skipped': {reason: int} and
      'converted': {kind: int} (names from `SKIP_REASONS`, `CONVERSIONS`) when
      not empty; zero counts are left out. Sum of 'skipped' = num_skipped.
    """
    num_skipped = self._position - self._num_emitted
    checked = self._counts[:_NUM_CHECKED]
    skipped = dict(zip(preprocess.SKIP_REASONS, checked.tolist()))
    skipped["undecodable"] = num_skipped - int(checked.sum())
    converted = dict(zip(CONVERSIONS, self._counts[_NUM_CHECKED:].tolist()))
    state = {"position": self._position, "num_skipped": num_skipped}
    for key, counts in (("skipped", skipped), ("converted", converted)):
      counts = {name: int(n) for name, n in counts.items() if n}
      if counts:
        state[key] = counts
    return state


def create_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                          state: dict | None = None, process_index: int | None = None,
                          process_count: int | None = None) -> Any:
  """Builds this process's endless, shuffled, augmented training iterator.

  With `data_config.tokenized_dir` set this returns the pre-tokenized reader
  (`tokenized.create_train_iterator`): the same records in the same order and
  the same state, its batches holding 'tokens' int32[b, h, w] instead of 'image'
  (for a KL tokenizer's directory: 'latent_mean' and 'latent_std' float32[b, h, w, C]).

  Args:
    data_config: see `default_data_config`.
    global_batch_size: examples per step over all processes.
    seed: data seed; with the process slice it fixes the whole stream.
    state: a previous `TrainIterator.get_state()`; continues with the next batch.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.

  Returns:
    A `TrainIterator` (images) or a `tokenized.TokenizedTrainIterator`.
  """
  if getattr(data_config, "tokenized_dir", None):
    from heptapod_jax.data import tokenized  # pylint: disable=g-import-not-at-top
    return tokenized.create_train_iterator(
        data_config, global_batch_size=global_batch_size, seed=seed, state=state,
        process_index=process_index, process_count=process_count)
  process_index, process_count = resolve_process(process_index, process_count)
  local_batch_size = per_process_batch_size(global_batch_size, process_count)
  variant_of = variant_fn(data_config.augment, seed, process_index)
  position, num_skipped = parse_data_state(state)
  skipped, converted = parse_data_counts(state)
  source = resolve_source(data_config)
  split = data_config.train_split
  num_examples = source.num_examples(split)
  order = train_record_order(data_config, num_examples=num_examples, seed=seed,
                             process_index=process_index, process_count=process_count)
  data = source.read_range(split, order.slice_start, order.slice_start + order.num_records)

  ds = order.stream(position, data.records)
  decode = _decode_fn(data_config.image_size, data.load_from_path, data_config.augment,
                      variant_of, data_config.min_image_size)
  ds = ds.map(traced_as_written(lambda index, source_index, record: decode(index, record)),
              num_parallel_calls=_autotune(data_config.num_parallel_calls), deterministic=True)
  # Errors the checks do not foresee: dropped before counting, hence 'undecodable'.
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.scan(tf.zeros([_NUM_CHECKED + len(CONVERSIONS)], tf.int64), traced_as_written(_count))
  ds = _drop_skipped(ds, ("image", "label", "index", "counts"))
  ds = ds.batch(local_batch_size, drop_remainder=True)
  if data_config.prefetch:
    ds = ds.prefetch(_autotune(data_config.prefetch))
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  return TrainIterator(
      ds, position=position, num_skipped=num_skipped, local_batch_size=local_batch_size,
      num_classes=source.num_classes, image_size=data_config.image_size,
      num_train_examples=num_examples, num_local_examples=order.num_records,
      skipped=skipped, converted=converted)


class EvalDataset:
  """Finite, re-iterable evaluation batches of this process (no shuffle, no flip).

  Each iteration yields `num_batches` dicts of numpy arrays:
    {'image': float32[b, S, S, 3], 'label': int32[b], 'mask': bool[b]}
  where b = batch_size // process_count. Padding rows have mask False. Every
  process yields the same number of batches (slices differ by at most one
  example), so the batches can be assembled into global arrays in lockstep.
  """

  def __init__(self, dataset: tf.data.Dataset, *, local_batch_size: int, num_batches: int,
               num_examples: int, num_local_examples: int, num_classes: int, image_size: int):
    self._dataset = dataset
    self.local_batch_size = local_batch_size
    self.num_batches = num_batches
    # Whole split, all processes.
    self.num_examples = num_examples
    self.num_local_examples = num_local_examples
    self.num_classes = num_classes
    self.image_size = image_size

  def __len__(self) -> int:
    return self.num_batches

  def _pad(self, batch: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    b, s = self.local_batch_size, self.image_size
    out = {
        "image": np.zeros((b, s, s, 3), np.float32),
        "label": np.zeros((b,), np.int32),
        "mask": np.zeros((b,), bool),
    }
    if batch is not None:
      n = len(batch["label"])
      out["image"][:n] = batch["image"]
      out["label"][:n] = batch["label"]
      out["mask"][:n] = True
    return out

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    count = 0
    for batch in self._dataset.as_numpy_iterator():
      if len(batch["label"]) == self.local_batch_size:
        yield {**batch, "mask": np.ones((self.local_batch_size,), bool)}
      else:
        yield self._pad(batch)
      count += 1
    # Skipped images or a smaller slice leave this process short: pad with
    # fully masked batches so that all processes step together.
    for _ in range(count, self.num_batches):
      yield self._pad(None)


def create_eval_dataset(data_config: Any, *, batch_size: int, split: str | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> EvalDataset:
  """Evaluation batches of this process's slice: center crop only, nothing lost.

  Args:
    data_config: see `default_data_config`.
    batch_size: global batch size (all processes); each process gets
      batch_size // process_count rows per batch.
    split: split to read; default `data_config.eval_split`.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.

  Returns:
    An `EvalDataset` (iterate it as often as needed).
  """
  process_index, process_count = resolve_process(process_index, process_count)
  local_batch_size = per_process_batch_size(batch_size, process_count)
  source = resolve_source(data_config)
  split = data_config.eval_split if split is None else split
  data = source.read_slice(split, process_index, process_count)
  num_examples = source.num_examples(split)
  # The largest slice decides how many batches every process yields.
  num_batches = math.ceil(math.ceil(num_examples / process_count) / local_batch_size)
  ds = data.records.enumerate()
  ds = ds.map(_decode_fn(data_config.image_size, data.load_from_path, "none",
                         variant_fn("none", 0, process_index), data_config.min_image_size),
              num_parallel_calls=_autotune(data_config.num_parallel_calls), deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = _drop_skipped(ds, ("image", "label"))
  ds = ds.batch(local_batch_size)
  if data_config.prefetch:
    ds = ds.prefetch(_autotune(data_config.prefetch))
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return EvalDataset(ds, local_batch_size=local_batch_size, num_batches=num_batches,
                     num_examples=num_examples, num_local_examples=data.num_records,
                     num_classes=source.num_classes, image_size=data_config.image_size)


def make_global_batch(local_batch: dict[str, np.ndarray],
                      shardings: dict[str, jax.sharding.Sharding] | jax.sharding.Sharding
                      ) -> dict[str, jax.Array]:
  """Assembles the processes' local batches into global arrays.

  Args:
    local_batch: this process's arrays, batch dimension first.
    shardings: one sharding for every entry, or a dict keyed like `local_batch`.
      The batch dimension must be split across processes.

  Returns:
    jax.Arrays whose batch dimension is the sum over processes (process p's rows
    come after those of processes < p).
  """
  def assemble(name: str, x: np.ndarray) -> jax.Array:
    sharding = shardings if isinstance(shardings, jax.sharding.Sharding) else shardings[name]
    global_shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return {name: assemble(name, np.asarray(x)) for name, x in local_batch.items()}
