"""Test setup: 8 fake CPU devices so that every sharding code path runs for real.

XLA reads XLA_FLAGS once, when the backend starts, so this must happen before
anything imports jax. TensorFlow is kept off any accelerator and quiet.
"""
import os
import sys

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

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
  del config
  assert jax.device_count() == 8, (
      f"tests need 8 fake CPU devices, got {jax.device_count()}; is jax imported before conftest?")


@pytest.fixture(autouse=True)
def _f32_matmuls():
  """Exact float32 matmuls so that equality tests are about the code, not the precision."""
  with jax.default_matmul_precision("float32"):
    yield
