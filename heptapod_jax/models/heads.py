"""2D prediction heads: from causal states to distributions over future grid positions.

All heads share one interface (DESIGN.md section 3):

  head(states: [B, N, E], steps: int32[B, S], targets: int32[B, S, K])
      -> logits: float32[B, S, K, V]   (continuous tokens: features z: float32[B, S, K, Wz])

`states[:, t]` is h_t, the backbone state that has seen x_0..x_{t-1}; a step
t predicts grid positions >= t (0-indexed raster order), and `targets` holds
the raster indices whose logits are wanted (the objective chooses them). A head
at step t reads only h_0..h_t, so the same call serves teacher-forced training
(all steps at once) and sampling.

Incremental decoding (the sampler's fast path) uses three more methods per head, on a
small per-head state carried from step to step:

  decode_init(h_0 [B, E], layer_params) -> state
  decode_push(state, h [B, c, E], index, layer_params) -> state   (h_{index+1..index+c} arrived)
  decode_outputs(state, t, size, layer_params) -> [B, size, V]    (positions t..t+size-1)

The state holds what depends only on states already seen, so that a step computes only
what changed: the global head keeps the inputs of its grid tokens and their first-layer
projections (a grid token changes once, when it becomes visible), the local head keeps
the cross-attention keys and values of every memory slot for every layer. In the last
layer only the wanted positions are queries (every position is still a key).
`layer_params` is the head's stacked 'layers' split into one tree per layer
(`heptapod.split_layers`). tests/test_model.py checks each path against the full forward.

Two options of the 2D heads (`HeadConfig.condition`, `direct_next`) add more paths from h_t,
each a Dense initialised at zero (a new model computes exactly what it computes without
them): condition='add' adds `condition_proj(h_t)` to the input of every grid token (global)
or window query (local) of step t; direct_next adds `next_proj(h_t)` to the output features
of position t (distance 1) before the final norm. Under condition='add' the global head's
grid tokens depend on the current h_t, so its state keeps only their inputs and the first
layer projects them at every step; with either option the local head's state also keeps the
newest state h_t ('h'), as the global head's always does.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from heptapod_jax.models import layers
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim

Array = jax.Array
HeadState = dict[str, Any]


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
    return dict(width=h.width, num_heads=h.num_heads, kv_heads=h.num_heads,
                mlp_hidden=mlp_hidden_dim(h.width, h.mlp_ratio, h.mlp_multiple_of),
                qk_norm=b.qk_norm, norm_eps=b.norm_eps, dropout=h.dropout,
                attention_impl=self.config.attention_impl, deterministic=deterministic,
                **self._kw())

  def _decode_block(self, **over) -> layers.Block:
    """An unbound head Block for decoding, applied to one layer's parameters at a time."""
    return layers.Block(**dict(self._block_kwargs(True), **over), parent=None)

  def _grid_pos_params(self, name: str) -> tuple[Array, Array]:
    """Learned 2D position embedding tables `<name>_row` [rows, width], `<name>_col`."""
    rows, cols = self.config.grid_size
    width = self.config.head.width
    p_dtype = layers.dtype_of(self.config.param_dtype)
    init = layers.normal_init(('grid', 'embed'))
    return (self.param(f'{name}_row', init, (rows, width), p_dtype),
            self.param(f'{name}_col', init, (cols, width), p_dtype))

  def _grid_pos(self, tables: tuple[Array, Array]) -> Array:
    """Row table + column table -> [N, width] in raster order."""
    row, col = tables
    pos = row[:, None, :] + col[None, :, :]
    return pos.reshape(-1, row.shape[-1]).astype(layers.dtype_of(self.config.dtype))

  def _option_layers(self):
    """The zero-initialised projections of h_t that `condition`='add' and `direct_next` add."""
    h, kw = self.config.head, self._kw()
    if h.condition == 'add':
      self.condition_proj = layers.Dense(h.width, ('embed', None), std=0.0, **kw)
    if h.direct_next:
      self.next_proj = layers.Dense(h.width, ('embed', None), std=0.0, **kw)

  def _add_condition(self, x: Array, h_t: Array) -> Array:
    """condition='add': x [..., L, Wh] (the L grid tokens or queries of one step) plus
    condition_proj(h_t) (h_t: [..., E]); else x unchanged."""
    if self.config.head.condition != 'add':
      return x
    return x + self.condition_proj(h_t)[..., None, :].astype(x.dtype)

  def _add_next(self, y: Array, h_t: Array, is_next: Array) -> Array:
    """direct_next: output features y [..., K, Wh] plus next_proj(h_t) (h_t: [..., E]) where
    `is_next` ([..., K] bool: the target is the step's own position t); else y unchanged."""
    if not self.config.head.direct_next:
      return y
    direct = self.next_proj(h_t)[..., None, :].astype(y.dtype)
    return jnp.where(is_next[..., None], y + direct, y)

  def _add_next_decoded(self, y: Array, h_t: Array) -> Array:
    """direct_next while decoding: y [B, size, Wh] holds positions t..t+size-1, so only its
    first row (position t) gets next_proj(h_t) (h_t: [B, E])."""
    if not self.config.head.direct_next:
      return y
    return y.at[:, 0].add(self.next_proj(h_t).astype(y.dtype))

  def _token(self, name: str) -> Array:
    return self.param(name, layers.normal_init(('embed',)), (self.config.head.width,),
                      layers.dtype_of(self.config.param_dtype))

  def _output_layers(self):
    kw = self._kw()
    self.out_norm = layers.RMSNorm(self.config.backbone.norm_eps, **kw)
    if not self.config.continuous:
      self.logits = layers.Dense(self.config.vocab_size, ('embed', 'vocab'), **kw)

  def _outputs(self, y: Array, features_only: bool = False) -> Array:
    """Final norm and vocabulary projection, float32 logits [B, ..., V]; for continuous
    tokens (or `features_only`: the fused loss projects them itself) the normed features
    z_j themselves (the diffusion head's condition)."""
    y = self.out_norm(y)
    middle = (None,) * (y.ndim - 2)
    if features_only:
      return y
    if self.config.continuous:
      return layers.constrain(y.astype(jnp.float32), ('batch', *middle, 'act_embed'))
    return layers.constrain(self.logits(y).astype(jnp.float32), ('batch', *middle, 'act_vocab'))


class GlobalHead(_HeadBase):
  """Bidirectional Transformer over [context token, one token per grid position] (Fig. 5 left).

  For step t: the context token is W_c h_t; grid position j gets W_v h_{j+1} +
  pos_j when j < t and `visible_context` is on (the state of the slot holding
  x_j, MAE's visible patches), else mask + pos_j (condition='add': every grid token
  also gets W_a h_t). The output at j >= t is the prediction for x_j (direct_next: the
  one at j = t also gets W_n h_t before the final norm).
  """

  def setup(self):
    h, kw = self.config.head, self._kw()
    self.context_proj = layers.Dense(h.width, ('embed', None), **kw)
    self.context_token = self._token('context_token')
    self.pos = self._grid_pos_params('pos')
    self.mask_token = self._token('mask_token')
    if h.visible_context:
      self.visible_proj = layers.Dense(h.width, ('embed', None), **kw)
    self._option_layers()
    self._output_layers()

  def _context(self, h_t: Array) -> Array:
    """The context token W_c h_t + c: [..., E] -> [..., Wh]."""
    return self.context_proj(h_t) + self.context_token.astype(layers.dtype_of(self.config.dtype))

  def _masked_grid(self) -> Array:
    """mask + pos_j for every grid position: [N, Wh]."""
    return self.mask_token.astype(layers.dtype_of(self.config.dtype)) + self._grid_pos(self.pos)

  @nn.compact
  def __call__(self, states: Array, steps: Array, targets: Array, *, deterministic: bool = True,
               features_only: bool = False):
    cfg, h = self.config, self.config.head
    n = cfg.num_positions
    batch, num_steps = steps.shape
    h_t = _take_steps(states, steps)  # [B, S, E]
    ctx = self._context(h_t)
    grid = jnp.broadcast_to(self.mask_token.astype(ctx.dtype), (batch, num_steps, n, h.width))
    if h.visible_context:
      # x_j lives in slot state h_{j+1}; x_{N-1} is never visible (no state after it).
      vis = self.visible_proj(states[:, 1:])
      vis = jnp.pad(vis, ((0, 0), (0, 1), (0, 0)))
      visible = jnp.arange(n)[None, None, :] < steps[..., None]  # [B, S, N]
      grid = jnp.where(visible[..., None], vis[:, None], grid)
    grid = self._add_condition(grid + self._grid_pos(self.pos), h_t)
    x = jnp.concatenate([ctx[:, :, None, :], grid], axis=2)  # [B, S, N+1, Wh]
    x = rearrange(x, 'b s l e -> (b s) l e')
    stack = layers.stack(self._block_kwargs(deterministic), h.depth, cfg.remat_policy, name='layers',
                         unroll=cfg.scan_unroll)
    x, _ = stack(x, None, None, None, None, None, None)
    x = rearrange(x[:, 1:], '(b s) n e -> b s n e', b=batch)
    y = jnp.take_along_axis(x, targets[..., None], axis=2)  # [B, S, K, Wh]
    y = self._add_next(y, h_t, targets == steps[..., None])
    return self._outputs(y, features_only)

  def _caches_qkv(self) -> bool:
    """Whether the state keeps the grid tokens' first-layer q, k, v: not under
    condition='add', where their inputs change with h_t at every step."""
    return self.config.head.condition != 'add'

  def decode_init(self, h0: Array, layer_params: tuple[Any, ...]) -> HeadState:
    """Every grid token masked: its input mask + pos_j and its first-layer q, k, v (the same
    for every row, computed once; not under condition='add')."""
    batch, n = h0.shape[0], self.config.num_positions
    grid = self._masked_grid()[None]
    expand = lambda a: jnp.broadcast_to(a, (batch, n, *a.shape[2:]))
    state = {'h': h0, 'grid': expand(grid)}
    if not self._caches_qkv():
      return state
    qkv = self._decode_block().apply({'params': layer_params[0]}, grid, method=layers.Block.self_qkv)
    return dict(state, qkv=tuple(map(expand, qkv)))

  def decode_push(self, state: HeadState, h: Array, index: Array,
                  layer_params: tuple[Any, ...]) -> HeadState:
    """States h_{index+1..index+c} arrived: grid positions index..index+c-1 become visible."""
    state = dict(state, h=h[:, -1])
    if not self.config.head.visible_context:
      return state
    pos = jax.lax.dynamic_slice_in_dim(self._grid_pos(self.pos), index, h.shape[1])
    vis = self.visible_proj(h) + pos  # [B, c, Wh]
    put = lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new.astype(a.dtype), index, axis=1)
    state = dict(state, grid=put(state['grid'], vis))
    if not self._caches_qkv():
      return state
    qkv = self._decode_block().apply({'params': layer_params[0]}, vis, method=layers.Block.self_qkv)
    return dict(state, qkv=tuple(put(a, b) for a, b in zip(state['qkv'], qkv)))

  def decode_outputs(self, state: HeadState, t: Array, size: int,
                     layer_params: tuple[Any, ...]) -> Array:
    """Outputs for positions t..t+size-1 at step t: [B, size, V] (or [B, size, Wz]).
    Under condition='add' the grid tokens' inputs get condition_proj(h_t) here and the first
    layer projects every token itself (nothing cached is valid for them)."""
    block = self._decode_block()
    ctx = self._context(state['h'])[:, None]  # [B, 1, Wh]
    grid = self._add_condition(state['grid'].astype(ctx.dtype), state['h'])
    x = jnp.concatenate([ctx, grid], axis=1)  # [B, N+1, Wh]
    qkv = None
    if self._caches_qkv():
      ctx_qkv = block.apply({'params': layer_params[0]}, ctx, method=layers.Block.self_qkv)
      qkv = tuple(jnp.concatenate([a, b.astype(a.dtype)], axis=1)
                  for a, b in zip(ctx_qkv, state['qkv']))
    wanted = 1 + t + jnp.arange(size)  # Token 0 is the context token.
    depth = len(layer_params)
    for i, params in enumerate(layer_params):
      x, _ = block.apply({'params': params}, x, None, None, None, qkv=qkv if i == 0 else None,
                         query_index=wanted if i == depth - 1 else None)
    return self._outputs(self._add_next_decoded(x, state['h']))


class LocalHead(_HeadBase):
  """Window head (Fig. 5 right): queries for positions t..t+W-1 of step t.

  Every layer cross-attends to the causal states h_0..h_t (never beyond t),
  then self-attends bidirectionally inside the window (positions >= N are
  padding and are hidden as keys). All steps run in one pass. condition='add': every
  query of step t also gets W_a h_t in its input; direct_next: the output at position t
  gets W_n h_t before the final norm.
  """

  def setup(self):
    kw = self._kw()
    self.memory_proj = layers.Dense(self.config.head.width, ('embed', None), **kw)
    self.memory_start = self._token('memory_start')
    self.memory_pos = self._grid_pos_params('memory_pos')
    self.mask_token = self._token('mask_token')  # (Creation order fixes the initial values.)
    self.pos = self._grid_pos_params('pos')
    self._option_layers()
    self._output_layers()

  def _memory_pos(self) -> Array:
    """Position of memory slot s: h_0 is the class slot (`memory_start`); h_s for s >= 1 is
    the slot of x_{s-1} (grid position s-1): [N, Wh]."""
    start = self.memory_start.astype(layers.dtype_of(self.config.dtype))
    return jnp.concatenate([start[None], self._grid_pos(self.memory_pos)[:-1]], axis=0)

  def _queries(self, steps: Array) -> tuple[Array, Array]:
    """mask + pos_j for j = t .. t+W-1 of every step ([..., W, Wh]), and which are in the grid."""
    n = self.config.num_positions
    query_idx = steps[..., None] + jnp.arange(self.config.head.window)  # [..., W]
    x = self.mask_token.astype(layers.dtype_of(self.config.dtype)) + jnp.take(
        self._grid_pos(self.pos), jnp.minimum(query_idx, n - 1), axis=0)
    return x, query_idx < n

  @nn.compact
  def __call__(self, states: Array, steps: Array, targets: Array, *, deterministic: bool = True,
               features_only: bool = False):
    cfg, h = self.config, self.config.head
    n, window = cfg.num_positions, h.window
    mem = self.memory_proj(states) + self._memory_pos()
    h_t = _take_steps(states, steps)  # [B, S, E]
    x, in_grid = self._queries(steps)  # [B, S, W, Wh], [B, S, W]
    x = self._add_condition(x, h_t)
    x = rearrange(x, 'b s w e -> b (s w) e')
    # Cross mask: a query of step t sees states h_0..h_t. Self mask: keys inside the grid.
    mem_mask = jnp.arange(n)[None, None, :] <= steps[..., None]  # [B, S, N]
    mem_mask = jnp.repeat(mem_mask, window, axis=1)[:, None]  # [B, 1, S*W, N]
    self_mask = rearrange(in_grid, 'b s w -> (b s) 1 1 w')
    stack = layers.stack(dict(self._block_kwargs(deterministic), has_cross_attention=True,
                              window=window), h.depth, cfg.remat_policy, name='layers',
                         unroll=cfg.scan_unroll)
    x, _ = stack(x, None, self_mask, None, mem, mem_mask, None)
    x = rearrange(x, 'b (s w) e -> b s w e', w=window)
    y = jnp.take_along_axis(x, (targets - steps[..., None])[..., None], axis=2)  # [B, S, K, Wh]
    y = self._add_next(y, h_t, targets == steps[..., None])
    return self._outputs(y, features_only)

  def _keeps_h(self) -> bool:
    """Whether the decoding state keeps the newest state h_t (only an option reads it)."""
    h = self.config.head
    return h.condition == 'add' or h.direct_next

  def _push_memory(self, state: HeadState, h: Array, slot: Array,
                   layer_params: tuple[Any, ...]) -> HeadState:
    """Writes the cross-attention keys/values of memory slots slot..slot+c-1 (h: [B, c, E])."""
    pos = jax.lax.dynamic_slice_in_dim(self._memory_pos(), slot, h.shape[1])
    mem = self.memory_proj(h) + pos
    block = self._decode_block(has_cross_attention=True)
    kv = []
    for params, entry in zip(layer_params, state['memory_kv']):
      new = block.apply({'params': params}, mem, method=layers.Block.memory_kv)
      kv.append(tuple(jax.lax.dynamic_update_slice_in_dim(a, b.astype(a.dtype), slot, axis=2)
                      for a, b in zip(entry, new)))
    return dict(state, memory_kv=tuple(kv))

  def decode_init(self, h0: Array, layer_params: tuple[Any, ...]) -> HeadState:
    """Memory slot 0 (h_0) written; per layer (k, v) [B, heads, N, head_dim] (cache layout);
    with condition='add' or direct_next also the newest state 'h' (h_0)."""
    h = self.config.head
    shape = (h0.shape[0], h.num_heads, self.config.num_positions, h.width // h.num_heads)
    dtype = layers.dtype_of(self.config.dtype)
    empty = tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in layer_params)
    state = {'h': h0} if self._keeps_h() else {}
    return self._push_memory(dict(state, memory_kv=empty), h0[:, None], jnp.int32(0),
                             layer_params)

  def decode_push(self, state: HeadState, h: Array, index: Array,
                  layer_params: tuple[Any, ...]) -> HeadState:
    """States h_{index+1..index+c} arrived: memory slots index+1..index+c."""
    if self._keeps_h():
      state = dict(state, h=h[:, -1])
    return self._push_memory(state, h, index + 1, layer_params)

  def decode_outputs(self, state: HeadState, t: Array, size: int,
                     layer_params: tuple[Any, ...]) -> Array:
    """Outputs for positions t..t+size-1 (size <= window) at step t: [B, size, V]."""
    n = self.config.num_positions
    batch = state['memory_kv'][0][0].shape[0]
    x, in_grid = self._queries(t)  # [W, Wh], [W]
    x = self._add_condition(jnp.broadcast_to(x, (batch, *x.shape)), state.get('h'))
    self_mask = in_grid[None, None, None, :]
    mem_mask = (jnp.arange(n) <= t)[None, None, None, :]
    # One window per row, so the block needs no window reshape (window=0, same parameters).
    block = self._decode_block(has_cross_attention=True, window=0)
    depth = len(layer_params)
    for i, (params, kv) in enumerate(zip(layer_params, state['memory_kv'])):
      x, _ = block.apply({'params': params}, x, None, self_mask, None, None, mem_mask,
                         memory_kv=kv, query_index=jnp.arange(size) if i == depth - 1 else None)
    return self._outputs(self._add_next_decoded(x, state.get('h')))


class NextTokenHead(_HeadBase):
  """The 1D baseline: a plain LM projection of h_t predicting x_t (position t only)."""

  def setup(self):
    if not self.config.continuous:
      self.logits = layers.Dense(self.config.vocab_size, ('embed', 'vocab'), **self._kw())

  def _project(self, y: Array) -> Array:
    middle = (None,) * (y.ndim - 2)
    if self.config.continuous:  # z_t = h_t conditions the diffusion head (MAR's setting).
      return layers.constrain(y.astype(jnp.float32), ('batch', *middle, 'act_embed'))
    return layers.constrain(self.logits(y).astype(jnp.float32), ('batch', *middle, 'act_vocab'))

  def __call__(self, states: Array, steps: Array, targets: Array, *, deterministic: bool = True,
               features_only: bool = False):
    del deterministic
    y = _take_steps(states, steps)[:, :, None, :]  # [B, S, 1, E]
    y = jnp.broadcast_to(y, (*targets.shape, y.shape[-1]))
    return y if features_only else self._project(y)

  def decode_init(self, h0: Array, layer_params: tuple[Any, ...]) -> HeadState:
    del layer_params
    return {'h': h0}

  def decode_push(self, state: HeadState, h: Array, index: Array,
                  layer_params: tuple[Any, ...]) -> HeadState:
    del index, layer_params
    return dict(state, h=h[:, -1])

  def decode_outputs(self, state: HeadState, t: Array, size: int,
                     layer_params: tuple[Any, ...]) -> Array:
    del t, layer_params
    if size != 1:
      raise ValueError(f'the next_token head predicts one position per state, not {size}.')
    return self._project(state['h'][:, None])


HEADS = {'global': GlobalHead, 'local': LocalHead, 'next_token': NextTokenHead}


def make_head(config: ModelConfig, name: str = 'head') -> nn.Module:
  """The head module for `config.head.kind`."""
  if config.head.kind not in HEADS:
    raise ValueError(f'model.head.kind={config.head.kind!r} is not one of {sorted(HEADS)}.')
  return HEADS[config.head.kind](config, name=name)
