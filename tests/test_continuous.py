"""Continuous tokens (model.tokens='kl'): cached decode, the loss's support, sampling, training."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax import config_lib
from heptapod_jax.models import objective
from heptapod_jax.models.heptapod import compute_loss, continuous_pair_loss
from heptapod_jax.models.tokenizers import kl
from heptapod_jax.sampling import decode as sampling
from heptapod_jax.storage import tokenizer_checkpoint as tok_io
from heptapod_jax.training import train

from test_model import KINDS, N, cached_step_logits, setup_model
from test_train import _np, _restore_raw, load_recipe

C = 3  # Channels of a continuous token.
CONTINUOUS = dict(tokens='kl', token_dim=C,
                  diffusion=dict(width=32, depth=2, batch_mul=2, num_sampling_steps=10))


def continuous_model(kind, **over):
  return setup_model(kind, **CONTINUOUS, **over)


def perturb_denoiser(params):
  """The denoiser starts with zero output layers (eps_hat = 0 whatever x_t and z, so nothing
  upstream gets a gradient): perturb it so that the loss depends on targets and conditions."""
  leaves, treedef = jax.tree.flatten(params['diffusion'])
  keys = jax.random.split(jax.random.key(9), len(leaves))
  return dict(params, diffusion=jax.tree.unflatten(
      treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def random_latents(seed=1, batch=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (batch, N, C)), jax.random.randint(k2, (batch,), 0, 5)


@pytest.mark.parametrize('kind', KINDS)
def test_cached_decode_equals_full_forward(kind):
  model, params = continuous_model(kind)
  tokens, labels = random_latents()
  steps = jnp.broadcast_to(jnp.arange(N), (tokens.shape[0], N))
  full = model.apply({'params': params}, tokens, labels, steps, steps[..., None])[:, :, 0]
  assert full.shape == (3, N, model.config.head.width if kind != 'next_token'
                        else model.config.backbone.width)
  cached = cached_step_logits(model, params, tokens, labels)[:, :, 0]
  np.testing.assert_allclose(cached, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize('kind', KINDS)
def test_loss_gradient_ignores_visible_targets(kind):
  model, params = continuous_model(kind)
  params = perturb_denoiser(params)
  tokens, labels = random_latents(batch=2)
  cfg = model.config
  t = 5
  steps = jnp.full((2, 1), t)
  targets, valid = objective.candidate_targets(cfg, steps)
  z = model.apply({'params': params}, tokens, labels, steps, targets)

  def loss_of_targets(target_tokens):
    loss, _ = continuous_pair_loss(model, params, z, target_tokens, steps, targets, valid,
                                   jax.random.key(3))
    return loss

  grad = np.asarray(jax.grad(loss_of_targets)(tokens))
  np.testing.assert_array_equal(grad[:, :t], 0.0)  # Visible positions: no gradient at all.
  supervised = np.unique(np.asarray(targets)[np.asarray(valid)])
  assert supervised.min() >= t
  assert (np.abs(grad[:, supervised]).sum(-1) > 0).all()


def test_training_loss_and_metrics():
  model, params = continuous_model('global', head=dict(steps_per_image=4))
  params = perturb_denoiser(params)
  tokens, labels = random_latents(batch=4)
  loss, metrics = jax.jit(lambda p: compute_loss(model, p, tokens, labels, jax.random.key(0)))(params)
  assert np.isfinite(loss) and loss > 0
  assert {'loss', 'mse', 'mse_ahead_1'} <= set(metrics)
  grads = jax.grad(lambda p: compute_loss(model, p, tokens, labels, jax.random.key(0))[0])(params)
  norms = {k: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(v)))
           for k, v in grads.items()}
  assert all(v > 0 for v in norms.values()), norms  # Backbone, head and diffusion all learn.


def test_sampling_is_jitted_and_per_sample():
  model, params = continuous_model('global')
  labels = np.arange(4, dtype=np.int32) % 5
  keys = sampling.example_keys(0, np.arange(4))
  fn = jax.jit(lambda p, l, k: sampling.sample(model, p, l, k))
  out = np.asarray(fn(params, labels, keys))
  assert out.shape == (4, N, C) and out.dtype == np.float32 and np.isfinite(out).all()
  part = np.asarray(fn(params, labels[1:3], keys[1:3]))
  np.testing.assert_allclose(part, out[1:3], atol=1e-5)
  with pytest.raises(ValueError, match='not supported for continuous'):
    sampling.sample(model, params, labels, keys, sampling.SamplingConfig(cfg_scale=2.0))


def tiny_kl_checkpoint(directory, embed_dim=4):
  cfg = kl.KLConfig(image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, dec_num_res_blocks=1,
                    embed_dim=embed_dim)
  params = kl.init_params(cfg, jax.random.key(0))
  tok_io.save_tokenizer(str(directory), 'kl', cfg, params)
  return str(directory)


def test_trainer_runs_with_a_kl_tokenizer(tmp_path):
  c = load_recipe('demo', 'steps=2,tokenizer=kl')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.tokenizer.checkpoint = tiny_kl_checkpoint(tmp_path / 'kl')
  m = c.model
  m.backbone.width, m.backbone.depth, m.backbone.num_heads = 32, 1, 2
  m.head.width, m.head.depth, m.head.num_heads = 32, 1, 2
  m.diffusion.num_sampling_steps = 5
  c.train.global_batch_size = 8
  c.train.log_every = 1
  c.train.eval_batches = 1
  c.train.num_sample_images = 4
  c.evaluator.at_end = c.evaluator.real_baseline = False
  out = train.train_and_evaluate(c, str(tmp_path / 'ar'))
  assert out['step'] == 2 and np.isfinite(out['eval']['mse'])
  assert np.isfinite(out['train']['mse_ahead_1'])
  assert os.path.exists(out['samples'][-1])

  # Pre-tokenized moments (mean, std) train the same model as on-the-fly encoding: the same
  # views, the same posterior noise, so the same parameters (up to the encoder's float noise).
  from heptapod_jax.tools import tokenize_dataset
  tokenize_dataset.tokenize_dataset(c, str(tmp_path / 'moments'), variants='center',
                                    shard_size=1000, batch_size=100)
  pre = c.copy_and_resolve_references()
  pre.data.tokenized_dir = str(tmp_path / 'moments')
  pre.train.eval_at_end = pre.train.sample_at_end = False
  train.train_and_evaluate(pre, str(tmp_path / 'ar_pre'))
  a, b = _restore_raw(tmp_path / 'ar', 2), _restore_raw(tmp_path / 'ar_pre', 2)
  for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])):
    np.testing.assert_allclose(_np(x), _np(y), atol=1e-5, rtol=0)

  # A continuous model needs the KL tokenizer, with matching channels.
  bad = c.copy_and_resolve_references()
  bad.model.token_dim = 16
  with pytest.raises(ValueError, match='token_dim=4'):
    tok_io.check_model_config(bad, config_lib.validate(bad))
  bad = c.copy_and_resolve_references()
  bad.tokenizer.kind = 'pixel'
  with pytest.raises(ValueError, match='needs config.tokenizer.kind="kl"'):
    config_lib.validate(bad)


def test_probe_features_of_latents_are_the_mean_of_the_states():
  """The linear probe reads continuous tokens as latents (it used to cast them to ids), and a
  batch that does not divide the set is padded with latents of the right shape."""
  from heptapod_jax.evaluators import probe
  from heptapod_jax.models.heptapod import Heptapod
  model, params = continuous_model('global')
  tokens, _ = random_latents(batch=5)
  states = model.apply({'params': params}, tokens, jnp.zeros((5,), jnp.int32),
                       method=Heptapod.states)
  expected = np.asarray(jnp.mean(states[:, 1:], axis=1))
  got = probe.extract_features(model, params, np.asarray(tokens), layer=-1, batch_size=2, label=0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  truncated = probe.extract_features(model, params, np.asarray(tokens).round(), layer=-1,
                                     batch_size=2, label=0)
  assert not np.allclose(truncated, got, atol=1e-3)  # The latents' fractions matter.
