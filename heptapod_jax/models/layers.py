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
  if target_platform() == 'cpu':
    return _cpu_matmul(x, w)
  return jnp.einsum('...d,df->...f', x, w)


@jax.custom_vjp
def _cpu_matmul(x: Array, w: Array) -> Array:
  return jnp.einsum('...d,df->...f', x, w)


def _cpu_matmul_fwd(x: Array, w: Array):
  return _cpu_matmul(x, w), (x, w)


def _cpu_matmul_bwd(res, dy: Array):
  x, w = res
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
  return dx.astype(x.dtype), dw.astype(w.dtype)


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
  the B preset's train step went from MFU 0.45 to 0.63: README, Figures); on accelerators it
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


def target_platform() -> str:
  """Platform the computation is being built for: the mesh's (set with `jax.set_mesh`, which is
  also how ahead-of-time compilation for a TPU topology is traced on a CPU host), else JAX's
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  platform = getattr(device, 'platform', None)
  return platform or jax.default_backend()


def resolve_attention_impl(impl: str, dtype: Dtype = jnp.float32) -> str:
  """The concrete implementation for `impl` on the default backend ('auto' picks per platform).

  'auto': TPU -> 'splash' (the Pallas splash-attention kernel), GPU -> 'cudnn' for bf16/fp16
  compute (cuDNN flash attention; float32 is not supported by it) else 'xla', CPU -> 'xla'.
  """
  if impl != 'auto':
    return impl
  backend = target_platform()
  if backend == 'tpu':
    return 'splash'
  if backend in ('gpu', 'cuda', 'rocm') and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def check_attention_impl(impl: str, dtype: Dtype = jnp.float32, field: str = 'model.attention_impl'
                         ) -> None:
  """Raises ValueError naming `field` when `impl` cannot run on the target platform."""
  backend = target_platform()
  impl = resolve_attention_impl(impl, dtype)
  if impl == 'cudnn' and backend not in ('gpu', 'cuda'):
    raise ValueError(f'{field}="cudnn" needs an NVIDIA GPU (cuDNN flash attention); the default '
                     f'JAX backend is {backend!r}. Use "xla" or "auto".')
  if impl == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f'{field}="cudnn" needs bfloat16/float16 compute (model.dtype), got '
                     f'{jnp.dtype(dtype).name}; use "xla" for float32.')
  if impl == 'splash' and backend not in ('tpu', 'cpu'):
    raise ValueError(f'{field}="splash" is the TPU Pallas kernel (interpreted on CPU for tests); '
                     f'the default JAX backend is {backend!r}. Use "cudnn", "xla" or "auto".')


_SPLASH_BLOCK = 128  # Sequence lengths are padded to a multiple of this for the splash kernel.


def _splash_attention(q: Array, k: Array, v: Array, causal: bool) -> Array:
  """Splash attention (Pallas TPU kernel) of q: [B, L, H, D], k/v: [B, L, K, D] -> [B, L, H, D].

  The kernel works per example on [heads, length, dim] with a static mask, so it
  runs under `jax.shard_map` when a mesh is set: batch over the 'batch' rule's
  mesh axes, heads over the 'act_heads' rule's axes (each shard sees whole
  sequences). Lengths are padded to a multiple of 128 with a second segment id,
  so padded keys are invisible to real queries (and padded queries see only
  padding, then are dropped). Off TPU the kernel runs in Pallas interpret mode
  (slow; for tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  b, length, h, d = q.shape
  kh = k.shape[2]
  padded = -(-length // _SPLASH_BLOCK) * _SPLASH_BLOCK
  interpret = target_platform() != 'tpu'

  def per_shard(q, k, v):
    heads = q.shape[2]
    base = masks.CausalMask((padded, padded)) if causal else masks.FullMask((padded, padded))
    block = 512 if padded % 512 == 0 else _SPLASH_BLOCK
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([base] * heads), head_shards=1,
                                    q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    # [B, L, H, D] -> [B, H, L, D]; the kernel folds the 1/sqrt(D) scale into q.
    qt = jnp.pad(q * (d ** -0.5), pad).transpose(0, 2, 1, 3)
    kt = jnp.pad(k, pad).transpose(0, 2, 1, 3)
    vt = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    ids = (jnp.arange(padded) >= length).astype(jnp.int32)
    segments = splash.SegmentIds(q=ids, kv=ids)
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(qt, kt, vt)
    return out.transpose(0, 2, 1, 3)[:, :length]

  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return per_shard(q, k, v)
  spec = nn.logical_to_mesh_axes(('batch', None, 'act_heads', None), rules)
  spec = list(spec)
  for dim, size in ((0, b), (2, kh)):  # Shard only dimensions the mesh axes divide.
    names = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],) if spec[dim] else ()
    if names and size % math.prod(mesh.shape[a] for a in names):
      spec[dim] = None
  if spec[2] is not None and h % math.prod(
      mesh.shape[a] for a in (spec[2] if isinstance(spec[2], tuple) else (spec[2],))):
    spec[2] = None
  spec = jax.sharding.PartitionSpec(*spec)
  return jax.shard_map(per_shard, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *, impl: str,
                          causal: bool = False, dropout_rate: float = 0.0,
                          dropout_rng: Array | None = None) -> Array:
  """Multi-head attention core with grouped-query support.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with K dividing H.
    mask: bool, broadcastable to [B, 1, Lq, Lk] (True = attend), or None.
    impl: 'einsum' (plain XLA ops; supports attention dropout), 'xla' / 'cudnn'
      (`jax.nn.dot_product_attention` with that implementation; cuDNN flash
      attention needs a GPU and bf16/fp16), 'splash' (the Pallas TPU splash
      kernel) or 'auto' (per platform, see `resolve_attention_impl`). The fused
      kernels take static masks only: with an explicit `mask` (KV-cached
      decoding, the local head's cross-attention) they fall back to 'xla'.
    causal: query i attends to keys <= i (self-attention with Lq == Lk); combined
      with `mask` if both are given.
  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  impl = resolve_attention_impl(impl, q.dtype)
  if causal and (mask is not None or impl == 'einsum'):
    tri = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
    mask = tri if mask is None else mask & tri
    causal = False
  if mask is not None and impl in ('cudnn', 'splash'):
    impl = 'xla'
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
  if impl == 'splash':
    return _splash_attention(q, k, v, causal).astype(q.dtype)
  if impl not in ('xla', 'cudnn'):
    raise ValueError(f'attention impl {impl!r} is not one of einsum, xla, cudnn, splash, auto.')
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)


class Attention(nn.Module):
  """Self- or cross-attention with optional 2D RoPE, QK-norm and a functional KV cache."""
  num_heads: int
  kv_heads: int
  head_dim: int
  qk_norm: bool = False
  norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  impl: str = 'xla'
  causal: bool = False  # Self-attention over one contiguous run (teacher forcing).
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
    pkw = dict(param_dtype=self.param_dtype)
    wq = Kernel(self.num_heads * self.head_dim, ('embed', 'heads'), name='query', **pkw)(
        x_q.shape[-1])
    wk = Kernel(self.kv_heads * self.head_dim, ('embed', 'heads'), name='key', **pkw)(
        x_kv.shape[-1])
    wv = Kernel(self.kv_heads * self.head_dim, ('embed', 'heads'), name='value', **pkw)(
        x_kv.shape[-1])
    if x_q is x_kv and self.num_heads == self.kv_heads:  # Self-attention, no GQA: fused QKV.
      q, k, v = stacked_dense(x_q, [wq, wk, wv], self.dtype)
    else:
      q = stacked_dense(x_q, [wq], self.dtype)[0]
      k, v = stacked_dense(x_kv, [wk, wv], self.dtype)
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
    out = dot_product_attention(q, k, v, mask, impl=self.impl, causal=self.causal and cache is None,
                                dropout_rate=self.attention_dropout, dropout_rng=dropout_rng)
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
    pkw = dict(param_dtype=self.param_dtype)
    gate, up = stacked_dense(x, [Kernel(self.hidden, ('embed', 'mlp'), name=name, **pkw)(
        x.shape[-1]) for name in ('gate', 'up')], self.dtype)
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
  causal: bool = False  # Causal self-attention without an explicit mask (backbone, no cache).
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
    h, cache = Attention(name='attention', causal=self.causal, **attn_kw)(
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
