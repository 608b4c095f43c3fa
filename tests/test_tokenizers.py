"""The VQ (LlamaGen) and KL (MAR) tokenizers equal their PyTorch originals; losses, errors, checkpoints.

The references in tests/torch_refs reproduce the originals' module names, so
their state dicts go through the same importer as the released checkpoints.
Every weight is randomised (GroupNorm affine and codebook included) so that a
transposed kernel or a swapped block cannot pass by symmetry.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # requirements-dev.txt; `make test` installs it. No skip: CI must run these.

sys.path.insert(0, os.path.dirname(__file__))
from torch_refs import llamagen_vq as ref_vq  # noqa: E402
from torch_refs import mar_kl as ref_kl  # noqa: E402

from heptapod_jax.models.tokenizers import autoencoder as ae  # noqa: E402
from heptapod_jax.models.tokenizers import kl as kl_lib  # noqa: E402
from heptapod_jax.models.tokenizers import vq as vq_lib  # noqa: E402
from heptapod_jax.storage import checkpoint as ckpt_lib  # noqa: E402
from heptapod_jax.storage import tokenizer_checkpoint as tok_io  # noqa: E402
from heptapod_jax.tools import convert_llamagen_vq, convert_mar_kl  # noqa: E402

TOL = 1e-4
torch.set_num_threads(2)

TINY_VQ = vq_lib.VQConfig(image_size=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          dec_num_res_blocks=2, z_channels=32, codebook_size=64,
                          codebook_embed_dim=8)
TINY_KL = kl_lib.KLConfig(image_size=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          dec_num_res_blocks=2, embed_dim=4)


def _ref_vq(c: vq_lib.VQConfig):
  assert c.dec_num_res_blocks == c.num_res_blocks + 1  # LlamaGen's decoder builds one more.
  return ref_vq.VQModel(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                        z_channels=c.z_channels, codebook_size=c.codebook_size,
                        codebook_embed_dim=c.codebook_embed_dim,
                        codebook_l2_norm=c.codebook_l2_norm, commit_loss_beta=c.commit_beta)


def _ref_kl(c: kl_lib.KLConfig):
  # LDM puts attention where the nominal resolution is 16: the lowest level when resolution = 16 * stride.
  return ref_kl.AutoencoderKL(embed_dim=c.embed_dim, ch_mult=c.ch_mult, ch=c.ch,
                              num_res_blocks=c.num_res_blocks, resolution=16 * c.downsample_factor)


def _randomize(model, seed: int):
  """Random weights with O(1) activations: fan-in scaled convs, GroupNorm affine near (1, 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 4:
        fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
      elif p.ndim == 1 and name.endswith('weight'):  # GroupNorm scale
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:  # biases, and the codebook (the quantizer l2-normalises it)
        p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model.eval()


def _numpy_state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _images(seed: int, size: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _maxdiff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- VQ parity


def _check_vq_parity(config: vq_lib.VQConfig, seed: int, batch: int = 2):
  model = _randomize(_ref_vq(config), seed)
  params = convert_llamagen_vq.convert_state_dict(_numpy_state_dict(model), config)
  x = _images(seed, config.image_size, batch)
  with torch.no_grad():
    t_lat = model.encode_latents(_nchw(x))
    t_quant, (t_vq, t_commit), t_idx = model.quantize(t_lat)
    t_rec = model.decode(t_quant)
    t_code = model.decode_code(t_idx, t_quant.shape)
  module = vq_lib.VQModel(config)
  variables = {'params': params}

  @jax.jit
  def run(variables, x):
    lat = module.apply(variables, x, method=vq_lib.VQModel.encode_latents)
    quant, idx, _ = module.apply(variables, x, method=vq_lib.VQModel.encode)
    rec, aux = module.apply(variables, x)
    code = module.apply(variables, idx, method=vq_lib.VQModel.decode_code)
    return lat, quant, idx, rec, aux, code

  lat, quant, idx, rec, aux, code = run(variables, x)
  np.testing.assert_array_equal(np.asarray(idx), t_idx.numpy().reshape(idx.shape))
  diffs = {'latents': _maxdiff(lat, _nhwc(t_lat)), 'quantized': _maxdiff(quant, _nhwc(t_quant)),
           'reconstruction': _maxdiff(rec, _nhwc(t_rec)), 'decode_code': _maxdiff(code, _nhwc(t_code))}
  print(f'VQ {config.ch}x{config.ch_mult}: max |flax - torch| {diffs}')
  for name, d in diffs.items():
    assert d < TOL, (name, d)
  np.testing.assert_allclose(float(aux['codebook_loss']), float(t_vq), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(aux['commitment_loss']), float(t_commit), rtol=1e-4, atol=1e-6)
  assert int(aux['histogram'].sum()) == idx.size
  return params


def test_vq_tiny_matches_llamagen_reference():
  _check_vq_parity(TINY_VQ, seed=0)


def test_vq16_default_widths_match_llamagen_reference():
  """The real VQ-16 key mapping (72M parameters) at a 32x32 input (2x2 codes)."""
  config = dataclasses.replace(vq_lib.VQConfig(), image_size=32)
  params = _check_vq_parity(config, seed=1, batch=1)
  n = sum(v.size for v in ae.flatten_params(params).values())
  assert 71_000_000 < n < 73_000_000  # LlamaGen reports 72M for vq_ds16_c2i.


def test_vq_tokenizer_contract_and_jit():
  model = _randomize(_ref_vq(TINY_VQ), 2)
  params = convert_llamagen_vq.convert_state_dict(_numpy_state_dict(model), TINY_VQ)
  tok = vq_lib.VQTokenizer(TINY_VQ)
  assert tok.grid_size == (16, 16) and tok.vocab_size == 64
  x = _images(3, 32)
  idx = jax.jit(tok.encode_to_indices)(params, x)
  assert idx.shape == (2, 16, 16) and idx.dtype == jnp.int32
  images = jax.jit(tok.decode_from_indices)(params, idx)
  assert images.shape == (2, 32, 32, 3) and images.dtype == jnp.float32
  assert float(jnp.abs(images).max()) <= 1.0
  with torch.no_grad():
    _, _, t_idx = model.quantize(model.encode_latents(_nchw(x)))
    t_img = model.decode_code(t_idx, (2, 8, 16, 16))
  np.testing.assert_array_equal(np.asarray(idx).reshape(-1), t_idx.numpy())
  assert _maxdiff(images, np.clip(_nhwc(t_img), -1, 1)) < TOL


def test_entropy_loss_matches_llamagen():
  affinity = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
  ours = vq_lib.entropy_loss(jnp.asarray(affinity), 0.01)
  theirs = ref_vq.compute_entropy_loss(torch.from_numpy(affinity), temperature=0.01)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- VQ training behaviour


def test_vq_straight_through_gradients_and_commitment_loss():
  config = dataclasses.replace(TINY_VQ, entropy_loss_weight=0.1)
  module = vq_lib.VQModel(config)
  params = vq_lib.init_params(config, jax.random.key(0))
  x = jnp.asarray(_images(4, 32))

  def objectives(p):
    rec, aux = module.apply({'params': p}, x, train=True)
    return jnp.stack([jnp.sum(rec), aux['codebook_loss'], aux['commitment_loss']])

  @jax.jit
  def run(p):
    _, aux = module.apply({'params': p}, x)
    z = module.apply({'params': p}, x, method=vq_lib.VQModel.encode_latents)
    return jax.jacrev(objectives)(p), aux, z

  grads, aux, z = run(params)
  assert np.isfinite(float(aux['entropy_loss'])) and float(aux['entropy_loss']) != 0.0
  np.testing.assert_allclose(float(aux['loss']), float(
      aux['codebook_loss'] + aux['commitment_loss'] + aux['entropy_loss']), rtol=1e-6)

  def norm(i, name):
    return float(sum(jnp.sum(jnp.square(v[i])) for v in jax.tree.leaves(grads[name])))

  # Reconstruction reaches the encoder through the straight-through estimator; the codebook
  # learns only from its own loss, the encoder from the commitment loss.
  assert norm(0, 'encoder') > 0 and norm(0, 'quant_conv') > 0 and norm(0, 'quantize') == 0
  assert norm(1, 'quantize') > 0 and norm(1, 'encoder') == 0
  assert norm(2, 'encoder') > 0 and norm(2, 'quantize') == 0

  z = np.asarray(z, np.float64)
  table = np.asarray(params['quantize']['embedding']['embedding'], np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  table = table / np.linalg.norm(table, axis=-1, keepdims=True)
  flat = z.reshape(-1, z.shape[-1])
  idx = np.argmin(((flat[:, None] - table[None]) ** 2).sum(-1), axis=1)
  commit_np = config.commit_beta * np.mean((table[idx] - flat) ** 2)
  np.testing.assert_allclose(float(aux['commitment_loss']), commit_np, rtol=1e-5)
  np.testing.assert_allclose(float(aux['codebook_loss']), commit_np / config.commit_beta, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux['indices']).reshape(-1), idx)
  hist = np.bincount(idx, minlength=config.codebook_size)
  np.testing.assert_array_equal(np.asarray(aux['histogram']), hist)
  p = hist[hist > 0] / idx.size
  np.testing.assert_allclose(float(aux['perplexity']), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)


# --------------------------------------------------------------------------- KL parity


def _check_kl_parity(config: kl_lib.KLConfig, seed: int, batch: int = 2):
  model = _randomize(_ref_kl(config), seed)
  sd = _numpy_state_dict(model)
  sd['loss.logvar'] = np.zeros(())  # LDM training-loss entries are skipped by the importer.
  params = convert_mar_kl.convert_state_dict(sd, config)
  x = _images(seed, config.image_size, batch)
  with torch.no_grad():
    t_mean, t_logvar = model.encode(_nchw(x))
    t_rec = model.decode(t_mean)
  tok = kl_lib.KLTokenizer(config)
  module = kl_lib.KLModel(config)

  @jax.jit
  def run(params, x):
    mean, logvar = tok.encode(params, x)
    rec = module.apply({'params': params}, mean, method=kl_lib.KLModel.decode)
    return mean, logvar, rec, tok.decode(params, mean)

  mean, logvar, rec, clipped = run(params, x)
  diffs = {'mean': _maxdiff(mean, _nhwc(t_mean)), 'logvar': _maxdiff(logvar, _nhwc(t_logvar)),
           'decode': _maxdiff(rec, _nhwc(t_rec)),
           'tokenizer decode': _maxdiff(clipped, np.clip(_nhwc(t_rec), -1, 1))}
  print(f'KL {config.ch}x{config.ch_mult}: max |flax - torch| {diffs}')
  for name, d in diffs.items():
    assert d < TOL, (name, d)
  return params


def test_kl_tiny_matches_mar_reference():
  params = _check_kl_parity(TINY_KL, seed=5)
  # The tiny encoder has attention at its lowest level, like KL-16's 16x16 level.
  assert 'attn_0' in params['encoder']['down_1'] and 'attn_0' not in params['encoder']['down_0']
  module = kl_lib.KLModel(TINY_KL)
  x = jnp.asarray(_images(6, 32))

  @jax.jit
  def both(params, x):
    return module.apply({'params': params}, x), module.apply({'params': params}, x, jax.random.key(1))

  (rec_mode, aux), (rec_sample, aux_s) = both(params, x)
  assert rec_mode.shape == rec_sample.shape == (2, 32, 32, 3) and aux['kl'].shape == (2,)
  assert not np.allclose(aux_s['latents'], aux['mean'])
  expected_kl = 0.5 * np.sum(np.asarray(aux['mean']) ** 2 + np.exp(aux['logvar']) - 1 - aux['logvar'],
                             axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(aux['kl']), expected_kl, rtol=1e-5)


def test_kl16_default_widths_match_mar_reference():
  """The real KL-16 key mapping at a 32x32 input (2x2x16 latents)."""
  _check_kl_parity(dataclasses.replace(kl_lib.KLConfig(), image_size=32), seed=7, batch=1)


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize('shape, message', [
    ((2, 16, 16, 3), '16x16 instead of 32x32'),
    ((2, 32, 32, 1), '1 channels instead of 3'),
    ((2, 3, 32, 32), '32 channels instead of 3'),
    ((32, 32, 3), '3 dims instead of 4'),
])
def test_wrong_images_raise_value_error(shape, message):
  vq_tok, kl_tok = vq_lib.VQTokenizer(TINY_VQ), kl_lib.KLTokenizer(TINY_KL)
  images = jnp.zeros(shape, jnp.float32)
  for fn in (vq_tok.encode_to_indices, jax.jit(vq_tok.encode_to_indices), kl_tok.encode,
             jax.jit(kl_tok.encode)):
    with pytest.raises(ValueError, match=message) as info:
      fn({}, images)
    assert 'float[B, 32, 32, 3]' in str(info.value) and str(shape) in str(info.value)
  with pytest.raises(ValueError, match='dtype uint8'):
    vq_tok.check_images(np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r'\[B, 16, 16\]'):
    vq_tok.decode_from_indices({}, jnp.zeros((1, 8, 8), jnp.int32))


# --------------------------------------------------------------------------- importers


def test_importer_names_unmapped_and_missing_keys():
  sd = _numpy_state_dict(_ref_vq(TINY_VQ))
  assert 'quantize.codebook_used' in sd  # a buffer of the original, skipped by the importer
  broken = dict(sd)
  del broken['encoder.conv_blocks.1.attn.0.q.weight']
  broken['encoder.extra.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  with pytest.raises(ValueError) as info:
    convert_llamagen_vq.convert_state_dict(broken, TINY_VQ)
  assert 'encoder.extra.weight' in str(info.value)
  assert 'encoder/conv_blocks_1/attn_0/q/kernel' in str(info.value)
  with pytest.raises(ValueError, match='codebook|quantize/embedding/embedding'):
    convert_llamagen_vq.convert_state_dict(sd, dataclasses.replace(TINY_VQ, codebook_size=32))


def test_load_torch_checkpoint_file(tmp_path):
  """The importer reads a LlamaGen-style training checkpoint (with argparse args) with weights_only."""
  model = _randomize(_ref_vq(TINY_VQ), 8)
  path = tmp_path / 'vq.pt'
  torch.save({'model': model.state_dict(), 'steps': 3, 'args': argparse.Namespace(lr=1e-4)}, path)
  sd = convert_llamagen_vq.load_torch_state_dict(str(path))
  assert sd.keys() == model.state_dict().keys()
  params = convert_llamagen_vq.convert_state_dict(sd, TINY_VQ)
  np.testing.assert_array_equal(params['quant_conv']['kernel'][0, 0],
                                model.quant_conv.weight.detach().numpy()[:, :, 0, 0].T)


# --------------------------------------------------------------------------- checkpoints


def _random_params(config, seed: int):
  """Random arrays with the config's parameter tree (no init compile needed)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      tok_io.abstract_params(config))


def test_save_load_round_trip_and_validation(tmp_path):
  params = _random_params(TINY_VQ, 0)
  directory = str(tmp_path / 'vq')
  tok_io.save_tokenizer(directory, 'vq', TINY_VQ, params)
  kind, config, loaded = tok_io.load_tokenizer(directory)
  assert kind == 'vq' and config == TINY_VQ
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # Non-architecture fields may differ; architecture fields may not.
  again = tok_io.load_tokenizer_params(directory, dataclasses.replace(TINY_VQ, image_size=64),
                                       key='params')
  jax.tree.map(np.testing.assert_array_equal, again, params)
  with pytest.raises(ValueError, match="codebook_embed_dim is 8 in the stored config but 4"):
    tok_io.load_tokenizer_params(directory, dataclasses.replace(TINY_VQ, codebook_embed_dim=4))
  with pytest.raises(ValueError, match="holds a 'vq' tokenizer"):
    tok_io.load_tokenizer_params(directory, TINY_KL)

  # A checkpoint whose arrays disagree with its config: caught from metadata, before restoring.
  small = dataclasses.replace(TINY_VQ, codebook_size=32)
  bad = _random_params(small, 1)
  bad_dir = str(tmp_path / 'bad')
  with ckpt_lib.Checkpointer(bad_dir, save_interval_steps=1, max_to_keep=1, async_save=False) as c:
    c.save(0, {'params': bad, 'ema_params': bad}, data_state={},
           config={'kind': 'vq', 'config': dataclasses.asdict(TINY_VQ)}, force=True)
  message = (r'quantize/embedding/embedding has shape \(32, 8\) in the checkpoint but the config '
             r'expects \(64, 8\)')
  with pytest.raises(ValueError, match=message):
    tok_io.load_tokenizer(bad_dir)
  with pytest.raises(ValueError, match=message):
    tok_io.load_tokenizer_params(bad_dir, TINY_VQ)
  with pytest.raises(ValueError, match='architecture field codebook_size is 64 in the stored config but 32'):
    tok_io.load_tokenizer_params(directory, small)


def test_kl_save_load_round_trip(tmp_path):
  params = _random_params(TINY_KL, 2)
  directory = str(tmp_path / 'kl')
  tok_io.save_tokenizer(directory, 'kl', TINY_KL, params)
  kind, config, loaded = tok_io.load_tokenizer(directory)
  assert kind == 'kl' and config == TINY_KL
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # (-1,) and (1,) name the same level of a 2-level model.
  same = dataclasses.replace(TINY_KL, encoder_attn_levels=(1,))
  tok_io.load_tokenizer_params(directory, same)
  with pytest.raises(ValueError, match='decoder_attn_levels'):
    tok_io.load_tokenizer_params(directory, dataclasses.replace(TINY_KL, decoder_attn_levels=(0,)))
