"""The causal backbone: a LlamaGen-style decoder with 2D RoPE and a functional KV cache.

Sequence layout (N = H * W grid positions, P = class_prefix_len):

  slot:    0 .. P-2      P-1        P      P+1    ...  P+N-2
  input:   class prefix  class      x_0    x_1    ...  x_{N-2}
  state:                 h_0        h_1    h_2    ...  h_{N-1}

State h_t has seen exactly the tokens x_0..x_{t-1} (the first t of the grid,
0-indexed raster order) and is where step t's prediction starts. Token x_i
carries its OWN grid position i in its rotation (DESIGN.md, Fig. 4 right);
with `position_shift=1` (the 1D next-token baseline) it carries position i+1,
so the last class slot carries position 0. Class prefix slots get the
identity rotation.
"""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from heptapod_jax.models import layers
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer: [depth, B, seq_len, kv_heads, head_dim] each."""
  k: Array
  v: Array


def init_cache(config: ModelConfig, batch_size: int, dtype=None) -> KVCache:
  """An empty (zero) cache for `batch_size` sequences of the full backbone length."""
  b = config.backbone
  dtype = dtype or layers.dtype_of(config.dtype)
  shape = (b.depth, batch_size, config.seq_len, b.kv_heads, b.width // b.num_heads)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def slot_grid_index(config: ModelConfig, slots: Array) -> Array:
  """Grid raster index whose 2D position the input at `slots` carries (< 0: identity)."""
  return slots - config.backbone.class_prefix_len + config.position_shift


class CausalTransformer(nn.Module):
  """Class-conditional causal Transformer over [class prefix, x_0, ..., x_{N-2}]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, labels: Array | None, tokens: Array | None, *, offset: Array | int = 0,
               cache: KVCache | None = None, deterministic: bool = True):
    """Runs the backbone over a contiguous run of input slots.

    Args:
      labels: int32[B] class labels; when given, the P class-prefix slots come
        first (then `offset` must be 0). Label `num_classes` is the null class.
      tokens: int32[B, n] grid tokens (float[B, n, C] latents for continuous
        tokens) for the slots after the prefix (or after `offset` when labels
        is None), or None.
      offset: first slot index of this call's input (traced in decoding).
      cache: KVCache to read and extend (decoding), or None (teacher forcing:
        plain causal attention over this call's input).
      deterministic: disables dropout.
    Returns:
      (h: [B, L_in, width] final-normed states, new KVCache or None).
    """
    cfg, b = self.config, self.config.backbone
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    pieces = []
    if labels is not None:
      table = self.param('class_embedding', layers.normal_init(('classes', None, 'embed')),
                         (cfg.num_classes + 1, b.class_prefix_len, b.width), param_dtype)
      if b.class_dropout > 0.0 and not deterministic:
        drop = jax.random.bernoulli(self.make_rng('dropout'), b.class_dropout, labels.shape)
        labels = jnp.where(drop, cfg.num_classes, labels)
      pieces.append(jnp.take(table, labels, axis=0).astype(dtype))
    if tokens is not None and cfg.continuous:
      # Continuous tokens (VAE latents [B, n, C]): a linear input embedding.
      pieces.append(layers.Dense(b.width, (None, 'embed'), name='token_proj', **kw)(
          tokens.astype(dtype)))
    elif tokens is not None:
      table = self.param('token_embedding', layers.normal_init(('vocab', 'embed')),
                         (cfg.vocab_size, b.width), param_dtype)
      pieces.append(jnp.take(table, tokens, axis=0).astype(dtype))
    x = jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
    x = nn.Dropout(b.token_dropout, deterministic=deterministic)(x)
    x = layers.constrain(x, ('batch', 'length', 'act_embed'))

    length = x.shape[1]
    slots = offset + jnp.arange(length)
    angles = layers.rope_2d_angles(slot_grid_index(cfg, slots), cfg.grid_size[1],
                                   b.width // b.num_heads, b.rope_base)[None]
    if cache is None:
      mask = None  # Causal over this call's run: Block(causal=True), so fused kernels apply.
      scan_cache = None
    else:
      key_slots = jnp.arange(cfg.seq_len)
      mask = (slots[:, None] >= key_slots[None, :])[None, None]
      scan_cache = (cache.k, cache.v)

    block_kwargs = dict(
        num_heads=b.num_heads, kv_heads=b.kv_heads,
        mlp_hidden=mlp_hidden_dim(b.width, b.mlp_ratio, b.mlp_multiple_of),
        qk_norm=b.qk_norm, norm_eps=b.norm_eps, dropout=b.dropout,
        attention_dropout=b.attention_dropout, attention_impl=cfg.attention_impl,
        causal=cache is None, deterministic=deterministic, **kw)
    stack = layers.stack(block_kwargs, b.depth, cfg.remat_policy, name='layers',
                         unroll=cfg.scan_unroll)
    x, new_cache = stack(x, scan_cache, mask, angles, None, None, offset if cache is not None else None)
    x = layers.RMSNorm(b.norm_eps, name='final_norm', **kw)(x)
    if new_cache is not None:
      new_cache = KVCache(k=new_cache[0], v=new_cache[1])
    return x, new_cache
