"""Bad data: every kind of bad image is converted or skipped, counted per reason in the
data state (which survives resume), and a missing or empty data set stops at start-up."""

import collections
import io
import json
import re
import shutil

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from heptapod_jax.data import input_pipeline
from heptapod_jax.data import preprocess, record_order

SIZE = 16  # Good images are SIZE x SIZE: the center crop keeps their pixels.
BATCH = 3
SEED = 5


def _encode(image, fmt, **options):
  buf = io.BytesIO()
  image.save(buf, format=fmt, **options)
  return buf.getvalue()


def _smooth(offset):
  """A smooth RGB image (JPEG keeps it within a few levels), distinct per offset."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  return np.uint8(np.stack([40 + 9 * xx + offset, 30 + 11 * yy, 200 - 5 * (xx + yy) - offset],
                           axis=-1))


def _cmyk():
  """A smooth CMYK image with black (K) in use: PIL's RGB -> CMYK conversion leaves K at 0."""
  yy, xx = np.mgrid[:SIZE, :SIZE]
  cmyk = np.uint8(np.stack([10 + 12 * xx, 20 + 9 * yy, 200 - 6 * xx, 5 + 7 * (xx + yy)], -1))
  return Image.frombytes("CMYK", (SIZE, SIZE), cmyk.tobytes())


def _bad_files():
  """(class, file name, bytes, kind) of every file; kind is 'rgb', a conversion or a skip reason.

  One class per kind, so that the label says which file an example came from.
  """
  rng = np.random.default_rng(0)
  noise = lambda shape: rng.integers(0, 256, shape, dtype=np.uint8)
  rgb_png = _encode(Image.fromarray(noise((SIZE, SIZE, 3))), "PNG")
  big_jpeg = _encode(Image.fromarray(noise((48, 48, 3))), "JPEG", quality=90)
  big_png = _encode(Image.fromarray(noise((48, 48, 3))), "PNG")
  # Valid start, scan and end markers but no frame header: only the decoder notices.
  no_frame = (b"\xff\xd8\xff\xfe\x00\x10" + bytes(14) + b"\xff\xda\x00\x08" + bytes(6)
              + bytes(range(1, 200)) + b"\xff\xd9")
  files = [
      ("c00_rgb_png", "a.png", rgb_png, "rgb"),
      ("c01_rgb_jpeg", "a.jpg", _encode(Image.fromarray(_smooth(0)), "JPEG", quality=95), "rgb"),
      ("c02_gray_png", "a.png", _encode(Image.fromarray(noise((SIZE, SIZE))), "PNG"),
       "grayscale"),
      ("c03_gray_jpeg", "a.jpeg",
       _encode(Image.fromarray(_smooth(10)).convert("L"), "JPEG", quality=95), "grayscale"),
      ("c04_cmyk_jpeg", "a.jpg", _encode(_cmyk(), "JPEG", quality=95), "cmyk"),
      ("c05_rgba_png", "a.png", _encode(Image.fromarray(noise((SIZE, SIZE, 4))), "PNG"),
       "alpha"),
      ("c06_palette_png", "a.png",
       _encode(Image.fromarray(noise((SIZE, SIZE, 3))).quantize(16), "PNG"), "palette"),
      ("c07_corrupt", "bytes.jpg", rng.bytes(300), "corrupt"),
      ("c07_corrupt", "empty.png", b"", "corrupt"),
      ("c08_truncated_jpeg", "a.jpg", big_jpeg[:len(big_jpeg) // 2], "truncated"),
      ("c09_truncated_png", "a.png", big_png[:len(big_png) * 2 // 3], "truncated"),
      ("c10_tiny", "a.png", _encode(Image.fromarray(noise((2, 2, 3))), "PNG"), "too_small"),
      ("c11_no_frame", "a.jpg", no_frame, "undecodable"),
  ]
  return sorted(files)  # Source order: class, then file name.


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_data") / "images"
  files = _bad_files()
  for cls, name, data, _ in files:
    (root / "train" / cls).mkdir(parents=True, exist_ok=True)
    (root / "train" / cls / name).write_bytes(data)
  classes = sorted({f[0] for f in files})
  # label -> PIL's RGB version of the class's file, for the kept classes.
  reference = {classes.index(cls): np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
               for cls, _, data, kind in files
               if kind == "rgb" or kind in input_pipeline.CONVERSIONS}
  kinds = [kind for _, _, _, kind in files]
  label_kind = {classes.index(cls): kind for cls, _, _, kind in files}
  jpeg_labels = {classes.index(cls) for cls, name, _, _ in files
                 if name.endswith((".jpg", ".jpeg"))}
  return root, kinds, label_kind, reference, jpeg_labels


def _config(root, **overrides):
  config = input_pipeline.default_data_config()
  config.source = "image_folder"
  config.folder = str(root)
  config.image_size = SIZE
  config.eval_split = "train"
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _stream_sources(config, num_examples, count):
  """Source index of records 0..count-1 of the training stream (its documented order)."""
  order = record_order.train_record_order(config, num_examples=num_examples, seed=SEED,
                                            process_index=0, process_count=1)
  return [int(source) for _, source in order.stream().take(count).as_numpy_iterator()]


def _expected_counts(kinds, sources, position, emitted_kinds):
  skipped = collections.Counter(kinds[s] for s in sources[:position]
                                if kinds[s] in input_pipeline.SKIP_REASONS)
  converted = collections.Counter(k for k in emitted_kinds if k in input_pipeline.CONVERSIONS)
  return dict(skipped), dict(converted)


def test_bad_images_converted_or_skipped_counted_and_resumed(bad_folder):
  root, kinds, label_kind, reference, jpeg_labels = bad_folder
  config = _config(root)
  make = lambda state: input_pipeline.create_train_iterator(
      config, global_batch_size=BATCH, seed=SEED, state=state)
  it = make(None)
  num_records = len(kinds)
  num_good = sum(k == "rgb" or k in input_pipeline.CONVERSIONS for k in kinds)
  assert it.num_train_examples == num_records and (num_records, num_good) == (13, 7)
  num_batches = 3 * num_good // BATCH  # Three epochs of kept images.
  sources = _stream_sources(config, num_records, 4 * num_records)
  good_stream = [i for i, s in enumerate(sources) if s not in
                 {j for j, k in enumerate(kinds) if k in input_pipeline.SKIP_REASONS}]

  batches, states, labels = [], [], []
  for b in range(num_batches):
    batch = next(it)
    batches.append(batch)
    labels.extend(int(l) for l in batch["label"])
    state = json.loads(json.dumps(it.get_state()))
    states.append(state)
    # Kept records arrive in stream order; the position counts the skipped ones too.
    assert state["position"] == good_stream[len(labels) - 1] + 1
    skipped, converted = _expected_counts(kinds, sources, state["position"],
                                          [label_kind[l] for l in labels])
    assert state.get("skipped", {}) == skipped, (b, state)
    assert state.get("converted", {}) == converted, (b, state)
    assert state["num_skipped"] == sum(skipped.values()) == state["position"] - len(labels)

  # Every kept image arrives once per epoch, with the pixels of PIL's RGB conversion.
  for epoch in range(3):
    assert sorted(labels[epoch * num_good:(epoch + 1) * num_good]) == sorted(reference)
  for batch in batches[:num_good // BATCH + 1]:
    for image, label in zip(batch["image"], batch["label"]):
      got, want = preprocess.to_uint8(image), reference[int(label)]
      lossy = int(label) in jpeg_labels
      diff = np.abs(got.astype(int) - want.astype(int))
      # PNG is exact; TensorFlow's and PIL's JPEG decoders round differently.
      assert diff.max() <= (8 if lossy else 0), (label_kind[int(label)], diff.max())
      assert diff.mean() <= (3 if lossy else 0), (label_kind[int(label)], diff.mean())

  final = states[-1]
  assert set(final["skipped"]) == {"corrupt", "truncated", "too_small", "undecodable"}
  assert final["skipped"]["corrupt"] >= 4 and final["skipped"]["truncated"] >= 4
  assert set(final["converted"]) == {"grayscale", "cmyk", "alpha", "palette"}
  assert input_pipeline.count_metrics(final) == {
      **{f"skipped_{r}": final["skipped"][r] for r in input_pipeline.SKIP_REASONS},
      **{f"converted_{c}": final["converted"][c] for c in input_pipeline.CONVERSIONS}}

  # Checkpoint-style resume: same batches, counts continue.
  k = 2
  resumed = make(states[k - 1])
  for b in range(k, num_batches):
    batch = next(resumed)
    np.testing.assert_array_equal(batch["image"], batches[b]["image"])
    np.testing.assert_array_equal(batch["label"], batches[b]["label"])
    assert resumed.get_state() == states[b]

  # A state of an older checkpoint (no per-reason counts): its skips become 'undecodable'.
  legacy = {"position": states[k - 1]["position"], "num_skipped": states[k - 1]["num_skipped"]}
  resumed = make(legacy)
  for b in range(k, k + 2):
    np.testing.assert_array_equal(next(resumed)["label"], batches[b]["label"])
  state, before = resumed.get_state(), states[k - 1]
  assert state["position"] == states[k + 1]["position"]
  assert state["num_skipped"] == states[k + 1]["num_skipped"]
  for reason in ("corrupt", "truncated", "too_small"):
    assert state["skipped"].get(reason, 0) == (states[k + 1]["skipped"].get(reason, 0)
                                               - before["skipped"].get(reason, 0))
  assert sum(state["skipped"].values()) == state["num_skipped"]

  with pytest.raises(ValueError, match="adds up to"):
    make({"position": 10, "num_skipped": 3, "skipped": {"corrupt": 1}})
  with pytest.raises(ValueError, match="bogus"):
    make({"position": 10, "num_skipped": 3, "skipped": {"bogus": 3}})


def test_eval_and_load_image_skip_the_same_images(bad_folder):
  root, kinds, _, reference, _ = bad_folder
  config = _config(root)
  evaluated = list(input_pipeline.create_eval_dataset(config, batch_size=8))
  labels = sorted(int(l) for b in evaluated for l, m in zip(b["label"], b["mask"]) if m)
  assert labels == sorted(reference)

  # The pre-tokenizer's loader raises on exactly the skipped records, naming the reason.
  paths = [str(root / "train" / cls / name) for cls, name, _, _ in _bad_files()]
  load = tf.function(lambda path: input_pipeline.load_image({"image": path}, True))
  for path, kind in zip(paths, kinds):
    if kind in input_pipeline.SKIP_REASONS:
      message = f"image skipped:.*{kind}" if kind != "undecodable" else None
      with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        load(tf.constant(path))
    else:
      assert load(tf.constant(path)).shape == (SIZE, SIZE, 3)

  # data.min_image_size decides what is too small; 0 keeps the 2x2 image.
  config.min_image_size = 2
  evaluated = list(input_pipeline.create_eval_dataset(config, batch_size=8))
  assert sum(int(b["mask"].sum()) for b in evaluated) == len(reference) + 1


def test_missing_or_empty_image_folder_stops_with_the_path(tmp_path):
  def fails(folder, error, pattern):
    config = _config(folder)
    with pytest.raises(error, match=re.escape(f"data.folder={str(folder)!r}") + pattern):
      input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)
    with pytest.raises(error, match=re.escape(str(folder))):
      input_pipeline.create_eval_dataset(config, batch_size=2)

  fails(tmp_path / "missing", FileNotFoundError, ": directory does not exist")
  (tmp_path / "file").write_text("")
  fails(tmp_path / "file", FileNotFoundError, ": is a file, not a directory")
  (tmp_path / "empty").mkdir()
  fails(tmp_path / "empty", ValueError, " contains no images in class sub-directories \\(it is "
        "empty\\).*<split>/<class_name>")
  flat = tmp_path / "flat" / "train"
  flat.mkdir(parents=True)
  Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(flat / "a.png")
  fails(tmp_path / "flat", ValueError, " contains no images in class sub-directories \\(it "
        "holds 1 entries: train\\)")


def test_incomplete_tfds_directory_and_missing_manual_dir_stop_with_the_path(
    tmp_path, digits_dir):
  data_dir = tmp_path / "tfds"
  shutil.copytree(digits_dir, data_dir)
  [shard] = [p for p in data_dir.glob("heptapod_digits/*/*train.tfrecord*")]
  shard.unlink()
  config = input_pipeline.default_data_config()
  config.data_dir = str(data_dir)
  with pytest.raises(FileNotFoundError, match=re.escape(str(shard.parent)) + ".*"
                     + re.escape(str(shard))):
    input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)
  # The test split is intact.
  assert len(input_pipeline.create_eval_dataset(config, batch_size=64)) == 5

  config = input_pipeline.default_data_config()
  config.source = "imagenet2012"
  config.data_dir = str(tmp_path / "no_tfds")
  config.manual_dir = str(tmp_path / "no_manual")
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"data.manual_dir={str(tmp_path / 'no_manual')!r} does not exist")):
    input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)


def test_training_logs_the_per_reason_counts(bad_folder, tmp_path):
  """The trainer writes the counts as data/skipped_<reason> and data/converted_<kind> metrics."""
  import glob
  import os
  import _harness as h
  from heptapod_jax.training import train
  root, kinds, _, _, _ = bad_folder
  c = h.config(2, str(tmp_path / "unused"), **{
      "data.source": "image_folder", "data.folder": str(root), "data.image_size": SIZE,
      "data.train_split": "train", "data.eval_split": "train", "tokenizer.patch": SIZE // 4,
      "model.grid_size": (4, 4), "model.num_classes": 12, "train.log_every": 1})
  summary = train.train_and_evaluate(c, str(tmp_path / "wd"))
  counts = summary["data"]
  for kind in set(kinds):
    if kind in input_pipeline.SKIP_REASONS:
      assert counts[f"skipped_{kind}"] >= 1, (kind, counts)
    elif kind in input_pipeline.CONVERSIONS:
      assert counts[f"converted_{kind}"] >= 1, (kind, counts)
  tags = set()
  for path in glob.glob(os.path.join(tmp_path, "wd", "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(v.tag for v in event.summary.value)
  assert {"data/skipped_corrupt", "data/skipped_truncated", "data/converted_cmyk"} <= tags
