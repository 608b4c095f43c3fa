"""Building blocks shared by the backbone and the heads.

Every parameter is created with a logical partitioning annotation and every
large activation is constrained with logical axis names; `sharding.py` maps the
names to mesh axes through rules that live in the config. Logical names:

  parameters:  embed, mlp, heads, kv, vocab, grid, classes, norm, layers
  activations: batch, length, act_embed, act_mlp, act_heads, kv, act_vocab
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
Dtype = Any

INIT_STD = 0.02  # LlamaGen / GPT initialisation of every Linear and embedding.
_MASK_VALUE = -1e9  # Finite, so that softmax never sees a row of -inf.


def dtype_of(name: str) -> Dtype:
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]


def normal_init(axes: tuple[str | None, ...], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Logical sharding constraint; a no-op outside `jax.set_mesh` or without logical rules.

  Mesh axes that do not divide a dimension (a 13-entry vocabulary on 2-way
  tensor parallelism) are dropped for that dimension rather than failing.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = list(nn.logical_to_mesh_axes(axes, rules))
  for dim, names in enumerate(spec):
    names = names if isinstance(names, tuple) else (names,) if names else ()
    if names and x.shape[dim] % math.prod(mesh.shape[a] for a in names):
      spec[dim] = None
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


class Dense(nn.Module):
  """Bias-free 2D-kernel Linear with logical axes (2D kernels shard cleanly under a mesh)."""
  features: int
  axes: tuple[str | None, str | None]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  std: float = INIT_STD

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', normal_init(self.axes, self.std), (x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.einsum('...d,df->...f', x, kernel)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, output cast to the compute dtype."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


# --------------------------------------------------------------------------- 2D RoPE


def rope_2d_angles(grid_index: Array, grid_cols: int, head_dim: int, base: float) -> Array:
  """Rotation angles of 2D RoPE for tokens at raster indices `grid_index`.

  Half of the head_dim/2 rotary pairs rotate with the row, half with the column
  (frequencies base^(-k/n), k < n = head_dim/4, for each axis). A negative
  index means "no grid position" (class prefix slots): angle 0, the identity.

  Args:
    grid_index: int32[..., L] raster index r * grid_cols + c, or < 0.
  Returns:
    float32[..., L, head_dim // 2].
  """
  n = head_dim // 4
  freqs = base ** (-jnp.arange(n, dtype=jnp.float32) / n)
  valid = grid_index >= 0
  idx = jnp.maximum(grid_index, 0)
  rows = (idx // grid_cols).astype(jnp.float32)
  cols = (idx % grid_cols).astype(jnp.float32)
  angles = jnp.concatenate([rows[..., None] * freqs, cols[..., None] * freqs], axis=-1)
  return jnp.where(valid[..., None], angles, 0.0)


def apply_rope(x: Array, angles: Array) -> Array:
  """Rotates pairs (x[k], x[k + D/2]) of x: [B, L, H, D] by angles: [B or 1, L, D/2]."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


# --------------------------------------------------------------------------- attention


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *, impl: str,
                          dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Multi-head attention core with grouped-query support.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with K dividing H.
    mask: bool, broadcastable to [B, 1, Lq, Lk] (True = attend), or None.
    impl: 'einsum' (plain XLA ops; supports attention dropout), or 'xla' /
      'cudnn' (`jax.nn.dot_product_attention` with that implementation).
  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  if impl == 'einsum':
    b, lq, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, lq, kh, h // kh, d)
    logits = jnp.einsum('bqkgd,bskd->bkgqs', qg, k, preferred_element_type=jnp.float32)
    logits = logits * (d ** -0.5)
    if mask is not None:
      m = jnp.broadcast_to(mask, (mask.shape[0], 1, lq, k.shape[1]))[:, :, None]
      logits = jnp.where(m, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
      probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs.astype(v.dtype), v)
    return out.reshape(b, lq, h, d)
  implementation = {'xla': 'xla', 'cudnn': 'cudnn'}[impl]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class Attention(nn.Module):
  """Self- or cross-attention with optional 2D RoPE, QK-norm and a functional KV cache."""
  num_heads: int
  kv_heads: int
  head_dim: int
  qk_norm: bool = False
  norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array, mask: Array | None, *,
               angles_q: Array | None = None, angles_kv: Array | None = None,
               cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
               deterministic: bool = True):
    """Attention of x_q: [B, Lq, E] over x_kv: [B, Lk, E'].

    With `cache=(k, v)` ([B, Lmax, K, D] each) the new keys/values are written
    at `cache_index` and the queries attend over the whole cache (the caller's
    mask hides the unwritten slots). Returns (out [B, Lq, E], new cache or None).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x_q.shape[-1]
    q = Dense(self.num_heads * self.head_dim, ('embed', 'heads'), name='query', **kw)(x_q)
    k = Dense(self.kv_heads * self.head_dim, ('embed', 'heads'), name='key', **kw)(x_kv)
    v = Dense(self.kv_heads * self.head_dim, ('embed', 'heads'), name='value', **kw)(x_kv)
    q = q.reshape(*q.shape[:2], self.num_heads, self.head_dim)
    k = k.reshape(*k.shape[:2], self.kv_heads, self.head_dim)
    v = v.reshape(*v.shape[:2], self.kv_heads, self.head_dim)
    if self.qk_norm:
      q = RMSNorm(self.norm_eps, name='query_norm', **kw)(q)
      k = RMSNorm(self.norm_eps, name='key_norm', **kw)(k)
    if angles_q is not None:
      q = apply_rope(q, angles_q)
    if angles_kv is not None:
      k = apply_rope(k, angles_kv)
    q = constrain(q, ('batch', 'length', 'act_heads', 'kv'))
    k = constrain(k, ('batch', 'length', 'act_heads', 'kv'))
    v = constrain(v, ('batch', 'length', 'act_heads', 'kv'))
    new_cache = None
    if cache is not None:
      k_cache, v_cache = cache
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      new_cache = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    dropout_rng = None
    if self.attention_dropout > 0.0 and not deterministic:
      dropout_rng = self.make_rng('dropout')
    out = dot_product_attention(q, k, v, mask, impl=self.impl, dropout_rate=self.attention_dropout,
                                dropout_rng=dropout_rng)
    out = checkpoint_name(out, 'attention_out')
    out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
    out = Dense(width, ('heads', 'embed'), name='out', **kw)(out)
    return out, new_cache


class SwiGLU(nn.Module):
  """SwiGLU MLP (LlamaGen's FeedForward without biases)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Dense(self.hidden, ('embed', 'mlp'), name='gate', **kw)(x)
    up = Dense(self.hidden, ('embed', 'mlp'), name='up', **kw)(x)
    h = constrain(nn.silu(gate) * up, ('batch', 'length', 'act_mlp'))
    return Dense(x.shape[-1], ('mlp', 'embed'), name='down', **kw)(h)


class Block(nn.Module):
  """Pre-norm Transformer block: [self-attention] [cross-attention] MLP, residual dropout.

  The same block serves the causal backbone (self-attention with RoPE and a KV
  cache), the global head (bidirectional self-attention) and the local head
  (cross-attention to the causal states, then bidirectional self-attention).
  Call signature is scan-friendly: (x, cache) -> (x, cache).
  """
  num_heads: int
  kv_heads: int
  mlp_hidden: int
  cross_attention: bool = False
  window: int = 0  # > 0: self-attention only inside consecutive chunks of `window` tokens.
  qk_norm: bool = False
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attention_dropout: float = 0.0
  attention_impl: str = 'xla'
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cache, self_mask: Array | None, angles: Array | None,
               memory: Array | None = None, memory_mask: Array | None = None,
               cache_index: Array | int | None = None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    attn_kw = dict(num_heads=self.num_heads, kv_heads=self.kv_heads, head_dim=width // self.num_heads,
                   qk_norm=self.qk_norm, norm_eps=self.norm_eps,
                   attention_dropout=self.attention_dropout, impl=self.attention_impl, **kw)
    drop = nn.Dropout(self.dropout, deterministic=self.deterministic)
    x = constrain(x, ('batch', 'length', 'act_embed'))
    if self.cross_attention:
      h = RMSNorm(self.norm_eps, name='cross_norm', **kw)(x)
      h, _ = Attention(name='cross_attention', **attn_kw)(
          h, memory, memory_mask, deterministic=self.deterministic)
      x = x + drop(h)
    h = RMSNorm(self.norm_eps, name='attention_norm', **kw)(x)
    if self.window:
      h = h.reshape(-1, self.window, width)
    h, cache = Attention(name='attention', **attn_kw)(
        h, h, self_mask, angles_q=angles, angles_kv=angles, cache=cache, cache_index=cache_index,
        deterministic=self.deterministic)
    x = x + drop(h.reshape(x.shape))
    h = RMSNorm(self.norm_eps, name='mlp_norm', **kw)(x)
    x = x + drop(SwiGLU(self.mlp_hidden, name='mlp', **kw)(h))
    return constrain(x, ('batch', 'length', 'act_embed')), cache


_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def stack(block_kwargs: dict[str, Any], depth: int, remat_policy: str, name: str,
          unroll: int = 1) -> nn.Module:
  """`depth` Blocks under nn.scan (params stacked on a leading 'layers' axis), optionally remat'ed.

  The returned module is called as `stack(x, cache, self_mask, angles, memory,
  memory_mask, cache_index)`; `cache` is scanned over layers (or None), every
  other argument is broadcast to all layers.
  """
  block_cls = Block
  if remat_policy != 'none':
    policy = _REMAT_POLICIES.get(remat_policy)
    if remat_policy == 'save_attention_out':
      policy = jax.checkpoint_policies.save_only_these_names('attention_out')
    block_cls = nn.remat(Block, policy=policy, prevent_cse=False)
  scanned = nn.scan(
      block_cls,
      variable_axes={'params': 0},
      split_rngs={'params': True, 'dropout': True},
      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
      length=depth,
      unroll=min(unroll, depth),
      metadata_params={nn.PARTITION_NAME: 'layers'})
  return scanned(name=name, **block_kwargs)
