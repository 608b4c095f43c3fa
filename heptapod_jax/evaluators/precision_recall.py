"""Improved precision and recall (Kynkaenniemi et al. 2019) as ADM's `ManifoldEstimator` has them.

A point's manifold ball has the squared distance to its k = 3rd nearest
neighbour as radius (the point itself counts as neighbour 0); precision is
the fraction of samples inside some reference ball, recall the fraction of
references inside some sample ball. Squared euclidean distances in float32
(|u|^2 - 2 u.v + |v|^2, clipped at 0) are computed in row x column blocks, on
the host ('numpy') or jitted on JAX's default device ('jax'), so that no
N x M matrix is ever held. Also the per-point realism score and nearest
reference (`evaluate_manifold`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.evaluators.features import check_features

# ADM's defaults (guided-diffusion evaluations/evaluator.py).
PR_NHOOD_SIZE = 3  # k of the k-NN radii.
PR_BATCH_SIZE = 10000  # Row and column block size of the pairwise distances.
REALISM_EPS = 1e-5

Backend = Literal['numpy', 'jax']


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
  x = check_features(features, 'manifold_radii').astype(np.float32, copy=False)
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
  ref = check_features(ref_features, 'evaluate_manifold').astype(np.float32, copy=False)
  ev = check_features(eval_features, 'evaluate_manifold').astype(np.float32, copy=False)
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
  f1 = check_features(features_1, 'manifold_overlap').astype(np.float32, copy=False)
  f2 = check_features(features_2, 'manifold_overlap').astype(np.float32, copy=False)
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
  ref = check_features(ref_features, 'precision_recall').astype(np.float32, copy=False)
  sam = check_features(sample_features, 'precision_recall').astype(np.float32, copy=False)
  _check_same_dim(ref, sam, 'precision_recall', 'reference and sample features')
  kw = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, backend=backend)
  radii_ref = manifold_radii(ref, k, clamp_to_percentile=clamp_to_percentile, **kw)
  radii_sam = manifold_radii(sam, k, clamp_to_percentile=clamp_to_percentile, **kw)
  ref_in_samples, samples_in_ref = manifold_overlap(ref, radii_ref, sam, radii_sam, **kw)
  return float(np.mean(samples_in_ref)), float(np.mean(ref_in_samples))


__all__ = [
    'ManifoldEvaluation', 'evaluate_manifold', 'manifold_overlap', 'manifold_radii',
    'pairwise_sq_distances', 'precision_recall',
]
