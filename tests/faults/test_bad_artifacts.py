"""Bad artefacts read back: a damaged or foreign pre-tokenized shard, sample chunk, metadata.json
or manifest.json is refused (or set aside and made again), naming the file and what is wrong,
and never mixed in.

Each artefact is written by the project's own writer (tokenize_dataset, generation.generate),
then damaged for real: its bytes cut, one bit flipped inside a member's array data (or its .npy
header), rewritten with the wrong contents, or its JSON edited.

Sample chunks are written by `generation.generate` over a stub sampler (deterministic images per
sample index and class): the chunk files and their checks are the real ones, and no model has to
be trained for them.
"""
import json
import logging
import os
import re
import shutil
import struct
import zipfile
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest

from heptapod_jax.data import codes_format, input_pipeline
from heptapod_jax.sampling import generation
from heptapod_jax.storage import artifacts

from test_tokenized import _config, _tokenize

SPLIT = 'train[:8]'
SHARD_SIZE = 4  # Two shards of 4 examples; ten crops make the codes member 5,248 bytes.


# ----------------------------------------------------------------------------------- damage
def _member_span(path, member):
  """(offset, size) in the file of a stored zip member's bytes: the .npy header and array."""
  raw = open(path, 'rb').read()
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(member)
  assert info.compress_type == zipfile.ZIP_STORED
  name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:info.header_offset + 30])
  return info.header_offset + 30 + name_len + extra_len, info.file_size


def _array_data_span(path, member):
  """(offset, size) in the file of the array data of a member (after its .npy v1 header)."""
  offset, size = _member_span(path, member)
  raw = open(path, 'rb').read()[offset:offset + size]
  assert raw[:8] == b'\x93NUMPY\x01\x00'
  header_len = 10 + struct.unpack('<H', raw[8:10])[0]
  return offset + header_len, size - header_len


def _flip_array_bit(path, member):
  """Flips one bit in the middle of `member`'s array data."""
  offset, size = _array_data_span(path, member)
  assert size > 0
  data = bytearray(open(path, 'rb').read())
  data[offset + size // 2] ^= 0x10
  open(path, 'wb').write(bytes(data))


def _flip_shape_bit(path, member):
  """One bit of the first dimension in `member`'s .npy header: 4 rows read as 0."""
  offset, size = _member_span(path, member)
  data = bytearray(open(path, 'rb').read())
  at = data.index(b"'shape': (4,", offset, offset + size) + len(b"'shape': (")
  data[at] ^= 0x04  # '4' -> '0'
  open(path, 'wb').write(bytes(data))


def _truncate(path):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def _empty(path):
  """What a full disk can leave: the name, no bytes."""
  open(path, 'wb').close()


def _asides(path):
  """Files `path` was moved aside to: `<name>.bad-<UTC time>`."""
  directory, name = os.path.split(str(path))
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if re.fullmatch(re.escape(name) + r'\.bad-\d{8}T\d{6}Z(-\d+)?', f))


# ------------------------------------------------------------------------------ npz reader
def test_read_npz_returns_what_np_load_does(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {'codes': rng.integers(0, 9, (40, 10, 8, 8)).astype(np.int16),
            'bits': rng.integers(0, 2**16, (3, 5), dtype=np.uint16),
            'fortran': np.asfortranarray(rng.normal(size=(3, 4))),
            'empty': np.zeros((0, 10, 8, 8), np.int32),
            'header': np.array(json.dumps({'a': [1, 2]})),
            'big': rng.normal(size=(3 << 18,)).astype(np.float32)}  # 3 MiB: several reads.
  path = str(tmp_path / 'a.npz')
  artifacts.save_npz(path, **arrays)
  got = artifacts.read_npz(path, tuple(arrays), path)
  with np.load(path) as raw:
    for key in arrays:
      assert got[key].dtype == raw[key].dtype and got[key].shape == raw[key].shape, key
      assert got[key].flags['F_CONTIGUOUS'] == raw[key].flags['F_CONTIGUOUS'], key
      np.testing.assert_array_equal(got[key], raw[key])
  assert sorted(artifacts.check_npz(path, path)) == sorted(f'{k}.npy' for k in arrays)
  with pytest.raises(artifacts.DamagedFileError,
                     match=re.escape(f"{path} has no member labels.npy (it holds ['big.npy'")):
    artifacts.read_npz(path, ('labels',), path)
  np.savez(path, objects=np.array([{'a': 1}], dtype=object))
  with pytest.raises(artifacts.DamagedFileError, match=re.escape(
      f'{path}: member objects.npy holds Python objects (object); only plain arrays are read')):
    artifacts.read_npz(path, ('objects',), path)


# ----------------------------------------------------------------------- tokenized shards
def _cfg(digits_dir, **overrides):
  return _config(digits_dir, train_split=SPLIT, **overrides)


def _tokenize_tiny(config, out, **kwargs):
  return _tokenize(config, out, variants='ten_crop', shard_size=SHARD_SIZE, **kwargs)


@pytest.fixture(scope='module')
def reference(digits_dir, tmp_path_factory):
  """SPLIT tokenized in one clean run; each test damages its own copy."""
  out = str(tmp_path_factory.mktemp('tokenized') / 'reference')
  result = _tokenize_tiny(_cfg(digits_dir), out)
  assert result['written'] == [0, 1] and result['metadata']['num_kept'] == 8
  return out


@pytest.fixture(scope='module')
def foreign(digits_dir, tmp_path_factory):
  """The same split through another tokenizer setting (levels=8): shards of the same shapes."""
  out = str(tmp_path_factory.mktemp('tokenized') / 'foreign')
  _tokenize_tiny(_cfg(digits_dir, levels=8), out)
  return out


def _copy(reference, tmp_path):
  out = str(tmp_path / 'copy')
  shutil.copytree(reference, out)
  return out


def _reader(digits_dir, directory):
  config = _cfg(digits_dir, tokenized_dir=directory)
  return input_pipeline.create_train_iterator(config.data, global_batch_size=4, seed=3)


def _batches(iterator, n=4):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  for x, y in zip(a, b, strict=True):
    for key in ('tokens', 'label'):
      np.testing.assert_array_equal(x[key], y[key])


def test_intact_shards_read_back_as_written(digits_dir, reference, tmp_path):
  keys = ('codes', 'labels', 'source_index', 'header')
  for shard in range(2):
    path = codes_format.shard_path(reference, shard)
    got = codes_format.load_shard(path, keys)
    with np.load(path) as raw:  # What np.load reads of an intact file, bit for bit.
      for key in keys[:3]:
        assert got[key].dtype == raw[key].dtype and got[key].shape == raw[key].shape
        np.testing.assert_array_equal(got[key], raw[key])
      assert got['header'] == json.loads(str(raw['header']))
    assert codes_format.check_shard(path) == got['header']
  # A rerun over a partial directory keeps the intact shard and sets nothing aside.
  out = str(tmp_path / 'partial')
  _tokenize_tiny(_cfg(digits_dir), out, max_shards=1)
  before = open(codes_format.shard_path(out, 0), 'rb').read()
  again = _tokenize_tiny(_cfg(digits_dir), out)
  assert again['written'] == [1] and again['skipped'] == [0]
  assert open(codes_format.shard_path(out, 0), 'rb').read() == before
  assert sorted(os.listdir(out)) == ['codes-00000.npz', 'codes-00001.npz', 'metadata.json']
  _assert_same_batches(_batches(_reader(digits_dir, out)), _batches(_reader(digits_dir, reference)))


# damage -> (damage(path), what the refusal says after the path, a regular expression).
_SHARD_DAMAGE = {
    'truncated': (_truncate, r' is truncated or not an npz file \(\d+ bytes\): no complete zip '
                             r'directory at its end'),
    'empty': (_empty, r' is truncated or not an npz file \(0 bytes\): no complete zip directory'),
    'codes_bit_flip': (lambda p: _flip_array_bit(p, 'codes.npy'),
                       r': checksum mismatch in member codes\.npy'),
    'labels_bit_flip': (lambda p: _flip_array_bit(p, 'labels.npy'),
                        r': checksum mismatch in member labels\.npy'),
    # np.load alone reads an empty array here without a word (see the test below).
    'codes_header_bit_flip': (lambda p: _flip_shape_bit(p, 'codes.npy'),
                              r': checksum mismatch in member codes\.npy'),
}


@pytest.mark.parametrize('kind', sorted(_SHARD_DAMAGE))
def test_training_refuses_a_damaged_shard_and_the_advice_repairs_it(kind, digits_dir, reference,
                                                                   tmp_path):
  out = _copy(reference, tmp_path)
  path = codes_format.shard_path(out, 1)
  damage, words = _SHARD_DAMAGE[kind]
  damage(path)
  damaged = open(path, 'rb').read()
  metadata = os.path.join(out, codes_format.METADATA_FILE)
  with pytest.raises(artifacts.DamagedFileError) as error:
    _reader(digits_dir, out)
  # The shard, what is wrong with it, and what to do.
  assert re.match(re.escape(path) + words, str(error.value)), str(error.value)
  assert f'delete {metadata} and rerun tokenize_dataset on {out}' in str(error.value)
  assert open(path, 'rb').read() == damaged  # Reading never touches the file.
  # A complete directory is not read again by the tool ...
  assert _tokenize_tiny(_cfg(digits_dir), out)['written'] == []
  # ... the advice: without metadata.json the rerun reads every shard through, moves the
  # damaged one aside (kept as it was) and encodes it again.
  os.remove(metadata)
  again = _tokenize_tiny(_cfg(digits_dir), out)
  assert again['written'] == [1] and again['skipped'] == [0]
  [aside] = _asides(path)
  assert open(aside, 'rb').read() == damaged
  assert codes_format.read_metadata(out) == codes_format.read_metadata(reference)
  _assert_same_batches(_batches(_reader(digits_dir, out)), _batches(_reader(digits_dir, reference)))


@pytest.mark.parametrize('kind', sorted(_SHARD_DAMAGE))
def test_tokenize_rerun_sets_a_damaged_shard_aside_and_encodes_it_again(kind, digits_dir,
                                                                       reference, tmp_path,
                                                                       caplog):
  out = str(tmp_path / 'partial')
  assert _tokenize_tiny(_cfg(digits_dir), out, max_shards=1)['written'] == [0]
  path = codes_format.shard_path(out, 0)
  damage, words = _SHARD_DAMAGE[kind]
  damage(path)
  damaged = open(path, 'rb').read()
  with caplog.at_level(logging.WARNING):
    result = _tokenize_tiny(_cfg(digits_dir), out)
  # Before, a bit flip passed the header check: the shard was kept and metadata.json said done.
  assert result['written'] == [0, 1] and result['skipped'] == []
  [aside] = _asides(path)
  assert open(aside, 'rb').read() == damaged
  [record] = [r for r in caplog.records if path in r.getMessage()]
  assert record.levelno == logging.WARNING
  assert re.match(re.escape(path) + words, record.getMessage()), record.getMessage()
  assert f'moved it aside to {aside}' in record.getMessage()
  for shard in range(2):  # The shard made again is the clean run's.
    keys = ('codes', 'labels', 'source_index', 'header')
    got = codes_format.load_shard(codes_format.shard_path(out, shard), keys)
    want = codes_format.load_shard(codes_format.shard_path(reference, shard), keys)
    for key in keys[:3]:
      np.testing.assert_array_equal(got[key], want[key])
    assert got['header'] == want['header']
  assert result['metadata'] == codes_format.read_metadata(reference)


def test_a_flipped_shape_bit_is_silent_in_np_load_but_refused_here(reference, tmp_path):
  """Why every member is read to its end: np.load stops where the .npy header says."""
  out = _copy(reference, tmp_path)
  path = codes_format.shard_path(out, 0)
  _flip_shape_bit(path, 'codes.npy')
  with np.load(path) as raw:
    assert raw['codes'].shape == (0, 10, 8, 8)  # No error: the CRC was never checked.
  with pytest.raises(artifacts.DamagedFileError,
                     match=re.escape(path) + r': checksum mismatch in member codes\.npy'):
    codes_format.load_shard(path, ('codes',))
  with pytest.raises(artifacts.DamagedFileError, match=r'checksum mismatch in member codes\.npy'):
    codes_format.check_shard(path)
  # The members not asked for are not read: a header check alone stays cheap.
  assert codes_format.load_shard(path, ('header',))['header']['shard_size'] == SHARD_SIZE


def test_a_foreign_shard_is_refused_naming_the_field(digits_dir, reference, foreign, tmp_path):
  out = _copy(reference, tmp_path)
  path = codes_format.shard_path(out, 1)
  shutil.copyfile(codes_format.shard_path(foreign, 1), path)  # Same shapes, other tokenizer.
  metadata = os.path.join(out, codes_format.METADATA_FILE)
  with pytest.raises(ValueError, match=re.escape(f'{path} was written with tokenizer.levels=8 '
                                                 f'but {metadata} says tokenizer.levels=16')):
    _reader(digits_dir, out)
  # The tool (without metadata.json) refuses it too: not damaged, so not set aside.
  os.remove(metadata)
  with pytest.raises(ValueError, match=re.escape(f'{path} was written with tokenizer.levels=8 '
                                                 'but this run has tokenizer.levels=16')):
    _tokenize_tiny(_cfg(digits_dir), out)
  assert _asides(path) == [] and os.path.exists(path)


def _edit_metadata(directory, edit):
  path = os.path.join(directory, codes_format.METADATA_FILE)
  with open(path) as f:
    metadata = json.load(f)
  edit(metadata)
  with open(path, 'w') as f:
    json.dump(metadata, f)
  return path


def test_metadata_of_another_configuration_is_refused(digits_dir, reference, tmp_path):
  out = _copy(reference, tmp_path)
  path = _edit_metadata(out, lambda m: m.update(image_size=64))
  with pytest.raises(ValueError, match=re.escape(f'data.image_size=32 but {path} holds '
                                                 'image_size=64')):
    _reader(digits_dir, out)
  with pytest.raises(ValueError, match=re.escape(f'{path} was written with image_size=64 but '
                                                 'this run has image_size=32')):
    _tokenize_tiny(_cfg(digits_dir), out)

  out = _copy(reference, tmp_path / 'levels')
  path = _edit_metadata(out, lambda m: m['tokenizer'].update(levels=8))
  # The shards' own headers disagree with it: none is read as another tokenizer's codes.
  shard = codes_format.shard_path(out, 0)
  with pytest.raises(ValueError, match=re.escape(f'{shard} was written with tokenizer.levels=16 '
                                                 f'but {path} says tokenizer.levels=8')):
    _reader(digits_dir, out)
  with pytest.raises(ValueError, match=re.escape(f'{path} was written with tokenizer.levels=8 '
                                                 'but this run has tokenizer.levels=16')):
    _tokenize_tiny(_cfg(digits_dir), out)


@pytest.mark.parametrize('text, words', [('{"source": "builtin_dig', 'is not valid JSON'),
                                         ('', 'is not valid JSON'),
                                         ('[1, 2]', 'holds a JSON list, not an object')])
def test_metadata_that_is_not_a_json_object_is_refused(text, words, digits_dir, reference,
                                                       tmp_path):
  out = _copy(reference, tmp_path)
  path = os.path.join(out, codes_format.METADATA_FILE)
  with open(path, 'w') as f:
    f.write(text)
  match = re.escape(f'{path} {words}') + '.*' + re.escape(f'delete it and rerun tokenize_dataset '
                                                          f'on {out}')
  with pytest.raises(artifacts.DamagedFileError, match=match):
    _reader(digits_dir, out)
  with pytest.raises(artifacts.DamagedFileError, match=match):
    _tokenize_tiny(_cfg(digits_dir), out)
  assert open(path).read() == text  # Left as it was.


# --------------------------------------------------------------------------- sample chunks
NUM_SAMPLES, CHUNK, CLASSES, SIZE = 10, 4, 3, 32


class _StubSampler:
  """What `generation.generate` needs of an ImageSampler: images from (seed, index, class)."""

  def __init__(self):
    self.model_config = SimpleNamespace(num_classes=CLASSES)
    self.config = ml_collections.ConfigDict({'data': {'image_size': SIZE}})
    self.starts = []

  def sample_images(self, params, labels, *, seed, start_index, pad_to):
    del params, pad_to
    self.starts.append(start_index)
    out = []
    for i, label in enumerate(labels):
      rng = np.random.default_rng([seed, start_index + i, int(label)])
      out.append(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return np.stack(out)


def _generate(out_dir, seed=0, manifest=None):
  """(images, labels, chunk starts sampled now)."""
  sampler = _StubSampler()
  imgs, labels = generation.generate(
      sampler, None, num_samples=NUM_SAMPLES, seed=seed, chunk_size=CHUNK, out_dir=str(out_dir),
      manifest={'image_size': SIZE, 'num_classes': CLASSES} if manifest is None else manifest,
      progress=False)
  return imgs, labels, sampler.starts


@pytest.fixture(scope='module')
def clean_samples(tmp_path_factory):
  imgs, labels, starts = _generate(tmp_path_factory.mktemp('samples') / 'clean')
  assert starts == [0, 4, 8]
  np.testing.assert_array_equal(labels, np.arange(NUM_SAMPLES) % CLASSES)
  return imgs, labels


def _rewrite(path, **change):
  """Writes the chunk again with the project's writer, some arrays changed."""
  with np.load(path) as f:
    arrays = {'images': f['images'], 'labels': f['labels']}
  arrays = {k: change[k](v) if k in change else v for k, v in arrays.items()}
  artifacts.save_npz(path, **arrays)


def _other_classes(path):
  """The images of the next class of each sample, labelled as such: a coherent foreign chunk."""
  labels = (np.arange(4, 8) + 1) % CLASSES
  images = _StubSampler().sample_images(None, labels, seed=0, start_index=4, pad_to=4)
  artifacts.save_npz(path, images=images, labels=labels.astype(np.int32))


# damage -> (damage(path), what the warning says after the path, a regular expression).
_CHUNK_DAMAGE = {
    'truncated': (_truncate, r' is truncated or not an npz file \(\d+ bytes\): no complete zip '
                             r'directory at its end'),
    'empty': (_empty, r' is truncated or not an npz file \(0 bytes\): no complete zip directory'),
    'images_bit_flip': (lambda p: _flip_array_bit(p, 'images.npy'),
                        r': checksum mismatch in member images\.npy'),
    'labels_bit_flip': (lambda p: _flip_array_bit(p, 'labels.npy'),
                        r': checksum mismatch in member labels\.npy'),
    'images_header_bit_flip': (lambda p: _flip_shape_bit(p, 'images.npy'),
                               r': checksum mismatch in member images\.npy'),
    'wrong_shape': (lambda p: _rewrite(p, images=lambda x: x[:, :16]),
                    re.escape(' holds images uint8[4, 16, 32, 3], expected uint8[4, 32, 32, 3]')),
    'wrong_count': (lambda p: _rewrite(p, images=lambda x: x[:3], labels=lambda x: x[:3]),
                    re.escape(' holds images uint8[3, 32, 32, 3], expected uint8[4, 32, 32, 3]')),
    'wrong_dtype': (lambda p: _rewrite(p, images=lambda x: x.astype(np.float32)),
                    re.escape(' holds images float32[4, 32, 32, 3], expected uint8[4, 32, 32, 3]')),
    'wrong_labels': (_other_classes, re.escape(
        ' holds labels int32[4] that are not the class-balanced labels int32[4] of samples '
        '[4, 8): sample 4 has class 2 instead of 1')),
    'float_labels': (lambda p: _rewrite(p, labels=lambda x: x.astype(np.float32)),
                     re.escape(' holds labels float32[4] that are not the class-balanced labels')),
}


@pytest.mark.parametrize('kind', sorted(_CHUNK_DAMAGE))
def test_a_damaged_chunk_is_set_aside_and_made_again(kind, clean_samples, tmp_path, caplog):
  out = tmp_path / 'samples'
  _generate(out)
  path = generation._chunk_path(str(out), 4, 8)  # The middle chunk: samples [4, 8).
  damage, words = _CHUNK_DAMAGE[kind]
  damage(path)
  damaged = open(path, 'rb').read()
  with caplog.at_level(logging.WARNING):
    imgs, labels, starts = _generate(out)
  assert starts == [4]  # Only the damaged chunk is made again ...
  np.testing.assert_array_equal(imgs, clean_samples[0])  # ... and none of it was used.
  np.testing.assert_array_equal(labels, clean_samples[1])
  [aside] = _asides(path)  # Kept as it was, not overwritten.
  assert open(aside, 'rb').read() == damaged
  [record] = [r for r in caplog.records if path in r.getMessage()]
  assert record.levelno == logging.WARNING
  assert re.match(re.escape(path) + words, record.getMessage()), record.getMessage()
  assert f'moved it aside to {aside}' in record.getMessage()
  # The chunk made again is whole: a third run samples nothing.
  again, _, starts = _generate(out)
  assert starts == [] and _asides(path) == [aside]
  np.testing.assert_array_equal(again, clean_samples[0])


def test_intact_chunks_are_reused(clean_samples, tmp_path):
  out = tmp_path / 'samples'
  _generate(out)
  chunks = sorted(os.listdir(out / 'chunks'))
  imgs, labels, starts = _generate(out)
  assert starts == [] and sorted(os.listdir(out / 'chunks')) == chunks
  np.testing.assert_array_equal(imgs, clean_samples[0])
  np.testing.assert_array_equal(labels, clean_samples[1])


def _untouched(out):
  """Name -> bytes of every file under out: what a refused run must leave as it was."""
  return {os.path.join(r, n): open(os.path.join(r, n), 'rb').read()
          for r, _, names in os.walk(out) for n in names}


def test_a_manifest_of_another_configuration_is_refused(tmp_path):
  out = tmp_path / 'samples'
  manifest = {'image_size': SIZE, 'num_classes': CLASSES, 'model': {'num_layers': 2, 'width': 8}}
  _generate(out, manifest=manifest)
  files = _untouched(out)
  path = os.path.join(str(out), generation.MANIFEST)
  with pytest.raises(ValueError, match=re.escape(f'{path}: the samples in {out} were made with '
                                                 'seed=0, this run has seed=1')):
    _generate(out, seed=1, manifest=manifest)
  other = dict(manifest, model={'num_layers': 3, 'width': 8})
  with pytest.raises(ValueError, match=re.escape(f'{path}: the samples in {out} were made with '
                                                 'model.num_layers=2, this run has '
                                                 'model.num_layers=3')):
    _generate(out, manifest=other)
  with pytest.raises(ValueError, match=re.escape("made with model.depth='<missing>', this run "
                                                 "has model.depth=4")):
    _generate(out, manifest=dict(manifest, model=dict(manifest['model'], depth=4)))
  assert _untouched(out) == files


@pytest.mark.parametrize('text, words', [('{"seed": 0, "chunk_si', 'is not valid JSON'),
                                         ('', 'is not valid JSON'),
                                         ('"seed"', 'holds a JSON str, not an object')])
def test_a_manifest_that_is_not_a_json_object_is_refused(text, words, tmp_path):
  out = tmp_path / 'samples'
  _generate(out)
  path = os.path.join(str(out), generation.MANIFEST)
  with open(path, 'w') as f:
    f.write(text)
  files = _untouched(out)
  with pytest.raises(artifacts.DamagedFileError,
                     match=re.escape(f'{path} {words}') + '.*use another config.sample.out_dir'):
    _generate(out)
  assert _untouched(out) == files
