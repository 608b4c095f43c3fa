"""Input pipeline throughput: the TFDS-by-name source next to the image-folder source.

  python benchmarks/input_throughput.py [--images=512] [--batches=20] [--repeats=3]

For each image size (32: cifar10's format; 256: celeb_a_hq/256's) three readers of the
same images go through the whole training pipeline (`input_pipeline.create_train_iterator`:
decode checks, crop, flip augmentation, batching) into float32 batches of 64, one process:

  tfds mock      data.source='tfds' on TFDS's mock of the data set (`tfds.testing.mock_data`:
                 random images PNG-encoded on the fly by the mock's Python generator, so this
                 column measures the mock as much as the pipeline);
  tfds prepared  data.source='tfds' by name on a real prepared TFDS directory of the mock's
                 images (tfrecords written by `tfds.dataset_builders.store_as_tfds_dataset`);
  image folder   data.source='image_folder' on the same images as PNG files.

Printed: images/s (median of the repeats) and the prepared TFDS / folder ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

from heptapod_jax.data import input_pipeline  # noqa: E402

tf.config.set_visible_devices([], 'GPU')
tfds.disable_progress_bar()
DATASETS = {32: 'cifar10', 256: 'celeb_a_hq/256'}
BATCH = 64


def _config(**fields):
  config = input_pipeline.default_data_config()
  for k, v in fields.items():
    setattr(config, k, v)
  return config


def images_per_sec(config, batches: int, repeats: int) -> float:
  rates = []
  for _ in range(repeats):
    it = input_pipeline.create_train_iterator(config, global_batch_size=BATCH, seed=0,
                                              process_index=0, process_count=1)
    for _ in range(2):  # Start-up: the source, the first shuffle buffer fill.
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    rates.append(batches * BATCH / (time.perf_counter() - t0))
  return float(np.median(rates))


def write_folder(root: str, examples) -> None:
  """The examples as <root>/train/<class>/<i>.png (one class when unlabelled)."""
  for i, ex in enumerate(examples):
    label = int(ex.get('label', 0))
    directory = os.path.join(root, 'train', f'class_{label:03d}')
    os.makedirs(directory, exist_ok=True)
    Image.fromarray(ex['image']).save(os.path.join(directory, f'{i:06d}.png'))


def write_tfds(data_dir: str, name: str, examples, size: int) -> None:
  """The examples as a prepared TFDS data set `name` in `data_dir` (PNG-encoded tfrecords)."""
  labelled = 'label' in examples[0]
  spec = {'image': tf.TensorSpec((size, size, 3), tf.uint8)}
  features = {'image': tfds.features.Image(shape=(size, size, 3))}
  if labelled:
    spec['label'] = tf.TensorSpec((), tf.int64)
    features['label'] = tfds.features.ClassLabel(num_classes=int(max(e['label'] for e in examples)) + 1)
  rows = [{k: ex[k] for k in spec} for ex in examples]
  ds = tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=spec)
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version='1.0.0', data_dir=data_dir,
      features=tfds.features.FeaturesDict(features), split_datasets={'train': ds})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', type=int, default=512, help='examples in each data set')
  parser.add_argument('--batches', type=int, default=20, help='timed batches of 64')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; batch {BATCH}, '
        f'{args.images} images per data set, {args.batches} timed batches, median of '
        f'{args.repeats}')
  print(f'{"size":>6} {"data set":>16} {"tfds mock img/s":>16} {"tfds prepared":>14} '
        f'{"image folder":>13} {"prepared / folder":>18}')
  for size, name in DATASETS.items():
    with tfds.testing.mock_data(num_examples=args.images,
                                policy=tfds.testing.MockPolicy.USE_CODE):
      examples = list(tfds.as_numpy(tfds.builder(name).as_dataset(split='train')))
      tfds_rate = images_per_sec(
          _config(source='tfds', name=name, image_size=size, augment='flip',
                  shuffle_buffer=args.images), args.batches, args.repeats)
    with tempfile.TemporaryDirectory() as root:
      write_folder(os.path.join(root, 'folder'), examples)
      folder_rate = images_per_sec(
          _config(source='image_folder', folder=os.path.join(root, 'folder'), image_size=size,
                  augment='flip', shuffle_buffer=args.images), args.batches, args.repeats)
      write_tfds(os.path.join(root, 'tfds'), f'bench_{size}', examples, size)
      prepared_rate = images_per_sec(
          _config(source='tfds', name=f'bench_{size}', data_dir=os.path.join(root, 'tfds'),
                  image_size=size, augment='flip', shuffle_buffer=args.images),
          args.batches, args.repeats)
    print(f'{size:>6} {name:>16} {tfds_rate:>16.0f} {prepared_rate:>14.0f} {folder_rate:>13.0f} '
          f'{prepared_rate / folder_rate:>18.2f}', flush=True)


if __name__ == '__main__':
  main()
