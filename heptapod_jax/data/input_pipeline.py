"""Deterministic, resumable, multi-host tf.data input for training and evaluation.

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
* Augmentation (`data.augment`, see `preprocess.VARIANT_NAMES`) shows each record
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

import dataclasses
import functools
import math
import operator
import os
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from heptapod_jax.data import builtin
from heptapod_jax.data import preprocess
from heptapod_jax.data.record_order import (even_split_bounds, parse_data_state,
                                            per_process_batch_size, resolve_process,
                                            train_record_order, variant_fn)

SOURCES = ("builtin_digits", "image_folder", "imagenet2012")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# Same extensions as tfds.folder_dataset.ImageFolder.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Why training records are skipped (state 'skipped'): the checks of
# `preprocess.decode_checked`, then 'undecodable' for errors `ignore_errors` drops.
SKIP_REASONS = preprocess.SKIP_REASONS + ("undecodable",)
# Colour conversions counted in state 'converted'.
CONVERSIONS = preprocess.CONVERSIONS
_FOLDER_LAYOUT = ("<folder>/<split>/<class_name>/<image>.jpg|.jpeg|.png, e.g. "
                  "<folder>/train/cat/0001.jpg")


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
      # Images whose shorter side is below this are skipped (counted as 'too_small');
      # 0 keeps all. Smaller images above it are upsampled by the center crop.
      "min_image_size": preprocess.DEFAULT_MIN_IMAGE_SIZE,
      # Training augmentation, one of AUGMENTS: 'none' (center crop), 'flip' (and
      # its mirror image), 'ten_crop' (LlamaGen: 1.1x center crop, TenCrop views).
      # 'none' for digits: mirrored digits are not digits.
      "augment": "none",
      # Directory written by `python -m heptapod_jax.tools.tokenize_dataset`: train
      # on its pre-computed codes ('tokens') instead of images. None = images.
      "tokenized_dir": placeholder(str),
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
  """Encoded records of a range of source indices of a split, in source order."""
  # Elements {'image': string (encoded bytes, or a path when load_from_path), 'label': int64}.
  records: tf.data.Dataset
  num_records: int
  # Source index of the first record.
  start: int
  # Records are file paths, read and decoded by `load_image`.
  load_from_path: bool


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved data source."""
  name: str
  num_classes: int
  # split -> examples in it (all processes)
  num_examples: Callable[[str], int]
  # (split, start, end) -> _Slice of source indices [start, end)
  read_range: Callable[[str, int, int], _Slice]

  def read_slice(self, split: str, process_index: int, process_count: int) -> _Slice:
    """The contiguous part `process_index` of `process_count` of the split."""
    start, end = even_split_bounds(self.num_examples(split), process_index, process_count)
    return self.read_range(split, start, end)


def _empty_records() -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices({"image": tf.constant([], tf.string),
                                             "label": tf.constant([], tf.int64)})


def _tfds_source(name: str, builder: tfds.core.DatasetBuilder) -> Source:
  """Wraps a prepared TFDS builder whose features are `image` and `label`."""

  def num_examples(split: str) -> int:
    try:
      return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise ValueError(f"{name}: bad split {split!r} ({e}); available: "
                       f"{sorted(builder.info.splits)}") from e

  @functools.lru_cache(maxsize=None)
  def check_files(split_name: str) -> None:
    # A prepared directory whose record files were deleted would otherwise fail
    # at the first read, after the model is built.
    expected = [os.fspath(p) for p in builder.info.splits[split_name].filepaths]
    present = set(tf.io.gfile.listdir(builder.data_dir))
    missing = [p for p in expected if os.path.basename(p) not in present]
    if missing:
      raise FileNotFoundError(
          f"{name}: {len(missing)} of the {len(expected)} files of split {split_name!r} are "
          f"missing from {builder.data_dir} (e.g. {missing[0]}); the directory is incomplete: "
          "delete it and prepare it again, or point data.data_dir at a complete copy")

  def read_range(split: str, start: int, end: int) -> _Slice:
    total = num_examples(split)  # validates the split with a readable error
    if not 0 <= start <= end <= total:
      raise ValueError(f"{name}: range [{start}, {end}) outside split {split!r} of {total}")
    # The split's parts ('train[:10]+test') in reading order; cut [start, end)
    # out of their concatenation.
    pieces, offset = [], 0
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits):
      lo = part.from_ or 0
      hi = builder.info.splits[part.splitname].num_examples if part.to is None else part.to
      a, b = max(lo, lo + start - offset), min(hi, lo + end - offset)
      if a < b:
        check_files(part.splitname)
        pieces.append(tfds.core.ReadInstruction(part.splitname, from_=a, to=b, unit="abs"))
      offset += hi - lo
    if not pieces:
      return _Slice(_empty_records(), 0, start, load_from_path=False)
    records = builder.as_dataset(
        split=functools.reduce(operator.add, pieces),
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        # An auto-cache would be filled by the first (possibly partial) epoch.
        # Cycle length 1 reads the files one after the other, in the canonical
        # order that source indices (and pre-tokenized shards) refer to; the
        # default interleaves 16 files and the order would depend on the range.
        read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False,
                                    interleave_cycle_length=1),
    )
    records = records.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
    return _Slice(records, end - start, start, load_from_path=False)

  return Source(name, builder.info.features["label"].num_classes, num_examples, read_range)


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


def _image_folder_source(folder: str | None) -> Source:
  """An `ImageFolder` tree; files are read and decoded by this pipeline."""
  if not folder:
    raise ValueError(
        f"data.source='image_folder' needs data.folder, the root of {_FOLDER_LAYOUT}")
  folder = os.path.expanduser(folder)
  if not tf.io.gfile.isdir(folder):
    problem = ("is a file, not a directory" if tf.io.gfile.exists(folder)
               else "directory does not exist")
    raise FileNotFoundError(
        f"data.folder={folder!r}: {problem}; expected layout {_FOLDER_LAYOUT}")
  builder = tfds.folder_dataset.ImageFolder(folder)
  class_names = list(builder.info.features["label"].names)
  split_sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  if not class_names or not any(split_sizes.values()):
    entries = sorted(tf.io.gfile.listdir(folder))
    found = (f"it holds {len(entries)} entries: {', '.join(entries[:5])}"
             f"{', ...' if len(entries) > 5 else ''}" if entries else "it is empty")
    raise ValueError(
        f"data.folder={folder!r} contains no images in class sub-directories ({found}); "
        f"expected layout {_FOLDER_LAYOUT}")

  def num_examples(split: str) -> int:
    if not split_sizes.get(split):
      raise ValueError(
          f"data.folder={folder!r} has no images for split {split!r} in "
          f"{os.path.join(folder, split)} (splits with images: "
          f"{sorted(k for k, v in split_sizes.items() if v)}); expected layout {_FOLDER_LAYOUT}")
    return split_sizes[split]

  @functools.lru_cache(maxsize=None)
  def list_split(split: str) -> tuple[list[str], list[int]]:
    num_examples(split)  # validates the split with a readable error
    # ImageFolder's own dataset reads every file inside its map, so slicing or
    # skipping after it would read files this process never uses. Listing the
    # files here lets slicing and resume skip on paths; the labels are
    # ImageFolder's (class names sorted over all splits).
    paths, labels = _list_folder_split(os.path.join(folder, split), class_names)
    if len(paths) != split_sizes[split]:
      raise RuntimeError(f"listed {len(paths)} images in {folder}/{split}, "
                         f"ImageFolder found {split_sizes[split]}; did the folder change?")
    return paths, labels

  def read_range(split: str, start: int, end: int) -> _Slice:
    paths, labels = list_split(split)
    if not 0 <= start <= end <= len(paths):
      raise ValueError(f"data.folder={folder!r}: range [{start}, {end}) outside split "
                       f"{split!r} of {len(paths)}")
    if start == end:
      return _Slice(_empty_records(), 0, start, load_from_path=True)
    records = tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(paths[start:end], tf.string),
        "label": tf.constant(labels[start:end], tf.int64),
    })
    return _Slice(records, end - start, start, load_from_path=True)

  return Source("image_folder", len(class_names), num_examples, read_range)


def _imagenet_source(data_dir: str | None, manual_dir: str | None) -> Source:
  """TFDS imagenet2012, prepared from the manually downloaded tars if needed."""
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  if not builder.is_prepared():
    if manual_dir:
      where = f"data.manual_dir={os.path.expanduser(manual_dir)!r}"
    else:
      root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
      manual_dir = os.path.join(root, "downloads", "manual")
      where = f"the manual directory {manual_dir!r} (data.manual_dir unset)"
    manual_dir = os.path.expanduser(manual_dir)
    missing = [f for f in IMAGENET_TARS if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing:
      if tf.io.gfile.isdir(manual_dir):
        problem = (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
                   f"from {where}")
      else:
        problem = f"{where} does not exist"
      data_dir_state = ("" if data_dir is None or tf.io.gfile.isdir(data_dir)
                        else ", a directory that does not exist,")
      raise FileNotFoundError(
          f"imagenet2012 is not prepared in data.data_dir={data_dir!r}{data_dir_state} and "
          f"{problem}. Download "
          f"{' and '.join(IMAGENET_TARS)} from https://image-net.org (account required), put "
          f"them in {manual_dir} (or set data.manual_dir to their directory) and run again; "
          "preparation then takes a few hours, once.")
    # Several hosts preparing into one shared data_dir would race: prepare once
    # (e.g. on one host with process_count=1) before a multi-host run.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     try_download_gcs=False))
  return _tfds_source("imagenet2012", builder)


def resolve_source(data_config: Any) -> Source:
  """Maps `data_config.source` to a readable source, with actionable errors.

  Args:
    data_config: see `default_data_config`.

  Returns:
    A `Source`; `read_range(split, start, end)` reads source indices [start, end).
  """
  source = data_config.source
  if source == "builtin_digits":
    return _tfds_source(source, builtin.prepare(data_config.data_dir))
  if source == "image_folder":
    return _image_folder_source(data_config.folder)
  if source == "imagenet2012":
    return _imagenet_source(data_config.data_dir, data_config.manual_dir)
  raise ValueError(f"unknown data.source {source!r}; valid choices: {', '.join(SOURCES)}")


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
               min_image_size: int = preprocess.DEFAULT_MIN_IMAGE_SIZE) -> tf.Tensor:
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

  return decode


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
  ds = ds.filter(lambda ex: tf.equal(ex["skip"], 0))
  return ds.map(lambda ex: {k: ex[k] for k in keep})


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
  ds = ds.map(lambda index, source_index, record: decode(index, record),
              num_parallel_calls=_autotune(data_config.num_parallel_calls), deterministic=True)
  # Errors the checks do not foresee: dropped before counting, hence 'undecodable'.
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.scan(tf.zeros([_NUM_CHECKED + len(CONVERSIONS)], tf.int64), _count)
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
