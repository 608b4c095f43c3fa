"""Fault drill: inject each fault several times into a tiny training run and check recovery.

  python benchmarks/fault_drill.py [--trials=3] [--steps=12]

For every fault kind, each trial starts from an empty workdir, injects the fault into a
child process running `python -m heptapod_jax.main` (through tests/faults/runner.py, which
prints a line per step and can hold Orbax's background commit open), restarts the run
until it completes, and compares the final train state with an uninterrupted run of the
same config. Columns:

  recovered   the final state is bit-identical to the uninterrupted run (same batches, same
              parameters, optimizer state, EMA and RNG);
  steps lost  updates done before the fault that had to be redone (mean over trials);
  data lost   trials whose final state differs from the uninterrupted run's: a lost or
              repeated batch, or a lost checkpoint, would show there (must be 0).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import time

# The drilled run uses 8 CPU devices (mesh 4 x 2), in this process and in the children.
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
from heptapod_jax import console  # noqa: E402
console.quiet_dependencies()  # Before TensorFlow loads: its start-up notices.

from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'tests', 'faults'))
import _harness as h  # noqa: E402

_TRIALS = flags.DEFINE_integer('trials', 3, 'Trials per fault kind.')
_STEPS = flags.DEFINE_integer('steps', 12, 'Training steps of the drilled run.')
_KINDS = flags.DEFINE_list('kinds', ['sigterm', 'sigkill_training', 'sigkill_async_save'],
                           'Fault kinds to drill.')


def _last_step(child: h.Child) -> int:
  steps = [int(line.split()[1]) for line in child.lines if line.startswith('STEP ')]
  return steps[-1] if steps else 0


def _inject(kind: str, workdir: str, data_dir: str, rng: random.Random) -> tuple[int, list[int]]:
  """Runs one faulty child; returns (updates done before the fault, complete checkpoints)."""
  steps = _STEPS.value
  if kind == 'sigterm':
    child = h.Child(h.flags(steps, workdir, data_dir))
    child.wait_for(f'STEP {rng.randint(1, steps - 2)}')
    child.proc.send_signal(signal.SIGTERM)
  elif kind == 'sigkill_training':
    child = h.Child(h.flags(steps, workdir, data_dir))
    child.wait_for(f'STEP {rng.randint(1, steps - 2)}')
    time.sleep(rng.uniform(0.0, 0.5))
    child.proc.kill()
  elif kind == 'sigkill_async_save':
    child = h.Child(h.flags(steps, workdir, data_dir), runner_args=('--slow_commit=30',))
    for _ in range(rng.randint(1, steps // 2 - 1)):
      child.wait_for('COMMIT_PENDING')
    child.proc.kill()
  else:
    raise ValueError(f'unknown fault kind {kind!r}')
  child.finish()
  return _last_step(child), h.saved_steps(workdir)


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix='fault_drill_')
  data_dir = os.path.join(root, 'tfds')
  # The terminal: a progress bar over the trials and a line per trial; the records of the
  # uninterrupted reference run go to <root>/log.txt (removed with the drill's files).
  console.setup(root)
  console.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  from heptapod_jax import train
  from heptapod_jax.data import builtin
  builtin.prepare(data_dir)
  reference = os.path.join(root, 'reference')
  console.say(f'reference: an uninterrupted run of {_STEPS.value} steps in {reference}')
  train.train_and_evaluate(h.config(_STEPS.value, data_dir), reference)
  rng = random.Random(0)
  rows = []
  bar = console.progress(len(_KINDS.value) * _TRIALS.value, desc='fault drill', unit='trial',
                         every=1)
  for kind in _KINDS.value:
    recovered, lost_steps, lost_data = 0, [], 0
    for trial in range(_TRIALS.value):
      workdir = os.path.join(root, f'{kind}_{trial}')
      done, complete = _inject(kind, workdir, data_dir, rng)
      resumed_from = complete[-1] if complete else 0
      lost_steps.append(max(done - resumed_from, 0))
      final = h.Child(h.flags(_STEPS.value, workdir, data_dir))
      rc = final.finish()
      try:
        assert rc == 0
        h.assert_same_state(reference, workdir, _STEPS.value)
        recovered += 1
      except AssertionError:
        lost_data += 1
      console.say(f'  {kind} trial {trial}: fault after {done} updates, resumed from step '
                  f'{resumed_from}, exit {rc}')
      bar.update(bar.n + 1, recovered=f'{sum(r[2] for r in rows) + recovered}/{bar.n + 1}')
    rows.append((kind, _TRIALS.value, recovered, sum(lost_steps) / len(lost_steps), lost_data))
  bar.close()
  print(f'\n{"fault injected":22s} {"runs tried":>10s} {"recovered":>10s} '
        f'{"steps lost (mean)":>18s} {"data lost":>10s}')
  for kind, tried, ok, lost, data in rows:
    print(f'{kind:22s} {tried:10d} {ok:10d} {lost:18.1f} {data:10d}')
  print(f'(tiny demo config, {_STEPS.value} steps, checkpoint every 2, async saves)')
  shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
