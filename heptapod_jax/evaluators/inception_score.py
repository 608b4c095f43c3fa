"""Inception Score, exp(E_x KL(p(y|x) || p(y))), with ADM's or Salimans et al.'s splits.

ADM (guided-diffusion's `compute_inception_score`): softmax of the logits,
consecutive chunks of `split_size` = 5000 samples, one score per chunk, mean
over chunks. Salimans et al. / pytorch: `num_splits` near-equal splits, mean
and std. For 50k samples both use the same ten splits.
"""
from __future__ import annotations

from typing import overload

import numpy as np
from scipy import special

from heptapod_jax.evaluators.features import check_features

# ADM's default (guided-diffusion evaluations/evaluator.py).
IS_SPLIT_SIZE = 5000


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
  x = check_features(logits_or_probs, 'inception_score').astype(np.float64)
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


__all__ = ['inception_score']
