"""Tests of the data package: built-in digits, preprocessing, tf.data input pipeline."""

import collections
import io
import json
import re

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from heptapod_jax.data import builtin
from heptapod_jax.data import input_pipeline
from heptapod_jax.data import preprocess


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builtin.prepare(data_dir)
  return data_dir


def _digits_config(data_dir, **overrides):
  config = input_pipeline.default_data_config()
  config.data_dir = data_dir
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _reference_digit(pixels_0_to_16):
  """The documented rendering, written independently of builtin.py."""
  gray = Image.fromarray(np.uint8(np.clip(np.rint(pixels_0_to_16 / 16.0 * 255.0), 0, 255)))
  gray = gray.resize((32, 32), resample=Image.Resampling.BICUBIC)
  return np.dstack([np.array(gray)] * 3)


def _adm_center_crop_arr(arr, image_size):
  """guided-diffusion's image_datasets.center_crop_arr, verbatim in PIL."""
  pil_image = Image.fromarray(arr)
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


# ----------------------------------------------------------------------------- builtin


def test_digits_builder_matches_sklearn(digits_dir):
  from sklearn.datasets import load_digits
  builder = tfds.builder("heptapod_digits", data_dir=digits_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1500
  assert builder.info.splits["test"].num_examples == 297
  assert builder.info.features["label"].num_classes == 10

  digits = load_digits()
  for split, (start, stop) in {"train": (0, 1500), "test": (1500, 1797)}.items():
    examples = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert len(examples) == stop - start
    assert all(ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
               for ex in examples)
    labels = np.array([ex["label"] for ex in examples])
    assert set(labels.tolist()) == set(range(10))
    # TFDS reorders examples when it writes them; compare as multisets.
    got = collections.Counter((ex["image"].tobytes(), int(ex["label"])) for ex in examples)
    want = collections.Counter(
        (_reference_digit(digits.images[i]).tobytes(), int(digits.target[i]))
        for i in range(start, stop))
    assert got == want, split

  # White digit on black, three equal channels.
  image = examples[0]["image"]
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  assert image.min() == 0 and image.max() > 200


# -------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("shape,size", [
    ((75, 131, 3), 16),   # two box halvings with odd sizes, then bicubic down
    ((190, 257, 3), 32),  # one halving, bicubic down, wide crop
    ((100, 37, 3), 8),    # portrait
    ((20, 27, 3), 32),    # bicubic upsampling, no halving
])
def test_center_crop_matches_adm_pil(shape, size):
  rng = np.random.default_rng(sum(shape) + size)
  noise = rng.integers(0, 256, shape, dtype=np.uint8)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  smooth = np.uint8(127 + 120 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 5.0)[..., None]
                    * np.ones(3))
  for image in (noise, smooth):
    want = _adm_center_crop_arr(image, size)
    got = preprocess.center_crop(tf.constant(image), size).numpy()
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    # Box halvings are exact. The bicubic pass differs by PIL's fixed-point
    # weights and, since Pillow 13, by PIL doing the vertical pass first for
    # some tall images (the uint8 intermediate then rounds differently).
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2, diff.max()
    assert diff.mean() < 0.5, diff.mean()


def test_decode_image_gray_and_alpha_to_rgb():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
  for array in (gray, rgba):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    decoded = preprocess.decode_image(tf.constant(buf.getvalue())).numpy()
    assert decoded.shape == (3, 4, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.array(Image.fromarray(array).convert("RGB")))


def test_range_conversions_and_flip():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=-1)
  x = preprocess.to_model_range(tf.constant(pixels)).numpy()
  assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(preprocess.to_uint8(x), pixels)
  np.testing.assert_array_equal(preprocess.to_uint8(np.array([-3.0, 3.0])), [0, 255])

  flips = []
  for s in range(16):
    seed = tf.constant([7, s], tf.int64)
    a = preprocess.random_flip(tf.constant(pixels), seed).numpy()
    np.testing.assert_array_equal(a, preprocess.random_flip(tf.constant(pixels), seed).numpy())
    assert np.array_equal(a, pixels) or np.array_equal(a, pixels[:, ::-1])
    flips.append(not np.array_equal(a, pixels))
  assert 0 < sum(flips) < 16


# ---------------------------------------------------------------------- train iterator


def test_same_seed_same_batches_different_seed_differs(digits_dir):
  config = _digits_config(digits_dir, augment="flip")
  make = lambda seed: input_pipeline.create_train_iterator(config, global_batch_size=16,
                                                           seed=seed)
  it = make(3)
  a, b, c = _take(it, 3), _take(make(3), 3), _take(make(4), 3)
  assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["image"].dtype == np.float32
  assert a[0]["label"].shape == (16,) and a[0]["label"].dtype == np.int32
  assert -1.0 <= a[0]["image"].min() and a[0]["image"].max() <= 1.0
  assert set(a[0]) == {"image", "label"}
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not all(np.array_equal(x["label"], z["label"]) for x, z in zip(a, c))
  assert it.num_classes == 10 and it.image_size == 32 and it.num_train_examples == 1500
  assert it.get_state() == {"position": 48, "num_skipped": 0}


def test_exact_resume_across_epoch_boundaries(digits_dir):
  # 24 records per epoch and 8 per batch: 5 batches cross the boundary twice.
  config = _digits_config(digits_dir, train_split="train[:24]", augment="flip")
  make = lambda state: input_pipeline.create_train_iterator(
      config, global_batch_size=8, seed=11, state=state)
  reference = _take(make(None), 5)
  first = make(None)
  _take(first, 2)
  state = json.loads(json.dumps(first.get_state()))
  assert state == {"position": 16, "num_skipped": 0}
  resumed = _take(make(state), 3)
  for want, got in zip(reference[2:], resumed):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  # Every epoch is a permutation of the same 24 examples, reshuffled per epoch.
  # Flips depend on the record index, so compare images up to mirroring.
  epoch = lambda batches: sorted(min(img.tobytes(), img[:, ::-1].tobytes())
                                 for b in batches for img in b["image"])
  sixth = next(make({"position": 40, "num_skipped": 0}))
  assert epoch(reference[:3]) == epoch(reference[3:5] + [sixth])
  assert not np.array_equal(reference[0]["label"], reference[3]["label"])


def test_process_slices_are_disjoint_and_cover_split(digits_dir):
  config = _digits_config(digits_dir)
  rows = lambda batches: collections.Counter(
      (img.tobytes(), int(label))
      for b in batches for img, label, m in zip(b["image"], b["label"], b["mask"]) if m)

  whole = list(input_pipeline.create_eval_dataset(config, batch_size=64, process_count=1,
                                                  process_index=0))
  parts = [input_pipeline.create_eval_dataset(config, batch_size=64, process_index=i,
                                              process_count=2) for i in range(2)]
  part_batches = [list(p) for p in parts]
  assert [p.num_local_examples for p in parts] == [149, 148]
  # Same number of batches everywhere, padded rows masked out, nothing lost.
  assert len(part_batches[0]) == len(part_batches[1]) == len(parts[0]) == 5
  assert [int(b["mask"].sum()) for b in part_batches[0]] == [32, 32, 32, 32, 21]
  assert [int(b["mask"].sum()) for b in part_batches[1]] == [32, 32, 32, 32, 20]
  assert sum(int(b["mask"].sum()) for b in whole) == 297
  assert rows(part_batches[0]) + rows(part_batches[1]) == rows(whole)

  # The training iterators read the same slices: one epoch of each covers the split.
  config = _digits_config(digits_dir, train_split="train[:24]")
  seen = []
  for i in range(2):
    it = input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0,
                                              process_index=i, process_count=2)
    assert it.num_local_examples == 12
    seen.append(collections.Counter(img.tobytes() for b in _take(it, 3) for img in b["image"]))
  all_24 = input_pipeline.create_train_iterator(config, global_batch_size=24, seed=5)
  assert seen[0] + seen[1] == collections.Counter(img.tobytes() for img in next(all_24)["image"])

  with pytest.raises(ValueError, match=r"\b10\b.*\b4\b"):
    input_pipeline.create_train_iterator(config, global_batch_size=10, seed=0, process_count=4,
                                         process_index=0)


# ------------------------------------------------------------------------ image folder


def _save(path, array, fmt):
  options = {"quality": 95} if fmt == "JPEG" else {}
  Image.fromarray(array).save(path, format=fmt, **options)


@pytest.fixture
def image_folder(tmp_path):
  """train/{cat,dog}: 6 valid images (one grayscale) plus a corrupt and a truncated JPEG."""
  root = tmp_path / "images"
  colors = {}
  valid = [
      ("cat", "a.png", (40, 60), (200, 30, 30), "PNG"),
      ("cat", "b.jpg", (50, 50), (30, 200, 30), "JPEG"),
      ("cat", "c.png", (33, 20), (90, 90, 90), "gray"),
      ("dog", "d.jpeg", (64, 48), (30, 30, 200), "JPEG"),
      ("dog", "e.PNG", (16, 16), (220, 220, 40), "PNG"),
      ("dog", "f.png", (70, 45), (10, 160, 160), "PNG"),
  ]
  for cls, name, (h, w), color, fmt in valid:
    (root / "train" / cls).mkdir(parents=True, exist_ok=True)
    if fmt == "gray":
      _save(root / "train" / cls / name, np.full((h, w), color[0], np.uint8), "PNG")
    else:
      _save(root / "train" / cls / name, np.full((h, w, 3), color, np.uint8), fmt)
    colors[name] = (cls, color)
  rng = np.random.default_rng(0)
  (root / "train" / "dog" / "corrupt.jpg").write_bytes(rng.bytes(300))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
  (root / "train" / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  return root, colors


def test_image_folder_skips_and_counts_broken_images(image_folder):
  root, colors = image_folder
  config = input_pipeline.default_data_config()
  config.source = "image_folder"
  config.folder = str(root)
  config.image_size = 8
  config.eval_split = "train"
  make = lambda state: input_pipeline.create_train_iterator(
      config, global_batch_size=6, seed=0, state=state)
  it = make(None)
  assert it.num_classes == 2 and it.num_train_examples == 8
  # Each batch is one epoch's six valid images: 8 records per epoch.
  batches = _take(it, 3)
  want = sorted((["cat", "dog"].index(cls), color) for cls, color in colors.values())
  for batch in batches:
    assert batch["image"].shape == (6, 8, 8, 3)
    got = sorted((int(label), tuple(int(c) for c in np.round(preprocess.to_uint8(img).mean((0, 1)))))
                 for img, label in zip(batch["image"], batch["label"]))
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, got_color), (_, want_color) in zip(got, want):
      assert np.abs(np.subtract(got_color, want_color)).max() <= 3
  state = it.get_state()
  # Three epochs of 8 records: the last may end with unread broken records.
  assert 22 <= state["position"] <= 24
  assert state["num_skipped"] == state["position"] - 18
  assert 4 <= state["num_skipped"] <= 6
  # Resume keeps counting.
  resumed = make(state)
  continued = next(it)
  after = next(resumed)
  np.testing.assert_array_equal(after["image"], continued["image"])
  assert resumed.get_state() == it.get_state()

  evaluated = list(input_pipeline.create_eval_dataset(config, batch_size=4))
  assert len(evaluated) == 2
  assert sum(int(b["mask"].sum()) for b in evaluated) == 6


def test_image_folder_errors_name_the_path(tmp_path):
  config = input_pipeline.default_data_config()
  config.source = "image_folder"
  missing = tmp_path / "nope"
  config.folder = str(missing)
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)
  empty = tmp_path / "empty"
  (empty / "train" / "cat").mkdir(parents=True)
  config.folder = str(empty)
  with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*<split>/<class_name>"):
    input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)


def test_source_errors(tmp_path):
  config = input_pipeline.default_data_config()
  config.source = "imagenet2012"
  config.data_dir = str(tmp_path / "tfds")
  config.manual_dir = str(tmp_path / "manual")
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "manual") in message

  config.source = "cifar"
  with pytest.raises(ValueError, match="builtin_digits.*image_folder.*imagenet2012"):
    input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0)


# ------------------------------------------------------------------------- global batch


def test_make_global_batch_on_fake_devices():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  local = {"image": rng.standard_normal((16, 4, 4, 3)).astype(np.float32),
           "label": np.arange(16, dtype=np.int32)}
  for shardings in (sharding, {"image": sharding, "label": sharding}):
    batch = input_pipeline.make_global_batch(local, shardings)
    assert batch["image"].shape == (16 * jax.process_count(), 4, 4, 3)
    assert batch["image"].sharding == sharding
    assert len(batch["image"].addressable_shards) == 8
    assert all(s.data.shape == (2, 4, 4, 3) for s in batch["image"].addressable_shards)
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
