"""Linear probe of the causal backbone's features: how much class semantics a layer holds.

The paper argues that predicting the next 2D *distribution* (instead of the
next token) makes the backbone learn holistic image semantics. The probe
measures it the iGPT / MAE way: freeze the trained model, take one backbone
layer's states, mean-pool them over the image, train a linear classifier on a
labelled train split and report top-1 on a held-out split.

  python -m heptapod_jax.evaluators.probe --config=configs/demo.py --workdir=workdirs/demo \
      --layer=-1            # or --layer=0,2,4 / --layer=all

Definitions (see `extract_features`):

* Layer `k` in [0, L] (L = `model.backbone.depth`; negative k counts from the
  end, -1 = L): the residual stream after the first k Transformer blocks
  (0 = the token/class embeddings), passed through the backbone's trained
  `final_norm` RMSNorm. Layer L is therefore exactly `Heptapod.states`, the
  states the 2D head reads; normalising every layer with the same norm follows
  iGPT's probe (a layer norm on each layer's residual stream before pooling)
  and keeps the per-token scale of deep residual streams from dominating the
  mean.
* Mechanism: the blocks are stacked under `nn.scan` (parameters with a leading
  'layers' axis), so layer k is the *unmodified* backbone module built with
  depth k and applied to the first k slices of the stacked parameters
  (`truncate`). No model code changes, and only k blocks are computed.
* Pooling: the mean over the backbone's image-token input slots P..P+N-2
  (inputs x_0..x_{N-2}; states h_1..h_{N-1}), never the P class-prefix slots.
  The input is exactly the teacher-forcing input of training, so the last
  token x_{N-1} (one of N) is not seen, as in training.
* The class label is an input of this class-conditional model; the probe must
  not hand it the answer. Every image is fed the same label (`probe_label`):
  the null class (`num_classes`) when the model was trained with
  `class_dropout > 0` (it is then the learned unconditional input), otherwise
  class 0 (the null-class embedding was never trained and is random). Pass
  `label=` to override.

Features come from the model's own tokenizer, as in training: the split's
images (center crop, no augmentation) are encoded by the jitted
`tokenizers.batch_tokens` with the tokenizer parameters as a jit argument. The
classifier (`train_linear_probe`) standardises the features with the train
split's mean/std and trains weights + bias with AdamW on a cosine schedule and
softmax cross-entropy; it is deterministic given the seed.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heptapod import Heptapod, check_inputs, flatten_tokens
from heptapod_jax.storage import paths

Array = jax.Array


# --------------------------------------------------------------------------- layers and features


def resolve_layer(layer: int, num_layers: int) -> int:
  """Maps a layer index in [-(L+1), L] to [0, L]; ValueError naming the valid range otherwise.

  Args:
    layer: 0 = embeddings, k = after k blocks, L = final output; negative
      values count from the end (-1 = L, -(L+1) = 0).
    num_layers: L, the backbone depth.
  """
  if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
    raise ValueError(f'layer={layer!r}: expected an int.')
  layer = int(layer)
  if not -(num_layers + 1) <= layer <= num_layers:
    raise ValueError(
        f'layer={layer} is out of range for a backbone of {num_layers} layers: valid layers are '
        f'0..{num_layers} (0 = embeddings, {num_layers} = final output) or '
        f'-{num_layers + 1}..-1 counted from the end.')
  return layer % (num_layers + 1)


def probe_label(config: ModelConfig) -> int:
  """The label every image is fed: the null class if it was trained (class dropout), else 0."""
  return config.num_classes if config.backbone.class_dropout > 0.0 else 0


def truncate(config: ModelConfig, params: Any, layer: int) -> tuple[ModelConfig, Any]:
  """The backbone of depth `layer` (resolved, in [0, L]) and the parameters of its first blocks.

  The stacked block parameters (leading 'layers' axis, see `layers.stack`) are
  sliced to their first `layer` entries; embeddings and `final_norm` are kept.
  Rematerialisation is switched off (inference only; the parameters do not
  depend on it). The head's parameters are dropped: `Heptapod.states` never
  reads them.
  """
  backbone = dataclasses.replace(config.backbone, depth=layer)
  cfg = dataclasses.replace(config, backbone=backbone, remat_policy='none')
  bb = dict(params['backbone'])
  bb['layers'] = jax.tree.map(lambda p: p[:layer], bb['layers'])
  return cfg, {'backbone': bb}


@functools.lru_cache(maxsize=32)
def _features_fn(config: ModelConfig):
  """Jitted (params, tokens int32[B, N], labels int32[B]) -> float32[B, E] pooled features."""
  model = Heptapod(config)
  prefix = config.backbone.class_prefix_len

  def features(params, tokens, labels):
    # Exactly Heptapod.states' call; keep all P + N - 1 slots to pool the image ones.
    h = model.apply({'params': params}, labels, tokens[:, :-1],
                    method=lambda m, lab, tok: m.backbone(lab, tok))
    return jnp.mean(h[:, prefix:].astype(jnp.float32), axis=1)

  return jax.jit(features)


def extract_features(model: Heptapod, params: Any, tokens: Any, *, layer: int,
                     batch_size: int = 64, label: int | None = None) -> np.ndarray:
  """Mean-pooled features of backbone layer `layer` for every token grid: float32[N_img, E].

  Args:
    model: the trained Heptapod (its config defines the backbone).
    params: its parameters (boxed or not); only the backbone's are read.
    tokens: int[N_img, N] or int[N_img, H, W] codebook indices (continuous tokens:
      float[N_img, N, C] or [N_img, H, W, C] latents).
    layer: see `resolve_layer` (0 = embeddings, L or -1 = final output; every
      layer goes through the backbone's final RMSNorm, so layer L equals the
      mean of `Heptapod.states` over the image-token slots).
    batch_size: grids per jitted call (the last batch is padded, so one
      compilation serves the whole set).
    label: class label fed with every image; None = `probe_label(config)`.
  Returns:
    numpy float32[N_img, width].
  """
  cfg = model.config
  layer = resolve_layer(layer, cfg.backbone.depth)
  tokens = flatten_tokens(cfg, np.asarray(tokens)).astype(
      np.float32 if cfg.continuous else np.int32)
  check_inputs(cfg, tokens, None)
  label = probe_label(cfg) if label is None else int(label)
  if not 0 <= label <= cfg.num_classes:
    raise ValueError(f'label={label}: must be in [0, {cfg.num_classes}] '
                     f'({cfg.num_classes} = the null class).')
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}: must be >= 1.')
  sub_cfg, sub_params = truncate(cfg, nn.unbox(params), layer)
  fn = _features_fn(sub_cfg)
  n = tokens.shape[0]
  out = np.zeros((n, cfg.backbone.width), np.float32)
  labels = jnp.full((batch_size,), label, jnp.int32)
  for start in range(0, n, batch_size):
    chunk = tokens[start:start + batch_size]
    k = chunk.shape[0]
    if k < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - k,) + chunk.shape[1:], chunk.dtype)])
    out[start:start + k] = np.asarray(fn(sub_params, jnp.asarray(chunk), labels))[:k]
  return out


# --------------------------------------------------------------------------- a trained run


def load_model(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
               params_key: str | None = None) -> tuple[Heptapod, Any]:
  """The Heptapod of `config` with the parameters of `workdir`'s checkpoint (on one device).

  Args:
    config: the run's experiment config (configs/*.py).
    workdir: the training run's directory (its checkpoints are in workdir/checkpoints).
    step: which checkpoint; None = the latest.
    params_key: 'params' or 'ema_params'; None = what the trainer samples and
      evaluates with (`config.train.sample_with_ema`).
  Raises:
    FileNotFoundError naming the path when the workdir holds no checkpoint.
  """
  from heptapod_jax import config_lib
  from heptapod_jax.models.heptapod import init_params
  from heptapod_jax.storage import checkpoint_read

  from heptapod_jax.storage.tokenizer_checkpoint import check_model_config
  model_config = config_lib.validate(config)
  check_model_config(config, model_config)
  workdir = paths.resolve(workdir, 'workdir')
  ckpt_dir = paths.join(workdir, 'checkpoints')
  hint = (f'train one first: python -m heptapod_jax.main --config=<this config> '
          f'--workdir={workdir}')
  if not (paths.isdir(ckpt_dir) and any(name.isdigit() for name in paths.listdir(ckpt_dir))):
    raise FileNotFoundError(f'no trained checkpoint in workdir {workdir}: {ckpt_dir} holds no '
                            f'checkpoint steps; {hint}.')
  model = Heptapod(model_config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), shapes)
  if params_key is None:
    params_key = 'ema_params' if config.train.sample_with_ema else 'params'
  try:
    params = checkpoint_read.load_params(ckpt_dir, abstract, step=step, key=params_key)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e} ({hint}).') from None
  except ValueError as e:
    raise ValueError(f'the checkpoint in {ckpt_dir} does not fit this config\'s model'
                     f'{_model_diff(config, workdir)}: {str(e).splitlines()[0]}') from None
  return model, params


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step in workdir/checkpoints, or None."""
  ckpt_dir = paths.join(workdir, 'checkpoints')
  if not paths.isdir(ckpt_dir):
    return None
  steps = [int(name) for name in paths.listdir(ckpt_dir) if name.isdigit()]
  return max(steps) if steps else None


def _model_diff(config: ml_collections.ConfigDict, workdir: str) -> str:
  """' (fields differing from workdir/config.json: ...)' or '' when unknown."""
  from heptapod_jax import config_lib
  from heptapod_jax.storage import checkpoint as ckpt_lib
  path = paths.join(workdir, 'config.json')
  try:
    stored = config_lib.to_flat_dict(paths.read_json(path).get('model', {}))
  except (OSError, ValueError):
    return ''
  given = config_lib.to_flat_dict(ckpt_lib.to_jsonable(config.model.to_dict()))
  diffs = [f'model.{k}={given.get(k)!r} (run: {stored.get(k)!r})'
           for k in sorted(set(given) | set(stored)) if given.get(k) != stored.get(k)]
  return f' (fields differing from {path}: {", ".join(diffs)})' if diffs else ''


def tokenize_split(config: ml_collections.ConfigDict, split: str, *, batch_size: int = 64,
                   max_examples: int = 0, tokenizer: Any = None,
                   tokenizer_params: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """(int32[n, N] token grids, int32[n] labels) of a data split, tokenized as in training;
  for continuous tokens (a KL tokenizer) float32[n, N, C] latents instead of the grids.

  Images are read like evaluation reads them (center crop, no augmentation, in
  source order, all of them in this process) and encoded by the model's
  tokenizer (`tokenizers.batch_tokens`, jitted with the tokenizer params as an
  argument). `max_examples` > 0 keeps the first that many (in source order:
  for class-sorted sources such as image folders, that is not a class-balanced
  subset).
  """
  from heptapod_jax.data import input_pipeline
  from heptapod_jax.models.tokenizers import batch_tokens
  from heptapod_jax.storage.tokenizer_checkpoint import make_tokenizer

  if tokenizer is None:
    tokenizer, tokenizer_params = make_tokenizer(config.tokenizer, config.data.image_size)
  encode = jax.jit(lambda tp, images: batch_tokens({'image': images}, tokenizer, tp))
  dataset = input_pipeline.create_eval_dataset(config.data, batch_size=batch_size, split=split,
                                               process_index=0, process_count=1)
  tokens, labels, count = [], [], 0
  for batch in dataset:
    keep = np.asarray(batch['mask'])
    if keep.any():
      codes = np.asarray(encode(tokenizer_params, jnp.asarray(batch['image'])))
      tokens.append(codes[keep])
      labels.append(np.asarray(batch['label'])[keep])
      count += int(keep.sum())
    if max_examples and count >= max_examples:
      break
  if not tokens:
    raise ValueError(f'split {split!r} of config.data.source={config.data.source!r} is empty.')
  tokens_np = np.concatenate(tokens)
  # Codes are ids; latents stay real numbers (casting them to ids would truncate them).
  tokens_np = tokens_np.astype(np.float32 if np.issubdtype(tokens_np.dtype, np.floating)
                              else np.int32)
  labels_np = np.concatenate(labels).astype(np.int32)
  if max_examples:
    tokens_np, labels_np = tokens_np[:max_examples], labels_np[:max_examples]
  return tokens_np, labels_np


def split_features(config: ml_collections.ConfigDict, workdir: str, split: str, *,
                   layer: int = -1, batch_size: int = 64, max_examples: int = 0,
                   label: int | None = None, step: int | None = None,
                   params_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(float32[n, E] features of `layer`, int32[n] labels) of `split` for the run in `workdir`.

  Loads the checkpoint (`load_model`), tokenizes the split (`tokenize_split`)
  and extracts the features (`extract_features`). For several layers or
  splits call those three directly, to load and tokenize once.
  """
  model, params = load_model(config, workdir, step=step, params_key=params_key)
  resolve_layer(layer, model.config.backbone.depth)  # Fail before reading any data.
  tokens, labels = tokenize_split(config, split, batch_size=batch_size, max_examples=max_examples)
  feats = extract_features(model, params, tokens, layer=layer, batch_size=batch_size, label=label)
  return feats, labels


# --------------------------------------------------------------------------- the classifier


def _accuracy_and_loss(w: Array, b: Array, x: Array, y: Array) -> tuple[Array, Array]:
  logits = x @ w + b
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
  return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32)), loss


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps', 'batch_size'))
def _fit(x: Array, y: Array, key: Array, lr: Array, weight_decay: Array, *, num_classes: int,
         steps: int, batch_size: int) -> tuple[Array, Array]:
  """AdamW (decay on the weights only), cosine schedule; minibatches drawn with replacement."""
  schedule = optax.cosine_decay_schedule(lr, steps)
  tx = optax.adamw(schedule, weight_decay=weight_decay, mask={'w': True, 'b': False})
  params = {'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
            'b': jnp.zeros((num_classes,), jnp.float32)}
  full_batch = batch_size >= x.shape[0]

  def loss_fn(p, xb, yb):
    return _accuracy_and_loss(p['w'], p['b'], xb, yb)[1]

  def step(carry, t):
    p, opt_state = carry
    if full_batch:
      xb, yb = x, y
    else:
      idx = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
      xb, yb = x[idx], y[idx]
    grads = jax.grad(loss_fn)(p, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
  return params['w'], params['b']


def train_linear_probe(train_feats: Any, train_labels: Any, eval_feats: Any, eval_labels: Any, *,
                       num_classes: int, steps: int = 5000, lr: float = 0.1,
                       weight_decay: float = 1e-4, batch_size: int = 256,
                       seed: int = 0) -> dict[str, float]:
  """Trains a linear classifier on standardised features; top-1 on the held-out split.

  Features are standardised per dimension with the train split's mean and
  standard deviation (both splits), then a linear layer (weights + bias, zero
  init) is trained with AdamW (decoupled `weight_decay` on the weights only)
  under a cosine decay from `lr` to 0 over `steps` updates, on softmax
  cross-entropy; minibatches of `batch_size` are drawn with replacement (the
  whole split when it is smaller). Deterministic given `seed`.

  Args:
    train_feats, eval_feats: float[n, E]; train_labels, eval_labels: int[n].
    num_classes: C; labels must be in [0, C).
  Returns:
    dict(top1=held-out top-1, train_top1, eval_loss, train_loss, num_train,
    num_eval, chance=1/C).
  """
  xs = [np.asarray(train_feats, np.float32), np.asarray(eval_feats, np.float32)]
  ys = [np.asarray(train_labels), np.asarray(eval_labels)]
  for name, x, y in (('train', xs[0], ys[0]), ('eval', xs[1], ys[1])):
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or not x.shape[0]:
      raise ValueError(f'{name}: expected features float[n, E] and labels int[n] with n >= 1; got '
                       f'{x.shape} and {y.shape}.')
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f'{name} labels must be integers in [0, num_classes={num_classes}); got '
                       f'{y.dtype} in [{y.min()}, {y.max()}].')
  if xs[0].shape[1] != xs[1].shape[1]:
    raise ValueError(f'train features have {xs[0].shape[1]} dims, eval features {xs[1].shape[1]}.')
  if steps < 1 or batch_size < 1:
    raise ValueError(f'steps={steps} and batch_size={batch_size} must be >= 1.')
  mean = xs[0].mean(0)
  std = xs[0].std(0) + 1e-6
  x_train, x_eval = ((x - mean) / std for x in xs)
  y_train, y_eval = (jnp.asarray(y, jnp.int32) for y in ys)
  w, b = _fit(jnp.asarray(x_train), y_train, jax.random.key(seed), jnp.float32(lr),
              jnp.float32(weight_decay), num_classes=num_classes, steps=steps,
              batch_size=batch_size)
  train_top1, train_loss = _accuracy_and_loss(w, b, jnp.asarray(x_train), y_train)
  top1, eval_loss = _accuracy_and_loss(w, b, jnp.asarray(x_eval), y_eval)
  return dict(top1=float(top1), train_top1=float(train_top1), eval_loss=float(eval_loss),
              train_loss=float(train_loss), num_train=int(xs[0].shape[0]),
              num_eval=int(xs[1].shape[0]), chance=1.0 / num_classes)


# --------------------------------------------------------------------------- command line


def parse_layers(spec: Sequence[str], num_layers: int) -> list[int]:
  """['-1'] / ['0', '2'] / ['all'] -> resolved layer indices (ValueError naming the range)."""
  if [s.strip().lower() for s in spec] == ['all']:
    return list(range(num_layers + 1))
  out = []
  for s in spec:
    try:
      value = int(s)
    except ValueError:
      raise ValueError(f'--layer={s!r}: expected ints in 0..{num_layers} (negative from the end) '
                       'or "all".') from None
    out.append(resolve_layer(value, num_layers))
  return out


def run(config: ml_collections.ConfigDict, workdir: str, layers: Sequence[str], *,
        train_split: str | None = None, eval_split: str | None = None, batch_size: int = 64,
        max_train_examples: int = 0, max_eval_examples: int = 0, label: int | None = None,
        step: int | None = None, params_key: str | None = None, probe_steps: int = 5000,
        lr: float = 0.1, weight_decay: float = 1e-4, probe_batch_size: int = 256,
        seed: int = 0, log=print) -> list[dict[str, Any]]:
  """Loads the run, tokenizes both splits once, probes every layer; one result dict per layer."""
  model, params = load_model(config, workdir, step=step, params_key=params_key)
  depth = model.config.backbone.depth
  log(f'checkpoint step {step if step is not None else latest_step(workdir)} of {workdir}.')
  resolved = parse_layers(layers, depth)
  train_split = train_split or config.data.train_split
  eval_split = eval_split or config.data.eval_split
  fed = probe_label(model.config) if label is None else label
  what = 'the null class' if fed == model.config.num_classes else 'a fixed dummy label'
  t0 = time.time()
  data = {}
  for name, split, limit in (('train', train_split, max_train_examples),
                             ('eval', eval_split, max_eval_examples)):
    data[name] = tokenize_split(config, split, batch_size=batch_size, max_examples=limit)
  log(f'tokenized {len(data["train"][1])} {train_split!r} / {len(data["eval"][1])} {eval_split!r} '
      f'images in {time.time() - t0:.1f}s; every image is fed class label {fed} ({what}).')
  results = []
  for layer in resolved:
    t0 = time.time()
    feats = {name: extract_features(model, params, tokens, layer=layer, batch_size=batch_size,
                                    label=label)
             for name, (tokens, _) in data.items()}
    t_feat = time.time() - t0
    metrics = train_linear_probe(feats['train'], data['train'][1], feats['eval'], data['eval'][1],
                                 num_classes=model.config.num_classes, steps=probe_steps, lr=lr,
                                 weight_decay=weight_decay, batch_size=probe_batch_size, seed=seed)
    where = ('embeddings' if layer == 0 else 'final output' if layer == depth
             else f'after block {layer}')
    log(f'layer {layer}/{depth} ({where}, through final_norm): {eval_split} top-1 '
        f'{metrics["top1"]:.4f} (train top-1 {metrics["train_top1"]:.4f}, chance '
        f'{metrics["chance"]:.4f}; {metrics["num_train"]} train / {metrics["num_eval"]} eval; '
        f'features {t_feat:.1f}s, probe {time.time() - t0 - t_feat:.1f}s)')
    results.append(dict(metrics, layer=layer, num_layers=depth))
  return results


# Filled by `_define_flags` when run as a program (importing the module defines no flags, so
# that it can live next to heptapod_jax.main's identically named --config / --workdir).
_FLAGS: dict[str, Any] = {}


def main(argv: Sequence[str]) -> None:
  """`python -m heptapod_jax.evaluators.probe --config=... --workdir=... --layer=-1`."""
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  f = _FLAGS
  run(f['config'].value, f['workdir'].value, f['layer'].value,
      train_split=f['train_split'].value, eval_split=f['eval_split'].value,
      batch_size=f['batch_size'].value, max_train_examples=f['max_train_examples'].value,
      max_eval_examples=f['max_eval_examples'].value,
      label=None if f['label'].value < 0 else f['label'].value, step=f['step'].value,
      params_key=f['params_key'].value or None, probe_steps=f['probe_steps'].value,
      lr=f['lr'].value, weight_decay=f['weight_decay'].value,
      probe_batch_size=f['probe_batch_size'].value, seed=f['seed'].value)


def _define_flags() -> dict[str, Any]:
  from absl import flags
  from ml_collections import config_flags
  out = dict(
      config=config_flags.DEFINE_config_file(
          'config', None, 'The run\'s recipe (configs/*.py[:options]).', lock_config=True),
      workdir=flags.DEFINE_string('workdir', None, 'The training run\'s directory (checkpoints/).'),
      layer=flags.DEFINE_list('layer', ['-1'], 'Backbone layer(s): 0 = embeddings .. L = final '
                              'output; negative from the end; comma-separated or "all".'),
      train_split=flags.DEFINE_string('train_split', None, 'Default: config.data.train_split.'),
      eval_split=flags.DEFINE_string('eval_split', None, 'Default: config.data.eval_split.'),
      batch_size=flags.DEFINE_integer('batch_size', 64, 'Images per tokenizer / backbone call.'),
      max_train_examples=flags.DEFINE_integer('max_train_examples', 0, 'First n; 0 = all.'),
      max_eval_examples=flags.DEFINE_integer('max_eval_examples', 0, 'First n; 0 = all.'),
      label=flags.DEFINE_integer('label', -1, 'Class label fed with every image; -1 = the null '
                                 'class if trained (class_dropout > 0), else 0.'),
      step=flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.'),
      params_key=flags.DEFINE_string('params_key', '', 'params | ema_params; default per '
                                     'config.train.sample_with_ema.'),
      probe_steps=flags.DEFINE_integer('probe_steps', 5000, 'Classifier updates.'),
      lr=flags.DEFINE_float('lr', 0.1, 'Classifier peak learning rate (cosine to 0).'),
      weight_decay=flags.DEFINE_float('weight_decay', 1e-4, 'AdamW decay of the weights.'),
      probe_batch_size=flags.DEFINE_integer('probe_batch_size', 256, 'Classifier minibatch.'),
      seed=flags.DEFINE_integer('seed', 0, 'Classifier seed.'),
  )
  flags.mark_flags_as_required(['config', 'workdir'])
  return out


if __name__ == '__main__':
  from absl import app as _app
  _FLAGS.update(_define_flags())
  _app.run(main)
