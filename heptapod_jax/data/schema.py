"""What a data config may say, without TensorFlow: the sources, the augmentations and their
views, and the defaults (`default_data_config`). Config validation (`config_lib`) and anything
that only builds or checks configs import this, not the tf.data pipeline."""
from __future__ import annotations

import ml_collections

# Where a split's records come from (`sources.resolve_source`).
SOURCES = ("builtin_digits", "image_folder", "imagenet2012", "tfds")

# Shorter sides below this are skipped as 'too_small' (data.min_image_size). Low
# on purpose: it drops degenerate files (1x1 tracking pixels, icons) but not the
# small photos that the usual protocols (ADM, LlamaGen) upsample and train on.
DEFAULT_MIN_IMAGE_SIZE = 8

# Views of each augmentation, in variant order. ten_crop follows torchvision's
# `TenCrop`: `five_crop(image) + five_crop(hflip(image))`, five_crop returning
# (top-left, top-right, bottom-left, bottom-right, center). 'flipped_top_left'
# is the top-left crop OF THE MIRRORED image (the mirror of the top-right crop).
_FIVE_CROPS = ('top_left', 'top_right', 'bottom_left', 'bottom_right', 'center')
VARIANT_NAMES: dict[str, tuple[str, ...]] = {
    'none': ('center',),
    'flip': ('center', 'flipped_center'),
    'ten_crop': _FIVE_CROPS + tuple(f'flipped_{name}' for name in _FIVE_CROPS),
}
AUGMENTS = tuple(VARIANT_NAMES)


def default_data_config() -> ml_collections.ConfigDict:
  """Data settings for the built-in digits; the trainer's configs copy and edit these.

  Returns:
    ConfigDict with the fields that `create_train_iterator` and
    `create_eval_dataset` read.
  """
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({
      # One of sources.SOURCES: builtin_digits | image_folder | imagenet2012 | tfds.
      "source": "builtin_digits",
      # tfds: the data set's TFDS name, e.g. 'cifar10', 'oxford_flowers102',
      # 'imagenette/320px', optionally with ':version'.
      "name": placeholder(str),
      # tfds: the Image and ClassLabel features; None = the builder's only one of each.
      # label_key='' trains without labels (one class), also when the data set has some.
      "image_key": placeholder(str),
      "label_key": placeholder(str),
      # TFDS data dir (builtin_digits, imagenet2012, tfds); None = TFDS default.
      "data_dir": placeholder(str),
      # image_folder: root holding <split>/<class>/<image> files.
      "folder": placeholder(str),
      # imagenet2012: directory with the ILSVRC2012 tars; None = <data_dir>/downloads/manual.
      "manual_dir": placeholder(str),
      "image_size": 32,
      # Images whose shorter side is below this are skipped (counted as 'too_small');
      # 0 keeps all. Smaller images above it are upsampled by the center crop.
      "min_image_size": DEFAULT_MIN_IMAGE_SIZE,
      # Training augmentation, one of AUGMENTS: 'none' (center crop), 'flip' (and
      # its mirror image), 'ten_crop' (LlamaGen: 1.1x center crop, TenCrop views).
      # 'none' for digits: mirrored digits are not digits.
      "augment": "none",
      # Directory written by `python -m heptapod_jax.tools.tokenize_dataset`: train
      # on its pre-computed codes ('tokens') instead of images. None = images.
      "tokenized_dir": placeholder(str),
      # Encoded records held by the shuffle buffer (image folders shuffle whole epochs).
      "shuffle_buffer": 10_000,
      "train_split": "train",
      "eval_split": "test",
      # -1 = tf.data.AUTOTUNE.
      "num_parallel_calls": -1,
      # Batches prefetched; -1 = AUTOTUNE, 0 = none.
      "prefetch": 2,
  })
