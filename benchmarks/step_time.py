"""Training-step time of a size preset, and the share of it spent in the 2D head.

  python benchmarks/step_time.py                       # tiny preset, demo shapes (8x8 grid)
  python benchmarks/step_time.py --grid=16 --vocab=16384 --batch=8

For each head setting it times, in one process and side by side:
  full     forward + backward of the whole loss (backbone + head), jitted;
  backbone forward + backward of the backbone alone (a linear functional of its
           states stands in for the head, so the backbone's backward still runs);
and reports head share = 1 - backbone / full. Each timing is the median of
`--repeats` runs after a warm-up (compilation excluded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from _util import build_model, median_time
from heptapod_jax.models.heptapod import Heptapod, compute_loss

_SIZE = flags.DEFINE_string('size', 'tiny', 'Size preset.')
_GRID = flags.DEFINE_integer('grid', 8, 'Token grid side.')
_VOCAB = flags.DEFINE_integer('vocab', 16, 'Codebook size.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per step.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repetitions (median reported).')

SETTINGS = (('global', 4), ('global', 16), ('local', 16), ('next_token', -1))


def bench(kind: str, steps_per_image: int) -> dict[str, float]:
  model, params = build_model(_SIZE.value, grid=_GRID.value, vocab=_VOCAB.value, kind=kind,
                              steps_per_image=steps_per_image)
  cfg = model.config
  key = jax.random.key(1)
  tokens = jax.random.randint(key, (_BATCH.value, cfg.num_positions), 0, cfg.vocab_size)
  labels = jax.random.randint(key, (_BATCH.value,), 0, 10)

  full = jax.jit(jax.grad(lambda p: compute_loss(model, p, tokens, labels, key)[0]))
  probe = jax.random.normal(key, (_BATCH.value, cfg.num_positions, cfg.backbone.width))

  def backbone_loss(p):
    states = model.apply({'params': p}, tokens, labels, method=Heptapod.states)
    return jnp.mean(states * probe)

  backbone = jax.jit(jax.grad(backbone_loss))
  t_full = median_time(full, params, repeats=_REPEATS.value)
  t_backbone = median_time(backbone, params, repeats=_REPEATS.value)
  return dict(full=t_full, backbone=t_backbone, head_share=1.0 - t_backbone / t_full)


def main(argv):
  del argv
  print(f'preset={_SIZE.value} grid={_GRID.value}x{_GRID.value} vocab={_VOCAB.value} '
        f'batch={_BATCH.value} devices={jax.devices()[0].device_kind} x{jax.device_count()}')
  print(f'{"head":12s} {"steps/img":>9s} {"fwd+bwd (s)":>12s} {"backbone (s)":>13s} {"head share":>11s}')
  for kind, steps in SETTINGS:
    r = bench(kind, steps)
    label = 'all' if steps == -1 else str(steps)
    print(f'{kind:12s} {label:>9s} {r["full"]:12.4f} {r["backbone"]:13.4f} {r["head_share"]:11.1%}',
          flush=True)


if __name__ == '__main__':
  app.run(main)
