"""Generative metrics the ADM way: FID, sFID, Inception Score, precision/recall, class accuracy.

This module combines them (`evaluate`, `evaluate_images`) and adds class
accuracy; each metric lives in its own module. Follows the protocol of
OpenAI's guided-diffusion (ADM) evaluation suite, `evaluations/evaluator.py`,
which is how ImageNet 256 numbers are usually reported
(`VIRTUAL_imagenet256_labeled.npz` reference batch, 50k samples):

- FID / sFID (`fid`): Frechet distance between Gaussians fitted to 'pool'
  (Inception pool_3, 2048-d) / 'spatial' (the first 7 channels of
  mixed_6/conv, 17x17x7 = 2023-d) features; mean and `np.cov(rowvar=False)`
  covariance, matrix square root with `scipy.linalg.sqrtm` on the host in
  float64 (ADM's `FIDStatistics.frechet_distance`, itself pytorch-fid / TTUR's).
- Inception Score (`inception_score`): softmax of the 1008-way logits, split
  into consecutive chunks of `split_size` = 5000 samples, exp(mean KL(p(y|x) ||
  p(y))) per chunk, mean over chunks (ADM's `compute_inception_score`). The
  original Salimans et al. / pytorch way (`num_splits` = 10 equal splits, mean
  and std) is available too; for 50k samples both use the same ten splits.
- Precision / recall (`precision_recall`): Kynkaenniemi et al. 2019 improved
  precision and recall as ADM's `ManifoldEstimator` computes them: a point's
  manifold ball has the squared distance to its k = 3rd nearest neighbour as
  radius (the point itself counts as neighbour 0), precision = fraction of
  samples inside some reference ball, recall = fraction of references inside
  some sample ball; squared euclidean distances in float32 (|u|^2 - 2 u.v +
  |v|^2, clipped at 0) computed in row x column blocks so that no N x M matrix
  is ever held.

Features come from a feature extractor (`features.FeatureExtractor`): any
callable mapping uint8 images [B, H, W, 3] to a dict of float arrays with
'pool' [B, D] (required), 'spatial' [B, D_s] (optional, for sFID) and 'logits'
[B, K] (optional, for IS and class accuracy); `features.extract_features` runs
one over many images. `evaluators.inception` (Inception-v3: pool 2048, spatial
2023, logits 1008) and `evaluators.feature_net` (a small CNN for the built-in
data sets) follow it. What samples are compared against is a
`reference.Reference` (statistics and pool features of a reference data set).

  ref = reference.load_adm_reference('VIRTUAL_imagenet256_labeled.npz', extractor,
                                     cache_path='imagenet256_ref.npz')
  results = metrics.evaluate_images(extractor, samples_uint8, ref)
  # {'fid': ..., 'sfid': ..., 'inception_score': ..., 'precision': ..., 'recall': ...}

Known differences from ADM (all far below the metrics' sampling noise):
means and covariances are accumulated in float64 (ADM: float32 mean, float64
covariance); IS works on float64 log-softmax (ADM: float32 TF softmax);
pairwise distances are float32 (ADM first tries a float16 distance block and
falls back to float32 only if it overflows; float16 flips the in/out decision
of a few borderline points).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from heptapod_jax.evaluators.features import (FeatureExtractor, ProgressFn, check_features,
                                              extract_features)
from heptapod_jax.evaluators.fid import frechet_distance, statistics
from heptapod_jax.evaluators.inception_score import IS_SPLIT_SIZE, inception_score
from heptapod_jax.evaluators.precision_recall import (PR_BATCH_SIZE, PR_NHOOD_SIZE, Backend,
                                                      precision_recall)
from heptapod_jax.evaluators.reference import Reference


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples whose argmax logit is their label (class-conditional samples).

  Only meaningful when the logits' classes are the labels' classes, i.e. for the
  project's own classifiers; Inception's 1008 outputs are not ImageNet's 1000
  class ids in order. The caller decides by passing labels or not.
  """
  logits = check_features(logits, 'class_accuracy')
  labels = np.asarray(labels)
  if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'class_accuracy: expected integer labels of shape ({logits.shape[0]},) for '
                     f'logits of shape {logits.shape}; got {labels.dtype} {labels.shape}.')
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def evaluate(sample_features: Mapping[str, np.ndarray], reference: Reference,
             labels: np.ndarray | None = None, *, is_split_size: int = IS_SPLIT_SIZE,
             nhood_size: int = PR_NHOOD_SIZE, clamp_to_percentile: float | None = None,
             row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE,
             backend: Backend = 'numpy') -> dict[str, float]:
  """All metrics that the features and the reference allow.

  Args:
    sample_features: `extract_features` output for the samples ('pool' required).
    reference: the Reference.
    labels: int[N], the classes the samples were generated for; gives
      class_accuracy when the features have 'logits' (see `class_accuracy`
      for when that is meaningful).
    is_split_size: samples per Inception Score split (ADM: 5000).
    nhood_size, clamp_to_percentile, row_batch_size, col_batch_size, backend:
      precision/recall settings, see `precision_recall.manifold_radii`.
  Returns:
    {'fid'; 'sfid' if both sides have spatial features; 'inception_score' if
    the samples have logits; 'precision', 'recall' if the reference has pool
    features; 'class_accuracy' if labels and logits are given}.
  """
  if 'pool' not in sample_features:
    raise ValueError(f"evaluate: sample features have no 'pool' entry; got keys "
                     f'{sorted(sample_features)}.')
  pool = check_features(sample_features['pool'], 'evaluate', min_rows=2)
  if pool.shape[1] != reference.mu.shape[0]:
    raise ValueError(f"evaluate: sample 'pool' features of shape {pool.shape} do not match the "
                     f'reference mu of shape {reference.mu.shape}.')
  results: dict[str, float] = {}
  mu, sigma = statistics(pool)
  results['fid'] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
  spatial = sample_features.get('spatial')
  if spatial is not None and reference.has_spatial:
    spatial = check_features(spatial, 'evaluate', min_rows=2)
    if spatial.shape[1] != reference.mu_s.shape[0]:
      raise ValueError(f"evaluate: sample 'spatial' features of shape {spatial.shape} do not "
                       f'match the reference mu_s of shape {reference.mu_s.shape}.')
    mu_s, sigma_s = statistics(spatial)
    results['sfid'] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
  logits = sample_features.get('logits')
  if logits is not None:
    results['inception_score'] = inception_score(logits, is_split_size)
  if reference.pool_features is not None:
    results['precision'], results['recall'] = precision_recall(
        reference.pool_features, pool, k=nhood_size, clamp_to_percentile=clamp_to_percentile,
        row_batch_size=row_batch_size, col_batch_size=col_batch_size, backend=backend)
  if labels is not None:
    if logits is None:
      raise ValueError("evaluate: labels were given but the sample features have no 'logits'.")
    results['class_accuracy'] = class_accuracy(logits, labels)
  return results


def evaluate_images(extractor: FeatureExtractor, images: np.ndarray | Iterable[np.ndarray],
                    reference: Reference, labels: np.ndarray | None = None, *,
                    batch_size: int = 256, progress: ProgressFn | None = None,
                    **evaluate_kwargs: Any) -> dict[str, float]:
  """`extract_features` on uint8 sample images, then `evaluate` (keyword arguments go to it)."""
  features = extract_features(extractor, images, batch_size, progress=progress)
  return evaluate(features, reference, labels, **evaluate_kwargs)


__all__ = ['class_accuracy', 'evaluate', 'evaluate_images']
