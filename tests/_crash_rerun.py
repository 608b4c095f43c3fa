"""A test whose xdist worker died (a segfault) is run once more, alone, in a fresh process.

Why: jaxlib's CPU backend has crashed a test worker inside XLA itself, not in the project's code:
once deserializing an entry of the persistent compilation cache, once serializing an executable
into it (`executable.serialize()` in jax/_src/compilation_cache.py, CI of 2026-12). xdist then
reports the test running on that worker as failed ("node down"), and the whole suite fails for a
crash that the test did not cause. pytest-rerunfailures can reschedule such a test, but not under
`--dist loadfile`, which `make test` uses (the scheduler cannot put one test back in a file's
queue).

What this plugin does, in the xdist controller only:
- it notes every test whose worker crashed (xdist's `pytest_handlecrashitem`), and moves the rest
  of that test's file to the front of xdist's queue: xdist puts it back at the end, where, in a
  queue ordered slowest file first, one worker would run a slow file alone while the other idles
  (the CI run of 2026-12-07 ran out of time that way);
- xdist itself runs the crashed test again, in the replacement worker, with the rest of its file:
  a crashed test that passed there, with no other failure in the run, makes the run pass;
- a crashed test that was not run again (the crash was the run's last word) is run once more in
  one fresh pytest process (no workers, the same options file and environment), and the suite
  passes only if it passes there. A test that crashes again, or any ordinary failure (an
  assertion, an error, a timeout), fails the suite as before: nothing but a crashed worker is
  retried, and the crash stays in the report as a failure.
- HEPTAPOD_RERUN_CRASHED=0 turns it off (the rerun itself runs with it off).
"""
import os
import subprocess
import sys

import pytest

ENV = 'HEPTAPOD_RERUN_CRASHED'


class CrashRerun:

  def __init__(self, config):
    self.config = config
    self.crashed: list[str] = []
    self.failed: set[str] = set()  # Ordinary failures: never retried.
    self.passed_again: set[str] = set()  # Crashed tests that then passed in the same run.
    self.verdict: str | None = None  # Said again as the run's last line.

  def pytest_handlecrashitem(self, crashitem, report, sched):
    del report
    if crashitem not in self.crashed:
      self.crashed.append(crashitem)
    self.passed_again.discard(crashitem)
    # xdist requeued the crashed file's unfinished tests at the end of its queue: to the front.
    queue, split = getattr(sched, 'workqueue', None), getattr(sched, '_split_scope', None)
    if queue is not None and split is not None and split(crashitem) in queue:
      queue.move_to_end(split(crashitem), last=False)

  def pytest_runtest_logreport(self, report):
    crash = report.when not in ('setup', 'call', 'teardown')  # xdist's report of a dead worker.
    if report.failed and not crash:
      self.failed.add(report.nodeid)
    elif report.passed and report.when == 'call' and report.nodeid in self.crashed:
      self.passed_again.add(report.nodeid)

  @pytest.hookimpl(trylast=True)
  def pytest_sessionfinish(self, session, exitstatus):
    if exitstatus != pytest.ExitCode.TESTS_FAILED or not self.crashed or self.failed:
      return
    say = self.config.get_terminal_writer().line
    say('')
    rerun = [t for t in self.crashed if t not in self.passed_again]
    if not rerun:
      self.verdict = (f'{len(self.crashed)} test(s) failed only because their worker process '
                      f'crashed (tests/_crash_rerun.py): {", ".join(self.crashed)}; each passed '
                      'when xdist ran it again in the replacement worker, and nothing else '
                      'failed: the suite passes (exit status 0; the crash is reported above as '
                      'a failure, not hidden).')
      session.exitstatus = pytest.ExitCode.OK
      say(self.verdict, green=True, bold=True)
      return
    say(f'{len(rerun)} test(s) failed only because their worker process crashed '
        f'(tests/_crash_rerun.py): {", ".join(rerun)}. Running them once more, alone, '
        f'in a fresh process.', yellow=True, bold=True)
    argv = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
            '--rootdir', str(self.config.rootpath), *rerun]
    rc = subprocess.run(argv, cwd=str(self.config.invocation_params.dir),
                        env=dict(os.environ, **{ENV: '0'})).returncode
    if rc == 0:
      self.verdict = ('The crashed test(s) passed on their rerun: the suite passes (exit status '
                      '0; the crash is reported above as a failure, not hidden).')
      session.exitstatus = pytest.ExitCode.OK
    else:
      self.verdict = f'The crashed test(s) failed again on their rerun (pytest exit status {rc}).'
    say(self.verdict, green=rc == 0, red=rc != 0, bold=True)

  def pytest_unconfigure(self, config):
    if self.verdict:
      config.get_terminal_writer().line(self.verdict, bold=True)


def register(config) -> None:
  """Registers the plugin in an xdist controller (workers and plain runs need none)."""
  if (os.environ.get(ENV, '1') == '0' or hasattr(config, 'workerinput')
      or not config.pluginmanager.hasplugin('xdist') or not config.getoption('numprocesses', None)):
    return
  config.pluginmanager.register(CrashRerun(config), 'heptapod-crash-rerun')
