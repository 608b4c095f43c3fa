"""A real full disk: the workdir on a small tmpfs mounted for the test (root, or a user allowed
to mount; skipped otherwise, saying why), filled up while the run goes on. Saves fail with
ENOSPC; the earlier checkpoints stay intact and readable; the run stops as
train.max_save_failures says, naming the step and the free space; once space is back, the
same command resumes from the newest intact step and ends bit-identical to an uninterrupted
run. The simulated-ENOSPC tests in test_train_faults.py cover the counting rules."""
import contextlib
import errno
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import _harness as h

STEPS = 10


@contextlib.contextmanager
def small_disk(path, megabytes: int):
  """A tmpfs of `megabytes` MB mounted at `path` for the duration of the block."""
  os.makedirs(path, exist_ok=True)
  if shutil.which('mount') is None:
    pytest.skip('cannot mount a small tmpfs here: no mount command')
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={megabytes}m', 'tmpfs', str(path)],
                         capture_output=True, text=True, check=False)
  if mount.returncode:
    pytest.skip(f'cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): '
                f'{mount.stderr.strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def fill(path) -> int:
  """Writes a file at `path` until the filesystem is full; returns the bytes written."""
  written = 0
  block = b'\0' * (1 << 16)
  with open(path, 'wb', buffering=0) as f:
    while True:
      try:
        written += f.write(block)
      except OSError as e:
        assert e.errno == errno.ENOSPC, e
        return written


@pytest.mark.slow
def test_a_full_disk_loses_no_checkpoint_and_the_rerun_resumes(tmp_path, digits_dir):
  from heptapod_jax.training import train
  reference = tmp_path / 'reference'
  train.train_and_evaluate(h.config(STEPS, digits_dir), str(reference))

  with small_disk(tmp_path / 'disk', 48) as disk:
    workdir = disk / 'run'
    child = h.Child(h.flags(STEPS, workdir, digits_dir), log_path=tmp_path / 'stderr.txt')
    child.wait_for('SAVE_RETURNED 4')
    filler = disk / 'filler'
    assert fill(filler) > 0
    rc = child.finish()
    stderr = (tmp_path / 'stderr.txt').read_text()
    assert rc != 0, 'the run should stop after train.max_save_failures failed saves'
    # Stopped by max_save_failures in a row, or at the end: never "done" without its last step.
    stop = re.search(r'CheckpointSaveError: (\d checkpoint saves in a row failed, the last at step '
                     r'\d+|the final checkpoint \(step 10\) could not be saved) in \S+ '
                     r'\[0\.\d MB free of 50\.3 MB\]', stderr)
    assert stop, stderr[-3000:]
    assert re.search(r'Checkpoint save at step \d+ in \S+ \[0\.\d MB free of 50\.3 MB\] failed '
                     r'\(1 in a row; the run stops at 3\): .*No space left on device', stderr)
    kept = h.saved_steps(workdir)
    assert kept and kept[-1] >= 2, kept
    for step in kept:  # Every checkpoint written before the disk filled restores.
      h.restore_state(workdir, step)

    os.remove(filler)
    rerun = h.Child(h.flags(STEPS, workdir, digits_dir), log_path=tmp_path / 'stderr2.txt')
    assert rerun.finish() == 0, rerun.stderr_tail()
    h.assert_same_state(reference, workdir, STEPS)


def fill_leaving(path, keep_bytes: int) -> None:
  """Writes a file at `path` that leaves about `keep_bytes` free on its filesystem."""
  free = shutil.disk_usage(os.path.dirname(path)).free
  with open(path, 'wb') as f:
    f.write(b'\0' * max(free - keep_bytes, 0))


def _read(npz):
  with np.load(npz) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_sample_chunks_on_a_full_disk_name_the_chunk_and_the_rerun_completes(tmp_path, digits_dir):
  from heptapod_jax.sampling import sample_mode as sample
  from heptapod_jax.training import train
  run = str(tmp_path / 'run')
  c = h.config(4, digits_dir)
  train.train_and_evaluate(c, run)
  c.sample.num_per_class, c.sample.chunk_size, c.sample.evaluate = 8, 8, False  # 10 chunks
  c.sample.out_dir = str(tmp_path / 'reference')
  reference = sample.sample_and_evaluate(c, run)

  with small_disk(tmp_path / 'disk', 1) as disk:
    fill_leaving(disk / 'filler', 60_000)  # Room for about two chunks of 8 images (25 kB each).
    c.sample.out_dir = str(disk / 'samples')
    with pytest.raises(OSError, match=r'chunks/chunk_000000\d\d_000000\d\d\.npz could not be '
                                      r'written \[0\.0\d? MB free of 1\.0 MB\] .*No space left on '
                                      r'device.*run the same command again') as err:
      sample.sample_and_evaluate(c, run)
    assert err.value.errno == errno.ENOSPC
    written = sorted(os.listdir(disk / 'samples' / 'chunks'))
    assert written and all(n.endswith('.npz') and '.tmp' not in n for n in written), written
    for name in written:  # The chunks written before the disk filled are complete.
      _read(disk / 'samples' / 'chunks' / name)
    os.remove(disk / 'filler')
    again = sample.sample_and_evaluate(c, run)
    got, want = _read(again['npz']), _read(reference['npz'])
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.slow
def test_shards_on_a_full_disk_name_the_shard_and_the_rerun_completes(tmp_path, digits_dir):
  import ml_collections
  from heptapod_jax.data import codes_format, schema
  from heptapod_jax.tools.tokenize_dataset import tokenize_dataset
  data = schema.default_data_config()
  data.data_dir, data.train_split = digits_dir, 'train[:160]'
  config = ml_collections.ConfigDict({'data': data, 'tokenizer': ml_collections.ConfigDict(
      {'kind': 'pixel', 'patch': 4, 'levels': 16, 'checkpoint': ''})})
  kwargs = dict(variants='center', shard_size=16, batch_size=16)  # 10 shards
  tokenize_dataset(config, str(tmp_path / 'reference'), **kwargs)

  with small_disk(tmp_path / 'disk', 1) as disk:
    fill_leaving(disk / 'filler', 24_000)
    out = disk / 'codes'
    with pytest.raises(OSError, match=r'codes-000\d\d\.npz could not be written \[0\.0\d? MB free '
                                      r'of 1\.0 MB\] .*run the same command again') as err:
      tokenize_dataset(config, str(out), **kwargs)
    assert err.value.errno == errno.ENOSPC
    shards = sorted(p for p in os.listdir(out) if p.startswith('codes-'))
    assert shards and all(p.endswith('.npz') for p in shards), shards  # No .tmp left behind.
    for name in shards:
      codes_format.check_shard(str(out / name))
    os.remove(disk / 'filler')
    tokenize_dataset(config, str(out), **kwargs)
    names = sorted(p for p in os.listdir(tmp_path / 'reference') if p.startswith('codes-'))
    assert sorted(p for p in os.listdir(out) if p.startswith('codes-')) == names
    for name in names:
      got, want = _read(out / name), _read(tmp_path / 'reference' / name)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert (out / 'metadata.json').read_text() == (tmp_path / 'reference' / 'metadata.json'
                                                   ).read_text()
