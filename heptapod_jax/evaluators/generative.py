"""Generative metrics of a model, the way the config asks for them.

Glue between the feature network (`config.evaluator.features`: FID-Inception
or the project's small `feature_net`), the reference statistics
(`config.evaluator.reference`: ADM's npz, a project reference file, or a data
split computed once and cached) and `evaluators.metrics`. Used by sample
mode (`heptapod_jax/sampling/sample_mode.py`) and by the periodic evaluator in training.

  ev = GenerativeEvaluator(config, workdir)
  metrics = ev.evaluate(uint8_images, labels)   # fid, sfid, inception_score, precision, ...

Class accuracy (the feature network's argmax against the requested class) is
reported only for `feature_net`, whose classes are the data set's classes; the
1008-way Inception logits are not indexed like the data set's labels.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from heptapod_jax import console
from heptapod_jax.evaluators import feature_net as feature_net_lib
from heptapod_jax.evaluators import features as features_lib
from heptapod_jax.evaluators import metrics as metrics_lib
from heptapod_jax.evaluators import reference as reference_lib
from heptapod_jax.storage import paths

Extractor = Callable[[np.ndarray], dict]


def feature_net_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.evaluator.feature_net_dir or paths.join(workdir, 'feature_net')


class GenerativeEvaluator:
  """Lazily builds the extractor and the reference on first use; then scores image sets."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    if not config.evaluator.features:
      raise ValueError('config.evaluator.features is empty: set it to inception or feature_net '
                       'to compute generative metrics.')
    self.config = config
    self.workdir = workdir
    self.kind = config.evaluator.features
    self._extractor: Extractor | None = None
    self._reference: reference_lib.Reference | None = None
    self.info: dict[str, Any] = {}

  # ---------------------------------------------------------------- pieces
  @property
  def extractor(self) -> Extractor:
    if self._extractor is None:
      e = self.config.evaluator
      if self.kind == 'inception':
        from heptapod_jax.evaluators import inception
        self._extractor = inception.InceptionFeatures(e.inception_weights, batch_size=e.batch_size,
                                                      preprocessing=e.inception_preprocessing)
        self.info['features'] = (f'FID-Inception ({e.inception_weights}, '
                                 f'{e.inception_preprocessing} preprocessing)')
      else:
        directory = feature_net_dir(self.config, self.workdir)
        net, meta = feature_net_lib.load_or_train(self.config.data, directory,
                                                  steps=e.feature_net_steps, seed=self.config.seed)
        net.batch_size = e.batch_size
        self._extractor = net
        self.info.update(features=f'feature net ({directory})',
                         feature_net_eval_accuracy=meta.get('eval_accuracy'))
    return self._extractor

  def _reference_cache(self) -> str:
    e = self.config.evaluator
    name = f'reference_{self.config.data.source}_{e.reference_split}_{self.config.data.image_size}.npz'
    if self.kind == 'feature_net':  # Belongs to that network: lives (and goes) with it.
      return paths.join(feature_net_dir(self.config, self.workdir), name)
    weights = os.path.splitext(paths.basename(e.inception_weights))[0]
    return paths.join(self.workdir, 'eval', f'{weights}_{e.inception_preprocessing}_{name}')

  @property
  def reference(self) -> reference_lib.Reference:
    if self._reference is None:
      e = self.config.evaluator
      if e.reference:
        self._reference = load_reference_file(e.reference, self.extractor, e.batch_size,
                                              e.inception_preprocessing,
                                              part_size=e.reference_part_size or None)
        self.info['reference'] = e.reference
      else:
        cache = self._reference_cache()
        if paths.exists(cache):
          self._reference = reference_lib.Reference.load(cache)
        else:
          extractor = self.extractor  # The feature net trains first when it is missing.
          t0 = time.time()
          images, _ = feature_net_lib.read_split(self.config.data, e.reference_split)
          # Shown only when it takes a while (ImageNet's train split, not the digits).
          # In parts saved as they are made: a killed run resumes (ImageNet's train split
          # through Inception takes an hour), with the same statistics.
          parts = cache + '.parts'
          with console.progress(len(images), desc='reference statistics', unit='image',
                                every=max(1, len(images) // 10), min_seconds=60,
                                delay=10) as bar:
            feats = features_lib.extract_features_resumable(
                extractor, images, e.batch_size, parts, every=e.reference_part_size or None,
                write=jax.process_index() == 0, progress=lambda done, total: bar.update(done))
          self._reference = reference_lib.Reference.from_features(feats)
          if jax.process_index() == 0:
            self._reference.save(cache)
            paths.rmtree(parts)
          # Log only: the run's summary names the reference and its file.
          logging.info('Reference statistics of %s split %r (%d images) in %.0f s -> %s',
                       self.config.data.source, e.reference_split, len(images), time.time() - t0,
                       cache)
        self.info['reference'] = f'{self.config.data.source} {e.reference_split} split ({cache})'
    return self._reference

  # ---------------------------------------------------------------- scoring
  def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of uint8[N, S, S, 3] images (labels: the classes they were asked for)."""
    e = self.config.evaluator
    feats = features_lib.extract_features(self.extractor, images, batch_size=e.batch_size)
    use_labels = labels if self.kind == 'feature_net' else None
    metrics = metrics_lib.evaluate(feats, self.reference, labels=use_labels,
                                   is_split_size=e.is_split_size)
    metrics['num_images'] = float(len(images))
    return metrics

  def real_baseline(self, tokenizer: Any = None, tokenizer_params: Any = None
                    ) -> dict[str, dict[str, float]]:
    """The reference point: held-out real images (data.eval_split) scored like samples,
    raw ('real') and, with a tokenizer, after encode + decode ('real_tokenized')."""
    images, labels = feature_net_lib.read_split(self.config.data, self.config.data.eval_split)
    out = {'real': self.evaluate(images, labels)}
    if tokenizer is not None:
      from heptapod_jax.models.tokenizers import decode_tokens, encode_images
      roundtrip = jax.jit(lambda p, x: decode_tokens(tokenizer, p, encode_images(tokenizer, p, x)))
      recon = []
      for start in range(0, len(images), 64):
        x = images[start:start + 64].astype(np.float32) / 127.5 - 1.0
        recon.append(np.asarray(jax.device_get(roundtrip(tokenizer_params, x))))
      from heptapod_jax import images as images_lib
      out['real_tokenized'] = self.evaluate(images_lib.to_uint8(np.concatenate(recon)), labels)
    return out


def load_reference_file(path: str, extractor: Extractor, batch_size: int,
                        preprocessing: str = 'adm', part_size: int | None = None
                        ) -> reference_lib.Reference:
  """ADM's reference batch (keys mu, sigma, mu_s, sigma_s, arr_0) or a project reference file."""
  if not paths.exists(path):
    raise FileNotFoundError(f'config.evaluator.reference={path} does not exist.')
  keys = set(reference_lib.npz_keys(path))
  if 'arr_0' in keys:
    # Pool features of ADM's 10k reference images (for precision/recall) are computed once
    # and cached beside it when the directory is writable.
    cache = os.path.splitext(path)[0] + f'.{preprocessing}.features.npz'
    if paths.exists(cache):
      return reference_lib.Reference.load(cache)
    total = reference_lib.npz_rows(path, 'arr_0') or 0
    writable = paths.is_writable_dir(paths.dirname(paths.resolve(path)))
    write = jax.process_index() == 0 and writable
    parts = cache + '.parts'
    with console.progress(total, desc='reference features', unit='image',
                          every=max(1, total // 10), min_seconds=60, delay=10) as bar:
      ref = reference_lib.load_adm_reference(path, extractor=extractor, batch_size=batch_size,
                                             progress=lambda done, _: bar.update(done),
                                             resume_dir=parts if writable else None,
                                             part_size=part_size, write_parts=write)
    if write:
      ref.save(cache)
      paths.rmtree(parts)
    return ref
  return reference_lib.Reference.load(path)


def format_metrics(metrics: dict[str, float]) -> str:
  """'FID 12.34, sFID ..., IS ..., precision ..., recall ..., class accuracy ...' (present ones)."""
  names = (('fid', 'FID', '.2f'), ('sfid', 'sFID', '.2f'), ('inception_score', 'IS', '.1f'),
           ('precision', 'precision', '.3f'), ('recall', 'recall', '.3f'),
           ('class_accuracy', 'class accuracy', '.3f'))
  return ', '.join(f'{label} {metrics[k]:{fmt}}' for k, label, fmt in names if k in metrics)
