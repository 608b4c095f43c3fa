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

# Segfaults whenever it runs in an xdist worker; passes in a plain pytest process.
CRASH_IN_WORKERS = '''
import os, signal

def test_crashes_in_workers():
  if os.environ.get('PYTEST_XDIST_WORKER'):
    os.kill(os.getpid(), signal.SIGSEGV)
'''

# Each test appends its name to a log (the order the workers ran them in).
LOGGED = '''
import os, signal, time

def _log(name):
  with open(os.path.join(os.path.dirname(__file__), 'order.log'), 'a') as f:
    f.write(name + '\\n')

def test_0():
  _log(__name__ + '.0'); time.sleep(0.3)

def test_1():
  mark = os.path.join(os.path.dirname(__file__), 'ran_once')
  if __name__.endswith('test_a') and not os.path.exists(mark):
    open(mark, 'w').close()
    os.kill(os.getpid(), signal.SIGSEGV)
  _log(__name__ + '.1'); time.sleep(0.3)

def test_2():
  _log(__name__ + '.2'); time.sleep(0.3)

def test_3():
  _log(__name__ + '.3'); time.sleep(0.3)
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


def test_a_crashed_test_that_passes_in_the_replacement_worker_passes(tmp_path):
  out = run_suite(tmp_path, {'test_a.py': CRASH_ONCE})
  text = out.stdout + out.stderr
  assert out.returncode == 0, text
  assert 'failed only because their worker process crashed' in text
  assert 'test_a.py::test_crashes_once; each passed when xdist ran it again' in text, text
  assert 'Running them once more' not in text


def test_a_test_that_crashes_in_every_worker_is_rerun_alone_and_passes(tmp_path):
  out = run_suite(tmp_path, {'test_a.py': CRASH_IN_WORKERS})
  text = out.stdout + out.stderr
  assert out.returncode == 0, text
  assert 'Running them once more, alone' in text and 'test_a.py::test_crashes_in_workers' in text
  assert 'passed on their rerun' in text


def test_the_crashed_file_goes_to_the_front_of_the_queue(tmp_path):
  files = {f'test_{c}.py': LOGGED for c in 'abcdefg'}
  out = run_suite(tmp_path, files)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text
  order = (tmp_path / 'order.log').read_text().split()
  assert sorted(order) == sorted(f'test_{c}.{i}' for c in 'abcdefg' for i in range(4)), order
  # xdist alone queues a crashed file's unfinished tests after every other file.
  assert order.index('test_a.1') < order.index('test_g.0'), order


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
