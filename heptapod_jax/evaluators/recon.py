"""Reconstruction metrics for image tokenizers: PSNR, SSIM and codebook usage / perplexity.

Everything is JAX on float images, [B, H, W, C] (any leading batch dims), with
an explicit `data_range` (max - min of the value range: 2.0 for images in
[-1, 1], 1.0 for [0, 1], 255.0 for uint8-valued floats). PSNR and SSIM follow
`tf.image.psnr` / `tf.image.ssim` (Wang et al. 2004 SSIM: 11x11 Gaussian
window with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering, mean over the
SSIM map then over channels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_images(x: Array, y: Array, name: str) -> None:
  if x.shape != y.shape or x.ndim < 3:
    raise ValueError(f'{name}: expected two [..., H, W, C] arrays of equal shape; got '
                     f'{x.shape} and {y.shape}.')


def psnr(x: Array, y: Array, data_range: float) -> Array:
  """Peak signal-to-noise ratio per image, in dB.

  Args:
    x, y: float[..., H, W, C].
    data_range: max - min of the images' value range.
  Returns:
    float32[...]: 10 log10(data_range^2 / MSE), +inf for identical images (as tf.image.psnr).
  """
  _check_images(x, y, 'psnr')
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
  """Normalised 1D Gaussian taps; their outer product is tf's / MATLAB fspecial's 2D window."""
  coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * np.square(coords / sigma))
  return (g / g.sum()).astype(np.float32)


def _gaussian_filter_valid(z: Array, window: np.ndarray) -> Array:
  """Separable 'valid' Gaussian filtering: [N, H, W] -> [N, H - k + 1, W - k + 1]."""
  k = window.shape[0]
  z = z[..., None]
  dn = ('NHWC', 'HWIO', 'NHWC')
  # Metrics must not depend on the platform's default (TF32 / bf16-pass) conv precision.
  hi = jax.lax.Precision.HIGHEST
  z = jax.lax.conv_general_dilated(z, jnp.asarray(window).reshape(k, 1, 1, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision=hi)
  z = jax.lax.conv_general_dilated(z, jnp.asarray(window).reshape(1, k, 1, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision=hi)
  return z[..., 0]


def ssim(x: Array, y: Array, data_range: float, filter_size: int = SSIM_FILTER_SIZE,
         filter_sigma: float = SSIM_FILTER_SIGMA, k1: float = SSIM_K1,
         k2: float = SSIM_K2) -> Array:
  """Structural similarity per image (Wang et al. 2004), averaged over the SSIM map and channels.

  Same conventions as tf.image.ssim: Gaussian-weighted local statistics over
  'valid' windows only, biased (no Bessel correction) local variances,
  C1 = (k1 * data_range)^2, C2 = (k2 * data_range)^2. Numerically more careful
  than tf's float32 code (see below): agrees with a float64 evaluation to a
  few 1e-6, while tf.image.ssim can be off by ~1e-4 on flat or offset images.

  Args:
    x, y: float[..., H, W, C] with H, W >= filter_size.
    data_range: max - min of the images' value range.
  Returns:
    float32[...] in [-1, 1]; 1 for identical images.
  """
  _check_images(x, y, 'ssim')
  *lead, h, w, c = x.shape
  if h < filter_size or w < filter_size:
    raise ValueError(f'ssim: images of {h}x{w} are smaller than the {filter_size}x{filter_size} '
                     'window.')
  window = _gaussian_window(filter_size, filter_sigma)
  # Channels (and leading dims) into the batch.
  def planes(z: Array) -> Array:
    return jnp.moveaxis(z.astype(jnp.float32).reshape(-1, h, w, c), -1, 1).reshape(-1, h, w)
  a, b = planes(x), planes(y)
  # Local (co)variances as E[z^2] - E[z]^2 cancel catastrophically in float32 when
  # |mean| >> std (flat regions, [0, 255] data): ~1e-4 error in SSIM. They are
  # shift-invariant, so take the moments of plane-mean-centred data instead; the
  # luminance term, which is not, adds the shift back.
  shift_a = jnp.mean(a, axis=(1, 2), keepdims=True)
  shift_b = jnp.mean(b, axis=(1, 2), keepdims=True)
  a, b = a - shift_a, b - shift_b
  # The four local moments filtered in one pass.
  stats = _gaussian_filter_valid(jnp.concatenate([a, b, a * a + b * b, a * b], axis=0), window)
  m_a, m_b, e_sq, e_ab = jnp.split(stats, 4, axis=0)
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  mu_a, mu_b = m_a + shift_a, m_b + shift_b
  luminance = (2.0 * mu_a * mu_b + c1) / (jnp.square(mu_a) + jnp.square(mu_b) + c1)
  var_sum = e_sq - jnp.square(m_a) - jnp.square(m_b)  # sigma_a^2 + sigma_b^2
  covariance = e_ab - m_a * m_b
  contrast_structure = (2.0 * covariance + c2) / (var_sum + c2)
  per_plane = jnp.mean(luminance * contrast_structure, axis=(-2, -1))
  return jnp.mean(per_plane.reshape(*lead, c), axis=-1) if lead else jnp.mean(per_plane)


def codebook_usage(histogram: Array) -> tuple[Array, Array]:
  """Fraction of codes used and perplexity of the empirical code distribution.

  Args:
    histogram: int or float[K], the number of times each of the K codes was chosen.
  Returns:
    (usage, perplexity), float32 scalars: usage = #{k: count_k > 0} / K;
    perplexity = exp(-sum_k p_k log p_k) with p = counts / total, in [1, K]
    (k for a uniform distribution over k codes). Both are 0 for an empty histogram.
  """
  counts = jnp.asarray(histogram).astype(jnp.float32)
  if counts.ndim != 1:
    raise ValueError(f'codebook_usage: expected a [K] histogram, got shape {counts.shape}.')
  total = jnp.sum(counts)
  used = counts > 0
  usage = jnp.mean(used.astype(jnp.float32))
  p = counts / jnp.where(total > 0, total, 1.0)
  # 0 log 0 = 0; the inner where keeps log's gradient/NaN away from unused codes.
  entropy = -jnp.sum(jnp.where(used, p * jnp.log(jnp.where(used, p, 1.0)), 0.0))
  perplexity = jnp.where(total > 0, jnp.exp(entropy), 0.0)
  return usage, perplexity


__all__ = ['codebook_usage', 'psnr', 'ssim']
