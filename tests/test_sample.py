"""Sample mode: class balance, determinism, resume after interruption, ADM npz, metrics."""
import json
import os

import jax
import numpy as np
import pytest

from heptapod_jax import config_lib
from heptapod_jax.sampling import decode as sampling
from heptapod_jax.sampling import sample_mode as sample
from heptapod_jax.sampling.image_sampler import ImageSampler
from heptapod_jax.training import train

from test_model import setup_model
from test_train import tiny_config


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A tiny pixel-tokenizer run trained for 2 steps (its checkpoint is what sample mode reads)."""
  tmp = tmp_path_factory.mktemp('run')
  c = tiny_config(tmp, steps=2)
  c.evaluator.features = 'feature_net'
  c.evaluator.feature_net_steps = 20
  c.evaluator.num_samples = 20
  c.evaluator.at_end = True
  c.evaluator.real_baseline = True
  c.sample.chunk_size = 8
  summary = train.train_and_evaluate(c, str(tmp / 'wd'))
  return c, str(tmp / 'wd'), summary


def _config(c, **sample_fields):
  c = c.copy_and_resolve_references()
  for k, v in sample_fields.items():
    c.sample[k] = v
  return c


def test_per_example_keys_make_samples_independent_of_the_batch():
  model, params = setup_model('global')
  labels = np.arange(6, dtype=np.int32) % 5
  keys = sampling.example_keys(3, np.arange(6))
  fn = jax.jit(lambda p, l, k: sampling.sample(model, p, l, k))
  full = np.asarray(fn(params, labels, keys))
  part = np.asarray(fn(params, labels[2:5], keys[2:5]))
  np.testing.assert_array_equal(full[2:5], part)
  other_seed = np.asarray(fn(params, labels, sampling.example_keys(4, np.arange(6))))
  assert (other_seed != full).any()


def test_training_reports_generative_metrics(trained_run):
  _, wd, summary = trained_run
  gen = summary['generative']
  for key in ('fid', 'precision', 'recall', 'class_accuracy'):
    assert np.isfinite(gen[key]), key
  assert gen['num_images'] == 20 and 0 <= gen['class_accuracy'] <= 1
  real = summary['generative_real']
  assert set(real) == {'real', 'real_tokenized'}
  # Held-out real digits are far closer to the training split than an untrained model's samples.
  assert real['real']['fid'] < gen['fid']
  assert real['real']['class_accuracy'] > 0.5
  assert os.path.exists(os.path.join(wd, 'feature_net', 'params.msgpack'))


def test_sample_mode_is_balanced_deterministic_and_resumable(trained_run, tmp_path, monkeypatch):
  c, wd, _ = trained_run
  common = dict(num_samples=20, chunk_size=8, seed=5, evaluate=False)
  first = sample.sample_and_evaluate(_config(c, out_dir=str(tmp_path / 'a'), **common), wd)
  again = sample.sample_and_evaluate(_config(c, out_dir=str(tmp_path / 'b'), **common), wd)
  with np.load(first['npz']) as f:
    imgs, labels = f['arr_0'], f['arr_1']
  assert imgs.shape == (20, 32, 32, 3) and imgs.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 2))
  with np.load(again['npz']) as f:
    np.testing.assert_array_equal(f['arr_0'], imgs)
  # Chunking does not change the samples either (each sample has its own key).
  other = sample.sample_and_evaluate(
      _config(c, out_dir=str(tmp_path / 'c'), **dict(common, chunk_size=16)), wd)
  with np.load(other['npz']) as f:
    np.testing.assert_array_equal(f['arr_0'], imgs)

  # Interrupted after the first chunk, then rerun: only the missing chunks are generated and
  # the file equals the uninterrupted one.
  calls = {'n': 0}
  original = ImageSampler.sample_images

  def flaky(self, *args, **kwargs):
    calls['n'] += 1
    if calls['n'] == 2:
      raise KeyboardInterrupt('simulated preemption')
    return original(self, *args, **kwargs)

  monkeypatch.setattr(ImageSampler, 'sample_images', flaky)
  out_dir = str(tmp_path / 'resumed')
  with pytest.raises(KeyboardInterrupt):
    sample.sample_and_evaluate(_config(c, out_dir=out_dir, **common), wd)
  assert len(os.listdir(os.path.join(out_dir, 'chunks'))) == 1
  calls['n'] = 10
  resumed = sample.sample_and_evaluate(_config(c, out_dir=out_dir, **common), wd)
  assert calls['n'] == 12  # 3 chunks of 8 for 20 samples, one already on disk.
  with np.load(resumed['npz']) as f:
    np.testing.assert_array_equal(f['arr_0'], imgs)
    np.testing.assert_array_equal(f['arr_1'], labels)

  # Other settings into the same directory are refused, naming the field.
  with pytest.raises(ValueError, match='seed=5.*seed=6'):
    sample.sample_and_evaluate(_config(c, out_dir=out_dir, **dict(common, seed=6)), wd)


def test_sample_mode_evaluates_and_writes_metrics(trained_run, tmp_path):
  c, wd, _ = trained_run
  cfg = _config(c, out_dir=str(tmp_path / 'ev'), num_per_class=2, chunk_size=8, num_png=3)
  summary = sample.sample_and_evaluate(cfg, wd)
  assert summary['num_samples'] == 20
  assert len(os.listdir(tmp_path / 'ev' / 'png')) == 3
  saved = json.load(open(tmp_path / 'ev' / 'metrics.json'))
  assert saved['metrics']['fid'] == pytest.approx(summary['metrics']['fid'])
  assert np.isfinite(summary['metrics']['precision'])


def test_sample_mode_errors(trained_run, tmp_path):
  c, _, _ = trained_run
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    sample.sample_and_evaluate(_config(c), str(tmp_path / 'empty'))
  bad = c.copy_and_resolve_references()
  bad.evaluator.features = 'inception'
  with pytest.raises(ValueError, match='inception_weights'):
    config_lib.validate(bad)


def test_inception_evaluator_against_an_adm_style_reference(tmp_path):
  """The ImageNet path end to end on random weights: Inception file -> ADM npz reference ->
  fid, sfid, inception_score, precision, recall (no class accuracy: Inception's labels differ)."""
  from heptapod_jax.evaluators import generative, inception
  variables = inception.FIDInceptionV3().init(jax.random.key(0), np.zeros((1, 75, 75, 3), np.uint8))
  weights = str(tmp_path / 'inception.npz')
  inception.save_variables(weights, variables)
  rng = np.random.default_rng(0)
  ref_images = rng.integers(0, 256, (12, 48, 48, 3), dtype=np.uint8)
  adm = str(tmp_path / 'VIRTUAL_tiny.npz')
  np.savez(adm, arr_0=ref_images, mu=np.zeros(2048), sigma=np.eye(2048),
           mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  c = tiny_config(tmp_path)
  c.evaluator.features = 'inception'
  c.evaluator.inception_weights = weights
  c.evaluator.reference = adm
  c.evaluator.batch_size = 8
  c.evaluator.is_split_size = 5
  config_lib.validate(c)
  ev = generative.GenerativeEvaluator(c, str(tmp_path / 'wd'))
  metrics = ev.evaluate(rng.integers(0, 256, (10, 48, 48, 3), dtype=np.uint8), np.arange(10) % 10)
  assert {'fid', 'sfid', 'inception_score', 'precision', 'recall'} <= set(metrics)
  assert 'class_accuracy' not in metrics
  assert all(np.isfinite(v) for v in metrics.values())
  assert 'adm preprocessing' in ev.info['features']
  # The reference images' pool features (for precision/recall) were cached beside the file.
  assert os.path.exists(str(tmp_path / 'VIRTUAL_tiny.adm.features.npz'))
