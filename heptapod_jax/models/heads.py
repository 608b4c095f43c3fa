"""2D prediction heads: from causal states to distributions over future grid positions.

All heads share one interface (DESIGN.md section 3):

  head(states: [B, N, E], steps: int32[B, S], targets: int32[B, S, K])
      -> logits: float32[B, S, K, V]   (continuous tokens: features z: float32[B, S, K, Wz])

`states[:, t]` is h_t, the backbone state that has seen x_0..x_{t-1}; a step
t predicts grid positions >= t (0-indexed raster order), and `targets` holds
the raster indices whose logits are wanted (the objective chooses them). A head
at step t reads only h_0..h_t, so the same call serves teacher-forced training
(all steps at once) and KV-cached sampling (one step, states filled up to t).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from heptapod_jax.models import layers
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim

Array = jax.Array


def _take_steps(x: Array, steps: Array) -> Array:
  """x: [B, N, E], steps: [B, S] -> [B, S, E]."""
  return jnp.take_along_axis(x, steps[..., None], axis=1)


class _HeadBase(nn.Module):
  config: ModelConfig

  def _kw(self):
    return dict(dtype=layers.dtype_of(self.config.dtype),
                param_dtype=layers.dtype_of(self.config.param_dtype))

  def _block_kwargs(self, deterministic: bool) -> dict:
    h, b = self.config.head, self.config.backbone
    return dict(num_heads=h.num_heads, kv_heads=h.num_heads,
                mlp_hidden=mlp_hidden_dim(h.width, h.mlp_ratio, h.mlp_multiple_of),
                qk_norm=b.qk_norm, norm_eps=b.norm_eps, dropout=h.dropout,
                attention_impl=self.config.attention_impl, deterministic=deterministic,
                **self._kw())

  def _grid_pos(self, name: str) -> Array:
    """Learned 2D position embedding: row table + column table -> [N, width]."""
    rows, cols = self.config.grid_size
    width = self.config.head.width
    p_dtype = layers.dtype_of(self.config.param_dtype)
    init = layers.normal_init(('grid', 'embed'))
    row = self.param(f'{name}_row', init, (rows, width), p_dtype)
    col = self.param(f'{name}_col', init, (cols, width), p_dtype)
    pos = row[:, None, :] + col[None, :, :]
    return pos.reshape(rows * cols, width).astype(layers.dtype_of(self.config.dtype))

  def _logits(self, y: Array) -> Array:
    """Final norm and vocabulary projection, float32 logits; for continuous tokens the
    normed features z_j themselves (the diffusion head's condition)."""
    kw = self._kw()
    y = layers.RMSNorm(self.config.backbone.norm_eps, name='out_norm', **kw)(y)
    if self.config.continuous:
      return layers.constrain(y.astype(jnp.float32), ('batch', None, None, 'act_embed'))
    logits = layers.Dense(self.config.vocab_size, ('embed', 'vocab'), name='logits', **kw)(y)
    return layers.constrain(logits.astype(jnp.float32), ('batch', None, None, 'act_vocab'))


class GlobalHead(_HeadBase):
  """Bidirectional Transformer over [context token, one token per grid position] (Fig. 5 left).

  For step t: the context token is W_c h_t; grid position j gets W_v h_{j+1} +
  pos_j when j < t and `visible_context` is on (the state of the slot holding
  x_j, MAE's visible patches), else mask + pos_j. The output at j >= t is the
  prediction for x_j.
  """

  @nn.compact
  def __call__(self, states: Array, steps: Array, targets: Array, *, deterministic: bool = True):
    cfg, h = self.config, self.config.head
    kw = self._kw()
    n = cfg.num_positions
    batch, num_steps = steps.shape
    dtype = kw['dtype']
    ctx = layers.Dense(h.width, ('embed', None), name='context_proj', **kw)(_take_steps(states, steps))
    ctx = ctx + self.param('context_token', layers.normal_init(('embed',)), (h.width,),
                           kw['param_dtype']).astype(dtype)
    pos = self._grid_pos('pos')  # [N, Wh]
    mask_token = self.param('mask_token', layers.normal_init(('embed',)), (h.width,),
                            kw['param_dtype']).astype(dtype)
    grid = jnp.broadcast_to(mask_token, (batch, num_steps, n, h.width))
    if h.visible_context:
      # x_j lives in slot state h_{j+1}; x_{N-1} is never visible (no state after it).
      vis = layers.Dense(h.width, ('embed', None), name='visible_proj', **kw)(states[:, 1:])
      vis = jnp.pad(vis, ((0, 0), (0, 1), (0, 0)))
      visible = jnp.arange(n)[None, None, :] < steps[..., None]  # [B, S, N]
      grid = jnp.where(visible[..., None], vis[:, None], grid)
    grid = grid + pos
    x = jnp.concatenate([ctx[:, :, None, :], grid], axis=2)  # [B, S, N+1, Wh]
    x = rearrange(x, 'b s l e -> (b s) l e')
    stack = layers.stack(self._block_kwargs(deterministic), h.depth, cfg.remat_policy, name='layers',
                         unroll=cfg.scan_unroll)
    x, _ = stack(x, None, None, None, None, None, None)
    x = rearrange(x[:, 1:], '(b s) n e -> b s n e', b=batch)
    y = jnp.take_along_axis(x, targets[..., None], axis=2)  # [B, S, K, Wh]
    return self._logits(y)


class LocalHead(_HeadBase):
  """Window head (Fig. 5 right): queries for positions t..t+W-1 of step t.

  Every layer cross-attends to the causal states h_0..h_t (never beyond t),
  then self-attends bidirectionally inside the window (positions >= N are
  padding and are hidden as keys). All steps run in one pass.
  """

  @nn.compact
  def __call__(self, states: Array, steps: Array, targets: Array, *, deterministic: bool = True):
    cfg, h = self.config, self.config.head
    kw = self._kw()
    n, window = cfg.num_positions, h.window
    batch, num_steps = steps.shape
    dtype = kw['dtype']
    # Memory: state h_s is the slot of x_{s-1} (grid position s-1); h_0 is the class slot.
    mem = layers.Dense(h.width, ('embed', None), name='memory_proj', **kw)(states)
    mem_start = self.param('memory_start', layers.normal_init(('embed',)), (h.width,),
                           kw['param_dtype']).astype(dtype)
    mem_pos = jnp.concatenate([mem_start[None], self._grid_pos('memory_pos')[:-1]], axis=0)
    mem = mem + mem_pos
    # Queries: mask + pos_j for j = t .. t+W-1.
    offsets = jnp.arange(window)
    query_idx = steps[..., None] + offsets  # [B, S, W]
    in_grid = query_idx < n
    mask_token = self.param('mask_token', layers.normal_init(('embed',)), (h.width,),
                            kw['param_dtype']).astype(dtype)
    x = mask_token + jnp.take(self._grid_pos('pos'), jnp.minimum(query_idx, n - 1), axis=0)
    x = rearrange(x, 'b s w e -> b (s w) e')
    # Cross mask: a query of step t sees states h_0..h_t. Self mask: keys inside the grid.
    mem_mask = jnp.arange(n)[None, None, :] <= steps[..., None]  # [B, S, N]
    mem_mask = jnp.repeat(mem_mask, window, axis=1)[:, None]  # [B, 1, S*W, N]
    self_mask = rearrange(in_grid, 'b s w -> (b s) 1 1 w')
    stack = layers.stack(dict(self._block_kwargs(deterministic), cross_attention=True,
                              window=window), h.depth, cfg.remat_policy, name='layers',
                         unroll=cfg.scan_unroll)
    x, _ = stack(x, None, self_mask, None, mem, mem_mask, None)
    x = rearrange(x, 'b (s w) e -> b s w e', w=window)
    y = jnp.take_along_axis(x, (targets - steps[..., None])[..., None], axis=2)  # [B, S, K, Wh]
    return self._logits(y)


class NextTokenHead(_HeadBase):
  """The 1D baseline: a plain LM projection of h_t predicting x_t (position t only)."""

  @nn.compact
  def __call__(self, states: Array, steps: Array, targets: Array, *, deterministic: bool = True):
    del deterministic
    y = _take_steps(states, steps)[:, :, None, :]  # [B, S, 1, E]
    y = jnp.broadcast_to(y, (*targets.shape, y.shape[-1]))
    if self.config.continuous:  # z_t = h_t conditions the diffusion head (MAR's setting).
      return layers.constrain(y.astype(jnp.float32), ('batch', None, None, 'act_embed'))
    kw = self._kw()
    logits = layers.Dense(self.config.vocab_size, ('embed', 'vocab'), name='logits', **kw)(y)
    return layers.constrain(logits.astype(jnp.float32), ('batch', None, None, 'act_vocab'))


HEADS = {'global': GlobalHead, 'local': LocalHead, 'next_token': NextTokenHead}


def make_head(config: ModelConfig, name: str = 'head') -> nn.Module:
  """The head module for `config.head.kind`."""
  if config.head.kind not in HEADS:
    raise ValueError(f'model.head.kind={config.head.kind!r} is not one of {sorted(HEADS)}.')
  return HEADS[config.head.kind](config, name=name)
