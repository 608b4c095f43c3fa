"""Optimizer: AdamW with warmup + constant/cosine schedule, global-norm clipping, decay mask, EMA."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

# Parameters that never get weight decay besides 1-D ones (norm scales, biases,
# learned tokens): the heads' learned position tables.
_NO_DECAY_NAMES = ('pos_row', 'pos_col', 'memory_pos_row', 'memory_pos_col')


def learning_rate_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then constant or cosine decay to `min_lr_ratio * lr`."""
  o = optim_config
  warmup = optax.linear_schedule(0.0, o.lr, max(int(o.warmup_steps), 1))
  if o.schedule == 'constant':
    after = optax.constant_schedule(o.lr)
  elif o.schedule == 'cosine':
    after = optax.cosine_decay_schedule(o.lr, max(num_steps - int(o.warmup_steps), 1),
                                        alpha=o.min_lr_ratio)
  else:
    raise ValueError(f'config.optim.schedule={o.schedule!r} is not one of ["constant", "cosine"].')
  return optax.join_schedules([warmup, after], [int(o.warmup_steps)])


def _path_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and embedding tables, not norms or position tables."""

  def decays(path, leaf):
    names = _path_names(path)
    shape = getattr(leaf, 'shape', ())
    # Scanned layers carry a leading 'layers' axis: a stacked norm scale is still a vector.
    ndim = len(shape) - (1 if 'layers' in names else 0)
    return ndim >= 2 and not any(n in _NO_DECAY_NAMES for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain of the trainer, and its learning-rate schedule (for logging)."""
  o = optim_config
  schedule = learning_rate_schedule(o, num_steps)
  parts = []
  if o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * params (decay 0: a copy of params)."""
  if isinstance(decay, (int, float)) and decay == 0.0:
    return params
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema, params)


def ema_decay_at(decay: float, step: Array) -> Array:
  """EMA decay with warm-up: min(decay, (1 + step) / (10 + step)), so short runs get a useful EMA."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
