"""The sampling command line: a few images from a trained run, as a PNG grid (no config flags).

  python -m heptapod_jax.sample --checkpoint=workdirs/demo --classes=3,7 --n=16 --out=grid.png
  python -m heptapod_jax.sample --checkpoint=RUN --classes=207,360 --n=16 --out=grid.png \
      --out_dir=pngs --temperature=0.9 --top_k=100 --seed=1 --step=250000 --params=raw

`--checkpoint` is a run's workdir (it holds config.json and checkpoints/), its
checkpoints/ directory, or one step directory of it (checkpoints/<step>/); how the
run's config, tokenizer and newest intact step are found is `storage/runs.py`'s docstring;
`--tokenizer` overrides the tokenizer checkpoint. Parameters: the EMA tree when
the run samples with it (`train.sample_with_ema`, the default), or
`--params=ema|raw`. Image i has class classes[i mod C] and its own key (seed, i),
as in sample mode: the same seed gives the same images, whatever `--batch` or the
device count. The grid has one column per class (C <= 32).

Sample mode (N class-balanced samples, ADM's .npz, FID: `python -m heptapod_jax.main
--mode=sample`) is sampling/sample_mode.py. Both are thin layers over `runs.load_run`,
`generation.generate` / `generation.sample_classes` and the evaluators, which Colab calls
directly:

  from heptapod_jax.sampling import generation
  from heptapod_jax.storage import runs
  run = runs.load_run('workdirs/demo')                          # Python API (Colab)
  images, labels = generation.sample_classes(run, classes=[3, 7], num=16, seed=0)
"""
from __future__ import annotations

import time
from typing import Any

if __name__ == '__main__':  # Before TensorFlow or JAX load: their start-up notices.
  from heptapod_jax import console as _console
  _console.quiet_dependencies()

import numpy as np  # noqa: E402

from heptapod_jax import console  # noqa: E402
from heptapod_jax import images as images_lib  # noqa: E402
from heptapod_jax.sampling import generation  # noqa: E402
from heptapod_jax.sampling import sample_mode  # noqa: E402
from heptapod_jax.storage import checkpoint_read  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402
from heptapod_jax.storage import runs  # noqa: E402


MAX_CLASS_COLUMNS = 32  # Wider grids of more classes become near-square grids instead.


def grid_columns(num_classes_asked: int, num: int) -> int:
  """One column per class; more than MAX_CLASS_COLUMNS classes: a near-square grid."""
  if num_classes_asked <= MAX_CLASS_COLUMNS:
    return num_classes_asked
  return int(np.ceil(np.sqrt(num)))


def _parser():
  import argparse
  p = argparse.ArgumentParser(
      prog='python -m heptapod_jax.sample',
      description='Sample class-conditional images from a trained Heptapod run and write a PNG '
                  'grid (one column per class).',
      epilog='Sample mode for the ADM protocol (50k samples, .npz, FID): python -m '
             'heptapod_jax.main --mode=sample. Details: the docstring of '
             'heptapod_jax/sampling/sample_mode.py.')
  p.add_argument('--checkpoint', required=True,
                 help='a run\'s workdir (config.json + checkpoints/), its checkpoints/ directory, '
                      'or one step directory checkpoints/<step>/')
  p.add_argument('--classes', default=None,
                 help='comma-separated class ids, e.g. 207,360; image i has class i mod C '
                      '(default: every class up to 10, else 10 spread over the ids)')
  p.add_argument('--n', type=int, default=None,
                 help='number of images (default: 4 per class)')
  p.add_argument('--out', default=None,
                 help='PNG grid to write (default: <run>/samples/cli_step<step>_seed<seed>.png)')
  p.add_argument('--out_dir', default=None, help='also write each image as a PNG here')
  p.add_argument('--temperature', type=float, default=None,
                 help='softmax temperature, >= 0 (0 = greedy); default: the run\'s sampling config')
  p.add_argument('--top_k', type=int, default=None, help='keep the k likeliest tokens (0 = off)')
  p.add_argument('--top_p', type=float, default=None, help='nucleus sampling, in (0, 1] (1 = off)')
  p.add_argument('--cfg_scale', type=float, default=None,
                 help='classifier-free guidance scale (1 = off, the paper\'s setting); needs a run '
                      'trained with model.backbone.class_dropout > 0')
  p.add_argument('--parallel_tokens', type=int, default=None,
                 help='k > 1: sample k positions per 2D-head call (parallel decoding, beyond the '
                      'paper; faster, approximate: see heptapod_jax/sampling/decode.py)')
  p.add_argument('--seed', type=int, default=0, help='same seed, same images')
  p.add_argument('--step', type=int, default=None,
                 help='checkpoint step (default: the newest that restores)')
  p.add_argument('--params', choices=('ema', 'raw'), default=None,
                 help='EMA or raw parameters (default: the run\'s train.sample_with_ema, '
                      'normally ema)')
  p.add_argument('--tokenizer', default=None,
                 help='tokenizer checkpoint directory (default: the run\'s tokenizer.checkpoint)')
  p.add_argument('--batch', type=int, default=64, help='images per jitted call')
  return p


def _check_args(args) -> None:
  """Flag values that are wrong whatever the checkpoint; ValueError naming the flag."""
  if args.temperature is not None and not args.temperature >= 0:
    raise ValueError(f'--temperature={args.temperature}: must be >= 0 (0 = greedy).')
  if args.top_k is not None and args.top_k < 0:
    raise ValueError(f'--top_k={args.top_k}: must be >= 0 (0 = off).')
  if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
    raise ValueError(f'--top_p={args.top_p}: must be in (0, 1] (1 = off).')
  if args.cfg_scale is not None and not np.isfinite(args.cfg_scale):
    raise ValueError(f'--cfg_scale={args.cfg_scale}: must be a finite number (1 = off).')
  if args.parallel_tokens is not None and args.parallel_tokens < 1:
    raise ValueError(f'--parallel_tokens={args.parallel_tokens}: must be >= 1 (1 = off).')
  if args.n is not None and args.n < 1:
    raise ValueError(f'--n={args.n}: must be >= 1.')
  if args.batch < 1:
    raise ValueError(f'--batch={args.batch}: must be >= 1.')
  for flag in ('checkpoint', 'out', 'out_dir', 'tokenizer'):
    if getattr(args, flag) is not None:
      paths.check(getattr(args, flag), f'--{flag}')


def _parse_classes(text: str) -> list[int]:
  try:
    return [int(c) for c in text.split(',') if c.strip()]
  except ValueError:
    raise ValueError(f'--classes={text!r}: expected comma-separated integers, '
                     'e.g. --classes=207,360.') from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """`python -m heptapod_jax.sample ...`: samples, writes the grid (and PNGs), prints where.

  Returns a summary dict (paths, step, classes, images' shape). A problem with
  the flags or the checkpoint exits with status 2 and one message naming it.
  """
  parser = _parser()
  args = parser.parse_args(argv)
  # Pulled in by the data pipeline's imports; it must leave the GPUs to JAX.
  tf = console.import_tensorflow()
  tf.config.set_visible_devices([], 'GPU')
  try:
    _check_args(args)
    classes = _parse_classes(args.classes) if args.classes is not None else None
    run = runs.load_run(args.checkpoint, step=args.step, params=args.params, tokenizer=args.tokenizer,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   cfg_scale=args.cfg_scale, parallel_tokens=args.parallel_tokens)
    classes = (generation.check_classes(classes, run.num_classes) if classes is not None
               else generation.default_classes(run.num_classes))
  except (ValueError, FileNotFoundError, checkpoint_read.NoRestorableStepError, KeyError) as e:
    parser.error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
  num = args.n if args.n is not None else 4 * len(classes)
  t0 = time.time()
  imgs, labels = generation.sample_classes(run, classes, num, seed=args.seed, batch=args.batch)
  seconds = time.time() - t0
  run_dir = run.location.workdir or paths.dirname(run.location.checkpoint_dir)
  out = (paths.resolve(args.out, '--out') if args.out else
         paths.join(run_dir, 'samples', f'cli_step{run.step}_seed{args.seed}.png'))
  ncols = grid_columns(len(classes), num)
  images_lib.save_png(images_lib.make_grid(imgs, ncols=ncols), out)
  summary: dict[str, Any] = {
      'grid': out, 'step': run.step, 'params': run.key, 'classes': classes, 'seed': args.seed,
      'shape': imgs.shape, 'ncols': ncols, 'nrows': -(-num // ncols), 'seconds': seconds,
      'checkpoint_dir': run.location.checkpoint_dir, 'skipped': run.skipped}
  s = run.config.sampling
  lines = [f'{num} samples of classes {classes} from step {run.step} of '
           f'{run.location.checkpoint_dir} ({run.key}, seed {args.seed}, temperature '
           f'{s.temperature}, top_k {s.top_k}, top_p {s.top_p}'
           + (f', cfg_scale {s.cfg_scale}' if s.cfg_scale != 1.0 else '')
           + f') in {seconds:.1f} s.']
  if run.skipped:
    lines.append(f'  newer steps skipped (they fail to restore): {run.skipped}')
  layout = ('one column per class' if ncols == len(classes)
            else 'in order, class of image i = classes[i mod C]')
  lines.append(f'  grid ({summary["nrows"]} rows x {ncols} columns, {layout}): {out}')
  if args.out_dir:
    out_dir = paths.resolve(args.out_dir, '--out_dir')
    summary['out_dir'] = out_dir
    summary['num_png'] = sample_mode.write_pngs(imgs, labels, out_dir, -1)
    lines.append(f'  {summary["num_png"]} PNG files (<index>_class<id>.png): {out_dir}')
  print('\n'.join(lines), flush=True)
  return summary


if __name__ == '__main__':
  console.setup(None, quiet=True)  # Warnings, the progress line and the summary.
  main()
