"""Sampling without the KV cache (the benchmark baseline) draws exactly the cached sampler's
tokens: the cache is an optimisation, never a change of the distribution."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from heptapod_jax.sampling import decode as sampling

from test_model import N, setup_model


def _both(model, params, labels, keys, config):
  """(cached, uncached) samples of the same labels and keys."""
  run = lambda c: jax.jit(functools.partial(sampling.sample, model, config=c))(params, labels, keys)
  return run(config), run(dataclasses.replace(config, use_kv_cache=False))


GRID = (5, 5)  # N - 1 = 24 steps: three runs of recomputed prefixes (recompute_runs).


@pytest.mark.parametrize('kind', ['global', 'local', 'next_token'])
@pytest.mark.parametrize('config', [
    sampling.SamplingConfig(temperature=0.0), sampling.SamplingConfig(temperature=1.0),
], ids=['greedy', 'temperature'])
def test_no_cache_sampling_equals_cached(kind, config):
  assert len(sampling.recompute_runs(GRID[0] * GRID[1])) > 1
  model, params = setup_model(kind, grid_size=GRID)
  labels = np.array([0, 3, 4, 1], np.int32)
  keys = sampling.example_keys(5, np.arange(4))
  cached, uncached = _both(model, params, labels, keys, config)
  np.testing.assert_array_equal(cached, uncached)
  if config.temperature > 0:  # Not a degenerate draw: the rows differ.
    assert len({tuple(row) for row in np.asarray(cached)}) > 1


def test_no_cache_sampling_equals_cached_top_k_top_p():
  model, params = setup_model('next_token')
  labels = np.array([0, 3, 4], np.int32)
  keys = sampling.example_keys(2, np.arange(3))
  cached, uncached = _both(model, params, labels, keys,
                           sampling.SamplingConfig(temperature=1.5, top_k=5, top_p=0.9))
  np.testing.assert_array_equal(cached, uncached)


def test_no_cache_sampling_equals_cached_with_cfg_and_one_key():
  model, params = setup_model('global', backbone=dict(class_dropout=0.1))
  labels = np.array([2, 0], np.int32)
  cached, uncached = _both(model, params, labels, jax.random.key(3),
                           sampling.SamplingConfig(temperature=1.0, cfg_scale=2.0))
  np.testing.assert_array_equal(cached, uncached)


@pytest.mark.parametrize('kind, grid', [('global', GRID), ('local', (3, 4))])
def test_no_cache_sampling_equals_cached_continuous(kind, grid):
  model, params = setup_model(kind, grid_size=grid, tokens='kl', token_dim=4,
                              diffusion=dict(width=32, depth=1, num_sampling_steps=5))
  labels = np.array([0, 2], np.int32)
  keys = sampling.example_keys(1, np.arange(2))
  cached, uncached = _both(model, params, labels, keys, sampling.SamplingConfig())
  # Latents are floats: equal up to the rounding of two different backbone schedules.
  np.testing.assert_allclose(cached, uncached, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n', [2, 3, N, 25, 64, 256, 1024])
def test_recompute_runs_cover_every_step(n):
  runs = sampling.recompute_runs(n)
  steps = [t for lo, hi in runs for t in range(lo, hi)]
  assert steps == list(range(n - 1))  # Each step once, in order, with h_{t+1} in its prefix.
  assert runs[-1][1] == n - 1 and len(runs) <= sampling.NO_CACHE_SEGMENTS
  assert all(hi - lo >= sampling.NO_CACHE_MIN_RUN for lo, hi in runs) or len(runs) == 1
  tokens = sum((hi - lo) * hi for lo, hi in runs)  # Grid tokens through the backbone.
  if n >= 256:  # Eight runs: (1 + 1/8) / 2 of rerunning the whole sequence.
    assert tokens <= 0.57 * n * n
