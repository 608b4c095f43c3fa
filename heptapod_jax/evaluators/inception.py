"""Inception-v3 in its FID variant (pytorch-fid's `fid_inception_v3`), in Flax Linen.

This is the network of TensorFlow's 2015-12-05 Inception graph (the one the
original FID, IS and the ADM evaluator's sFID use) as pytorch-fid ports it. It
differs from torchvision's / Keras' Inception-v3 in four ways:

  * the average-pool branch of the A, C and first E blocks (Mixed_5b-5d,
    Mixed_6b-6e, Mixed_7b) ignores the zero padding (`count_include_pad=False`);
  * the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool;
  * the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused ones);
  * there is no auxiliary classifier.

Every convolution is conv (no bias) -> batch norm (inference, eps 0.001) -> ReLU.
Module names follow torchvision (`Mixed_6d/branch1x1/conv/kernel`, `.../bn/mean`),
so `heptapod_jax.tools.convert_inception` maps pytorch-fid's weight file
(pt_inception-2015-12-05-6726825d.pth) key by key.

Input: images [B, H, W, 3], NHWC, RGB, uint8 or float with values in [0, 255].
How they become the network's 299x299 input in [-1, 1] is the `preprocessing`
choice (of `preprocess`, `FIDInceptionV3`, `load_inception`, `InceptionFeatures`):

  * 'pytorch_fid' (default): as pytorch-fid: x / 255, bilinear resize to 299x299
    with half-pixel centres (`F.interpolate(mode='bilinear', align_corners=False)`,
    no antialiasing, also when downsampling), then 2x - 1.
  * 'adm': as the TF 2015-12-05 graph that the ADM evaluator (openai/guided-diffusion
    `evaluations/evaluator.py`) runs. ADM feeds float images in [0, 255] at the
    graph's `ExpandDims:0`; the graph then applies TF1's legacy `ResizeBilinear` to
    299x299 (align_corners=False, half_pixel_centers=False: source coordinate
    dst * in_size / out_size, upper neighbour clamped to the last row / column, no
    antialiasing) and `Sub 128`, `Mul 1/128`, i.e. (x - 128) / 128.
    `tf_legacy_resize_bilinear` reimplements that resize in JAX.

Which one to use:
  * 'adm' to compare against the ADM evaluator's reference batches (e.g.
    VIRTUAL_imagenet256_labeled.npz: mu, sigma, mu_s, sigma_s), whose statistics
    were made by the TF graph. The legacy resize samples up to half a source pixel
    away from the half-pixel one, so the network sees different pixels and FID /
    sFID against those statistics shift with 'pytorch_fid'.
  * 'pytorch_fid' to reproduce numbers computed with pytorch-fid.
  * Either is consistent when the reference and the sample statistics are both
    computed here with the same choice.
The weights are the same in both modes (pytorch-fid's weights are a port of the TF
graph's); only the input pipeline differs.

Output: a dict of float32 arrays
  'pool':    [B, 2048]  pool3 features (global average pool after Mixed_7c), for FID;
  'spatial': [B, 2023]  sFID features: the first 7 channels of the 1x1 branch of
             Mixed_6d (TF `mixed_6/conv:0`, after BN + ReLU), [B, 17, 17, 7]
             flattened in (h, w, c) order as the ADM evaluator does;
  'logits':  [B, 1008]  classifier logits on the pool features (IS uses their softmax).

Weights are never downloaded: convert pytorch-fid's file once with
`python -m heptapod_jax.tools.convert_inception --src ... --dst inception_fid.npz`,
then `load_inception(path)` or `InceptionFeatures(path)`.

All convolutions and matmuls run at `Precision.HIGHEST` in float32, so features
do not depend on the platform's default (TF32 / bf16-pass) precision.
"""
from __future__ import annotations

import functools
import os
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths

Array = jax.Array

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
BN_EPSILON = 1e-3
OUTPUT_KEYS = ('pool', 'spatial', 'logits')
COLLECTIONS = ('params', 'batch_stats')

PREPROCESSING_CHOICES = ('pytorch_fid', 'adm')

_HIGHEST = jax.lax.Precision.HIGHEST


def _check_preprocessing(preprocessing: str) -> str:
  if not isinstance(preprocessing, str) or preprocessing not in PREPROCESSING_CHOICES:
    choices = ', '.join(repr(c) for c in PREPROCESSING_CHOICES)
    raise ValueError(f'preprocessing must be one of {choices}; got {preprocessing!r}.')
  return preprocessing


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def _legacy_interpolation(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower, upper, lerp) of TF's legacy bilinear resize along one axis, in TF's float32 arithmetic.

  TF (`image_resizer_state.h`, `resize_bilinear_op.cc`, align_corners=False,
  half_pixel_centers=False): scale = float(in_size) / float(out_size); for each
  output index i, in = float(i) * scale, lower = floor(in), upper =
  min(ceil(in), in_size - 1), lerp = in - floor(in).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  src_floor = np.floor(src)
  lower = np.maximum(src_floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  lerp = (src - src_floor).astype(np.float32)
  return lower.astype(np.int32), upper.astype(np.int32), lerp


def tf_legacy_resize_bilinear(images: Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> Array:
  """[B, H, W, C] -> float32 [B, *size, C], as TF1's `ResizeBilinear` (align_corners=False, half_pixel_centers=False).

  Equals `tf.compat.v1.image.resize_bilinear(images, size)`: the source coordinate of
  output pixel i is i * in_size / out_size (no half-pixel offset), its two
  neighbours are floor / ceil of it with the upper one clamped to the last pixel,
  no antialiasing when downsampling. Separable, in TF's order: gather + lerp along
  the width (top = left + (right - left) * x_lerp), then along the height.
  """
  if images.ndim != 4:
    raise ValueError(f'tf_legacy_resize_bilinear expects [B, H, W, C]; got {images.shape}.')
  x = images.astype(jnp.float32)
  out_h, out_w = size
  lo, hi, lerp = _legacy_interpolation(x.shape[2], out_w)
  left, right = jnp.take(x, lo, axis=2), jnp.take(x, hi, axis=2)
  x = left + (right - left) * lerp[None, None, :, None]
  lo, hi, lerp = _legacy_interpolation(x.shape[1], out_h)
  top, bottom = jnp.take(x, lo, axis=1), jnp.take(x, hi, axis=1)
  return top + (bottom - top) * lerp[None, :, None, None]


def preprocess(images: Array, resize: bool = True, preprocessing: str = 'pytorch_fid') -> Array:
  """[B, H, W, 3] uint8/float in [0, 255] -> float32 [B, 299, 299, 3] in [-1, 1].

  preprocessing='pytorch_fid': pytorch-fid divides by 255, resizes with
  `F.interpolate(size=(299, 299), mode='bilinear', align_corners=False)` and maps
  x -> 2x - 1. `jax.image.resize` with `antialias=False` uses the same
  half-pixel-centred taps (edge taps renormalised, which equals torch's clamping),
  also when downsampling.

  preprocessing='adm': the TF 2015-12-05 graph behind the ADM evaluator resizes
  the [0, 255] floats with TF1's legacy `ResizeBilinear` (`tf_legacy_resize_bilinear`)
  and maps x -> (x - 128) / 128 (its `Sub` and `Mul` nodes).

  With resize=False the images keep their size; only the value mapping applies.
  """
  _check_preprocessing(preprocessing)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Inception expects images of shape [B, H, W, 3] (NHWC, RGB); got {images.shape}.')
  # At 299x299 both resizes are the identity (legacy: scale 1, lerp 0), so skipping them is exact.
  needs_resize = resize and images.shape[1:3] != (INPUT_SIZE, INPUT_SIZE)
  if preprocessing == 'adm':
    x = images.astype(jnp.float32)
    if needs_resize:
      x = tf_legacy_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) * (1.0 / 128.0)  # 1/128 is exact: equals (x - 128) / 128.
  x = images.astype(jnp.float32) / 255.0
  if needs_resize:
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method='bilinear',
                         antialias=False, precision=_HIGHEST)
  return 2.0 * x - 1.0


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 0.001) -> ReLU."""
  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  """3x3 / stride 1 / pad 1 average that ignores the padding (TF's AvgPool 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/5c/5d), FID variant: pool branch excludes the padding."""
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv2d(64, 1, name='branch1x1')(x)
    b5 = BasicConv2d(48, 1, name='branch5x5_1')(x)
    b5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv2d(self.pool_features, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv2d(384, 3, strides=2, name='branch3x3')(x)
    bd = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv2d(96, 3, strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b-6e), FID variant. Returns (output, branch1x1 output)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name='branch1x1')(x)
    b7 = BasicConv2d(c7, 1, name='branch7x7_1')(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv2d(c7, 1, name='branch7x7dbl_1')(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv2d(192, 1, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv2d(192, 1, name='branch3x3_1')(x)
    b3 = BasicConv2d(320, 3, strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv2d(192, 1, name='branch7x7x3_1')(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv2d(192, 3, strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b: pool='avg' without padding; Mixed_7c: pool='max', as the TF graph)."""
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv2d(320, 1, name='branch1x1')(x)
    b3 = BasicConv2d(384, 1, name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv2d(448, 1, name='branch3x3dbl_1')(x)
    bd = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    elif self.pool == 'max':
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max'; got {self.pool!r}.")
    bp = BasicConv2d(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Inception-v3, FID variant (TF 2015-12-05 graph as ported by pytorch-fid).

  Attributes:
    resize_input: resize to 299x299 (pytorch-fid's default). Without it the
      network runs at the input's size; 'spatial' is then not 2023-dimensional.
    preprocessing: 'pytorch_fid' (default) or 'adm'; see the module docstring
      and `preprocess`. The parameters do not depend on it.
  """
  resize_input: bool = True
  preprocessing: str = 'pytorch_fid'

  def __post_init__(self):
    _check_preprocessing(self.preprocessing)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    """images [B, H, W, 3] uint8/float in [0, 255] -> {'pool', 'spatial', 'logits'} (float32)."""
    x = preprocess(images, resize=self.resize_input, preprocessing=self.preprocessing)
    x = BasicConv2d(32, 3, strides=2, name='Conv2d_1a_3x3')(x)  # 149x149
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)  # 147x147
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)  # 73x73
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)  # 71x71
    x = _max_pool_3x3_s2(x)  # 35x35
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)  # 17x17
    x, _ = InceptionC(128, name='Mixed_6b')(x)
    x, _ = InceptionC(160, name='Mixed_6c')(x)
    x, mixed_6_conv = InceptionC(160, name='Mixed_6d')(x)  # TF `mixed_6/conv:0`.
    x, _ = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(x)  # 8x8
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, precision=_HIGHEST, name='fc')(pool)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(mixed_6_conv.shape[0], -1)
    return {'pool': pool.astype(jnp.float32), 'spatial': spatial.astype(jnp.float32),
            'logits': logits.astype(jnp.float32)}


# --------------------------------------------------------------------------- weights file

def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat: dict[str, Any] = {}
  for k, v in tree.items():
    key = f'{prefix}/{k}' if prefix else str(k)
    if isinstance(v, Mapping):
      flat.update(_flatten(v, key))
    else:
      flat[key] = v
  return flat


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
  abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8))
  return tuple((k, tuple(v.shape)) for k, v in _flatten(abstract).items())


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """{'params/Mixed_6d/branch1x1/conv/kernel': shape, 'batch_stats/.../bn/mean': shape, ...}."""
  return dict(_expected_shapes())


def validate_variables(flat: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  """Checks a flat {'collection/.../leaf': array} dict against the network; returns float32 arrays.

  Raises:
    ValueError naming `source` and the missing / unexpected keys, or the first
    parameter whose shape differs, with both shapes.
  """
  want = expected_shapes()
  missing = [k for k in want if k not in flat]
  unexpected = sorted(k for k in flat if k not in want)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing (first: {", ".join(missing[:5])})')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected (first: {", ".join(unexpected[:5])})')
    raise ValueError(f'{source}: not an FID Inception weight file: ' + '; '.join(parts) + '.')
  out: dict[str, np.ndarray] = {}
  for key, shape in want.items():
    value = np.asarray(flat[key])
    if tuple(value.shape) != shape:
      raise ValueError(f'{source}: parameter {key} has shape {tuple(value.shape)}, '
                       f'but the FID Inception expects {shape}.')
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f'{source}: parameter {key} has dtype {value.dtype}, expected a float type.')
    out[key] = np.ascontiguousarray(value, dtype=np.float32)
  return out


def save_variables(path: str | os.PathLike[str], variables: Mapping[str, Any]) -> None:
  """Writes {'params': ..., 'batch_stats': ...} as an .npz of 'collection/module/.../leaf' keys.

  The file is checked against the network first and written whole or not at all, locally or to
  a bucket (the exact `path` is used; numpy does not append '.npz').
  """
  path = os.fspath(path)
  flat = validate_variables(_flatten(variables), source=f'variables for {path}')
  with paths.atomic_write(path, 'wb') as f:
    np.savez(f, **flat)


def load_variables(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads a file written by `save_variables` -> {'params': ..., 'batch_stats': ...} (numpy float32).

  Raises:
    FileNotFoundError if `path` does not exist; ValueError naming the file if it
    is not a readable .npz, lacks or has extra parameters, or has a wrong shape.
  """
  path = os.fspath(path)
  if not paths.isfile(path):
    raise FileNotFoundError(f'FID Inception weight file {path} does not exist; convert pytorch-fid\'s '
                            'pt_inception-2015-12-05-6726825d.pth with '
                            '`python -m heptapod_jax.tools.convert_inception`.')
  try:
    with paths.open(path, 'rb') as f, np.load(f, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise ValueError(f'{path} is not a readable FID Inception .npz file ({type(e).__name__}: {e}).') from e
  return artifacts.unflatten(validate_variables(flat, source=path))


def load_inception(path: str | os.PathLike[str],
                   preprocessing: str = 'pytorch_fid') -> tuple[FIDInceptionV3, dict[str, Any]]:
  """-> (module, variables) for `module.apply(variables, images)`; see the module docstring.

  `preprocessing` ('pytorch_fid' or 'adm') selects the input pipeline; the
  variables are the same for both.
  """
  module = FIDInceptionV3(preprocessing=_check_preprocessing(preprocessing))
  return module, load_variables(path)


class InceptionFeatures:
  """Jitted FID Inception feature extractor over numpy image batches of any length.

  Usage:
    features = InceptionFeatures('inception_fid.npz', batch_size=100)
    out = features(images)  # images: [N, H, W, 3] uint8 (or float in [0, 255])
    out['pool'].shape, out['spatial'].shape, out['logits'].shape  # (N, 2048), (N, 2023), (N, 1008)

  Images are processed in chunks of `batch_size`; the last chunk is padded to
  `batch_size` so that one compilation per input (H, W, dtype) serves every call.

  `preprocessing='adm'` matches the ADM evaluator's TF graph (use it against ADM's
  reference batches); the default 'pytorch_fid' matches pytorch-fid. See the
  module docstring.
  """

  def __init__(self, path: str | os.PathLike[str], batch_size: int = 64,
               preprocessing: str = 'pytorch_fid'):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1; got {batch_size}.')
    self.preprocessing = _check_preprocessing(preprocessing)
    self.path = os.fspath(path)
    self.batch_size = int(batch_size)
    self.module, variables = load_inception(self.path, preprocessing=self.preprocessing)
    self.variables = jax.device_put(variables)
    self._apply = jax.jit(self.module.apply)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """images [N, H, W, 3] uint8 or float in [0, 255] -> {'pool', 'spatial', 'logits'} numpy float32."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'InceptionFeatures expects images of shape [N, H, W, 3]; got {images.shape}.')
    if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
      raise ValueError(f'InceptionFeatures expects uint8 or float images in [0, 255]; got {images.dtype}.')
    if images.dtype != np.uint8:
      images = images.astype(np.float32)
    n = images.shape[0]
    dims = {'pool': POOL_DIM, 'spatial': SPATIAL_DIM, 'logits': NUM_CLASSES}
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_KEYS}
    for start in range(0, n, self.batch_size):
      chunk = images[start:start + self.batch_size]
      m = chunk.shape[0]
      if m < self.batch_size:
        pad = np.zeros((self.batch_size - m,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad], axis=0)
      out = jax.device_get(self._apply(self.variables, chunk))
      for k in OUTPUT_KEYS:
        chunks[k].append(np.asarray(out[k][:m], dtype=np.float32))
    return {k: (np.concatenate(v, axis=0) if v else np.zeros((0, dims[k]), np.float32))
            for k, v in chunks.items()}
