"""Analytic model FLOPs against XLA's count of the real forward + backward pass."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from heptapod_jax import flops
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heptapod import Heptapod, compute_loss, init_params

BATCH = 4


def _config(kind, **over):
  d = dict(vocab_size=512, grid_size=(4, 4), num_classes=10, scan_unroll=8,  # Every layer visible
           backbone=dict(width=64, depth=2, num_heads=4, num_kv_heads=2, mlp_multiple_of=32),
           head=dict(kind=kind, width=48, depth=2, num_heads=4, window=4, steps_per_image=4,
                     mlp_multiple_of=32))
  d.update(over)
  return ModelConfig.from_dict(d)


def _xla_train_flops(config):
  model = Heptapod(config)
  params = jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
  shape = (BATCH, config.num_positions) + ((config.token_dim,) if config.continuous else ())
  tokens = jax.ShapeDtypeStruct(shape, jnp.float32 if config.continuous else jnp.int32)
  labels = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  grad = jax.jit(jax.grad(lambda p, t, y: compute_loss(model, p, t, y, jax.random.key(0))[0]))
  cost = grad.lower(params, tokens, labels).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost['flops'] / BATCH


@pytest.mark.parametrize('config', [
    _config('global'), _config('local'), _config('next_token'),
    _config('global', head=dict(kind='global', width=48, depth=2, num_heads=4, steps_per_image=4,
                                mlp_multiple_of=32, visible_context=False, targets_per_step=3)),
    _config('global', tokens='kl', token_dim=8, diffusion=dict(width=64, depth=2, batch_mul=2)),
], ids=['global', 'local', 'next_token', 'global_no_context_3_targets', 'global_kl'])
def test_analytic_train_flops_match_xla(config):
  # XLA also counts elementwise work (norms, softmax, RoPE, the loss), and skips the input-
  # gradient matmul of layers whose input is not differentiated. The band is tight enough
  # that dropping any term (the head's attention, the logits, the diffusion MLP) fails it.
  ratio = flops.train_flops_per_image(config)['total'] / _xla_train_flops(config)
  assert 0.95 <= ratio <= 1.02, ratio


def test_parts_add_up_and_scale_with_steps():
  a = flops.train_flops_per_image(_config('global'))
  assert a['total'] == pytest.approx(a['backbone'] + a['head'] + a['diffusion'])
  b = flops.train_flops_per_image(_config('global', head=dict(
      kind='global', width=48, depth=2, num_heads=4, steps_per_image=8, mlp_multiple_of=32)))
  assert b['backbone'] == a['backbone']
  # context_proj, the head blocks and the logits are per step; visible_proj is per image.
  per_image = 3 * 2 * 15 * 64 * 48
  assert (b['head'] - per_image) == pytest.approx(2 * (a['head'] - per_image))


def test_peak_table_and_measured_peak():
  cpu = jax.devices()[0]
  assert flops.peak_flops_per_device(cpu) is None  # CPU: measure instead.
  measured = flops.measure_peak_matmul_flops(size=256, device=cpu)
  assert 1e8 < measured < 1e13
  assert flops.mfu(2e12, 0.5, 4, 1e12) == pytest.approx(0.25)
