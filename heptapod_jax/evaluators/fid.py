"""FID and sFID: the Frechet distance between Gaussians fitted to features, the ADM way.

Mean and `np.cov(rowvar=False)` covariance of 'pool' (Inception pool_3,
2048-d; FID) or 'spatial' (the first 7 channels of mixed_6/conv, 17x17x7 =
2023-d; sFID) features, accumulated in float64 (`statistics`), and the
Frechet distance between two such Gaussians with the matrix square root from
`scipy.linalg.sqrtm` on the host in float64 (`frechet_distance`; ADM's
`FIDStatistics.frechet_distance`, itself pytorch-fid / TTUR's). See `metrics`
for the whole ADM evaluation protocol.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from heptapod_jax.evaluators.features import check_features

# ADM's defaults (guided-diffusion evaluations/evaluator.py).
FID_EPS = 1e-6  # Diagonal offset when sqrtm(sigma1 @ sigma2) is not finite.
FID_MAX_IMAG = 1e-3  # Largest tolerated |imag| on the diagonal of sqrtm(sigma1 @ sigma2).


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
  x = check_features(features, 'statistics', min_rows=2)
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


__all__ = ['frechet_distance', 'statistics']
