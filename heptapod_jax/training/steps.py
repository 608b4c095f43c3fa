"""The AR model's pure, jitted steps: the TrainState, one update (`train_step`, with gradient
accumulation), the held-out NLL (`eval_step`), and the state's construction and shardings.

Pure functions of arrays: no TensorFlow, no clu, no I/O, so benchmarks, ahead-of-time
compilation and other training loops use them without the trainer (`training/train.py`), which
re-exports them.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from heptapod_jax import sharding
from heptapod_jax.models import layers, objective
from heptapod_jax.models.heptapod import Heptapod, compute_loss, continuous_pair_loss, init_params
from heptapod_jax.models.tokenizers import batch_tokens
from heptapod_jax.training import optim

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array  # int32 scalar: number of updates applied.
  params: Any
  opt_state: Any
  ema_params: Any
  rng: Array  # Typed PRNG key; each step folds in the step number.


def train_step(state: TrainState, batch: dict[str, Array], tokenizer_params: Any, *,
               model: Heptapod, tokenizer: Any, tx, schedule, ema_decay: float,
               accum_steps: int = 1):
  """One update. Pure: (state, batch, frozen tokenizer params) -> (state, metrics). A
  non-finite loss or gradient norm leaves the state unchanged (metrics['finite'] = False).

  accum_steps > 1 splits the batch into that many microbatches (row i goes to microbatch
  i mod accum_steps, so every microbatch is spread over all data shards), runs them one
  after another under `lax.scan` and applies one update with the gradient of the whole
  batch's loss: sum of the supervised pairs' losses over the sum of their counts, exactly
  the loss of one big batch when the pair draws agree. Activation memory scales with the
  microbatch; parameters, gradients and optimizer state are unchanged.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  tokens = batch_tokens(batch, tokenizer, tokenizer_params, jax.random.fold_in(rng, 7))
  labels = batch['label']

  if accum_steps == 1:
    def loss_fn(params):
      return compute_loss(model, params, tokens, labels, rng, deterministic=False)

    (loss, pair_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  else:
    loss, pair_metrics, grads = _accumulated_gradients(model, state.params, tokens, labels, rng,
                                                       accum_steps)
  grad_norm = optim.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state.params, updates)
  decay = optim.ema_decay_at(ema_decay, state.step) if ema_decay > 0 else 0.0
  ema = optim.ema_update(state.ema_params, params, decay)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
  # A non-finite update is not applied (parameters, optimizer state and EMA stay); the step
  # counter still advances, so the next batch gets the next step's randomness.
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
  metrics = {name: jnp.stack(sc) for name, sc in pair_metrics.items()}
  metrics.update(grad_norm=grad_norm, param_norm=optim.global_norm(params), lr=schedule(state.step),
                 finite=finite, loss_value=loss)
  return new, metrics


def _accumulated_gradients(model: Heptapod, params: Any, tokens: Array, labels: Array, rng: Array,
                           accum_steps: int):
  """(loss, (sum, count) metrics, gradient) of the batch, computed over `accum_steps` microbatches."""
  b = tokens.shape[0]
  if b % accum_steps:
    raise ValueError(f'config.train.grad_accum_steps={accum_steps} does not divide the batch of {b}.')

  def split(x):  # Row i -> microbatch i mod k: [B, ...] -> [k, B/k, ...].
    x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  def micro_loss(p, micro_tokens, micro_labels, micro_rng):
    _, metrics = compute_loss(model, p, micro_tokens, micro_labels, micro_rng, deterministic=False)
    total, _ = metrics['loss']
    return total, metrics

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def body(carry, inputs):
    grads, metrics = carry
    i, micro_tokens, micro_labels = inputs
    micro_tokens = layers.constrain(micro_tokens, ('batch',) + (None,) * (micro_tokens.ndim - 1))
    g, m = grad_fn(params, micro_tokens, micro_labels, jax.random.fold_in(rng, i))
    grads = jax.tree.map(lambda a, x: a + x.astype(a.dtype), grads, g)
    metrics = jax.tree.map(jnp.add, metrics, m)
    return (grads, metrics), None

  micro = (jnp.arange(accum_steps), split(tokens), split(labels))
  _, metrics0 = jax.eval_shape(micro_loss, params, micro[1][0], micro[2][0], rng)
  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  (grads, metrics), _ = jax.lax.scan(body, (zeros(params), zeros(metrics0)), micro)
  total, count = metrics['loss']
  scale = 1.0 / jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grads, params)
  return total * scale, metrics, grads


def eval_step(params: Any, batch: dict[str, Array], tokenizer_params: Any, *, model: Heptapod,
              tokenizer: Any) -> dict[str, Array]:
  """Held-out autoregressive NLL: -log p(x_t | x_<t, class) from step t's head, every t.

  This is the exact likelihood of the raster-order sampler, comparable
  across head kinds. Returns (sum, count) pairs honouring batch['mask'].
  """
  tokens = batch_tokens(batch, tokenizer, tokenizer_params)
  b, n = tokens.shape[:2]
  steps = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  logits = model.apply({'params': params}, tokens, batch['label'], steps, steps[..., None])
  if model.config.continuous:
    # No exact likelihood: the diffusion loss of x_t given step t, every t, at fixed noise
    # (the same draws at every evaluation, so the numbers compare across steps and runs).
    valid = batch['mask'][:, None, None] & jnp.ones_like(steps[..., None], bool)
    _, metrics = continuous_pair_loss(model, params, logits, tokens, steps, steps[..., None], valid,
                                      jax.random.key(0))
    return {'mse': jnp.stack(metrics['mse'])}
  _, nll = objective.token_loss_from_ids(logits[:, :, 0], tokens)
  weight = batch['mask'].astype(jnp.float32)[:, None] * jnp.ones_like(nll)
  correct = (jnp.argmax(logits[:, :, 0], -1) == tokens).astype(jnp.float32)
  return {'nll': jnp.stack([jnp.sum(nll * weight), jnp.sum(weight)]),
          'accuracy': jnp.stack([jnp.sum(correct * weight), jnp.sum(weight)])}


def init_train_state(model: Heptapod, tx, rng: Array, boxed: bool = False) -> TrainState:
  """A fresh TrainState (boxed=True keeps the parameters' logical partitioning metadata)."""
  params = init_params(model, rng)
  if not boxed:
    params = nn.unbox(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, rng=jax.random.fold_in(rng, 1))


def train_state_shardings(model: Heptapod, tx, mesh, rules) -> Any:
  """NamedShardings of the TrainState on `mesh` (any devices, also an AOT topology's), from the
  parameters' logical annotations; leaves without annotations (step, counts, rng) are replicated."""
  boxed = jax.eval_shape(lambda: init_train_state(model, tx, jax.random.key(0), boxed=True))
  return sharding.logical_shardings(boxed, mesh, rules)


def abstract_train_state(model: Heptapod, tx, shardings) -> TrainState:
  """ShapeDtypeStructs of the TrainState carrying `shardings` (for lowering without memory)."""
  abstract = jax.eval_shape(lambda: init_train_state(model, tx, jax.random.key(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def jit_train_step(model: Heptapod, tokenizer: Any, tx, schedule, *, ema_decay: float,
                   accum_steps: int, state_shardings: Any, batch_shardings: Any, mesh):
  """`train_step` jitted with the trainer's in/out shardings and the state donated: the one
  definition of the compiled step, used by the training loop and by tools/aot_compile.py."""
  return jax.jit(
      functools.partial(train_step, model=model, tokenizer=tokenizer, tx=tx, schedule=schedule,
                        ema_decay=ema_decay, accum_steps=accum_steps),
      in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)
