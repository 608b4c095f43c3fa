"""How the train step's time and memory grow with the token grid and with steps_per_image.

  python benchmarks/scaling.py                       # tiny preset, global head
  python benchmarks/scaling.py --size=B --batch=4 --vocab=16384

Two sweeps of the global head: the grid side (8, 16, 24, 32: N = 64 .. 1024 positions) at
fixed steps_per_image, and steps_per_image (1 .. 16) at the fixed 16x16 grid. For each:
  step s        median time of the whole train step (steps.train_step: fwd, bwd, AdamW, EMA)
  head s        median time of the head alone (forward + backward of the loss through the head
                and the logits, given the backbone states)
  head us/(S*N) head time per (step, position) pair per image, in microseconds
  TFLOP head    analytic FLOPs of the head (heptapod_jax/flops.py) for the batch
  memory GiB    the compiled step's temporaries + arguments (XLA memory analysis)
The head processes steps_per_image x (N+1) tokens per image: its matmuls and logits grow
linearly in S x N, its attention over N+1 tokens in S x N^2. The S sweep therefore shows a
constant head us/(S*N) column; the grid sweep shows where attention starts to dominate.
A least-squares slope of log(head time) against log(S*N) is printed for each sweep.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _util import build_model, median_time
from heptapod_jax import flops
from heptapod_jax.models import objective
from heptapod_jax.models.heptapod import Heptapod
from heptapod_jax.training import optim, steps

_SIZE = flags.DEFINE_string('size', 'tiny', 'Size preset.')
_VOCAB = flags.DEFINE_integer('vocab', 4096, 'Codebook size.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch.')
_GRIDS = flags.DEFINE_list('grids', ['8', '16', '24', '32'], 'Grid sides of the first sweep.')
_GRID_STEPS = flags.DEFINE_integer('grid_sweep_steps', 4, 'steps_per_image of the grid sweep.')
_STEPS = flags.DEFINE_list('steps', ['1', '2', '4', '8', '16'], 'steps_per_image of the 2nd sweep.')
_STEPS_GRID = flags.DEFINE_integer('steps_sweep_grid', 16, 'Grid side of the steps sweep.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median).')


class _Optim:
  lr, warmup_steps, schedule, min_lr_ratio = 1e-4, 10, 'constant', 0.0
  b1, b2, eps, weight_decay, grad_clip = 0.9, 0.95, 1e-8, 0.05, 1.0


def measure(grid: int, steps_per_image: int) -> dict:
  model, params = build_model(_SIZE.value, grid=grid, vocab=_VOCAB.value, kind='global',
                              steps_per_image=steps_per_image, num_classes=1000)
  cfg = model.config
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, _VOCAB.value, (_BATCH.value, grid * grid)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, 1000, (_BATCH.value,)), jnp.int32)
  tx, schedule = optim.make_optimizer(_Optim, 1000)
  state = jax.jit(functools.partial(steps.init_train_state, model, tx))(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model, tokenizer=None, tx=tx,
                                   schedule=schedule, ema_decay=0.9999))
  batch = {'tokens': tokens, 'label': labels}
  compiled = step.lower(state, batch, {}).compile()
  mem = compiled.memory_analysis()
  memory = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30
  step_s = median_time(compiled, state, batch, {}, repeats=_REPEATS.value)

  states = model.apply({'params': params}, tokens, labels, method=Heptapod.states)
  steps_arr, targets, valid = objective.draw_pairs(jax.random.key(1), cfg, _BATCH.value)
  onehot = jax.nn.one_hot(tokens, cfg.vocab_size)

  def head_loss(head_params, states, onehot, steps_arr, targets, valid):
    logits = model.apply({'params': dict(params, head=head_params)}, states, steps_arr, targets,
                         method=Heptapod.head_logits)
    loss, _ = objective.pair_loss_and_metrics(cfg, logits, onehot, steps_arr, targets, valid)
    return loss

  # Everything as arguments: no constant folding of the batch into the program.
  head_grad = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
  head_s = median_time(head_grad, params['head'], states, onehot, steps_arr, targets, valid,
                       repeats=_REPEATS.value)
  f = flops.train_flops_per_image(cfg)
  n = grid * grid
  return dict(grid=grid, steps=steps_per_image, step_s=step_s, head_s=head_s, memory=memory,
              per_pair_us=head_s / (_BATCH.value * steps_per_image * n) * 1e6,
              head_tflop=f['head'] * _BATCH.value / 1e12, sn=steps_per_image * n)


def _print(rows, title):
  print(f'\n{title}')
  print(f'{"grid":>6s} {"S":>3s} {"S*N":>6s} {"step s":>8s} {"head s":>8s} {"head us/(S*N)":>14s} '
        f'{"TFLOP head":>10s} {"memory GiB":>10s}')
  for r in rows:
    print(f'{r["grid"]:>3d}x{r["grid"]:<2d} {r["steps"]:3d} {r["sn"]:6d} {r["step_s"]:8.3f} '
          f'{r["head_s"]:8.3f} {r["per_pair_us"]:14.2f} {r["head_tflop"]:10.4f} '
          f'{r["memory"]:10.3f}', flush=True)
  x = np.log([r['sn'] for r in rows])
  y = np.log([r['head_s'] for r in rows])
  slope = np.polyfit(x, y, 1)[0]
  print(f'log-log slope of head time vs S*N: {slope:.2f} (1.00 = linear)')


def main(argv):
  del argv
  print(f'preset={_SIZE.value}, global head, vocab {_VOCAB.value}, batch {_BATCH.value}, '
        f'{jax.devices()[0].device_kind} x{jax.device_count()}')
  _print([measure(int(g), _GRID_STEPS.value) for g in _GRIDS.value],
         f'grid sweep (steps_per_image={_GRID_STEPS.value})')
  _print([measure(_STEPS_GRID.value, int(s)) for s in _STEPS.value],
         f'steps_per_image sweep ({_STEPS_GRID.value}x{_STEPS_GRID.value} grid)')


if __name__ == '__main__':
  app.run(main)
