"""Test setup: 8 fake CPU devices so that every sharding code path runs for real.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before
anything imports jax. TensorFlow is kept off any accelerator and quiet.
"""
import hashlib
import os
import platform
import sys
import tempfile

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


def _host_cpu_fingerprint() -> str:
  """A short hash of this host's CPU model and instruction-set flags.

  XLA compiles CPU executables for the host's own instruction set, and JAX's cache key holds
  the program, the flags and the jax version but not the CPU: an entry written on one machine
  (an Intel with AVX-512/AMX) and read on another (an AMD EPYC) can crash the reading process
  when it is deserialized. Machines whose /tmp outlives a change of processor therefore keep
  one cache per CPU.
  """
  lines = []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key = line.split(':', 1)[0].strip()
        if key in ('vendor_id', 'model name', 'flags', 'Features', 'CPU part'):
          lines.append(line.strip())
          if key in ('flags', 'Features'):
            break  # the first core's description is the host's
  except OSError:
    lines.append(platform.processor() or platform.machine())
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:12]


# JAX's persistent compilation cache: the suite compiles the same tiny programs many times,
# above all in the child processes of the fault and multi-host tests (every restart compiles
# the train step again). Set here, in the environment, so that those children share it.
# Executables are keyed by the program, the flags and the jax version (and, through the
# directory name, the host CPU): results are unchanged. CI points JAX_COMPILATION_CACHE_DIR at
# a fresh folder, so that a run never reads what an earlier run left behind.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(),
    f"heptapod-jax-tests-xla-cache-{os.getuid()}-{_host_cpu_fingerprint()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import socket  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


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
  del config
  assert jax.device_count() == 8, (
      f"tests need 8 fake CPU devices, got {jax.device_count()}; is jax imported before conftest?")


@pytest.fixture(autouse=True)
def _f32_matmuls():
  """Exact float32 matmuls so that equality tests are about the code, not the precision."""
  with jax.default_matmul_precision("float32"):
    yield
