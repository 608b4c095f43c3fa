"""The training loop: sharded state, one pure jitted step, Orbax checkpoints, clu metrics.

    from heptapod_jax.training import train
    train.train_and_evaluate(config, workdir)   # also from Colab

Order of initialisation: the workdir's own checkpoint (resume, including the
data position) > `config.init_from` (parameters only) > scratch.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from heptapod_jax import config_lib, console, images, report, sharding
from heptapod_jax.data import builtin, codes_format, input_pipeline
from heptapod_jax.evaluators import generative
from heptapod_jax.models.tokenizers import decode_tokens, encode_images
from heptapod_jax.sampling import generation, image_sampler
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import checkpoint_read
from heptapod_jax.storage import paths
from heptapod_jax.training import optim, trainlib
# Public here too: the pure step and its state live in training/steps.py (no TensorFlow, no clu).
from heptapod_jax.training.steps import (TrainState, abstract_train_state, eval_step,  # noqa: F401
                                         init_train_state, jit_train_step, train_state_shardings,
                                         train_step)
from heptapod_jax.training.trainlib import NonFiniteError  # noqa: F401  (public API)

Array = jax.Array


class Trainer(image_sampler.ImageSampler):
  """Holds the pieces of one run; `train_and_evaluate` drives it. The sampling side (model,
  tokenizer, mesh, `sample_images`) is `ImageSampler`'s; this adds the optimizer, the batch
  shardings and the train state."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    super().__init__(config)
    self.workdir = workdir
    dp = sharding.data_parallel_size(self.mesh, self.rules)
    if config.train.global_batch_size % dp:
      raise ValueError(f'config.train.global_batch_size={config.train.global_batch_size} is not '
                       f'divisible by the {dp} data-parallel shards of mesh {dict(self.mesh.shape)}.')
    accum = config.train.grad_accum_steps
    if config.train.global_batch_size % (dp * accum):
      raise ValueError(f'config.train.global_batch_size={config.train.global_batch_size} is not '
                       f'divisible by config.train.grad_accum_steps={accum} microbatches x {dp} '
                       'data-parallel shards.')
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.num_steps)
    self.batch_shardings = {'image': sharding.batch_sharding(self.mesh, self.rules, 4),
                            'tokens': sharding.batch_sharding(self.mesh, self.rules, 3),
                            'latent_mean': sharding.batch_sharding(self.mesh, self.rules, 4),
                            'latent_std': sharding.batch_sharding(self.mesh, self.rules, 4),
                            'label': sharding.batch_sharding(self.mesh, self.rules, 1),
                            'mask': sharding.batch_sharding(self.mesh, self.rules, 1)}

  # ------------------------------------------------------------------ state
  def _init_state(self, rng: Array, boxed: bool = False) -> TrainState:
    return init_train_state(self.model, self.tx, rng, boxed=boxed)

  def state_shardings(self) -> Any:
    """NamedShardings of the TrainState, from the parameters' logical annotations."""
    return train_state_shardings(self.model, self.tx, self.mesh, self.rules)

  def abstract_state(self, shardings) -> TrainState:
    return abstract_train_state(self.model, self.tx, shardings)

  def create_state(self, shardings) -> TrainState:
    rng = jax.random.key(self.config.seed)
    init = jax.jit(self._init_state, out_shardings=shardings)
    return init(rng)

  def initial_state(self, shardings, checkpointer) -> tuple[TrainState, dict | None]:
    """The workdir's own checkpoint (with its data position) > init_from (parameters) > scratch.

    Damaged newer checkpoints are skipped and moved aside (see
    `Checkpointer.restore_latest_intact`); if none is intact this raises
    NoIntactCheckpointError unless `config.allow_scratch`.
    """
    cfg = self.config
    if checkpointer.latest_step() is not None:
      restored = checkpointer.restore_latest_intact(self.abstract_state(shardings),
                                                    allow_scratch=cfg.allow_scratch)
      if restored is not None:
        logging.info('Resuming from %s at step %d (damaged newer steps skipped: %s).',
                     checkpointer.directory, restored.step, [s for s, _ in restored.skipped])
        return restored.state, restored.data_state
    state = self.create_state(shardings)
    if cfg.init_from:
      abstract = self.abstract_state(shardings).params
      params = checkpoint_read.load_params(cfg.init_from, abstract, key=cfg.init_from_key)
      logging.info('Initialised parameters from %s (%s).', cfg.init_from, cfg.init_from_key)
      state = state.replace(params=params, ema_params=params)
    return state, None

  @functools.cached_property
  def eval_fn(self):
    """Jitted eval_step: (params, batch) -> (sum, count) metrics."""
    return jax.jit(functools.partial(eval_step, model=self.model, tokenizer=self.tokenizer),
                   out_shardings=sharding.replicated(self.mesh))


def _class_grid_labels(num_images: int, num_classes: int) -> np.ndarray:
  """Class-balanced labels laid out so that each grid column is one class."""
  cols = min(num_classes, 10) if num_classes > 10 else num_classes
  classes = np.linspace(0, num_classes - 1, cols).round().astype(np.int32)
  rows = max(1, num_images // cols)
  return np.tile(classes, rows)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), samples and evaluates.

  The phases, each a named function or method below:
    1. `Trainer(config, workdir)`: validate the config, build the model, tokenizer, mesh
       and optimizer.
    2. `Trainer.initial_state`: the workdir's checkpoint (with its data position), else
       `config.init_from`, else scratch.
    3. `_train_input`: the training batches, from the restored data position, checked
       against the model.
    4. `_compile_train_step`: the sharded step, compiled once before the loop.
    5. `_at_start`: on a fresh run, the reference grid and the hyperparameters.
    6. The loop: one step, then `_Loop.after_step` (`trainlib.TrainLoop`: non-finite
       checks, logging, checkpoints, periodic evaluation and samples; a signal or
       preemption notice saves and stops).
    7. `_at_end`: held-out NLL, the last samples, generative metrics, the final save.
  8. `_write_page`: <workdir>/summary.html (report.py), on process 0.

  Returns a summary dict: final step, last train metrics, eval metrics,
  the paths of the written sample grids and of the summary page ('page'), or 'preempted'
  when stopped early.
  """
  workdir = paths.resolve(workdir, 'workdir')
  trainer = Trainer(config, workdir)
  tcfg = config.train
  if trainer.is_chief:
    trainlib.write_config(config, workdir)
  writer = trainlib.TolerantWriter(lambda: metric_writers.create_default_writer(
      workdir, just_logging=not trainer.is_chief, asynchronous=True), workdir)
  summary: dict[str, Any] = {'workdir': workdir, 'samples': [], 'history': []}
  # Before the mesh is installed: on CPU this times a matmul on one device.
  throughput = trainlib.Throughput(trainer.model_config, tcfg.global_batch_size, tcfg.peak_tflops)
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    shardings = trainer.state_shardings()
    checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, 'checkpoints'),
                                         save_interval_steps=tcfg.checkpoint_every,
                                         max_to_keep=tcfg.keep_checkpoints,
                                         async_save=tcfg.async_checkpoints)
    state, data_state = trainer.initial_state(shardings, checkpointer)
    step = int(jax.device_get(state.step))
    train_iter, batch_shardings = _train_input(trainer, data_state)
    # A finished run that is run again (to re-evaluate, or by a job restarted after its end)
    # has no step to take: nothing to compile.
    train_step_fn = (_compile_train_step(trainer, shardings, batch_shardings)
                     if step < tcfg.num_steps else None)
    if step == 0:
      _at_start(trainer, writer, summary)
    loop = _Loop(trainer, writer, checkpointer, train_iter, throughput, summary, step)
    with loop:
      while step < tcfg.num_steps:
        batch = input_pipeline.make_global_batch(next(train_iter), batch_shardings)
        state, metrics = train_step_fn(state, batch, trainer.tokenizer_params)
        step += 1
        if not loop.after_step(step, state, metrics):
          break
    if not summary.get('preempted'):
      summary['step'] = step
      _at_end(loop, state, step)
    checkpointer.close()
  writer.flush()
  writer.close()
  if trainer.is_chief and not summary.get('preempted'):
    summary['page'] = _write_page(config, workdir, summary)
  return summary


def _write_page(config: ml_collections.ConfigDict, workdir: str, summary: dict[str, Any]
                ) -> str | None:
  """The run's summary page (report.py), local or in the bucket; a failure to write it is
  logged, never fatal: the run itself is done and saved."""
  try:
    return report.write_run_page(workdir, summary, title=config_lib.describe(config),
                                 tokenizer_workdir=report.tokenizer_dir(config))
  except (OSError, ValueError) as e:
    logging.warning('Could not write the summary page in %s: %s', workdir, e)
    return None


def _train_input(trainer: Trainer, data_state: dict | None):
  """(train iterator at `data_state`, batch shardings of its keys), checked against the model:
  the data's classes, and for pre-tokenized data its grid, vocabulary or latent channels."""
  cfg, mcfg = trainer.config, trainer.model_config
  if jax.process_count() > 1 and cfg.data.source == 'builtin_digits' and not cfg.data.tokenized_dir:
    # Hosts sharing one data_dir would race to build the data set: process 0 builds it first
    # (hosts with their own local data_dir build theirs after the barrier).
    if trainer.is_chief:
      builtin.prepare(cfg.data.data_dir)
    multihost_utils.sync_global_devices('heptapod: built-in data set prepared')
  train_iter = input_pipeline.create_train_iterator(
      cfg.data, global_batch_size=cfg.train.global_batch_size, seed=cfg.seed, state=data_state)
  if train_iter.num_classes != mcfg.num_classes:
    raise ValueError(f'config.model.num_classes={mcfg.num_classes} but the data '
                     f'({cfg.data.source}) has {train_iter.num_classes} classes.')
  if cfg.data.tokenized_dir:
    codes_format.check_tokenizer(train_iter.metadata, cfg.tokenizer,
                                 codes_format.weights_fingerprint(trainer.tokenizer_params))
    moments = getattr(train_iter, 'payload', 'codes') == 'moments'
    have = (f'{train_iter.latent_channels}-channel latents' if moments
            else f'{train_iter.vocab_size} codes')
    want = f'token_dim={mcfg.token_dim}' if mcfg.continuous else f'vocab_size={mcfg.vocab_size}'
    if (tuple(train_iter.grid_size) != tuple(mcfg.grid_size) or moments != mcfg.continuous
        or (train_iter.latent_channels != mcfg.token_dim if moments
            else train_iter.vocab_size != mcfg.vocab_size)):
      raise ValueError(f'config.data.tokenized_dir={cfg.data.tokenized_dir} holds '
                       f'{tuple(train_iter.grid_size)} grids of {have}; config.model has '
                       f'grid_size={tuple(mcfg.grid_size)}, tokens={mcfg.tokens!r}, {want}.')
    input_keys = ('latent_mean', 'latent_std') if moments else ('tokens',)
  else:
    input_keys = ('image',)
  batch_shardings = {k: trainer.batch_shardings[k] for k in input_keys + ('label',)}
  return train_iter, batch_shardings


def _compile_train_step(trainer: Trainer, shardings: Any, batch_shardings: dict[str, Any]):
  """The train step for these batch keys, lowered and compiled once (its memory is logged)."""
  cfg, mcfg = trainer.config, trainer.model_config
  step_fn = jit_train_step(trainer.model, trainer.tokenizer, trainer.tx, trainer.schedule,
                           ema_decay=cfg.optim.ema_decay, accum_steps=cfg.train.grad_accum_steps,
                           state_shardings=shardings, batch_shardings=batch_shardings,
                           mesh=trainer.mesh)
  b = cfg.train.global_batch_size
  latent = jax.ShapeDtypeStruct((b, *mcfg.grid_size, mcfg.token_dim), jnp.float32)
  abstract_batch = {
      'tokens': jax.ShapeDtypeStruct((b, *mcfg.grid_size), jnp.int32),
      'latent_mean': latent, 'latent_std': latent,
      'image': jax.ShapeDtypeStruct((b, cfg.data.image_size, cfg.data.image_size, 3), jnp.float32),
      'label': jax.ShapeDtypeStruct((b,), jnp.int32)}
  abstract_batch = {k: abstract_batch[k] for k in batch_shardings}
  compiled = step_fn.lower(trainer.abstract_state(shardings), abstract_batch,
                           trainer.tokenizer_params).compile()
  trainlib.log_compiled(compiled)
  return compiled


def _at_start(trainer: Trainer, writer, summary: dict[str, Any]) -> None:
  """A fresh run (step 0): the tokenized reference grid and the hyperparameters."""
  if trainer.config.train.num_sample_images:
    summary['reference'] = _write_reference(trainer, writer)
  if trainer.is_chief:
    writer.write_hparams({k: v for k, v in config_lib.to_flat_dict(trainer.config).items()
                          if isinstance(v, (int, float, str, bool))})


class _Loop(trainlib.TrainLoop):
  """The AR trainer's steps between updates: the non-finite policy of config.train.on_nonfinite,
  speed and MFU and the data counters in the log line, evaluation and samples at intervals."""

  def __init__(self, trainer: Trainer, writer, checkpointer, train_iter, throughput,
               summary: dict[str, Any], step: int):
    super().__init__(trainer.config, writer, checkpointer, train_iter, summary, step)
    tcfg = trainer.config.train
    self.trainer, self.throughput = trainer, throughput
    self.guard = trainlib.NonFiniteGuard(tcfg.on_nonfinite, tcfg.max_nonfinite_skips, checkpointer)
    # Built on first use (it may train the feature net and compute reference statistics).
    self.evaluator = functools.lru_cache(maxsize=1)(
        lambda: generative.GenerativeEvaluator(trainer.config, trainer.workdir))

  def check(self, metrics: dict[str, Array], step: int) -> None:
    self.guard.check(metrics, step)

  def speed(self, steps_per_sec: float) -> dict[str, float]:
    tcfg = self.config.train
    scalars = super().speed(steps_per_sec)
    scalars.update(tokens_per_sec=(steps_per_sec * tcfg.global_batch_size
                                   * self.trainer.model_config.num_positions),
                   data_skipped=self.train_iter.get_state()['num_skipped'],
                   nonfinite_skipped=self.guard.skipped)
    scalars.update(self.throughput.scalars(steps_per_sec))
    return scalars

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """train/* as every trainer, and data/* (records read, skipped and converted, by reason)."""
    data_counts = input_pipeline.count_metrics(self.train_iter.get_state())
    self.writer.write_scalars(step, {**{f'train/{k}': v for k, v in scalars.items()},
                                     **{f'data/{k}': v for k, v in data_counts.items()}})
    self.summary['train'] = scalars
    self.summary['data'] = data_counts
    self.summary['history'].append(dict(scalars, step=step))

  def periodic(self, step: int, state: TrainState) -> None:
    """Held-out NLL, sample grids and generative metrics at their intervals."""
    tcfg, ecfg = self.config.train, self.config.evaluator
    if tcfg.eval_every and step % tcfg.eval_every == 0:
      _evaluate(self.trainer, state, self.writer, step)
    if tcfg.sample_every and step % tcfg.sample_every == 0:
      self.summary['samples'].append(_write_samples(self.trainer, state, self.writer, step))
    if ecfg.every_steps and step % ecfg.every_steps == 0:
      self.summary['generative'] = _generative_eval(self.trainer, self.evaluator(), state,
                                                    self.writer, step)


def _at_end(loop: _Loop, state: TrainState, step: int) -> None:
  """After the last step: held-out NLL, the last sample grid, generative metrics (also of real
  images when asked), then the final checkpoint's save is waited for."""
  trainer, writer, summary = loop.trainer, loop.writer, loop.summary
  tcfg, ecfg = trainer.config.train, trainer.config.evaluator
  if tcfg.eval_at_end:
    summary['eval'] = _evaluate(trainer, state, writer, step)
  if tcfg.sample_at_end and tcfg.num_sample_images:
    summary['samples'].append(_write_samples(trainer, state, writer, step))
  if ecfg.at_end:
    summary['generative'] = _generative_eval(trainer, loop.evaluator(), state, writer, step)
  if ecfg.real_baseline and ecfg.features:
    real = loop.evaluator().real_baseline(trainer.tokenizer, trainer.tokenizer_params)
    for name, metrics in real.items():
      writer.write_scalars(step, {f'generative_{name}/{k}': v for k, v in metrics.items()})
    summary['generative_real'] = real
  if ecfg.features and loop.evaluator.cache_info().currsize:
    summary['generative_info'] = loop.evaluator().info
  loop.saver.finish(step, final=True)


def _eval_params(trainer: Trainer, state: TrainState) -> Any:
  return state.ema_params if trainer.config.train.sample_with_ema else state.params


def _evaluate(trainer: Trainer, state: TrainState, writer, step: int) -> dict[str, float]:
  """Held-out NLL per token (nats and bits) and next-token accuracy on the eval split."""
  cfg = trainer.config
  dataset = input_pipeline.create_eval_dataset(cfg.data, batch_size=cfg.train.global_batch_size)
  results = []
  for i, batch in enumerate(dataset):
    if cfg.train.eval_batches and i >= cfg.train.eval_batches:
      break
    results.append(trainer.eval_fn(_eval_params(trainer, state),
                                   input_pipeline.make_global_batch(batch, trainer.batch_shardings),
                                   trainer.tokenizer_params))
  if not results:
    return {}
  scalars = trainlib.reduce_metrics(results)
  if 'nll' in scalars:
    scalars['bits_per_token'] = scalars['nll'] / np.log(2.0)
  writer.write_scalars(step, {f'eval/{k}': v for k, v in scalars.items()})
  logging.info('eval at step %d: %s', step, scalars)
  if 'nll' in scalars:
    console.say(f'eval at step {step}: NLL {scalars["nll"]:.4f} nats/token, '
                f'next-token accuracy {scalars["accuracy"]:.3f}')
  elif 'mse' in scalars:
    console.say(f'eval at step {step}: diffusion loss {scalars["mse"]:.4f}')
  return scalars


def _generative_eval(trainer: Trainer, evaluator, state: TrainState, writer,
                     step: int) -> dict[str, float]:
  """FID & co. of `config.evaluator.num_samples` class-balanced samples (in memory, seeded with
  config.sample.seed at every evaluation, so that runs and steps compare on the same noise)."""
  cfg = trainer.config
  t0 = time.time()
  imgs, labels = generation.generate(
      trainer, _eval_params(trainer, state), num_samples=cfg.evaluator.num_samples,
      seed=cfg.sample.seed, chunk_size=cfg.sample.chunk_size or cfg.train.global_batch_size,
      progress=False)
  seconds = time.time() - t0
  metrics = evaluator.evaluate(imgs, labels)
  metrics['sampling_images_per_sec'] = len(imgs) / max(seconds, 1e-9)
  writer.write_scalars(step, {f'generative/{k}': v for k, v in metrics.items()})
  console.say(f'generative eval at step {step} ({len(imgs)} samples, {seconds:.0f} s sampling): '
              f'{generative.format_metrics(metrics)}')
  return metrics


def _write_reference(trainer: Trainer, writer) -> str | None:
  """Held-out real images passed through the tokenizer (encode + decode), laid out like the
  sample grids: what perfect samples would look like at this tokenizer's fidelity."""
  cfg = trainer.config
  labels = _class_grid_labels(cfg.train.num_sample_images, trainer.model_config.num_classes)
  wanted = {int(c): int((labels == c).sum()) for c in np.unique(labels)}
  found: dict[int, list[np.ndarray]] = {c: [] for c in wanted}
  dataset = input_pipeline.create_eval_dataset(cfg.data, batch_size=cfg.train.global_batch_size)
  for batch in dataset:
    for img, lab, ok in zip(batch['image'], batch['label'], batch['mask']):
      if ok and int(lab) in found and len(found[int(lab)]) < wanted[int(lab)]:
        found[int(lab)].append(img)
    if all(len(found[c]) == wanted[c] for c in wanted):
      break
  if not all(len(found[c]) == wanted[c] for c in wanted):
    return None
  picked = np.stack([found[int(c)].pop(0) for c in labels])
  tokens = encode_images(trainer.tokenizer, trainer.tokenizer_params, picked)
  recon = images.to_uint8(np.asarray(decode_tokens(trainer.tokenizer, trainer.tokenizer_params,
                                                   tokens)))
  grid = images.make_grid(recon, ncols=len(wanted))
  path = paths.join(trainer.workdir, 'samples', 'reference_real_tokenized.png')
  if trainer.is_chief:
    images.save_png(grid, path)
    writer.write_images(0, {'reference_real_tokenized': grid[None]})
  return path


def _write_samples(trainer: Trainer, state: TrainState, writer, step: int) -> str:
  """Class-balanced sample grid (one column per class) to workdir/samples/ and TensorBoard."""
  cfg = trainer.config
  labels = _class_grid_labels(cfg.train.num_sample_images, trainer.model_config.num_classes)
  imgs = trainer.sample_images(_eval_params(trainer, state), labels, seed=cfg.seed + step)
  cols = len(np.unique(labels))
  grid = images.make_grid(imgs, ncols=cols)
  path = paths.join(trainer.workdir, 'samples', f'step_{step:07d}.png')
  if trainer.is_chief:
    images.save_png(grid, path)
    writer.write_images(step, {'samples': grid[None]})
  logging.info('Wrote samples of step %d to %s (columns = classes %s).', step, path,
               labels[:cols].tolist())
  console.say(f'samples of step {step}: {path}')
  return path
