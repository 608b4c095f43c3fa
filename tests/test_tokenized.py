"""Tests of pre-tokenized training data: ten-crop views, tokenize_dataset and the reader."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import ml_dtypes
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from heptapod_jax.data import builtin, codes_format
from heptapod_jax.data import input_pipeline, sources
from heptapod_jax.data import preprocess, record_order, schema
from heptapod_jax.data import tokenized
from heptapod_jax.models.tokenizers import kl
from heptapod_jax.storage import tokenizer_checkpoint as tokenizer_io
from heptapod_jax.storage.tokenizer_checkpoint import make_tokenizer
from heptapod_jax.tools.tokenize_dataset import tokenize_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = 'train[:40]'  # 40 records: global batches of 16 cross epochs within a few steps.
SHARD_SIZE = 16  # -> shards of 16, 16 and 8 examples.


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builtin.prepare(data_dir)
  return data_dir


def _config(data_dir, levels=16, **data_overrides):
  """Experiment config with the fields tokenize_dataset reads: data and tokenizer."""
  data = schema.default_data_config()
  data.data_dir = data_dir
  data.train_split = SPLIT
  data.augment = 'ten_crop'
  data.shuffle_buffer = 16  # Smaller than the split: the buffered shuffle is exercised.
  for key, value in data_overrides.items():
    data[key] = value
  tokenizer = ml_collections.ConfigDict(
      {'kind': 'pixel', 'patch': 4, 'levels': levels, 'checkpoint': ''})
  return ml_collections.ConfigDict({'data': data, 'tokenizer': tokenizer})


def _tokenize(config, out_dir, **kwargs):
  kwargs = {'variants': 'ten_crop', 'shard_size': SHARD_SIZE, 'batch_size': 64, **kwargs}
  return tokenize_dataset(config, str(out_dir), **kwargs)


@pytest.fixture(scope='module')
def reference_dir(digits_dir, tmp_path_factory):
  """SPLIT tokenized in one uninterrupted single-process run."""
  out = tmp_path_factory.mktemp('tokenized')
  result = _tokenize(_config(digits_dir), out)
  assert result['written'] == [0, 1, 2] and result['metadata'] is not None
  return str(out)


def _shards(directory):
  return sorted(f for f in os.listdir(directory) if f.startswith('codes-'))


def _assert_same_shards(dir_a, dir_b):
  assert _shards(dir_a) == _shards(dir_b) == ['codes-00000.npz', 'codes-00001.npz',
                                              'codes-00002.npz']
  keys = ('codes', 'labels', 'source_index', 'header')
  for name in _shards(dir_a):
    a = codes_format.load_shard(os.path.join(dir_a, name), keys)
    b = codes_format.load_shard(os.path.join(dir_b, name), keys)
    for key in keys[:3]:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name}:{key}')
      assert a[key].dtype == b[key].dtype
    assert a['header'] == b['header']
  assert codes_format.read_metadata(dir_a) == codes_format.read_metadata(dir_b)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------------------------- views


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


def _np_five_crop(a, s):
  """torchvision.transforms.functional.five_crop on an HWC array (checked against it)."""
  h, w = a.shape[:2]
  top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
  return [a[:s, :s], a[:s, w - s:], a[h - s:, :s], a[h - s:, w - s:], a[top:top + s, left:left + s]]


def _np_ten_crop(a, s):
  """torchvision's TenCrop(s): five crops of the image, then of its mirror image."""
  return _np_five_crop(a, s) + _np_five_crop(a[:, ::-1], s)


def _llamagen_views(arr, size):
  """LlamaGen's extract_codes transform: center_crop_arr to int(1.1 * size), TenCrop(size)."""
  return np.stack(_np_ten_crop(_adm_center_crop_arr(arr, int(size * 1.1)), size))


def test_ten_crop_views_match_pil_reference():
  rng = np.random.default_rng(0)
  # The crop selection alone is exact, on the sizes where torchvision's center
  # offset rounds a half to even: 17 -> 16 starts at 0, 35 -> 32 at 2, 23 -> 16 at 4.
  for shape, size in (((17, 17), 16), ((35, 35), 32), ((20, 23), 16)):
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    got = preprocess.ten_crop(tf.constant(image), size).numpy()
    np.testing.assert_array_equal(got, np.stack(_np_ten_crop(image, size)))

  yy, xx = np.mgrid[:45, :60]
  smooth = np.uint8(127 + 120 * np.sin(xx / 3.0)[..., None] * np.cos(yy / 5.0)[..., None]
                    * np.ones(3))
  noise = rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)
  for image in (smooth, noise):
    for size in (16, 32):  # 1.1x: one box halving then bicubic down; bicubic up.
      views = preprocess.augmented_views(tf.constant(image), size, 'ten_crop').numpy()
      want = _llamagen_views(image, size)
      assert views.shape == (10, size, size, 3) and views.dtype == np.uint8
      # Within the bicubic resize's PIL tolerance (see test_data's center crop test).
      diff = np.abs(views.astype(int) - want.astype(int))
      assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
      # Exactly the crops of the 1.1x center crop this module computes.
      big = preprocess.center_crop(tf.constant(image), preprocess.ten_crop_size(size)).numpy()
      np.testing.assert_array_equal(views, np.stack(_np_ten_crop(big, size)))

  # One view at a time (the image pipeline) equals the all-views tensor (the tool).
  image = tf.constant(smooth)
  for augment, names in schema.VARIANT_NAMES.items():
    views = preprocess.augmented_views(image, 16, augment).numpy()
    assert len(views) == len(names)
    for v in range(len(names)):
      np.testing.assert_array_equal(preprocess.augmented_view(image, 16, augment, v).numpy(),
                                    views[v])
  center = preprocess.center_crop(image, 16).numpy()
  np.testing.assert_array_equal(preprocess.augmented_views(image, 16, 'flip').numpy(),
                                np.stack([center, center[:, ::-1]]))


# ------------------------------------------------------------------------ source order


def test_ranges_follow_the_canonical_order_across_files(tmp_path):
  # Shards and process slices refer to source indices: any range must read the
  # same examples as that range of the whole split, also when the split spans
  # several files (TFDS interleaves 16 files by default) or several parts.
  builder = builtin.HeptapodDigits(data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=4, try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  config = schema.default_data_config()
  config.data_dir = str(tmp_path)
  source = sources.resolve_source(config)
  read = lambda split, a, b: [r['image'] for r in
                              source.read_range(split, a, b).records.as_numpy_iterator()]
  train, test = read('train', 0, 1500), read('test', 0, 297)
  for a, b in ((0, 400), (370, 760), (1100, 1500)):
    assert read('train', a, b) == train[a:b], (a, b)
  split = 'train[10:20]+test[:5]+train[:3]'
  whole = train[10:20] + test[:5] + train[:3]
  assert source.num_examples(split) == 18 and read(split, 0, 18) == whole
  for a, b in ((5, 12), (9, 18), (14, 15)):
    assert read(split, a, b) == whole[a:b], (a, b)


# ------------------------------------------------------------------------------ the tool


def test_shards_hold_source_order_and_metadata(reference_dir, digits_dir):
  metadata = codes_format.read_metadata(reference_dir)
  assert metadata['num_examples'] == 40 and metadata['num_shards'] == 3
  assert metadata['num_kept'] == 40 and metadata['num_skipped'] == 0
  assert metadata['variant_names'] == list(schema.VARIANT_NAMES['ten_crop'])
  assert metadata['grid_size'] == [8, 8] and metadata['vocab_size'] == 16
  assert metadata['dtype'] == 'int16' and metadata['payload'] == 'codes'
  # The pixel tokenizer has no weights: the fingerprint of nothing is sha256 of no bytes.
  assert metadata['tokenizer'] == {'kind': 'pixel', 'patch': 4, 'levels': 16, 'checkpoint': '',
                                   'weights_sha256': hashlib.sha256(b'').hexdigest()}

  source = tfds.builder('heptapod_digits', data_dir=digits_dir).as_dataset(
      split=SPLIT, shuffle_files=False)
  images = [ex['image'] for ex in source.as_numpy_iterator()]
  labels = [ex['label'] for ex in source.as_numpy_iterator()]
  tokenizer, params = make_tokenizer(_config(digits_dir).tokenizer, 32)
  for shard in range(3):
    data = codes_format.load_shard(codes_format.shard_path(reference_dir, shard))
    start, end = shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, 40)
    assert data['codes'].shape == (end - start, 10, 8, 8) and data['codes'].dtype == np.int16
    np.testing.assert_array_equal(data['source_index'], np.arange(start, end))
    np.testing.assert_array_equal(data['labels'], labels[start:end])
  # Row 3 of shard 1 is source example 19; its codes are those of its ten views.
  views = preprocess.augmented_views(tf.constant(images[19]), 32, 'ten_crop')
  want = tokenizer.encode_to_indices(params, preprocess.to_model_range(views).numpy())
  np.testing.assert_array_equal(codes_format.load_shard(codes_format.shard_path(reference_dir, 1))
                                ['codes'][3], want)


def test_interrupted_tokenization_resumes_without_rewriting(digits_dir, reference_dir, tmp_path):
  out = tmp_path / 'resumed'
  first = _tokenize(_config(digits_dir), out, max_shards=1)
  assert first == {'written': [0], 'skipped': [], 'metadata': None}
  assert not (out / codes_format.METADATA_FILE).exists()
  # A crash mid-write leaves only a temporary file behind.
  (out / 'codes-00001.npz.tmp').write_bytes(b'partial')
  old = 1_000_000_000
  os.utime(out / 'codes-00000.npz', (old, old))

  second = _tokenize(_config(digits_dir), out)
  assert second['written'] == [1, 2] and second['skipped'] == [0]
  assert os.stat(out / 'codes-00000.npz').st_mtime == old
  assert not (out / 'codes-00001.npz.tmp').exists()
  _assert_same_shards(str(out), reference_dir)

  third = _tokenize(_config(digits_dir), out)  # Complete: nothing to do.
  assert third['written'] == [] and third['metadata'] == second['metadata']


def test_two_processes_split_the_shards(digits_dir, reference_dir, tmp_path):
  out = tmp_path / 'two'
  p0 = _tokenize(_config(digits_dir), out, process_index=0, process_count=2)
  assert p0['written'] == [0, 2] and p0['metadata'] is None
  p1 = _tokenize(_config(digits_dir), out, process_index=1, process_count=2)
  assert p1['written'] == [1] and p1['metadata'] is not None  # The last one completes it.
  _assert_same_shards(str(out), reference_dir)


def test_settings_mismatch_names_the_field(digits_dir, reference_dir, tmp_path):
  match = r'metadata\.json.*tokenizer\.levels=16.*tokenizer\.levels=8'
  with pytest.raises(ValueError, match=match):
    _tokenize(_config(digits_dir, levels=8), reference_dir)
  with pytest.raises(ValueError, match=r'shard_size=16 .*shard_size=8'):
    _tokenize(_config(digits_dir), reference_dir, shard_size=8)
  # Partial directory (no metadata yet): the shard headers protect it.
  out = tmp_path / 'partial'
  _tokenize(_config(digits_dir), out, max_shards=1)
  with pytest.raises(ValueError, match=r'codes-00000\.npz.*tokenizer\.levels'):
    _tokenize(_config(digits_dir, levels=8), out)

  # The reader checks the data settings, the trainer the tokenizer.
  config = _config(digits_dir, tokenized_dir=reference_dir, augment='flip')
  match = r"data\.augment='flip'.*augment='ten_crop'.*--variants=flip"
  with pytest.raises(ValueError, match=match):
    input_pipeline.create_train_iterator(config.data, global_batch_size=8, seed=0)
  config = _config(digits_dir, augment='mirror')
  with pytest.raises(ValueError, match=r"data\.augment='mirror' is not one of.*ten_crop"):
    input_pipeline.create_train_iterator(config.data, global_batch_size=8, seed=0)
  config = _config(digits_dir, tokenized_dir=reference_dir, train_split='train')
  with pytest.raises(ValueError, match=r'data\.train_split'):
    input_pipeline.create_train_iterator(config.data, global_batch_size=8, seed=0)
  metadata = codes_format.read_metadata(reference_dir)
  codes_format.check_tokenizer(metadata, _config(digits_dir).tokenizer)
  with pytest.raises(ValueError, match=r'config\.tokenizer\.levels=8.*levels=16'):
    codes_format.check_tokenizer(metadata, _config(digits_dir, levels=8).tokenizer)
  with pytest.raises(FileNotFoundError, match='metadata.json'):
    tokenized.open_metadata(str(out))


def test_codes_of_retrained_tokenizer_weights_are_refused():
  """Same config, other weights (a tokenizer retrained at the same path): the fingerprint differs."""
  rng = np.random.default_rng(0)
  params = {'enc': {'kernel': rng.normal(size=(3, 4)).astype(np.float32)},
            'codebook': rng.normal(size=(8, 2)).astype(np.float32)}
  fingerprint = codes_format.weights_fingerprint(params)
  reordered = {'codebook': params['codebook'].copy(), 'enc': {'kernel': params['enc']['kernel']}}
  assert codes_format.weights_fingerprint(reordered) == fingerprint
  assert codes_format.weights_fingerprint(jax.device_put(params)) == fingerprint
  retrained = {**params, 'codebook': params['codebook'].copy()}
  retrained['codebook'][3, 1] = np.nextafter(retrained['codebook'][3, 1], np.float32(9))
  assert codes_format.weights_fingerprint(retrained) != fingerprint
  as_f16 = jax.tree.map(lambda a: a.astype(np.float16), params)
  assert codes_format.weights_fingerprint(as_f16) != fingerprint
  tok = ml_collections.ConfigDict({'kind': 'vq', 'checkpoint': '/ckpt/tokenizer'})
  header = lambda **kw: codes_format.make_header(  # noqa: E731
      source='builtin_digits', split='train', num_examples=10, num_classes=10, image_size=32,
      variants='center', tokenizer_config=tok, grid_size=(8, 8), vocab_size=8, shard_size=10, **kw)
  metadata = header(weights_sha256=fingerprint)
  assert metadata['tokenizer']['weights_sha256'] == fingerprint
  codes_format.check_tokenizer(metadata, tok, fingerprint)
  codes_format.check_tokenizer(metadata, tok)  # No weights at hand: the config is checked.
  with pytest.raises(ValueError, match=r"other tokenizer weights.*checkpoint='/ckpt/tokenizer'"):
    codes_format.check_tokenizer(metadata, tok, codes_format.weights_fingerprint(retrained))
  codes_format.check_tokenizer(header(), tok, fingerprint)  # Written before fingerprints: allowed.
  # tokenize_dataset reruns refuse to add shards of other weights to a directory.
  with pytest.raises(ValueError, match=r'tokenizer\.weights_sha256'):
    codes_format.check_header(metadata, header(weights_sha256='0' * 64), 'DIR/metadata.json')


def test_cli(digits_dir, tmp_path):
  out = tmp_path / 'cli'
  command = [sys.executable, '-m', 'heptapod_jax.tools.tokenize_dataset',
             '--config=configs/demo.py:tokenizer=pixel', f'--config.data.data_dir={digits_dir}',
             '--config.data.train_split=train[:12]', f'--out={out}', '--variants=center',
             '--shard_size=8', '--batch_size=8']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  metadata = json.loads((out / codes_format.METADATA_FILE).read_text())
  assert metadata['split'] == 'train[:12]' and metadata['num_shards'] == 2
  assert metadata['variant_names'] == ['center'] and metadata['augment'] == 'none'
  assert codes_format.load_shard(str(out / 'codes-00001.npz'))['codes'].shape == (4, 1, 8, 8)
  # The terminal (a pipe here): plain progress lines and the result, no records or notices;
  # the records are in <out>/log.txt.
  lines = result.stdout.strip().splitlines()
  # A short job in a pipe: its last progress line (at most one a minute), then the result.
  assert len(lines) == 2 and lines[0].startswith('tokenize 12/12 (100%)'), lines
  assert lines[-1] == f'{out}: wrote shards [0, 1], skipped []; complete', lines
  assert not re.search(r'^[IWE]\d{4} ', result.stdout + result.stderr, re.M), result.stderr
  assert 'oneDNN' not in result.stderr and 'wrote' in (out / 'log.txt').read_text()
  # Rerun: nothing left to encode, the reader still finds its files (log.txt is not one).
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0 and 'skipped [0, 1]; complete' in again.stdout, again.stderr[-2000:]


# ---------------------------------------------------------------------------- the reader


@pytest.mark.parametrize('process_count', [1, 2])
def test_reader_replays_the_image_pipeline(digits_dir, reference_dir, process_count):
  images_config = _config(digits_dir).data
  tokens_config = _config(digits_dir, tokenized_dir=reference_dir).data
  tokenizer, params = make_tokenizer(_config(digits_dir).tokenizer, 32)
  num_batches = 6  # 96 records over 40: two epoch boundaries.
  for process_index in range(process_count):
    make = lambda config, state=None: input_pipeline.create_train_iterator(
        config, global_batch_size=16, seed=7, state=state, process_index=process_index,
        process_count=process_count)
    images, codes = make(images_config), make(tokens_config)
    assert isinstance(codes, tokenized.TokenizedTrainIterator)
    assert codes.num_classes == images.num_classes == 10
    assert codes.num_local_examples == images.num_local_examples == 40 // process_count
    assert codes.num_train_examples == 40 and codes.grid_size == (8, 8)
    image_batches, states = [], []
    for _ in range(num_batches):
      image_batch, code_batch = next(images), next(codes)
      assert set(code_batch) == {'tokens', 'label'}
      assert code_batch['tokens'].shape == (16 // process_count, 8, 8)
      assert code_batch['tokens'].dtype == np.int32 and code_batch['label'].dtype == np.int32
      want = np.asarray(tokenizer.encode_to_indices(params, image_batch['image']))
      np.testing.assert_array_equal(code_batch['tokens'], want)
      np.testing.assert_array_equal(code_batch['label'], image_batch['label'])
      assert codes.get_state() == images.get_state()
      image_batches.append(image_batch)
      states.append(codes.get_state())
    # Resume from any batch, including across an epoch boundary (position 40 / process_count).
    for k in (1, 2, 4):
      state = json.loads(json.dumps(states[k - 1]))
      resumed_codes, resumed_images = next(make(tokens_config, state)), next(
          make(images_config, state))
      np.testing.assert_array_equal(resumed_images['image'], image_batches[k]['image'])
      np.testing.assert_array_equal(
          resumed_codes['tokens'],
          np.asarray(tokenizer.encode_to_indices(params, image_batches[k]['image'])))
      np.testing.assert_array_equal(resumed_codes['label'], image_batches[k]['label'])

  # The views really vary with the record.
  variant = record_order.variant_fn('ten_crop', 7, 0)
  assert len({int(variant(tf.constant(r, tf.int64))) for r in range(64)}) == 10


def _save(path, array, fmt):
  Image.fromarray(array).save(path, format=fmt, **({'quality': 95} if fmt == 'JPEG' else {}))


def test_reader_skips_unreadable_images_like_the_image_pipeline(tmp_path):
  root = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for cls, name, shape in (('cat', 'a.png', (40, 60)), ('cat', 'b.jpg', (50, 50)),
                           ('cat', 'c.png', (33, 20)), ('dog', 'd.jpeg', (64, 48)),
                           ('dog', 'e.png', (16, 16)), ('dog', 'f.png', (70, 45))):
    (root / 'train' / cls).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    _save(root / 'train' / cls / name, image, 'JPEG' if name.endswith(('jpg', 'jpeg')) else 'PNG')
  (root / 'train' / 'dog' / 'corrupt.jpg').write_bytes(rng.bytes(300))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format='JPEG')
  (root / 'train' / 'cat' / 'bad.jpg').write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])

  config = _config(None, source='image_folder', folder=str(root), train_split='train',
                   image_size=8, augment='flip')
  out = tmp_path / 'tokens'
  result = _tokenize(config, out, variants='flip', shard_size=3)
  assert result['metadata']['num_examples'] == 8 and result['metadata']['num_skipped'] == 2
  kept = np.concatenate([codes_format.load_shard(codes_format.shard_path(str(out), s))
                         ['source_index'] for s in range(3)])
  assert len(kept) == 6

  tokenizer, params = make_tokenizer(config.tokenizer, 8)
  config.data.tokenized_dir = str(out)
  codes = input_pipeline.create_train_iterator(config.data, global_batch_size=4, seed=1)
  config.data.tokenized_dir = None
  images = input_pipeline.create_train_iterator(config.data, global_batch_size=4, seed=1)
  for _ in range(5):
    image_batch, code_batch = next(images), next(codes)
    np.testing.assert_array_equal(code_batch['tokens'],
                                  tokenizer.encode_to_indices(params, image_batch['image']))
    np.testing.assert_array_equal(code_batch['label'], image_batch['label'])
    # The same records consumed and dropped. The image pipeline also names each drop's reason
    # ('skipped'); the reader knows only that the tokenizer tool dropped the record.
    for key in ('position', 'num_skipped'):
      assert codes.get_state()[key] == images.get_state()[key]
  assert codes.get_state()['num_skipped'] >= 4  # Two broken records per epoch of 8.


# ------------------------------------------------------------ continuous (KL) tokenizer


@pytest.fixture(scope='module')
def kl_checkpoint(tmp_path_factory):
  """A random-init tiny KL autoencoder: 32px images -> 8x8 latents of 4 channels."""
  directory = str(tmp_path_factory.mktemp('kl_tokenizer'))
  config = kl.KLConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                       dec_num_res_blocks=1, embed_dim=4)
  tokenizer_io.save_tokenizer(directory, 'kl', config, kl.init_params(config, jax.random.key(0)))
  return directory


def _kl_config(data_dir, checkpoint, latent_scale=0.5, sample_posterior=True, **data_overrides):
  config = _config(data_dir, **data_overrides)
  config.tokenizer = ml_collections.ConfigDict({
      'kind': 'kl', 'patch': 4, 'levels': 16, 'checkpoint': checkpoint,
      'checkpoint_key': 'ema_params', 'latent_scale': latent_scale,
      'sample_posterior': sample_posterior})
  return config


def _kl_moments(tokenizer, params):
  """images -> (mean, std) of the KL encoder, as numpy: the reference the files must match."""
  encode = jax.jit(tokenizer.autoencoder.encode)

  def moments(images):
    mean, logvar = encode(params, images)
    return np.asarray(mean), np.exp(0.5 * np.asarray(logvar, np.float64)).astype(np.float32)

  return moments


def _assert_close(got, want, err_msg=''):
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=err_msg)


@pytest.fixture(scope='module')
def kl_dir(digits_dir, kl_checkpoint, tmp_path_factory):
  """SPLIT's ten-crop views through the KL tokenizer, in one uninterrupted run."""
  out = tmp_path_factory.mktemp('kl_tokenized')
  result = _tokenize(_kl_config(digits_dir, kl_checkpoint), out)
  assert result['written'] == [0, 1, 2] and result['metadata'] is not None
  return str(out)


def test_kl_moments_are_the_encoder_posterior(kl_dir, kl_checkpoint, digits_dir):
  metadata = codes_format.read_metadata(kl_dir)
  assert metadata['payload'] == 'moments' and metadata['dtype'] == 'float32'
  assert metadata['latent_channels'] == 4 and 'vocab_size' not in metadata
  assert metadata['grid_size'] == [8, 8] and metadata['num_kept'] == 40
  # Stored unscaled and unsampled: the training-time fields are not part of the header.
  config = _kl_config(digits_dir, kl_checkpoint)
  tokenizer, params = make_tokenizer(config.tokenizer, 32)
  assert metadata['tokenizer'] == {'kind': 'kl', 'patch': 4, 'levels': 16,
                                   'checkpoint': kl_checkpoint, 'checkpoint_key': 'ema_params',
                                   'weights_sha256': codes_format.weights_fingerprint(params)}
  moments = _kl_moments(tokenizer, params)
  source = tfds.builder('heptapod_digits', data_dir=digits_dir).as_dataset(
      split=SPLIT, shuffle_files=False)
  examples = list(source.as_numpy_iterator())
  for shard in range(3):
    data = codes_format.load_shard(codes_format.shard_path(kl_dir, shard),
                                ('moments', 'labels', 'source_index'))
    start, end = shard * SHARD_SIZE, min((shard + 1) * SHARD_SIZE, 40)
    assert data['moments'].shape == (end - start, 10, 8, 8, 2, 4)
    assert data['moments'].dtype == np.float32
    np.testing.assert_array_equal(data['source_index'], np.arange(start, end))
    np.testing.assert_array_equal(data['labels'], [ex['label'] for ex in examples[start:end]])
    # The first and last example of each shard: mean and std of each of its ten views.
    for row in (0, end - start - 1):
      views = preprocess.augmented_views(tf.constant(examples[start + row]['image']), 32,
                                         'ten_crop')
      mean, std = moments(preprocess.to_model_range(views).numpy())
      _assert_close(data['moments'][row, :, :, :, 0], mean, f'shard {shard} row {row} mean')
      _assert_close(data['moments'][row, :, :, :, 1], std, f'shard {shard} row {row} std')


@pytest.mark.parametrize('process_count', [1, 2])
def test_kl_reader_replays_the_image_pipeline(digits_dir, kl_dir, kl_checkpoint, process_count):
  images_config = _config(digits_dir).data
  moments_config = _kl_config(digits_dir, kl_checkpoint, tokenized_dir=kl_dir).data
  tokenizer, params = make_tokenizer(_kl_config(digits_dir, kl_checkpoint).tokenizer, 32)
  moments = _kl_moments(tokenizer, params)
  b = 16 // process_count
  for process_index in range(process_count):
    make = lambda config, state=None: input_pipeline.create_train_iterator(
        config, global_batch_size=16, seed=7, state=state, process_index=process_index,
        process_count=process_count)
    images, latents = make(images_config), make(moments_config)
    assert latents.payload == 'moments' and latents.latent_channels == 4
    assert latents.vocab_size is None and latents.grid_size == (8, 8)
    assert latents.num_local_examples == images.num_local_examples == 40 // process_count
    states, image_batches = [], []
    for step in range(6):  # 96 records over 40: two epoch boundaries.
      image_batch, batch = next(images), next(latents)
      assert set(batch) == {'latent_mean', 'latent_std', 'label'}
      for key in ('latent_mean', 'latent_std'):
        assert batch[key].shape == (b, 8, 8, 4) and batch[key].dtype == np.float32
      assert batch['label'].dtype == np.int32
      mean, std = moments(image_batch['image'])
      _assert_close(batch['latent_mean'], mean, f'step {step} mean')
      _assert_close(batch['latent_std'], std, f'step {step} std')
      np.testing.assert_array_equal(batch['label'], image_batch['label'])
      assert latents.get_state() == images.get_state()
      states.append(latents.get_state())
      image_batches.append(image_batch)
    for k in (2, 4):  # Resume, also across the epoch boundary.
      resumed = next(make(moments_config, json.loads(json.dumps(states[k - 1]))))
      mean, std = moments(image_batches[k]['image'])
      _assert_close(resumed['latent_mean'], mean)
      _assert_close(resumed['latent_std'], std)
      np.testing.assert_array_equal(resumed['label'], image_batches[k]['label'])


def test_kl_bfloat16_moments(digits_dir, kl_checkpoint, tmp_path):
  out = tmp_path / 'bf16'
  config = _kl_config(digits_dir, kl_checkpoint, augment='none')
  result = _tokenize(config, out, variants='center', moments_dtype='bfloat16')
  assert result['metadata']['dtype'] == 'bfloat16'
  with np.load(out / 'codes-00000.npz') as raw:  # Stored as bits: any numpy can read it.
    assert raw['moments'].dtype == np.uint16 and raw['moments'].shape == (16, 1, 8, 8, 2, 4)
  assert codes_format.load_shard(str(out / 'codes-00000.npz'), ('moments',))['moments'].dtype == (
      ml_dtypes.bfloat16)

  tokenizer, params = make_tokenizer(config.tokenizer, 32)
  moments = _kl_moments(tokenizer, params)
  images = input_pipeline.create_train_iterator(config.data, global_batch_size=8, seed=3)
  config.data.tokenized_dir = str(out)
  latents = input_pipeline.create_train_iterator(config.data, global_batch_size=8, seed=3)
  for _ in range(6):
    image_batch, batch = next(images), next(latents)
    mean, std = moments(image_batch['image'])
    for got, want in ((batch['latent_mean'], mean), (batch['latent_std'], std)):
      assert got.dtype == np.float32
      # Exactly the bfloat16 rounding of the float32 moments.
      np.testing.assert_allclose(got, want.astype(ml_dtypes.bfloat16).astype(np.float32),
                                 rtol=0, atol=np.abs(want).max() * 2.0**-8)
    assert latents.get_state() == images.get_state()

  with pytest.raises(ValueError, match=r'moments_dtype=.bfloat16. applies to .*kind="kl" only'):
    _tokenize(_config(digits_dir), tmp_path / 'codes', moments_dtype='bfloat16')


def test_kl_and_discrete_directories_do_not_mix(digits_dir, kl_checkpoint, kl_dir, reference_dir,
                                               tmp_path):
  kl_config, codes_config = _kl_config(digits_dir, kl_checkpoint), _config(digits_dir)
  # The tool: a KL run on a codes directory and a codes run on a moments directory.
  with pytest.raises(ValueError, match=r"metadata\.json was written with payload='codes' "
                     r"\(tokenizer\.kind='pixel'\) but this run has payload='moments' "
                     r"\(tokenizer\.kind='kl'\)"):
    _tokenize(kl_config, reference_dir)
  with pytest.raises(ValueError, match=r"payload='moments' \(tokenizer\.kind='kl'\) but this run "
                     r"has payload='codes' \(tokenizer\.kind='pixel'\)"):
    _tokenize(codes_config, kl_dir)
  partial = tmp_path / 'partial'  # No metadata yet: the shard header refuses it.
  _tokenize(codes_config, partial, max_shards=1)
  with pytest.raises(ValueError, match=r"codes-00000\.npz was written with payload='codes'"):
    _tokenize(kl_config, partial)
  # Training-time fields do not matter: a complete directory serves another latent_scale.
  again = _tokenize(_kl_config(digits_dir, kl_checkpoint, latent_scale=0.2325), kl_dir)
  assert again['written'] == [] and again['metadata'] == codes_format.read_metadata(kl_dir)

  # The trainer's check: a KL config on codes (pixel or VQ) and a VQ config on moments.
  codes_metadata = codes_format.read_metadata(reference_dir)
  vq_metadata = json.loads(json.dumps(codes_metadata))
  vq_metadata['tokenizer']['kind'] = 'vq'
  for metadata, kind in ((codes_metadata, 'pixel'), (vq_metadata, 'vq')):
    with pytest.raises(ValueError, match=rf"config\.tokenizer\.kind='kl' but the pre-tokenized "
                       rf"data was made with tokenizer\.kind='{kind}' \(payload='codes'"):
      codes_format.check_tokenizer(metadata, kl_config.tokenizer)
  kl_metadata = codes_format.read_metadata(kl_dir)
  vq_config = _config(digits_dir)
  vq_config.tokenizer.kind = 'vq'
  with pytest.raises(ValueError, match=r"config\.tokenizer\.kind='vq' but the pre-tokenized "
                     r"data was made with tokenizer\.kind='kl' \(payload='moments'"):
    codes_format.check_tokenizer(kl_metadata, vq_config.tokenizer)
  codes_format.check_tokenizer(kl_metadata, kl_config.tokenizer)
  codes_format.check_tokenizer(kl_metadata, _kl_config(digits_dir, kl_checkpoint, latent_scale=1.0,
                                                    sample_posterior=False).tokenizer)
  other = _kl_config(digits_dir, kl_checkpoint)
  other.tokenizer.checkpoint_key = 'params'
  with pytest.raises(ValueError, match=r"config\.tokenizer\.checkpoint_key='params'.*"
                     r"checkpoint_key='ema_params'"):
    codes_format.check_tokenizer(kl_metadata, other.tokenizer)


def test_kl_interrupted_tokenization_resumes(digits_dir, kl_checkpoint, kl_dir, tmp_path):
  out = tmp_path / 'kl_resumed'
  config = _kl_config(digits_dir, kl_checkpoint)
  assert _tokenize(config, out, max_shards=1) == {'written': [0], 'skipped': [],
                                                  'metadata': None}
  old = 1_000_000_000
  os.utime(out / 'codes-00000.npz', (old, old))
  second = _tokenize(config, out)
  assert second['written'] == [1, 2] and second['skipped'] == [0]
  assert os.stat(out / 'codes-00000.npz').st_mtime == old
  assert second['metadata'] == codes_format.read_metadata(kl_dir)
  for shard in range(3):
    keys = ('moments', 'labels', 'source_index', 'header')
    a = codes_format.load_shard(codes_format.shard_path(str(out), shard), keys)
    b = codes_format.load_shard(codes_format.shard_path(kl_dir, shard), keys)
    for key in keys[:3]:
      np.testing.assert_array_equal(a[key], b[key])
    assert a['header'] == b['header']
