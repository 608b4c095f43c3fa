"""The training system end to end: sharded training, exact resume, cross-mesh restore, configs."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags

from heptapod_jax import config_lib
from heptapod_jax.data import input_pipeline
from heptapod_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recipe(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(tmp_path, steps=4, mesh=(4, 2, 1)) -> ml_collections.ConfigDict:
  c = load_recipe('demo', f'steps={steps},tokenizer=pixel')
  c.data.data_dir = str(tmp_path / 'tfds')
  m = c.model
  m.backbone.width, m.backbone.depth, m.backbone.num_heads = 32, 2, 2
  m.head.width, m.head.depth, m.head.num_heads = 32, 1, 2
  m.backbone.dropout = m.head.dropout = 0.0
  c.optim.warmup_steps = 2
  c.optim.lr = 3e-3
  c.train.global_batch_size = 16
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.sample_every = c.train.eval_every = 0
  c.train.eval_at_end = c.train.sample_at_end = False
  c.evaluator.at_end = c.evaluator.real_baseline = False
  c.mesh.shape = mesh
  return c


def test_training_on_a_data_fsdp_mesh_reduces_the_loss(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # A relative workdir, as `make demo` passes it.
  c = tiny_config(tmp_path, steps=40)
  c.train.log_every = 5
  c.train.checkpoint_every = 40
  c.train.eval_at_end = True
  c.train.sample_at_end = True
  c.train.num_sample_images = 10
  c.train.eval_batches = 2
  summary = train.train_and_evaluate(c, 'wd')
  losses = [h['loss'] for h in summary['history']]
  assert summary['step'] == 40 and len(losses) == 8
  assert losses[-1] < losses[0] - 0.3, losses
  assert np.isfinite(summary['eval']['nll']) and summary['eval']['nll'] < np.log(16)
  png = summary['samples'][-1]
  assert os.path.exists(png) and png.startswith(str(tmp_path / 'wd' / 'samples'))
  saved = json.load(open(tmp_path / 'wd' / 'config.json'))
  assert saved['model']['head']['kind'] == 'global'
  assert os.path.isdir(tmp_path / 'wd' / 'checkpoints' / '40')


class _Recorder:
  """Wraps create_train_iterator to record a digest of every batch handed to the trainer."""

  def __init__(self, monkeypatch):
    self.digests = []
    original = input_pipeline.create_train_iterator

    def wrapped(*args, **kwargs):
      it = original(*args, **kwargs)
      recorder = self

      class It:
        def __iter__(self):
          return self

        def __next__(self):
          batch = next(it)
          recorder.digests.append(hashlib.sha256(batch['image'].tobytes() +
                                                  batch['label'].tobytes()).hexdigest())
          return batch

        def __getattr__(self, name):
          return getattr(it, name)

      return It()

    monkeypatch.setattr(input_pipeline, 'create_train_iterator', wrapped)


def _run_in_subprocess(config: ml_collections.ConfigDict, workdir, devices: int = 8):
  """Runs train_and_evaluate in a fresh Python process (a real process exit in between)."""
  script = (
      'import os, sys, json\n'
      f'os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count={devices}"\n'
      'import ml_collections\n'
      'from heptapod_jax.training import train\n'
      'config = ml_collections.ConfigDict(json.loads(sys.argv[1]))\n'
      'summary = train.train_and_evaluate(config, sys.argv[2])\n'
      'print("FINAL_STEP", summary["step"])\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  result = subprocess.run([sys.executable, '-c', script, config.to_json(), str(workdir)],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def _np(x) -> np.ndarray:
  if hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _restore_raw(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  return ocp.PyTreeCheckpointer().restore(path)


def _from_json(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config as the subprocess sees it (tuples become lists through JSON)."""
  return ml_collections.ConfigDict(json.loads(c.to_json()))


def test_exact_resume_after_process_exit(tmp_path, monkeypatch):
  straight = _from_json(tiny_config(tmp_path, steps=4))
  rec_a = _Recorder(monkeypatch)
  train.train_and_evaluate(straight, str(tmp_path / 'a'))
  straight_batches = list(rec_a.digests)
  assert len(straight_batches) == 4

  first = _from_json(tiny_config(tmp_path, steps=2))
  _run_in_subprocess(first, tmp_path / 'b')
  assert sorted(os.listdir(tmp_path / 'b' / 'checkpoints')) == ['2']
  rec_b = _Recorder(monkeypatch)
  summary = train.train_and_evaluate(straight, str(tmp_path / 'b'))  # Resumes at step 2.
  assert summary['step'] == 4
  assert rec_b.digests == straight_batches[2:]  # The same batches, in order.

  a, b = _restore_raw(tmp_path / 'a', 4), _restore_raw(tmp_path / 'b', 4)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(_np(x), _np(y))  # Bit-identical.
  data_a = json.load(open(tmp_path / 'a' / 'checkpoints' / '4' / 'data' / 'metadata'))
  data_b = json.load(open(tmp_path / 'b' / 'checkpoints' / '4' / 'data' / 'metadata'))
  assert data_a == data_b and data_a['per_process'][0]['position'] == 4 * 16


def test_checkpoint_restores_onto_a_smaller_mesh(tmp_path):
  c = _from_json(tiny_config(tmp_path, steps=2, mesh=(4, 2, 1)))
  train.train_and_evaluate(c, str(tmp_path / 'wd'))
  resumed = _from_json(tiny_config(tmp_path, steps=4, mesh=(2, 2, 1)))
  out = _run_in_subprocess(resumed, tmp_path / 'wd', devices=4)
  assert 'FINAL_STEP 4' in out
  restored = _restore_raw(tmp_path / 'wd', 4)
  floats = [_np(x) for x in jax.tree.leaves(restored) if np.issubdtype(_np(x).dtype, np.floating)]
  assert floats and all(np.isfinite(x).all() for x in floats)


def _parse_flags(*args):
  argv = ['prog', f'--config={os.path.join(ROOT, "configs", "demo.py")}:tokenizer=pixel', *args]
  flag_values = flags.FlagValues()
  # sys_argv: config_flags registers the override flags it finds there.
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_config_overrides_and_validation():
  c = _parse_flags('--config.optim.lr=0.25', '--config.model.head.kind=local')
  assert c.optim.lr == 0.25 and c.model.head.kind == 'local'
  config_lib.validate(c)
  with pytest.raises(Exception, match='lrr'):
    _parse_flags('--config.optim.lrr=1')
  with pytest.raises(Exception, match='lr'):
    _parse_flags('--config.optim.lr=fast')
  # validate() names unknown and ill-typed fields that reach it some other way.
  c = load_recipe('demo', 'tokenizer=pixel')
  c.unlock()
  c.optim.lrr = 1.0
  with pytest.raises(ValueError, match=r'config\.optim\.lrr is not a known field'):
    config_lib.validate(c)
  c = load_recipe('demo', 'tokenizer=pixel')
  with c.ignore_type():
    c.train.num_steps = 'many'
  with pytest.raises(ValueError, match=r'config\.train\.num_steps'):
    config_lib.validate(c)
  c = load_recipe('demo', 'tokenizer=pixel')
  c.model.head.kind = 'diagonal'
  with pytest.raises(ValueError, match=r"model\.head\.kind='diagonal' is not one of \['global'"):
    config_lib.validate(c)
  c = load_recipe('demo', 'tokenizer=pixel')
  c.model.vocab_size = 17
  with pytest.raises(ValueError, match='tokenizer.levels'):
    config_lib.validate(c)


def test_recipe_options_are_typed():
  opts = config_lib.parse_arg('size=L,steps=10,runlocal', size='B', steps=1, runlocal=False)
  assert (opts.size, opts.steps, opts.runlocal) == ('L', 10, True)
  with pytest.raises(ValueError, match="'colour' is not one of"):
    config_lib.parse_arg('colour=red', size='B')
  with pytest.raises(ValueError, match='expected an int'):
    config_lib.parse_arg('steps=ten', steps=1)


def test_nonfinite_loss_stops_with_step_and_metric(tmp_path):
  c = tiny_config(tmp_path, steps=6)
  c.optim.lr = 1e30  # Diverges within a few steps.
  c.optim.grad_clip = 0.0
  c.optim.warmup_steps = 0
  with pytest.raises(train.NonFiniteError, match=r'step \d+: non-finite (loss|grad_norm)'):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))


def test_init_from_loads_parameters_only(tmp_path):
  import flax.linen as nn
  from heptapod_jax.storage import checkpoint as ckpt_lib
  source = _from_json(tiny_config(tmp_path, steps=2))
  train.train_and_evaluate(source, str(tmp_path / 'src'))
  c = _from_json(tiny_config(tmp_path, steps=2))
  c.init_from = str(tmp_path / 'src' / 'checkpoints')
  c.init_from_key = 'params'
  trainer = train.Trainer(c, str(tmp_path / 'dst'))
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    shardings = trainer.state_shardings()
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'dst' / 'checkpoints'),
                                         save_interval_steps=1, max_to_keep=1)
    state, data_state = trainer.initial_state(shardings, checkpointer)
    checkpointer.close()
  assert data_state is None and int(state.step) == 0  # A fresh run: step and data from scratch.
  src = _restore_raw(tmp_path / 'src', 2)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(src['params'])):
    np.testing.assert_array_equal(_np(x), _np(y))
  # Optimizer state is fresh (zero first moments), not the source run's.
  assert all(float(np.abs(_np(m)).max()) == 0.0 for m in jax.tree.leaves(state.opt_state[1][0].mu))


def test_bfloat16_compute_matches_float32(tmp_path):
  import flax.linen as nn
  from heptapod_jax.models.config import ModelConfig
  from heptapod_jax.models.heptapod import Heptapod, compute_loss, init_params
  c = tiny_config(tmp_path)
  f32 = ModelConfig.from_dict(c.model.to_dict())
  bf16 = ModelConfig.from_dict(dict(c.model.to_dict(), dtype='bfloat16'))
  params = nn.unbox(init_params(Heptapod(f32), jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (4, 64), 0, 16)
  labels = jax.numpy.arange(4)
  l32, _ = compute_loss(Heptapod(f32), params, tokens, labels, jax.random.key(2), deterministic=True)
  l16, _ = compute_loss(Heptapod(bf16), params, tokens, labels, jax.random.key(2), deterministic=True)
  assert params['backbone']['token_embedding'].dtype == jax.numpy.float32  # f32 master weights.
  assert abs(float(l32) - float(l16)) < 0.02 * float(l32)


def test_pretokenized_training_equals_on_the_fly(tmp_path):
  from heptapod_jax.tools import tokenize_dataset
  c = _from_json(tiny_config(tmp_path, steps=3))
  c.data.augment = 'ten_crop'
  tokenize_dataset.tokenize_dataset(c, str(tmp_path / 'codes'), variants='ten_crop',
                                    shard_size=500, batch_size=100)
  train.train_and_evaluate(c, str(tmp_path / 'images'))
  c.data.tokenized_dir = str(tmp_path / 'codes')
  train.train_and_evaluate(c, str(tmp_path / 'codes_run'))
  a, b = _restore_raw(tmp_path / 'images', 3), _restore_raw(tmp_path / 'codes_run', 3)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(_np(x), _np(y))
  c.tokenizer.levels = 8
  c.model.vocab_size = 8
  with pytest.raises(ValueError, match='tokenizer.levels'):
    train.train_and_evaluate(c, str(tmp_path / 'mismatch'))
