"""Building blocks against plain einsum references: the CPU matmul's hand-written backward
pass, the stacked (fused QKV / gate-up) projections, and the parameter tree they keep."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heptapod_jax.models import attention, layers


def _reference(x, w):
  return jnp.einsum('...d,df->...f', x, w)


@pytest.mark.parametrize('shape_x,shape_w', [
    ((2, 5, 3), (3, 7)),    # D < F: the weight gradient transposes x.
    ((2, 5, 9), (9, 4)),    # D > F: it transposes dy.
    ((6, 4), (4, 4)),       # 2D input, square kernel.
])
def test_cpu_matmul_value_and_gradients_equal_einsum(shape_x, shape_w):
  assert attention.target_platform() == 'cpu'
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape_x)
  w = jax.random.normal(kw, shape_w)
  dy = jax.random.normal(kd, (*shape_x[:-1], shape_w[-1]))
  out, vjp = jax.vjp(jax.jit(layers.matmul), x, w)
  ref, ref_vjp = jax.vjp(_reference, x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_matmul_bfloat16_gradients_keep_dtypes():
  x = jax.random.normal(jax.random.key(1), (4, 3, 8), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (8, 16), jnp.bfloat16)
  gx, gw = jax.grad(lambda x, w: jnp.sum(layers.matmul(x, w).astype(jnp.float32) ** 2),
                    argnums=(0, 1))(x, w)
  rx, rw = jax.grad(lambda x, w: jnp.sum(_reference(x, w).astype(jnp.float32) ** 2),
                    argnums=(0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(gx), np.float32(rx), rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(np.float32(gw), np.float32(rw), rtol=3e-2, atol=3e-2)


def test_stacked_dense_equals_separate_projections():
  keys = jax.random.split(jax.random.key(3), 4)
  x = jax.random.normal(keys[0], (2, 5, 6))
  kernels = [jax.random.normal(k, (6, 10)) for k in keys[1:]]

  def stacked(x, *ks):
    return layers.stacked_dense(x, list(ks), jnp.float32)

  def separate(x, *ks):
    return [_reference(x, k) for k in ks]

  outs = stacked(x, *kernels)
  for got, want in zip(outs, separate(x, *kernels)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  loss = lambda f: lambda *a: sum(jnp.sum(o * (i + 1.0)) for i, o in enumerate(f(*a)))
  got = jax.grad(loss(stacked), argnums=(0, 1, 2, 3))(x, *kernels)
  want = jax.grad(loss(separate), argnums=(0, 1, 2, 3))(x, *kernels)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_attention_and_mlp_keep_one_kernel_per_projection(kv_heads):
  """Fused projections run as one matmul but store query/key/value and gate/up separately
  (checkpoints, logical axes and sharding rules are unchanged), and equal unfused Dense."""
  attn = layers.Attention(num_heads=4, kv_heads=kv_heads, head_dim=8)
  x = jax.random.normal(jax.random.key(4), (2, 5, 32))
  params = nn.unbox(attn.init(jax.random.key(5), x, x, None)['params'])
  assert sorted(params) == ['key', 'out', 'query', 'value']
  assert params['key']['kernel'].shape == (32, kv_heads * 8)
  out, _ = attn.apply({'params': params}, x, x, None)
  # Reference: the same attention from separately applied kernels.
  q = _reference(x, params['query']['kernel']).reshape(2, 5, 4, 8)
  k = _reference(x, params['key']['kernel']).reshape(2, 5, kv_heads, 8)
  v = _reference(x, params['value']['kernel']).reshape(2, 5, kv_heads, 8)
  k, v = jnp.repeat(k, 4 // kv_heads, axis=2), jnp.repeat(v, 4 // kv_heads, axis=2)
  probs = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8), axis=-1)
  ref = _reference(jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(2, 5, 32),
                   params['out']['kernel'])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  mlp = layers.SwiGLU(hidden=24)
  mp = nn.unbox(mlp.init(jax.random.key(6), x)['params'])
  assert sorted(mp) == ['down', 'gate', 'up']
  h = jax.nn.silu(_reference(x, mp['gate']['kernel'])) * _reference(x, mp['up']['kernel'])
  np.testing.assert_allclose(mlp.apply({'params': mp}, x), _reference(h, mp['down']['kernel']),
                             rtol=1e-5, atol=1e-5)
