"""Gradient accumulation: k microbatches give the update of one big batch."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from heptapod_jax import sharding
from heptapod_jax.models.heptapod import Heptapod
from heptapod_jax.training import train

from test_model import make_config, random_batch


def _step(model, state, batch, accum, mesh=None):
  step = functools.partial(train.train_step, model=model, tokenizer=None, tx=optax.sgd(1.0),
                           schedule=optax.constant_schedule(1.0), ema_decay=0.0,
                           accum_steps=accum)
  if mesh is None:
    return jax.jit(step)(state, batch, {})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES))
    return jax.jit(step)(state, batch, {})


@pytest.mark.parametrize('kind', ['global', 'local'])
def test_accumulated_update_equals_the_big_batch_update(kind):
  # Every step and every target supervised, no dropout: the pair draw is deterministic, so
  # the big-batch loss is well defined and microbatching must reproduce its gradient.
  model = Heptapod(make_config(kind, head=dict(steps_per_image=-1, targets_per_step=-1)))
  state = train.init_train_state(model, optax.sgd(1.0), jax.random.key(0))
  tokens, labels = random_batch(batch=8)
  batch = {'tokens': tokens, 'label': labels}
  ref_state, ref_metrics = _step(model, state, batch, 1)
  for accum, mesh in ((2, None), (4, None), (2, sharding.create_mesh((4, 2, 1)))):
    new_state, metrics = _step(model, state, batch, accum, mesh)
    np.testing.assert_allclose(metrics['loss_value'], ref_metrics['loss_value'], rtol=1e-6)
    np.testing.assert_allclose(metrics['loss'], ref_metrics['loss'], rtol=1e-6)
    np.testing.assert_allclose(metrics['grad_norm'], ref_metrics['grad_norm'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 new_state.params, ref_state.params)


def test_microbatches_cover_every_row_once():
  """A row of the batch belongs to exactly one microbatch: changing it changes the gradient
  of exactly the loss it enters (compared against recomputing that microbatch alone)."""
  model = Heptapod(make_config('next_token'))
  state = train.init_train_state(model, optax.sgd(1.0), jax.random.key(0))
  tokens, labels = random_batch(batch=4)
  a, _ = _step(model, state, {'tokens': tokens, 'label': labels}, 2)
  b, _ = _step(model, state, {'tokens': tokens.at[3].set((tokens[3] + 1) % 13), 'label': labels}, 2)
  diff = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a.params, b.params)
  assert max(jax.tree.leaves(diff)) > 0


def test_batch_not_divisible_by_microbatches_is_named(tmp_path):
  from test_train import tiny_config
  from heptapod_jax import config_lib
  c = tiny_config(tmp_path)
  c.train.grad_accum_steps = 3
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    config_lib.validate(c)
