"""Sampling without the KV cache (the benchmark baseline) draws exactly the cached sampler's
tokens: the cache is an optimisation, never a change of the distribution."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from heptapod_jax import sampling

from test_model import setup_model


@pytest.mark.parametrize('kind', ['global', 'local', 'next_token'])
@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_no_cache_sampling_equals_cached(kind, temperature):
  model, params = setup_model(kind)
  labels = np.array([0, 3, 4, 1], np.int32)
  keys = sampling.example_keys(5, np.arange(4))
  config = sampling.SamplingConfig(temperature=temperature)
  cached = jax.jit(functools.partial(sampling.sample, model, config=config))(params, labels, keys)
  uncached = jax.jit(functools.partial(
      sampling.sample, model, config=dataclasses.replace(config, use_kv_cache=False)))(
          params, labels, keys)
  np.testing.assert_array_equal(cached, uncached)


def test_no_cache_sampling_equals_cached_continuous():
  model, params = setup_model('global', tokens='kl', token_dim=4,
                              diffusion=dict(width=32, depth=1, num_sampling_steps=5))
  labels = np.array([0, 2], np.int32)
  keys = sampling.example_keys(1, np.arange(2))
  a = jax.jit(functools.partial(sampling.sample, model))(params, labels, keys)
  b = jax.jit(functools.partial(sampling.sample, model,
                                config=sampling.SamplingConfig(use_kv_cache=False)))(
                                    params, labels, keys)
  np.testing.assert_allclose(a, b, atol=1e-5)
