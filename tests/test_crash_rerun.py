"""tests/_crash_rerun.py on a real xdist run (two workers, --dist loadfile, as `make test`): a
test whose worker dies of a segfault is rerun once, alone; nothing else is ever retried."""
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f'''
import sys
sys.path.insert(0, {TESTS!r})
import _crash_rerun

def pytest_configure(config):
  _crash_rerun.register(config)
'''

# Segfaults its process the first time it runs (a file marks that it ran), passes afterwards.
CRASH_ONCE = '''
import os, signal

def test_crashes_once():
  mark = os.path.join(os.path.dirname(__file__), 'ran_once')
  if not os.path.exists(mark):
    open(mark, 'w').close()
    os.kill(os.getpid(), signal.SIGSEGV)

def test_fine_after():
  pass
'''

CRASH_ALWAYS = '''
import os, signal

def test_crashes_always():
  os.kill(os.getpid(), signal.SIGSEGV)
'''

FAILS = '''
def test_plain_failure():
  assert 1 == 2
'''


def run_suite(tmp_path, files: dict, **env):
  for name, text in dict(files, **{'conftest.py': CONFTEST}).items():
    (tmp_path / name).write_text(text)
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(('PYTEST_', 'HEPTAPOD_RERUN'))}
  return subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-n', '2', '--dist', 'loadfile',
       '-p', 'no:cacheprovider', '-p', 'no:randomly', '--rootdir', str(tmp_path), str(tmp_path)],
      cwd=str(tmp_path), env=dict(environ, **env), capture_output=True, text=True, timeout=300)


def test_a_crashed_test_is_rerun_once_and_passes(tmp_path):
  out = run_suite(tmp_path, {'test_a.py': CRASH_ONCE})
  text = out.stdout + out.stderr
  assert out.returncode == 0, text
  assert 'failed only because their worker process crashed' in text
  assert 'test_a.py::test_crashes_once' in text and 'passed on their rerun' in text


def test_a_test_that_crashes_again_fails_the_suite(tmp_path):
  out = run_suite(tmp_path, {'test_a.py': CRASH_ALWAYS})
  text = out.stdout + out.stderr
  assert out.returncode == 1, text
  assert 'failed again on their rerun' in text


def test_ordinary_failures_are_never_retried(tmp_path):
  out = run_suite(tmp_path, {'test_a.py': CRASH_ONCE, 'test_b.py': FAILS})
  text = out.stdout + out.stderr
  assert out.returncode == 1, text
  assert 'Running them once more' not in text and 'test_plain_failure' in text


def test_turned_off_by_the_environment(tmp_path):
  out = run_suite(tmp_path, {'test_a.py': CRASH_ONCE}, HEPTAPOD_RERUN_CRASHED='0')
  text = out.stdout + out.stderr
  assert out.returncode == 1, text
  assert 'Running them once more' not in text
