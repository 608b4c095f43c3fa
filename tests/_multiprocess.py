"""The environment of the child processes that form one multi-process JAX job in a test.

JAX's persistent compilation cache (tests/conftest.py points every test process at one) keys a
CPU executable by the program, the XLA flags, the compile options and the device kinds. Nothing
in that key says whether the program was compiled for one process or for several joined by
jax.distributed with gloo collectives, yet the executables differ. The children of a
multi-process job therefore share a cache of their own, next to the suite's.
"""
import os


def multiprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
  """`env` (default: this process's environment) with the multi-process compilation cache."""
  env = dict(os.environ if env is None else env)
  cache = env.get('JAX_COMPILATION_CACHE_DIR')
  if cache:
    env['JAX_COMPILATION_CACHE_DIR'] = cache.rstrip('/') + '-multiprocess'
  return env
