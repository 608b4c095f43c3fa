"""notebooks/*.ipynb run top to bottom on a tiny budget (nbclient, a kernel on this interpreter).

The constants of each notebook's `parameters` cell are overridden by a cell inserted after it
(papermill's convention), so the notebooks stay as a user runs them.
"""
import json
import os
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = 'heptapod-tests'

# The tiny model of tests/test_train.py: compiles and trains in seconds.
TINY_MODEL = {
    'model.backbone.width': 32, 'model.backbone.depth': 1, 'model.backbone.num_heads': 2,
    'model.head.width': 32, 'model.head.depth': 1, 'model.head.num_heads': 2,
    'model.backbone.dropout': 0.0, 'model.head.dropout': 0.0,
    'train.global_batch_size': 8, 'optim.warmup_steps': 2,
}


@pytest.fixture(scope='module')
def kernel_env(tmp_path_factory):
  """A kernelspec for this interpreter (whatever `python3` kernels the machine has), found
  through JUPYTER_PATH; one CPU device in the kernel (not the 8 fake ones of conftest)."""
  tmp = tmp_path_factory.mktemp('jupyter')
  spec_dir = tmp / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'heptapod tests', 'language': 'python'}))
  saved = {k: os.environ.get(k) for k in ('JUPYTER_PATH', 'XLA_FLAGS', 'MPLBACKEND')}
  os.environ['JUPYTER_PATH'] = os.pathsep.join(
      [str(tmp)] + ([saved['JUPYTER_PATH']] if saved['JUPYTER_PATH'] else []))
  os.environ['XLA_FLAGS'] = ''
  os.environ.pop('MPLBACKEND', None)  # The kernel's inline backend renders the figures.
  yield {'data_dir': str(tmp / 'tfds')}
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _execute(name, overrides):
  """Runs notebooks/<name> with `overrides` after its parameters cell; returns the notebook."""
  from nbclient import NotebookClient
  nb = nbformat.read(os.path.join(ROOT, 'notebooks', name), as_version=4)
  where = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(where) == 1, f'{name} needs exactly one cell tagged "parameters"'
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), (
      f'{name} is committed with outputs; clear them')
  source = '\n'.join(f'{k} = {v!r}' for k, v in overrides.items())
  nb.cells.insert(where[0] + 1, nbformat.v4.new_code_cell(source))
  client = NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=180,
                          resources={'metadata': {'path': os.path.join(ROOT, 'notebooks')}})
  client.execute()
  return nb


def _images(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
          if 'image/png' in o.get('data', {})]


def _text(nb):
  return ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                 for o in c.get('outputs', []))


@pytest.mark.slow
def test_quickstart_trains_when_no_checkpoint_and_samples(kernel_env, tmp_path):
  nb = _execute('quickstart.ipynb', {
      'CHECKPOINT': str(tmp_path / 'no_such_run'), 'WORKDIR': str(tmp_path / 'quick'),
      'TRAIN_STEPS': 2, 'CLASSES': [0, 3, 7], 'NUM_IMAGES': 6, 'DATA_DIR': kernel_env['data_dir'],
      'CONFIG_OVERRIDES': dict(TINY_MODEL, **{'train.checkpoint_every': 2})})
  assert len(_images(nb)) >= 1
  assert os.path.exists(tmp_path / 'quick' / 'quickstart_samples.png')
  assert 'trained here' in _text(nb)


@pytest.mark.slow
def test_train_tiny_runs_every_stage(kernel_env, tmp_path):
  # The pixel tokenizer: compiling even a tiny VQ trainer takes ~40 s on 2 cores (the VQ stage
  # is train_tokenizer.train_and_evaluate, which tests/test_train_tokenizer.py covers).
  nb = _execute('train_tiny.ipynb', {
      'WORKDIR': str(tmp_path / 'tiny'), 'TOKENIZER': 'pixel', 'STEPS': 4, 'LOG_EVERY': 2,
      'SAMPLES_PER_CLASS': 1, 'DATA_DIR': kernel_env['data_dir'],
      'CONFIG_OVERRIDES': TINY_MODEL})
  # Data, tokenizer round trip, loss curves, samples.
  assert len(_images(nb)) == 4
  for name in ('loss_curves.png', 'samples.png'):
    assert os.path.exists(tmp_path / 'tiny' / name), name
  assert 'last NLL by distance' in _text(nb)


@pytest.mark.slow
def test_cifar10_runs_on_tfds_mock_data(kernel_env, tmp_path):
  """notebooks/cifar10.ipynb on TFDS's mock of cifar10 (random images, no download), the tiny
  recipe, two resumable pieces per stage."""
  nb = _execute('cifar10.ipynb', {
      'WORKDIR': str(tmp_path / 'cifar10'), 'MOCK_DATA': True, 'TINY': True,
      'TOKENIZER_STEPS': 4, 'STEPS': 4, 'CHUNKS': 2, 'SAMPLES_PER_CLASS': 1,
      'DATA_DIR': str(tmp_path / 'tfds'),
      'TOKENIZER_OVERRIDES': {'train.log_every': 1, 'train.global_batch_size': 8},
      'CONFIG_OVERRIDES': dict(TINY_MODEL, **{'train.log_every': 1,
                                              'evaluator.feature_net_steps': 5,
                                              'evaluator.num_samples': 20})})
  # Data, tokenizer curves, reconstructions, Heptapod curves, samples.
  assert len(_images(nb)) == 5
  assert os.path.exists(tmp_path / 'cifar10' / 'samples_per_class.png')
  text = _text(nb)
  assert 'held-out NLL per token' in text and 'samples' in text and 'fid' in text
