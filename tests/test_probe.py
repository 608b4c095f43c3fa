"""Linear probe: layer features against independent references, the classifier, the errors."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax.evaluators import probe
from heptapod_jax.models import layers
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim
from heptapod_jax.models.heptapod import Heptapod, init_params
from heptapod_jax.models.transformer import slot_grid_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = (3, 4)
N = GRID[0] * GRID[1]
VOCAB = 13
CLASSES = 5
DEPTH = 3


@pytest.fixture(scope='module')
def setup():
  # class_prefix_len=2 so that pooling over the wrong slots would show; tiny widths.
  cfg = ModelConfig.from_dict(dict(
      vocab_size=VOCAB, grid_size=GRID, num_classes=CLASSES,
      backbone=dict(width=32, depth=DEPTH, num_heads=4, qk_norm=True, class_prefix_len=2,
                    mlp_multiple_of=32),
      head=dict(kind='global', width=32, depth=1, num_heads=4, steps_per_image=-1,
                mlp_multiple_of=32)))
  model = Heptapod(cfg)
  params = nn.unbox(init_params(model, jax.random.key(0)))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (5, N), 0, VOCAB), np.int32)
  return model, params, tokens


def manual_layer(cfg: ModelConfig, params, tokens, label: int, k: int) -> np.ndarray:
  """Reference without nn.scan: embeddings, then k Blocks one by one, final_norm, mean over
  the image-token slots."""
  b, bp = cfg.backbone, params['backbone']
  n_img = tokens.shape[0]
  x = jnp.concatenate([jnp.broadcast_to(bp['class_embedding'][label],
                                        (n_img, b.class_prefix_len, b.width)),
                       bp['token_embedding'][tokens[:, :-1]]], axis=1)
  slots = jnp.arange(x.shape[1])
  angles = layers.rope_2d_angles(slot_grid_index(cfg, slots), cfg.grid_size[1],
                                 b.width // b.num_heads, b.rope_base)[None]
  mask = (slots[:, None] >= slots[None, :])[None, None]
  block = layers.Block(width=b.width, num_heads=b.num_heads, kv_heads=b.kv_heads,
                       mlp_hidden=mlp_hidden_dim(b.width, b.mlp_ratio, b.mlp_multiple_of),
                       qk_norm=b.qk_norm, norm_eps=b.norm_eps, attention_impl=cfg.attention_impl)
  for i in range(k):
    layer_params = jax.tree.map(lambda p: p[i], bp['layers'])
    x, _ = block.apply({'params': layer_params}, x, None, mask, angles)
  h = layers.RMSNorm(b.norm_eps).apply({'params': bp['final_norm']}, x)
  return np.asarray(jnp.mean(h[:, b.class_prefix_len:], axis=1))


def test_final_layer_is_the_mean_of_the_unmodified_states(setup):
  model, params, tokens = setup
  labels = jnp.zeros((tokens.shape[0],), jnp.int32)
  states = model.apply({'params': params}, jnp.asarray(tokens), labels, method=Heptapod.states)
  # states = h_0..h_{N-1}; h_0 sits on the last class slot, h_1.. on the image-token inputs.
  expected = np.asarray(jnp.mean(states[:, 1:], axis=1))
  for layer in (DEPTH, -1):
    got = probe.extract_features(model, params, tokens, layer=layer, batch_size=2, label=0)
    assert got.shape == (tokens.shape[0], 32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layer', range(DEPTH + 1))
def test_every_layer_matches_running_its_blocks_by_hand(setup, layer):
  model, params, tokens = setup
  label = 3
  got = probe.extract_features(model, params, tokens.reshape(-1, *GRID), layer=layer,
                               batch_size=4, label=label)
  want = manual_layer(model.config, params, tokens, label, layer)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Negative indexes count from the end.
  np.testing.assert_array_equal(
      probe.extract_features(model, params, tokens, layer=layer - DEPTH - 1, batch_size=4,
                             label=label), got)


def test_fed_label_is_the_null_class_only_when_it_was_trained(setup):
  model, params, tokens = setup
  assert probe.probe_label(model.config) == 0
  dropout_cfg = ModelConfig.from_dict(dict(
      vocab_size=VOCAB, grid_size=GRID, num_classes=CLASSES,
      backbone=dict(width=32, depth=DEPTH, num_heads=4, class_dropout=0.1),
      head=dict(steps_per_image=-1, width=32, num_heads=4)))
  assert probe.probe_label(dropout_cfg) == CLASSES
  # Features never depend on the images' true classes: one fixed label for all.
  a = probe.extract_features(model, params, tokens, layer=1, batch_size=8)
  b = probe.extract_features(model, params, tokens, layer=1, batch_size=8, label=0)
  np.testing.assert_array_equal(a, b)


def test_invalid_layer_names_the_valid_range(setup):
  model, params, tokens = setup
  for bad in (DEPTH + 1, -(DEPTH + 2)):
    with pytest.raises(ValueError, match=rf'valid layers are 0\.\.{DEPTH}.*-{DEPTH + 1}\.\.-1'):
      probe.extract_features(model, params, tokens, layer=bad)
  with pytest.raises(ValueError, match='out of range'):
    probe.parse_layers(['0', str(DEPTH + 1)], DEPTH)
  assert probe.parse_layers(['all'], DEPTH) == list(range(DEPTH + 1))
  assert probe.parse_layers(['-1', '0'], DEPTH) == [DEPTH, 0]


def gaussian_classes(seed, n, dim, classes, spread):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim)) * spread
  labels = rng.integers(0, classes, size=n)
  return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32) * 7.0 + 3.0, labels


def test_probe_learns_a_separable_problem_and_is_deterministic():
  x, y = gaussian_classes(0, 1200, 16, 4, spread=4.0)
  kw = dict(num_classes=4, steps=300, lr=1e-2, weight_decay=1e-4, batch_size=128, seed=0)
  out = probe.train_linear_probe(x[:800], y[:800], x[800:], y[800:], **kw)
  assert out['top1'] >= 0.99 and out['train_top1'] >= 0.99, out
  assert out['num_train'] == 800 and out['num_eval'] == 400 and out['chance'] == 0.25
  assert probe.train_linear_probe(x[:800], y[:800], x[800:], y[800:], **kw) == out


def test_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3000, 16)).astype(np.float32)
  y = rng.integers(0, 4, size=3000)
  out = probe.train_linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=4, steps=300,
                                 lr=1e-2, weight_decay=1e-4, batch_size=128, seed=0)
  assert abs(out['top1'] - 0.25) < 0.05, out
  with pytest.raises(ValueError, match='num_classes=3'):
    probe.train_linear_probe(x[:10], y[:10], x[10:20], y[10:20], num_classes=3, steps=1)


def test_workdir_without_checkpoint_names_the_path(tmp_path):
  spec = importlib.util.spec_from_file_location('demo', os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('tokenizer=pixel')
  workdir = tmp_path / 'no_run'
  with pytest.raises(FileNotFoundError, match=str(workdir / 'checkpoints')):
    probe.load_model(config, str(workdir))
