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

from heptapod_jax.models import attention

Array = jax.Array
Dtype = Any

INIT_STD = 0.02  # LlamaGen / GPT initialisation of every Linear and embedding.


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


def matmul(x: Array, w: Array) -> Array:
  """x [..., D] @ w [D, F] -> [..., F]: every Dense of the model.

  On accelerators, a plain einsum. On the CPU, the same product with a hand-written
  backward pass (`_cpu_matmul`): its weight gradient is x^T @ dy (or (dy^T @ x)^T) with the
  transposed operand materialised first, a plain row-major GEMM. Left to itself XLA:CPU
  computes that gradient as (dy^T @ x)^T, transposing the wide [tokens, F] gradient inside
  the elementwise backward of the layer that produced it and running a GEMM with a
  transposed operand at about half the speed of the forward one (profile of the B preset's
  train step, benchmarks/train_throughput.py). Same numbers either way
  (tests/test_layers.py checks values and gradients against the einsum).
  """
  if attention.target_platform() == 'cpu':
    return _cpu_matmul(x, w)
  return jnp.einsum('...d,df->...f', x, w)


@jax.custom_vjp
def _cpu_matmul(x: Array, w: Array) -> Array:
  return jnp.einsum('...d,df->...f', x, w)


def _cpu_matmul_fwd(x: Array, w: Array):
  return _cpu_matmul(x, w), (x, w)


def _cpu_matmul_bwd(res, dy: Array):
  return _row_major_grads(*res, dy)


def _row_major_grads(x: Array, w: Array, dy: Array, dw_dtype: Dtype = None
                     ) -> tuple[Array, Array]:
  """(dx, dw) of x @ w with the weight gradient as one row-major GEMM (the CPU's fast form)."""
  dx = jnp.einsum('...f,df->...d', dy, w)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  # Transpose the narrower of x [T, D] and dy [T, F] (fewer bytes; and never the SwiGLU
  # hidden state, which XLA would recompute inside a slow transposing loop), then one
  # row-major GEMM. The barrier keeps the transposed copy materialised: without it XLA
  # folds the transpose back into the dot's dimension numbers.
  if x2.shape[1] <= dy2.shape[1]:
    dw = jnp.dot(jax.lax.optimization_barrier(x2.T), dy2, preferred_element_type=jnp.float32)
  else:
    dw = jnp.dot(jax.lax.optimization_barrier(dy2.T), x2, preferred_element_type=jnp.float32).T
  return dx.astype(x.dtype), dw.astype(dw_dtype or w.dtype)


def matmul_grads(x: Array, w: Array, dy: Array, dw_dtype: Dtype = None) -> tuple[Array, Array]:
  """(dx, dw) of `matmul(x, w)` for the cotangent dy, for hand-written backward passes (the
  fused vocabulary loss): the CPU's row-major form there, plain einsums elsewhere. dw is
  accumulated in float32 and returned as `dw_dtype` (default w's)."""
  if attention.target_platform() == 'cpu':
    return _row_major_grads(x, w, dy, dw_dtype)
  dx = jnp.einsum('...f,df->...d', dy, w)
  dw = jnp.einsum('...d,...f->df', x, dy, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(dw_dtype or w.dtype)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


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
    return matmul(x, kernel)


class Kernel(nn.Module):
  """The 2D kernel of a bias-free Linear, returned instead of applied: `Dense`'s parameter
  ('<name>/kernel', same init and logical axes) for layers that apply several kernels as
  one matmul (`stacked_dense`)."""
  features: int
  axes: tuple[str | None, str | None]
  param_dtype: Dtype = jnp.float32
  std: float = INIT_STD

  @nn.compact
  def __call__(self, in_features: int) -> Array:
    return self.param('kernel', normal_init(self.axes, self.std), (in_features, self.features),
                      self.param_dtype)


def stacked_dense(x: Array, kernels: list[Array], dtype: Dtype) -> list[Array]:
  """x @ k for every k of `kernels` ([D, F] each), run as ONE matmul with the kernels
  stacked on a new middle axis ([D, n, F] -> out [..., n, F]).

  The same numbers as separate Dense calls (each output column is the same dot product);
  the parameters stay separate, so checkpoints and sharding rules are unchanged. One wide
  matmul instead of n narrow ones, and in the backward pass one weight-gradient matmul over
  [..., n, F] instead of n (on the CPU, with `matmul`'s backward and the loss on token ids,
  the B preset's train step went from MFU 0.45 to 0.63: docs/benchmarks.md); on accelerators it
  is the usual fused QKV / gate-up projection.
  """
  if len(kernels) == 1:  # Nothing to stack (a query of cross-attention or GQA): no copy.
    return [matmul(x.astype(dtype), kernels[0].astype(dtype))]
  w = jnp.stack([k.astype(dtype) for k in kernels], axis=1)  # [D, n, F]
  out = matmul(x.astype(dtype), w.reshape(w.shape[0], -1))
  out = out.reshape(*out.shape[:-1], len(kernels), -1)  # [..., n, F]
  # split, not indexing: its gradient is one concatenate, not a zero-padded copy per kernel.
  return [part[..., 0, :] for part in jnp.split(out, len(kernels), axis=-2)]


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


class Attention(nn.Module):
  """Self- or cross-attention with optional 2D RoPE, QK-norm and a functional KV cache.

  Besides the plain call, the projections are exposed (`project`) so that decoding can
  compute keys and values once per token and reuse them at every later step (the heads'
  incremental decoding, models/decode.py), passing them back in as `qkv` / `kv`.
  """
  num_heads: int
  kv_heads: int
  head_dim: int
  features: int = 0  # Width of the output projection; 0 = num_heads * head_dim.
  qk_norm: bool = False
  norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  impl: str = 'xla'
  causal: bool = False  # Self-attention over one contiguous run (teacher forcing).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    pkw = dict(param_dtype=self.param_dtype)
    self.query = Kernel(self.num_heads * self.head_dim, ('embed', 'heads'), **pkw)
    self.key = Kernel(self.kv_heads * self.head_dim, ('embed', 'heads'), **pkw)
    self.value = Kernel(self.kv_heads * self.head_dim, ('embed', 'heads'), **pkw)
    self.out = Dense(self.features or self.num_heads * self.head_dim, ('heads', 'embed'), dtype=self.dtype,
                     param_dtype=self.param_dtype)
    if self.qk_norm:
      self.query_norm = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
      self.key_norm = RMSNorm(self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def project(self, x_q: Array | None, x_kv: Array | None
              ) -> tuple[Array | None, Array | None, Array | None]:
    """(q [B, Lq, H, D], k [B, Lk, K, D], v [B, Lk, K, D]) of x_q and x_kv, QK-normed, before
    RoPE; q is None when x_q is None, k and v when x_kv is None. Self-attention without GQA
    runs the three projections as one matmul (`stacked_dense`)."""
    q = k = v = None
    if x_q is not None and x_q is x_kv and self.num_heads == self.kv_heads:
      q, k, v = stacked_dense(x_q, [self.query(x_q.shape[-1]), self.key(x_q.shape[-1]),
                                    self.value(x_q.shape[-1])], self.dtype)
    else:
      if x_q is not None:
        q = stacked_dense(x_q, [self.query(x_q.shape[-1])], self.dtype)[0]
      if x_kv is not None:
        k, v = stacked_dense(x_kv, [self.key(x_kv.shape[-1]), self.value(x_kv.shape[-1])],
                             self.dtype)
    if q is not None:
      q = q.reshape(*q.shape[:2], self.num_heads, self.head_dim)
      q = self.query_norm(q) if self.qk_norm else q
    if k is not None:
      k = k.reshape(*k.shape[:2], self.kv_heads, self.head_dim)
      v = v.reshape(*v.shape[:2], self.kv_heads, self.head_dim)
      k = self.key_norm(k) if self.qk_norm else k
    return q, k, v

  def __call__(self, x_q: Array, x_kv: Array | None, mask: Array | None, *,
               angles_q: Array | None = None, angles_kv: Array | None = None,
               cache: tuple[Array, Array] | None = None, cache_index: Array | int | None = None,
               qkv: tuple[Array, Array, Array] | None = None,
               kv: tuple[Array, Array] | None = None, deterministic: bool = True):
    """Attention of x_q: [B, Lq, E] over x_kv: [B, Lk, E'].

    qkv: (q, k, v) computed earlier by `project`, used instead of projecting x_q and x_kv
      (RoPE is still applied to them when angles are given).
    kv: keys and values computed earlier, in the cache layout ([B, K, Lk, D] each, e.g. the
      local head's memory while decoding): x_kv is not read and the queries attend over them.
    cache: (k, v) [B, K, Lmax, D] each: the new keys/values are written at slot
      `cache_index` and the queries attend over the whole cache (the caller's mask hides the
      unwritten slots).
    Returns (out [B, Lq, features], new cache or None).
    """
    if kv is not None:
      q = qkv[0] if qkv is not None else self.project(x_q, None)[0]
      if angles_q is not None:
        q = apply_rope(q, angles_q)
      out = attention.cached_attention(constrain(q, ('batch', 'length', 'act_heads', 'kv')), *kv, mask)
      new_cache = None
    else:
      q, k, v = qkv if qkv is not None else self.project(x_q, x_kv)
      if angles_q is not None:
        q = apply_rope(q, angles_q)
      if angles_kv is not None:
        k = apply_rope(k, angles_kv)
      q = constrain(q, ('batch', 'length', 'act_heads', 'kv'))
      k = constrain(k, ('batch', 'length', 'act_heads', 'kv'))
      v = constrain(v, ('batch', 'length', 'act_heads', 'kv'))
      new_cache = None
      if cache is not None:
        start = (0, 0, cache_index, 0)
        new_cache = tuple(jax.lax.dynamic_update_slice(c, a.transpose(0, 2, 1, 3).astype(c.dtype),
                                                       start) for c, a in zip(cache, (k, v)))
        out = attention.cached_attention(q, *new_cache, mask)
      else:
        dropout_rng = None
        if self.attention_dropout > 0.0 and not deterministic:
          dropout_rng = self.make_rng('dropout')
        out = attention.dot_product_attention(q, k, v, mask, impl=self.impl, causal=self.causal,
                                    dropout_rate=self.attention_dropout, dropout_rng=dropout_rng)
    out = checkpoint_name(out, 'attention_out')
    out = out.reshape(*out.shape[:2], self.num_heads * self.head_dim)
    return self.out(out), new_cache


class SwiGLU(nn.Module):
  """SwiGLU MLP (LlamaGen's FeedForward without biases)."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pkw = dict(param_dtype=self.param_dtype)
    gate, up = stacked_dense(x, [Kernel(self.hidden, ('embed', 'mlp'), name=name, **pkw)(
        x.shape[-1]) for name in ('gate', 'up')], self.dtype)
    h = constrain(nn.silu(gate) * up, ('batch', 'length', 'act_mlp'))
    return Dense(x.shape[-1], ('mlp', 'embed'), name='down', **kw)(h)


class Block(nn.Module):
  """Pre-norm Transformer block: [cross-attention] self-attention, MLP, residual dropout.

  The same block serves the causal backbone (self-attention with RoPE and a KV
  cache), the global head (bidirectional self-attention) and the local head
  (cross-attention to the causal states, then bidirectional self-attention).
  Call signature is scan-friendly: (x, cache) -> (x, cache). `self_qkv` and
  `memory_kv` expose the attention inputs so that incremental decoding
  (models/decode.py) can compute them once and pass them back in.
  """
  width: int
  num_heads: int
  kv_heads: int
  mlp_hidden: int
  has_cross_attention: bool = False
  window: int = 0  # > 0: self-attention only inside consecutive chunks of `window` tokens.
  qk_norm: bool = False
  norm_eps: float = 1e-5
  dropout: float = 0.0
  attention_dropout: float = 0.0
  attention_impl: str = 'xla'
  causal: bool = False  # Causal self-attention without an explicit mask (backbone, no cache).
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(num_heads=self.num_heads, kv_heads=self.kv_heads,
                   head_dim=self.width // self.num_heads, features=self.width,
                   qk_norm=self.qk_norm, norm_eps=self.norm_eps,
                   attention_dropout=self.attention_dropout, impl=self.attention_impl, **kw)
    if self.has_cross_attention:
      self.cross_norm = RMSNorm(self.norm_eps, **kw)
      self.cross_attention = Attention(**attn_kw)
    self.attention_norm = RMSNorm(self.norm_eps, **kw)
    self.attention = Attention(causal=self.causal, **attn_kw)
    self.mlp_norm = RMSNorm(self.norm_eps, **kw)
    self.mlp = SwiGLU(self.mlp_hidden, **kw)
    # Named as the compact version named it, so that the dropout masks of a seed stay the same.
    self.drop = nn.Dropout(self.dropout, deterministic=self.deterministic, name='Dropout_0')

  def self_qkv(self, x: Array) -> tuple[Array, Array, Array]:
    """The self-attention's (q, k, v) of block inputs x [B, L, E], before RoPE (pass them
    back as `qkv`; valid where the block's input x is what it will be at that call)."""
    h = self.attention_norm(x)
    return self.attention.project(h, h)

  def memory_kv(self, memory: Array) -> tuple[Array, Array]:
    """The cross-attention's (k, v) of memory [B, M, E] in the cache layout [B, K, M, D]
    (pass them back as `memory_kv`)."""
    _, k, v = self.cross_attention.project(None, memory)
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def __call__(self, x: Array, cache, self_mask: Array | None, angles: Array | None,
               memory: Array | None = None, memory_mask: Array | None = None,
               cache_index: Array | int | None = None, *,
               qkv: tuple[Array, Array, Array] | None = None,
               memory_kv: tuple[Array, Array] | None = None,
               query_index: Array | None = None):
    """x [B, L, E] -> (x, cache).

    qkv: the self-attention's projections of x from `self_qkv` (skips them; not with a
    cross-attention, which changes x first); memory_kv: the cross-attention's keys and
    values of the memory from `memory_kv` (memory may then be None).
    query_index: int32[Q] positions of x whose outputs are wanted: only they are queries of
    the self-attention and go through the MLP (every position is still a key); returns
    [B, Q, E]. Not with RoPE or the window reshape.
    """
    x = constrain(x, ('batch', 'length', 'act_embed'))
    if self.has_cross_attention:
      h = self.cross_norm(x)
      h, _ = self.cross_attention(h, memory, memory_mask, kv=memory_kv,
                                  deterministic=self.deterministic)
      x = x + self.drop(h)
    if query_index is not None and (angles is not None or self.window):
      raise ValueError('Block: query_index is not supported with RoPE or windows.')
    if qkv is None:
      h = self.attention_norm(x)
      if self.window:
        h = h.reshape(-1, self.window, self.width)
      # Only the wanted positions are projected to queries.
      qkv = self.attention.project(h if query_index is None else jnp.take(h, query_index, axis=1),
                                   h)
    elif query_index is not None:
      q, k, v = qkv
      qkv = (jnp.take(q, query_index, axis=1), k, v)
    if query_index is not None:
      x = jnp.take(x, query_index, axis=1)
    h, cache = self.attention(x, None, self_mask, angles_q=angles, angles_kv=angles, cache=cache,
                              cache_index=cache_index, qkv=qkv, deterministic=self.deterministic)
    x = x + self.drop(h.reshape(x.shape))
    h = self.mlp_norm(x)
    x = x + self.drop(self.mlp(h))
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
