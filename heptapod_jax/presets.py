"""Model size presets, as data, in one place.

Each preset fixes the backbone and head shapes; everything else (vocabulary,
grid, head kind, objective) comes from the experiment config. `param_counts`
computes the sizes from the real module (no formula to drift out of date);
`python -m heptapod_jax.tools.param_count` prints them.

The paper reports Heptapod-H at 941M parameters; with the global head, a
16384-entry VQ codebook and a 16x16 grid, 'H' here lands within 1% of that
(tests/test_model.py checks 3%). The head is narrower than the backbone, as
MAE's decoder is, because it runs over N+1 tokens for each of the
steps_per_image sampled steps (see benchmarks/step_time.py for its share).
"""
from __future__ import annotations

from typing import Any, Mapping

SIZES: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    # CPU-sized (the demo and the tests); small SwiGLU rounding keeps the MLP at ~8/3 width.
    'tiny': dict(backbone=dict(width=128, depth=4, num_heads=4, mlp_multiple_of=32),
                 head=dict(width=64, depth=2, num_heads=4, mlp_multiple_of=32)),
    # B's head: 2 layers, from benchmarks/train_throughput.py --quick (B backbone, ImageNet
    # shapes, steps_per_image 4): global step 1.38x the next_token step at depth 2, 1.57x at
    # depth 4, 1.81x at 8 steps; 2 layers leave room for 8 steps within 2x.
    'B': dict(backbone=dict(width=768, depth=12, num_heads=12),
              head=dict(width=512, depth=2, num_heads=8)),
    'L': dict(backbone=dict(width=1024, depth=24, num_heads=16),
              head=dict(width=512, depth=6, num_heads=8)),
    'XL': dict(backbone=dict(width=1280, depth=32, num_heads=20),
               head=dict(width=640, depth=8, num_heads=10)),
    'H': dict(backbone=dict(width=1280, depth=42, num_heads=20),
              head=dict(width=768, depth=8, num_heads=12)),
}

PAPER_PARAMS = {'H': 941e6}  # The only size the paper's abstract/figures state.


def size_overrides(size: str) -> Mapping[str, Mapping[str, Any]]:
  """The backbone/head fields of preset `size`; error lists the valid names."""
  if size not in SIZES:
    raise ValueError(f'unknown model size {size!r}; valid sizes: {list(SIZES)}.')
  return SIZES[size]


def param_counts(model_config) -> dict[str, int]:
  """{'backbone': n, 'head': n, 'total': n} for a ModelConfig, via jax.eval_shape (no memory)."""
  import jax
  from heptapod_jax.models.heptapod import Heptapod, init_params

  model = Heptapod(model_config)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
  out = {k: count(v) for k, v in shapes.items()}
  out['total'] = sum(out.values())
  return out
