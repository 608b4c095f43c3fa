"""Jobs that tests/test_bucket_jobs.py runs inside the GCS world (tests/gcs_world.py): the
project's readers and writers of single files, each given a gs:// path and checked against
the same file read locally. `python tests/gcs/jobs.py files gs://bkt/prefix` prints
'files: ok' when every check holds (an AssertionError names the first that does not).
"""
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402

from heptapod_jax.evaluators import generative, inception  # noqa: E402
from heptapod_jax.evaluators import reference as reference_lib  # noqa: E402
from heptapod_jax.models.tokenizers import lpips as lpips_lib  # noqa: E402
from heptapod_jax.storage import artifacts  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402
from heptapod_jax.training import liveness  # noqa: E402


class _MeanColour:
  """A feature extractor small enough for a test: per-channel means and their squares."""

  def __call__(self, images):
    x = np.asarray(images, np.float32) / 255.0
    mean = x.mean(axis=(1, 2))
    return {'pool': np.concatenate([mean, mean ** 2, x.std(axis=(1, 2))], axis=1)}


def files(prefix: str) -> None:
  rng = np.random.default_rng(0)
  # LPIPS weights given as gs:// (config.loss.lpips_path): the same tree as the local file.
  local = lpips_lib.default_lpips_path()
  remote = paths.join(prefix, 'vgg16.ckpt')
  paths.copy(local, remote, overwrite=True)
  got, want = lpips_lib.load_lpips_params(remote), lpips_lib.load_lpips_params(local)
  pairs = list(zip(_leaves(got), _leaves(want)))
  assert pairs and all(np.array_equal(a, b) for a, b in pairs)

  # FID Inception weights (config.evaluator.inception_weights; the converter's --dst).
  flat = {k: rng.standard_normal(s).astype(np.float32)
          for k, s in inception.expected_shapes().items()}
  weights = paths.join(prefix, 'inception_fid.npz')
  inception.save_variables(weights, artifacts.unflatten(flat))
  back = inception.load_variables(weights)
  for key, value in flat.items():
    assert np.array_equal(artifacts.lookup(back, key.replace('/', '.')), value), key

  # Reference statistics given as gs:// (config.evaluator.reference), in the project's format.
  feats = {'pool': rng.standard_normal((40, 6)).astype(np.float32)}
  ref = reference_lib.Reference.from_features(feats)
  stats = paths.join(prefix, 'ref_stats.npz')
  ref.save(stats)
  loaded = generative.load_reference_file(stats, _MeanColour(), batch_size=8)
  assert np.array_equal(loaded.mu, ref.mu) and np.array_equal(loaded.sigma, ref.sigma)

  # ADM's reference batch format (arr_0 images) on gs://: its pool features are computed once
  # and cached beside it, in parts that are removed afterwards; the cache equals a local run's.
  images = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
  adm = paths.join(prefix, 'adm_ref.npz')
  artifacts.save_npz(adm, arr_0=images)
  remote_ref = generative.load_reference_file(adm, _MeanColour(), batch_size=8, part_size=8)
  names = paths.listdir(prefix)
  assert 'adm_ref.adm.features.npz' in names, names
  assert not [n for n in names if n.endswith('.parts')], names
  local_dir = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'jobs-{os.getpid()}')
  os.makedirs(local_dir, exist_ok=True)
  artifacts.save_npz(os.path.join(local_dir, 'adm_ref.npz'), arr_0=images)
  local_ref = generative.load_reference_file(os.path.join(local_dir, 'adm_ref.npz'), _MeanColour(),
                                             batch_size=8, part_size=8)
  assert np.array_equal(remote_ref.pool_features, local_ref.pool_features)
  assert np.array_equal(generative.load_reference_file(adm, _MeanColour(), 8).mu, remote_ref.mu)

  # A damaged object is set aside under a new name, never overwritten, on a bucket too.
  broken = paths.join(prefix, 'broken.npz')
  paths.write_bytes(broken, b'PK\x03\x04 not a zip')
  try:
    artifacts.read_npz(broken, ('x',), broken)
    raise AssertionError('a damaged npz was read')
  except artifacts.DamagedFileError:
    pass
  aside = artifacts.move_aside(broken)
  assert not paths.exists(broken) and paths.read_bytes(aside) == b'PK\x03\x04 not a zip'

  # The lost-process last word: on a bucket a step is final when Orbax's commit marker is
  # there (no atomic rename), not when its directory exists under the step's name.
  ckpt = paths.join(prefix, 'checkpoints')
  paths.write_text(paths.join(ckpt, '4', 'state', 'x'), 'x')
  paths.write_text(paths.join(ckpt, '4', liveness.COMMIT_MARKER), '')
  paths.write_text(paths.join(ckpt, '6', 'state', 'x'), 'half-written save')
  assert liveness.finalized_checkpoint_steps(ckpt) == [4]

  # The path layer's own calls on objects and prefixes.
  assert paths.isdir(ckpt) and not paths.isfile(ckpt) and paths.isfile(stats)
  assert paths.listdir(ckpt) == ['4', '6']
  assert paths.glob(paths.join(prefix, '*.npz')) == [paths.join(prefix, n) for n in (
      'adm_ref.adm.features.npz', 'adm_ref.npz', 'inception_fid.npz', 'ref_stats.npz')]
  assert paths.getsize(stats) == len(paths.read_bytes(stats))
  paths.rename(paths.join(ckpt, '6'), paths.join(prefix, 'moved6'))
  assert paths.listdir(ckpt) == ['4'] and paths.read_text(
      paths.join(prefix, 'moved6', 'state', 'x')) == 'half-written save'
  try:
    paths.read_bytes(paths.join(prefix, 'missing'))
    raise AssertionError('a missing object was read')
  except FileNotFoundError as e:
    assert 'missing' in str(e)
  print('files: ok', flush=True)


def _leaves(tree):
  if isinstance(tree, dict):
    for key in sorted(tree):
      yield from _leaves(tree[key])
  else:
    yield np.asarray(tree)


if __name__ == '__main__':
  {'files': files}[sys.argv[1]](*sys.argv[2:])
