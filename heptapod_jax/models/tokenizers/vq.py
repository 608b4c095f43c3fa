"""LlamaGen's VQ tokenizer (VQ-16: 16384 codes of dimension 8, stride 16) in Flax Linen, NHWC.

Architecture and parameter names follow LlamaGen's `tokenizer_image/vq_model.py`
(`VQ_16`): a taming-style encoder (attention after every ResNet block of the
lowest-resolution level and in the middle block), a 1x1 `quant_conv` down to
the 8-dim code space, a nearest-code quantizer with l2-normalised codes and
inputs (cosine similarity), a 1x1 `post_quant_conv` and a decoder with one more
ResNet block per level than the encoder. `tools/convert_llamagen_vq.py` imports
the released `vq_ds16_c2i.pt` into this module's parameter tree.

`VQModel` is the trainable module (losses, straight-through estimator, code
histogram); `VQTokenizer` is the frozen, pure view the AR trainer uses.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from heptapod_jax.models.layers import dtype_of
from heptapod_jax.models.tokenizers import autoencoder as ae

Array = jax.Array
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """Sizes and loss weights of the VQ autoencoder; defaults are LlamaGen's VQ-16.

  Attributes:
    image_size: side S of the square input images (any multiple of the stride
      works for the convolutions; this fixes what the tokenizer accepts).
    ch: base width; level i has ch * ch_mult[i] channels (multiples of 32 for GroupNorm).
    ch_mult: width multipliers per resolution level; stride = 2^(len - 1).
    num_res_blocks: ResNet blocks per encoder level.
    dec_num_res_blocks: ResNet blocks per decoder level as built (LlamaGen's
      decoder builds `num_res_blocks + 1` = 3).
    z_channels: encoder output / decoder input width.
    codebook_size, codebook_embed_dim: the codebook is [codebook_size, codebook_embed_dim].
    codebook_l2_norm: l2-normalise codes and encoder outputs before the nearest-code search.
    commit_beta: weight of the commitment loss ||z - sg(q)||^2.
    entropy_loss_weight: weight of LlamaGen's entropy loss (0 = off, LlamaGen's default).
    entropy_temperature: softmax temperature of the entropy loss's code affinities.
    dropout: dropout in the ResNet blocks (train only).
    dtype: compute dtype of the convolutions ('float32' | 'bfloat16' | 'float16');
      normalisation statistics, attention softmax and quantisation stay float32.
  """
  image_size: int = 256
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  dec_num_res_blocks: int = 3
  z_channels: int = 256
  codebook_size: int = 16384
  codebook_embed_dim: int = 8
  codebook_l2_norm: bool = True
  commit_beta: float = 0.25
  entropy_loss_weight: float = 0.0
  entropy_temperature: float = 0.01
  dropout: float = 0.0
  dtype: str = 'float32'

  # Fields that determine the parameter tree or the meaning of the weights.
  ARCH_FIELDS: ClassVar[tuple[str, ...]] = (
      'ch', 'ch_mult', 'num_res_blocks', 'dec_num_res_blocks', 'z_channels', 'codebook_size',
      'codebook_embed_dim', 'codebook_l2_norm')

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    if not self.ch_mult or any(m < 1 for m in self.ch_mult):
      raise ValueError(f'VQConfig.ch_mult={self.ch_mult}: need at least one positive multiplier.')
    for m in self.ch_mult:
      if (self.ch * m) % ae.NUM_GROUPS:
        raise ValueError(f'VQConfig.ch={self.ch} x ch_mult {m} = {self.ch * m} channels is not '
                         f'divisible by the {ae.NUM_GROUPS} GroupNorm groups.')
    if self.image_size < 1 or self.image_size % self.downsample_factor:
      raise ValueError(f'VQConfig.image_size={self.image_size} is not a positive multiple of the '
                       f'stride {self.downsample_factor} (2^(len(ch_mult) - 1)).')
    for name in ('num_res_blocks', 'dec_num_res_blocks', 'z_channels', 'codebook_size',
                 'codebook_embed_dim'):
      if getattr(self, name) < 1:
        raise ValueError(f'VQConfig.{name}={getattr(self, name)} must be >= 1.')
    if self.z_channels % ae.NUM_GROUPS:
      raise ValueError(f'VQConfig.z_channels={self.z_channels} must be divisible by {ae.NUM_GROUPS}.')
    if self.dtype not in DTYPES:
      raise ValueError(f'VQConfig.dtype={self.dtype!r}; valid: {list(DTYPES)}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'VQConfig.dropout={self.dropout} must be in [0, 1).')
    if self.entropy_temperature <= 0:
      raise ValueError(f'VQConfig.entropy_temperature={self.entropy_temperature} must be > 0.')

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def grid_size(self) -> tuple[int, int]:
    side = self.image_size // self.downsample_factor
    return side, side

  def architecture(self) -> dict[str, Any]:
    """The ARCH_FIELDS and their values (two configs with equal ones share checkpoints)."""
    return {name: getattr(self, name) for name in self.ARCH_FIELDS}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'VQConfig':
    """Builds a VQConfig from a (JSON) mapping; unknown fields raise ValueError naming them."""
    return ae.config_from_dict(cls, d)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def entropy_loss(affinity: Array, temperature: float) -> Array:
  """LlamaGen's `compute_entropy_loss`: mean per-token entropy minus entropy of the mean.

  Minimising it makes each token confident (low sample entropy) while spreading
  the batch over the codebook (high average entropy). affinity: float32[N, K] (= -distance).
  """
  logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
  avg_probs = probs.mean(axis=0)
  avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy


def _codebook_init(l2_norm: bool):
  """LlamaGen's init: uniform(-1/K, 1/K), then l2-normalised rows when l2_norm."""

  def init(key, shape, dtype=jnp.float32):
    table = jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])
    return l2_normalize(table) if l2_norm else table

  return init


class Codebook(nn.Module):
  """Holds the [K, D] code table (named like nn.Embed, `embedding/embedding`)."""
  num_codes: int
  dim: int
  l2_norm: bool

  @nn.compact
  def __call__(self) -> Array:
    return self.param('embedding', ae.replicated(_codebook_init(self.l2_norm), 2),
                      (self.num_codes, self.dim), jnp.float32)


class VectorQuantizer(nn.Module):
  """Nearest-code quantisation with straight-through gradients and LlamaGen's losses."""
  num_codes: int
  dim: int
  l2_norm: bool = True
  beta: float = 0.25
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01

  def setup(self):
    self.embedding = Codebook(self.num_codes, self.dim, self.l2_norm)

  def codes(self) -> Array:
    """The code table as used for lookup: float32[K, D] (l2-normalised rows when l2_norm)."""
    table = self.embedding().astype(jnp.float32)
    return l2_normalize(table) if self.l2_norm else table

  def __call__(self, z: Array) -> tuple[Array, dict[str, Array]]:
    """z: float[B, h, w, D] -> (quantised float32[B, h, w, D] with straight-through gradient, aux).

    aux: 'indices' int32[B, h, w]; 'histogram' int32[K] (code counts of this
    batch); 'codebook_loss' mean||q - sg(z)||^2; 'commitment_loss'
    beta * mean||sg(q) - z||^2; 'entropy_loss' (weighted; 0 when off);
    'perplexity' exp(entropy of the batch's code distribution); 'usage'
    (fraction of codes used by this batch). Losses are float32 scalars,
    computed on the l2-normalised z when l2_norm, as LlamaGen does.
    """
    z = z.astype(jnp.float32)
    table = self.codes()
    if self.l2_norm:
      z = l2_normalize(z)
    flat = z.reshape(-1, self.dim)
    # ||z||^2 + ||e||^2 - 2 z.e, LlamaGen's formula (same argmin ties); HIGHEST precision so that
    # bf16 matmul passes on TPU cannot flip the nearest code.
    dots = jnp.dot(flat, table.T, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(jnp.square(flat), 1, keepdims=True) + jnp.sum(jnp.square(table), 1) - 2.0 * dots
    indices = jnp.argmin(dist, axis=1).astype(jnp.int32)
    quantized = jnp.take(table, indices, axis=0).reshape(z.shape)
    codebook_loss = jnp.mean(jnp.square(quantized - jax.lax.stop_gradient(z)))
    commitment_loss = self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(quantized) - z))
    if self.entropy_weight > 0.0:
      ent = self.entropy_weight * entropy_loss(-dist, self.entropy_temperature)
    else:
      ent = jnp.zeros((), jnp.float32)
    quantized = z + jax.lax.stop_gradient(quantized - z)
    histogram = jnp.bincount(indices, length=self.num_codes).astype(jnp.int32)
    freq = histogram.astype(jnp.float32) / indices.shape[0]
    perplexity = jnp.exp(-jnp.sum(jnp.where(freq > 0, freq * jnp.log(jnp.maximum(freq, 1e-30)), 0.0)))
    aux = dict(
        indices=indices.reshape(z.shape[:-1]),
        histogram=histogram,
        codebook_loss=codebook_loss,
        commitment_loss=commitment_loss,
        entropy_loss=ent,
        perplexity=perplexity,
        usage=jnp.mean((histogram > 0).astype(jnp.float32)),
    )
    return quantized, aux

  def lookup(self, indices: Array) -> Array:
    """int[B, h, w] -> float32[B, h, w, D] code vectors."""
    return jnp.take(self.codes(), indices.astype(jnp.int32), axis=0)


class VQModel(nn.Module):
  """LlamaGen's VQModel. Parameter tree: encoder, quant_conv, quantize, post_quant_conv, decoder."""
  config: VQConfig

  def setup(self):
    c = self.config
    dtype = dtype_of(c.dtype)
    lowest = (len(c.ch_mult) - 1,)  # LlamaGen: attention only at the lowest resolution.
    self.encoder = ae.Encoder(c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, lowest, 'llamagen',
                              c.dropout, dtype)
    self.decoder = ae.Decoder(c.ch, c.ch_mult, c.dec_num_res_blocks, 3, lowest, 'llamagen',
                              c.dropout, dtype)
    self.quant_conv = ae.Conv(c.codebook_embed_dim, 1, dtype=dtype)
    self.post_quant_conv = ae.Conv(c.z_channels, 1, dtype=dtype)
    self.quantize = VectorQuantizer(c.codebook_size, c.codebook_embed_dim, c.codebook_l2_norm,
                                    c.commit_beta, c.entropy_loss_weight, c.entropy_temperature)

  def encode_latents(self, images: Array, train: bool = False) -> Array:
    """images: float[B, S, S, 3] in [-1, 1] -> pre-quantisation latents float32[B, h, w, D]."""
    h = self.encoder(images, train)
    return self.quant_conv(h).astype(jnp.float32)

  def encode(self, images: Array, train: bool = False) -> tuple[Array, Array, dict[str, Array]]:
    """images: float[B, S, S, 3] in [-1, 1] -> (quantized f32[B, h, w, D], indices i32[B, h, w], aux)."""
    quantized, aux = self.quantize(self.encode_latents(images, train))
    return quantized, aux['indices'], aux

  def decode(self, quantized: Array, train: bool = False) -> Array:
    """quantized: float[B, h, w, D] -> reconstruction float32[B, S, S, 3] (not clipped)."""
    h = self.post_quant_conv(quantized.astype(jnp.float32))
    return self.decoder(h, train).astype(jnp.float32)

  def decode_code(self, indices: Array) -> Array:
    """indices: int[B, h, w] -> reconstruction float32[B, S, S, 3] (not clipped)."""
    return self.decode(self.quantize.lookup(indices))

  def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """images: float[B, S, S, 3] in [-1, 1] -> (reconstruction float32[B, S, S, 3], aux).

    aux holds the quantizer's entries (see VectorQuantizer) plus 'loss' =
    codebook_loss + commitment_loss + entropy_loss (LlamaGen's VQ part of the
    objective; the trainer adds reconstruction / perceptual / GAN terms). With
    train=True and dropout > 0, pass rngs={'dropout': key}.
    """
    quantized, _, aux = self.encode(images, train)
    recon = self.decode(quantized, train)
    aux = dict(aux, loss=aux['codebook_loss'] + aux['commitment_loss'] + aux['entropy_loss'])
    return recon, aux


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: VQConfig, rng: Array) -> dict[str, Any]:
  """Fresh parameters (plain arrays, partitioning metadata removed) for `config` (jitted)."""
  # The smallest input with a 1x1 latent: the convolutions do not depend on the size, and the
  # init compiles faster.
  side = config.downsample_factor
  images = jnp.zeros((1, side, side, 3), jnp.float32)
  return nn.unbox(VQModel(config).init(rng, images)['params'])


def abstract_params(config: VQConfig) -> dict[str, Any]:
  """The parameter tree of `config` as jax.ShapeDtypeStructs (nothing is computed)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def _variables(params: Any) -> dict[str, Any]:
  """Accepts either the params tree or a {'params': ...} variables dict."""
  if isinstance(params, Mapping) and 'params' in params:
    return dict(params)
  return {'params': params}


@dataclasses.dataclass(frozen=True)
class VQTokenizer:
  """Frozen VQ tokenizer behind the project's tokenizer contract (hashable, so usable as a static arg).

  All methods are pure functions of (params, inputs) and jittable; `params` is
  the VQModel params tree (as `io.load_tokenizer` returns it).
  """
  config: VQConfig

  @property
  def module(self) -> VQModel:
    return VQModel(self.config)

  @property
  def image_size(self) -> int:
    return self.config.image_size

  @property
  def grid_size(self) -> tuple[int, int]:
    return self.config.grid_size

  @property
  def vocab_size(self) -> int:
    return self.config.codebook_size

  def init_params(self, rng: Array) -> dict[str, Any]:
    """Fresh random parameters."""
    return init_params(self.config, rng)

  def check_images(self, images: Any) -> None:
    """Raises ValueError (naming expected and given shape) unless images is float[B, S, S, 3]."""
    ae.check_image_batch(images, self.config.image_size, 'VQ tokenizer')

  def encode_to_indices(self, params: Any, images: Array) -> Array:
    """images: float[B, S, S, 3] in [-1, 1] -> int32[B, h, w] code indices."""
    self.check_images(images)
    _, indices, _ = self.module.apply(_variables(params), images, method=VQModel.encode)
    return indices

  def decode_from_indices(self, params: Any, indices: Array) -> Array:
    """indices: int[B, h, w] -> float32[B, S, S, 3] clipped to [-1, 1]."""
    ae.check_grid(indices, self.grid_size, (), 'VQ tokenizer decode_from_indices')
    images = self.module.apply(_variables(params), indices, method=VQModel.decode_code)
    return jnp.clip(images, -1.0, 1.0)
