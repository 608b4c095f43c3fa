"""Where the images of a split come from: the built-in digits, an image folder, ImageNet.

`resolve_source(data_config)` turns `config.data` into a `Source`: the number of
classes, the number of examples of each split, and `read_range(split, start, end)`,
the encoded records of source indices [start, end) in the split's canonical order
(TFDS's absolute order, read file by file; an image folder's class then file name
order). `Source.read_slice` gives a process its contiguous part of a split
(`record_order.even_split_bounds`). Decoding, the record order of training and
batching are `input_pipeline.py`'s.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
import os
from typing import Any, Callable

import tensorflow as tf
import tensorflow_datasets as tfds

from heptapod_jax.data import builtin
from heptapod_jax.data.record_order import even_split_bounds

SOURCES = ("builtin_digits", "image_folder", "imagenet2012")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# Same extensions as tfds.folder_dataset.ImageFolder.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FOLDER_LAYOUT = ("<folder>/<split>/<class_name>/<image>.jpg|.jpeg|.png, e.g. "
                  "<folder>/train/cat/0001.jpg")


@dataclasses.dataclass(frozen=True)
class Slice:
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
  # (split, start, end) -> Slice of source indices [start, end)
  read_range: Callable[[str, int, int], Slice]

  def read_slice(self, split: str, process_index: int, process_count: int) -> Slice:
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

  def read_range(split: str, start: int, end: int) -> Slice:
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
      return Slice(_empty_records(), 0, start, load_from_path=False)
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
    return Slice(records, end - start, start, load_from_path=False)

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

  def read_range(split: str, start: int, end: int) -> Slice:
    paths, labels = list_split(split)
    if not 0 <= start <= end <= len(paths):
      raise ValueError(f"data.folder={folder!r}: range [{start}, {end}) outside split "
                       f"{split!r} of {len(paths)}")
    if start == end:
      return Slice(_empty_records(), 0, start, load_from_path=True)
    records = tf.data.Dataset.from_tensor_slices({
        "image": tf.constant(paths[start:end], tf.string),
        "label": tf.constant(labels[start:end], tf.int64),
    })
    return Slice(records, end - start, start, load_from_path=True)

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
