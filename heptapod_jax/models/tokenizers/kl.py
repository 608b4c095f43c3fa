"""MAR's KL-16 VAE (LDM's AutoencoderKL with 16 latent channels, stride 16) in Flax Linen, NHWC.

Architecture and parameter names follow MAR's `models/vae.py`: LDM's encoder
(attention after each ResNet block of the 16x16 level of a 256 input, i.e. the
lowest-resolution level, plus the middle block; `double_z` so that it predicts
mean and log-variance), a 1x1 `quant_conv` on the moments, a 1x1
`post_quant_conv` on the latents and LDM's decoder (attention only in the middle
block, `num_res_blocks + 1` ResNet blocks per level). The posterior is LDM's
DiagonalGaussianDistribution with logvar clipped to [-30, 20].
`tools/convert_mar_kl.py` imports MAR's released `kl16.ckpt`.

Note MAR feeds its generator `latents * 0.2325` (its `vae_scale`); that scaling
belongs to the caller, not to this module.
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
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp.


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """Sizes of the KL autoencoder; defaults are MAR's KL-16.

  Attributes:
    image_size: side S of the square input images the tokenizer accepts.
    ch, ch_mult: level i has ch * ch_mult[i] channels; stride = 2^(len(ch_mult) - 1).
    num_res_blocks: ResNet blocks per encoder level.
    dec_num_res_blocks: ResNet blocks per decoder level as built (LDM builds
      `num_res_blocks + 1` = 3).
    embed_dim: latent channels (MAR's `vae_embed_dim`; also LDM's z_channels here).
    double_z: the encoder outputs 2 * embed_dim channels (mean and logvar moments).
    encoder_attn_levels: encoder levels (0 = full resolution, negative counts
      from the lowest) with attention after each ResNet block. LDM places it
      where the resolution of a 256 input is 16, which is level 4 (= -1) of KL-16.
    decoder_attn_levels: the same for the decoder (none in KL-16).
    dropout: dropout in the ResNet blocks (train only).
    dtype: compute dtype ('float32' | 'bfloat16' | 'float16'); norms, softmax,
      and the posterior stay float32.
  """
  image_size: int = 256
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  dec_num_res_blocks: int = 3
  embed_dim: int = 16
  double_z: bool = True
  encoder_attn_levels: tuple[int, ...] = (-1,)
  decoder_attn_levels: tuple[int, ...] = ()
  dropout: float = 0.0
  dtype: str = 'float32'

  ARCH_FIELDS: ClassVar[tuple[str, ...]] = (
      'ch', 'ch_mult', 'num_res_blocks', 'dec_num_res_blocks', 'embed_dim', 'double_z',
      'encoder_attn_levels', 'decoder_attn_levels')

  def __post_init__(self):
    for name in ('ch_mult', 'encoder_attn_levels', 'decoder_attn_levels'):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    if not self.ch_mult or any(m < 1 for m in self.ch_mult):
      raise ValueError(f'KLConfig.ch_mult={self.ch_mult}: need at least one positive multiplier.')
    for m in self.ch_mult:
      if (self.ch * m) % ae.NUM_GROUPS:
        raise ValueError(f'KLConfig.ch={self.ch} x ch_mult {m} = {self.ch * m} channels is not '
                         f'divisible by the {ae.NUM_GROUPS} GroupNorm groups.')
    if self.image_size < 1 or self.image_size % self.downsample_factor:
      raise ValueError(f'KLConfig.image_size={self.image_size} is not a positive multiple of the '
                       f'stride {self.downsample_factor} (2^(len(ch_mult) - 1)).')
    for name in ('num_res_blocks', 'dec_num_res_blocks', 'embed_dim'):
      if getattr(self, name) < 1:
        raise ValueError(f'KLConfig.{name}={getattr(self, name)} must be >= 1.')
    for name in ('encoder_attn_levels', 'decoder_attn_levels'):
      try:
        ae.normalize_levels(getattr(self, name), len(self.ch_mult))
      except ValueError as e:
        raise ValueError(f'KLConfig.{name}={getattr(self, name)}: {e}') from None
    if self.dtype not in DTYPES:
      raise ValueError(f'KLConfig.dtype={self.dtype!r}; valid: {list(DTYPES)}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'KLConfig.dropout={self.dropout} must be in [0, 1).')

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def grid_size(self) -> tuple[int, int]:
    side = self.image_size // self.downsample_factor
    return side, side

  def architecture(self) -> dict[str, Any]:
    """The ARCH_FIELDS, attention levels made non-negative (so (-1,) equals (4,) for 5 levels)."""
    out = {name: getattr(self, name) for name in self.ARCH_FIELDS}
    for name in ('encoder_attn_levels', 'decoder_attn_levels'):
      out[name] = ae.normalize_levels(out[name], len(self.ch_mult))
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'KLConfig':
    """Builds a KLConfig from a (JSON) mapping; unknown fields raise ValueError naming them."""
    return ae.config_from_dict(cls, d)


class KLModel(nn.Module):
  """MAR's AutoencoderKL. Parameter tree: encoder, quant_conv, post_quant_conv, decoder."""
  config: KLConfig

  def setup(self):
    c = self.config
    dtype = dtype_of(c.dtype)
    n = len(c.ch_mult)
    moments = 2 * c.embed_dim if c.double_z else c.embed_dim
    self.encoder = ae.Encoder(c.ch, c.ch_mult, c.num_res_blocks, moments,
                              ae.normalize_levels(c.encoder_attn_levels, n), 'ldm', c.dropout, dtype)
    self.decoder = ae.Decoder(c.ch, c.ch_mult, c.dec_num_res_blocks, 3,
                              ae.normalize_levels(c.decoder_attn_levels, n), 'ldm', c.dropout, dtype)
    self.quant_conv = ae.Conv(2 * c.embed_dim, 1, dtype=dtype)
    self.post_quant_conv = ae.Conv(c.embed_dim, 1, dtype=dtype)

  def encode(self, images: Array, train: bool = False) -> tuple[Array, Array]:
    """images: float[B, S, S, 3] in [-1, 1] -> (mean, logvar), float32[B, h, w, embed_dim] each.

    logvar is clipped to [-30, 20] like LDM's DiagonalGaussianDistribution.
    """
    moments = self.quant_conv(self.encoder(images, train)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: Array, train: bool = False) -> Array:
    """latents: float[B, h, w, embed_dim] -> reconstruction float32[B, S, S, 3] (not clipped)."""
    h = self.post_quant_conv(latents.astype(jnp.float32))
    return self.decoder(h, train).astype(jnp.float32)

  def __call__(self, images: Array, rng: Array | None = None,
               train: bool = False) -> tuple[Array, dict[str, Array]]:
    """images: float[B, S, S, 3] -> (reconstruction float32[B, S, S, 3], aux).

    With `rng` the decoder sees a posterior sample mean + exp(logvar / 2) * eps,
    without it the mean (the posterior's mode). aux: 'mean', 'logvar',
    'latents' float32[B, h, w, embed_dim] and 'kl' float32[B], LDM's KL to
    N(0, I) summed over h, w, channels. Dropout (train, dropout > 0) needs
    rngs={'dropout': key}.
    """
    mean, logvar = self.encode(images, train)
    latents = mean if rng is None else sample_latents(mean, logvar, rng)
    recon = self.decode(latents, train)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    return recon, dict(mean=mean, logvar=logvar, latents=latents, kl=kl)


def sample_latents(mean: Array, logvar: Array, rng: Array) -> Array:
  """A sample of the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: KLConfig, rng: Array) -> dict[str, Any]:
  """Fresh parameters (plain arrays, partitioning metadata removed) for `config` (jitted)."""
  # The smallest input with a 1x1 latent: the convolutions do not depend on the size, and the
  # init compiles faster.
  side = config.downsample_factor
  images = jnp.zeros((1, side, side, 3), jnp.float32)
  return nn.unbox(KLModel(config).init(rng, images)['params'])


def abstract_params(config: KLConfig) -> dict[str, Any]:
  """The parameter tree of `config` as jax.ShapeDtypeStructs (nothing is computed)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def _variables(params: Any) -> dict[str, Any]:
  """Accepts either the params tree or a {'params': ...} variables dict."""
  if isinstance(params, Mapping) and 'params' in params:
    return dict(params)
  return {'params': params}


@dataclasses.dataclass(frozen=True)
class KLTokenizer:
  """Frozen continuous tokenizer (hashable, so usable as a static arg); pure, jittable methods.

  `params` is the KLModel params tree (as `io.load_tokenizer` returns it).
  """
  config: KLConfig

  @property
  def module(self) -> KLModel:
    return KLModel(self.config)

  @property
  def image_size(self) -> int:
    return self.config.image_size

  @property
  def grid_size(self) -> tuple[int, int]:
    return self.config.grid_size

  @property
  def latent_channels(self) -> int:
    return self.config.embed_dim

  def init_params(self, rng: Array) -> dict[str, Any]:
    """Fresh random parameters."""
    return init_params(self.config, rng)

  def check_images(self, images: Any) -> None:
    """Raises ValueError (naming expected and given shape) unless images is float[B, S, S, 3]."""
    ae.check_image_batch(images, self.config.image_size, 'KL tokenizer')

  def encode(self, params: Any, images: Array) -> tuple[Array, Array]:
    """images: float[B, S, S, 3] in [-1, 1] -> (mean, logvar) float32[B, h, w, latent_channels]."""
    self.check_images(images)
    return self.module.apply(_variables(params), images, method=KLModel.encode)

  def decode(self, params: Any, latents: Array) -> Array:
    """latents: float[B, h, w, latent_channels] -> float32[B, S, S, 3] clipped to [-1, 1]."""
    ae.check_grid(latents, self.grid_size, (self.latent_channels,), 'KL tokenizer decode')
    images = self.module.apply(_variables(params), latents, method=KLModel.decode)
    return jnp.clip(images, -1.0, 1.0)

  @staticmethod
  def sample(mean: Array, logvar: Array, rng: Array) -> Array:
    """A posterior sample (see `sample_latents`)."""
    return sample_latents(mean, logvar, rng)
