"""Preemption and hard kills: a run stopped at any moment resumes onto the uninterrupted
trajectory (same batches, bit-identical parameters), losing at most the steps since the
last checkpoint and never any data."""
import os
import random
import re
import signal
import time

import pytest

from heptapod_jax.training import train

import _harness as h

STEPS = 12


@pytest.fixture(scope='module')
def reference(tmp_path_factory, digits_dir):
  """The uninterrupted run, in this process."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  summary = train.train_and_evaluate(h.config(STEPS, digits_dir), workdir)
  assert summary['step'] == STEPS
  return workdir


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, digits_dir, reference):
  workdir = tmp_path / 'run'
  child = h.Child(h.flags(STEPS, workdir, digits_dir), log_path=tmp_path / 'stderr.log')
  child.wait_for('SAVE_RETURNED 4')
  # Two signals in a row: the second arrives while the first is being handled. It is sent once
  # the first one's handler has run: two SIGTERMs that arrive while the main thread is inside
  # one XLA call reach Python as one (the interpreter keeps a flag per signal, not a count).
  child.proc.send_signal(signal.SIGTERM)
  deadline = time.time() + 120
  while 'SIGTERM received: finishing this step' not in child.stderr_tail():
    assert time.time() < deadline and child.proc.poll() is None, child.stderr_tail()
    time.sleep(0.01)
  child.proc.send_signal(signal.SIGTERM)
  assert child.finish() == 0, child.stderr_tail()
  match = re.search(r'Stopped by SIGTERM at step (\d+); checkpoint: (\S+)/(\d+)\.', child.stdout())
  assert match, child.stdout()[-2000:]
  stopped = int(match.group(1))
  assert 4 <= stopped < STEPS and int(match.group(3)) == stopped
  assert h.saved_steps(workdir)[-1] == stopped and os.path.isdir(match.group(2) + f'/{stopped}')
  assert 'received again: already stopping' in child.stderr_tail()

  summary = train.train_and_evaluate(h.config(STEPS, digits_dir), str(workdir))  # Resume.
  assert summary['step'] == STEPS and not summary.get('preempted')
  h.assert_same_state(reference, workdir, STEPS)


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_is_bit_identical(tmp_path, digits_dir, reference):
  """Killed (1) between saves, (2) while an async save is being written (before Orbax
  finalises it), (3) at a random moment; the final restart finishes the run."""
  workdir = tmp_path / 'run'
  lost = []

  # (1) While training, just after the step-6 save call returned (Orbax finalises a save
  # before it starts the next one, so step 4 is complete; step 6 may still be in flight).
  child = h.Child(h.flags(STEPS, workdir, digits_dir))
  child.wait_for('SAVE_RETURNED 6')
  child.proc.kill()
  child.finish()
  assert h.saved_steps(workdir)[-1] in (4, 6)

  # (2) During the async write of the next save: the commit waits 30 s, the kill lands in it.
  before = h.saved_steps(workdir)
  child = h.Child(h.flags(STEPS, workdir, digits_dir), runner_args=('--slow_commit=30',))
  pending = child.wait_for('COMMIT_PENDING')
  child.proc.kill()
  child.finish()
  pending_step = int(re.search(r'(\d+)', pending.split()[-1]).group(1))
  assert pending_step not in h.saved_steps(workdir)  # Never finalised: not a checkpoint.
  assert h.saved_steps(workdir)[-1] == before[-1]
  lost.append(pending_step - before[-1])

  # (3) A random moment of a restarted run (start-up, compilation or training).
  child = h.Child(h.flags(STEPS, workdir, digits_dir))
  time.sleep(random.Random(0).uniform(5.0, 25.0))
  child.proc.kill()
  child.finish()

  # The final restart completes the run on the reference trajectory.
  child = h.Child(h.flags(STEPS, workdir, digits_dir), log_path=tmp_path / 'final.log')
  assert child.finish() == 0, child.stderr_tail()
  assert f'Done: {STEPS} steps' in child.stdout()
  assert h.saved_steps(workdir)[-1] == STEPS
  h.assert_same_state(reference, workdir, STEPS)
  assert all(0 < n <= 2 for n in lost)  # At most checkpoint_every steps are lost.
