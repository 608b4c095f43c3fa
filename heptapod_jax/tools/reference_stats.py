"""Computes the reference statistics that FID (and precision/recall) compare samples against.

  python -m heptapod_jax.tools.reference_stats --config=configs/cifar10.py --workdir=RUN
  python -m heptapod_jax.tools.reference_stats --config=configs/imagenet256.py --workdir=RUN \
      --config.evaluator.features=inception --config.evaluator.inception_weights=inception_fid.npz \
      --config.evaluator.reference=VIRTUAL_imagenet256_labeled.npz

Sample mode and the trainer's evaluator compute them on first use; this runs that step alone,
for example on a CPU host before the accelerators are reserved. The result goes where they will
look for it (`config.evaluator`, as `evaluators.generative.GenerativeEvaluator` says):

* `reference=''`: the statistics of data split `reference_split` through `features`
  (FID-Inception or the feature net, which is trained first when `<workdir>/feature_net` lacks
  it), cached as an .npz beside the feature net or under `<workdir>/eval/`;
* `reference=<ADM npz>`: the pool features of its `arr_0` images (for precision/recall),
  cached beside it as `<name>.<preprocessing>.features.npz`.

Killed at any moment, the same command resumes: the features are computed in parts of
`config.evaluator.reference_part_size` images, each saved (`<cache>.parts/part-NNNNNN.npz`) as
it is made; a damaged part is moved aside and computed again. The statistics equal an
uninterrupted run's exactly. A finished reference is read back, not computed again.
"""
from __future__ import annotations

if __name__ == '__main__':  # Before TensorFlow or JAX load: their start-up notices.
  from heptapod_jax import console as _console
  _console.quiet_dependencies()
  _console.import_tensorflow()

import functools  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from absl import app, flags  # noqa: E402
import ml_collections  # noqa: E402

from heptapod_jax import config_lib, console  # noqa: E402
from heptapod_jax.evaluators import generative  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402


def reference_stats(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Computes (or reads back) the reference of `config.evaluator`; what it is and where."""
  config_lib.validate(config)
  evaluator = generative.GenerativeEvaluator(config, workdir)
  t0 = time.time()
  reference = evaluator.reference
  return dict(reference=evaluator.info.get('reference'), features=evaluator.info.get('features'),
              dims=int(reference.mu.shape[0]),
              images=None if reference.pool_features is None else len(reference.pool_features),
              spatial=reference.has_spatial, seconds=time.time() - t0)


def _define_flags() -> dict[str, Any]:
  # Defined only when run as a program (heptapod_jax.main has a --config flag too).
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return {
      'config': config_flags.DEFINE_config_file(
          'config', None, 'Recipe file (configs/*.py[:options]).', lock_config=True),
      'workdir': flags.DEFINE_string('workdir', None, 'The run directory whose evaluations '
                                     'will use this reference.', required=True),
  }


def _main(argv, flag_values: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = paths.resolve(flag_values['workdir'].value, '--workdir')
  paths.makedirs(workdir)
  console.setup(workdir)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads images.
  result = reference_stats(flag_values['config'].value, workdir)
  images = f'{result["images"]} images, ' if result['images'] else ''
  console.summary(f'reference: {result["reference"]} ({images}{result["dims"]}-d features'
                  f'{", spatial too" if result["spatial"] else ""}; {result["features"]}; '
                  f'{result["seconds"]:.0f} s)')


def run() -> None:
  """Console entry point."""
  flag_values = _define_flags()
  app.run(functools.partial(_main, flag_values=flag_values))


if __name__ == '__main__':
  run()
