"""The tokenizer trainer: VQ and KL training steps, LPIPS + GAN path, export, and AR training on it."""
import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from heptapod_jax import config_lib
from heptapod_jax.storage.tokenizer_checkpoint import check_model_config, make_tokenizer
from heptapod_jax.training import train, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_recipe(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_tokenizer_config(tmp_path, steps=4, kind='vq') -> ml_collections.ConfigDict:
  c = load_recipe('vq_demo', f'steps={steps},codes=16')
  c.data.data_dir = str(tmp_path / 'tfds')
  c.tokenizer.kind = kind
  for section in (c.tokenizer.vq, c.tokenizer.kl):
    section.image_size = 32
    section.ch = 32
    section.ch_mult = (1, 2, 2)
    section.num_res_blocks = 1
    section.dec_num_res_blocks = 1
  c.tokenizer.vq.z_channels = 32
  c.tokenizer.kl.embed_dim = 4
  c.train.global_batch_size = 8
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.eval_batches = 1
  c.train.num_recon_images = 4
  c.mesh.shape = (-1, 1, 1)
  return c


def test_vq_with_lpips_and_gan_trains_exports_and_feeds_the_ar_trainer(tmp_path):
  c = tiny_tokenizer_config(tmp_path, steps=4)
  c.loss.perceptual_weight = 1.0
  c.loss.disc_weight = 0.5
  c.loss.disc_start = 2  # The GAN terms switch on for the last two steps.
  summary = train_tokenizer.train_and_evaluate(c, str(tmp_path / 'tok'))
  assert summary['step'] == 4
  gan = [h['gan_on'] for h in summary['history']]
  assert gan == [0.0, 1.0]
  assert summary['history'][-1]['disc_loss'] > 0 and np.isfinite(summary['history'][-1]['perceptual'])
  for key in ('psnr', 'ssim', 'lpips', 'codebook_usage', 'codebook_perplexity'):
    assert np.isfinite(summary['eval'][key]), key
  assert os.path.exists(summary['reconstructions'])

  # The export is a tokenizer checkpoint the AR side loads through the config.
  ar = load_recipe('demo', 'steps=2')
  ar.data.data_dir = c.data.data_dir
  ar.tokenizer.checkpoint = summary['export']
  ar.model.vocab_size = 16
  tokenizer, params = make_tokenizer(ar.tokenizer, 32)
  assert tokenizer.grid_size == (8, 8) and tokenizer.vocab_size == 16
  images = np.zeros((2, 32, 32, 3), np.float32)
  assert tokenizer.encode_to_indices(params, images).shape == (2, 8, 8)
  m = ar.model
  m.backbone.width, m.backbone.depth, m.backbone.num_heads = 32, 1, 2
  m.head.width, m.head.depth, m.head.num_heads = 32, 1, 2
  ar.train.global_batch_size = 8
  ar.train.log_every = 1
  ar.train.eval_batches = 1
  ar.train.num_sample_images = 4
  ar.evaluator.at_end = ar.evaluator.real_baseline = False  # tests/test_sample.py covers them.
  out = train.train_and_evaluate(ar, str(tmp_path / 'ar'))
  assert out['step'] == 2 and np.isfinite(out['eval']['nll'])
  assert os.path.exists(out['samples'][-1])

  # A model whose vocabulary does not match the codebook is stopped at start-up.
  ar.model.vocab_size = 64
  with pytest.raises(ValueError, match=r'config\.model\.vocab_size=64 must equal the VQ codebook size 16'):
    check_model_config(ar, config_lib.validate(ar))


def test_vq_reconstruction_improves(tmp_path):
  c = tiny_tokenizer_config(tmp_path, steps=40)
  c.train.log_every = 10
  c.train.checkpoint_every = 40
  summary = train_tokenizer.train_and_evaluate(c, str(tmp_path / 'tok'))
  rec = [h['reconstruction'] for h in summary['history']]
  assert rec[-1] < 0.5 * rec[0], rec
  assert summary['eval']['psnr'] > 15.0


def test_kl_tokenizer_trains(tmp_path):
  c = tiny_tokenizer_config(tmp_path, steps=3, kind='kl')
  summary = train_tokenizer.train_and_evaluate(c, str(tmp_path / 'kl'))
  assert summary['step'] == 3
  assert np.isfinite(summary['history'][-1]['regulariser']) and summary['history'][-1]['regulariser'] > 0
  assert 'codebook_usage' not in summary['eval']
  from heptapod_jax.storage import tokenizer_checkpoint as io
  kind, cfg, params = io.load_tokenizer(summary['export'])
  assert kind == 'kl' and cfg.embed_dim == 4


def test_tokenizer_config_errors(tmp_path):
  c = tiny_tokenizer_config(tmp_path)
  c.tokenizer.vq.image_size = 64
  with pytest.raises(ValueError, match=r'config\.tokenizer\.vq\.image_size=64 must equal config\.data\.image_size=32'):
    config_lib.validate_tokenizer(c)
  c = tiny_tokenizer_config(tmp_path)
  c.loss.reconstruction = 'l3'
  with pytest.raises(ValueError, match=r"config\.loss\.reconstruction='l3' is not one of"):
    config_lib.validate_tokenizer(c)
  c = tiny_tokenizer_config(tmp_path)
  c.tokenizer.vq.ch = 33  # GroupNorm(32) needs multiples of 32.
  with pytest.raises(ValueError, match=r'config\.tokenizer\.vq'):
    config_lib.validate_tokenizer(c)
