"""Built-in offline data set: scikit-learn's handwritten digits served through TFDS.

`HeptapodDigits` (TFDS name `heptapod_digits`) needs no network: the 1797 8x8
digits ship inside the scikit-learn package. It exists so that the whole
project (training, sampling, evaluation, tests) runs end to end on a laptop.

Importing this module registers the builder with TFDS, so that afterwards
`tfds.builder('heptapod_digits', data_dir=...)` works.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds



IMAGE_SIZE = 32
NUM_CLASSES = 10
# The first NUM_TRAIN digits form `train`, the remaining 297 form `test`; the
# sklearn order is fixed, so the splits are deterministic.
NUM_TRAIN = 1500
NUM_TOTAL = 1797


def render_digit(digit: np.ndarray) -> np.ndarray:
  """Renders one sklearn digit as a 32x32 RGB image, white digit on black.

  Args:
    digit: float[8, 8] with values in 0..16 (sklearn's `load_digits().images`).

  Returns:
    uint8[32, 32, 3].
  """
  gray = np.round(np.asarray(digit, np.float64) * (255.0 / 16.0))
  gray = np.clip(gray, 0, 255).astype(np.uint8)
  big = Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
  big = np.asarray(big, np.uint8)
  return np.repeat(big[:, :, None], 3, axis=-1)


class HeptapodDigits(tfds.core.GeneratorBasedBuilder):
  """sklearn's 8x8 handwritten digits, upsampled to 32x32 RGB."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "scikit-learn's bundled handwritten digits (UCI optdigits test set), each "
            "8x8 digit scaled to 0..255, bicubically upsampled to 32x32 and "
            "replicated to RGB."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    # The data ships with scikit-learn: nothing to download.
    del dl_manager
    return {
        "train": self._generate_examples(0, NUM_TRAIN),
        "test": self._generate_examples(NUM_TRAIN, NUM_TOTAL),
    }

  def _generate_examples(self, start: int, stop: int):
    # Imported here so that merely registering the builder stays cheap.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    assert len(digits.images) == NUM_TOTAL, len(digits.images)
    for i in range(start, stop):
      yield i, {"image": render_digit(digits.images[i]), "label": int(digits.target[i])}


def prepare(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Builds `heptapod_digits` into `data_dir` unless already there; returns the builder.

  Args:
    data_dir: TFDS data directory; None means the TFDS default (~/tensorflow_datasets).

  Returns:
    The prepared builder (call `as_dataset` on it).
  """
  builder = HeptapodDigits(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            # Both would otherwise reach for the network or spend time on a
            # data set whose statistics we never use.
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ))
  return builder
