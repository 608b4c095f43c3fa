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
checkpoints/ directory, or one step directory of it (checkpoints/<step>/). The
model, tokenizer and data settings are the run's own: workdir/config.json, or,
without a workdir, the config saved in the step. A relative tokenizer path of
that config is looked up from the current directory, then from the run's
directory and its parents (so `workdirs/demo` works from anywhere inside the
repository); `--tokenizer` overrides it. The newest step is used unless
`--step` (or a step directory) names one; a damaged newest step is skipped
with a warning, read-only, for the newest one that restores. Parameters: the
EMA tree when the run samples with it (`train.sample_with_ema`, the default),
or `--params=ema|raw`. Image i has class classes[i mod C] and its own key
(seed, i), as in sample mode: the same seed gives the same images, whatever
`--batch` or the device count. The grid has one column per class (C <= 32).
The model runs data-parallel over the local devices, whatever mesh it was
trained on.

  from heptapod_jax import sample
  run = sample.load_run('workdirs/demo')                       # Python API (Colab)
  images, labels = sample.sample_classes(run, classes=[3, 7], num=16, seed=0)
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from heptapod_jax import checkpoint as ckpt_lib
from heptapod_jax import generation
from heptapod_jax import images as images_lib
from heptapod_jax import trainlib


def _abstract(trainer: Any, key: str) -> Any:
  """The sharded ShapeDtypeStructs of the train state's subtree `key` (KeyError if none)."""
  return getattr(trainer.abstract_state(trainer.state_shardings()), key)


def restore_params(trainer: Any, workdir: str, step: int = -1) -> tuple[Any, int, str]:
  """(params, step, key) from the workdir's checkpoint: the EMA tree if train.sample_with_ema."""
  key = 'ema_params' if trainer.config.train.sample_with_ema else 'params'
  params, step, _ = ckpt_lib.load_newest_intact_params(
      os.path.join(workdir, 'checkpoints'), _abstract(trainer, key),
      step=None if step < 0 else step, key=key,
      what='sample mode', hint='train first, or point --workdir at a trained run',
      step_name='config.sample.checkpoint_step')
  return params, step, key


def write_pngs(images: np.ndarray, labels: np.ndarray, directory: str, count: int) -> int:
  n = len(images) if count < 0 else min(count, len(images))
  for i in range(n):
    images_lib.save_png(images[i], os.path.join(directory, f'{i:06d}_class{int(labels[i])}.png'))
  return n


def sample_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Sample mode: generate config.sample's samples from the workdir's checkpoint, write the
  .npz (and PNGs), run config.evaluator on them. Returns a summary dict."""
  from heptapod_jax import train
  from heptapod_jax.evaluators import generative

  workdir = trainlib.resolve_workdir(workdir)
  trainer = train.Trainer(config, workdir)
  s = config.sample
  num_classes = trainer.model_config.num_classes
  num_samples = generation.num_samples_of(config, num_classes)
  chunk = s.chunk_size or config.train.global_batch_size
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    params, step, key = restore_params(trainer, workdir, s.checkpoint_step)
    out_dir = s.out_dir or os.path.join(workdir, f'samples_{step:07d}_seed{s.seed}')
    manifest = {'checkpoint_step': step, 'params_key': key,
                'sampling': config.sampling.to_dict(), 'model': config.model.to_dict(),
                'tokenizer': config.tokenizer.to_dict(), 'image_size': config.data.image_size,
                'num_classes': num_classes, 'workdir': workdir}
    manifest = json.loads(json.dumps(manifest, default=list))  # Tuples -> lists, as on disk.
    t0 = time.time()
    imgs, labels = generation.generate(trainer, params, num_samples=num_samples, seed=s.seed, chunk_size=chunk,
                            out_dir=out_dir, manifest=manifest)
    seconds = time.time() - t0
  size = config.data.image_size
  npz = os.path.join(out_dir, f'samples_{num_samples}x{size}x{size}x3.npz')
  summary: dict[str, Any] = {'workdir': workdir, 'step': step, 'out_dir': out_dir, 'npz': npz,
                             'num_samples': num_samples, 'seconds': seconds}
  if jax.process_index() == 0:
    generation.save_npz_atomic(npz, arr_0=imgs, arr_1=labels.astype(np.int64))
    if s.num_png:
      summary['png'] = write_pngs(imgs, labels, os.path.join(out_dir, 'png'), s.num_png)
    cols = min(num_classes, 10)
    grid_idx = np.concatenate([np.arange(r * num_classes, r * num_classes + cols)
                               for r in range(min(4, num_samples // num_classes))] or [np.arange(0)])
    if len(grid_idx):
      summary['grid'] = images_lib.save_png(images_lib.make_grid(imgs[grid_idx], ncols=cols),
                                            os.path.join(out_dir, 'grid.png'))
  if s.evaluate and config.evaluator.features:
    evaluator = generative.GenerativeEvaluator(config, workdir)
    metrics = evaluator.evaluate(imgs, labels)
    summary['metrics'] = metrics
    if config.evaluator.real_baseline:
      summary['generative_real'] = evaluator.real_baseline(trainer.tokenizer,
                                                           trainer.tokenizer_params)
    summary['evaluator'] = dict(evaluator.info)
    if jax.process_index() == 0:
      with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump({'metrics': metrics, 'real_baseline': summary.get('generative_real'),
                   'evaluator': evaluator.info, 'npz': npz, 'step': step}, f, indent=2)
  return summary


# ---------------------------------------------------------------------- command line and API
CONFIG_JSON = 'config.json'
CHECKPOINTS = 'checkpoints'
MAX_CLASS_COLUMNS = 32  # Wider grids of more classes become near-square grids instead.


class RunLocation(NamedTuple):
  """Where a checkpoint given on the command line lives.

  Attributes:
    workdir: the run's workdir (holds config.json and checkpoints/), or None.
    checkpoint_dir: the directory of numbered step directories.
    step: the step when a step directory was given, else None.
  """
  workdir: str | None
  checkpoint_dir: str
  step: int | None


class LoadedRun(NamedTuple):
  """A restored run, ready to sample (`load_run`, `sample_classes`).

  Attributes:
    trainer: a `train.Trainer` built from the run's config (model, tokenizer, mesh).
    params: the restored parameter tree.
    step: the checkpoint step it comes from.
    key: 'ema_params' or 'params'.
    location: where it was found.
    skipped: newer steps that failed to restore, as (step, reason).
  """
  trainer: Any
  params: Any
  step: int
  key: str
  location: RunLocation
  skipped: list[tuple[int, str]]

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The run's config as rebuilt for sampling (local data-parallel mesh, sampling flags)."""
    return self.trainer.config

  @property
  def num_classes(self) -> int:
    """Class ids of the model are 0..num_classes - 1."""
    return self.trainer.model_config.num_classes


def _is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(
      os.path.join(path, ckpt_lib.STATE))


def _has_steps(path: str) -> bool:
  return any(name.isdigit() and os.path.isdir(os.path.join(path, name))
             for name in os.listdir(path))


def locate_checkpoint(path: str) -> RunLocation:
  """Interprets `path`: a workdir, its checkpoints/ directory, or one step directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f'--checkpoint={path} does not exist.')
  if not os.path.isdir(path):
    raise ValueError(f'--checkpoint={path} is a file; give a run\'s workdir, its checkpoints/ '
                     'directory or a step directory checkpoints/<step>/.')

  def workdir_of(checkpoint_dir):
    parent = os.path.dirname(checkpoint_dir)
    return parent if os.path.isfile(os.path.join(parent, CONFIG_JSON)) else None

  if _is_step_dir(path):
    checkpoint_dir = os.path.dirname(path)
    return RunLocation(workdir_of(checkpoint_dir), checkpoint_dir, int(os.path.basename(path)))
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    return RunLocation(path, os.path.join(path, CHECKPOINTS), None)
  if _has_steps(path):
    return RunLocation(workdir_of(path), path, None)
  if os.path.isfile(os.path.join(path, CONFIG_JSON)):
    raise FileNotFoundError(f'--checkpoint={path} holds {CONFIG_JSON} but no {CHECKPOINTS}/ '
                            'directory: the run has not saved a checkpoint yet.')
  raise FileNotFoundError(
      f'--checkpoint={path} is not a run: expected a workdir ({CONFIG_JSON} + {CHECKPOINTS}/), '
      f'a checkpoints directory (numbered step directories) or a step directory '
      f'(<step>/{ckpt_lib.STATE}); it holds {sorted(os.listdir(path))[:10]}.')


def config_from_saved(saved: dict[str, Any], where: str) -> ml_collections.ConfigDict:
  """The saved config (config.json or a step's config item) over `config_lib.base_config()`.

  Fields this version does not know are logged and ignored; fields the run did
  not save (added since) keep their defaults.
  """
  from heptapod_jax import config_lib
  kind = saved.get('trainer', 'ar')
  if kind != 'ar':
    raise ValueError(f'{where} is a config.trainer={kind!r} run, not a Heptapod (ar) run: it '
                     'cannot sample images (a tokenizer run is used through tokenizer.checkpoint).')
  config = config_lib.base_config()
  ignored: list[str] = []

  def merge(dst: ml_collections.ConfigDict, src: dict[str, Any], prefix: str) -> None:
    for k, v in src.items():
      if k not in dst:
        ignored.append(prefix + k)
      elif isinstance(dst[k], ml_collections.ConfigDict) and isinstance(v, dict):
        merge(dst[k], v, f'{prefix}{k}.')
      else:
        if isinstance(dst[k], tuple) and isinstance(v, list):
          v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        try:
          dst[k] = v
        except (TypeError, ValueError) as e:
          raise ValueError(f'{where}: field {prefix}{k}={v!r} does not fit this version\'s '
                           f'config ({e}).') from None

  merge(config, saved, '')
  if ignored:
    logging.warning('%s: fields unknown to this version of the code, ignored: %s', where, ignored)
  return config


def read_run_config(location: RunLocation, step: int | None) -> ml_collections.ConfigDict:
  """The run's config: workdir/config.json, else the config saved in the (newest) step."""
  if location.workdir is not None:
    where = os.path.join(location.workdir, CONFIG_JSON)
    with open(where) as f:
      return config_from_saved(json.load(f), where)
  steps = ckpt_lib.checkpoint_steps(location.checkpoint_dir)
  candidates = [step] if step is not None else sorted(steps, reverse=True)
  for s in candidates:
    # The JSON file Orbax's JsonCheckpointHandler writes for the step's config item.
    where = os.path.join(location.checkpoint_dir, str(s), ckpt_lib.CONFIG, 'metadata')
    try:
      with open(where) as f:
        return config_from_saved(json.load(f), where)
    except (OSError, ValueError) as e:
      logging.warning('Cannot read the config saved in %s (%s).', where, e)
  raise FileNotFoundError(
      f'no config for {location.checkpoint_dir}: no {CONFIG_JSON} in its parent directory and no '
      f'readable config item in its steps {candidates}; pass the run\'s workdir.')


def _resolve_tokenizer(config: ml_collections.ConfigDict, location: RunLocation,
                       override: str | None) -> None:
  """Makes config.tokenizer.checkpoint a path that exists here (see the module docstring)."""
  tok = config.tokenizer
  if override:
    tok.checkpoint = override
  if tok.kind == 'pixel':
    return
  path = tok.checkpoint
  if not path:
    raise ValueError(f'the run\'s config.tokenizer.kind={tok.kind!r} has no tokenizer.checkpoint; '
                     'pass --tokenizer=DIR.')
  if '://' in path:
    return
  path = os.path.expanduser(path)
  if os.path.isabs(path) or override:
    candidates = [path]
  else:
    anchor = location.workdir or location.checkpoint_dir
    candidates = [path]
    while True:
      candidates.append(os.path.join(anchor, path))
      parent = os.path.dirname(anchor)
      if parent == anchor:
        break
      anchor = parent
  for candidate in candidates:
    if os.path.isdir(candidate):
      tok.checkpoint = os.path.abspath(candidate)
      return
  raise FileNotFoundError(
      f'the run\'s tokenizer checkpoint {path!r} (config.tokenizer.checkpoint) is not a directory '
      f'here; looked in {candidates[:4]}{" ..." if len(candidates) > 4 else ""}. Pass '
      '--tokenizer=DIR (the tokenizer run\'s export, e.g. workdirs/demo/tokenizer/tokenizer).')


def load_run(checkpoint: str, *, step: int | None = None, params: str | None = None,
             tokenizer: str | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None,
             cfg_scale: float | None = None, parallel_tokens: int | None = None) -> LoadedRun:
  """Restores a trained run for sampling (the Python API behind the command line).

  Args:
    checkpoint: a workdir, its checkpoints/ directory or a step directory.
    step: which step; None = the newest that restores (or the step directory's).
    params: 'ema' or 'raw'; None = the run's train.sample_with_ema.
    tokenizer: overrides the run's tokenizer checkpoint directory.
    temperature, top_k, top_p, cfg_scale, parallel_tokens: override the run's
      config.sampling.

  Returns:
    A `LoadedRun`; pass it to `sample_classes`.
  """
  from heptapod_jax import train
  location = locate_checkpoint(checkpoint)
  if location.step is not None:
    if step is not None and step != location.step:
      raise ValueError(f'--step={step} disagrees with the step directory {checkpoint} '
                       f'(step {location.step}); give one of them.')
    step = location.step
  config = read_run_config(location, step)
  _resolve_tokenizer(config, location, tokenizer)
  for name, value in (('temperature', temperature), ('top_k', top_k), ('top_p', top_p),
                      ('cfg_scale', cfg_scale), ('parallel_tokens', parallel_tokens)):
    if value is not None:
      config.sampling[name] = type(config.sampling[name])(value)
  from heptapod_jax import sampling  # pylint: disable=g-import-not-at-top
  from heptapod_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  sampling_config = sampling.SamplingConfig(**config.sampling.to_dict())
  sampling_config.validate()  # The overrides' errors before anything is restored.
  sampling_config.check_model(ModelConfig.from_dict(config.model.to_dict()))
  if params not in (None, 'ema', 'raw'):
    raise ValueError(f'--params={params!r} is not one of [\'ema\', \'raw\'].')
  if params is not None:
    config.train.sample_with_ema = params == 'ema'
  cfg_dropout = config.model.backbone.class_dropout
  if config.sampling.cfg_scale != 1.0:
    if cfg_dropout == 0.0:
      raise ValueError(f'--cfg_scale={config.sampling.cfg_scale} needs a model trained with class '
                       'dropout (model.backbone.class_dropout > 0): this run has class_dropout=0, '
                       'its null class was never trained, so guidance would be meaningless. '
                       'Leave --cfg_scale at 1 (the paper samples without guidance).')
    logging.warning('Classifier-free guidance at scale %s (the run was trained with '
                    'class_dropout=%s); the paper samples without guidance.',
                    config.sampling.cfg_scale, cfg_dropout)
  # Sampling is per image: data-parallel over this machine's devices, whatever the run's mesh.
  config.mesh.shape = (-1, 1, 1)
  config.mesh.dcn_shape = (1, 1, 1)
  config.train.global_batch_size = jax.device_count()
  config.train.grad_accum_steps = 1
  workdir = location.workdir or os.path.dirname(location.checkpoint_dir)
  trainer = train.Trainer(config, workdir)
  key = 'ema_params' if config.train.sample_with_ema else 'params'
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    restored, step, skipped = ckpt_lib.load_newest_intact_params(
        location.checkpoint_dir, _abstract(trainer, key), step=step, key=key, what='sampling',
        hint='train first, or point --checkpoint at a trained run')
  return LoadedRun(trainer, restored, step, key, location, skipped)


def check_classes(classes: Any, num_classes: int) -> list[int]:
  """The class ids as ints, each in [0, num_classes); ValueError naming the bad ones."""
  classes = [int(c) for c in classes]
  if not classes:
    raise ValueError('--classes is empty; give class ids, e.g. --classes=3,7.')
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad:
    raise ValueError(f'--classes: {bad} out of range; this model has num_classes={num_classes} '
                     f'(ids 0..{num_classes - 1}).')
  return classes


def default_classes(num_classes: int) -> list[int]:
  """All classes up to 10 of them, else 10 spread evenly over the ids (as training's grids)."""
  cols = min(num_classes, 10)
  return np.linspace(0, num_classes - 1, cols).round().astype(int).tolist()


def sample_classes(run: LoadedRun, classes: Any, num: int, *, seed: int = 0,
                   batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(uint8[num, S, S, 3], int32[num]): image i has class classes[i mod C] and key (seed, i).

  The images depend only on (seed, i, class), not on `batch` or the device count.
  """
  trainer = run.trainer
  classes = check_classes(classes, run.num_classes)
  if num < 1 or batch < 1:
    raise ValueError(f'--n={num} and --batch={batch} must be >= 1.')
  labels = np.asarray([classes[i % len(classes)] for i in range(num)], np.int32)
  batch = min(batch, num)
  out = []
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    for start in range(0, num, batch):
      out.append(trainer.sample_images(run.params, labels[start:start + batch], seed=seed,
                                       start_index=start, pad_to=batch))
  return np.concatenate(out), labels


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
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  import tensorflow as tf  # Pulled in by the trainer's imports; it must leave the GPUs to JAX.
  tf.config.set_visible_devices([], 'GPU')
  try:
    _check_args(args)
    classes = _parse_classes(args.classes) if args.classes is not None else None
    run = load_run(args.checkpoint, step=args.step, params=args.params, tokenizer=args.tokenizer,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   cfg_scale=args.cfg_scale, parallel_tokens=args.parallel_tokens)
    classes = (check_classes(classes, run.num_classes) if classes is not None
               else default_classes(run.num_classes))
  except (ValueError, FileNotFoundError, ckpt_lib.NoRestorableStepError, KeyError) as e:
    parser.error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
  num = args.n if args.n is not None else 4 * len(classes)
  t0 = time.time()
  imgs, labels = sample_classes(run, classes, num, seed=args.seed, batch=args.batch)
  seconds = time.time() - t0
  run_dir = run.location.workdir or os.path.dirname(run.location.checkpoint_dir)
  out = args.out or os.path.join(run_dir, 'samples', f'cli_step{run.step}_seed{args.seed}.png')
  ncols = grid_columns(len(classes), num)
  out = os.path.abspath(images_lib.save_png(images_lib.make_grid(imgs, ncols=ncols), out))
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
    out_dir = os.path.abspath(args.out_dir)
    summary['out_dir'] = out_dir
    summary['num_png'] = write_pngs(imgs, labels, out_dir, -1)
    lines.append(f'  {summary["num_png"]} PNG files (<index>_class<id>.png): {out_dir}')
  print('\n'.join(lines), flush=True)
  return summary


def _not_read_only_notice(record) -> bool:
  msg = str(record.msg)
  return not ('read_only=True' in msg or 'is read only' in msg)


def quiet_read_only_warnings() -> None:
  """Drops Orbax's warning on every read-only open of a checkpoint (all that sampling does)."""
  import logging as pylogging
  absl_logger = pylogging.getLogger('absl')
  if _not_read_only_notice not in absl_logger.filters:
    absl_logger.addFilter(_not_read_only_notice)


if __name__ == '__main__':
  quiet_read_only_warnings()
  logging.set_verbosity(logging.WARNING)
  main()
