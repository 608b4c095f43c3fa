"""A small feature network trained by the project, for FID-style metrics on small data sets.

Inception-v3 features say little about 32x32 handwritten digits, so on the
built-in data the generative metrics (FID, precision/recall, class accuracy of
samples) use this instead: a small CNN classifier trained once on the data
set's training split and stored in the workdir. Its global-average-pooled last
convolution is the feature space ('pool') and its class logits give class
accuracy ('logits'), i.e. it follows the feature-extractor protocol of
`evaluators.features` exactly like the Inception network does.

  net = feature_net.load_or_train(config.data, '<workdir>/feature_net')
  feats = net(uint8_images)    # {'pool': float32[B, D], 'logits': float32[B, C]}

Deterministic: the same data and seed give the same weights. The directory
holds `params.msgpack` and `meta.json` (architecture, image size, classes, the
held-out accuracy measured when it was trained).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from heptapod_jax import images as images_lib
from heptapod_jax.storage import paths

PARAMS_FILE = 'params.msgpack'
META_FILE = 'meta.json'


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
  num_classes: int
  image_size: int
  channels: tuple[int, ...] = (16, 32, 64)  # Stride 1, then 2 for every further stage.
  features: int = 128  # Width of the feature layer (the 'pool' output).


class ConvClassifier(nn.Module):
  """conv3x3-ReLU stages (stride 2 from the 2nd on), flatten, Dense-ReLU features -> logits."""
  config: FeatureNetConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    for i, ch in enumerate(self.config.channels):
      x = nn.Conv(ch, (3, 3), strides=(1 if i == 0 else 2), precision=hi, name=f'conv{i}')(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    pool = nn.relu(nn.Dense(self.config.features, precision=hi, name='features')(x))
    logits = nn.Dense(self.config.num_classes, precision=hi, name='classifier')(pool)
    return {'pool': pool, 'logits': logits}


def _to_input(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


class FeatureNet:
  """Callable feature extractor: uint8[B, S, S, 3] -> {'pool': [B, D], 'logits': [B, C]} (numpy)."""

  def __init__(self, config: FeatureNetConfig, params: Any, batch_size: int = 256):
    self.config = config
    self.params = params
    self.batch_size = batch_size
    module = ConvClassifier(config)
    self._apply = jax.jit(lambda p, x: module.apply({'params': p}, _to_input(x)))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    s = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3):
      raise ValueError(f'feature net: expected uint8 images [B, {s}, {s}, 3], got {images.shape}.')
    if images.dtype != np.uint8:
      raise ValueError(f'feature net: expected uint8 images in [0, 255], got dtype {images.dtype}.')
    outs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:  # One compiled shape.
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, s, s, 3), np.uint8)])
      out = jax.device_get(self._apply(self.params, chunk))
      outs.append({k: np.asarray(v[:n], np.float32) for k, v in out.items()})
    if not outs:
      return {'pool': np.zeros((0, self.config.features), np.float32),
              'logits': np.zeros((0, self.config.num_classes), np.float32)}
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def read_split(data_config: Any, split: str, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Every image of `split` of this process, center-cropped, as (uint8[N, S, S, 3], int32[N])."""
  from heptapod_jax.data import input_pipeline
  dataset = input_pipeline.create_eval_dataset(data_config, batch_size=batch_size, split=split,
                                               process_index=0, process_count=1)
  imgs, labels = [], []
  for batch in dataset:
    keep = batch['mask']
    imgs.append(images_lib.to_uint8(batch['image'][keep]))
    labels.append(batch['label'][keep])
  if not imgs:
    raise ValueError(f'config.data (source {data_config.source}): split {split!r} is empty.')
  return np.concatenate(imgs), np.concatenate(labels).astype(np.int32)


def _shift(rng: np.random.Generator, batch: np.ndarray, max_shift: int) -> np.ndarray:
  """Random translations by up to `max_shift` pixels (zero padding): robustness, not accuracy."""
  if max_shift == 0:
    return batch
  b, s = batch.shape[0], batch.shape[1]
  padded = np.pad(batch, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, b))
  return np.stack([padded[i, dy[i]:dy[i] + s, dx[i]:dx[i] + s] for i in range(b)])


def train(train_images: np.ndarray, train_labels: np.ndarray, *, num_classes: int,
          steps: int = 150, batch_size: int = 64, lr: float = 5e-3, seed: int = 0,
          channels: Sequence[int] = (16, 32, 64), max_shift: int = 3) -> FeatureNet:
  """Trains the classifier (AdamW, cosine decay, random shifts) on uint8 images."""
  s = train_images.shape[1]
  config = FeatureNetConfig(num_classes=num_classes, image_size=s, channels=tuple(channels))
  module = ConvClassifier(config)
  params = module.init(jax.random.key(seed), jnp.zeros((1, s, s, 3)))['params']
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, x, y):
    def loss_fn(p):
      logits = module.apply({'params': p}, _to_input(x))['logits']
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  n = len(train_images)
  order = rng.permutation(n)
  pos = 0
  for _ in range(steps):
    if pos + batch_size > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + batch_size]
    pos += batch_size
    params, opt_state, _ = step_fn(params, opt_state, _shift(rng, train_images[idx], max_shift),
                                   train_labels[idx])
  return FeatureNet(config, params)


def accuracy(net: FeatureNet, images: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(net(images)['logits'], -1) == labels))


def save(net: FeatureNet, directory: str, meta: dict[str, Any]) -> None:
  """Writes the parameters, then the meta data: the meta file, written last, marks the network
  complete (`load_or_train` looks for it), locally and on a bucket alike."""
  paths.write_bytes(paths.join(directory, PARAMS_FILE),
                    flax.serialization.to_bytes(jax.device_get(net.params)))
  meta = dict(meta, **dataclasses.asdict(net.config))
  paths.write_json(paths.join(directory, META_FILE), meta, indent=2)


def load(directory: str) -> tuple[FeatureNet, dict[str, Any]]:
  """The network saved in `directory` and its meta data (held-out accuracy etc.)."""
  meta_path = paths.join(directory, META_FILE)
  params_path = paths.join(directory, PARAMS_FILE)
  for path in (meta_path, params_path):
    if not paths.exists(path):
      raise FileNotFoundError(f'feature net: {path} does not exist (train it with '
                              f'feature_net.load_or_train or point to another directory).')
  meta = paths.read_json(meta_path)
  try:
    fields = {f.name: meta[f.name] for f in dataclasses.fields(FeatureNetConfig)}
  except KeyError as e:
    raise ValueError(f'feature net: {meta_path} lacks the field {e}.') from None
  config = FeatureNetConfig(**dict(fields, channels=tuple(fields['channels'])))
  module = ConvClassifier(config)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                                jnp.zeros((1, config.image_size,
                                                           config.image_size, 3)))['params'])
  target = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  try:
    params = flax.serialization.from_bytes(target, paths.read_bytes(params_path))
  except (ValueError, KeyError) as e:
    raise ValueError(f'feature net: {params_path} does not match {meta_path}: {e}') from None
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree.leaves(target),
                        jax.tree.leaves(params)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f'feature net: {params_path}: parameter {jax.tree_util.keystr(path[0])} has '
                       f'shape {np.shape(b)}, meta.json implies {np.shape(a)}.')
  return FeatureNet(config, params), meta


def load_or_train(data_config: Any, directory: str, *, steps: int = 150, seed: int = 0,
                  eval_split: str | None = None) -> tuple[FeatureNet, dict[str, Any]]:
  """Loads the network from `directory`, or trains it on the train split and saves it there.

  Every process trains the same network (deterministic) when the directory is
  empty; only process 0 writes it.
  """
  if paths.exists(paths.join(directory, META_FILE)):
    net, meta = load(directory)
    if net.config.image_size != data_config.image_size:
      raise ValueError(f'feature net in {directory} was trained on {net.config.image_size}px '
                       f'images; config.data.image_size={data_config.image_size}.')
    return net, meta
  t0 = time.time()
  train_images, train_labels = read_split(data_config, data_config.train_split)
  from heptapod_jax.data import sources
  num_classes = sources.resolve_source(data_config).num_classes
  net = train(train_images, train_labels, num_classes=num_classes, steps=steps, seed=seed)
  eval_split = eval_split or data_config.eval_split
  eval_images, eval_labels = read_split(data_config, eval_split)
  meta = {'source': data_config.source, 'train_split': data_config.train_split,
          'eval_split': eval_split, 'steps': steps, 'seed': seed,
          'train_accuracy': accuracy(net, train_images, train_labels),
          'eval_accuracy': accuracy(net, eval_images, eval_labels),
          'train_seconds': round(time.time() - t0, 1)}
  # Log only: the run's summary names the feature net and its held-out accuracy.
  logging.info('Trained the feature net in %.0f s: held-out accuracy %.4f (%s).',
               meta['train_seconds'], meta['eval_accuracy'], directory)
  if jax.process_index() == 0:
    save(net, directory, meta)
  return net, dict(meta, **dataclasses.asdict(net.config))
