"""Training the reconstruction-only tokenizers (VQ or KL): pixels + LPIPS + PatchGAN.

    python -m heptapod_jax.main --config=configs/vq_demo.py --workdir=workdirs/demo/tokenizer

(main.py dispatches on `config.trainer == 'tokenizer'`.) It shares the AR
trainer's pieces: the mesh and logical rules, the data pipeline, Orbax
checkpoints with the data position (automatic resume), clu writers, the
optimizer builder and the non-finite guard. Generator (autoencoder) and
discriminator have separate optimizers; the GAN terms switch on at
`loss.disc_start`. At the end the EMA and raw parameters are exported in the
tokenizer checkpoint format (`workdir/tokenizer`, see storage/tokenizer_checkpoint.py),
which `config.tokenizer.checkpoint` of an AR run points to.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from heptapod_jax import config_lib, console, images, sharding
from heptapod_jax.data import input_pipeline
from heptapod_jax.evaluators import recon as recon_metrics
from heptapod_jax.models.tokenizers import discriminator as disc_lib
from heptapod_jax.models.tokenizers import kl as kl_lib
from heptapod_jax.models.tokenizers import losses
from heptapod_jax.models.tokenizers import lpips as lpips_lib
from heptapod_jax.models.tokenizers import vq as vq_lib
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import paths
from heptapod_jax.storage import tokenizer_checkpoint as tok_io
from heptapod_jax.training import optim, trainlib

Array = jax.Array
EXPORT_DIR = 'tokenizer'


@flax.struct.dataclass
class TokenizerState:
  step: Array
  params: Any
  ema_params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  rng: Array


class TokenizerTrainer:
  """The pieces of one tokenizer run; `train_and_evaluate` drives it."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = workdir
    self.model_config = config_lib.validate_tokenizer(config)
    self.kind = config.tokenizer.kind
    self.model = vq_lib.VQModel(self.model_config) if self.kind == 'vq' else kl_lib.KLModel(
        self.model_config)
    self.disc = disc_lib.PatchDiscriminator(**config.disc.to_dict())
    self.is_chief = jax.process_index() == 0
    self.mesh = sharding.create_mesh(config.mesh.shape, config.mesh.dcn_shape)
    self.rules = sharding.RULE_PRESETS[config.mesh.rules_preset]
    dp = sharding.data_parallel_size(self.mesh, self.rules)
    if config.train.global_batch_size % dp:
      raise ValueError(f'config.train.global_batch_size={config.train.global_batch_size} is not '
                       f'divisible by the {dp} data-parallel shards of mesh {dict(self.mesh.shape)}.')
    self.tx, self.schedule = optim.make_optimizer(config.optim, config.train.num_steps)
    self.disc_tx, _ = optim.make_optimizer(config.disc_optim, config.train.num_steps)
    self.lpips = lpips_lib.LPIPSLoss(
        config.loss.lpips_path or None, allow_pickle=config.loss.lpips_allow_pickle) if (
        config.loss.perceptual_weight > 0) else None
    self.batch_shardings = {'image': sharding.batch_sharding(self.mesh, self.rules, 4),
                            'label': sharding.batch_sharding(self.mesh, self.rules, 1),
                            'mask': sharding.batch_sharding(self.mesh, self.rules, 1)}

  # ------------------------------------------------------------------ state
  def _init_state(self, rng: Array) -> TokenizerState:
    k_model, k_disc, k_state = jax.random.split(rng, 3)
    side = self.model_config.image_size
    dummy = jnp.zeros((1, side, side, 3), jnp.float32)
    params = (vq_lib.init_params if self.kind == 'vq' else kl_lib.init_params)(
        self.model_config, k_model)
    disc_params = nn.unbox(self.disc.init(k_disc, dummy)['params'])
    return TokenizerState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=self.tx.init(params), disc_params=disc_params,
                          disc_opt_state=self.disc_tx.init(disc_params), rng=k_state)

  def state_shardings(self) -> Any:
    """Replicated tokenizer state (conv autoencoders are small; the batch is what is split)."""
    abstract = jax.eval_shape(lambda: self._init_state(jax.random.key(0)))
    return jax.tree.map(lambda _: sharding.replicated(self.mesh), abstract)

  def abstract_state(self, shardings) -> TokenizerState:
    abstract = jax.eval_shape(lambda: self._init_state(jax.random.key(0)))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)

  # ------------------------------------------------------------------ steps
  def _forward(self, params: Any, images_in: Array, rng: Array, train: bool):
    """(reconstruction, regulariser loss, aux) for either autoencoder kind."""
    loss_cfg = self.config.loss
    drop_rng, post_rng = jax.random.split(rng)
    if self.kind == 'vq':
      recon, aux = self.model.apply({'params': params}, images_in, train=train,
                                    rngs={'dropout': drop_rng})
      reg = loss_cfg.codebook_weight * aux['loss']
    else:
      recon, aux = self.model.apply({'params': params}, images_in, rng=post_rng if train else None,
                                    train=train, rngs={'dropout': drop_rng})
      reg = loss_cfg.kl_weight * jnp.mean(aux['kl'])
    return recon, reg, aux

  def train_step(self, state: TokenizerState, batch: dict[str, Array], lpips_params: Any):
    """One generator and one discriminator update. Pure: (state, batch) -> (state, metrics)."""
    cfg = self.config.loss
    rng = jax.random.fold_in(state.rng, state.step)
    x = batch['image']
    gan_on = (state.step >= cfg.disc_start).astype(jnp.float32)
    use_gan = cfg.disc_weight > 0  # Static: with weight 0 the discriminator is never run.

    def gen_loss_fn(params):
      recon, reg, aux = self._forward(params, x, rng, train=True)
      rec = jnp.mean(losses.reconstruction_loss(recon, x, cfg.reconstruction))
      perc = (jnp.mean(self.lpips(lpips_params, recon, x)) if self.lpips is not None
              else jnp.zeros(()))
      if use_gan:
        fake_logits = self.disc.apply({'params': state.disc_params}, recon)
        g_loss = losses.generator_loss(fake_logits, cfg.disc_loss)
      else:
        g_loss = jnp.zeros(())
      total = (cfg.reconstruction_weight * rec + cfg.perceptual_weight * perc + reg
               + gan_on * cfg.disc_weight * g_loss)
      return total, (recon, dict(reconstruction=rec, perceptual=perc, regulariser=reg,
                                 generator_adv=g_loss), aux)

    (loss, (recon, parts, aux)), grads = jax.value_and_grad(gen_loss_fn, has_aux=True)(state.params)
    grad_norm = optim.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = self.config.optim.ema_decay
    ema = optim.ema_update(state.ema_params, params,
                           optim.ema_decay_at(decay, state.step) if decay > 0 else 0.0)

    if not use_gan:
      return self._finish_step(state, loss, grad_norm, params, ema, opt_state, state.disc_params,
                               state.disc_opt_state, parts, aux, recon, x, gan_on,
                               (jnp.zeros(()),) * 3)
    fake = jax.lax.stop_gradient(recon)

    def disc_loss_fn(disc_params):
      real_logits = self.disc.apply({'params': disc_params}, x)
      fake_logits = self.disc.apply({'params': disc_params}, fake)
      # 0.5 x (real + fake terms): taming's and LlamaGen's convention.
      d = 0.5 * losses.discriminator_loss(real_logits, fake_logits, cfg.disc_loss)
      return gan_on * d, (d, jnp.mean(real_logits), jnp.mean(fake_logits))

    (_, (d_loss, real_mean, fake_mean)), d_grads = jax.value_and_grad(
        disc_loss_fn, has_aux=True)(state.disc_params)
    d_updates, disc_opt_state = self.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    # Before disc_start the discriminator is left exactly as initialised (no weight decay drift).
    disc_params = jax.tree.map(lambda p, u: p + gan_on * u, state.disc_params, d_updates)
    disc_opt_state = jax.tree.map(lambda new, old: jnp.where(gan_on > 0, new, old),
                                  disc_opt_state, state.disc_opt_state)

    return self._finish_step(state, loss, grad_norm, params, ema, opt_state, disc_params,
                             disc_opt_state, parts, aux, recon, x, gan_on,
                             (d_loss, real_mean, fake_mean))

  def _finish_step(self, state, loss, grad_norm, params, ema, opt_state, disc_params,
                   disc_opt_state, parts, aux, recon, x, gan_on, disc_metrics):
    """The new state (unchanged if the loss or gradient norm is not finite) and the metrics."""
    d_loss, real_mean, fake_mean = disc_metrics
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                        disc_params=disc_params, disc_opt_state=disc_opt_state)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = dict(parts, loss=loss, loss_value=loss, grad_norm=grad_norm, finite=finite,
                   disc_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean,
                   gan_on=gan_on, lr=self.schedule(state.step),
                   psnr=jnp.mean(recon_metrics.psnr(jnp.clip(recon, -1, 1), x, data_range=2.0)))
    if self.kind == 'vq':
      metrics['histogram'] = aux['histogram']
    return new, metrics

  def eval_step(self, params: Any, batch: dict[str, Array], lpips_params: Any) -> dict[str, Array]:
    """Reconstruction metrics on a held-out batch: (sum, count) pairs honouring batch['mask']."""
    x = batch['image']
    recon, _, aux = self._forward(params, x, jax.random.key(0), train=False)
    recon = jnp.clip(recon, -1.0, 1.0)
    w = batch['mask'].astype(jnp.float32)
    count = jnp.sum(w)
    per_image = {
        'psnr': recon_metrics.psnr(recon, x, data_range=2.0),
        'ssim': recon_metrics.ssim(recon, x, data_range=2.0),
        'l1': jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3)),
        'l2': jnp.mean(jnp.square(recon - x), axis=(1, 2, 3)),
    }
    if self.lpips is not None:
      per_image['lpips'] = self.lpips(lpips_params, recon, x)
    out = {k: jnp.stack([jnp.sum(v * w), count]) for k, v in per_image.items()}
    if self.kind == 'vq':
      codes = jax.nn.one_hot(aux['indices'], self.model_config.codebook_size, dtype=jnp.int32)
      out['histogram'] = jnp.sum(codes * batch['mask'].astype(jnp.int32)[:, None, None, None],
                                 axis=(0, 1, 2))
    return out

  @functools.cached_property
  def eval_fn(self):
    return jax.jit(self.eval_step, out_shardings=sharding.replicated(self.mesh))

  @functools.cached_property
  def recon_fn(self):
    def run(params, x):
      recon, _, _ = self._forward(params, x, jax.random.key(0), train=False)
      return jnp.clip(recon, -1.0, 1.0)
    return jax.jit(run, out_shardings=sharding.replicated(self.mesh))


def _pop_histograms(metric_list: list[dict[str, Array]]) -> np.ndarray | None:
  hists = [m.pop('histogram') for m in metric_list if 'histogram' in m]
  return np.sum(np.stack(jax.device_get(hists)), axis=0) if hists else None


def _evaluate(trainer: TokenizerTrainer, state: TokenizerState, writer, step: int) -> dict[str, float]:
  """Held-out PSNR, SSIM, LPIPS, L1/L2 and (VQ) codebook usage and perplexity, with EMA params."""
  cfg = trainer.config
  dataset = input_pipeline.create_eval_dataset(cfg.data, batch_size=cfg.train.global_batch_size)
  results = []
  for i, batch in enumerate(dataset):
    if cfg.train.eval_batches and i >= cfg.train.eval_batches:
      break
    results.append(trainer.eval_fn(state.ema_params,
                                   input_pipeline.make_global_batch(batch, trainer.batch_shardings),
                                   trainer.lpips_params))
  if not results:
    return {}
  hist = _pop_histograms(results)
  scalars = trainlib.reduce_metrics(results)
  if hist is not None:
    usage, perplexity = recon_metrics.codebook_usage(hist)
    scalars.update(codebook_usage=float(usage), codebook_perplexity=float(perplexity))
  writer.write_scalars(step, {f'eval/{k}': v for k, v in scalars.items()})
  logging.info('tokenizer eval at step %d: %s', step, scalars)
  shown = [f'{k} {scalars[k]:.4f}' for k in ('psnr', 'ssim', 'lpips', 'codebook_usage')
           if k in scalars]
  console.say(f'tokenizer eval at step {step}: ' + ', '.join(shown))
  return scalars


def _write_reconstructions(trainer: TokenizerTrainer, state: TokenizerState, writer,
                           step: int) -> str | None:
  """Held-out originals (odd rows) over their reconstructions (even rows), PNG and TensorBoard."""
  cfg = trainer.config
  n = cfg.train.num_recon_images
  if not n:
    return None
  dataset = input_pipeline.create_eval_dataset(cfg.data, batch_size=cfg.train.global_batch_size)
  batch = next(iter(dataset))
  x = input_pipeline.make_global_batch(batch, trainer.batch_shardings)['image']
  recon = np.asarray(jax.device_get(trainer.recon_fn(state.ema_params, x)))[:n]
  orig = np.asarray(jax.device_get(x))[:n]
  cols = min(n, 8)
  rows = []
  for start in range(0, n, cols):
    rows += [orig[start:start + cols], recon[start:start + cols]]
  grid = images.make_grid(images.to_uint8(np.concatenate(rows)), ncols=cols)
  path = paths.join(trainer.workdir, 'reconstructions', f'step_{step:07d}.png')
  if trainer.is_chief:
    images.save_png(grid, path)
    writer.write_images(step, {'reconstructions': grid[None]})
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the tokenizer in `workdir` (resuming if possible), evaluates it and exports it.

  The phases: `TokenizerTrainer(config, workdir)` (validate, build the model, LPIPS, the
  discriminator, mesh and optimizers); `_initial_state` (the newest intact checkpoint, else
  scratch); `_compile_train_step`; the loop, one step then `_Loop.after_step`
  (`trainlib.TrainLoop`: non-finite checks, logging with codebook usage, checkpoints,
  held-out evaluation at intervals; a signal or preemption notice saves and stops); then
  the final evaluation, the reconstruction grid and the export (`<workdir>/tokenizer`, the
  tokenizer checkpoint that `config.tokenizer.checkpoint` of a Heptapod run points to).

  Returns a summary: final step, last train metrics, eval metrics, the export
  directory and the reconstruction grid.
  """
  workdir = paths.resolve(workdir, 'workdir')
  trainer = TokenizerTrainer(config, workdir)
  tcfg = config.train
  if trainer.is_chief:
    trainlib.write_config(config, workdir)
  writer = trainlib.TolerantWriter(lambda: metric_writers.create_default_writer(
      workdir, just_logging=not trainer.is_chief, asynchronous=True), workdir)
  summary: dict[str, Any] = {'workdir': workdir, 'history': []}
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    shardings = trainer.state_shardings()
    trainer.lpips_params = (jax.device_put(trainer.lpips.params, sharding.replicated(trainer.mesh))
                            if trainer.lpips is not None else {})
    checkpointer = ckpt_lib.Checkpointer(paths.join(workdir, 'checkpoints'),
                                         save_interval_steps=tcfg.checkpoint_every,
                                         max_to_keep=tcfg.keep_checkpoints,
                                         async_save=tcfg.async_checkpoints)
    state, data_state = _initial_state(trainer, shardings, checkpointer)
    step = int(jax.device_get(state.step))
    train_iter = input_pipeline.create_train_iterator(
        config.data, global_batch_size=tcfg.global_batch_size, seed=config.seed, state=data_state)
    batch_shardings = {k: trainer.batch_shardings[k] for k in ('image', 'label')}
    # A finished run that is run again has no step to take: nothing to compile.
    train_step_fn = (_compile_train_step(trainer, shardings, batch_shardings)
                     if step < tcfg.num_steps else None)
    loop = _Loop(trainer, writer, checkpointer, train_iter, summary, step)
    with loop:
      while step < tcfg.num_steps:
        batch = input_pipeline.make_global_batch(next(train_iter), batch_shardings)
        state, metrics = train_step_fn(state, batch, trainer.lpips_params)
        step += 1
        if not loop.after_step(step, state, metrics):
          break
    if not summary.get('preempted'):
      summary['step'] = step
      summary['eval'] = _evaluate(trainer, state, writer, step)
      summary['reconstructions'] = _write_reconstructions(trainer, state, writer, step)
      loop.saver.finish(step, final=True)
      checkpointer.close()
      summary['export'] = _export(trainer, state, step)
    else:
      checkpointer.close()
  writer.flush()
  writer.close()
  return summary


def _initial_state(trainer: TokenizerTrainer, shardings: Any,
                   checkpointer: ckpt_lib.Checkpointer) -> tuple[TokenizerState, dict | None]:
  """(state, data position): the newest intact checkpoint of the workdir, else a fresh state.
  Damaged newer steps are skipped and moved aside; none intact stops unless allow_scratch."""
  config = trainer.config
  restored = None
  if checkpointer.latest_step() is not None:
    restored = checkpointer.restore_latest_intact(trainer.abstract_state(shardings),
                                                  allow_scratch=config.allow_scratch)
  if restored is not None:
    logging.info('Resuming the tokenizer from %s at step %d.', checkpointer.directory,
                 restored.step)
    return restored.state, restored.data_state
  return jax.jit(trainer._init_state, out_shardings=shardings)(jax.random.key(config.seed)), None


def _compile_train_step(trainer: TokenizerTrainer, shardings: Any, batch_shardings: Any):
  """The sharded train step (state donated), lowered and compiled once (its memory is logged)."""
  tcfg, size = trainer.config.train, trainer.config.data.image_size
  step_fn = jax.jit(trainer.train_step,
                    in_shardings=(shardings, batch_shardings, sharding.replicated(trainer.mesh)),
                    out_shardings=(shardings, sharding.replicated(trainer.mesh)),
                    donate_argnums=0)
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((tcfg.global_batch_size, size, size, 3), jnp.float32),
      'label': jax.ShapeDtypeStruct((tcfg.global_batch_size,), jnp.int32)}
  compiled = step_fn.lower(trainer.abstract_state(shardings), abstract_batch,
                           trainer.lpips_params).compile()
  trainlib.log_compiled(compiled, 'tokenizer train_step')
  return compiled


class _Loop(trainlib.TrainLoop):
  """The tokenizer trainer's steps between updates: a non-finite update stops the run, the log
  line adds codebook usage and perplexity (VQ), held-out evaluation at `train.eval_every`."""

  progress_desc = 'tokenizer'

  def __init__(self, trainer: TokenizerTrainer, writer, checkpointer, train_iter,
               summary: dict[str, Any], step: int):
    super().__init__(trainer.config, writer, checkpointer, train_iter, summary, step)
    self.trainer = trainer

  def reduce(self, pending: list[dict[str, Array]]) -> dict[str, float]:
    hist = _pop_histograms(pending)
    scalars = super().reduce(pending)
    if hist is not None:
      usage, perplexity = recon_metrics.codebook_usage(hist)
      scalars.update(codebook_usage=float(usage), codebook_perplexity=float(perplexity))
    return scalars

  def periodic(self, step: int, state: TokenizerState) -> None:
    if self.config.train.eval_every and step % self.config.train.eval_every == 0:
      _evaluate(self.trainer, state, self.writer, step)


def _export(trainer: TokenizerTrainer, state: TokenizerState, step: int) -> str:
  """Writes the tokenizer checkpoint of the final step to <workdir>/tokenizer (once)."""
  export = paths.join(trainer.workdir, EXPORT_DIR)
  if not _export_is_current(export, step):
    tok_io.save_tokenizer(export, trainer.kind, trainer.model_config,
                          jax.device_get(state.params), step=step,
                          ema_params=jax.device_get(state.ema_params))
  return export


def _export_is_current(export: str, step: int) -> bool:
  """True when `export` already holds the tokenizer of this step (a rerun of a finished run)."""
  if not paths.isdir(export):
    return False
  try:
    stored_step, _, _ = tok_io.read_metadata(export)
  except (FileNotFoundError, KeyError, ValueError):
    return False
  return stored_step == step
