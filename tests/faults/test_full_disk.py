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
import subprocess

import pytest

import _harness as h

STEPS = 10


@contextlib.contextmanager
def small_disk(path, megabytes: int):
  """A tmpfs of `megabytes` MB mounted at `path` for the duration of the block."""
  os.makedirs(path, exist_ok=True)
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
  from heptapod_jax import train
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
