"""Trained runs on disk, loaded for sampling: find the checkpoint, rebuild the config, restore.

  from heptapod_jax.sampling import generation
  from heptapod_jax.storage import runs
  run = runs.load_run('workdirs/demo')                          # Python API (Colab)
  images, labels = generation.sample_classes(run, classes=[3, 7], num=16, seed=0)

A checkpoint is given as a run's workdir (it holds config.json and checkpoints/), its
checkpoints/ directory, or one step directory of it (checkpoints/<step>/). The model,
tokenizer and data settings are the run's own: workdir/config.json, or, without a workdir,
the config saved in the step (`config_from_saved` lays it over today's defaults). A relative
tokenizer path of that config is looked up from the current directory, then from the run's
directory and its parents; `tokenizer=` overrides it. The newest step is used unless one is
named; a damaged newest step is skipped with a warning, read-only, for the newest one that
restores (`checkpoint_read.load_newest_intact_params`). The model runs data-parallel over the local
devices, whatever mesh it was trained on. Used by the sampling command line (`sample.py`),
sample mode and the notebooks; it needs neither the trainer nor the command line.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
from absl import logging

from heptapod_jax import config_lib
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.sampling import decode
from heptapod_jax.sampling.image_sampler import ImageSampler
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import checkpoint_read
from heptapod_jax.storage import paths

CONFIG_JSON = 'config.json'
CHECKPOINTS = 'checkpoints'


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
  """A restored run, ready to sample (`load_run`, `generation.sample_classes`).

  Attributes:
    sampler: an `ImageSampler` built from the run's config (model, tokenizer, mesh).
    params: the restored parameter tree.
    step: the checkpoint step it comes from.
    key: 'ema_params' or 'params'.
    location: where it was found.
    skipped: newer steps that failed to restore, as (step, reason).
  """
  sampler: ImageSampler
  params: Any
  step: int
  key: str
  location: RunLocation
  skipped: list[tuple[int, str]]

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The run's config as rebuilt for sampling (local data-parallel mesh, sampling flags)."""
    return self.sampler.config

  @property
  def num_classes(self) -> int:
    """Class ids of the model are 0..num_classes - 1."""
    return self.sampler.model_config.num_classes


def _is_step_dir(path: str) -> bool:
  return paths.basename(path).isdigit() and paths.isdir(paths.join(path, ckpt_lib.STATE))


def _has_steps(path: str) -> bool:
  return any(name.isdigit() and paths.isdir(paths.join(path, name))
             for name in paths.listdir(path))


def locate_checkpoint(path: str) -> RunLocation:
  """Interprets `path`: a workdir, its checkpoints/ directory, or one step directory."""
  path = paths.resolve(path, '--checkpoint')
  if not paths.exists(path):
    raise FileNotFoundError(f'--checkpoint={path} does not exist.')
  if not paths.isdir(path):
    raise ValueError(f'--checkpoint={path} is a file; give a run\'s workdir, its checkpoints/ '
                     'directory or a step directory checkpoints/<step>/.')

  def workdir_of(checkpoint_dir):
    parent = paths.dirname(checkpoint_dir)
    return parent if paths.isfile(paths.join(parent, CONFIG_JSON)) else None

  if _is_step_dir(path):
    checkpoint_dir = paths.dirname(path)
    return RunLocation(workdir_of(checkpoint_dir), checkpoint_dir, int(paths.basename(path)))
  if paths.isdir(paths.join(path, CHECKPOINTS)):
    return RunLocation(path, paths.join(path, CHECKPOINTS), None)
  if _has_steps(path):
    return RunLocation(workdir_of(path), path, None)
  if paths.isfile(paths.join(path, CONFIG_JSON)):
    raise FileNotFoundError(f'--checkpoint={path} holds {CONFIG_JSON} but no {CHECKPOINTS}/ '
                            'directory: the run has not saved a checkpoint yet.')
  raise FileNotFoundError(
      f'--checkpoint={path} is not a run: expected a workdir ({CONFIG_JSON} + {CHECKPOINTS}/), '
      f'a checkpoints directory (numbered step directories) or a step directory '
      f'(<step>/{ckpt_lib.STATE}); it holds {paths.listdir(path)[:10]}.')


def config_from_saved(saved: dict[str, Any], where: str) -> ml_collections.ConfigDict:
  """The saved config (config.json or a step's config item) over `config_lib.base_config()`.

  Fields this version does not know are logged and ignored; fields the run did
  not save (added since) keep their defaults.
  """
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
    where = paths.join(location.workdir, CONFIG_JSON)
    return config_from_saved(paths.read_json(where), where)
  steps = checkpoint_read.checkpoint_steps(location.checkpoint_dir)
  candidates = [step] if step is not None else sorted(steps, reverse=True)
  for s in candidates:
    # The JSON file Orbax's JsonCheckpointHandler writes for the step's config item.
    where = paths.join(location.checkpoint_dir, str(s), ckpt_lib.CONFIG, 'metadata')
    try:
      return config_from_saved(paths.read_json(where), where)
    except (OSError, ValueError) as e:
      logging.warning('Cannot read the config saved in %s (%s).', where, e)
  raise FileNotFoundError(
      f'no config for {location.checkpoint_dir}: no {CONFIG_JSON} in its parent directory and no '
      f'readable config item in its steps {candidates}; pass the run\'s workdir.')


def resolve_tokenizer(config: ml_collections.ConfigDict, location: RunLocation,
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
  if paths.is_remote(path):
    return
  path = os.path.expanduser(path)
  if os.path.isabs(path) or override:
    candidates = [path]
  else:
    anchor = location.workdir or location.checkpoint_dir
    candidates = [path]
    while True:
      candidates.append(paths.join(anchor, path))
      parent = paths.dirname(anchor)
      if parent == anchor:
        break
      anchor = parent
  for candidate in candidates:
    if paths.isdir(candidate):
      tok.checkpoint = paths.resolve(candidate)
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
  location = locate_checkpoint(checkpoint)
  if location.step is not None:
    if step is not None and step != location.step:
      raise ValueError(f'--step={step} disagrees with the step directory {checkpoint} '
                       f'(step {location.step}); give one of them.')
    step = location.step
  config = read_run_config(location, step)
  resolve_tokenizer(config, location, tokenizer)
  for name, value in (('temperature', temperature), ('top_k', top_k), ('top_p', top_p),
                      ('cfg_scale', cfg_scale), ('parallel_tokens', parallel_tokens)):
    if value is not None:
      config.sampling[name] = type(config.sampling[name])(value)
  sampling_config = decode.SamplingConfig(**config.sampling.to_dict())
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
  sampler = ImageSampler(config)
  key = 'ema_params' if config.train.sample_with_ema else 'params'
  with jax.set_mesh(sampler.mesh), nn.logical_axis_rules(sampler.rules):
    restored, step, skipped = checkpoint_read.load_newest_intact_params(
        location.checkpoint_dir, sampler.abstract_params(), step=step, key=key, what='sampling',
        hint='train first, or point --checkpoint at a trained run')
  return LoadedRun(sampler, restored, step, key, location, skipped)



def restore_params(sampler: ImageSampler, workdir: str, step: int = -1) -> tuple[Any, int, str]:
  """(params, step, key) from the workdir's checkpoint: the EMA tree if train.sample_with_ema.
  Call inside the sampler's mesh context (`jax.set_mesh(sampler.mesh)`)."""
  key = 'ema_params' if sampler.config.train.sample_with_ema else 'params'
  params, step, _ = checkpoint_read.load_newest_intact_params(
      paths.join(workdir, CHECKPOINTS), sampler.abstract_params(),
      step=None if step < 0 else step, key=key,
      what='sample mode', hint='train first, or point --workdir at a trained run',
      step_name='config.sample.checkpoint_step')
  return params, step, key
