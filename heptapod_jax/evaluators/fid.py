"""Generative metrics the ADM way: FID, sFID, Inception Score, precision/recall, class accuracy.

Follows the protocol of OpenAI's guided-diffusion (ADM) evaluation suite,
`evaluations/evaluator.py`, which is how ImageNet 256 numbers are usually
reported (`VIRTUAL_imagenet256_labeled.npz` reference batch, 50k samples):

- FID / sFID: Frechet distance between Gaussians fitted to 'pool' (Inception
  pool_3, 2048-d) / 'spatial' (the first 7 channels of mixed_6/conv, 17x17x7 =
  2023-d) features; mean and `np.cov(rowvar=False)` covariance, matrix square
  root with `scipy.linalg.sqrtm` on the host in float64 (ADM's
  `FIDStatistics.frechet_distance`, itself pytorch-fid / TTUR's).
- Inception Score: softmax of the 1008-way logits, split into consecutive
  chunks of `split_size` = 5000 samples, exp(mean KL(p(y|x) || p(y))) per
  chunk, mean over chunks (ADM's `compute_inception_score`). The original
  Salimans et al. / pytorch way (`num_splits` = 10 equal splits, mean and std)
  is available too; for 50k samples both use the same ten splits.
- Precision / recall: Kynkaenniemi et al. 2019 improved precision and recall
  as ADM's `ManifoldEstimator` computes them: a point's manifold ball has the
  squared distance to its k = 3rd nearest neighbour as radius (the point itself
  counts as neighbour 0), precision = fraction of samples inside some reference
  ball, recall = fraction of references inside some sample ball; squared
  euclidean distances in float32 (|u|^2 - 2 u.v + |v|^2, clipped at 0) computed
  in row x column blocks so that no N x M matrix is ever held.

Features come from a feature extractor (`FeatureExtractor`): any callable
mapping uint8 images [B, H, W, 3] to a dict of float arrays with 'pool' [B, D]
(required), 'spatial' [B, D_s] (optional, for sFID) and 'logits' [B, K]
(optional, for IS and class accuracy). `evaluators.inception` (Inception-v3:
pool 2048, spatial 2023, logits 1008) and `evaluators.feature_net` (a small
CNN for the built-in data sets) follow it.

  ref = fid.load_adm_reference('VIRTUAL_imagenet256_labeled.npz', extractor,
                               cache_path='imagenet256_ref.npz')
  metrics = fid.evaluate_images(extractor, samples_uint8, ref)
  # {'fid': ..., 'sfid': ..., 'inception_score': ..., 'precision': ..., 'recall': ...}

Known differences from ADM (all far below the metrics' sampling noise):
means and covariances are accumulated in float64 (ADM: float32 mean, float64
covariance); IS works on float64 log-softmax (ADM: float32 TF softmax);
pairwise distances are float32 (ADM first tries a float16 distance block and
falls back to float32 only if it overflows; float16 flips the in/out decision
of a few borderline points).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
import zipfile
from typing import (Any, Callable, Iterable, Iterator, Literal, Mapping, Protocol, Sequence,
                    overload)

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from scipy import special

# ADM's defaults (guided-diffusion evaluations/evaluator.py).
FID_EPS = 1e-6  # Diagonal offset when sqrtm(sigma1 @ sigma2) is not finite.
FID_MAX_IMAG = 1e-3  # Largest tolerated |imag| on the diagonal of sqrtm(sigma1 @ sigma2).
IS_SPLIT_SIZE = 5000
PR_NHOOD_SIZE = 3  # k of the k-NN radii.
PR_BATCH_SIZE = 10000  # Row and column block size of the pairwise distances.
REALISM_EPS = 1e-5

Backend = Literal['numpy', 'jax']
ProgressFn = Callable[[int, 'int | None'], None]


class FeatureExtractor(Protocol):
  """What the metrics need from a feature network.

  Called on uint8 images [B, H, W, 3] in [0, 255] (any B >= 1; the network
  resizes/normalises as it was trained to), it returns per-image float
  features, numpy or jax arrays, with B rows each:

    'pool':    [B, D]   required; FID and precision/recall.
    'spatial': [B, D_s] optional; sFID. Higher-rank [B, ...] outputs are flattened.
    'logits':  [B, K]   optional; Inception Score and class accuracy.

  Extra keys are carried along by `extract_features` and ignored by the metrics.
  """

  def __call__(self, images: np.ndarray) -> Mapping[str, Any]:
    ...


# ----------------------------------------------------------------------------- features


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """Re-chunks an array or an iterable of arrays into batch_size batches (the last may be short)."""
  if isinstance(images, np.ndarray):
    for start in range(0, images.shape[0], batch_size):
      yield images[start:start + batch_size]
    return
  pending: list[np.ndarray] = []
  count = 0
  for batch in images:
    batch = np.asarray(batch)
    _check_image_batch(batch)
    while batch.shape[0]:
      take = min(batch_size - count, batch.shape[0])
      pending.append(batch[:take])
      count += take
      batch = batch[take:]
      if count == batch_size:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)
        pending, count = [], 0
  if count:
    yield pending[0] if len(pending) == 1 else np.concatenate(pending, axis=0)


def _check_image_batch(batch: np.ndarray) -> None:
  if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
    raise ValueError('extract_features: expected uint8 images [B, H, W, 3]; got '
                     f'{batch.dtype} {batch.shape}.')


def extract_features(extractor: FeatureExtractor,
                     images: np.ndarray | Iterable[np.ndarray],
                     batch_size: int = 256,
                     *,
                     progress: ProgressFn | None = None,
                     pad_to_batch: bool = False) -> dict[str, np.ndarray]:
  """Runs a feature extractor over many images in chunks and concatenates its outputs.

  Args:
    extractor: a `FeatureExtractor`.
    images: uint8 [N, H, W, 3], or an iterable of uint8 [b, H, W, 3] batches of
      any sizes (e.g. a generator reading from disk); re-chunked into batch_size.
    batch_size: images per extractor call.
    progress: called after each chunk as progress(images_done, total), with
      total None when `images` is an iterable.
    pad_to_batch: zero-pad a short last chunk to batch_size (its extra rows are
      dropped), so that a jitted extractor sees a single batch shape. Only for
      extractors that treat images independently (inference-mode networks).
  Returns:
    {key: float[N, ...]} for every key of the extractor's output; 'spatial' and
    any other outputs of rank > 2 are flattened to [N, -1].
  """
  if batch_size < 1:
    raise ValueError(f'extract_features: batch_size must be >= 1, got {batch_size}.')
  if isinstance(images, np.ndarray):
    total: int | None = images.shape[0]
    _check_image_batch(images)
  else:
    total = None  # len() of an iterable of batches, if any, counts batches, not images.
  outputs: dict[str, list[np.ndarray]] = {}
  done = 0
  for batch in _batches(images, batch_size):
    _check_image_batch(batch)
    n = batch.shape[0]
    if pad_to_batch and n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), np.uint8)])
    feats = extractor(batch)
    if not isinstance(feats, Mapping) or 'pool' not in feats:
      keys = sorted(feats) if isinstance(feats, Mapping) else type(feats).__name__
      raise ValueError(f"extract_features: the extractor must return a dict with a 'pool' entry; "
                       f'got {keys}.')
    if outputs and set(feats) != set(outputs):
      raise ValueError(f'extract_features: the extractor returned keys {sorted(feats)} after '
                       f'{sorted(outputs)} for earlier batches.')
    for key, value in feats.items():
      value = np.asarray(value)
      if value.ndim == 0 or value.shape[0] != batch.shape[0]:
        raise ValueError(f"extract_features: the extractor's '{key}' has shape {value.shape} for "
                         f'a batch of {batch.shape[0]} images.')
      outputs.setdefault(key, []).append(value[:n].reshape(n, -1))
    done += n
    if progress is not None:
      progress(done, total)
  if not outputs:
    raise ValueError('extract_features: no images.')
  return {key: np.concatenate(values, axis=0) for key, values in outputs.items()}


# ----------------------------------------------------------------------------- FID


def _check_features(features: Any, name: str, min_rows: int = 1) -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
    raise ValueError(f'{name}: expected features [N, D] with N >= {min_rows}; got shape {x.shape}.')
  if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f'{name}: expected real features, got dtype {x.dtype}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name}: features contain NaN or inf.')
  return x


def statistics(features: np.ndarray, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features, the Gaussian that FID compares.

  Args:
    features: float[N, D], N >= 2.
    chunk_size: rows per step; memory is O(chunk_size * D + D^2), never a
      float64 copy of all features.
  Returns:
    (mu float64[D], sigma float64[D, D]): sigma is `np.cov(features,
    rowvar=False)` (unbiased, N - 1), computed in two passes (mean, then the
    centred products) in float64.
  """
  x = _check_features(features, 'statistics', min_rows=2)
  n, d = x.shape
  total = np.zeros(d, np.float64)
  for start in range(0, n, chunk_size):
    total += np.sum(x[start:start + chunk_size], axis=0, dtype=np.float64)
  mu = total / n
  sigma = np.zeros((d, d), np.float64)
  for start in range(0, n, chunk_size):
    centred = x[start:start + chunk_size].astype(np.float64) - mu
    sigma += centred.T @ centred
  sigma /= n - 1
  return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as ADM / pytorch-fid compute it.

  d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2)), in
  float64 with scipy.linalg.sqrtm. If the square root is not finite (a
  singular product) it is retried on (sigma1 + eps I) @ (sigma2 + eps I), with
  a warning. Imaginary parts from round-off are dropped when every diagonal
  imaginary part is within 1e-3 of zero; larger ones raise ValueError (the
  inputs are then not covariance matrices).

  Args:
    mu1, mu2: float[D] means (scalars for D = 1).
    sigma1, sigma2: float[D, D] covariances.
    eps: the diagonal offset for singular products.
  Returns:
    The squared Frechet distance (what everybody calls FID), a Python float.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f'frechet_distance: means must be vectors of equal length; got mu1 '
                     f'{mu1.shape} and mu2 {mu2.shape}.')
  d = mu1.shape[0]
  if sigma1.shape != sigma2.shape:
    raise ValueError(f'frechet_distance: covariances have different shapes: sigma1 '
                     f'{sigma1.shape} and sigma2 {sigma2.shape}.')
  if sigma1.shape != (d, d):
    raise ValueError(f'frechet_distance: covariances of shape {sigma1.shape} do not match means '
                     f'of shape {mu1.shape}; expected ({d}, {d}).')
  for name, value in (('mu1', mu1), ('sigma1', sigma1), ('mu2', mu2), ('sigma2', sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f'frechet_distance: {name} contains NaN or inf.')
  diff = mu1 - mu2
  with warnings.catch_warnings():
    # scipy warns about singular inputs itself; ADM silences it (disp=False) and checks below.
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
      warnings.warn(f'frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (singular product); '
                    f'adding {eps} to the diagonal of both covariances.', RuntimeWarning,
                    stacklevel=2)
      offset = np.eye(d) * eps
      covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
      if not np.all(np.isfinite(covmean)):
        raise ValueError(f'frechet_distance: sqrtm((sigma1 + {eps} I) @ (sigma2 + {eps} I)) is '
                         'still not finite; are the covariances finite and positive semi-definite?')
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=FID_MAX_IMAG):
      raise ValueError('frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary component of '
                       f'up to {np.max(np.abs(covmean.imag)):.3g}; are both covariances symmetric '
                       'positive semi-definite?')
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------- Inception Score


def _split_score(log_p: np.ndarray) -> float:
  """exp(mean_x KL(p(y|x) || p(y))) with p(y) the mean of p(y|x) over the split; 0 log 0 = 0."""
  p = np.exp(log_p)
  with np.errstate(divide='ignore', invalid='ignore'):  # Classes no sample gives mass to.
    log_py = np.log(np.mean(p, axis=0, keepdims=True))
    kl = np.where(p > 0, p * (log_p - log_py), 0.0)
  return float(np.exp(np.mean(np.sum(kl, axis=1))))


@overload
def inception_score(logits_or_probs: np.ndarray, split_size: int = ..., *, num_splits: None = ...,
                    from_logits: bool = ...) -> float:
  ...


@overload
def inception_score(logits_or_probs: np.ndarray, split_size: int = ..., *, num_splits: int,
                    from_logits: bool = ...) -> tuple[float, float]:
  ...


def inception_score(logits_or_probs: np.ndarray, split_size: int = IS_SPLIT_SIZE, *,
                    num_splits: int | None = None,
                    from_logits: bool = True) -> float | tuple[float, float]:
  """Inception Score, exp(E_x KL(p(y|x) || p(y))), averaged over splits of the samples.

  Two split conventions:
  - ADM (default, num_splits=None): consecutive chunks of `split_size` samples
    (the last one may be shorter), one score per chunk, returns their mean.
    This is guided-diffusion's `compute_inception_score` (split_size 5000).
  - Salimans et al. 2016 / pytorch (num_splits=n): n near-equal splits
    [i N // n, (i + 1) N // n), returns (mean, std) of the n scores (std with
    ddof=0, as improved-gan's `get_inception_score`).
  For N = 50000 both use the same ten splits of 5000.

  Args:
    logits_or_probs: float[N, K] classifier logits (softmax is applied), or
      probabilities when from_logits=False.
    split_size: samples per split in the ADM convention.
    num_splits: the number of splits in the Salimans convention.
    from_logits: whether the input is logits.
  Returns:
    The ADM score (float), or (mean, std) with num_splits. In [1, K].
  """
  x = _check_features(logits_or_probs, 'inception_score').astype(np.float64)
  n = x.shape[0]
  if from_logits:
    log_p = special.log_softmax(x, axis=1)
  else:
    if np.any(x < 0) or not np.allclose(np.sum(x, axis=1), 1.0, rtol=0, atol=1e-3):
      raise ValueError('inception_score: from_logits=False needs probabilities (non-negative, rows '
                       'summing to 1); pass logits with from_logits=True.')
    with np.errstate(divide='ignore'):
      log_p = np.log(x / np.sum(x, axis=1, keepdims=True))
  if num_splits is None:
    if split_size < 1:
      raise ValueError(f'inception_score: split_size must be >= 1, got {split_size}.')
    scores = [_split_score(log_p[start:start + split_size]) for start in range(0, n, split_size)]
    return float(np.mean(scores))
  if not 1 <= num_splits <= n:
    raise ValueError(f'inception_score: num_splits must be in [1, {n}] for {n} samples, got '
                     f'{num_splits}.')
  scores = [_split_score(log_p[i * n // num_splits:(i + 1) * n // num_splits])
            for i in range(num_splits)]
  return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision / recall


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Squared euclidean distances as ADM's `_batch_pairwise_distances`, in float32.

  Args:
    u: float[N, D]; v: float[M, D].
  Returns:
    float32[N, M]: max(|u_i|^2 - 2 u_i . v_j + |v_j|^2, 0).
  """
  u = np.asarray(u, np.float32)
  v = np.asarray(v, np.float32)
  norm_u = np.sum(np.square(u), axis=1)[:, None]
  norm_v = np.sum(np.square(v), axis=1)[None, :]
  return np.maximum(norm_u - 2.0 * (u @ v.T) + norm_v, np.float32(0.0))


class _NumpyOps:
  """Distance blocks and their reductions on the host (numpy float32)."""

  @staticmethod
  def distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return pairwise_sq_distances(u, v)

  @staticmethod
  def smallest(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    d = pairwise_sq_distances(u, v)
    if n >= d.shape[1]:
      return d
    return np.partition(d, n - 1, axis=1)[:, :n]

  @staticmethod
  def membership(u: np.ndarray, radii_u: np.ndarray, v: np.ndarray,
                 radii_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = pairwise_sq_distances(u, v)
    return np.any(d <= radii_v[None, :], axis=1), np.any(d <= radii_u[:, None], axis=0)


def _jax_sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  norm_u = jnp.sum(jnp.square(u), axis=1)[:, None]
  norm_v = jnp.sum(jnp.square(v), axis=1)[None, :]
  uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(norm_u - 2.0 * uv + norm_v, 0.0)


_jax_distances = jax.jit(_jax_sq_distances)


@functools.partial(jax.jit, static_argnames='n')
def _jax_smallest(u: jax.Array, v: jax.Array, n: int) -> jax.Array:
  return -jax.lax.top_k(-_jax_sq_distances(u, v), n)[0]


@jax.jit
def _jax_membership(u: jax.Array, radii_u: jax.Array, v: jax.Array,
                    radii_v: jax.Array) -> tuple[jax.Array, jax.Array]:
  d = _jax_sq_distances(u, v)
  return jnp.any(d <= radii_v[None, :], axis=1), jnp.any(d <= radii_u[:, None], axis=0)


class _JaxOps:
  """The same blocks jitted on JAX's default device (float32, HIGHEST matmul precision).

  Reductions happen on the device; only [R, k + 1] neighbour distances or
  boolean vectors come back. Shapes vary only between full and last blocks,
  so there are at most four compilations per kernel and data set.
  """

  @staticmethod
  def distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.asarray(_jax_distances(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)))

  @staticmethod
  def smallest(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    n = min(n, v.shape[0])
    return np.asarray(_jax_smallest(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), n=n))

  @staticmethod
  def membership(u: np.ndarray, radii_u: np.ndarray, v: np.ndarray,
                 radii_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u_in, v_in = _jax_membership(jnp.asarray(u, jnp.float32), jnp.asarray(radii_u, jnp.float32),
                                 jnp.asarray(v, jnp.float32), jnp.asarray(radii_v, jnp.float32))
    return np.asarray(u_in), np.asarray(v_in)


def _ops(backend: str) -> type[_NumpyOps] | type[_JaxOps]:
  if backend == 'numpy':
    return _NumpyOps
  if backend == 'jax':
    return _JaxOps
  raise ValueError(f"backend must be 'numpy' or 'jax', got {backend!r}.")


def _check_batch_sizes(row_batch_size: int, col_batch_size: int) -> None:
  if row_batch_size < 1 or col_batch_size < 1:
    raise ValueError(f'row_batch_size and col_batch_size must be >= 1, got {row_batch_size} and '
                     f'{col_batch_size}.')


def manifold_radii(features: np.ndarray, k: int = PR_NHOOD_SIZE, *,
                   clamp_to_percentile: float | None = None,
                   row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE,
                   backend: Backend = 'numpy') -> np.ndarray:
  """k-NN ball radii of a feature set, as ADM's `ManifoldEstimator.manifold_radii`.

  A point's radius is its squared distance to the k-th nearest point of the
  set, counting the point itself as neighbour 0 (ADM partitions each distance
  row at [0..k] and takes entry k). Distances are computed in row x column
  blocks; a running k + 1 smallest per row is kept, so memory is
  O(row_batch_size * col_batch_size), and the result does not depend on the
  block sizes.

  Args:
    features: float[N, D] (cast to float32), N > k.
    k: the neighbourhood size (ADM: 3).
    clamp_to_percentile: if set, radii above this percentile of all radii are
      set to 0 (`radii[radii > np.percentile(radii, p)] = 0`, kynkaat's and
      ADM's option). ADM's evaluator leaves it at None. Note that
      p = 5 zeroes 95% of the balls: those then only contain exact duplicates.
    row_batch_size, col_batch_size: the distance block shape.
    backend: 'numpy' (host float32, like ADM's float32 path) or 'jax' (jitted
      float32 on the default device; much faster on an accelerator).
  Returns:
    float32[N] squared radii.
  """
  x = _check_features(features, 'manifold_radii').astype(np.float32, copy=False)
  n = x.shape[0]
  if k < 1 or n <= k:
    raise ValueError(f'manifold_radii: need k >= 1 and more than k points; got k={k} and {n} '
                     'points.')
  _check_batch_sizes(row_batch_size, col_batch_size)
  ops = _ops(backend)
  radii = np.zeros(n, np.float32)
  for r0 in range(0, n, row_batch_size):
    rows = x[r0:r0 + row_batch_size]
    best: np.ndarray | None = None  # The k + 1 smallest distances per row so far.
    for c0 in range(0, n, col_batch_size):
      cand = ops.smallest(rows, x[c0:c0 + col_batch_size], k + 1)
      best = cand if best is None else np.concatenate([best, cand], axis=1)
      if best.shape[1] > k + 1:
        best = np.partition(best, k, axis=1)[:, :k + 1]
    assert best is not None
    radii[r0:r0 + rows.shape[0]] = np.partition(best, k, axis=1)[:, k]
  if clamp_to_percentile is not None:
    max_radius = np.percentile(radii, clamp_to_percentile)
    radii[radii > max_radius] = 0
  return radii


def _check_radii(radii: np.ndarray, features: np.ndarray, name: str) -> np.ndarray:
  r = np.asarray(radii, np.float32)
  if r.shape != (features.shape[0],):
    raise ValueError(f'{name}: radii of shape {r.shape} do not match features of shape '
                     f'{features.shape}; expected ({features.shape[0]},).')
  return r


def _check_same_dim(a: np.ndarray, b: np.ndarray, name: str, what: str = 'features') -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'{name}: {what} have different dimensions: {a.shape} and {b.shape}.')


@dataclasses.dataclass(frozen=True)
class ManifoldEvaluation:
  """Per-point results of `evaluate_manifold` (ADM's `ManifoldEstimator.evaluate`).

  Attributes:
    in_manifold: bool[M], whether each evaluated point is inside some reference ball.
    realism: float32[M], max_j radius_j / (d_ij + eps): Kynkaenniemi et al.'s
      realism score (ADM's 'max_realisim_score'; over all balls, clamped or not).
    nearest: int[M], index of the nearest reference point.
  """
  in_manifold: np.ndarray
  realism: np.ndarray
  nearest: np.ndarray

  @property
  def fraction(self) -> float:
    """Fraction of evaluated points inside the reference manifold."""
    return float(np.mean(self.in_manifold))


def evaluate_manifold(ref_features: np.ndarray, ref_radii: np.ndarray, eval_features: np.ndarray,
                      *, eps: float = REALISM_EPS, row_batch_size: int = PR_BATCH_SIZE,
                      col_batch_size: int = PR_BATCH_SIZE,
                      backend: Backend = 'numpy') -> ManifoldEvaluation:
  """Which points lie on a reference manifold, their realism score and nearest reference point.

  Args:
    ref_features: float[N, D], the points whose balls make up the manifold.
    ref_radii: float[N] squared radii from `manifold_radii`.
    eval_features: float[M, D].
    eps: added to distances in the realism score (ADM: 1e-5); it only matters there.
    row_batch_size, col_batch_size: eval rows and reference columns per distance block.
    backend: 'numpy' or 'jax' for the distance blocks (reductions on the host).
  """
  ref = _check_features(ref_features, 'evaluate_manifold').astype(np.float32, copy=False)
  ev = _check_features(eval_features, 'evaluate_manifold').astype(np.float32, copy=False)
  _check_same_dim(ref, ev, 'evaluate_manifold')
  radii = _check_radii(ref_radii, ref, 'evaluate_manifold')
  _check_batch_sizes(row_batch_size, col_batch_size)
  ops = _ops(backend)
  m = ev.shape[0]
  in_manifold = np.zeros(m, bool)
  realism = np.full(m, -np.inf, np.float32)
  nearest = np.zeros(m, np.int64)
  nearest_d = np.full(m, np.inf, np.float32)
  for r0 in range(0, m, row_batch_size):
    rows = slice(r0, r0 + row_batch_size)
    for c0 in range(0, ref.shape[0], col_batch_size):
      cols = slice(c0, c0 + col_batch_size)
      d = ops.distances(ev[rows], ref[cols])
      in_manifold[rows] |= np.any(d <= radii[None, cols], axis=1)
      realism[rows] = np.maximum(realism[rows],
                                 np.max(radii[None, cols] / (d + np.float32(eps)), axis=1))
      idx = np.argmin(d, axis=1)
      dmin = d[np.arange(d.shape[0]), idx]
      better = dmin < nearest_d[rows]  # Strict: ties keep the earlier index, like one argmin.
      nearest[rows] = np.where(better, idx + c0, nearest[rows])
      nearest_d[rows] = np.where(better, dmin, nearest_d[rows])
  return ManifoldEvaluation(in_manifold=in_manifold, realism=realism, nearest=nearest)


def manifold_overlap(features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray,
                     radii_2: np.ndarray, *, row_batch_size: int = PR_BATCH_SIZE,
                     col_batch_size: int = PR_BATCH_SIZE,
                     backend: Backend = 'numpy') -> tuple[np.ndarray, np.ndarray]:
  """Both directions of manifold membership from one pass over the distance blocks.

  ADM's `ManifoldEstimator.evaluate_pr`: features_1 in row blocks, features_2
  in column blocks, every block's distances used for both sides.

  Returns:
    (in_2: bool[N1], whether each point of set 1 is inside some ball of set 2;
     in_1: bool[N2], whether each point of set 2 is inside some ball of set 1).
  """
  f1 = _check_features(features_1, 'manifold_overlap').astype(np.float32, copy=False)
  f2 = _check_features(features_2, 'manifold_overlap').astype(np.float32, copy=False)
  _check_same_dim(f1, f2, 'manifold_overlap')
  r1 = _check_radii(radii_1, f1, 'manifold_overlap')
  r2 = _check_radii(radii_2, f2, 'manifold_overlap')
  _check_batch_sizes(row_batch_size, col_batch_size)
  ops = _ops(backend)
  in_2 = np.zeros(f1.shape[0], bool)
  in_1 = np.zeros(f2.shape[0], bool)
  for r0 in range(0, f1.shape[0], row_batch_size):
    rows = slice(r0, r0 + row_batch_size)
    for c0 in range(0, f2.shape[0], col_batch_size):
      cols = slice(c0, c0 + col_batch_size)
      rows_in, cols_in = ops.membership(f1[rows], r1[rows], f2[cols], r2[cols])
      in_2[rows] |= rows_in
      in_1[cols] |= cols_in
  return in_2, in_1


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, *,
                     k: int = PR_NHOOD_SIZE, clamp_to_percentile: float | None = None,
                     row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE,
                     backend: Backend = 'numpy') -> tuple[float, float]:
  """Improved precision and recall (Kynkaenniemi et al. 2019) as ADM's `compute_prec_recall`.

  Args:
    ref_features: float[N, D] reference ('real') features, N > k.
    sample_features: float[M, D] sample features, M > k.
    k, clamp_to_percentile, row_batch_size, col_batch_size, backend: see
      `manifold_radii`; ADM uses k=3, no clamp, 10000 x 10000 blocks.
  Returns:
    (precision, recall): the fraction of samples inside the reference manifold
    and the fraction of references inside the sample manifold. Identical sets
    give (1.0, 1.0) without clamping.
  """
  ref = _check_features(ref_features, 'precision_recall').astype(np.float32, copy=False)
  sam = _check_features(sample_features, 'precision_recall').astype(np.float32, copy=False)
  _check_same_dim(ref, sam, 'precision_recall', 'reference and sample features')
  kw = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, backend=backend)
  radii_ref = manifold_radii(ref, k, clamp_to_percentile=clamp_to_percentile, **kw)
  radii_sam = manifold_radii(sam, k, clamp_to_percentile=clamp_to_percentile, **kw)
  ref_in_samples, samples_in_ref = manifold_overlap(ref, radii_ref, sam, radii_sam, **kw)
  return float(np.mean(samples_in_ref)), float(np.mean(ref_in_samples))


# ----------------------------------------------------------------------------- reference batches


@dataclasses.dataclass
class Reference:
  """What the metrics need of a reference data set.

  Attributes:
    mu, sigma: float64[D], [D, D] statistics of its 'pool' features (FID).
    mu_s, sigma_s: float64[D_s], [D_s, D_s] statistics of its 'spatial' features (sFID), or None.
    pool_features: float32[N, D] 'pool' features of its images (precision/recall), or None.
  """
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool_features: np.ndarray | None = None

  def __post_init__(self):
    self.mu = np.asarray(self.mu, np.float64)
    self.sigma = np.asarray(self.sigma, np.float64)
    _check_stats(self.mu, self.sigma, 'Reference', 'mu', 'sigma')
    if (self.mu_s is None) != (self.sigma_s is None):
      raise ValueError('Reference: mu_s and sigma_s must be given together.')
    if self.mu_s is not None:
      self.mu_s = np.asarray(self.mu_s, np.float64)
      self.sigma_s = np.asarray(self.sigma_s, np.float64)
      _check_stats(self.mu_s, self.sigma_s, 'Reference', 'mu_s', 'sigma_s')
    if self.pool_features is not None:
      self.pool_features = np.asarray(self.pool_features, np.float32)
      if self.pool_features.ndim != 2 or self.pool_features.shape[1] != self.mu.shape[0]:
        raise ValueError(f'Reference: pool_features of shape {self.pool_features.shape} do not '
                         f'match mu of shape {self.mu.shape}; expected [N, {self.mu.shape[0]}].')

  @classmethod
  def from_features(cls, features: Mapping[str, np.ndarray],
                    keep_pool_features: bool = True) -> Reference:
    """Statistics (and pool features, for precision/recall) from `extract_features` output."""
    if 'pool' not in features:
      raise ValueError(f"Reference.from_features: no 'pool' features; got keys {sorted(features)}.")
    mu, sigma = statistics(features['pool'])
    mu_s = sigma_s = None
    if features.get('spatial') is not None:
      mu_s, sigma_s = statistics(features['spatial'])
    pool = np.asarray(features['pool'], np.float32) if keep_pool_features else None
    return cls(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool_features=pool)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes exactly `path`, atomically: an .npz of mu, sigma[, mu_s, sigma_s][, pool_features]."""
    arrays = {'mu': self.mu, 'sigma': self.sigma}
    if self.mu_s is not None:
      arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
    if self.pool_features is not None:
      arrays['pool_features'] = self.pool_features
    path = os.fspath(path)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Reference:
    """Reads a `save`d file. ADM reference batches load too (their statistics, no pool features)."""
    with _open_npz(path) as data:
      _require_keys(data, path, ('mu', 'sigma'))
      spatial = {}
      if 'mu_s' in data.files or 'sigma_s' in data.files:
        _require_keys(data, path, ('mu_s', 'sigma_s'))
        spatial = dict(mu_s=data['mu_s'], sigma_s=data['sigma_s'])
      pool = data['pool_features'] if 'pool_features' in data.files else None
      return cls(mu=data['mu'], sigma=data['sigma'], pool_features=pool, **spatial)

  @property
  def has_spatial(self) -> bool:
    return self.mu_s is not None


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str, mu_name: str,
                 sigma_name: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{where}: {mu_name} of shape {mu.shape} and {sigma_name} of shape '
                     f'{sigma.shape} are not a [D] mean and a [D, D] covariance.')


def _open_npz(path: str | os.PathLike[str]) -> Any:
  try:
    data = np.load(os.fspath(path), allow_pickle=False)
  except FileNotFoundError:
    raise FileNotFoundError(f'No such reference file: {os.fspath(path)}') from None
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'{os.fspath(path)}: not a readable .npz file ({e}).') from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f'{os.fspath(path)}: expected an .npz archive, found a single .npy array.')
  return data


def _require_keys(data: Any, path: str | os.PathLike[str], keys: Sequence[str]) -> None:
  for key in keys:
    if key not in data.files:
      raise ValueError(f"{os.fspath(path)}: missing key '{key}' (the file has "
                       f'{sorted(data.files)}).')


def iter_npz_array(path: str | os.PathLike[str], key: str,
                   batch_size: int) -> Iterator[np.ndarray]:
  """Reads the array `key` of an .npz file in row batches without loading all of it.

  ADM's reference batches hold 10000 256x256 images (about 2 GB) in 'arr_0';
  this streams them from the (possibly compressed) zip member, as ADM's
  `StreamingNpzArrayReader` does. Arrays in Fortran order or with object dtype
  are loaded whole.
  """
  path = os.fspath(path)
  with zipfile.ZipFile(path) as zf:
    member = f'{key}.npy'
    if member not in zf.namelist():
      raise ValueError(f"{path}: missing key '{key}'.")
    with zf.open(member) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        shape, fortran, dtype = (), True, np.dtype(object)  # Fall back to np.load.
      if fortran or dtype.hasobject or len(shape) == 0:
        streaming = False
      else:
        streaming = True
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
          rows = min(batch_size, shape[0] - start)
          buf = f.read(rows * row_bytes)
          if len(buf) != rows * row_bytes:
            raise ValueError(f"{path}: '{key}' is truncated (expected {shape[0]} rows).")
          yield np.frombuffer(buf, dtype=dtype).reshape(rows, *shape[1:])
  if not streaming:
    with _open_npz(path) as data:
      arr = data[key]
    for start in range(0, arr.shape[0], batch_size):
      yield arr[start:start + batch_size]


def load_adm_reference(path: str | os.PathLike[str], extractor: FeatureExtractor | None = None, *,
                       batch_size: int = 256, progress: ProgressFn | None = None,
                       cache_path: str | os.PathLike[str] | None = None) -> Reference:
  """Loads an ADM reference batch such as `VIRTUAL_imagenet256_labeled.npz`.

  Those files hold 'mu', 'sigma', 'mu_s', 'sigma_s' (ADM's TF Inception
  statistics of pool_3 and spatial features) and 'arr_0' (the uint8 reference
  images, [N, H, W, 3]). As ADM's `read_statistics` does, the stored
  statistics are used as they are; precision/recall needs the images' pool
  features, which are computed with `extractor` when given. Without stored
  statistics ('mu' absent, as in ADM's sample batches) they are computed from
  the extractor's features of 'arr_0' too.

  Args:
    path: the .npz file.
    extractor: a `FeatureExtractor` for 'arr_0', or None for statistics only.
    batch_size: images per extractor call.
    progress: passed to `extract_features`.
    cache_path: if given, a `Reference.save` file: returned directly when it
      exists (and has pool features, if an extractor was given), else written
      after computing.
  Returns:
    The Reference (pool_features None without extractor).
  """
  if cache_path is not None and os.path.exists(cache_path):
    cached = Reference.load(cache_path)
    if extractor is None or cached.pool_features is not None:
      return cached
  with _open_npz(path) as data:
    files = set(data.files)
    has_stats = 'mu' in files or 'sigma' in files
    if has_stats:
      _require_keys(data, path, ('mu', 'sigma'))
    elif extractor is None:
      _require_keys(data, path, ('mu',))  # Raises, naming the missing key.
    if extractor is not None:
      _require_keys(data, path, ('arr_0',))
    stats = {key: data[key] for key in ('mu', 'sigma', 'mu_s', 'sigma_s') if key in files}
  if ('mu_s' in stats) != ('sigma_s' in stats):
    missing = 'sigma_s' if 'mu_s' in stats else 'mu_s'
    raise ValueError(f"{os.fspath(path)}: missing key '{missing}' (the file has {sorted(files)}).")
  features: dict[str, np.ndarray] = {}
  if extractor is not None:
    features = extract_features(extractor, iter_npz_array(path, 'arr_0', batch_size), batch_size,
                                progress=progress)
  if has_stats:
    mu, sigma = stats['mu'], stats['sigma']
  else:
    mu, sigma = statistics(features['pool'])
  mu_s, sigma_s = stats.get('mu_s'), stats.get('sigma_s')
  if mu_s is None and features.get('spatial') is not None:
    mu_s, sigma_s = statistics(features['spatial'])
  reference = Reference(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                        pool_features=features.get('pool'))
  if cache_path is not None:
    reference.save(cache_path)
  return reference


# ----------------------------------------------------------------------------- evaluation


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of samples whose argmax logit is their label (class-conditional samples).

  Only meaningful when the logits' classes are the labels' classes, i.e. for the
  project's own classifiers; Inception's 1008 outputs are not ImageNet's 1000
  class ids in order. The caller decides by passing labels or not.
  """
  logits = _check_features(logits, 'class_accuracy')
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
      precision/recall settings, see `manifold_radii`.
  Returns:
    {'fid'; 'sfid' if both sides have spatial features; 'inception_score' if
    the samples have logits; 'precision', 'recall' if the reference has pool
    features; 'class_accuracy' if labels and logits are given}.
  """
  if 'pool' not in sample_features:
    raise ValueError(f"evaluate: sample features have no 'pool' entry; got keys "
                     f'{sorted(sample_features)}.')
  pool = _check_features(sample_features['pool'], 'evaluate', min_rows=2)
  if pool.shape[1] != reference.mu.shape[0]:
    raise ValueError(f"evaluate: sample 'pool' features of shape {pool.shape} do not match the "
                     f'reference mu of shape {reference.mu.shape}.')
  results: dict[str, float] = {}
  mu, sigma = statistics(pool)
  results['fid'] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
  spatial = sample_features.get('spatial')
  if spatial is not None and reference.has_spatial:
    spatial = _check_features(spatial, 'evaluate', min_rows=2)
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


__all__ = [
    'FeatureExtractor', 'ManifoldEvaluation', 'Reference', 'class_accuracy', 'evaluate',
    'evaluate_images', 'evaluate_manifold', 'extract_features', 'frechet_distance',
    'inception_score', 'iter_npz_array', 'load_adm_reference', 'manifold_overlap',
    'manifold_radii', 'pairwise_sq_distances', 'precision_recall', 'statistics',
]
