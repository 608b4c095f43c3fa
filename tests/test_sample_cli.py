"""`python -m heptapod_jax.sample`: grid layout, determinism, equality with `sampling.sample`,
the three checkpoint layouts, the damaged-checkpoint fallback and the error messages."""
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from heptapod_jax import config_lib, images, sample
from heptapod_jax.models.heptapod import Heptapod, init_params
from heptapod_jax.models.tokenizers import decode_tokens
from heptapod_jax.sampling import decode as sampling
from heptapod_jax.storage import checkpoint_read
from heptapod_jax.storage import runs
from heptapod_jax.storage.tokenizer_checkpoint import make_tokenizer
from heptapod_jax.training import train

from test_train import tiny_config

# A restore of the deliberately damaged step leaves an Orbax task behind that fails once its
# event loop is gone; pytest reports that later, against whichever test runs then.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 64 + 2  # 32x32 digits are enlarged to 64 pixels by images.make_grid, 2 pixels apart.


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny pixel-tokenizer run trained for 2 steps, checkpoints at steps 1 and 2."""
  tmp = tmp_path_factory.mktemp('cli')
  c = tiny_config(tmp, steps=2)
  c.train.checkpoint_every = 1
  c.train.async_checkpoints = False
  train.train_and_evaluate(c, str(tmp / 'wd'))
  return c, str(tmp / 'wd')


def _png(path):
  return np.asarray(Image.open(path).convert('RGB'))


def _direct_samples(c, checkpoint_dir, labels, seed, key='ema_params', step=None):
  """The independent path: unsharded `sampling.sample` with the same per-image keys, decoded."""
  model = Heptapod(config_lib.validate(c))
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      abstract)
  params = checkpoint_read.load_params(checkpoint_dir, abstract, step=step, key=key)
  keys = sampling.example_keys(seed, np.arange(len(labels)))
  scfg = sampling.SamplingConfig(**c.sampling.to_dict())
  tokens = jax.jit(lambda p, l, k: sampling.sample(model, p, l, k, scfg))(
      params, np.asarray(labels, np.int32), keys)
  tokenizer, tok_params = make_tokenizer(c.tokenizer, c.data.image_size)
  grid = tokens.reshape(len(labels), *model.config.grid_size)
  return images.to_uint8(np.asarray(decode_tokens(tokenizer, tok_params, grid)))


def test_grid_pngs_determinism_and_equality_with_sampling_sample(run, tmp_path, capsys):
  c, wd = run
  argv = ['--checkpoint', wd, '--classes', '1,4,7', '--n', '7', '--seed', '3']
  summary = sample.main(argv + ['--out', str(tmp_path / 'grid.png'), '--out_dir',
                                str(tmp_path / 'pngs'), '--batch', '4'])
  printed = capsys.readouterr().out
  assert str(tmp_path / 'grid.png') in printed and str(tmp_path / 'pngs') in printed
  assert summary['step'] == 2 and summary['params'] == 'ema_params'
  # One column per class, ceil(7 / 3) = 3 rows.
  grid = _png(tmp_path / 'grid.png')
  assert grid.shape == (3 * TILE + 2, 3 * TILE + 2, 3)
  names = sorted(os.listdir(tmp_path / 'pngs'))
  labels = [1, 4, 7, 1, 4, 7, 1]
  assert names == [f'{i:06d}_class{c}.png' for i, c in enumerate(labels)]
  pngs = np.stack([_png(tmp_path / 'pngs' / n) for n in names])
  assert pngs.shape == (7, 32, 32, 3)

  # Same seed, another batch size: the same images.
  sample.main(argv + ['--out', str(tmp_path / 'again.png'), '--batch', '7'])
  np.testing.assert_array_equal(_png(tmp_path / 'again.png'), grid)
  # Another seed: other images.
  sample.main(argv[:-1] + ['4', '--out', str(tmp_path / 'other.png')])
  assert (_png(tmp_path / 'other.png') != grid).any()

  direct = _direct_samples(c, os.path.join(wd, 'checkpoints'), labels, seed=3)
  np.testing.assert_array_equal(pngs, direct)
  np.testing.assert_array_equal(grid, images.make_grid(direct, ncols=3))


def test_checkpoints_dir_step_dir_raw_params_and_default_output(run, tmp_path, capsys):
  c, wd = run
  ckpt = os.path.join(wd, 'checkpoints')
  by_dir = sample.main(['--checkpoint', ckpt, '--classes', '2', '--n', '2', '--step', '1',
                        '--params', 'raw', '--out_dir', str(tmp_path / 'a')])
  by_step = sample.main(['--checkpoint', os.path.join(ckpt, '1'), '--classes', '2', '--n', '2',
                         '--params', 'raw', '--out_dir', str(tmp_path / 'b')])
  assert by_dir['step'] == by_step['step'] == 1 and by_step['params'] == 'params'
  # No --out: the grid goes into the run's samples/ directory.
  assert by_step['grid'] == os.path.join(wd, 'samples', 'cli_step1_seed0.png')
  assert os.path.exists(by_step['grid'])
  a = np.stack([_png(tmp_path / 'a' / n) for n in sorted(os.listdir(tmp_path / 'a'))])
  b = np.stack([_png(tmp_path / 'b' / n) for n in sorted(os.listdir(tmp_path / 'b'))])
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, _direct_samples(c, ckpt, [2, 2], seed=0, key='params', step=1))
  # A step directory copied out of its run: the config comes from the step itself.
  shutil.copytree(os.path.join(ckpt, '1'), tmp_path / 'copied' / '1')
  alone = sample.main(['--checkpoint', str(tmp_path / 'copied' / '1'), '--classes', '2', '--n',
                       '2', '--params', 'raw', '--out_dir', str(tmp_path / 'c')])
  assert alone['step'] == 1 and alone['grid'] == str(tmp_path / 'samples' / 'cli_step1_seed0.png')
  c_pngs = np.stack([_png(tmp_path / 'c' / n) for n in sorted(os.listdir(tmp_path / 'c'))])
  np.testing.assert_array_equal(c_pngs, a)
  capsys.readouterr()


def test_relative_tokenizer_path_is_found_from_the_run(tmp_path, monkeypatch):
  """configs/demo.py stores 'workdirs/demo/tokenizer/tokenizer', relative to the repository."""
  (tmp_path / 'repo' / 'workdirs' / 'demo' / 'tokenizer' / 'tokenizer').mkdir(parents=True)
  (tmp_path / 'elsewhere').mkdir()
  monkeypatch.chdir(tmp_path / 'elsewhere')
  workdir = str(tmp_path / 'repo' / 'workdirs' / 'demo')
  location = runs.RunLocation(workdir, os.path.join(workdir, 'checkpoints'), None)
  c = config_lib.base_config()
  c.tokenizer.kind = 'vq'
  c.tokenizer.checkpoint = 'workdirs/demo/tokenizer/tokenizer'
  runs.resolve_tokenizer(c, location, None)
  assert c.tokenizer.checkpoint == os.path.join(workdir, 'tokenizer', 'tokenizer')
  c.tokenizer.checkpoint = 'workdirs/other/tokenizer'
  with pytest.raises(FileNotFoundError, match="'workdirs/other/tokenizer'.*--tokenizer=DIR"):
    runs.resolve_tokenizer(c, location, None)


def test_damaged_latest_step_falls_back_read_only(run, tmp_path, capsys):
  _, wd = run
  copy = str(tmp_path / 'wd')
  shutil.copytree(wd, copy)
  for p in (tmp_path / 'wd' / 'checkpoints' / '2').glob('state/**/d/*'):
    if p.is_file():
      with open(p, 'r+b') as f:
        f.truncate(p.stat().st_size // 2)
  summary = sample.main(['--checkpoint', copy, '--classes', '0', '--n', '1',
                         '--out', str(tmp_path / 'g.png')])
  assert summary['step'] == 1 and [s for s, _ in summary['skipped']] == [2]
  assert 'newer steps skipped' in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['1', '2']  # Nothing moved.
  # An explicit step is never replaced by another one.
  with pytest.raises(SystemExit):
    sample.main(['--checkpoint', copy, '--step', '2', '--n', '1'])
  assert 'no step of' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--temperature', '-1'], '--temperature=-1.0: must be >= 0'),
    (['--top_p', '0'], '--top_p=0.0: must be in (0, 1]'),
    (['--top_k', '-2'], '--top_k=-2: must be >= 0'),
    (['--n', '0'], '--n=0: must be >= 1'),
    (['--classes', 'a,b'], "--classes='a,b': expected comma-separated integers"),
    (['--classes', '3,10,12'], '[10, 12] out of range; this model has num_classes=10'),
    (['--step', '5'], '--step=5: '),
    (['--cfg_scale', '2'], 'needs a model trained with class dropout'),
    (['--params', 'both'], "invalid choice: 'both'"),
    (['--parallel_tokens', '0'], '--parallel_tokens=0: must be >= 1'),
])
def test_errors_name_the_problem(run, capsys, args, message):
  _, wd = run
  with pytest.raises(SystemExit) as e:
    sample.main(['--checkpoint', wd] + args)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_errors_about_the_checkpoint_path(run, tmp_path, capsys):
  _, wd = run
  with pytest.raises(SystemExit):
    sample.main(['--checkpoint', str(tmp_path / 'missing')])
  assert f'--checkpoint={tmp_path / "missing"} does not exist' in capsys.readouterr().err
  (tmp_path / 'other').mkdir()
  with pytest.raises(SystemExit):
    sample.main(['--checkpoint', str(tmp_path / 'other')])
  assert 'is not a run' in capsys.readouterr().err
  # A run without checkpoints (only config.json so far).
  (tmp_path / 'fresh').mkdir()
  shutil.copy(os.path.join(wd, 'config.json'), tmp_path / 'fresh' / 'config.json')
  with pytest.raises(SystemExit):
    sample.main(['--checkpoint', str(tmp_path / 'fresh')])
  assert 'has not saved a checkpoint yet' in capsys.readouterr().err


def test_command_line_in_a_fresh_process(run, tmp_path):
  _, wd = run
  out = tmp_path / 'grid.png'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  proc = subprocess.run(
      [sys.executable, '-m', 'heptapod_jax.sample', '--checkpoint', wd, '--classes', '5,6',
       '--n', '4', '--out', str(out), '--temperature', '0.5'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'grid (2 rows x 2 columns, one column per class): {out}' in proc.stdout
  assert _png(out).shape == (2 * TILE + 2, 2 * TILE + 2, 3)



def test_parallel_tokens_flag_reaches_the_sampler(run, tmp_path):
  """--parallel_tokens=2 gives exactly what `sampling.sample` gives with parallel_tokens=2."""
  c, wd = run
  summary = sample.main(['--checkpoint', wd, '--classes', '0,5', '--n', '4', '--seed', '2',
                         '--parallel_tokens', '2', '--out_dir', str(tmp_path / 'k2')])
  assert summary['step'] == 2
  pngs = np.stack([_png(tmp_path / 'k2' / n) for n in sorted(os.listdir(tmp_path / 'k2'))])
  c2 = c.copy_and_resolve_references()
  c2.sampling.parallel_tokens = 2
  direct = _direct_samples(c2, os.path.join(wd, 'checkpoints'), [0, 5, 0, 5], seed=2)
  np.testing.assert_array_equal(pngs, direct)
