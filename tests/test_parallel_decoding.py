"""Parallel decoding (`SamplingConfig.parallel_tokens = k`): k = 1 is the one-token sampler
bit for bit, a multi-token cached decode gives the teacher-forced states, and every token of
a chunk is drawn from the head's marginal at the chunk's first step."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax import config_lib
from heptapod_jax.models.heptapod import Heptapod, split_layers
from heptapod_jax.models.transformer import init_cache
from heptapod_jax.sampling import decode as sampling

from test_model import N, VOCAB, setup_model

LABELS = np.array([0, 3, 4, 1], np.int32)
CFG_MODEL = dict(backbone=dict(class_dropout=0.1))  # CFG needs a model with a null class.


def _sample(model, params, labels, rng, config):
  return jax.jit(functools.partial(sampling.sample, model, config=config))(params, labels, rng)


def _one_token_reference(model, params, labels, keys, config):
  """The raster sampler written out step by step (teacher-forced states of the tokens drawn
  so far, the head at step t for position t): what `parallel_tokens=1` must reproduce."""
  variables = {'params': params}
  use_cfg = config.cfg_scale != 1.0
  if use_cfg:
    labels = jnp.concatenate([labels, jnp.full_like(labels, model.config.num_classes)])
  drawn = jnp.zeros((labels.shape[0], N), jnp.int32)
  states = model.apply(variables, drawn, labels, method=Heptapod.states)
  tokens = []
  for t in range(N):
    steps = jnp.full((labels.shape[0], 1), t, jnp.int32)
    logits = model.apply(variables, states, steps, steps[..., None],
                         method=Heptapod.head_logits)[:, 0, 0]
    if use_cfg:
      cond, uncond = jnp.split(logits, 2)
      logits = uncond + config.cfg_scale * (cond - uncond)
    token = sampling.sample_logits(sampling.fold_in(keys, t), logits, config)
    tokens.append(token)
    drawn = drawn.at[:, t].set(jnp.concatenate([token, token]) if use_cfg else token)
    states = model.apply(variables, drawn, labels, method=Heptapod.states)
  return jnp.stack(tokens, axis=1)


@pytest.mark.parametrize('kind, over, config', [
    ('global', CFG_MODEL, sampling.SamplingConfig(temperature=1.0, cfg_scale=2.0)),
    ('local', {}, sampling.SamplingConfig(temperature=1.0, top_k=4)),
], ids=['global-cfg', 'local-top_k'])
def test_one_token_per_call_is_the_exact_sampler(kind, over, config):
  model, params = setup_model(kind, **over)
  keys = sampling.example_keys(7, np.arange(len(LABELS)))
  assert config.parallel_tokens == 1  # The default.
  got = _sample(model, params, LABELS, keys, dataclasses.replace(config, parallel_tokens=1))
  want = jax.jit(functools.partial(_one_token_reference, model, config=config))(
      params, LABELS, keys)
  np.testing.assert_array_equal(got, want)
  assert len({tuple(row) for row in np.asarray(got)}) > 1  # Not a degenerate draw.


def test_multi_token_cached_decode_equals_full_forward():
  model, params = setup_model('global')
  tokens = jax.random.randint(jax.random.key(3), (3, N), 0, VOCAB)
  labels = jnp.array([1, 0, 4], jnp.int32)
  chunks = [(0, 3), (3, 7), (7, 8), (8, 11)]  # Uneven runs covering x_0..x_{N-2}.

  @jax.jit
  def cached_states(params, tokens, labels):
    variables = {'params': params}
    layer_params = split_layers(params)['backbone']
    decode = lambda m, *args: m.backbone.decode(*args)
    prefix = model.config.backbone.class_prefix_len
    h0, cache = model.apply(variables, labels, None, 0, init_cache(model.config, 3), layer_params,
                            method=decode)
    out = [h0[:, -1:]]
    for lo, hi in chunks:
      h, cache = model.apply(variables, None, tokens[:, lo:hi], prefix + lo, cache, layer_params,
                             method=decode)
      out.append(h)
    return jnp.concatenate(out, axis=1)

  want = model.apply({'params': params}, tokens, labels, method=Heptapod.states)
  got = cached_states(params, tokens, labels)
  assert got.shape == want.shape == (3, N, model.config.backbone.width)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def _check_chunks_follow_step_marginals(model, params, labels, keys, tokens, config):
  """Every chunk [t, t+c) of `tokens` is what `sample_logits` draws, with the key of position
  t+i, from the head's logits at step t on the teacher-forced states of the same tokens."""
  k = config.parallel_tokens
  num_fed, last = sampling.chunk_plan(N, k)
  starts = np.arange(num_fed + 1) * k
  variables = {'params': params}
  use_cfg = config.cfg_scale != 1.0
  all_labels = np.concatenate([labels, np.full_like(labels, model.config.num_classes)]) \
      if use_cfg else labels
  all_tokens = np.concatenate([tokens, tokens]) if use_cfg else tokens
  states = model.apply(variables, all_tokens, all_labels, method=Heptapod.states)
  steps = jnp.broadcast_to(jnp.asarray(starts, jnp.int32), (len(all_labels), len(starts)))
  targets = jnp.minimum(steps[..., None] + jnp.arange(k), N - 1)
  logits = model.apply(variables, states, steps, targets, method=Heptapod.head_logits)
  if use_cfg:
    cond, uncond = jnp.split(logits, 2)
    logits = uncond + config.cfg_scale * (cond - uncond)
  for s, t in enumerate(starts):
    size = k if s < num_fed else last
    for i in range(size):
      want = sampling.sample_logits(sampling.fold_in(keys, int(t) + i), logits[:, s, i], config)
      np.testing.assert_array_equal(tokens[:, t + i], want, err_msg=f'position {t + i}')


@pytest.mark.parametrize('kind, over, config', [
    # 5 does not divide N = 12: chunks [0, 5), [5, 10), then the last [10, 12).
    ('global', {}, sampling.SamplingConfig(temperature=0.0, parallel_tokens=5)),
    ('local', {}, sampling.SamplingConfig(temperature=1.0, parallel_tokens=4)),  # k = window.
    ('global', CFG_MODEL, sampling.SamplingConfig(temperature=1.0, cfg_scale=3.0,
                                                  parallel_tokens=3)),
], ids=['global-greedy-k5', 'local-k4', 'global-cfg-k3'])
def test_chunks_are_drawn_from_the_head_marginals_of_their_first_step(kind, over, config):
  model, params = setup_model(kind, **over)
  keys = sampling.example_keys(11, np.arange(len(LABELS)))
  tokens = np.asarray(_sample(model, params, LABELS, keys, config))
  assert tokens.shape == (len(LABELS), N)
  _check_chunks_follow_step_marginals(model, params, LABELS, keys, tokens, config)
  # Position 0 is drawn as the one-token sampler draws it (same logits, same key).
  one = _sample(model, params, LABELS, keys, dataclasses.replace(config, parallel_tokens=1))
  np.testing.assert_array_equal(tokens[:, 0], np.asarray(one)[:, 0])


def test_parallel_tokens_without_cache_equals_cached():
  model, params = setup_model('global')
  config = sampling.SamplingConfig(temperature=1.0, parallel_tokens=2)
  keys = sampling.example_keys(4, np.arange(len(LABELS)))
  cached = _sample(model, params, LABELS, keys, config)
  uncached = _sample(model, params, LABELS, keys, dataclasses.replace(config, use_kv_cache=False))
  np.testing.assert_array_equal(cached, uncached)


def test_parallel_tokens_continuous_rows_come_from_the_diffusion_head():
  grid = (3, 3)
  model, params = setup_model('global', grid_size=grid, tokens='kl', token_dim=4,
                              diffusion=dict(width=32, depth=1, num_sampling_steps=3))
  n, k = grid[0] * grid[1], 4  # Chunks [0, 4), [4, 8), then the last [8, 9).
  labels = LABELS[:2]
  keys = sampling.example_keys(1, np.arange(2))
  tokens = np.asarray(_sample(model, params, labels, keys,
                              sampling.SamplingConfig(parallel_tokens=k)))
  assert tokens.shape == (2, n, 4) and np.isfinite(tokens).all()
  variables = {'params': params}
  states = model.apply(variables, tokens, labels, method=Heptapod.states)
  steps = jnp.array([[0, 4, 8]] * 2, jnp.int32)
  targets = jnp.minimum(steps[..., None] + jnp.arange(k), n - 1)
  z = model.apply(variables, states, steps, targets, method=Heptapod.head_logits)
  for s, t in enumerate([0, 4, 8]):
    for i in range(min(k, n - t)):
      want = sampling._sample_continuous(  # pylint: disable=protected-access
          model, variables, z[:, s, i], sampling.fold_in(keys, t + i))
      np.testing.assert_allclose(tokens[:, t + i], want, atol=1e-4, err_msg=f'position {t + i}')


@pytest.mark.parametrize('n, k, calls', [(12, 1, 12), (12, 5, 3), (12, 4, 3), (12, 12, 1),
                                         (12, 20, 1), (64, 8, 8), (64, 3, 22)])
def test_chunk_plan_counts_head_calls(n, k, calls):
  fed, last = sampling.chunk_plan(n, k)
  assert fed + 1 == calls == -(-n // k)
  assert 1 <= last <= k and fed * k + last == n and fed * k <= n - 1


@pytest.mark.parametrize('kind, k, match', [
    ('next_token', 2, 'sampling.parallel_tokens=2 needs a 2D head'),
    ('local', 5, r'sampling.parallel_tokens=5 exceeds model.head.window=4'),
    ('global', 0, r'sampling.parallel_tokens=0: must be an integer >= 1'),
    ('global', -2, r'sampling.parallel_tokens=-2: must be an integer >= 1'),
    ('global', 2.0, r'sampling.parallel_tokens=2.0: must be an integer >= 1'),
])
def test_parallel_tokens_errors(kind, k, match):
  model, params = setup_model(kind)
  with pytest.raises(ValueError, match=match):
    sampling.sample(model, params, LABELS, jax.random.key(0),
                    sampling.SamplingConfig(parallel_tokens=k))


def test_config_field_reaches_sampling_config():
  c = config_lib.base_config()
  assert c.sampling.parallel_tokens == 1
  c.sampling.parallel_tokens = 4
  assert sampling.SamplingConfig(**c.sampling.to_dict()).parallel_tokens == 4
