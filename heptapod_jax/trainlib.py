"""Pieces shared by the trainers (the AR model's and the tokenizer's)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from heptapod_jax import checkpoint as ckpt_lib

Array = jax.Array


class NonFiniteError(FloatingPointError):
  """Loss or gradient norm became NaN/Inf; the update of that step was not applied."""


def ema_decay_at(decay: float, step: Array) -> Array:
  """EMA decay with warm-up: min(decay, (1 + step) / (10 + step)), so short runs get a useful EMA."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def reduce_metrics(metric_list: list[dict[str, Array]]) -> dict[str, float]:
  """Mean of per-step scalars; (sum, count) pairs are summed first, then divided."""
  host = jax.device_get(metric_list)
  out = {}
  for name in host[0]:
    values = np.stack([np.asarray(m[name], np.float64) for m in host])
    if values.ndim == 2:  # (sum, count) pairs.
      total, count = values.sum(0)
      if count > 0:
        out[name] = float(total / count)
    else:
      out[name] = float(values.mean())
  return out


def write_config(config, workdir: str) -> None:
  """Writes the run's config as readable JSON to workdir/config.json."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(ckpt_lib.to_jsonable(config.to_dict()), f, indent=2, sort_keys=True)


def check_finite(metrics: dict[str, Array], step: int, checkpointer) -> None:
  """Raises NonFiniteError naming update number `step` and the metric (it was not applied)."""
  if bool(jax.device_get(metrics['finite'])):
    return
  loss, gnorm = (float(jax.device_get(metrics[k])) for k in ('loss_value', 'grad_norm'))
  bad = [f'{k}={v}' for k, v in (('loss', loss), ('grad_norm', gnorm)) if not np.isfinite(v)]
  last = checkpointer.latest_step()
  raise NonFiniteError(
      f'step {step}: non-finite {", ".join(bad)}; the update was not applied. Last checkpoint: '
      f'{"step " + str(last) + " in " + str(checkpointer.directory) if last is not None else "none"}. '
      'Lower config.optim.lr, raise warmup, or check the data.')


def log_compiled(compiled, name: str = 'train_step') -> None:
  """Logs the compiled program's per-device memory and XLA's FLOP count, where the backend reports them."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # Not every backend reports it.
    mem = None
  if mem is not None:
    gib = 1 / 2**30
    logging.info('%s memory per device: arguments %.3f GiB, outputs %.3f GiB, '
                 'temporaries %.3f GiB, generated code %.3f GiB.', name,
                 mem.argument_size_in_bytes * gib, mem.output_size_in_bytes * gib,
                 mem.temp_size_in_bytes * gib, mem.generated_code_size_in_bytes * gib)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and 'flops' in cost:
      logging.info('%s: %.3f GFLOP per step (XLA cost analysis).', name, cost['flops'] / 1e9)
  except Exception:
    pass


def resolve_workdir(workdir: str) -> str:
  """Absolute local path (Orbax needs one); remote URLs (gs://...) stay as given."""
  return workdir if '://' in workdir else os.path.abspath(workdir)
