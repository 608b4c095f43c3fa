"""Every job of the project on a bucket: a real GCS server on loopback (tests/gcs_world.py), the
unmodified clients (TensorFlow's GCS client for the project's own files, tf.summary and tf.data;
tensorstore and google-cloud-storage for Orbax), the real command lines in child processes.

What is checked is read back from the server over plain HTTP, independently of those clients,
and nothing may appear in a local folder named `gs:` (what the project wrote before its path
layer: tests/test_paths.py keeps the package from doing it again).
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from _multiprocess import multiprocess_env
from gcs_world import gcs_world  # noqa: F401  (the fixture: one server for the module)
from test_data import digits_dir  # noqa: F401  (fixture: the built-in digits, prepared once)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(ROOT, 'tests', 'gcs', 'jobs.py')

# The tiny AR run of tests/test_console.py, with its sample grid, summary page and a small
# generative evaluation (feature net and reference statistics) so that every file a run
# writes is exercised.
AR_OVERRIDES = {
    'model.backbone.width': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2,
    'model.head.width': 32, 'model.head.depth': 1, 'model.head.num_heads': 2,
    'train.global_batch_size': 16, 'train.log_every': 2, 'train.checkpoint_every': 2,
    'train.sample_every': 0, 'train.eval_every': 0, 'train.eval_batches': 1,
    'train.num_sample_images': 20, 'evaluator.num_samples': 20, 'evaluator.batch_size': 20,
    'evaluator.feature_net_steps': 10, 'evaluator.real_baseline': False,
    'sample.num_samples': 20, 'sample.chunk_size': 8, 'sample.num_png': 2,
    'train.peak_tflops': 1.0,  # The logged MFU's peak: no matmul timing at each start-up.
}


# The model of those overrides (the demo's own is bigger, and its size is not what is tested).
TINY_MODEL = [f'--config.{k}={v}' for k, v in AR_OVERRIDES.items() if k.startswith('model.')]


def ar_argv(workdir: str, data_dir: str, steps: int, *extra: str) -> list[str]:
  return ([sys.executable, '-m', 'heptapod_jax.main',
           f'--config={ROOT}/configs/demo.py:steps={steps},tokenizer=pixel',
           f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
          + [f'--config.{k}={v}' for k, v in AR_OVERRIDES.items()] + list(extra))


def job_env(world) -> dict:
  return world.env(dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
                        TF_CPP_MIN_LOG_LEVEL='3'))


def run(world, argv, cwd, timeout=600, check=True):
  return world.run(argv, env=job_env(world), cwd=cwd, timeout=timeout, check=check)


def assert_nothing_local(cwd):
  """The bug this layer fixes: a gs://... path written with the local file API."""
  found = [os.path.join(d, n) for d, names, files in os.walk(cwd) for n in names + files
           if n.startswith('gs:')]
  assert not found, f'files written locally under a gs: folder: {found}'


def png_shape(data: bytes) -> tuple[int, ...]:
  return np.asarray(Image.open(io.BytesIO(data))).shape


def upload_tree(world, local_dir: str, prefix: str) -> None:
  """A local directory into the bucket, object by object (plain HTTP, not the tested client)."""
  for directory, _, files in os.walk(local_dir):
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        world.write(f'{prefix}/{os.path.relpath(path, local_dir)}', f.read())


@pytest.mark.slow
def test_an_ar_run_samples_and_evaluates_in_a_bucket(gcs_world, digits_dir, tmp_path):
  world, cwd = gcs_world, str(tmp_path)
  run_url = world.url('ar')
  out = run(world, ar_argv(run_url, digits_dir, 4), cwd)
  assert f'full log: {run_url}/log.txt' in out.stdout, out.stdout
  assert f'summary page (metrics, loss curve, pictures): {run_url}/summary.html' in out.stdout
  names = set(world.list('ar/'))
  for name in ('config.json', 'log.txt', 'summary.html', 'samples/step_0000004.png',
               'samples/reference_real_tokenized.png', 'checkpoints/4/commit_success.txt',
               'checkpoints/2/commit_success.txt', 'feature_net/meta.json',
               'feature_net/params.msgpack',
               'feature_net/reference_builtin_digits_train_32.npz'):
    assert f'ar/{name}' in names, (name, sorted(names))
  assert [n for n in names if n.startswith('ar/events.out.tfevents.')], names
  assert not [n for n in names if '.tmp' in n or 'parts/' in n], names
  assert json.loads(world.read('ar/config.json'))['train']['num_steps'] == 4
  assert png_shape(world.read('ar/samples/step_0000004.png'))[-1] == 3
  page = world.read('ar/summary.html').decode()
  assert '<svg' in page and 'data:image/png;base64,' in page  # Curves and samples, embedded.
  first_log = world.read('ar/log.txt').decode()
  assert 'train/grad_norm=' in first_log and 'Done: 4 steps' in first_log

  # Resumed to 6 steps: the log goes on (the bucket's copy was downloaded first).
  out = run(world, ar_argv(run_url, digits_dir, 6), cwd)
  assert 'Done: 6 steps' in out.stdout, out.stdout
  log = world.read('ar/log.txt').decode()
  assert log.startswith(first_log) and 'Done: 6 steps' in log[len(first_log):]
  assert 'ar/checkpoints/6/commit_success.txt' in world.list('ar/checkpoints/6/')

  # The sampling command line, reading the run and writing its grid to the bucket.
  out = run(world, [sys.executable, '-m', 'heptapod_jax.sample', f'--checkpoint={run_url}',
                    '--classes=1,2', '--n=4', f'--out={run_url}/cli.png',
                    f'--out_dir={run_url}/cli_png'], cwd)
  assert f'{run_url}/cli.png' in out.stdout, out.stdout
  assert png_shape(world.read('ar/cli.png'))[-1] == 3
  assert len(world.list('ar/cli_png/')) == 4

  # Sample mode: chunks, manifest, the ADM .npz, PNGs and metrics in the bucket; a rerun
  # reads the chunks back instead of making them again.
  out = run(world, ar_argv(run_url, digits_dir, 6, '--mode=sample'), cwd)
  prefix = 'ar/samples_0000006_seed0/'
  names = set(world.list(prefix))
  chunks = sorted(n for n in names if n.startswith(prefix + 'chunks/'))
  assert len(chunks) == 3, names  # 20 samples in chunks of 8.
  for name in ('manifest.json', 'samples_20x32x32x3.npz', 'grid.png', 'metrics.json'):
    assert prefix + name in names, (name, names)
  with np.load(io.BytesIO(world.read(prefix + 'samples_20x32x32x3.npz'))) as f:
    assert f['arr_0'].shape == (20, 32, 32, 3) and list(f['arr_1'][:3]) == [0, 1, 2]
  generations = {n: world.stat(n)['generation'] for n in chunks}
  run(world, ar_argv(run_url, digits_dir, 6, '--mode=sample'), cwd)
  assert {n: world.stat(n)['generation'] for n in chunks} == generations

  # Two processes (jax.distributed over the world's loopback) resume sample mode from the
  # bucket: both see the chunks there, make the missing one, and give the same samples.
  two = 'ar/two_processes/'
  for name in names:
    if name.endswith('manifest.json') or (name in chunks and name != chunks[1]):
      world.write(two + name[len(prefix):], world.read(name))
  kept = world.stat(two + 'chunks/' + os.path.basename(chunks[0]))['generation']
  port = 20000 + os.getpid() % 20000
  env = dict(multiprocess_env(job_env(world)),
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs = [world.popen(ar_argv(run_url, digits_dir, 6, '--mode=sample', '--distributed=on',
                               f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                               f'--process_id={pid}', f'--config.sample.out_dir={world.url(two)}'),
                       env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True) for pid in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(o[-3000:] for o in outputs)
  assert world.stat(two + 'chunks/' + os.path.basename(chunks[0]))['generation'] == kept
  assert len(world.list(two + 'chunks/')) == 3
  with np.load(io.BytesIO(world.read(two + 'samples_20x32x32x3.npz'))) as a, \
       np.load(io.BytesIO(world.read(prefix + 'samples_20x32x32x3.npz'))) as b:
    assert np.array_equal(a['arr_0'], b['arr_0']) and np.array_equal(a['arr_1'], b['arr_1'])

  # The probe reads the run from the bucket.
  out = run(world, [sys.executable, '-m', 'heptapod_jax.evaluators.probe',
                    f'--config={ROOT}/configs/demo.py:steps=6,tokenizer=pixel',
                    f'--workdir={run_url}', f'--config.data.data_dir={digits_dir}',
                    '--probe_steps=5', '--max_train_examples=64', '--max_eval_examples=32',
                    '--batch_size=32', *TINY_MODEL], cwd)
  assert 'top-1' in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
  assert_nothing_local(cwd)


@pytest.mark.slow
def test_data_tokenizer_and_codes_all_in_the_bucket(gcs_world, digits_dir, tmp_path):
  world, cwd = gcs_world, str(tmp_path)
  upload_tree(world, digits_dir, 'tfds')
  tfds_url, tok_url = world.url('tfds'), world.url('tok')
  tokenizer_argv = [
      sys.executable, '-m', 'heptapod_jax.main', f'--config={ROOT}/configs/vq_demo.py:steps=2',
      f'--workdir={tok_url}', f'--config.data.data_dir={tfds_url}',
      '--config.tokenizer.vq.ch=32', '--config.tokenizer.vq.ch_mult=(1,2,2)',
      '--config.tokenizer.vq.num_res_blocks=1', '--config.tokenizer.vq.dec_num_res_blocks=1',
      '--config.tokenizer.vq.z_channels=32', '--config.train.global_batch_size=8',
      '--config.train.checkpoint_every=2', '--config.train.eval_batches=1',
      '--config.train.num_recon_images=4', '--config.mesh.shape=(-1,1,1)']
  out = run(world, tokenizer_argv, cwd)
  assert f'--config.tokenizer.checkpoint={tok_url}/tokenizer' in out.stdout, out.stdout
  export = [n for n in world.list('tok/tokenizer/') if n.endswith('commit_success.txt')]
  assert export and 'tok/reconstructions/step_0000002.png' in world.list('tok/')
  generations = {n: world.stat(n)['generation'] for n in world.list('tok/tokenizer/')}
  # A finished run rerun: its export is found and left as it is.
  run(world, tokenizer_argv, cwd)
  assert {n: world.stat(n)['generation'] for n in world.list('tok/tokenizer/')} == generations

  # The reference statistics tool, the data read from the bucket, its results written there
  # (the feature net, then the statistics computed in parts that are removed at the end).
  refs_argv = [sys.executable, '-m', 'heptapod_jax.tools.reference_stats',
               f'--config={ROOT}/configs/demo.py:tokenizer=pixel', f'--workdir={world.url("refs")}',
               f'--config.data.data_dir={tfds_url}', '--config.evaluator.feature_net_steps=10',
               '--config.evaluator.batch_size=50', '--config.evaluator.reference_part_size=500']
  run(world, refs_argv, cwd)
  refs = world.list('refs/')
  stats = 'refs/feature_net/reference_builtin_digits_train_32.npz'
  assert stats in refs and 'refs/feature_net/meta.json' in refs and 'refs/log.txt' in refs, refs
  assert not [n for n in refs if '.parts' in n], refs
  generation = world.stat(stats)['generation']
  run(world, refs_argv, cwd)  # Read back, not computed again.
  assert world.stat(stats)['generation'] == generation

  # The codes of the bucket's data through the bucket's tokenizer, into the bucket.
  ar_recipe = f'--config={ROOT}/configs/demo.py:steps=2'
  shared = [f'--config.data.data_dir={tfds_url}', f'--config.tokenizer.checkpoint={tok_url}/tokenizer']
  run(world, [sys.executable, '-m', 'heptapod_jax.tools.tokenize_dataset', ar_recipe, *shared,
              '--variants=center', f'--out={world.url("codes")}', '--shard_size=500'], cwd)
  codes = world.list('codes/')
  assert 'codes/metadata.json' in codes and len([n for n in codes if n.endswith('.npz')]) == 3

  # An AR run whose data, tokenizer and codes are all in the bucket.
  out = run(world, [sys.executable, '-m', 'heptapod_jax.main', ar_recipe, f'--workdir={world.url("ar_vq")}',
                    *shared, f'--config.data.tokenized_dir={world.url("codes")}',
                    '--config.train.sample_every=0', '--config.train.eval_every=0',
                    '--config.train.eval_batches=1', '--config.train.num_sample_images=10',
                    '--config.train.global_batch_size=16', '--config.evaluator.at_end=False',
                    '--config.evaluator.real_baseline=False', *TINY_MODEL], cwd)
  assert 'Done: 2 steps' in out.stdout, out.stdout
  assert 'ar_vq/checkpoints/2/commit_success.txt' in world.list('ar_vq/checkpoints/2/')
  assert_nothing_local(cwd)


def test_files_read_from_the_bucket(gcs_world, tmp_path):
  """Weights and reference files given as gs:// (LPIPS, FID Inception, reference statistics,
  ADM's reference batch with its feature cache), the reference statistics tool, and the
  lost-process last word's finalized checkpoints: tests/gcs/jobs.py, each in the world."""
  out = run(gcs_world, [sys.executable, JOBS, 'files', gcs_world.url('files')], str(tmp_path))
  assert out.stdout.strip().endswith('files: ok'), out.stdout[-3000:] + out.stderr[-3000:]
  assert_nothing_local(str(tmp_path))


def test_unsupported_schemes_are_refused_by_name(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'heptapod_jax.sample', '--checkpoint=s3://b/run'],
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=str(tmp_path), text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 2 and "--checkpoint='s3://b/run': s3:// paths are not supported" in out.stderr, out.stderr
