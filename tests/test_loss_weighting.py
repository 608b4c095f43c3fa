"""How the loss weighs the supervised (step, target) pairs, against a brute-force computation.

`model.head.loss_weighting` ('pairs' | 'steps') and `model.head.next_weight` are defined in
words (models/config.py, objective.pair_weights); here each definition is written out as loops
over the pairs of a crafted batch, and the library's loss and its gradient must equal it."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax.models import objective
from heptapod_jax.models.config import ALL, HeadConfig, ModelConfig

V = 7


def _config(kind='global', weighting='pairs', next_weight=0.0, targets_per_step=ALL, window=4):
  return ModelConfig(vocab_size=V, grid_size=(3, 3), num_classes=2,
                     head=HeadConfig(kind=kind, width=8, depth=1, num_heads=2, window=window,
                                     steps_per_image=3, targets_per_step=targets_per_step,
                                     loss_weighting=weighting, next_weight=next_weight))


def _batch():
  """2 images, 3 steps each, 5 target slots; steps with 1 to 5 valid targets, one step whose
  next position is not supervised, and one step with no valid pair at all."""
  steps = np.array([[0, 4, 7], [2, 5, 8]], np.int32)
  targets = np.array([[[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [7, 8, 8, 8, 8]],
                      [[3, 4, 5, 6, 7], [5, 6, 7, 8, 8], [8, 8, 8, 8, 8]]], np.int32)
  valid = np.array([[[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 1, 0, 0, 0]],
                    [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]], bool)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5, V)).astype(np.float32)
  tokens = rng.integers(0, V, (2, 9)).astype(np.int32)
  return logits, tokens, steps, targets, valid


def _brute_force(logits, tokens, steps, targets, valid, weighting, next_weight):
  """The definitions, pair by pair (jnp so that it can be differentiated)."""
  per_step, pairs, nexts = [], [], []
  for b in range(steps.shape[0]):
    for s in range(steps.shape[1]):
      losses = []
      for k in range(targets.shape[2]):
        if not valid[b, s, k]:
          continue
        j = targets[b, s, k]
        loss = -jax.nn.log_softmax(logits[b, s, k])[tokens[b, j]]
        losses.append(loss)
        pairs.append(loss)
        if j == steps[b, s]:
          nexts.append(loss)
      if losses:
        per_step.append(sum(losses) / len(losses))
  base = (sum(pairs) / len(pairs)) if weighting == 'pairs' else sum(per_step) / len(per_step)
  if next_weight == 0:
    return base
  return (base + next_weight * sum(nexts) / len(nexts)) / (1 + next_weight)


@pytest.mark.parametrize('weighting', ('pairs', 'steps'))
@pytest.mark.parametrize('next_weight', (0.0, 1.0, 3.5))
def test_loss_and_gradient_equal_the_brute_force_definition(weighting, next_weight):
  logits, tokens, steps, targets, valid = _batch()
  config = _config(weighting=weighting, next_weight=next_weight)

  def library(x):
    loss, _ = objective.pair_loss_and_metrics(config, x, jnp.asarray(tokens), jnp.asarray(steps),
                                              jnp.asarray(targets), jnp.asarray(valid))
    return loss

  def reference(x):
    return _brute_force(x, tokens, steps, targets, valid, weighting, next_weight)

  np.testing.assert_allclose(library(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(library)(logits), jax.grad(reference)(logits),
                             rtol=1e-5, atol=1e-8)


def test_default_is_the_mean_over_pairs_and_the_weightings_differ():
  logits, tokens, steps, targets, valid = _batch()
  args = (jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(steps), jnp.asarray(targets),
          jnp.asarray(valid))
  default, metrics = objective.pair_loss_and_metrics(ModelConfig(
      vocab_size=V, grid_size=(3, 3), head=HeadConfig(width=8, num_heads=2)), *args)
  nll_sum, count = metrics['nll']
  np.testing.assert_allclose(default, nll_sum / count, rtol=1e-6)
  losses = {(w, n): float(objective.pair_loss_and_metrics(_config(weighting=w, next_weight=n),
                                                          *args)[0])
            for w in ('pairs', 'steps') for n in (0.0, 1.0)}
  assert len({round(v, 6) for v in losses.values()}) == 4, losses
  # The plain metrics do not depend on the weighting: only 'loss' does.
  _, weighted = objective.pair_loss_and_metrics(_config(weighting='steps', next_weight=1.0), *args)
  for name in metrics:
    if name != 'loss':
      np.testing.assert_array_equal(weighted[name][0], metrics[name][0])


def test_fused_loss_weighs_pairs_the_same_way():
  rng = np.random.default_rng(1)
  _, tokens, steps, targets, valid = _batch()
  features = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  kernel = rng.normal(size=(8, V)).astype(np.float32)
  config = dataclasses.replace(_config(weighting='steps', next_weight=2.0), loss_chunk=4)
  args = (jnp.asarray(tokens), jnp.asarray(steps), jnp.asarray(targets), jnp.asarray(valid))
  fused = lambda f, w: objective.fused_pair_loss_and_metrics(config, f, w, *args)[0]
  plain = lambda f, w: objective.pair_loss_and_metrics(config, f @ w, *args)[0]
  np.testing.assert_allclose(fused(features, kernel), plain(features, kernel), rtol=1e-5)
  for g_fused, g_plain in zip(jax.grad(fused, (0, 1))(features, kernel),
                              jax.grad(plain, (0, 1))(features, kernel)):
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('kind,window', (('global', 4), ('local', 4)))
def test_next_position_is_always_supervised_when_weighted(kind, window):
  config = _config(kind=kind, next_weight=1.0, targets_per_step=2, window=window)
  plain = _config(kind=kind, next_weight=0.0, targets_per_step=2, window=window)
  kept = missed = 0
  for seed in range(20):
    for cfg in (config, plain):
      steps, targets, valid = objective.draw_pairs(jax.random.key(seed), cfg, 4)
      has_next = np.any(np.asarray(valid & (targets == steps[..., None])), axis=-1)
      if cfg is config:
        assert has_next.all(), (seed, np.asarray(steps), np.asarray(targets))
        kept += has_next.size
      else:
        missed += int((~has_next).sum())
      # Still targets_per_step distinct future positions per step (fewer near the end).
      for b in range(4):
        for s in range(steps.shape[1]):
          chosen = np.asarray(targets[b, s])[np.asarray(valid[b, s])]
          assert len(set(chosen)) == len(chosen) <= 2 and (chosen >= steps[b, s]).all()
  assert kept and missed  # Without the weight the next position is often left out.


def test_bad_weighting_settings_are_refused():
  with pytest.raises(ValueError, match="model.head.loss_weighting='tokens'"):
    _config(weighting='tokens').validate()
  with pytest.raises(ValueError, match='model.head.next_weight=-1'):
    _config(next_weight=-1.0).validate()
