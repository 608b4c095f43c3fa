"""Every selectable attention implementation gives the same output (and gradients) where it runs.

'einsum' (plain XLA ops) is the reference; 'xla' is jax.nn.dot_product_attention;
'splash' is the Pallas TPU splash kernel, run here in Pallas interpret mode (the
same kernel code, executed on the CPU); 'cudnn' needs an NVIDIA GPU and runs only
where one is present.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax import sharding
from heptapod_jax.models import attention
from heptapod_jax.models.heptapod import Heptapod, compute_loss, init_params

from test_model import make_config, random_batch

ON_GPU = jax.default_backend() == 'gpu'


def qkv(batch=2, length=20, heads=4, kv_heads=2, dim=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (batch, length, heads, dim)),
          jax.random.normal(ks[1], (batch, length, kv_heads, dim)),
          jax.random.normal(ks[2], (batch, length, kv_heads, dim)))


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('impl', ['xla', 'splash'])
def test_attention_impls_match_einsum(impl, causal):
  q, k, v = qkv()  # Length 20: splash pads it to 128 (second segment id).
  ref = attention.dot_product_attention(q, k, v, None, impl='einsum', causal=causal)
  out = attention.dot_product_attention(q, k, v, None, impl=impl, causal=causal)
  np.testing.assert_allclose(out, ref, atol=2e-6)

  def loss(q, k, v, impl):
    return jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, None, impl=impl, causal=causal)))

  g_ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 'einsum')
  g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, impl)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_causal_flag_equals_explicit_mask():
  q, k, v = qkv(length=9)
  tri = jnp.tril(jnp.ones((9, 9), bool))[None, None]
  for impl in ('einsum', 'xla'):
    np.testing.assert_allclose(
        attention.dot_product_attention(q, k, v, None, impl=impl, causal=True),
        attention.dot_product_attention(q, k, v, tri, impl='einsum'), atol=2e-6)


def test_splash_under_a_sharded_mesh():
  """Batch over the data axes and heads over 'tensor' (shard_map), inside jit."""
  q, k, v = qkv(batch=4, heads=4, kv_heads=2)
  mesh = sharding.create_mesh((2, 2, 2))
  ref = attention.dot_product_attention(q, k, v, None, impl='einsum', causal=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, None, impl='splash',
                                                               causal=True))(q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-6)


@pytest.mark.parametrize('kind', ['global', 'next_token'])
def test_model_loss_and_gradients_match_across_impls(kind):
  """The whole model: causal backbone and (global head) full bidirectional attention."""
  cfg = make_config(kind, backbone=dict(num_kv_heads=2))
  tokens, labels = random_batch()
  params = nn.unbox(init_params(Heptapod(cfg), jax.random.key(0)))
  results = {}
  for impl in ('einsum', 'xla', 'splash'):
    model = Heptapod(dataclasses.replace(cfg, attention_impl=impl))
    fn = jax.value_and_grad(
        lambda p: compute_loss(model, p, tokens, labels, jax.random.key(3), deterministic=True)[0])
    results[impl] = fn(params)
  for impl in ('xla', 'splash'):
    np.testing.assert_allclose(results[impl][0], results['einsum'][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
                 results[impl][1], results['einsum'][1])


def test_auto_resolves_per_platform_and_bad_choices_are_named():
  assert attention.resolve_attention_impl('auto') == ('splash' if jax.default_backend() == 'tpu'
                                                   else 'xla')
  assert attention.resolve_attention_impl('einsum') == 'einsum'
  if not ON_GPU:
    with pytest.raises(ValueError, match='model.attention_impl="cudnn" needs an NVIDIA GPU'):
      attention.check_attention_impl('cudnn', jnp.bfloat16)
  with pytest.raises(ValueError, match='model.attention_impl'):
    make_config('global', attention_impl='flash')


@pytest.mark.skipif(not ON_GPU, reason='cuDNN flash attention needs an NVIDIA GPU')
def test_cudnn_matches_xla_on_gpu():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(length=128, dim=64))
  for causal in (True, False):
    ref = attention.dot_product_attention(q, k, v, None, impl='xla', causal=causal)
    out = attention.dot_product_attention(q, k, v, None, impl='cudnn', causal=causal)
    np.testing.assert_allclose(np.float32(out), np.float32(ref), atol=2e-2)


def test_cudnn_falls_back_where_cudnn_cannot_run(monkeypatch):
  """cuDNN's flash attention takes no explicit mask and no odd sequence length when training
  (the global head's N + 1 tokens crashed the recipe's GPU run): those calls go to 'xla'."""
  used = []

  def fake(q, k, v, mask=None, is_causal=False, implementation=None):
    used.append(implementation)
    return jnp.zeros_like(q)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  for length, mask, want in ((256, None, 'cudnn'), (257, None, 'xla'),
                             (256, jnp.ones((1, 1, 256, 256), bool), 'xla')):
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(batch=1, length=length, dim=64))
    attention.dot_product_attention(q, k, v, mask, impl='cudnn', causal=False)
    assert used[-1] == want, (length, mask is not None, used[-1])


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_cached_attention_equals_masked_attention(kv_heads):
  """Decoding's attention over a [B, K, S, D] cache = the einsum reference over [B, S, K, D]
  with the same mask (unwritten slots hidden), for one and several new queries, with GQA."""
  _, k, v = qkv(batch=2, length=12, heads=4, kv_heads=kv_heads, dim=8, seed=3)
  for lq, first in ((1, 6), (3, 4)):
    q = jax.random.normal(jax.random.key(lq), (2, lq, 4, 8))
    slots = first + jnp.arange(lq)
    mask = (slots[:, None] >= jnp.arange(12)[None, :])[None, None]  # [1, 1, Lq, S]
    ref = attention.dot_product_attention(q, k, v, mask, impl='einsum')
    got = attention.cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(got, ref, atol=1e-6)
