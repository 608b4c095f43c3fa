"""Runs `heptapod_jax.main` in a child process with fault-injection hooks (tests only).

  python tests/faults/runner.py [--slow_commit=SECONDS] -- --config=... --workdir=... [flags]

Hooks (each prints a marker line to stdout, flushed, so the parent can time a signal):
  STEP <step>              after each update (the trainer's progress report);
  SAVE_RETURNED <step>     after the trainer's checkpoint save call returns (an async save
                           may still be writing);
  COMMIT_PENDING <step>    inside Orbax's background commit, before the save is finalised;
                           with --slow_commit it then sleeps, so a kill lands mid-save.
"""
import os
import sys
import time


def main():
  argv = sys.argv[1:]
  slow = 0.0
  if '--' in argv:
    ours, argv = argv[:argv.index('--')], argv[argv.index('--') + 1:]
    for arg in ours:
      if arg.startswith('--slow_commit='):
        slow = float(arg.split('=', 1)[1])
  from orbax.checkpoint._src.checkpointers import async_checkpointer
  from heptapod_jax.training import trainlib

  original_save = trainlib.TolerantSaver.save

  def save(self, step, *args, **kwargs):
    out = original_save(self, step, *args, **kwargs)
    print(f'SAVE_RETURNED {step}', flush=True)
    return out

  trainlib.TolerantSaver.save = save

  from clu import periodic_actions
  original_report = periodic_actions.ReportProgress.__call__

  def report(self, step, *args, **kwargs):
    print(f'STEP {step}', flush=True)
    return original_report(self, step, *args, **kwargs)

  periodic_actions.ReportProgress.__call__ = report

  original_make = async_checkpointer.AsyncCheckpointer._make_on_commit_callback

  def make(self, tmpdir, *args, **kwargs):
    callback = original_make(self, tmpdir, *args, **kwargs)

    def delayed():
      print(f'COMMIT_PENDING {os.path.basename(str(tmpdir.get()))}', flush=True)
      time.sleep(slow)
      callback()

    return delayed

  async_checkpointer.AsyncCheckpointer._make_on_commit_callback = make

  from absl import app
  from heptapod_jax import main as entry
  sys.argv = ['heptapod_jax.main'] + argv
  app.run(entry.main)


if __name__ == '__main__':
  main()
