"""The Flax FID Inception equals pytorch-fid's; its converter and weight file fail loudly.

pytorch-fid's `fid_inception_v3` downloads its weights, so the reference is
built the way that function builds it (torchvision's Inception3 with the
FIDInceptionA/C/E_1/E_2 blocks swapped in) and given random weights. Batch-norm
statistics are calibrated on random images and then perturbed, so activations
stay O(1) through all 94 layers (a vanishing signal would pass any tolerance)
and BN is not the identity. pytorch-fid's own `InceptionV3` wrapper (resize,
normalisation, pool3) is checked too, with its weight download replaced by the
random state dict.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
F = pytest.importorskip('torch.nn.functional')
tv_inception = pytest.importorskip('torchvision.models.inception')
fid_inception = pytest.importorskip('pytorch_fid.inception')

from heptapod_jax.evaluators import inception  # noqa: E402
from heptapod_jax.tools import convert_inception  # noqa: E402

TOL = 1e-4
torch.set_num_threads(2)


def _fid_inception_torch(seed: int, bn_bias_mean: float = 0.5) -> torch.nn.Module:
  """pytorch-fid's FID Inception architecture with random weights and calibrated, perturbed BN stats.

  With zero-mean BN biases this random 94-layer ReLU network is chaotic: float32
  rounding grows ~1.4x per layer, so torch float32 and float64 already differ by
  6e-5 in the logits and 1.2e-4 in pool3. Positive BN biases (mean
  `bn_bias_mean`) keep it out of that regime (torch float32 vs float64: 2e-5 in
  pool3, about what separates torch and the Flax port) while features still vary
  from image to image.
  """
  m = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
  m.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
  m.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
  m.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
  m.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
  m.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
  m.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
  m.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
  m.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
  m.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in m.named_parameters():
      if p.ndim == 4:  # conv kernels, fan-in scaled
        p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel()) ** 0.5)
      elif name.endswith('bn.weight'):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name == 'fc.weight':
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
      else:  # BN and fc biases
        p.copy_(0.2 * torch.randn(p.shape, generator=g) + (bn_bias_mean if 'bn' in name else 0.0))
    # Running stats := statistics of each BN's own eval-mode input on images like the test's,
    # perturbed (so BN is neither the identity nor an exact whitening), layer by layer so that
    # the perturbations upstream are already in effect and activations stay O(1) throughout.
    def calibrate(bn, inputs):
      x = inputs[0].double()
      mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3))
      shift = 0.1 * var.sqrt() * torch.randn(bn.num_features, generator=g, dtype=torch.float64)
      scale = torch.empty(bn.num_features, dtype=torch.float64).uniform_(0.6, 1.6, generator=g)
      bn.running_mean.copy_(mean + shift)
      bn.running_var.copy_(var * scale)

    m.eval()
    hooks = [mod.register_forward_pre_hook(calibrate) for mod in m.modules()
             if isinstance(mod, torch.nn.BatchNorm2d)]
    try:
      m(_preprocess_torch(_images(seed + 100, 2)))
    finally:
      for h in hooks:
        h.remove()
  return m


def _images(seed: int, n: int) -> np.ndarray:
  """Random uint8 images [n, 48, 64, 3]: non-square and upsampled to 299."""
  return np.random.default_rng(seed).integers(0, 256, (n, 48, 64, 3), dtype=np.uint8)


def _preprocess_torch(images: np.ndarray) -> torch.Tensor:
  """pytorch-fid: /255 (ToTensor), bilinear resize to 299 (align_corners=False), 2x - 1."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  return 2 * x - 1


def _torch_features(m: torch.nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
  """pytorch-fid's preprocessing + the model; pool3 and Mixed_6d.branch1x1 via forward hooks."""
  got = {}
  hooks = [m.avgpool.register_forward_hook(lambda mod, i, o: got.__setitem__('pool', o)),
           m.Mixed_6d.branch1x1.register_forward_hook(lambda mod, i, o: got.__setitem__('b1', o))]
  try:
    with torch.no_grad():
      logits = m(_preprocess_torch(images))
  finally:
    for h in hooks:
      h.remove()
  b = images.shape[0]
  spatial = got['b1'][:, :7].permute(0, 2, 3, 1).reshape(b, -1)
  return {'pool': got['pool'].reshape(b, -1).numpy(), 'spatial': spatial.numpy(),
          'logits': logits.numpy()}


@pytest.fixture(scope='module')
def torch_model() -> torch.nn.Module:
  return _fid_inception_torch(seed=0)


@pytest.fixture(scope='module')
def weight_file(torch_model, tmp_path_factory) -> str:
  """Runs the CLI on a torch.save'd state dict, as a user would on pytorch-fid's .pth."""
  d = tmp_path_factory.mktemp('inception')
  src, dst = str(d / 'pt_inception.pth'), str(d / 'inception_fid.npz')
  torch.save(torch_model.state_dict(), src)
  convert_inception.main(['--src', src, '--dst', dst])
  return dst


def test_matches_pytorch_fid(torch_model, weight_file, monkeypatch):
  # Non-square, upsampled, uint8; 3 images in chunks of 2 exercises the padded last chunk.
  images = _images(1, 3)
  features = inception.InceptionFeatures(weight_file, batch_size=2)
  got = features(images)
  want = _torch_features(torch_model, images)

  # pytorch-fid's own wrapper (its resize, normalisation and block split) gives the same pool3.
  monkeypatch.setattr(fid_inception, 'load_state_dict_from_url',
                      lambda *a, **k: torch_model.state_dict())
  wrapper = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  with torch.no_grad():
    pool3 = wrapper(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
  np.testing.assert_allclose(pool3.reshape(3, -1).numpy(), want['pool'], atol=1e-5, rtol=0)

  shapes = {'pool': (3, 2048), 'spatial': (3, 2023), 'logits': (3, 1008)}
  for k, shape in shapes.items():
    assert got[k].shape == shape and got[k].dtype == np.float32, (k, got[k].shape, got[k].dtype)
    assert want[k].shape == shape, (k, want[k].shape)
    assert np.abs(want[k]).mean() > 0.05, (k, np.abs(want[k]).mean())  # O(1) signal, not vanished
    diff = float(np.abs(got[k] - want[k]).max())
    print(f'{k}: max abs diff {diff:.3g} (mean |ref| {np.abs(want[k]).mean():.3g})')
    assert diff < TOL, (k, diff)
  # The pool3 of the wrapper itself, against the Flax features.
  assert float(np.abs(got['pool'] - pool3.reshape(3, -1).numpy()).max()) < TOL


@pytest.mark.parametrize('shape', [(2, 333, 310, 3), (1, 37, 50, 3), (1, 299, 299, 3)])
def test_resize_matches_torch_interpolate(shape):
  images = np.random.default_rng(2).uniform(0, 255, shape).astype(np.float32)
  got = np.asarray(jax.jit(inception.preprocess)(images))
  x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0
  x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
  want = (2 * x - 1).permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape == (shape[0], 299, 299, 3)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope='module')
def tf_resize_bilinear_v1():
  """TF1's legacy `ResizeBilinear` (align_corners=False, half_pixel_centers=False), on the CPU."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  tf = pytest.importorskip('tensorflow')
  try:  # Only possible before TF initialises its devices; the explicit tf.device below suffices.
    tf.config.set_visible_devices([], 'GPU')
    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:
    pass

  def resize(images: np.ndarray) -> np.ndarray:
    with tf.device('/CPU:0'):
      return tf.compat.v1.image.resize_bilinear(images, [299, 299], align_corners=False,
                                                half_pixel_centers=False).numpy()
  return resize


@pytest.mark.parametrize('shape', [(1, 37, 50, 3), (1, 256, 256, 3), (2, 333, 310, 3), (1, 299, 299, 3)])
def test_adm_preprocessing_matches_tf_legacy_resize(shape, tf_resize_bilinear_v1):
  # Upsampling (non-square and ADM's 256 -> 299), downsampling, and the identity at 299.
  images = np.random.default_rng(3).uniform(0, 255, shape).astype(np.float32)
  want = tf_resize_bilinear_v1(images)
  got = np.asarray(jax.jit(inception.tf_legacy_resize_bilinear)(images))
  assert got.shape == want.shape == (shape[0], 299, 299, 3) and got.dtype == np.float32
  diff = float(np.abs(got - want).max())
  print(f'{shape}: resize max abs diff {diff:.3g} (values in [0, 255])')
  assert diff < 1e-4, diff

  # The full 'adm' pipeline: the graph's ResizeBilinear, then Sub 128 and Mul 1/128.
  pre = np.asarray(jax.jit(lambda x: inception.preprocess(x, preprocessing='adm'))(images))
  pre_diff = float(np.abs(pre - (want - 128.0) / 128.0).max())
  print(f'{shape}: adm preprocess max abs diff {pre_diff:.3g}')
  assert pre_diff < 1e-6, pre_diff

  # uint8 input (what ADM's npz batches hold) goes through the same path.
  images_u8 = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
  got_u8 = np.asarray(inception.preprocess(images_u8, preprocessing='adm'))
  np.testing.assert_allclose(got_u8, (tf_resize_bilinear_v1(images_u8) - 128.0) / 128.0, atol=1e-6, rtol=0)

  # The two modes really differ: legacy TF taps are shifted by up to half a source pixel.
  if shape[1:3] != (299, 299):
    assert float(np.abs(pre - np.asarray(inception.preprocess(images))).max()) > 0.1


def test_pytorch_fid_is_the_default():
  images = np.random.default_rng(5).integers(0, 256, (1, 37, 50, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(images)),
                                np.asarray(inception.preprocess(images, preprocessing='pytorch_fid')))
  assert inception.FIDInceptionV3().preprocessing == 'pytorch_fid'


def test_preprocessing_reaches_the_network(weight_file, monkeypatch):
  """InceptionFeatures -> load_inception -> FIDInceptionV3 -> preprocess, traced without running it."""
  seen = []
  original = inception.preprocess

  def recording_preprocess(images, resize=True, preprocessing='pytorch_fid'):
    seen.append(preprocessing)
    return original(images, resize=resize, preprocessing=preprocessing)

  monkeypatch.setattr(inception, 'preprocess', recording_preprocess)
  images = jax.ShapeDtypeStruct((1, 37, 50, 3), np.uint8)
  for mode in inception.PREPROCESSING_CHOICES:
    features = inception.InceptionFeatures(weight_file, batch_size=1, preprocessing=mode)
    assert features.preprocessing == features.module.preprocessing == mode
    assert inception.load_inception(weight_file, preprocessing=mode)[0].preprocessing == mode
    out = jax.eval_shape(features.module.apply, features.variables, images)
    assert out['spatial'].shape == (1, 2023)
  assert seen == list(inception.PREPROCESSING_CHOICES), seen


def test_invalid_preprocessing_raises(weight_file):
  msg = r"preprocessing must be one of 'pytorch_fid', 'adm'; got 'tf'"
  with pytest.raises(ValueError, match=msg):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8), preprocessing='tf')
  with pytest.raises(ValueError, match=msg):
    inception.FIDInceptionV3(preprocessing='tf')
  with pytest.raises(ValueError, match=msg):
    inception.load_inception(weight_file, preprocessing='tf')
  with pytest.raises(ValueError, match=msg):
    inception.InceptionFeatures(weight_file, preprocessing='tf')


def test_converter_rejects_missing_and_unknown_keys(torch_model):
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  missing = dict(state_dict)
  del missing['Mixed_6d.branch1x1.bn.running_var']
  with pytest.raises(ValueError, match='batch_stats/Mixed_6d/branch1x1/bn/var'):
    convert_inception.convert_state_dict(missing)

  extra = dict(state_dict)
  extra['AuxLogits.fc.weight'] = np.zeros((1008, 768), np.float32)  # torchvision's inception_v3
  with pytest.raises(ValueError, match=r'AuxLogits\.fc\.weight'):
    convert_inception.convert_state_dict(extra)

  wrong = dict(state_dict)
  wrong['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError, match=r'fc\.weight.*\(1000, 2048\).*\(2048, 1008\)'):
    convert_inception.convert_state_dict(wrong)


def test_loader_errors(weight_file, tmp_path):
  with np.load(weight_file) as data:
    flat = {k: data[k] for k in data.files}
  assert len(flat) == len(inception.expected_shapes())

  bad = dict(flat)
  bad['params/Mixed_7c/branch_pool/conv/kernel'] = np.zeros((1, 1, 2048, 100), np.float32)
  path = str(tmp_path / 'bad_shape.npz')
  with open(path, 'wb') as f:
    np.savez(f, **bad)
  with pytest.raises(ValueError, match=r'bad_shape\.npz.*Mixed_7c/branch_pool/conv/kernel.*'
                     r'\(1, 1, 2048, 100\).*\(1, 1, 2048, 192\)'):
    inception.load_inception(path)

  short = dict(flat)
  del short['batch_stats/Conv2d_1a_3x3/bn/mean']
  path = str(tmp_path / 'short.npz')
  with open(path, 'wb') as f:
    np.savez(f, **short)
  with pytest.raises(ValueError, match=r'short\.npz.*batch_stats/Conv2d_1a_3x3/bn/mean'):
    inception.load_variables(path)

  garbled = tmp_path / 'garbled.npz'
  garbled.write_bytes(b'this is not a zip file')
  with pytest.raises(ValueError, match='garbled.npz'):
    inception.load_variables(str(garbled))

  with pytest.raises(FileNotFoundError, match='nonexistent.npz'):
    inception.InceptionFeatures(os.path.join(str(tmp_path), 'nonexistent.npz'))
