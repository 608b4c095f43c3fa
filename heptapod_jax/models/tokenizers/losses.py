"""Tokenizer training losses: reconstruction, GAN (hinge / non-saturating) and weight schedules.

All functions are pure and jittable. Images are float[B, H, W, C]; discriminator
outputs are logits of any shape (PatchGAN maps [B, H', W', 1]), averaged over
every element. Losses are returned in float32.

Convention note: taming-transformers and LlamaGen scale the discriminator loss
by 0.5 (`0.5 * (loss_real + loss_fake)`); here it is the plain sum, whose
gradients are twice theirs. Adam(W) is invariant to that scale up to its eps,
so with it the two train alike; with plain SGD halve the learning rate.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

RECONSTRUCTION_KINDS = ('l1', 'l2')
GAN_KINDS = ('hinge', 'non_saturating')


def l1_loss(x: Array, y: Array) -> Array:
  """Mean |x - y| per example: float[B, ...] x2 -> float32[B]."""
  d = x.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.mean(jnp.abs(d).reshape(d.shape[0], -1), axis=-1)


def l2_loss(x: Array, y: Array) -> Array:
  """Mean (x - y)^2 per example (F.mse_loss per example): float[B, ...] x2 -> float32[B]."""
  d = x.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.mean(jnp.square(d).reshape(d.shape[0], -1), axis=-1)


def reconstruction_loss(x: Array, y: Array, kind: str = 'l2') -> Array:
  """Per-example reconstruction loss by name ('l1' | 'l2'): float[B, ...] x2 -> float32[B]."""
  if kind == 'l1':
    return l1_loss(x, y)
  if kind == 'l2':
    return l2_loss(x, y)
  raise ValueError(f'reconstruction loss {kind!r}; valid: {list(RECONSTRUCTION_KINDS)}.')


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """mean(relu(1 - real)) + mean(relu(1 + fake)): logits of any shapes -> float32 scalar."""
  real = logits_real.astype(jnp.float32)
  fake = logits_fake.astype(jnp.float32)
  return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))


def hinge_g_loss(logits_fake: Array) -> Array:
  """-mean(fake): the generator side of the hinge GAN; logits of any shape -> float32 scalar."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def non_saturating_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Binary cross-entropy D loss: mean(softplus(-real)) + mean(softplus(fake)) -> float32 scalar.

  softplus(-l) = -log sigmoid(l) and softplus(l) = -log(1 - sigmoid(l)), computed stably.
  """
  real = logits_real.astype(jnp.float32)
  fake = logits_fake.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))


def non_saturating_g_loss(logits_fake: Array) -> Array:
  """mean(softplus(-fake)) = -mean(log sigmoid(fake)) (the -log D trick) -> float32 scalar."""
  return jnp.mean(jax.nn.softplus(-logits_fake.astype(jnp.float32)))


def discriminator_loss(logits_real: Array, logits_fake: Array, kind: str = 'hinge') -> Array:
  """Discriminator loss by name ('hinge' | 'non_saturating') -> float32 scalar."""
  if kind == 'hinge':
    return hinge_d_loss(logits_real, logits_fake)
  if kind == 'non_saturating':
    return non_saturating_d_loss(logits_real, logits_fake)
  raise ValueError(f'discriminator loss {kind!r}; valid: {list(GAN_KINDS)}.')


def generator_loss(logits_fake: Array, kind: str = 'hinge') -> Array:
  """Generator adversarial loss by name ('hinge' | 'non_saturating') -> float32 scalar."""
  if kind == 'hinge':
    return hinge_g_loss(logits_fake)
  if kind == 'non_saturating':
    return non_saturating_g_loss(logits_fake)
  raise ValueError(f'generator loss {kind!r}; valid: {list(GAN_KINDS)}.')


def adversarial_weight(step: Array | int, start_step: int, weight: float) -> Array:
  """`weight` from `start_step` on, 0 before (taming's adopt_weight); jittable in `step`.

  Args:
    step: current training step (int or int array, may be traced).
    start_step: first step at which the GAN terms are on.
    weight: their weight from then on.
  Returns:
    float32 scalar (or step's shape).
  """
  return jnp.where(jnp.asarray(step) >= start_step, jnp.float32(weight), jnp.float32(0.0))


def _global_norm(tree: Any) -> Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def adaptive_weight(rec_grads: Any, gan_grads: Any, max_weight: float = 1e4,
                    eps: float = 1e-4) -> Array:
  """taming's `calculate_adaptive_weight`: ||grad rec|| / (||grad gan|| + eps), clipped, frozen.

  Args:
    rec_grads, gan_grads: gradients (arrays or pytrees) of the reconstruction
      (+ perceptual) loss and of the generator adversarial loss with respect to
      the same parameters, usually the decoder's last layer.
    max_weight: upper clip (taming: 1e4).
    eps: added to the GAN gradient norm (taming: 1e-4).
  Returns:
    float32 scalar in [0, max_weight], wrapped in stop_gradient.
  """
  w = _global_norm(rec_grads) / (_global_norm(gan_grads) + eps)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


__all__ = ['GAN_KINDS', 'RECONSTRUCTION_KINDS', 'adaptive_weight', 'adversarial_weight',
           'discriminator_loss', 'generator_loss', 'hinge_d_loss', 'hinge_g_loss', 'l1_loss',
           'l2_loss', 'non_saturating_d_loss', 'non_saturating_g_loss', 'reconstruction_loss']
