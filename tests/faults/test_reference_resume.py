"""Reference statistics survive being killed: the features are saved in parts as they are made,
a rerun reads them and computes the rest, and the statistics equal an uninterrupted run's.

The fast tests interrupt `extract_features_resumable` in process (an extractor that raises after
k batches; damaged and foreign parts); the slow one kills `tools/reference_stats` with SIGKILL
while it writes parts and checks the rerun's file against an uninterrupted run's."""
import glob
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from heptapod_jax.evaluators import features as features_lib
from heptapod_jax.evaluators import reference as reference_lib

import _harness as h


class Extractor:
  """Deterministic features of each image, which depend only on that image; can die."""

  def __init__(self, die_after: int | None = None):
    self.calls, self.die_after = 0, die_after

  def __call__(self, images):
    if self.die_after is not None and self.calls >= self.die_after:
      raise KeyboardInterrupt('killed')
    self.calls += 1
    x = images.astype(np.float32).reshape(len(images), -1)
    return {'pool': np.stack([x.mean(1), x.std(1), x[:, :5].sum(1)], 1),
            'logits': x[:, :4] / 255.0}


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)


def test_interrupted_run_resumes_to_the_same_features(tmp_path):
  images = _images(70)
  want = features_lib.extract_features(Extractor(), images, batch_size=8)
  parts = str(tmp_path / 'parts')
  with pytest.raises(KeyboardInterrupt):  # Dies in its 5th batch: parts 0 and 1 (16 each) saved.
    features_lib.extract_features_resumable(Extractor(die_after=4), images, 8, parts, every=16)
  assert sorted(os.listdir(parts)) == ['part-000000.npz', 'part-000001.npz']
  rerun = Extractor()
  got = features_lib.extract_features_resumable(rerun, images, 8, parts, every=16)
  assert rerun.calls == 5  # Images 32..69 only: 38 images in batches of 8.
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


def test_iterable_input_skips_the_saved_images(tmp_path):
  images = _images(50, seed=1)
  batches = lambda: (images[i:i + 7] for i in range(0, 50, 7))  # Cut unlike the parts.
  want = features_lib.extract_features(Extractor(), batches(), batch_size=5)
  parts = str(tmp_path / 'parts')
  with pytest.raises(KeyboardInterrupt):
    features_lib.extract_features_resumable(Extractor(die_after=7), batches(), 5, parts, every=10)
  assert len(os.listdir(parts)) == 3
  rerun = Extractor()
  got = features_lib.extract_features_resumable(rerun, batches(), 5, parts, every=10)
  assert rerun.calls == 4
  np.testing.assert_array_equal(got['pool'], want['pool'])


def test_damaged_part_is_moved_aside_and_computed_again(tmp_path, caplog):
  images = _images(40)
  parts = str(tmp_path / 'parts')
  want = features_lib.extract_features_resumable(Extractor(), images, 8, parts, every=8)
  path = os.path.join(parts, 'part-000002.npz')
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 3] ^= 0x10  # A flipped bit inside the array data: a CRC mismatch.
  open(path, 'wb').write(bytes(data))
  rerun = Extractor()
  got = features_lib.extract_features_resumable(rerun, images, 8, parts, every=8)
  assert rerun.calls == 3  # Parts 2, 3, 4 again; 0 and 1 read back.
  np.testing.assert_array_equal(got['pool'], want['pool'])
  assert len(glob.glob(path + '.bad-*')) == 1
  assert 'part-000002.npz is damaged' in caplog.text


def test_parts_cut_differently_are_not_reused(tmp_path, caplog):
  images = _images(40)
  parts = str(tmp_path / 'parts')
  features_lib.extract_features_resumable(Extractor(), images, 8, parts, every=16)
  rerun = Extractor()  # Another batch size: features may differ in their last bits.
  got = features_lib.extract_features_resumable(rerun, images, 4, parts, every=16)
  assert rerun.calls == 10
  np.testing.assert_array_equal(
      got['pool'], features_lib.extract_features(Extractor(), images, batch_size=4)['pool'])
  assert 'are not reused' in caplog.text


def test_a_process_that_does_not_write_reads_the_saved_parts(tmp_path):
  images = _images(32)
  parts = str(tmp_path / 'parts')
  with pytest.raises(KeyboardInterrupt):
    features_lib.extract_features_resumable(Extractor(die_after=2), images, 8, parts, every=8)
  other = Extractor()
  got = features_lib.extract_features_resumable(other, images, 8, parts, every=8, write=False)
  assert other.calls == 2 and len(os.listdir(parts)) == 2
  np.testing.assert_array_equal(
      got['pool'], features_lib.extract_features(Extractor(), images, batch_size=8)['pool'])


def test_adm_reference_features_resume(tmp_path):
  path = str(tmp_path / 'ref.npz')
  images = _images(30, seed=3)
  np.savez(path, arr_0=images)  # An ADM batch without statistics: computed from arr_0.
  want = reference_lib.load_adm_reference(path, Extractor(), batch_size=4)
  parts = str(tmp_path / 'parts')
  with pytest.raises(KeyboardInterrupt):
    reference_lib.load_adm_reference(path, Extractor(die_after=5), batch_size=4, resume_dir=parts,
                                     part_size=8)
  assert len(os.listdir(parts)) == 2
  rerun = Extractor()
  got = reference_lib.load_adm_reference(path, rerun, batch_size=4, resume_dir=parts, part_size=8)
  assert rerun.calls == 4  # Images 16..29.
  np.testing.assert_array_equal(got.mu, want.mu)
  np.testing.assert_array_equal(got.sigma, want.sigma)
  np.testing.assert_array_equal(got.pool_features, want.pool_features)


# ---------------------------------------------------------------------------- a real SIGKILL

def _tool(workdir, data_dir, *extra):
  return [sys.executable, '-m', 'heptapod_jax.tools.reference_stats',
          f'--config={h.ROOT}/configs/demo.py:tokenizer=pixel', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.evaluator.batch_size=8',
          '--config.evaluator.reference_part_size=16', *extra]


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', TF_CPP_MIN_LOG_LEVEL='3',
              PYTHONPATH=h.ROOT)


REFERENCE = os.path.join('feature_net', 'reference_builtin_digits_train_32.npz')


@pytest.mark.slow
def test_sigkill_while_computing_reference_statistics(tmp_path, digits_dir):
  uninterrupted = tmp_path / 'uninterrupted'
  subprocess.run(_tool(uninterrupted, digits_dir), env=_env(), cwd=h.ROOT, check=True,
                 capture_output=True)
  # The same trained feature net for the killed run: only the statistics are computed again.
  killed = tmp_path / 'killed'
  shutil.copytree(uninterrupted / 'feature_net', killed / 'feature_net',
                  ignore=shutil.ignore_patterns('reference_*'))
  parts_dir = str(killed / REFERENCE) + '.parts'
  proc = subprocess.Popen(_tool(killed, digits_dir), env=_env(), cwd=h.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wanted = random.Random(0).randint(3, 40)  # Of 94 parts.
  deadline = time.time() + 300
  while (len(glob.glob(os.path.join(parts_dir, 'part-??????.npz'))) < wanted
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  saved = len(glob.glob(os.path.join(parts_dir, 'part-??????.npz')))
  assert 0 < saved < 94 and not os.path.exists(killed / REFERENCE), saved
  rerun = subprocess.run(_tool(killed, digits_dir), env=_env(), cwd=h.ROOT, capture_output=True,
                         text=True)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert 'reference: builtin_digits train split' in rerun.stdout
  log = open(killed / 'log.txt').read()
  assert f'{saved} parts ({saved * 16} images) saved by an earlier run' in log
  assert not os.path.exists(parts_dir)  # Removed once the statistics are saved.
  with np.load(uninterrupted / REFERENCE) as a, np.load(killed / REFERENCE) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key])
