"""Fixtures of the fault-injection suite."""
import pytest

from heptapod_jax.data import builtin


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """The built-in data set, prepared once for every test of the suite."""
  path = str(tmp_path_factory.mktemp('tfds'))
  builtin.prepare(path)
  return path
