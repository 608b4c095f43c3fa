"""Sample mode: N class-balanced samples from a trained run, sharded, resumable, ADM's .npz.

  python -m heptapod_jax.main --mode=sample --config=configs/imagenet256.py:size=H --workdir=RUN \
      --config.evaluator.features=inception --config.evaluator.inception_weights=inception_fid.npz \
      --config.evaluator.reference=VIRTUAL_imagenet256_labeled.npz

  from heptapod_jax import sample
  summary = sample.sample_and_evaluate(config, workdir)       # also from Colab

Protocol (ADM): `config.sample.num_per_class` samples per class (50 -> 50,000
for ImageNet), labels cycling through the classes (sample i has class
i mod C, so every prefix of the file is as balanced as it can be), no
guidance unless `config.sampling.cfg_scale` says so. Sample i is drawn with a
key folded from (`config.sample.seed`, i): the samples do not depend on the
chunk size, the number of devices or hosts, or on interruptions.

Every chunk of `config.sample.chunk_size` samples is one jitted call over the
whole mesh (all devices of all hosts) and one file, `<out_dir>/chunks/`,
written atomically by process 0. Rerunning the same command skips the
chunks already on disk, so an interrupted run resumes; `<out_dir>/manifest.json`
records the settings and refuses to mix chunks made with other ones. At the
end: `<out_dir>/samples_<N>x<S>x<S>x3.npz` with `arr_0` (uint8 images) and
`arr_1` (int64 labels), the layout ADM's evaluator reads; optional PNGs; and
the metrics of `config.evaluator` in `<out_dir>/metrics.json`.

Command line (a few images to look at, no config flags):

  python -m heptapod_jax.sample --checkpoint=workdirs/demo --classes=3,7 --n=16 --out=grid.png
  python -m heptapod_jax.sample --checkpoint=RUN --classes=207,360 --n=16 --out=grid.png \
      --out_dir=pngs --temperature=0.9 --top_k=100 --seed=1 --step=250000 --params=raw

`--checkpoint` is a run's workdir (it holds config.json and checkpoints/), its
checkpoints/ directory, or one step directory of it (checkpoints/<step>/); how the
run's config, tokenizer and newest intact step are found is `runs.py`'s docstring;
`--tokenizer` overrides the tokenizer checkpoint. Parameters: the EMA tree when
the run samples with it (`train.sample_with_ema`, the default), or
`--params=ema|raw`. Image i has class classes[i mod C] and its own key (seed, i),
as in sample mode: the same seed gives the same images, whatever `--batch` or the
device count. The grid has one column per class (C <= 32).

This module is sample mode and the command line; both are thin layers over
`runs.load_run`, `generation.generate` / `generation.sample_classes` and the
evaluators, which Colab calls directly:

  from heptapod_jax import generation, runs
  run = runs.load_run('workdirs/demo')                          # Python API (Colab)
  images, labels = generation.sample_classes(run, classes=[3, 7], num=16, seed=0)
"""
from __future__ import annotations

import json
import time
from typing import Any

if __name__ == '__main__':  # Before TensorFlow or JAX load: their start-up notices.
  from heptapod_jax import console as _console
  _console.quiet_dependencies()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from heptapod_jax import artifacts  # noqa: E402
from heptapod_jax import checkpoint_read
from heptapod_jax import console  # noqa: E402
from heptapod_jax import generation  # noqa: E402
from heptapod_jax import images as images_lib  # noqa: E402
from heptapod_jax import runs  # noqa: E402
from heptapod_jax.image_sampler import ImageSampler  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402


def write_pngs(images: np.ndarray, labels: np.ndarray, directory: str, count: int) -> int:
  n = len(images) if count < 0 else min(count, len(images))
  for i in range(n):
    images_lib.save_png(images[i], paths.join(directory, f'{i:06d}_class{int(labels[i])}.png'))
  return n


def sample_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Sample mode: generate config.sample's samples from the workdir's checkpoint, write the
  .npz (and PNGs), run config.evaluator on them. Returns a summary dict."""
  from heptapod_jax.evaluators import generative

  workdir = paths.resolve(workdir, 'workdir')
  sampler = ImageSampler(config)
  s = config.sample
  num_classes = sampler.model_config.num_classes
  num_samples = generation.num_samples_of(config, num_classes)
  chunk = s.chunk_size or config.train.global_batch_size
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
    params, step, key = runs.restore_params(sampler, workdir, s.checkpoint_step)
    out_dir = (paths.resolve(s.out_dir, 'config.sample.out_dir') if s.out_dir
               else paths.join(workdir, f'samples_{step:07d}_seed{s.seed}'))
    manifest = {'checkpoint_step': step, 'params_key': key,
                'sampling': config.sampling.to_dict(), 'model': config.model.to_dict(),
                'tokenizer': config.tokenizer.to_dict(), 'image_size': config.data.image_size,
                'num_classes': num_classes, 'workdir': workdir}
    manifest = json.loads(json.dumps(manifest, default=list))  # Tuples -> lists, as on disk.
    t0 = time.time()
    imgs, labels = generation.generate(sampler, params, num_samples=num_samples, seed=s.seed,
                                       chunk_size=chunk, out_dir=out_dir, manifest=manifest)
    seconds = time.time() - t0
  size = config.data.image_size
  npz = paths.join(out_dir, f'samples_{num_samples}x{size}x{size}x3.npz')
  summary: dict[str, Any] = {'workdir': workdir, 'step': step, 'out_dir': out_dir, 'npz': npz,
                             'num_samples': num_samples, 'seconds': seconds}
  if jax.process_index() == 0:
    artifacts.save_npz(npz, arr_0=imgs, arr_1=labels.astype(np.int64))
    if s.num_png:
      summary['png'] = write_pngs(imgs, labels, paths.join(out_dir, 'png'), s.num_png)
    cols = min(num_classes, 10)
    grid_idx = np.concatenate([np.arange(r * num_classes, r * num_classes + cols)
                               for r in range(min(4, num_samples // num_classes))] or [np.arange(0)])
    if len(grid_idx):
      summary['grid'] = images_lib.save_png(images_lib.make_grid(imgs[grid_idx], ncols=cols),
                                            paths.join(out_dir, 'grid.png'))
  if s.evaluate and config.evaluator.features:
    evaluator = generative.GenerativeEvaluator(config, workdir)
    metrics = evaluator.evaluate(imgs, labels)
    summary['metrics'] = metrics
    if config.evaluator.real_baseline:
      summary['generative_real'] = evaluator.real_baseline(sampler.tokenizer,
                                                           sampler.tokenizer_params)
    summary['evaluator'] = dict(evaluator.info)
    if jax.process_index() == 0:
      paths.write_json(paths.join(out_dir, 'metrics.json'),
                       {'metrics': metrics, 'real_baseline': summary.get('generative_real'),
                        'evaluator': evaluator.info, 'npz': npz, 'step': step}, indent=2)
  return summary


# ---------------------------------------------------------------------- command line and API
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
             'heptapod_jax.main --mode=sample. Details: the docstring of heptapod_jax/sample.py.')
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
                      'paper; faster, approximate: see heptapod_jax/sampling.py)')
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
    summary['num_png'] = write_pngs(imgs, labels, out_dir, -1)
    lines.append(f'  {summary["num_png"]} PNG files (<index>_class<id>.png): {out_dir}')
  print('\n'.join(lines), flush=True)
  return summary


if __name__ == '__main__':
  console.setup(None, quiet=True)  # Warnings, the progress line and the summary.
  main()
