"""Attention kernels: which implementation runs where, and the two attention products.

  target_platform / resolve_attention_impl / check_attention_impl
      'auto' -> splash (TPU, Pallas), cuDNN flash attention (GPU, bf16/fp16), else XLA;
      a configured impl that cannot run on the target platform is refused, naming the field.
  dot_product_attention   training and prefill: [B, L, H, D] queries over [B, S, K, D]
                          keys/values (grouped heads, causal or masked, optional dropout).
  cached_attention        decoding: a few queries over a KV cache in its stored layout.

Pure functions of arrays (the only module state read is the mesh and its logical-axis rules,
for the splash kernel's sharding); `layers.Attention` is the Flax module that projects,
rotates and caches around them.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

_MASK_VALUE = -1e9  # Finite, so that softmax never sees a row of -inf.


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
      decoding, the local head's cross-attention) they fall back to 'xla', and so does
      'splash' when there are fewer queries than keys (decoding's last head layer) and
      'cudnn' for odd sequence lengths (the global head's N + 1 tokens).
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
  if impl == 'cudnn' and (q.shape[1] % 2 or k.shape[1] % 2):
    # cuDNN's flash attention rejects odd lengths when training (seen on an H200, jax 0.11.2:
    # 'Unsupported sequence length Q 257, KV 257', the global head's N + 1 tokens).
    impl = 'xla'
  if impl == 'splash' and q.shape[1] != k.shape[1]:
    impl = 'xla'  # The splash path pads one run for queries and keys alike (self-attention).
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


def cached_attention(q: Array, k_cache: Array, v_cache: Array, mask: Array | None) -> Array:
  """Attention of a few new queries over a KV cache (decoding): q [B, Lq, H, D] over
  k_cache / v_cache [B, K, S, D] (heads before slots, K dividing H) -> [B, Lq, H, D].

  The cache is laid out so that both products are plain batched matmuls over (B, K) with
  the cache in its stored layout (no transposed copy of the cache per decoded token, which
  the [B, S, K, D] layout of `dot_product_attention` costs). mask: bool, broadcastable to
  [B, 1, Lq, S] (True = attend), hides the slots not written yet.
  """
  b, lq, h, d = q.shape
  kh = k_cache.shape[1]
  qg = q.reshape(b, lq, kh, h // kh, d)
  logits = jnp.einsum('bqkgd,bksd->bkgqs', qg, k_cache.astype(q.dtype),
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  if mask is not None:
    logits = jnp.where(mask[:, :, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bkgqs,bksd->bqkgd', probs.astype(q.dtype), v_cache.astype(q.dtype))
  return out.reshape(b, lq, h, d)
