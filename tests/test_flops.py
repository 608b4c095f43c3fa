"""Analytic model FLOPs (heptapod_jax/flops.py) against XLA's count of the real computation.

XLA's `cost_analysis()['flops']` of the jitted forward + backward of `compute_loss` counts
every op of the program: the matmuls, and also elementwise work (norms, softmax, RoPE, the
loss) that the analytic count leaves out, and it skips the input gradient of layers whose
input is data (`flops.DATA_INPUT_TERMS`), which the model-FLOPs convention counts. With
those input gradients taken out, analytic / XLA is 0.963-0.974 for every head kind and token
type at these shapes (jax 0.10.2, float32, every layer unrolled so that XLA sees it): the
remaining ~3% is elementwise work. The band below is tight enough that leaving out any term
of the count fails it, which `test_train_flops_match_xla` checks term by term.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from heptapod_jax import flops
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heptapod import Heptapod, compute_loss, init_params, split_layers
from heptapod_jax.models.transformer import init_cache

BATCH = 4
BAND = (0.955, 0.985)  # analytic (as executed) / XLA.
# One projection per image (or per step) each: a few per mille of the total at any shape where
# XLA's elementwise share stays small, so the band cannot see them; test_visible_proj_... does.
SMALL_TERMS = ('head/input_proj', 'backbone/token_proj')


def _config(kind, **over):
  """A small model whose every term is a few percent of the step or more."""
  d = dict(vocab_size=256, grid_size=(8, 8), num_classes=10, scan_unroll=8,  # Every layer visible.
           backbone=dict(width=64, depth=2, num_heads=2, num_kv_heads=1, mlp_multiple_of=64),
           head=dict(kind=kind, width=64, depth=2, num_heads=1, window=8, steps_per_image=2,
                     mlp_multiple_of=64))
  for key, value in over.items():
    d[key] = dict(d[key], **value) if key in ('backbone', 'head') else value
  return ModelConfig.from_dict(d)


def _cost(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def _xla_train_flops(config) -> float:
  """XLA's FLOPs of the jitted gradient of the training loss, per image."""
  model = Heptapod(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  shape = (BATCH, config.num_positions) + ((config.token_dim,) if config.continuous else ())
  tokens = jax.ShapeDtypeStruct(shape, jnp.float32 if config.continuous else jnp.int32)
  labels = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  grad = jax.grad(lambda p, t, y: compute_loss(model, p, t, y, jax.random.key(0))[0])
  return _cost(grad, params, tokens, labels) / BATCH


def _executed(terms) -> float:
  """3 x forward, less the input gradients that are never computed (layers fed by data)."""
  return sum((2.0 if key in flops.DATA_INPUT_TERMS else 3.0) * v for key, v in terms.items())


_LOCAL = dict(width=32, window=32, mlp_multiple_of=32)  # The W x W self-attention is visible.
_KL = dict(tokens='kl', token_dim=8)


@pytest.mark.parametrize('config', [
    _config('global'),
    _config('local', head=_LOCAL),
    _config('next_token', vocab_size=2048),
    _config('global', vocab_size=2048, head=dict(visible_context=False, targets_per_step=3)),
    _config('global', **_KL, diffusion=dict(width=64, depth=2, batch_mul=2)),
    _config('local', head=_LOCAL, **_KL, diffusion=dict(width=64, depth=1, batch_mul=1)),
    _config('next_token', **_KL, diffusion=dict(width=64, depth=1, batch_mul=8)),
], ids=['global', 'local', 'next_token', 'global_no_context_3_targets', 'global_kl', 'local_kl',
        'next_token_kl'])
def test_train_flops_match_xla(config):
  terms = flops.forward_flops_terms(config)
  xla = _xla_train_flops(config)
  executed = _executed(terms)
  assert BAND[0] <= executed / xla <= BAND[1], executed / xla
  # The model-FLOPs total is the same sum with full 3x backward for every term.
  assert flops.train_flops_per_image(config)['total'] == pytest.approx(3 * sum(terms.values()))
  for key, value in terms.items():  # Forgetting any one term would fail the band.
    if key not in SMALL_TERMS:
      dropped = executed - (2.0 if key in flops.DATA_INPUT_TERMS else 3.0) * value
      assert dropped / xla < BAND[0], (key, dropped / xla)


def test_visible_proj_matches_xla_difference():
  with_context, without = _config('global'), _config('global', head=dict(visible_context=False))
  analytic = (flops.train_flops_per_image(with_context)['head']
              - flops.train_flops_per_image(without)['head'])
  xla = _xla_train_flops(with_context) - _xla_train_flops(without)
  assert analytic > 0
  assert 0.9 <= analytic / xla <= 1.02, analytic / xla


@pytest.mark.parametrize('config', [
    _config('global'), _config('global', head=dict(depth=3)), _config('local', head=_LOCAL),
    _config('next_token', vocab_size=2048)], ids=['global', 'global_depth3', 'local', 'next_token'])
def test_sampling_flops_match_xla(config):
  """KV-cached sampling = prefill + (N-1) one-token feeds + N head predictions of one target."""
  model = Heptapod(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  variables = {'params': params}
  n = config.num_positions
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)

  def prefill(v, labels):
    cache = init_cache(config, BATCH)
    return model.apply(v, labels, cache, split_layers(v['params']), method=Heptapod.prefill)

  head_state, cache = jax.eval_shape(prefill, variables, ints(BATCH))
  feed = _cost(lambda v, x, c, s: model.apply(v, x, jnp.int32(n // 2), c, s,
                                              split_layers(v['params']), method=Heptapod.feed),
               variables, ints(BATCH, 1), cache, head_state)
  predict = _cost(lambda v, s: model.apply(v, s, jnp.int32(n // 2), 1, split_layers(v['params']),
                                           method=Heptapod.predict), variables, head_state)
  xla = (_cost(prefill, variables, ints(BATCH)) + (n - 1) * feed + n * predict) / BATCH
  ratio = flops.sampling_flops_per_image(config)['total'] / xla
  assert BAND[0] <= ratio <= 1.0, ratio


def test_parts_add_up_and_head_scales_with_steps():
  a = flops.train_flops_per_image(_config('global'))
  assert a['total'] == pytest.approx(a['backbone'] + a['head'] + a['diffusion'])
  assert a['diffusion'] == 0.0
  b = flops.train_flops_per_image(_config('global', head=dict(steps_per_image=4)))
  assert b['backbone'] == a['backbone']
  # context_proj, the head blocks and the logits are per step; visible_proj is per image.
  per_image = 3 * 2 * 63 * 64 * 64
  assert b['head'] - per_image == pytest.approx(2 * (a['head'] - per_image))
  kl = flops.train_flops_per_image(_config('global', **_KL, diffusion=dict(batch_mul=4)))
  kl2 = flops.train_flops_per_image(_config('global', **_KL, diffusion=dict(batch_mul=8)))
  assert kl2['diffusion'] == pytest.approx(2 * kl['diffusion']) and kl2['head'] == kl['head']


class _FakeDevice:
  def __init__(self, platform, device_kind):
    self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize('platform, kind, tflops', [
    ('tpu', 'TPU v4', 275), ('tpu', 'TPU v5 lite', 197), ('tpu', 'TPU v5', 459),
    ('tpu', 'TPU v5p', 459), ('tpu', 'TPU v6 lite', 918), ('gpu', 'NVIDIA A100-SXM4-80GB', 312),
    ('gpu', 'NVIDIA H100 80GB HBM3', 989), ('gpu', 'NVIDIA H200', 989),
    ('gpu', 'NVIDIA GeForce RTX 3090', None), ('cpu', 'cpu', None)])
def test_peak_table(platform, kind, tflops):
  found = flops.peak_flops_per_device(_FakeDevice(platform, kind), 'bfloat16')
  assert (found and found[0]) == (tflops and tflops * 1e12)
  # float32 on a GPU is TF32 or not depending on precision: no table entry, measure it.
  if platform == 'gpu':
    assert flops.peak_flops_per_device(_FakeDevice(platform, kind), jnp.float32) is None


def test_measured_peak_and_mfu():
  measured = flops.measure_peak_matmul_flops(size=256, repeats=2)
  assert 1e8 < measured < 1e14
  assert flops.mfu(2e12, 0.5, 4, 1e12) == pytest.approx(0.25)


def test_the_trainers_time_the_matmul_once_per_device_and_dtype(monkeypatch):
  """Without a configured or known peak, the logged MFU's peak is measured once per device and
  dtype in a process (a study or a notebook trains many times), not at every run."""
  from heptapod_jax.training import trainlib
  calls = []
  monkeypatch.setattr(trainlib, '_MEASURED_PEAKS', {})
  monkeypatch.setattr(flops, 'measure_peak_matmul_flops',
                      lambda dtype, device: calls.append((str(dtype), device.id)) or 2e12)
  config = _config('next_token')
  for _ in range(3):
    t = trainlib.Throughput(config, global_batch_size=8)
    assert t.peak == 2e12 and t.peak_source.startswith('measured')
  assert calls == [(str(config.dtype), jax.local_devices()[0].id)]
  assert trainlib.Throughput(config, 8, peak_tflops=3.0).peak == 3e12  # Configured: no timing.
  assert len(calls) == 1


def test_sampling_bytes_per_step_count_the_weights_and_caches():
  """The memory-bound floor of a decoding step, against the shapes written out by hand."""
  config = _config('next_token', vocab_size=2048)
  b, n, w = config.backbone, config.num_positions, config.backbone.width
  hidden = 64 * -(-int(8 / 3 * w) // 64)
  kv_width = b.kv_heads * (w // b.num_heads)
  block = w * w * 2 + 2 * w * kv_width + 3 * w * hidden + 2 * w  # q, out, k, v, MLP, norms
  weights = b.depth * block + w + w * config.vocab_size + 3 * w  # final norm, logits, 3 rows
  got = flops.sampling_bytes_per_step(config, batch=3)
  assert got['weights'] == 4 * weights
  assert got['kv_cache'] == 4 * 2 * b.depth * 3 * kv_width * (b.class_prefix_len + (n - 2) / 2)
  assert got['head_state'] == 0 and got['total'] == got['weights'] + got['kv_cache']
  bf16 = flops.sampling_bytes_per_step(config, batch=3, param_bytes=2, activation_bytes=2)
  assert bf16['total'] == got['total'] / 2
  glob = flops.sampling_bytes_per_step(_config('global'), batch=3)
  assert glob['head_state'] == 4 * 4 * 3 * n * 64  # Grid inputs and q, k, v of width 64.
  # The same as the decoding state's arrays (less the newest state h_t, a row per image), and
  # a quarter of it under condition='add', whose state keeps the grid inputs only.
  for condition, share in (('context', 4), ('add', 1)):
    config = _config('global', head=dict(condition=condition))
    model = Heptapod(config)
    params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
    state, _ = jax.eval_shape(
        lambda v, labels: model.apply(v, labels, init_cache(config, 3), split_layers(v['params']),
                                      method=Heptapod.prefill),
        {'params': params}, jax.ShapeDtypeStruct((3,), jnp.int32))
    arrays = [x for k, x in state.items() if k != 'h']
    held = sum(4 * math.prod(x.shape) for x in jax.tree.leaves(arrays))
    got = flops.sampling_bytes_per_step(config, batch=3)['head_state']
    assert got == held == share * 4 * 3 * n * 64, (condition, got, held)
