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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from heptapod_jax.models import layers
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim

Array = jax.Array


# The KV cache of decoding: one (k, v) pair per layer, each [B, kv_heads, seq_len, head_dim]
# (heads before slots: `attention.cached_attention` reads it in this layout, no copy per token).
KVCache = tuple[tuple[Array, Array], ...]


def init_cache(config: ModelConfig, batch_size: int, dtype=None) -> KVCache:
  """An empty (zero) cache for `batch_size` sequences of the full backbone length."""
  b = config.backbone
  dtype = dtype or layers.dtype_of(config.dtype)
  shape = (batch_size, b.kv_heads, config.seq_len, b.width // b.num_heads)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(b.depth))


def slot_grid_index(config: ModelConfig, slots: Array) -> Array:
  """Grid raster index whose 2D position the input at `slots` carries (< 0: identity)."""
  return slots - config.backbone.class_prefix_len + config.position_shift


def block_kwargs(config: ModelConfig, *, causal: bool, deterministic: bool) -> dict:
  """The backbone's `layers.Block` settings (shared by the scanned stack and decoding)."""
  b = config.backbone
  return dict(width=b.width, num_heads=b.num_heads, kv_heads=b.kv_heads,
              mlp_hidden=mlp_hidden_dim(b.width, b.mlp_ratio, b.mlp_multiple_of),
              qk_norm=b.qk_norm, norm_eps=b.norm_eps, dropout=b.dropout,
              attention_dropout=b.attention_dropout, attention_impl=config.attention_impl,
              causal=causal, deterministic=deterministic, dtype=layers.dtype_of(config.dtype),
              param_dtype=layers.dtype_of(config.param_dtype))


class CausalTransformer(nn.Module):
  """Class-conditional causal Transformer over [class prefix, x_0, ..., x_{N-2}].

  `__call__` is teacher forcing (causal attention over the call's whole run, layers under
  nn.scan); `decode` is the KV-cached path of sampling, one block call per layer on
  per-layer parameters (models/decode.py).
  """
  config: ModelConfig

  def setup(self):
    cfg, b = self.config, self.config.backbone
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    self.class_embedding = self.param(
        'class_embedding', layers.normal_init(('classes', None, 'embed')),
        (cfg.num_classes + 1, b.class_prefix_len, b.width), param_dtype)
    if cfg.continuous:
      # Continuous tokens (VAE latents [B, n, C]): a linear input embedding.
      self.token_proj = layers.Dense(b.width, (None, 'embed'), dtype=dtype,
                                     param_dtype=param_dtype)
    else:
      self.token_embedding = self.param('token_embedding', layers.normal_init(('vocab', 'embed')),
                                        (cfg.vocab_size, b.width), param_dtype)
    self.final_norm = layers.RMSNorm(b.norm_eps, dtype=dtype, param_dtype=param_dtype)

  def embed(self, labels: Array | None, tokens: Array | None, deterministic: bool = True
            ) -> Array:
    """Input embeddings [B, L_in, width]: the P class-prefix slots (when labels is given),
    then the grid tokens."""
    cfg, b = self.config, self.config.backbone
    dtype = layers.dtype_of(cfg.dtype)
    pieces = []
    if labels is not None:
      if b.class_dropout > 0.0 and not deterministic:
        drop = jax.random.bernoulli(self.make_rng('dropout'), b.class_dropout, labels.shape)
        labels = jnp.where(drop, cfg.num_classes, labels)
      pieces.append(jnp.take(self.class_embedding, labels, axis=0).astype(dtype))
    if tokens is not None and cfg.continuous:
      pieces.append(self.token_proj(tokens.astype(dtype)))
    elif tokens is not None:
      pieces.append(jnp.take(self.token_embedding, tokens, axis=0).astype(dtype))
    x = jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
    return layers.constrain(x, ('batch', 'length', 'act_embed'))

  def _angles(self, slots: Array) -> Array:
    cfg, b = self.config, self.config.backbone
    return layers.rope_2d_angles(slot_grid_index(cfg, slots), cfg.grid_size[1],
                                 b.width // b.num_heads, b.rope_base)[None]

  @nn.compact
  def __call__(self, labels: Array | None, tokens: Array | None, *,
               deterministic: bool = True) -> Array:
    """Teacher forcing: causal states of a run of input slots starting at slot 0.

    Args:
      labels: int32[B] class labels (the P class-prefix slots come first). Label
        `num_classes` is the null class.
      tokens: int32[B, n] grid tokens (float[B, n, C] latents for continuous tokens) for
        the slots after the prefix, or None.
      deterministic: disables dropout.
    Returns:
      h: [B, P + n, width] final-normed states.
    """
    b = self.config.backbone
    x = self.embed(labels, tokens, deterministic)
    x = nn.Dropout(b.token_dropout, deterministic=deterministic)(x)
    angles = self._angles(jnp.arange(x.shape[1]))
    # Causal over this call's run: Block(causal=True), so fused attention kernels apply.
    stack = layers.stack(block_kwargs(self.config, causal=True, deterministic=deterministic),
                         b.depth, self.config.remat_policy, name='layers',
                         unroll=self.config.scan_unroll)
    x, _ = stack(x, None, None, angles, None, None, None)
    return self.final_norm(x)

  def decode(self, labels: Array | None, tokens: Array | None, offset: Array | int,
             cache: KVCache, layer_params: tuple[Any, ...]) -> tuple[Array, KVCache]:
    """KV-cached run of input slots offset..offset+L_in-1 (sampling).

    Args:
      labels: int32[B] for the class prefix (then offset is 0), or None.
      tokens: the grid tokens of the run, or None.
      offset: first slot of the run (traced).
      cache: `init_cache`'s layout; slots >= offset + L_in are never read.
      layer_params: the stacked 'layers' parameters split into one tree per layer
        (`decode.split_layers`, once per sampling call: slicing them inside the token loop
        would copy every weight at every token on the CPU).
    Returns:
      (h [B, L_in, width] final-normed states, the cache with the run's entries written).
    """
    cfg = self.config
    x = self.embed(labels, tokens)
    slots = offset + jnp.arange(x.shape[1])
    angles = self._angles(slots)
    mask = (slots[:, None] >= jnp.arange(cfg.seq_len)[None, :])[None, None]
    block = layers.Block(**block_kwargs(cfg, causal=False, deterministic=True), parent=None)
    new_cache = []
    for params, entry in zip(layer_params, cache):
      x, entry = block.apply({'params': params}, x, entry, mask, angles, cache_index=offset)
      new_cache.append(entry)
    return self.final_norm(x), tuple(new_cache)
