"""Deterministic, resumable, multi-host tf.data input for training and evaluation.

Design (what the trainer relies on):

* Every process reads its own contiguous slice of the split (the same slices as
  `tfds.even_splits(split, n=process_count)`), so processes never see the same
  example and together see all of them.
* The training stream of a process is a pure function of (seed, process slice):
  epoch e is the slice's encoded records in a fixed order, shuffled with a seed
  derived from (seed, process_index, e); epochs are chained without end. Records
  are numbered in stream order (record index = e * slice_size + position in the
  epoch), and the random flip of a record is seeded by its index.
* Data state is `{'position': records consumed, 'num_skipped': corrupt records}`,
  a small JSON-serialisable dict per process. Resuming skips `position` encoded
  records (whole epochs arithmetically, the rest before decoding), so resume is
  exact and cheap. The state is computed from the record indices carried in the
  batch returned to the caller, so prefetching never makes it run ahead.
* Undecodable images are dropped (`ignore_errors`) and counted as
  records consumed - examples emitted.

The shuffle uses `tf.data.Dataset.shuffle` with an explicit seed; it also depends
on TensorFlow's global seed, so do not call `tf.random.set_seed` in the trainer
(or call it with the same value in every run).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from heptapod_jax.data import builtin
from heptapod_jax.data import preprocess

SOURCES = ("builtin_digits", "image_folder", "imagenet2012")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# Same extensions as tfds.folder_dataset.ImageFolder.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FOLDER_LAYOUT = ("<folder>/<split>/<class_name>/<image>.jpg|.jpeg|.png, e.g. "
                  "<folder>/train/cat/0001.jpg")
# Salts that separate the random streams derived from one seed.
_SHUFFLE_SALT = 0
_FLIP_SALT = 1


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings for the built-in digits; the trainer's configs copy and edit these.

  Returns:
    ConfigDict with the fields that `create_train_iterator` and
    `create_eval_dataset` read.
  """
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({
      # One of SOURCES.
      "source": "builtin_digits",
      # TFDS data dir (builtin_digits, imagenet2012); None = TFDS default.
      "data_dir": placeholder(str),
      # image_folder: root holding <split>/<class>/<image> files.
      "folder": placeholder(str),
      # imagenet2012: directory with the ILSVRC2012 tars; None = <data_dir>/downloads/manual.
      "manual_dir": placeholder(str),
      "image_size": 32,
      # Off for digits: mirrored digits are not digits.
      "random_flip": False,
      # Encoded records held by the shuffle buffer (image folders shuffle whole epochs).
      "shuffle_buffer": 10_000,
      "train_split": "train",
      "eval_split": "test",
      # -1 = tf.data.AUTOTUNE.
      "num_parallel_calls": -1,
      # Batches prefetched; -1 = AUTOTUNE, 0 = none.
      "prefetch": 2,
  })


@dataclasses.dataclass(frozen=True)
class _Slice:
  """Encoded records of one process's slice of a split, in a fixed order."""
  # Elements {'image': string (encoded bytes, or a path when load_from_path), 'label': int64}.
  records: tf.data.Dataset
  num_records: int
  # Records are file paths that are cheap to hold, so a whole epoch can be shuffled.
  load_from_path: bool


@dataclasses.dataclass(frozen=True)
class _Source:
  """A resolved data source."""
  name: str
  num_classes: int
  # split -> examples in it (all processes)
  num_examples: Callable[[str], int]
  # (split, process_index, process_count) -> _Slice
  read_slice: Callable[[str, int, int], _Slice]


def _even_split_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """[start, end) of part `index` of `count`; same arithmetic as `tfds.even_splits`."""
  per_part, remainder = divmod(num_examples, count)
  start = per_part * index + min(index, remainder)
  end = per_part * (index + 1) + min(index + 1, remainder)
  return start, end


def _tfds_source(name: str, builder: tfds.core.DatasetBuilder) -> _Source:
  """Wraps a prepared TFDS builder whose features are `image` and `label`."""

  def num_examples(split: str) -> int:
    try:
      return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f"{name}: bad split {split!r} ({e}); available: "
                       f"{sorted(builder.info.splits)}") from e

  def read_slice(split: str, process_index: int, process_count: int) -> _Slice:
    num_examples(split)  # validates the split with a readable error
    subsplit = tfds.even_splits(split, n=process_count)[process_index]
    num_records = builder.info.splits[subsplit].num_examples
    records = builder.as_dataset(
        split=subsplit,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        # An auto-cache would be filled by the first (possibly partial) epoch.
        read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False),
    )
    records = records.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return _Slice(records, num_records, load_from_path=False)

  return _Source(name, builder.info.features["label"].num_classes, num_examples, read_slice)


def _list_folder_split(split_dir: str, class_names: list[str]) -> tuple[list[str], list[int]]:
  """Image paths and labels of one split, ordered by class then file name."""
  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    class_dir = os.path.join(split_dir, class_name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    for file_name in sorted(tf.io.gfile.listdir(class_dir)):
      if file_name.lower().endswith(_IMAGE_EXTENSIONS):
        paths.append(os.path.join(class_dir, file_name))
        labels.append(label)
  return paths, labels


def _image_folder_source(folder: str | None) -> _Source:
  """An `ImageFolder` tree; files are read and decoded by this pipeline."""
  if not folder:
    raise ValueError(
        f"data.source='image_folder' needs data.folder, the root of {_FOLDER_LAYOUT}")
  folder = os.path.expanduser(folder)
  if not tf.io.gfile.isdir(folder):
    raise FileNotFoundError(
        f"image folder {folder!r} does not exist; expected layout {_FOLDER_LAYOUT}")
  builder = tfds.folder_dataset.ImageFolder(folder)
  class_names = list(builder.info.features["label"].names)
  split_sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  if not class_names or not any(split_sizes.values()):
    raise ValueError(
        f"image folder {folder!r} holds no images; expected layout {_FOLDER_LAYOUT}")

  def num_examples(split: str) -> int:
    if not split_sizes.get(split):
      raise ValueError(
          f"image folder {folder!r} has no images for split {split!r} (splits with images: "
          f"{sorted(k for k, v in split_sizes.items() if v)}); expected layout {_FOLDER_LAYOUT}")
    return split_sizes[split]

  def read_slice(split: str, process_index: int, process_count: int) -> _Slice:
    num_examples(split)  # validates the split with a readable error
    # ImageFolder's own dataset reads every file inside its map, so slicing or
    # skipping after it would read files this process never uses. Listing the
    # files here lets slicing and resume skip on paths; the labels are
    # ImageFolder's (class names sorted over all splits).
    paths, labels = _list_folder_split(os.path.join(folder, split), class_names)
    if len(paths) != split_sizes[split]:
      raise RuntimeError(f"listed {len(paths)} images in {folder}/{split}, "
                         f"ImageFolder found {split_sizes[split]}; did the folder change?")
    start, end = _even_split_bounds(len(paths), process_index, process_count)
    records = tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(paths[start:end], tf.string),
        "label": tf.constant(labels[start:end], tf.int64),
    })
    return _Slice(records, end - start, load_from_path=True)

  return _Source("image_folder", len(class_names), num_examples, read_slice)


def _imagenet_source(data_dir: str | None, manual_dir: str | None) -> _Source:
  """TFDS imagenet2012, prepared from the manually downloaded tars if needed."""
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if not builder.is_prepared():
    if not manual_dir:
      root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
      manual_dir = os.path.join(root, "downloads", "manual")
    manual_dir = os.path.expanduser(manual_dir)
    missing = [f for f in IMAGENET_TARS if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing:
      raise FileNotFoundError(
          f"imagenet2012 is not prepared in data_dir={data_dir!r} and {' and '.join(missing)} "
          f"{'is' if len(missing) == 1 else 'are'} missing from the manual directory "
          f"{manual_dir!r}. Download "
          f"{' and '.join(IMAGENET_TARS)} from https://image-net.org (account required), put "
          f"them in {manual_dir} (or set data.manual_dir to their directory) and run again; "
          "preparation then takes a few hours, once.")
    # Several hosts preparing into one shared data_dir would race: prepare once
    # (e.g. on one host with process_count=1) before a multi-host run.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     try_download_gcs=False))
  return _tfds_source("imagenet2012", builder)


def _resolve_source(data_config: Any) -> _Source:
  """Maps `data_config.source` to a readable source, with actionable errors."""
  source = data_config.source
  if source == "builtin_digits":
    return _tfds_source(source, builtin.prepare(data_config.data_dir))
  if source == "image_folder":
    return _image_folder_source(data_config.folder)
  if source == "imagenet2012":
    return _imagenet_source(data_config.data_dir, data_config.manual_dir)
  raise ValueError(f"unknown data.source {source!r}; valid choices: {', '.join(SOURCES)}")


def _process_args(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to this JAX process; validates the pair."""
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                     f"the process count {process_count}")
  return global_batch_size // process_count


def _autotune(value: int) -> int:
  return tf.data.AUTOTUNE if value == -1 else int(value)


def _key(seed: int, process_index: int, salt: int) -> tf.Tensor:
  """int64[2] stateless key for one random stream of one process."""
  base = tf.constant([seed % 2**63, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, salt)


def _decode_fn(image_size: int, load_from_path: bool,
               flip_key: tf.Tensor | None) -> Callable[..., dict[str, tf.Tensor]]:
  """(index, record) -> {'image': float32[S, S, 3], 'label': int32, 'index': int64}."""

  def decode(index, record):
    encoded = tf.io.read_file(record["image"]) if load_from_path else record["image"]
    image = preprocess.center_crop(preprocess.decode_image(encoded), image_size)
    if flip_key is not None:
      image = preprocess.random_flip(
          image, tf.random.experimental.stateless_fold_in(flip_key, index))
    return {
        "image": preprocess.to_model_range(image),
        "label": tf.cast(record["label"], tf.int32),
        "index": index,
    }

  return decode


class TrainIterator:
  """Endless iterator over this process's training batches; resumable via `get_state`.

  `next(it)` returns numpy arrays for this process:
    {'image': float32[b, S, S, 3] in [-1, 1], 'label': int32[b]}
  with b = global_batch_size // process_count.
  """

  def __init__(self, dataset: tf.data.Dataset, *, position: int, num_skipped: int,
               local_batch_size: int, num_classes: int, image_size: int,
               num_train_examples: int, num_local_examples: int):
    self._iterator = dataset.as_numpy_iterator()
    self._position = position
    self._num_emitted = position - num_skipped
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
    return batch

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable data position after the batches returned so far."""
    return {"position": self._position, "num_skipped": self._position - self._num_emitted}


def create_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                          state: dict | None = None, process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """Builds this process's endless, shuffled, augmented training iterator.

  Args:
    data_config: see `default_data_config`.
    global_batch_size: examples per step over all processes.
    seed: data seed; with the process slice it fixes the whole stream.
    state: a previous `TrainIterator.get_state()`; continues with the next batch.
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.

  Returns:
    A `TrainIterator`.
  """
  process_index, process_count = _process_args(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  source = _resolve_source(data_config)
  split = data_config.train_split
  data = source.read_slice(split, process_index, process_count)
  num_records = data.num_records
  if num_records == 0:
    raise ValueError(f"process {process_index} of {process_count} got no examples of "
                     f"{source.name} split {split!r}")
  state = state or {"position": 0, "num_skipped": 0}
  position, num_skipped = int(state["position"]), int(state["num_skipped"])
  if not 0 <= num_skipped <= position:
    raise ValueError(f"invalid data state {state}")

  buffer_size = num_records if data.load_from_path else int(data_config.shuffle_buffer)
  shuffle_key = _key(seed, process_index, _SHUFFLE_SALT)
  records = data.records

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    epoch_records = records
    if buffer_size > 1:
      epoch_seed = tf.random.stateless_uniform(
          [], seed=tf.random.experimental.stateless_fold_in(shuffle_key, e),
          minval=None, maxval=None, dtype=tf.int64)
      epoch_records = epoch_records.shuffle(buffer_size, seed=epoch_seed,
                                            reshuffle_each_iteration=False)
    return epoch_records.enumerate().map(lambda i, r: (e * num_records + i, r))

  start_epoch, offset = divmod(position, num_records)
  ds = tf.data.Dataset.counter(start_epoch).flat_map(epoch)
  # Skipping encoded records before the decode keeps resume cheap.
  ds = ds.skip(offset)
  flip_key = _key(seed, process_index, _FLIP_SALT) if data_config.random_flip else None
  ds = ds.map(_decode_fn(data_config.image_size, data.load_from_path, flip_key),
              num_parallel_calls=_autotune(data_config.num_parallel_calls), deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  if data_config.prefetch:
    ds = ds.prefetch(_autotune(data_config.prefetch))
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)

  return TrainIterator(
      ds, position=position, num_skipped=num_skipped, local_batch_size=local_batch_size,
      num_classes=source.num_classes, image_size=data_config.image_size,
      num_train_examples=source.num_examples(split),
      num_local_examples=num_records)


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
    # Corrupt images or a smaller slice leave this process short: pad with
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
  process_index, process_count = _process_args(process_index, process_count)
  local_batch_size = _local_batch_size(batch_size, process_count)
  source = _resolve_source(data_config)
  split = data_config.eval_split if split is None else split
  data = source.read_slice(split, process_index, process_count)
  num_examples = source.num_examples(split)
  # The largest slice decides how many batches every process yields.
  num_batches = math.ceil(math.ceil(num_examples / process_count) / local_batch_size)
  ds = data.records.enumerate()
  ds = ds.map(_decode_fn(data_config.image_size, data.load_from_path, None),
              num_parallel_calls=_autotune(data_config.num_parallel_calls), deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
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
