"""Test setup: 8 fake CPU devices so that every sharding code path runs for real.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before
anything imports jax. TensorFlow is kept off any accelerator and quiet.
"""
import os
import sys
import tempfile

from heptapod_jax.console import host_cpu_fingerprint  # No jax import: safe here.

# TensorFlow and Triton (pulled in by torchvision -> torch._dynamo) each bundle their own
# LLVM; loading Triton into a process that already holds TensorFlow segfaults. The tests use
# PyTorch on the CPU only, so Triton is never needed: make `import triton` fail cleanly
# (torch then reports it as absent).
sys.modules.setdefault('triton', None)

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# JAX's persistent compilation cache: the suite compiles the same tiny programs many times,
# above all in the child processes of the fault and multi-host tests (every restart compiles
# the train step again). Set here, in the environment, so that those children share it.
# Executables are keyed by the program, the flags and the jax version (and, through the
# directory name, the host CPU): results are unchanged. CI points JAX_COMPILATION_CACHE_DIR at
# a fresh folder, so that a run never reads what an earlier run left behind.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(),
    f"heptapod-jax-tests-xla-cache-{os.getuid()}-{host_cpu_fingerprint()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The suite's programs are tiny and most run a few times: compiling them dominates its time, and
# XLA's optimisations cost more than they save. Measured on one core of a 2-core Intel Xeon, a
# fresh cache each: test_sharded_matches_unsharded[global] 154 s -> 72 s, the KL trainer test
# 278 s -> 205 s, the preemption drills 182 s -> 167 s; the convolutional tokenizer's GAN + LPIPS
# training, which runs more than it compiles, 206 s -> 240 s. Every equality the tests check
# compares programs compiled under the same options, and the tolerances against references
# hold; the benchmarks and the code users run keep XLA's defaults.
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import socket  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

import _crash_rerun  # noqa: E402


class NetworkAccessInTests(RuntimeError):
  """A test reached for the network (a download?): the tests run offline, from files."""


_connect = socket.socket.connect


def _loopback_only(sock, address):
  """socket.connect for this process's tests: loopback (multi-process tests) and Unix sockets
  only; anything else, a download by a data set builder for one, fails loudly here."""
  host = address[0] if isinstance(address, tuple) else None
  if sock.family == getattr(socket, 'AF_UNIX', None) or host in ('localhost', '::1') or (
      isinstance(host, str) and host.startswith('127.')):
    return _connect(sock, address)
  raise NetworkAccessInTests(f'a test tried to connect to {address}: the tests never use the '
                             'network (data sets and weights come from files).')


socket.socket.connect = _loopback_only


def pytest_configure(config):
  _crash_rerun.register(config)  # A test whose worker crashed gets one rerun, alone.
  assert jax.device_count() == 8, (
      f"tests need 8 fake CPU devices, got {jax.device_count()}; is jax imported before conftest?")


@pytest.fixture(autouse=True)
def _f32_matmuls():
  """Exact float32 matmuls so that equality tests are about the code, not the precision."""
  with jax.default_matmul_precision("float32"):
    yield


# ------------------------------------------------------------------ scheduling the files
# `make test` runs two pytest-xdist workers with --dist loadfile (a file's tests on one worker)
# and --no-loadscope-reorder (xdist would otherwise queue the files with the most tests first,
# which put the slowest single-test files, the fault drills, at the very end, one worker busy
# while the other idles). Here the files are queued slowest first (longest-processing-time
# scheduling), from the per-file seconds of an earlier run in tests/file_durations.json; a
# file not listed there counts as the median. The order changes when a test runs, never what
# it checks. `make test-durations` measures the file anew.
_DURATIONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "file_durations.json")
_DURATIONS_OUT = "HEPTAPOD_TEST_DURATIONS_OUT"  # where a run writes its per-file seconds


def _file_of(nodeid: str) -> str:
  return nodeid.split("::", 1)[0]


def _known_durations() -> dict:
  import json
  try:
    with open(_DURATIONS_FILE) as f:
      return {k: float(v) for k, v in json.load(f)["seconds"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    print(f"conftest: {_DURATIONS_FILE} unreadable ({e}); files keep their collection order",
          file=sys.stderr)
    return {}


def pytest_collection_modifyitems(session, config, items):
  del session, config
  known = _known_durations()
  if not known:
    return
  default = sorted(known.values())[len(known) // 2]
  first = {}
  for i, item in enumerate(items):
    first.setdefault(_file_of(item.nodeid), i)
  # Stable: a file's own tests keep their order.
  items.sort(key=lambda item: (-known.get(_file_of(item.nodeid), default),
                               first[_file_of(item.nodeid)]))


_seconds_by_file: dict = {}


def pytest_runtest_logreport(report):
  """Adds up setup, call and teardown per file (in the controller, every worker's reports)."""
  if os.environ.get(_DURATIONS_OUT):
    file = _file_of(report.nodeid)
    _seconds_by_file[file] = _seconds_by_file.get(file, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
  out = os.environ.get(_DURATIONS_OUT)
  if not out or hasattr(session.config, "workerinput") or not _seconds_by_file:
    return  # Not asked, or an xdist worker (the controller has every report).
  import json
  with open(out, "w") as f:
    json.dump({"about": f"per-file seconds (setup + call + teardown) of one run of the suite, "
                        f"exit status {int(exitstatus)}; tests/conftest.py queues the slowest "
                        f"files first",
               "seconds": {k: round(v, 1) for k, v in sorted(
                   _seconds_by_file.items(), key=lambda kv: -kv[1])}}, f, indent=1)
    f.write("\n")
