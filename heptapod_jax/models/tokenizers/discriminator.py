"""PatchGAN discriminator (taming-transformers' NLayerDiscriminator, as LlamaGen uses it), NHWC.

Layout for n_layers=3, ndf=64 (k4 = 4x4 conv, padding 1 on every side):

  k4/2  3 -> 64, bias               LeakyReLU(0.2)
  k4/2  64 -> 128,  norm             LeakyReLU(0.2)
  k4/2  128 -> 256, norm             LeakyReLU(0.2)
  k4/1  256 -> 512, norm             LeakyReLU(0.2)
  k4/1  512 -> 1, bias              (logits)

Widths are ndf * min(2^n, 8). A 256x256 image gives a 30x30 logit map, 32x32 gives 2x2;
each logit judges one receptive-field patch (70x70 pixels for n_layers=3).

Normalisation. taming (and LlamaGen after it) uses BatchNorm2d, which carries
running statistics and, in training mode, couples every sample of a batch and
(unless synchronised) depends on how the batch is split over devices. This
module is used inside a pure-functional, sharded JAX trainer, so the default is
GroupNorm ('group'): per-sample statistics, no mutable state, identical in
training and evaluation, and independent of the sharding, while still
normalising activations as BatchNorm did (so taming's learning rates and
weights carry over better than with no normalisation). 'none' drops it
altogether (StyleGAN-like; the formerly normalised convs then get biases).
As in taming, convs followed by a normalisation have no bias (its affine shift
makes a bias redundant).

Initialisation follows taming's `weights_init`: conv kernels ~ N(0, 0.02), conv
biases 0, norm scale ~ N(1, 0.02), norm shift 0. All parameters carry
"replicated" logical-partitioning metadata (unbox with `nn.meta.unbox`); the
discriminator is small (2.8M parameters at ndf=64).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

NORMS = ('group', 'none')
MAX_GROUPS = 32
GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default.
LEAKY_SLOPE = 0.2
INIT_STD = 0.02


def _replicated(init: Callable, ndim: int) -> Callable:
  """Logical partitioning metadata meaning "replicated" (None on every axis)."""
  return nn.with_logical_partitioning(init, (None,) * ndim)


def _normal_around(mean: float, std: float) -> Callable:
  """N(mean, std^2) initialiser (taming initialises norm scales as N(1, 0.02))."""
  def init(key: Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> Array:
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
  """Largest group count <= max_groups dividing `channels` (32 for the default widths)."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


class PatchConv(nn.Module):
  """4x4 conv with padding 1 on every side (torch Conv2d(k=4, padding=1)), NHWC / HWIO."""
  features: int
  stride: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, Cin] -> [B, (H + 2 - 4) // stride + 1, (W + 2 - 4) // stride + 1, features]."""
    kernel = self.param('kernel', _replicated(nn.initializers.normal(INIT_STD), 4),
                        (4, 4, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', _replicated(nn.initializers.zeros, 1), (self.features,),
                        jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


class GroupNorm(nn.Module):
  """GroupNorm with float32 statistics (two-pass variance) and a per-channel affine."""
  eps: float = GROUP_NORM_EPS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> same shape, `dtype`; statistics per sample and group."""
    b, h, w, c = x.shape
    g = num_groups(c)
    scale = self.param('scale', _replicated(_normal_around(1.0, INIT_STD), 1), (c,), jnp.float32)
    bias = self.param('bias', _replicated(nn.initializers.zeros, 1), (c,), jnp.float32)
    z = x.astype(jnp.float32).reshape(b, h, w, g, c // g)
    mean = z.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(z - mean).mean(axis=(1, 2, 4), keepdims=True)
    z = ((z - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (z * scale + bias).astype(self.dtype)


class PatchDiscriminator(nn.Module):
  """taming's NLayerDiscriminator with a stateless normalisation (see the module docstring).

  Attributes:
    ndf: width of the first conv; later widths are ndf * min(2^n, 8).
    n_layers: number of stride-2 convs (the first included); 3 in taming / LlamaGen.
    norm: 'group' (GroupNorm, default) or 'none'.
    dtype: compute dtype of the convs; norm statistics and the output are float32.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = 'group'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: float[B, H, W, C] (images in [-1, 1]) -> float32[B, H', W', 1] patch logits.

    H' = H / 2^n_layers - 2 for H divisible by 2^n_layers (30 for 256, 2 for 32).
    """
    if self.norm not in NORMS:
      raise ValueError(f'discriminator norm={self.norm!r}; valid: {list(NORMS)}.')
    if self.n_layers < 1:
      raise ValueError(f'discriminator n_layers={self.n_layers} must be >= 1.')
    normed = self.norm != 'none'
    kw = dict(dtype=self.dtype)
    h = PatchConv(self.ndf, 2, use_bias=True, name='conv_0', **kw)(x)
    h = nn.leaky_relu(h, LEAKY_SLOPE)
    # Layers 1..n_layers-1 stride 2, then one stride-1 layer at width ndf * min(2^n_layers, 8).
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      h = PatchConv(self.ndf * min(2 ** n, 8), stride, use_bias=not normed, name=f'conv_{n}',
                    **kw)(h)
      if normed:
        h = GroupNorm(name=f'norm_{n}', **kw)(h)
      h = nn.leaky_relu(h, LEAKY_SLOPE)
    logits = PatchConv(1, 1, use_bias=True, name=f'conv_{self.n_layers + 1}', **kw)(h)
    return logits.astype(jnp.float32)


__all__ = ['NORMS', 'PatchDiscriminator', 'num_groups']
