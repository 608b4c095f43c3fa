"""Where the images of a split come from: the built-in digits, an image folder, any TFDS data set.

`resolve_source(data_config)` turns `config.data` into a `Source`: the number of
classes, the number of examples of each split, and `read_range(split, start, end)`,
the encoded records of source indices [start, end) in the split's canonical order
(TFDS's absolute order, read file by file; an image folder's class then file name
order). `Source.read_slice` gives a process its contiguous part of a split
(`record_order.even_split_bounds`: the slices of `tfds.even_splits`). Decoding,
the record order of training and batching are `input_pipeline.py`'s.

`data.source='tfds'` reads any TFDS image data set by `data.name` ('cifar10',
'oxford_flowers102', 'imagenette/320px', 'name:version'): the image and label
features are the builder's single `Image` and single `ClassLabel` feature unless
`data.image_key` / `data.label_key` name them; without a `ClassLabel` (or with
`data.label_key=''`) the data set is one class (unconditional training). The data
set must be prepared in `data.data_dir` (`tfds build NAME --data_dir=DIR`): nothing
is downloaded at run time. `imagenet2012` (also `data.source='imagenet2012'`) is
prepared from its manually downloaded tars.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import os
from typing import Any, Callable

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from heptapod_jax.data import builtin
from heptapod_jax.data.record_order import even_split_bounds, traced_as_written
from heptapod_jax.data.schema import SOURCES

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


def _tfds_source(name: str, builder: tfds.core.DatasetBuilder, image_key: str = "image",
                 label_key: str | None = "label") -> Source:
  """Wraps a TFDS builder: records {'image': encoded bytes of `image_key`, 'label': `label_key`}
  (label 0 for every record when `label_key` is None).

  A prepared builder knows its split sizes and reads a range as a `ReadInstruction`
  (only the files it needs). A builder without recorded split sizes (TFDS's own mock
  in tests, or a builder that can read without being prepared) is counted once per split
  and its range cut from the split's stream in order.
  """
  num_classes = builder.info.features[label_key].num_classes if label_key else 1
  known_sizes = len(builder.info.splits) > 0
  decoders = {image_key: tfds.decode.SkipDecoding()}
  # An auto-cache would be filled by the first (possibly partial) epoch. Cycle length 1
  # reads the files one after the other, in the canonical order that source indices (and
  # pre-tokenized shards) refer to; the default interleaves 16 files and the order would
  # depend on the range.
  read_config = tfds.ReadConfig(try_autocache=False, add_tfds_id=False, interleave_cycle_length=1)

  def as_dataset(split) -> tf.data.Dataset:
    records = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                 read_config=read_config)
    if label_key:
      return records.map(traced_as_written(
          lambda ex: {"image": ex[image_key], "label": ex[label_key]}))
    return records.map(traced_as_written(
        lambda ex: {"image": ex[image_key], "label": tf.constant(0, tf.int64)}))

  @functools.lru_cache(maxsize=None)
  def counted(split: str) -> int:
    n = int(as_dataset(split).cardinality())
    if n < 0:  # Unknown cardinality: count the records once.
      n = int(as_dataset(split).reduce(0, lambda count, _: count + 1))
    return n

  def num_examples(split: str) -> int:
    if not known_sizes:
      return counted(split)
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
    if not known_sizes:
      if start == end:
        return Slice(_empty_records(), 0, start, load_from_path=False)
      return Slice(as_dataset(split).skip(start).take(end - start), end - start, start,
                   load_from_path=False)
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
    return Slice(as_dataset(functools.reduce(operator.add, pieces)), end - start, start,
                 load_from_path=False)

  return Source(name, num_classes, num_examples, read_range)


def _feature_keys(name: str, features: Any, image_key: str | None,
                  label_key: str | None) -> tuple[str, str | None]:
  """(image feature, label feature or None) of a TFDS builder, checked or found."""
  kinds = {k: type(f).__name__ for k, f in features.items()}
  images = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Image))
  labels = sorted(k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel))

  def check(field: str, key: str, kind: str, allowed: list[str], hint: str = '') -> None:
    if key not in features:
      raise ValueError(f"data.{field}={key!r} is not a feature of {name} (features: {kinds}).")
    if key not in allowed:
      raise ValueError(f"data.{field}={key!r} is a {kinds[key]} feature of {name}, not a"
                       f"{'n' if kind[0] in 'AEIOU' else ''} {kind}; its {kind} features: "
                       f"{allowed or 'none'}{hint}.")

  if image_key:
    check('image_key', image_key, 'Image', images)
  elif len(images) == 1:
    image_key = images[0]
  elif not images:
    raise ValueError(f"data.name={name!r} has no Image feature (features: {kinds}): not an "
                     "image data set.")
  else:
    raise ValueError(f"data.name={name!r} has several Image features {images}; set "
                     "data.image_key to the one to train on.")
  if label_key == "":  # Asked for: no labels.
    return image_key, None
  if label_key:
    check('label_key', label_key, 'ClassLabel', labels, " (data.label_key='' trains without labels)")
    return image_key, label_key
  if len(labels) > 1:
    raise ValueError(f"data.name={name!r} has several ClassLabel features {labels}; set "
                     "data.label_key to the one to condition on ('' for none).")
  return image_key, (labels[0] if labels else None)


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """`tfds.builder(name)` with errors that name data.name and what is registered."""
  base = name.split(":")[0].split("/")[0]
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(base, tfds.list_builders(), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    raise ValueError(f"data.name={name!r}: {base!r} is not a data set registered in "
                     f"tensorflow-datasets {tfds.__version__}{hint} The catalog: "
                     "https://www.tensorflow.org/datasets/catalog/overview") from None
  except (ValueError, AssertionError) as e:  # A config or version the builder does not have.
    raise ValueError(f"data.name={name!r}: {e}") from None


def _check_prepared(name: str, builder: tfds.core.DatasetBuilder, data_dir: str | None,
                    split: str) -> None:
  """A data set that is not prepared stops with the command that prepares it."""
  if builder.is_prepared():
    return
  try:  # A builder that reads without being prepared (TFDS's mock) is fine.
    builder.as_dataset(split=split)
    return
  except Exception:  # pylint: disable=broad-except  (TFDS raises AssertionError or others)
    pass
  root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  command = f"tfds build {name} --data_dir={root}"
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    command += " --manual_dir=DIR"
  raise FileNotFoundError(
      f"data.name={name!r} is not prepared in data.data_dir={data_dir!r} (looked for "
      f"{builder.data_dir}); nothing is downloaded at run time. Prepare it once, on a machine "
      f"with internet access: `{command}` (in Colab: `!{command}`)"
      + (f", DIR holding the manual download: {' '.join(str(manual).split())}" if manual else "")
      + ", then run again.")


def _named_tfds_source(data_config: Any) -> Source:
  """`data.source='tfds'`: the data set `data.name`, prepared in `data.data_dir`."""
  name = getattr(data_config, "name", None)
  if not name:
    raise ValueError("data.source='tfds' needs data.name, a TFDS name such as 'cifar10', "
                     "'oxford_flowers102' or 'imagenette/320px' (optionally 'name:version').")
  if name.split(":")[0].split("/")[0] == "imagenet2012":
    return _imagenet_source(data_config.data_dir, data_config.manual_dir, name)
  builder = _tfds_builder(name, data_config.data_dir)
  image_key, label_key = _feature_keys(name, builder.info.features,
                                       getattr(data_config, "image_key", None),
                                       getattr(data_config, "label_key", None))
  _check_prepared(name, builder, data_config.data_dir, data_config.train_split)
  if label_key is None:
    logging.warning("%s: no class labels (%s): training unconditionally, every image is "
                    "class 0 (model.num_classes=1).", name,
                    "data.label_key=''" if getattr(data_config, "label_key", None) == ""
                    else "no ClassLabel feature")
  return _tfds_source(name, builder, image_key, label_key)


def source_id(data_config: Any) -> str:
  """What the records come from, for metadata that must not mix data sets: data.source, or
  'tfds:<data.name>' for a TFDS data set by name."""
  if data_config.source == "tfds":
    return f"tfds:{data_config.name}"
  return data_config.source


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


def _imagenet_source(data_dir: str | None, manual_dir: str | None,
                     name: str = "imagenet2012") -> Source:
  """TFDS imagenet2012 (or `name`, a version of it), prepared from the manually downloaded
  tars if needed."""
  builder = _tfds_builder(name, data_dir)
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
  return _tfds_source(name, builder)


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
  if source == "tfds":
    return _named_tfds_source(data_config)
  raise ValueError(f"unknown data.source {source!r}; valid choices: {', '.join(SOURCES)}")
