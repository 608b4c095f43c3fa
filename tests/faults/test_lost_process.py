"""A process of a real 2-process job (jax.distributed, gloo collectives on the CPU) dies: the
survivor stops within config.distributed.peer_timeout_s, leaves its last word in the log and
<workdir>/failure.txt, exits 75; rerunning both processes resumes from the newest finalized
checkpoint and ends bit-identical to an uninterrupted 2-process run.

The watchdog's rules (silence, 'done', 'failed', an unreachable coordinator) are checked with
a fake key-value store and clock in tests/test_liveness.py.
"""
import os
import time

import pytest

import _harness as h

STEPS = 8
PEER_TIMEOUT = 4
DISTRIBUTED = {'distributed.peer_timeout_s': PEER_TIMEOUT, 'distributed.heartbeat_timeout_s': 30}


def _finish(children, timeout=300) -> list[int]:
  return [c.finish(timeout=timeout) for c in children]


@pytest.mark.slow
def test_dead_process_ends_the_job_with_a_last_word_and_the_rerun_resumes(tmp_path, digits_dir):
  reference = tmp_path / 'reference'
  argv = lambda workdir: h.flags(STEPS, workdir, digits_dir, **DISTRIBUTED)  # noqa: E731
  rcs = _finish(h.job(argv(reference), log_dir=tmp_path))
  assert rcs == [0, 0], open(tmp_path / 'process0.stderr').read()[-3000:]

  workdir = tmp_path / 'faulty'
  survivor, victim = h.job(argv(workdir), log_dir=tmp_path)
  survivor.wait_for('STEP 5')
  victim.proc.kill()
  killed_at = time.time()
  rc = survivor.finish(timeout=120)
  detected_after = time.time() - killed_at
  victim.finish()
  stderr = survivor.stderr_tail()
  assert rc == 75, stderr
  # Bounded: the timeout, plus a beat or two of the watchdog and the process's exit.
  assert detected_after < PEER_TIMEOUT + 8, detected_after
  finalized = h.saved_steps(workdir)
  last_word = (workdir / 'failure.txt').read_text()
  print(last_word, f'\n(detected after {detected_after:.1f} s)')
  assert last_word.startswith('Process 1 of 2 was lost: ')
  assert 'This process (0) stopped at step ' in last_word
  assert f'Newest finalized checkpoint: step {finalized[-1]}' in last_word
  assert 'start all 2 processes again with the same command' in last_word
  assert last_word.strip() in stderr  # The terminal shows it, plainly.
  assert 'Process 1 of 2 was lost' in (workdir / 'log.txt').read_text()
  assert 'Fatal Python error' not in stderr and 'Check failure stack trace' not in stderr

  rcs = _finish(h.job(argv(workdir), log_dir=tmp_path))
  assert rcs == [0, 0], open(tmp_path / 'process0.stderr').read()[-3000:]
  # The last word moved into the log of the rerun, which says it resumed after it.
  assert not (workdir / 'failure.txt').exists()
  assert 'The previous run of this workdir ended with:\nProcess 1 of 2 was lost' in (
      workdir / 'log.txt').read_text()
  h.assert_same_state(reference, workdir, STEPS)
  assert os.path.isdir(workdir / 'checkpoints' / str(STEPS))
