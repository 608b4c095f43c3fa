"""The next-2D-distribution-prediction objective: which (step, target) pairs, and their loss.

For each image, `steps_per_image` steps t are drawn uniformly without
replacement from 0..N-1 (or all N). Step t has seen x_0..x_{t-1}; its
candidate targets are the future positions j >= t the head can predict
(global: all of them; local: the window t..t+W-1; next_token: j = t), of which
`targets_per_step` are supervised (all by default). The loss is a weighted mean of the
token cross-entropy over the supervised (t, j) pairs of the batch, sum_p w_p l_p / sum_p w_p
(`pair_weights`): by default every pair alike (`model.head.loss_weighting='pairs'`), or every
step alike ('steps'), with an optional extra weight on the next position
(`model.head.next_weight`).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from heptapod_jax.models import layers
from heptapod_jax.models.config import ALL, ModelConfig

Array = jax.Array

# How far ahead a target is: distance = j - t + 1 (1 = the next token).
DISTANCE_BUCKETS = (('ahead_1', 1, 1), ('ahead_2_4', 2, 4), ('ahead_5_16', 5, 16),
                    ('ahead_17_plus', 17, 1 << 30))


def sample_steps(rng: Array, batch_size: int, num_positions: int, steps_per_image: int) -> Array:
  """int32[B, S]: distinct steps per image, uniform without replacement (or all N, sorted)."""
  if steps_per_image == ALL:
    return jnp.broadcast_to(jnp.arange(num_positions, dtype=jnp.int32), (batch_size, num_positions))
  scores = jax.random.uniform(rng, (batch_size, num_positions))
  return jnp.argsort(scores, axis=-1)[:, :steps_per_image].astype(jnp.int32)


def candidate_targets(config: ModelConfig, steps: Array) -> tuple[Array, Array]:
  """Future positions each step can supervise: (targets int32[B, S, C], valid bool[B, S, C])."""
  n, head = config.num_positions, config.head
  if head.kind == 'global':
    targets = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (*steps.shape, n))
    return targets, targets >= steps[..., None]
  if head.kind == 'local':
    targets = steps[..., None] + jnp.arange(head.window, dtype=jnp.int32)
    return jnp.minimum(targets, n - 1), targets < n
  if head.kind == 'next_token':
    return steps[..., None], jnp.ones((*steps.shape, 1), bool)
  raise ValueError(f'model.head.kind={head.kind!r} has no target rule.')


def choose_targets(rng: Array, targets: Array, valid: Array, targets_per_step: int,
                   keep: Array | None = None):
  """Keeps `targets_per_step` valid candidates per step, uniformly at random (all: unchanged).

  Steps with fewer valid candidates than asked keep them all; the padding is
  marked invalid. Valid candidates where `keep` (bool, as `targets`) is set are always
  kept (the next position, when `model.head.next_weight` weighs it); the rest are drawn.
  """
  if targets_per_step == ALL or targets_per_step >= targets.shape[-1]:
    return targets, valid
  scores = jnp.where(valid, jax.random.uniform(rng, targets.shape), -1.0)
  if keep is not None:
    scores = jnp.where(valid & keep, 2.0, scores)
  _, idx = jax.lax.top_k(scores, targets_per_step)
  return jnp.take_along_axis(targets, idx, -1), jnp.take_along_axis(valid, idx, -1)


def draw_pairs(rng: Array, config: ModelConfig, batch_size: int):
  """Steps and supervised targets for one batch: (steps [B,S], targets [B,S,K], valid [B,S,K])."""
  step_rng, target_rng = jax.random.split(rng)
  steps = sample_steps(step_rng, batch_size, config.num_positions, config.head.steps_per_image)
  targets, valid = candidate_targets(config, steps)
  keep = targets == steps[..., None] if config.head.next_weight > 0 else None
  targets, valid = choose_targets(target_rng, targets, valid, config.head.targets_per_step, keep)
  return steps, targets, valid


def pair_weights(config: ModelConfig, steps: Array, targets: Array, valid: Array) -> Array:
  """float32[B, S, K]: each supervised pair's weight w_p in the loss sum_p w_p l_p / sum_p w_p.

  loss_weighting='pairs': w_p = 1 (the mean over pairs); 'steps': w_p = 1 / (the step's
  supervised pairs), so that every step weighs alike whatever its number of targets. With
  next_weight = lambda > 0, each step's distance-1 pair gets lambda * W / M more, W the sum
  of those weights and M the number of such pairs, so that the loss is
  (L + lambda * L_next) / (1 + lambda) with L_next the mean loss of the next positions.
  Invalid pairs weigh 0. Under gradient accumulation W and M are each microbatch's.
  """
  head = config.head
  weight = valid.astype(jnp.float32)
  if head.loss_weighting == 'steps':
    weight = weight / jnp.maximum(jnp.sum(weight, axis=-1, keepdims=True), 1.0)
  if head.next_weight > 0:
    is_next = (valid & (targets == steps[..., None])).astype(jnp.float32)
    extra = head.next_weight * jnp.sum(weight) / jnp.maximum(jnp.sum(is_next), 1.0)
    weight = weight + extra * is_next
  return weight


def token_loss(logits: Array, target_dist: Array, *, label_smoothing: float = 0.0,
               z_loss: float = 0.0) -> tuple[Array, Array]:
  """Cross-entropy against a target distribution (soft targets), per pair.

  Args:
    logits: float32[..., V]; target_dist: float[..., V].
  Returns:
    (loss [...], plain negative log-likelihood [...]).
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  nll = -jnp.sum(target_dist * log_probs, axis=-1)
  return _regularized(nll, log_z, lambda: jnp.mean(log_probs, axis=-1), label_smoothing, z_loss)


def token_loss_from_ids(logits: Array, target_ids: Array, *, label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> tuple[Array, Array]:
  """`token_loss` against one-hot targets given as ids, without materialising the one-hot.

  The same numbers as token_loss(logits, one_hot(target_ids)): nll = log Z - logits[id];
  for the training step this skips a [B, N, V] float32 one-hot and the read of [B, S, K, V]
  of it (a third of the loss's memory traffic at V = 16384).

  Args:
    logits: float32[..., V]; target_ids: int[...] in [0, V).
  Returns:
    (loss [...], plain negative log-likelihood [...]).
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = log_z - picked
  return _regularized(nll, log_z, lambda: jnp.mean(logits, axis=-1) - log_z, label_smoothing,
                      z_loss)


def _regularized(nll: Array, log_z: Array, mean_log_prob, label_smoothing: float,
                 z_loss: float) -> tuple[Array, Array]:
  """(loss, nll): label smoothing mixes in the mean log-probability (a thunk: only computed
  when used); z-loss adds z_loss * log(Z)^2."""
  loss = nll
  if label_smoothing > 0.0:
    loss = (1.0 - label_smoothing) * nll - label_smoothing * mean_log_prob()
  if z_loss > 0.0:
    loss = loss + z_loss * jnp.square(log_z)
  return loss, nll


def pair_loss_and_metrics(config: ModelConfig, logits: Array, target: Array, steps: Array,
                          targets: Array, valid: Array
                          ) -> tuple[Array, Mapping[str, tuple[Array, Array]]]:
  """Mean loss over the supervised pairs, and metrics as (sum, count) pairs.

  Args:
    logits: float32[B, S, K, V] head output for `targets`.
    target: what every grid position should be: int[B, N] token ids (the training
      step's form: one-hot targets, never materialised), or float[B, N, V] a target
      distribution (soft targets; one-hot rows give the same numbers as the ids).
      Only the supervised pairs are read.
    steps: int32[B, S]; targets: int32[B, S, K]; valid: bool[B, S, K].
  Returns:
    (scalar loss, {name: (sum, count)}) with names loss, nll, accuracy and the
    NLL split by distance ahead (DISTANCE_BUCKETS).
  """
  kw = dict(label_smoothing=config.label_smoothing, z_loss=config.z_loss)
  if jnp.issubdtype(target.dtype, jnp.integer):
    ids = jnp.take_along_axis(target[:, None], targets, axis=2)  # [B, S, K]
    loss, nll = token_loss_from_ids(logits, ids, **kw)
  else:
    dist = jnp.take_along_axis(target[:, None], targets[..., None], axis=2)  # [B, S, K, V]
    loss, nll = token_loss(logits, dist, **kw)
    ids = jnp.argmax(dist, -1)
  # Top-1 correct: the target's logit is the largest (a max, not an argmax: on the CPU a
  # variadic (value, index) reduction over V costs as much as the whole log-softmax). Ties
  # for the top count as correct; with float logits they do not occur in practice.
  picked = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
  correct = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  return _reduce_pairs(config, loss, nll, correct, steps, targets, valid)


def _row_chunks(x: Array, chunk: int) -> Array:
  """[B, P, ...] -> [C, B, chunk, ...]: the pair axis cut into C chunks (zero-padded), the
  batch axis kept whole so that a chunk keeps the batch's sharding."""
  pad = (-x.shape[1]) % chunk
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unchunk(x: Array, pairs: int) -> Array:
  """[C, B, chunk] -> [B, P]."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1)[:, :pairs]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fused_vocab_loss(features: Array, kernel: Array, ids: Array, label_smoothing: float,
                     z_loss: float, chunk: int, dtype: Any) -> tuple[Array, Array, Array]:
  """The vocabulary projection and `token_loss_from_ids` in one, over chunks of pairs: the
  [B, P, V] logits are never materialised, only [B, chunk, V] at a time.

  Args:
    features: [B, P, D] the head's normed outputs, one row per (step, target) pair.
    kernel: [D, V] the vocabulary projection (the head's `logits` Dense kernel).
    ids: int32[B, P] target token ids.
    label_smoothing, z_loss: as `token_loss_from_ids`; chunk: pairs per chunk;
    dtype: the compute dtype of the projection (the logits are float32 afterwards, as the
      head's own Dense gives them).
  Returns:
    (loss, nll, correct) float32[B, P] each: the same numbers as the plain path (the head's
    logits, then `token_loss_from_ids`, and top-1 correct as in `pair_loss_and_metrics`).

  The backward pass recomputes each chunk's logits (one more vocabulary matmul than the
  plain path: the price of not keeping [B, P, V] float32 alive between the passes) and
  forms the logits' gradient in closed form: for loss = log Z - (1 - ls) l_id - ls mean(l) +
  z log^2 Z, d loss / d l = softmax(l) (1 + 2 z log Z) - (1 - ls) onehot(id) - ls / V.
  """
  out, _ = _fused_vocab_loss_fwd(features, kernel, ids, label_smoothing, z_loss, chunk, dtype)
  return out


def _chunk_logits(f: Array, kernel: Array, dtype: Any) -> Array:
  return layers.matmul(f.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)


def _fused_vocab_loss_fwd(features, kernel, ids, label_smoothing, z_loss, chunk, dtype):
  pairs = features.shape[1]

  def one(args):
    f, i = args
    logits = _chunk_logits(f, kernel, dtype)
    loss, nll = token_loss_from_ids(logits, i, label_smoothing=label_smoothing, z_loss=z_loss)
    picked = jnp.take_along_axis(logits, i[..., None], axis=-1)[..., 0]
    correct = (picked >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return loss, nll, correct, jax.nn.logsumexp(logits, axis=-1)

  loss, nll, correct, log_z = jax.lax.map(one, (_row_chunks(features, chunk),
                                                _row_chunks(ids, chunk)))
  out = tuple(_unchunk(x, pairs) for x in (loss, nll, correct))
  return out, (features, kernel, ids, _unchunk(log_z, pairs))


def _fused_vocab_loss_bwd(label_smoothing, z_loss, chunk, dtype, res, cotangents):
  features, kernel, ids, log_z = res
  g_loss, g_nll, _ = cotangents
  vocab = kernel.shape[-1]

  def one(d_kernel, args):
    f, i, lz, gl, gn = args
    probs = jnp.exp(_chunk_logits(f, kernel, dtype) - lz[..., None])
    d_logits = probs * (gl * (1.0 + 2.0 * z_loss * lz) + gn)[..., None]
    d_logits = d_logits - jax.nn.one_hot(i, vocab, dtype=jnp.float32) * (
        gl * (1.0 - label_smoothing) + gn)[..., None]
    if label_smoothing > 0.0:
      d_logits = d_logits - (gl * label_smoothing / vocab)[..., None]
    d_f, d_k = layers.matmul_grads(f.astype(dtype), kernel.astype(dtype),
                                   d_logits.astype(dtype), dw_dtype=jnp.float32)
    return d_kernel + d_k, d_f

  chunks = tuple(_row_chunks(x, chunk) for x in (features, ids, log_z, g_loss, g_nll))
  d_kernel, d_features = jax.lax.scan(one, jnp.zeros(kernel.shape, jnp.float32), chunks)
  d_features = _unchunk_rows(d_features, features.shape[1]).astype(features.dtype)
  return d_features, d_kernel.astype(kernel.dtype), None


def _unchunk_rows(x: Array, pairs: int) -> Array:
  """[C, B, chunk, D] -> [B, P, D]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, x.shape[-1])[:, :pairs]


fused_vocab_loss.defvjp(_fused_vocab_loss_fwd, _fused_vocab_loss_bwd)


def fused_pair_loss_and_metrics(config: ModelConfig, features: Array, kernel: Array,
                                target: Array, steps: Array, targets: Array, valid: Array
                                ) -> tuple[Array, Mapping[str, tuple[Array, Array]]]:
  """`pair_loss_and_metrics` from the head's features [B, S, K, D] and its vocabulary kernel
  [D, V] instead of logits, through `fused_vocab_loss` (`model.loss_chunk` pairs per chunk):
  the same loss and metrics without the [B, S, K, V] logits. Token ids only."""
  b, s, k, d = features.shape
  ids = jnp.take_along_axis(target[:, None], targets, axis=2)  # [B, S, K]
  loss, nll, correct = fused_vocab_loss(
      features.reshape(b, s * k, d), kernel, ids.reshape(b, s * k).astype(jnp.int32),
      config.label_smoothing, config.z_loss, config.loss_chunk, layers.dtype_of(config.dtype))
  loss, nll, correct = (x.reshape(b, s, k) for x in (loss, nll, correct))
  return _reduce_pairs(config, loss, nll, correct, steps, targets, valid)


def _reduce_pairs(config: ModelConfig, loss: Array, nll: Array, correct: Array, steps: Array,
                  targets: Array, valid: Array) -> tuple[Array, Mapping[str, tuple[Array, Array]]]:
  """The loss (the `pair_weights` mean) and the (sum, count) metrics from per-pair values:
  'loss' as the loss weighs the pairs, the others as plain means over the valid pairs."""
  weight = valid.astype(jnp.float32)
  count = jnp.sum(weight)
  loss_weight = pair_weights(config, steps, targets, valid)
  metrics = {
      'loss': (jnp.sum(loss * loss_weight), jnp.sum(loss_weight)),
      'nll': (jnp.sum(nll * weight), count),
      'accuracy': (jnp.sum(correct * weight), count),
  }
  metrics.update(distance_metrics('nll', nll, steps, targets, valid))
  total, total_weight = metrics['loss']
  return total / jnp.maximum(total_weight, 1e-30), metrics


def distance_metrics(prefix: str, per_pair: Array, steps: Array, targets: Array,
                     valid: Array) -> dict[str, tuple[Array, Array]]:
  """A per-pair quantity [B, S, K] split by distance ahead: {f'{prefix}_{bucket}': (sum, count)}."""
  weight = valid.astype(jnp.float32)
  ahead = targets - steps[..., None] + 1
  out = {}
  for name, lo, hi in DISTANCE_BUCKETS:
    w = weight * ((ahead >= lo) & (ahead <= hi))
    out[f'{prefix}_{name}'] = (jnp.sum(per_pair * w), jnp.sum(w))
  return out


def finalize_metrics(metrics: Mapping[str, tuple[Array, Array]]) -> dict[str, Array]:
  """(sum, count) pairs -> means (NaN where a bucket had no pairs)."""
  return {k: jnp.where(c > 0, s / jnp.maximum(c, 1.0), jnp.nan) for k, (s, c) in metrics.items()}
