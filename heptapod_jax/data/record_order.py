"""The deterministic order of the training records, shared by the image pipeline
(`input_pipeline`) and the pre-tokenized reader (`tokenized`), and the pieces both need:
each process's share of a split and of the global batch, the view each record is shown as,
and the data state saved in checkpoints.

* Examples of a split are numbered in its canonical order (the source index). Every process
  reads its own contiguous range of source indices (`even_split_bounds`: for a one-part split
  the same slices as `tfds.even_splits(split, n=process_count)`).
* The training stream of a process is a pure function of (seed, process slice): epoch e is
  the slice in source order, shuffled with a seed derived from (seed, process_index, e);
  records are numbered in stream order. `RecordOrder.stream` is the one definition of it.
* The view of a record (`variant_fn`, see `schema.VARIANT_NAMES`) is a stateless random
  function of (seed, process_index, record index), so it survives resume and can be
  pre-computed.
* Data state is `{'position': records consumed, 'num_skipped': records skipped, ...}`
  (`parse_data_state`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import tensorflow as tf

from heptapod_jax.data import schema


def traced_as_written(fn: Callable) -> Callable:
  """`fn` for a tf.data transformation, traced without AutoGraph's source rewriting. Every
  function the pipelines map uses TensorFlow's own control flow (`tf.cond`, `tf.while_loop`);
  rewriting them and all they call (TFDS's decoders included) took about 5 s of each process's
  start-up on a 2-core CPU, 80% of building a pipeline. A Python `if` on a tensor fails loudly
  when traced instead of being converted."""
  return tf.autograph.experimental.do_not_convert(fn)


# Path records are cheap to hold, so image folders shuffle whole epochs.
WHOLE_EPOCH_SHUFFLE_SOURCES = ("image_folder",)

# Salts that separate the random streams derived from one seed.
_SHUFFLE_SALT = 0
# Was the flip salt before `augment` existed: augment='flip' keeps the old flips.
_AUGMENT_SALT = 1


def even_split_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of part `index` of `count`; same arithmetic as `tfds.even_splits`."""
  per_part, remainder = divmod(num_examples, count)
  start = per_part * index + min(index, remainder)
  end = per_part * (index + 1) + min(index + 1, remainder)
  return start, end


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), defaulting to this JAX process; validates the pair."""
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """Rows of each process's batch; the global batch must split evenly over processes."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  return global_batch_size // process_count


def parse_data_state(state: dict | None) -> tuple[int, int]:
  """(position, num_skipped) of a `get_state()` dict; None = the start."""
  state = state or {"position": 0, "num_skipped": 0}
  position, num_skipped = int(state["position"]), int(state["num_skipped"])
  if not 0 <= num_skipped <= position:
    raise ValueError(f"invalid data state {state}")
  return position, num_skipped


def _key(seed: int, process_index: int, salt: int) -> tf.Tensor:
  """int64[2] stateless key for one random stream of one process."""
  base = tf.constant([seed % 2**63, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, salt)


def variant_fn(augment: str, seed: int, process_index: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """The view each training record is shown as: record index -> variant.

  Shared by the image pipeline and the pre-tokenized reader, so that both show
  record r as view `schema.VARIANT_NAMES[augment][v]`.

  Args:
    augment: one of schema.AUGMENTS.
    seed: data seed.
    process_index: the process whose records are numbered.

  Returns:
    A TF function of an int64 scalar record index giving an int32 scalar in
    [0, len(VARIANT_NAMES[augment])): 0 for 'none', a fair coin for 'flip',
    uniform over the ten crops for 'ten_crop'; stateless in (seed,
    process_index, record index).
  """
  if augment not in schema.AUGMENTS:
    raise ValueError(f"data.augment={augment!r} is not one of {list(schema.AUGMENTS)}")
  key = _key(seed, process_index, _AUGMENT_SALT)
  num_variants = len(schema.VARIANT_NAMES[augment])

  def variant(record_index: tf.Tensor) -> tf.Tensor:
    if num_variants == 1:
      return tf.constant(0, tf.int32)
    record_seed = tf.random.experimental.stateless_fold_in(key, record_index)
    if augment == "flip":
      # The draw of tf.image.stateless_random_flip_left_right(image, record_seed),
      # which this pipeline used before: the flips of a seed are unchanged.
      coin = tf.random.stateless_uniform([], seed=record_seed, minval=0, maxval=1.0)
      return tf.cast(coin < 0.5, tf.int32)
    return tf.random.stateless_uniform([], seed=record_seed, minval=0, maxval=num_variants,
                                       dtype=tf.int32)

  return variant


@dataclasses.dataclass(frozen=True)
class RecordOrder:
  """The training record order of one process: which source example is record r.

  Record r is source example `slice_start + permutation_e[r % num_records]`
  with e = r // num_records and permutation_e the epoch's shuffle, a pure
  function of (seed, process_index, e, num_records, shuffle_buffer).
  """
  # This process's slice of the split: source indices [slice_start, slice_start + num_records).
  slice_start: int
  num_records: int
  shuffle_buffer: int
  seed: int
  process_index: int

  def stream(self, position: int = 0,
             records: tf.data.Dataset | None = None) -> tf.data.Dataset:
    """The endless record stream from record `position` on.

    Args:
      position: index of the first record to emit (records before it are
        skipped: whole epochs arithmetically, the rest as encoded records).
      records: the slice's records in source order (any structure), carried
        along; None streams indices only.

    Returns:
      A dataset of (record_index int64, source_index int64) or, with records,
      (record_index, source_index, record).
    """
    n, buffer_size = self.num_records, self.shuffle_buffer
    # The source index travels with its record through the shuffle. Shuffle's
    # permutation depends on the number of elements and the seeds only, never on
    # their values, so indices alone are shuffled exactly like indexed records.
    items = tf.data.Dataset.range(self.slice_start, self.slice_start + n)
    if records is not None:
      items = tf.data.Dataset.zip((items, records))
    shuffle_key = _key(self.seed, self.process_index, _SHUFFLE_SALT)

    def number(e, i, item):
      if records is None:
        return e * n + i, item
      return (e * n + i,) + tuple(item)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
      epoch_items = items
      if buffer_size > 1:
        epoch_seed = tf.random.stateless_uniform(
            [], seed=tf.random.experimental.stateless_fold_in(shuffle_key, e),
            minval=None, maxval=None, dtype=tf.int64)
        epoch_items = epoch_items.shuffle(buffer_size, seed=epoch_seed,
                                          reshuffle_each_iteration=False)
      return epoch_items.enumerate().map(traced_as_written(lambda i, item: number(e, i, item)))

    start_epoch, offset = divmod(int(position), n)
    # Skipping encoded records before any decode keeps resume cheap.
    return tf.data.Dataset.counter(start_epoch).flat_map(traced_as_written(epoch)).skip(offset)


def train_record_order(data_config: Any, *, num_examples: int, seed: int, process_index: int,
                       process_count: int) -> RecordOrder:
  """The `RecordOrder` of one process's training stream.

  Args:
    data_config: see `default_data_config` (source, train_split, shuffle_buffer).
    num_examples: examples in the whole training split.
    seed: data seed.
    process_index: this process.
    process_count: number of processes.

  Returns:
    A `RecordOrder` over this process's contiguous slice of the split.
  """
  start, end = even_split_bounds(num_examples, process_index, process_count)
  if end == start:
    raise ValueError(f"process {process_index} of {process_count} got no examples of "
                     f"{data_config.source} split {data_config.train_split!r}")
  # Path records are cheap to hold, so image folders shuffle whole epochs.
  if data_config.source in WHOLE_EPOCH_SHUFFLE_SOURCES:
    buffer_size = end - start
  else:
    buffer_size = int(data_config.shuffle_buffer)
  return RecordOrder(slice_start=start, num_records=end - start, shuffle_buffer=buffer_size,
                     seed=int(seed), process_index=process_index)
