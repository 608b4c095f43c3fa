"""Convolutional building blocks shared by the VQ (LlamaGen) and KL (MAR / LDM) autoencoders.

Both descend from taming-transformers' encoder/decoder and use the same blocks:
GroupNorm(32 groups, eps 1e-6) + swish ResNet blocks, single-head spatial
self-attention with 1x1-conv projections, stride-2 convs with asymmetric
(right/bottom) zero padding for downsampling and nearest-neighbour x2 + 3x3
conv for upsampling. Everything here is NHWC.

Submodule names mirror the PyTorch state-dict keys of the public checkpoints,
with list indices joined to the preceding name (`encoder.conv_blocks.0.res.1.
conv1.weight` is `encoder/conv_blocks_0/res_1/conv1/kernel`), so that
`torch_state_dict_to_params` converts any of them with one rule. The two
originals name their levels differently, hence `style`:

  'llamagen': levels `conv_blocks_{k}` holding `res_{j}` / `attn_{j}`; middle
              `mid_0` (res), `mid_1` (attn), `mid_2` (res); decoder levels
              indexed from the lowest resolution.
  'ldm':      levels `down_{i}` / `up_{i}` holding `block_{j}` / `attn_{j}`;
              middle `mid/{block_1, attn_1, block_2}`; decoder levels indexed
              by resolution level (0 = full resolution), as LDM does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

STYLES = ('llamagen', 'ldm')
NUM_GROUPS = 32
NORM_EPS = 1e-6  # Both originals build GroupNorm with eps=1e-6 (torch's default is 1e-5).


def replicated(init: Callable, ndim: int) -> Callable:
  """Logical partitioning metadata meaning "replicated": tokenizer weights are small and frozen."""
  return nn.with_logical_partitioning(init, (None,) * ndim)


# PyTorch's default Conv2d initialisation (kaiming_uniform with a=sqrt(5)), for training from scratch.
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def swish(x: Array) -> Array:
  """x * sigmoid(x), the originals' `nonlinearity`."""
  return x * jax.nn.sigmoid(x)


def normalize_levels(levels: Iterable[int], num_levels: int) -> tuple[int, ...]:
  """Resolution levels with negative indices counted from the lowest resolution (-1 = lowest)."""
  out = []
  for level in levels:
    if not -num_levels <= level < num_levels:
      raise ValueError(f'attention level {level} is out of range for {num_levels} levels.')
    out.append(level % num_levels)
  return tuple(sorted(set(out)))


class Conv(nn.Module):
  """2D convolution, NHWC, HWIO kernel, explicit (low, high) padding per spatial dim."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: tuple[tuple[int, int], tuple[int, int]] | None = None  # None: 'same' for odd kernels.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, Cin] -> [B, H', W', features]."""
    k = self.kernel_size
    kernel = self.param('kernel', replicated(_torch_conv_init, 4),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', replicated(nn.initializers.zeros, 1), (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if k == 1 and self.stride == 1:
      # The attention projections and quant convs are per-pixel matmuls.
      return jnp.einsum('bhwc,cd->bhwd', x, kernel[0, 0]) + bias
    padding = self.padding if self.padding is not None else ((k // 2, k // 2),) * 2
    y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm(32, C, eps=1e-6, affine=True), statistics in float32.

  Written out (rather than nn.GroupNorm) so that the variance is the two-pass
  E[(x - mean)^2] like PyTorch's, which keeps ports within 1e-5 of the original.
  """
  num_groups: int = NUM_GROUPS
  eps: float = NORM_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] with C divisible by num_groups -> same shape, compute dtype."""
    b, h, w, c = x.shape
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {self.num_groups} groups.')
    scale = self.param('scale', replicated(nn.initializers.ones, 1), (c,), self.param_dtype)
    bias = self.param('bias', replicated(nn.initializers.zeros, 1), (c,), self.param_dtype)
    g = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.eps)
    y = g.reshape(b, h, w, c) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class ResnetBlock(nn.Module):
  """norm1, swish, conv1, norm2, swish, dropout, conv2; plus a shortcut (1x1 conv when widths differ)."""
  features: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [B, H, W, Cin] -> [B, H, W, features]; dropout active only when train (rng 'dropout')."""
    kw = dict(dtype=self.dtype)
    h = swish(GroupNorm(name='norm1', **kw)(x))
    h = Conv(self.features, 3, name='conv1', **kw)(h)
    h = swish(GroupNorm(name='norm2', **kw)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.features, 3, name='conv2', **kw)(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, name='nin_shortcut', **kw)(x)
    return x.astype(h.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions with 1x1-conv q/k/v/proj_out, residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype)
    hn = GroupNorm(name='norm', **kw)(x)
    q = Conv(c, 1, name='q', **kw)(hn).reshape(b, h * w, c)
    k = Conv(c, 1, name='k', **kw)(hn).reshape(b, h * w, c)
    v = Conv(c, 1, name='v', **kw)(hn).reshape(b, h * w, c)
    logits = jnp.einsum('bqc,bkc->bqk', q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bqk,bkc->bqc', probs, v).reshape(b, h, w, c)
    out = Conv(c, 1, name='proj_out', **kw)(out)
    return x.astype(out.dtype) + out


class Downsample(nn.Module):
  """Zero-pad one row/column at the bottom/right, then a 3x3 stride-2 valid conv (halves H, W)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H/2, W/2, C]."""
    return Conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), name='conv', dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, 2H, 2W, C]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], 3, name='conv', dtype=self.dtype)(x)


class Level(nn.Module):
  """One resolution level: `num_blocks` ResNet blocks (each then attention if `attn`), then resampling."""
  features: int
  num_blocks: int
  attn: bool
  resample: str  # 'down' | 'up' | 'none'
  block_name: str  # 'res' (LlamaGen) or 'block' (LDM)
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [B, H, W, C] -> [B, H', W', features]."""
    for j in range(self.num_blocks):
      x = ResnetBlock(self.features, self.dropout, self.dtype, name=f'{self.block_name}_{j}')(x, train)
      if self.attn:
        x = AttnBlock(self.dtype, name=f'attn_{j}')(x)
    if self.resample == 'down':
      x = Downsample(self.dtype, name='downsample')(x)
    elif self.resample == 'up':
      x = Upsample(self.dtype, name='upsample')(x)
    return x


class MidBlock(nn.Module):
  """ResNet block, attention, ResNet block at the lowest resolution, LDM's names (`mid.block_1` ...)."""
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: [B, h, w, C] -> same shape."""
    c = x.shape[-1]
    x = ResnetBlock(c, self.dropout, self.dtype, name='block_1')(x, train)
    x = AttnBlock(self.dtype, name='attn_1')(x)
    return ResnetBlock(c, self.dropout, self.dtype, name='block_2')(x, train)


def _mid(x: Array, train: bool, style: str, dropout: float, dtype: Dtype) -> Array:
  """The middle block in either naming (called inside a compact module)."""
  c = x.shape[-1]
  if style == 'llamagen':
    # LlamaGen keeps the middle blocks in an nn.ModuleList: mid.0, mid.1, mid.2.
    x = ResnetBlock(c, dropout, dtype, name='mid_0')(x, train)
    x = AttnBlock(dtype, name='mid_1')(x)
    return ResnetBlock(c, dropout, dtype, name='mid_2')(x, train)
  return MidBlock(dropout, dtype, name='mid')(x, train)


class Encoder(nn.Module):
  """Image -> latent map at stride 2^(len(ch_mult) - 1).

  Attributes:
    ch: base width; level i has ch * ch_mult[i] channels.
    ch_mult: width multipliers, one per resolution level (full resolution first).
    num_res_blocks: ResNet blocks per level.
    out_channels: channels of the output (z_channels, or 2x for a Gaussian posterior).
    attn_levels: levels (0 = full resolution) whose ResNet blocks are followed by attention.
    style: 'llamagen' or 'ldm' (parameter naming only; the computation is identical).
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  out_channels: int
  attn_levels: tuple[int, ...]
  style: str
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """x: float[B, S, S, 3] -> [B, S/f, S/f, out_channels], f = 2^(levels - 1)."""
    n = len(self.ch_mult)
    x = Conv(self.ch, 3, name='conv_in', dtype=self.dtype)(x)
    for i, mult in enumerate(self.ch_mult):
      name = f'conv_blocks_{i}' if self.style == 'llamagen' else f'down_{i}'
      block_name = 'res' if self.style == 'llamagen' else 'block'
      x = Level(self.ch * mult, self.num_res_blocks, i in self.attn_levels,
                'down' if i != n - 1 else 'none', block_name, self.dropout, self.dtype,
                name=name)(x, train)
    x = _mid(x, train, self.style, self.dropout, self.dtype)
    x = swish(GroupNorm(name='norm_out', dtype=self.dtype)(x))
    return Conv(self.out_channels, 3, name='conv_out', dtype=self.dtype)(x)


class Decoder(nn.Module):
  """Latent map -> image, mirroring the encoder.

  Attributes:
    num_res_blocks: ResNet blocks per level, as built (both originals build
      their decoder's `num_res_blocks + 1`; pass that sum here, 3 for VQ-16 / KL-16).
    attn_levels: levels (0 = full resolution) with attention after each ResNet block.
  """
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  out_channels: int
  attn_levels: tuple[int, ...]
  style: str
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array, train: bool = False) -> Array:
    """z: [B, h, w, C] -> [B, h*f, w*f, out_channels] (not clipped)."""
    n = len(self.ch_mult)
    x = Conv(self.ch * self.ch_mult[-1], 3, name='conv_in', dtype=self.dtype)(z)
    x = _mid(x, train, self.style, self.dropout, self.dtype)
    for i in reversed(range(n)):
      # LlamaGen appends levels lowest-resolution first; LDM indexes them by level.
      name = f'conv_blocks_{n - 1 - i}' if self.style == 'llamagen' else f'up_{i}'
      block_name = 'res' if self.style == 'llamagen' else 'block'
      x = Level(self.ch * self.ch_mult[i], self.num_res_blocks, i in self.attn_levels,
                'up' if i != 0 else 'none', block_name, self.dropout, self.dtype,
                name=name)(x, train)
    x = swish(GroupNorm(name='norm_out', dtype=self.dtype)(x))
    return Conv(self.out_channels, 3, name='conv_out', dtype=self.dtype)(x)


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
  """Builds config dataclass `cls` from a (JSON) mapping: lists become tuples, unknown fields raise."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'{cls.__name__}: unknown fields {unknown}; valid: {sorted(names)}.')
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_image_batch(images: Any, image_size: int, what: str) -> None:
  """Raises ValueError unless `images` is float[B, image_size, image_size, 3].

  Only static properties (shape, dtype) are read, so this works on tracers and
  fails before anything is traced into XLA.
  """
  shape = tuple(getattr(images, 'shape', np.shape(images)))
  dtype = getattr(images, 'dtype', None)
  expected = f'float[B, {image_size}, {image_size}, 3] in [-1, 1]'
  if len(shape) != 4:
    raise ValueError(f'{what} expects images {expected}; got an array of shape {shape} '
                     f'({len(shape)} dims instead of 4).')
  if shape[3] != 3:
    raise ValueError(f'{what} expects images {expected}; got shape {shape} with {shape[3]} '
                     'channels instead of 3 (RGB, channels last).')
  if shape[1:3] != (image_size, image_size):
    raise ValueError(f'{what} expects images {expected}; got shape {shape}: spatial size '
                     f'{shape[1]}x{shape[2]} instead of {image_size}x{image_size} (the '
                     "tokenizer config's image_size).")
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{what} expects images {expected}; got dtype {dtype} (convert integer '
                     'pixels to floats in [-1, 1] first).')


def check_grid(array: Any, grid: tuple[int, int], trailing: tuple[int, ...], what: str) -> None:
  """Raises ValueError unless `array` has shape [B, *grid, *trailing] (static shapes only)."""
  shape = tuple(getattr(array, 'shape', np.shape(array)))
  want = (*grid, *trailing)
  if len(shape) != 1 + len(want) or shape[1:] != want:
    dims = ', '.join(str(d) for d in want)
    raise ValueError(f'{what} expects an array of shape [B, {dims}]; got {shape}.')


# --------------------------------------------------------------------------- PyTorch conversion


def torch_key_to_path(key: str) -> tuple[str, ...]:
  """'encoder.conv_blocks.0.res.1.conv1.weight' -> (encoder, conv_blocks_0, res_1, conv1, weight)."""
  out: list[str] = []
  for part in key.split('.'):
    if part.isdigit() and out:
      out[-1] = f'{out[-1]}_{part}'
    else:
      out.append(part)
  return tuple(out)


def _convert_leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Torch leaf name/value -> Flax leaf name/value (OIHW conv -> HWIO, norm weight -> scale, ...)."""
  if name == 'bias':
    return 'bias', value
  if name != 'weight':
    raise KeyError(name)
  if value.ndim == 4:
    return 'kernel', np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:  # nn.Embedding (the codebook).
    return 'embedding', value
  if value.ndim == 1:  # GroupNorm affine weight.
    return 'scale', value
  raise KeyError(name)


def flatten_params(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf}."""
  flat = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      flat.update(flatten_params(v, prefix + (k,)))
    else:
      flat[prefix + (k,)] = v
  return flat


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """{path tuple: leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def torch_state_dict_to_params(state_dict: Mapping[str, Any], expected: Mapping[str, Any], *,
                               ignore: Callable[[str], bool] = lambda key: False,
                               source: str = 'state dict') -> dict[str, Any]:
  """Maps a PyTorch state dict onto a Flax parameter tree of known structure.

  Args:
    state_dict: {torch key: array-like} (numpy arrays or tensors already converted).
    expected: the Flax params tree (ShapeDtypeStructs or arrays) to fill.
    ignore: predicate for keys that are known not to be parameters (buffers,
      training-loss modules); they are skipped.
    source: name of the origin, for error messages.

  Returns:
    Nested dict of float32 numpy arrays with exactly the structure of `expected`.

  Raises:
    ValueError naming every unmapped torch key, every Flax parameter left
    missing, or the first shape mismatch with both shapes.
  """
  want = {'/'.join(p): leaf for p, leaf in flatten_params(expected).items()}
  out: dict[str, np.ndarray] = {}
  unmapped = []
  for key, value in state_dict.items():
    if ignore(key):
      continue
    value = np.asarray(value)
    path = torch_key_to_path(key)
    try:
      leaf, converted = _convert_leaf(path[-1], value)
    except KeyError:
      unmapped.append(f'{key} {tuple(value.shape)}')
      continue
    flax_path = '/'.join(path[:-1] + (leaf,))
    if flax_path not in want:
      unmapped.append(f'{key} {tuple(value.shape)} (would be {flax_path})')
      continue
    if tuple(converted.shape) != tuple(want[flax_path].shape):
      raise ValueError(f'{source}: {key} has shape {tuple(value.shape)}, converted '
                       f'{tuple(converted.shape)}, but the Flax parameter {flax_path} expects '
                       f'{tuple(want[flax_path].shape)}; is the config right?')
    out[flax_path] = np.ascontiguousarray(converted, dtype=np.float32)
  missing = sorted(set(want) - set(out))
  if unmapped or missing:
    lines = []
    if unmapped:
      lines.append(f'{len(unmapped)} {source} keys have no Flax counterpart: ' + ', '.join(unmapped[:20])
                   + (' ...' if len(unmapped) > 20 else ''))
    if missing:
      lines.append(f'{len(missing)} Flax parameters were not found in the {source}: '
                   + ', '.join(missing[:20]) + (' ...' if len(missing) > 20 else ''))
    raise ValueError('; '.join(lines) + '. Is the config (ch, ch_mult, num_res_blocks, ...) right?')
  return unflatten_params({tuple(k.split('/')): v for k, v in out.items()})
