"""Non-finite updates, checkpoint saves that fail, and config errors caught before any
device work."""
import errno

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from heptapod_jax import config_lib
from heptapod_jax.data import input_pipeline
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.training import steps as step_lib  # The pure step: its loss is what gets poisoned.
from heptapod_jax.training import train, trainlib

import _harness as h


def _bad_step_indices(config, num_steps):
  """Steps whose batch has equal first two labels: where the injected NaN lands."""
  it = input_pipeline.create_train_iterator(config.data, global_batch_size=16, seed=config.seed)
  return [i for i in range(num_steps) if (lambda b: b['label'][0] == b['label'][1])(next(it))]


def test_nonfinite_updates_are_skipped_counted_and_never_applied(tmp_path, digits_dir, monkeypatch):
  steps = 20
  c = h.config(steps, digits_dir, **{'train.on_nonfinite': 'skip', 'train.max_nonfinite_skips': 5,
                                     'train.log_every': 1})
  bad = _bad_step_indices(c, steps)
  assert 1 <= len(bad) <= 5, bad  # The seed gives a usable number of bad batches.
  real_loss = step_lib.compute_loss

  def poisoned(model, params, tokens, labels, rng, **kw):
    loss, metrics = real_loss(model, params, tokens, labels, rng, **kw)
    return loss * jnp.where(labels[0] == labels[1], jnp.nan, 1.0), metrics

  monkeypatch.setattr(step_lib, 'compute_loss', poisoned)
  summary = train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert summary['step'] == steps
  skips = [r['nonfinite_skipped'] for r in summary['history']]
  assert skips[-1] == len(bad)
  # Logged after step s (1-based) = bad updates among the first s.
  assert skips == [sum(1 for b in bad if b < s) for s in range(1, steps + 1)]
  state = h.restore_state(tmp_path / 'wd', steps)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))
  assert int(np.asarray(state['step'])) == steps


def test_too_many_nonfinite_skips_stop_the_run(tmp_path, digits_dir):
  c = h.config(6, digits_dir, **{'train.on_nonfinite': 'skip', 'train.max_nonfinite_skips': 1,
                                 'optim.lr': 1e30, 'optim.grad_clip': 0.0,
                                 'optim.warmup_steps': 0})
  with pytest.raises(train.NonFiniteError, match=r'non-finite updates skipped, more than '
                     r'config.train.max_nonfinite_skips=1'):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))


def _failing_saves(monkeypatch, fail_at):
  real = ckpt_lib.Checkpointer.save

  def save(self, step, *args, **kwargs):
    if step in fail_at:
      raise OSError(errno.ENOSPC, 'No space left on device (simulated)', str(self.directory))
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, 'save', save)


def test_failed_saves_are_reported_and_the_run_goes_on(tmp_path, digits_dir, monkeypatch, caplog):
  _failing_saves(monkeypatch, fail_at={2, 4})
  summary = train.train_and_evaluate(h.config(8, digits_dir), str(tmp_path / 'wd'))
  assert summary['step'] == 8
  assert h.saved_steps(tmp_path / 'wd') == [6, 8]
  assert summary['train']['checkpoint_save_failures'] == 2
  messages = ' '.join(r.getMessage() for r in caplog.records)
  assert 'Checkpoint save at step 2' in messages and 'No space left on device' in messages


def test_saves_failing_in_a_row_stop_the_run_naming_the_step(tmp_path, digits_dir, monkeypatch):
  _failing_saves(monkeypatch, fail_at={4, 6, 8})
  c = h.config(10, digits_dir, **{'train.max_save_failures': 3})
  with pytest.raises(trainlib.CheckpointSaveError,
                     match=r'3 checkpoint saves in a row failed, the last at step 8 .*'
                     r'Latest intact checkpoint: 2'):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert h.saved_steps(tmp_path / 'wd') == [2]  # Nothing lost.


def _parse(*args):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True)
  fv(['prog', *args])
  return fv.config


@pytest.mark.parametrize('args, message', [
    (('--config.train.num_steps=abc',), 'num_steps'),
    (('--config.train.num_stepz=3',), 'num_stepz'),
])
def test_flag_type_and_unknown_field_errors_name_the_field(args, message):
  with pytest.raises(Exception, match=message):
    _parse(f'--config={h.recipe(10)}', *args)


@pytest.mark.parametrize('overrides, message', [
    ({'train.global_batch_size': 12}, r'global_batch_size=12 is not divisible by the 8 '
                                      r'data-parallel shards'),
    ({'model.grid_size': (4, 4)}, r'config.model.grid_size=\(4, 4\) does not match the pixel '
                                  r'tokenizer grid'),
    ({'mesh.shape': (4, 4, 1)}, r'mesh.shape=\(4, 4, 1\) uses 16 devices, but 8 are available'),
    ({'train.on_nonfinite': 'ignore'}, r"config.train.on_nonfinite='ignore' is not one of"),
    ({'model.head.kind': 'diagonal'}, r"model.head.kind='diagonal' is not one of"),
])
def test_config_errors_before_device_work(tmp_path, digits_dir, overrides, message):
  c = h.config(4, digits_dir, **overrides)
  with pytest.raises(ValueError, match=message):
    train.Trainer(c, str(tmp_path / 'wd'))
  assert not (tmp_path / 'wd').exists()


def test_unknown_config_field_is_named(tmp_path, digits_dir):
  c = h.config(4, digits_dir)
  c.train.unlocked = True
  with pytest.raises(ValueError, match='unlocked'):
    config_lib.validate(c)


def test_metric_writes_that_fail_are_dropped_and_retried(tmp_path, caplog):
  """trainlib.TolerantWriter: a failing writer is logged once per failure, dropped, and made
  again after retry_s; the run's calls never raise."""
  made, written, now = [], [], [0.0]

  class Writer:
    def __init__(self, broken):
      self.broken = broken

    def write_scalars(self, step, scalars):
      if self.broken:
        raise OSError(errno.ENOSPC, 'No space left on device')
      written.append((step, scalars))

    def close(self):
      pass

  def make():
    made.append(Writer(broken=len(made) == 0))  # The first writer fails, the next ones work.
    return made[-1]

  writer = trainlib.TolerantWriter(make, str(tmp_path), retry_s=60, clock=lambda: now[0])
  writer.write_scalars(1, {'loss': 1.0})  # Fails: logged, the writer dropped.
  writer.write_scalars(2, {'loss': 0.9})  # Within retry_s: dropped without a new writer.
  assert len(made) == 1 and writer.failures == 2 and not written
  assert f'Metrics could not be written to {tmp_path}' in caplog.text
  assert 'at step 1' in caplog.text and 'No space left on device' in caplog.text
  now[0] = 61.0
  writer.write_scalars(3, {'loss': 0.8})  # A new writer; the metrics are back.
  writer.close()
  assert len(made) == 2 and written == [(3, {'loss': 0.8})]
  assert 'Metrics are written to' in caplog.text and '(2 writes were dropped)' in caplog.text
