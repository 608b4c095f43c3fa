"""`data.source='tfds'`: any TFDS image data set by name, offline.

TFDS's own mock (`tfds.testing.mock_data`, policy USE_CODE) stands in for cifar10,
oxford_flowers102, lsun and div2k: the builders' real feature specs, random examples.
The mock records no split sizes and ignores slicing, so those tests also cover the
counted path of `sources._tfds_source`; the built-in digits, a real prepared TFDS data
set, read by name cover the `ReadInstruction` path.
"""
import logging
import socket
import urllib.request

import numpy as np
import pytest
import tensorflow_datasets as tfds

from heptapod_jax import config_lib
from heptapod_jax.data import input_pipeline, sources
from heptapod_jax.evaluators import feature_net

from test_data import digits_dir  # noqa: F401  (the prepared built-in digits, a fixture)
from test_train import tiny_config

MOCK = dict(policy=tfds.testing.MockPolicy.USE_CODE)


def _config(name, **overrides):
  config = input_pipeline.default_data_config()
  config.source = 'tfds'
  config.name = name
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def _records(source, split, process_index, process_count):
  """(label, encoded image bytes) of a process's slice, in order."""
  data = source.read_slice(split, process_index, process_count)
  out = [(int(r['label']), bytes(r['image'])) for r in tfds.as_numpy(data.records)]
  assert len(out) == data.num_records
  return out


def test_cifar10_by_name_equals_tfds_own_decoding():
  with tfds.testing.mock_data(num_examples=12, **MOCK):
    config = _config('cifar10', image_size=32)
    source = sources.resolve_source(config)
    assert (source.name, source.num_classes) == ('cifar10', 10)
    images, labels = feature_net.read_split(config, 'test', batch_size=8)
    want = list(tfds.as_numpy(tfds.builder('cifar10').as_dataset(split='test')))
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [ex['label'] for ex in want])
  # 32x32 images at image_size 32: the center crop is the identity, pixels come back as TFDS
  # decodes them.
  np.testing.assert_array_equal(images, np.stack([ex['image'] for ex in want]))


def test_oxford_flowers102_features_found_and_batches():
  with tfds.testing.mock_data(num_examples=10, **MOCK):
    config = _config('oxford_flowers102', image_size=16, min_image_size=0)
    source = sources.resolve_source(config)
    assert source.num_classes == 102  # The ClassLabel; 'file_name' (Text) is left alone.
    it = input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0,
                                              process_index=0, process_count=1)
    batch = next(it)
  assert batch['image'].shape == (4, 16, 16, 3) and batch['label'].shape == (4,)
  assert np.all((0 <= batch['label']) & (batch['label'] < 102))


@pytest.mark.parametrize('kind', ['mock_cifar10', 'prepared_digits'])
def test_process_slices_are_disjoint_and_complete(kind, digits_dir):
  """Two simulated processes: their records, in order, are the whole split, each once."""
  if kind == 'mock_cifar10':
    with tfds.testing.mock_data(num_examples=11, **MOCK):
      source = sources.resolve_source(_config('cifar10'))
      whole = _records(source, 'train', 0, 1)
      parts = [_records(source, 'train', i, 2) for i in range(2)]
  else:
    source = sources.resolve_source(_config('heptapod_digits', data_dir=digits_dir))
    whole = _records(source, 'train[:37]', 0, 1)
    parts = [_records(source, 'train[:37]', i, 2) for i in range(2)]
  assert len(whole) in (11, 37)
  assert [len(p) for p in parts] == [len(whole) - len(whole) // 2, len(whole) // 2]
  assert parts[0] + parts[1] == whole
  assert len(set(img for _, img in whole)) == len(whole)  # Distinct examples: none read twice.


def test_by_name_reads_what_the_builtin_source_reads(digits_dir):
  named = _config('heptapod_digits', data_dir=digits_dir)
  builtin_config = input_pipeline.default_data_config()
  builtin_config.data_dir = digits_dir
  a, la = feature_net.read_split(named, 'test')
  b, lb = feature_net.read_split(builtin_config, 'test')
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)


def test_resume_mid_epoch_gives_the_batches_of_an_uninterrupted_run():
  with tfds.testing.mock_data(num_examples=13, **MOCK):
    config = _config('cifar10', image_size=32, augment='flip')
    kwargs = dict(global_batch_size=4, seed=3, process_index=1, process_count=2)
    straight = input_pipeline.create_train_iterator(config, **kwargs)
    want = [next(straight) for _ in range(7)]  # 6 records a process: crosses two epochs.
    first = input_pipeline.create_train_iterator(config, **kwargs)
    for _ in range(4):
      next(first)
    state = first.get_state()
    assert state['position'] == 8
    resumed = input_pipeline.create_train_iterator(config, state=state, **kwargs)
    got = [next(resumed) for _ in range(3)]
  for a, b in zip(want[4:], got):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_a_data_set_without_labels_is_one_class(caplog):
  with tfds.testing.mock_data(num_examples=6, **MOCK), caplog.at_level(logging.WARNING):
    source = sources.resolve_source(_config('lsun/bedroom'))
    assert source.num_classes == 1
    assert {label for label, _ in _records(source, 'train', 0, 1)} == {0}
    assert 'training unconditionally' in caplog.text
    # label_key='' drops the labels of a labelled data set.
    assert sources.resolve_source(_config('cifar10', label_key='')).num_classes == 1


def test_several_image_features_need_image_key():
  with tfds.testing.mock_data(num_examples=3, **MOCK):
    with pytest.raises(ValueError, match=r"several Image features \['hr', 'lr'\]; set "
                                         r"data.image_key"):
      sources.resolve_source(_config('div2k'))
    source = sources.resolve_source(_config('div2k', image_key='lr'))
    assert source.num_classes == 1 and len(_records(source, 'train', 0, 1)) == 3


def test_errors_name_the_field(tmp_path, digits_dir):
  with tfds.testing.mock_data(num_examples=3, **MOCK):
    with pytest.raises(ValueError, match=r"data.name='cifr10': 'cifr10' is not a data set "
                                         r"registered .*did you mean 'cifar10'"):
      sources.resolve_source(_config('cifr10'))
    with pytest.raises(ValueError, match=r"data.image_key='label' is a ClassLabel feature of "
                                         r"cifar10, not an Image; its Image features: \['image'\]"):
      sources.resolve_source(_config('cifar10', image_key='label'))
    with pytest.raises(ValueError, match=r"data.image_key='picture' is not a feature of cifar10"):
      sources.resolve_source(_config('cifar10', image_key='picture'))
    with pytest.raises(ValueError, match=r"data.label_key='id' is a Text feature of cifar10, "
                                         r"not a ClassLabel"):
      sources.resolve_source(_config('cifar10', label_key='id'))
  # Not prepared where data.data_dir points: the command that prepares it.
  empty = str(tmp_path / 'no_data')
  with pytest.raises(FileNotFoundError, match=rf"data.name='cifar10' is not prepared in "
                                              rf"data.data_dir='{empty}'.*`tfds build cifar10 "
                                              rf"--data_dir={empty}`"):
    sources.resolve_source(_config('cifar10', data_dir=empty))
  # A split the prepared data set does not have.
  with pytest.raises(ValueError, match=r"heptapod_digits: bad split 'validation'.*available: "
                                       r"\['test', 'train'\]"):
    sources.resolve_source(_config('heptapod_digits', data_dir=digits_dir)).num_examples(
        'validation')
  # config validation (pure): the source needs a name.
  c = tiny_config(tmp_path)
  config_lib.validate(c)
  c.data.source = 'tfds'
  with pytest.raises(ValueError, match=r"config.data.source='tfds' needs config.data.name"):
    config_lib.validate(c)


def test_the_tests_cannot_reach_the_network():
  # conftest's guard (NetworkAccessInTests, a RuntimeError: not an OSError that urllib or a
  # downloader would catch and retry).
  with pytest.raises(RuntimeError, match='never use the network'):
    socket.create_connection(('93.184.216.34', 80), timeout=1)
  with pytest.raises(RuntimeError, match='never use the network'):
    urllib.request.urlopen('http://93.184.216.34/', timeout=1)
  # Loopback stays open (the multi-process tests use it): refused, not blocked.
  with pytest.raises(ConnectionRefusedError):
    socket.create_connection(('127.0.0.1', 9), timeout=1)


def test_grayscale_images_are_converted_and_counted():
  """mnist's Image feature is 28x28x1: decoded to RGB like any grayscale file, and counted."""
  with tfds.testing.mock_data(num_examples=8, **MOCK):
    config = _config('mnist', image_size=16)
    it = input_pipeline.create_train_iterator(config, global_batch_size=4, seed=0,
                                              process_index=0, process_count=1)
    batch = next(it)
    batch = next(it)
    state = it.get_state()
  assert batch['image'].shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # Gray: R = B.
  assert state['converted'] == {'grayscale': 8} and state['num_skipped'] == 0


def test_imagenet2012_by_name_is_the_manual_download_source(tmp_path):
  """data.source='tfds' with data.name='imagenet2012' takes the imagenet2012 path: prepared
  from the manually downloaded tars, whose absence names the directory to put them in."""
  config = _config('imagenet2012', data_dir=str(tmp_path / 'tfds'),
                   manual_dir=str(tmp_path / 'manual'))
  with pytest.raises(FileNotFoundError, match=r'imagenet2012 is not prepared.*ILSVRC2012_img_train'
                                              r'.tar.*ILSVRC2012_img_val.tar'):
    sources.resolve_source(config)


def test_pre_tokenized_codes_of_another_tfds_data_set_are_refused(tmp_path):
  from heptapod_jax.data import codes_format
  metadata = {'source': 'tfds:cifar10', 'split': 'train', 'image_size': 32, 'augment': 'none',
              'payload': 'codes', 'format_version': codes_format.FORMAT_VERSION}
  codes_format.check_data_config(metadata, _config('cifar10', image_size=32), str(tmp_path))
  with pytest.raises(ValueError, match=r"data.source='tfds:svhn_cropped' but .* holds "
                                       r"source='tfds:cifar10'"):
    codes_format.check_data_config(metadata, _config('svhn_cropped', image_size=32), str(tmp_path))
