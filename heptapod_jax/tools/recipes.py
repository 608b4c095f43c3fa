"""The ImageNet 256 recipe family as one table, computed from the configs themselves.

  python -m heptapod_jax.tools.recipes                 # the table in configs/imagenet256.py
  python -m heptapod_jax.tools.recipes --markdown      # the recipes table of docs/reproducing.md
  python -m heptapod_jax.tools.recipes --mfu=0.5 --recipes=size=H,size=H:head=local

Every row is `configs/imagenet256.py:<options>` built and validated as a run would build it.
Columns: parameters (`presets.param_counts`, from the real module), training FLOPs per image
(`flops.train_flops_per_image`: forward + backward, steps_per_image as the recipe sets it),
the steps of `epochs` ImageNet epochs at the recipe's global batch, and the wall time those
steps would take on named hardware:

  days = steps x batch x FLOP/image / (chips x dense bf16 peak x MFU)

with the peaks of `flops.PEAK_BF16_TFLOPS` and an ASSUMED MFU (--mfu, default 0.40). These
are estimates, not measurements: this project has measured the train step on a CPU only
(benchmarks/train_throughput.py) and has no accelerator figures yet. The paper's column holds
the numbers the paper reports (FID / IS without guidance, Heptapod-H only), not ours.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Sequence

from absl import app, flags

from heptapod_jax import flops, presets
from heptapod_jax.models.config import ModelConfig

RECIPE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'imagenet256.py')

# The family: the paper's sizes with its 2D head, then the ablations as one-option switches on
# B (head kind, window, supervision density, visible context, continuous tokens).
RECIPES = ('size=B', 'size=L', 'size=XL', 'size=H',
           'size=B,head=local', 'size=B,head=local,window=16', 'size=B,head=next_token',
           'size=B,targets_per_step=16', 'size=B,visible_context=false', 'size=B,tokens=kl')

# (name, chips, chip kind in flops.PEAK_BF16_TFLOPS).
HARDWARE = (('v5e-256', 256, 'TPU v5 lite'), ('v5p-128', 128, 'TPU v5p'), ('8xH100', 8, 'H100'))

# What the paper reports (ImageNet 256, no classifier-free guidance), by recipe.
PAPER = {'size=H': 'FID 2.70, IS 229.8'}

_MFU = flags.DEFINE_float('mfu', 0.40, 'Assumed model FLOPs utilisation of the estimates.')
_RECIPES = flags.DEFINE_list('recipes', list(RECIPES), 'Option strings of configs/imagenet256.py '
                             '(use ":" between options here, "," separates recipes).')
_MARKDOWN = flags.DEFINE_bool('markdown', False, 'Print a Markdown table (the one in docs/reproducing.md).')


def load_recipe(options: str, path: str = RECIPE_FILE) -> Any:
  """configs/imagenet256.py's get_config(options), loaded from its file."""
  spec = importlib.util.spec_from_file_location('imagenet256_recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(options)


def peak_tflops(kind: str) -> float:
  for name, tflops in flops.PEAK_BF16_TFLOPS:
    if name == kind:
      return tflops
  raise KeyError(f'{kind!r} is not in flops.PEAK_BF16_TFLOPS.')


@dataclasses.dataclass
class Row:
  recipe: str
  params: int
  tokens: str
  head: str
  batch: int
  steps: int
  tflop_per_image: float
  days: dict[str, float]
  paper: str


def compute(recipe: str, mfu: float) -> Row:
  """One row: the recipe's config, validated like a run's model section, and its figures."""
  config = load_recipe(recipe)
  model = ModelConfig.from_dict(config.model.to_dict())
  model.validate()
  batch, steps = config.train.global_batch_size, config.train.num_steps
  per_image = flops.train_flops_per_image(model)['total']
  days = {}
  for name, chips, kind in HARDWARE:
    seconds = steps * batch * per_image / (chips * peak_tflops(kind) * 1e12 * mfu)
    days[name] = seconds / 86400
  return Row(recipe=recipe, params=presets.param_counts(model)['total'], tokens=model.tokens,
             head=model.head.kind, batch=batch, steps=steps, tflop_per_image=per_image / 1e12,
             days=days, paper=PAPER.get(recipe, ''))


def text_table(rows: Sequence[Row], mfu: float) -> str:
  """The plain-text table of configs/imagenet256.py's docstring (tests compare the two)."""
  hw = [name for name, _, _ in HARDWARE]
  lines = [f'ESTIMATED days at an assumed {mfu:.0%} MFU (not measured; '
           f'python -m heptapod_jax.tools.recipes):',
           f'  {"options":32s} {"params":>6s} {"TFLOP/img":>9s} {"steps":>7s} '
           + ' '.join(f'{h:>8s}' for h in hw)]
  for r in rows:
    lines.append(f'  {r.recipe:32s} {r.params / 1e6:5.0f}M {r.tflop_per_image:9.3f} '
                 f'{r.steps:7d} ' + ' '.join(f'{r.days[h]:8.2f}' for h in hw))
  return '\n'.join(lines)


def markdown_table(rows: Sequence[Row], mfu: float) -> str:
  """The recipes table of docs/reproducing.md."""
  hw = [name for name, _, _ in HARDWARE]
  head = ('| `python -m heptapod_jax.main --workdir=RUN --config=configs/imagenet256.py:`... '
          '| params | tokens | head | TFLOP/img | steps (800 ep) | '
          + ' | '.join(f'est. days {h}' for h in hw) + " | paper's (no CFG) | measured here |")
  sep = '|' + '---|' * (8 + len(hw))
  lines = [head, sep]
  for r in rows:
    lines.append(f'| `{r.recipe}` | {r.params / 1e6:.0f}M | {r.tokens} | {r.head} | '
                 f'{r.tflop_per_image:.3f} | {r.steps:,} | '
                 + ' | '.join(f'{r.days[h]:.2f}' for h in hw) + f' | {r.paper} |  |')
  lines.append(f'\nEstimated days assume {mfu:.0%} MFU on the dense bf16 peak (not measured).')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  recipes = [r.replace(':', ',') for r in _RECIPES.value]
  rows = [compute(r, _MFU.value) for r in recipes]
  print(markdown_table(rows, _MFU.value) if _MARKDOWN.value else text_table(rows, _MFU.value))


if __name__ == '__main__':
  app.run(main)
