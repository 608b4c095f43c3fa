"""Image preprocessing as TensorFlow ops, usable inside `tf.data` maps.

The crop follows ADM (guided-diffusion, Dhariwal & Nichol 2021) `center_crop_arr`,
the protocol behind the usual ImageNet FID reference batches, so that training
images and reference statistics are preprocessed the same way.

Training augmentation (`augment`, see `VARIANT_NAMES`) picks one of a fixed list
of views of each image:
  'none'      the center crop;
  'flip'      the center crop, or its mirror image;
  'ten_crop'  LlamaGen's: center crop to int(1.1 * size), then one of torchvision's
              `TenCrop(size)` views: the four corners and the center, of the image
              and of its mirror image.
`augmented_view` computes one view (the image pipeline); `augmented_views` all of
them at once (pre-tokenization), view v of the latter equal to the former's.

Bad images (`decode_checked`; the input pipeline counts each kind). Every image
becomes uint8 RGB or is skipped with a reason, decided from its bytes before
decoding where possible:
  converted (`CONVERSIONS`, one kind per image, from the file's header):
    'grayscale'  JPEG with one component, PNG gray or gray + alpha: the gray
                 level is copied to R, G and B;
    'cmyk'       JPEG with four components (CMYK, Adobe YCCK): TensorFlow's JPEG
                 decoder converts to RGB itself (the same formula as PIL's
                 `convert('RGB')`, up to JPEG rounding), so no Python is involved;
    'palette'    PNG colour type 3: the palette is expanded (a tRNS alpha dropped);
    'alpha'      PNG RGBA: the alpha channel is dropped, not composited (as PIL).
  skipped (`SKIP_REASONS`):
    'corrupt'    not a JPEG, PNG, GIF, BMP or WebP file (by its signature; an
                 empty file too);
    'truncated'  a JPEG with no end-of-image marker (FF D9) after its last
                 start-of-scan (FF DA), or a PNG without an IEND chunk. TensorFlow
                 refuses to decode such files anyway; checking the markers names the
                 reason and would also catch a decoder that fills the missing rows
                 with gray, which is bad training data. Bytes after the end marker
                 are allowed;
    'too_small'  shorter side below `min_image_size` (`DEFAULT_MIN_IMAGE_SIZE`):
                 such images are placeholders or icons, not photos, and would be
                 upsampled from almost nothing.
A file that passes these checks but still fails to decode (a broken header or
scan) raises when the op runs; the input pipeline drops it with `ignore_errors`
and counts it as 'undecodable'. GIF, BMP and WebP are only checked for size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from heptapod_jax.data.schema import AUGMENTS, DEFAULT_MIN_IMAGE_SIZE, VARIANT_NAMES


# Skip reasons of `decode_checked`: code i + 1 is SKIP_REASONS[i], 0 means kept.
SKIP_REASONS = ('corrupt', 'truncated', 'too_small')
# Colour conversions of `decode_checked`: code i + 1 is CONVERSIONS[i], 0 means none.
CONVERSIONS = ('grayscale', 'cmyk', 'palette', 'alpha')

_CORRUPT, _TRUNCATED, _TOO_SMALL = 1, 2, 3
_GRAYSCALE, _CMYK, _PALETTE, _ALPHA = 1, 2, 3, 4
# Formats by signature; unknown = 0 is 'corrupt'.
_JPEG, _PNG, _OTHER = 1, 2, 3
_HEAD_BYTES = 32
# Most files end with their end marker; only the others are searched in full.
_TAIL_BYTES = 64
_PNG_SIGNATURE = (0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A)
# A PNG's last chunk: length 0, type IEND.
_PNG_END = b'\x00\x00\x00\x00IEND'
_JPEG_START_OF_SCAN = b'\xff\xda'
_JPEG_END_OF_IMAGE = b'\xff\xd9'


def _head(encoded: tf.Tensor) -> tf.Tensor:
  """uint8[_HEAD_BYTES], the file's first bytes, zero-padded when it is shorter."""
  head = tf.strings.join([tf.strings.substr(encoded, 0, _HEAD_BYTES),
                          tf.constant(b'\x00' * _HEAD_BYTES)])
  return tf.io.decode_raw(head, tf.uint8)[:_HEAD_BYTES]


def _starts_with(head: tf.Tensor, signature: bytes | tuple[int, ...], offset: int = 0
                 ) -> tf.Tensor:
  want = tf.constant(list(signature), tf.uint8)
  return tf.reduce_all(tf.equal(head[offset:offset + len(signature)], want))


def _image_format(head: tf.Tensor) -> tf.Tensor:
  """int32 scalar: _JPEG, _PNG, _OTHER (GIF, BMP, WebP: what decode_image reads) or 0."""
  other = (_starts_with(head, b'GIF8') | _starts_with(head, b'BM')
           | (_starts_with(head, b'RIFF') & _starts_with(head, b'WEBP', 8)))
  return tf.where(_starts_with(head, (0xFF, 0xD8, 0xFF)), _JPEG,
                  tf.where(_starts_with(head, _PNG_SIGNATURE), _PNG,
                           tf.where(other, _OTHER, 0)))


def _contains(data: tf.Tensor, pattern: bytes) -> tf.Tensor:
  return tf.size(tf.strings.split(data, sep=tf.constant(pattern))) > 1


def _tail(encoded: tf.Tensor) -> tf.Tensor:
  """The file's last _TAIL_BYTES bytes (all of a shorter file)."""
  start = tf.maximum(tf.strings.length(encoded) - _TAIL_BYTES, 0)
  return tf.strings.substr(encoded, start, _TAIL_BYTES)


def _ends_with_or_contains(encoded: tf.Tensor, end_marker: bytes,
                           contains: Callable[[], tf.Tensor]) -> tf.Tensor:
  """Fast path: the end marker is in the last bytes; else the full test on the whole file."""
  return tf.cond(_contains(_tail(encoded), end_marker), lambda: tf.constant(True), contains)


def _jpeg_complete(encoded: tf.Tensor) -> tf.Tensor:
  """Whether an end-of-image marker follows the last start-of-scan marker.

  Entropy-coded data never holds FF DA or FF D9 (0xFF is stuffed as FF 00), so
  a file cut inside its last scan has no FF D9 after the last FF DA. Markers in
  an embedded EXIF thumbnail come before the main image's scans.
  """
  after_scans = tf.strings.split(encoded, sep=tf.constant(_JPEG_START_OF_SCAN))
  return (tf.size(after_scans) > 1) & _contains(after_scans[-1], _JPEG_END_OF_IMAGE)


def _defect(encoded: tf.Tensor, image_format: tf.Tensor) -> tf.Tensor:
  """int32 scalar: _CORRUPT, _TRUNCATED or 0, from the bytes alone."""
  complete = tf.switch_case(image_format, [
      lambda: tf.constant(True),
      lambda: _ends_with_or_contains(encoded, _JPEG_END_OF_IMAGE,
                                     lambda: _jpeg_complete(encoded)),
      lambda: _ends_with_or_contains(encoded, _PNG_END,
                                     lambda: _contains(encoded, _PNG_END)),
      lambda: tf.constant(True),
  ])
  return tf.where(image_format == 0, _CORRUPT, tf.where(complete, 0, _TRUNCATED))


def _conversion(encoded: tf.Tensor, head: tf.Tensor, image_format: tf.Tensor) -> tf.Tensor:
  """int32 scalar: the `CONVERSIONS` code the decoder applies (0 for RGB or unknown)."""

  def jpeg():
    # Reads the header only: the frame's component count.
    components = tf.io.extract_jpeg_shape(encoded)[2]
    return tf.where(components == 1, _GRAYSCALE, tf.where(components == 4, _CMYK, 0))

  def png():
    # IHDR's colour type, at a fixed offset after the signature.
    colour_type = tf.cast(head[25], tf.int32)
    return tf.gather(tf.constant([_GRAYSCALE, 0, 0, _PALETTE, _GRAYSCALE, 0, _ALPHA]),
                     tf.minimum(colour_type, 6))

  return tf.switch_case(image_format, [lambda: tf.constant(0), jpeg, png,
                                       lambda: tf.constant(0)])


def decode_checked(encoded: tf.Tensor, min_image_size: int = DEFAULT_MIN_IMAGE_SIZE
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Decodes an image to RGB, or says why it is skipped (see the module docstring).

  Args:
    encoded: string scalar, the encoded image file.
    min_image_size: images whose shorter side is below this are skipped.

  Returns:
    (image, skip, conversion): image uint8[h, w, 3] (meaningless when skipped); skip
    int32, 0 or the code of a `SKIP_REASONS` entry; conversion int32, 0 or the
    code of a `CONVERSIONS` entry (0 when skipped). A file that passes the
    checks but cannot be decoded raises `tf.errors.InvalidArgumentError` when
    the op runs.
  """
  head = _head(encoded)
  image_format = _image_format(head)
  defect = _defect(encoded, image_format)

  def decode():
    image = decode_image(encoded)
    conversion = _conversion(encoded, head, image_format)
    shape = tf.shape(image)
    small = tf.minimum(shape[0], shape[1]) < min_image_size
    return image, tf.where(small, _TOO_SMALL, 0), tf.where(small, 0, conversion)

  def skipped():
    return tf.zeros([0, 0, 3], tf.uint8), defect, tf.constant(0)

  image, skip, conversion = tf.cond(defect == 0, decode, skipped)
  image.set_shape([None, None, 3])
  return image, skip, conversion


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to RGB.

  Grayscale images are replicated to three channels, alpha is dropped and CMYK
  JPEGs are converted, so every image has the same channel count. Corrupt or
  truncated data raises `tf.errors.InvalidArgumentError` when the op runs;
  `decode_checked` names such problems instead.

  Args:
    encoded: string scalar, the encoded image file.

  Returns:
    image: uint8[h, w, 3].
  """
  image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _round_to_uint8_range(x: tf.Tensor) -> tf.Tensor:
  # PIL rounds half up (fixed point plus 0.5) and saturates; tf.round would
  # round half to even and differ by one level on exact halves.
  return tf.clip_by_value(tf.floor(x + 0.5), 0.0, 255.0)


def _box_resize_axis(image: tf.Tensor, out_size: tf.Tensor, axis: int) -> tf.Tensor:
  """Downsamples one axis with PIL's BOX filter, exactly.

  PIL gives weight 1 to the input pixels whose centres lie in (c - s/2, c + s/2]
  around each output centre c (scale s = in / out). `ScaleAndTranslate`'s box
  kernel gives 0.5 to both pixels on an exact tie, which happens for odd input
  sizes (e.g. 65 -> 32) and then differs from PIL by tens of levels. So compute
  PIL's coefficients in float64, exactly as Pillow's `precompute_coeffs` does,
  and average each contiguous run of pixels from a cumulative sum.

  Args:
    image: float32[h, w, 3] holding integer values in 0..255.
    out_size: int32 scalar, new size of `axis`.
    axis: 0 (height) or 1 (width).

  Returns:
    float32 image with `axis` resized, integer values in 0..255.
  """
  in_size = tf.shape(image)[axis]
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  filter_scale = tf.maximum(scale, 1.0)
  support = 0.5 * filter_scale
  center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
  first = tf.maximum(tf.floor(center - support + 0.5), 0.0)
  stop = tf.minimum(tf.floor(center + support + 0.5), in_f)
  num_taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  # candidates: float64[out, taps]
  candidates = first[:, None] + tf.cast(tf.range(num_taps), tf.float64)[None, :]
  t = (candidates - center[:, None] + 0.5) * (1.0 / filter_scale)
  inside = (candidates < stop[:, None]) & (t > -0.5) & (t <= 0.5)
  lo = tf.cast(tf.reduce_min(tf.where(inside, candidates, in_f), axis=1), tf.int32)
  hi = tf.cast(tf.reduce_max(tf.where(inside, candidates, -1.0), axis=1), tf.int32) + 1

  # Sums of uint8 values are exact in float64; averages of 2 or 3 pixels then
  # round exactly like PIL's fixed-point arithmetic.
  x = tf.cast(image, tf.float64)
  zeros = tf.zeros_like(tf.gather(x, [0], axis=axis))
  cumsum = tf.concat([zeros, tf.cumsum(x, axis=axis)], axis=axis)
  total = tf.gather(cumsum, hi, axis=axis) - tf.gather(cumsum, lo, axis=axis)
  count = tf.cast(hi - lo, tf.float64)
  count = count[:, None, None] if axis == 0 else count[None, :, None]
  return tf.cast(_round_to_uint8_range(total / count), tf.float32)


def _bicubic_resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """Resizes like PIL's `Image.resize(..., BICUBIC)`: horizontal pass, round, vertical pass.

  `ScaleAndTranslate` with antialiasing computes the same filter weights as
  PIL's resampler (Keys cubic with a = -0.5, widened by the downscale factor,
  renormalised at the borders). PIL keeps the intermediate image in uint8, so
  round in between too; what remains is PIL's fixed-point weights (<= 1 level).

  Args:
    image: float32[h, w, 3] holding integer values in 0..255.
    height: int32 scalar, output height.
    width: int32 scalar, output width.

  Returns:
    float32[height, width, 3] holding integer values in 0..255.
  """
  in_h = tf.shape(image)[0]
  in_w = tf.shape(image)[1]

  def one_pass(x, out_h, out_w, src_h, src_w):
    scale = tf.stack([tf.cast(out_h, tf.float32) / tf.cast(src_h, tf.float32),
                      tf.cast(out_w, tf.float32) / tf.cast(src_w, tf.float32)])
    y = tf.raw_ops.ScaleAndTranslate(
        images=x[None], size=tf.stack([out_h, out_w]), scale=scale,
        translation=tf.zeros([2], tf.float32), kernel_type="keyscubic", antialias=True)
    return _round_to_uint8_range(y[0])

  image = tf.cond(tf.equal(width, in_w), lambda: image,
                  lambda: one_pass(image, in_h, width, in_h, in_w))
  image = tf.cond(tf.equal(height, in_h), lambda: image,
                  lambda: one_pass(image, height, width, in_h, width))
  return image


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes and center-crops to `size` x `size` following ADM's `center_crop_arr`.

  Protocol (guided-diffusion `image_datasets.center_crop_arr`): while the short
  side is at least 2 * size, halve both sides (floor) with a box filter; then
  resize with bicubic so that the short side equals `size` and the long side is
  round(long * size / short); round to uint8; take the central crop.
  Resampling reproduces PIL's filters: the box halvings exactly, the bicubic
  resize up to PIL's fixed-point rounding (classic Pillow order, horizontal
  pass first; at most a level or two from the PIL reference).

  Args:
    image: uint8[h, w, 3].
    size: output side length.

  Returns:
    uint8[size, size, 3].
  """
  image = tf.cast(image, tf.float32)

  def halve_cond(x):
    return tf.minimum(tf.shape(x)[0], tf.shape(x)[1]) >= 2 * size

  def halve(x):
    # PIL resizes the width first; for box each axis is independent anyway.
    x = _box_resize_axis(x, tf.shape(x)[1] // 2, axis=1)
    return (_box_resize_axis(x, tf.shape(x)[0] // 2, axis=0),)

  (image,) = tf.while_loop(halve_cond, halve, (image,),
                           shape_invariants=(tf.TensorShape([None, None, 3]),))

  h = tf.shape(image)[0]
  w = tf.shape(image)[1]
  # float64 and round-half-to-even reproduce Python's round(x * scale).
  scale = tf.cast(size, tf.float64) / tf.cast(tf.minimum(h, w), tf.float64)
  new_h = tf.cast(tf.round(tf.cast(h, tf.float64) * scale), tf.int32)
  new_w = tf.cast(tf.round(tf.cast(w, tf.float64) * scale), tf.int32)
  image = _bicubic_resize(image, new_h, new_w)

  top = (new_h - size) // 2
  left = (new_w - size) // 2
  image = image[top:top + size, left:left + size]
  image = tf.ensure_shape(image, [size, size, 3])
  return tf.cast(image, tf.uint8)


# LlamaGen's `crop_range`: the ten crops are taken from a center crop this much larger.
TEN_CROP_RANGE = 1.1


def ten_crop_size(size: int) -> int:
  """Side of the center crop the ten crops are cut from: int(1.1 * size), as LlamaGen."""
  return int(size * TEN_CROP_RANGE)


def _five_crop_offsets(height: tf.Tensor, width: tf.Tensor, size: int) -> tf.Tensor:
  """int32[5, 2] (top, left) of torchvision's five crops, in `schema.VARIANT_NAMES["ten_crop"][:5]` order."""
  bottom = height - size
  right = width - size
  # torchvision's center_crop: int(round((h - size) / 2)); Python's round and
  # tf.round both round halves to even (a 35 -> 32 crop starts at 2, 17 -> 16 at 0).
  center_top = tf.cast(tf.round(tf.cast(bottom, tf.float64) / 2.0), tf.int32)
  center_left = tf.cast(tf.round(tf.cast(right, tf.float64) / 2.0), tf.int32)
  zero = tf.zeros_like(bottom)
  return tf.stack([tf.stack([zero, zero]), tf.stack([zero, right]), tf.stack([bottom, zero]),
                   tf.stack([bottom, right]), tf.stack([center_top, center_left])])


def ten_crop_variant(image: tf.Tensor, size: int, variant: tf.Tensor | int) -> tf.Tensor:
  """View `variant` of torchvision's `TenCrop(size)` of `image`.

  Args:
    image: [h, w, c] with h, w >= size, any dtype.
    size: crop side length.
    variant: int scalar in [0, 10), an index into `VARIANT_NAMES['ten_crop']`.

  Returns:
    [size, size, c], same dtype.
  """
  variant = tf.convert_to_tensor(variant, tf.int32)
  # Views 5..9 are crops of the mirrored image, not mirrored crops.
  image = tf.cond(variant >= 5, lambda: tf.reverse(image, axis=[1]), lambda: image)
  shape = tf.shape(image)
  # An image smaller than the crop makes tf.slice raise InvalidArgumentError.
  top_left = tf.gather(_five_crop_offsets(shape[0], shape[1], size), variant % 5)
  crop = tf.slice(image, tf.concat([top_left, [0]], 0), tf.stack([size, size, shape[2]]))
  return tf.ensure_shape(crop, [size, size, image.shape[2]])


def ten_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """All ten views of torchvision's `TenCrop(size)`, in its order.

  Args:
    image: [h, w, c] with h, w >= size, any dtype.
    size: crop side length.

  Returns:
    [10, size, size, c], same dtype; entry v is `ten_crop_variant(image, size, v)`.
  """
  return tf.stack([ten_crop_variant(image, size, v) for v in range(10)])


def _check_augment(augment: str) -> None:
  if augment not in VARIANT_NAMES:
    raise ValueError(f'data.augment={augment!r} is not one of {list(AUGMENTS)}')


def augmented_view(image: tf.Tensor, size: int, augment: str,
                   variant: tf.Tensor | int) -> tf.Tensor:
  """One training view of a decoded image (see the module docstring).

  Args:
    image: uint8[h, w, 3], a decoded image of any size.
    size: output side length.
    augment: one of `AUGMENTS`.
    variant: int scalar, an index into `VARIANT_NAMES[augment]`.

  Returns:
    uint8[size, size, 3].
  """
  _check_augment(augment)
  variant = tf.convert_to_tensor(variant, tf.int32)
  if augment == 'ten_crop':
    return ten_crop_variant(center_crop(image, ten_crop_size(size)), size, variant)
  image = center_crop(image, size)
  if augment == 'flip':
    image = tf.cond(variant == 1, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return image


def augmented_views(image: tf.Tensor, size: int, augment: str) -> tf.Tensor:
  """Every training view of a decoded image, resampling it once.

  Args:
    image: uint8[h, w, 3], a decoded image of any size.
    size: output side length.
    augment: one of `AUGMENTS`.

  Returns:
    uint8[V, size, size, 3] with V = len(VARIANT_NAMES[augment]); entry v equals
    `augmented_view(image, size, augment, v)`.
  """
  _check_augment(augment)
  if augment == 'ten_crop':
    return ten_crop(center_crop(image, ten_crop_size(size)), size)
  image = center_crop(image, size)
  if augment == 'flip':
    return tf.stack([image, tf.reverse(image, axis=[1])])
  return image[None]


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Flips left-right with probability 1/2, reproducibly from a stateless seed.

  Args:
    image: [h, w, c], any dtype.
    seed: int32/int64[2], stateless RNG seed.

  Returns:
    The image, possibly flipped; same shape and dtype.
  """
  return tf.image.stateless_random_flip_left_right(image, seed)


def to_model_range(image: tf.Tensor) -> tf.Tensor:
  """Maps uint8 pixels to the model's input range.

  Args:
    image: uint8[..., 3].

  Returns:
    float32[..., 3] in [-1, 1].
  """
  return tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0


def to_uint8(x) -> np.ndarray:
  """Inverse of `to_model_range`, in numpy, for writing images.

  Args:
    x: float array (numpy or jax) [..., 3] in [-1, 1]; values outside are clipped.

  Returns:
    uint8[..., 3].
  """
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
