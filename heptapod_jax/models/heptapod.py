"""Heptapod: causal backbone + 2D prediction head, the loss, and input checks.

    model = Heptapod(ModelConfig.from_dict(config.model.to_dict()))
    params = model.init_params(rng, batch_size=2)
    loss, metrics = compute_loss(model, params, tokens, labels, rng)
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from heptapod_jax.models import diffusion as diffusion_lib
from heptapod_jax.models import layers, objective
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heads import HeadState, make_head
from heptapod_jax.models.transformer import CausalTransformer, KVCache

Array = jax.Array


class Heptapod(nn.Module):
  """The class-conditional next-2D-distribution model.

  Methods (use with `model.apply(variables, ..., method=...)`):
    __call__(tokens, labels, steps, targets) -> logits [B, S, K, V]   (training)
    states(tokens, labels) -> [B, N, E]                               (h_0..h_{N-1})
    head_logits(states, steps, targets) -> logits          (the head alone on given states)
  Incremental decoding (sampling; `layer_params = split_layers(params)`, once per call):
    prefill(labels, cache, layer_params) -> (head state, cache)
    feed(tokens [B, c], index, cache, head_state, layer_params) -> (head state, cache)
    predict(head_state, t, size, layer_params) -> outputs for positions t..t+size-1
  """
  config: ModelConfig

  def setup(self):
    self.backbone = CausalTransformer(self.config, name='backbone')
    self.head = make_head(self.config, name='head')
    if self.config.continuous:
      self.diffusion = diffusion_lib.DenoiserMLP(
          self.config.diffusion, self.config.token_dim, dtype=layers.dtype_of(self.config.dtype),
          param_dtype=layers.dtype_of(self.config.param_dtype), name='diffusion')

  def __call__(self, tokens: Array, labels: Array, steps: Array, targets: Array, *,
               deterministic: bool = True, features_only: bool = False) -> Array:
    """Teacher-forced logits for the (step, target) pairs: float32[B, S, K, V]
    (continuous tokens: the diffusion head's conditions z, float32[B, S, K, Wz]).
    features_only: the head's outputs before its vocabulary projection ([B, S, K, D], for
    the fused loss, which projects them chunk by chunk)."""
    states = self.states(tokens, labels, deterministic=deterministic)
    out = self.head(states, steps, targets, deterministic=deterministic,
                    features_only=features_only)
    if self.config.continuous and self.is_initializing():
      z = out.reshape(-1, out.shape[-1])[:1]
      self.diffusion(jnp.zeros((1, self.config.token_dim)), jnp.zeros((1,), jnp.int32), z)
    return out

  def diffusion_loss(self, z: Array, x0: Array, rng: Array) -> Array:
    """MAR's diffusion loss of targets x0 [M, C] given conditions z [M, Wz]: float32[M]."""
    return diffusion_lib.training_loss(self.diffusion, x0, z, rng, self.config.diffusion)

  def diffusion_sample(self, z: Array, rng: Array, temperature: float | None = None) -> Array:
    """DDPM samples of tokens [M, C] given conditions z [M, Wz] (one key for the batch);
    temperature None = model.diffusion.temperature."""
    return diffusion_lib.sample(self.diffusion, z, rng, self.config.diffusion, temperature,
                                token_dim=self.config.token_dim)

  def states(self, tokens: Array, labels: Array, *, deterministic: bool = True) -> Array:
    """Causal states h_0..h_{N-1}: [B, N, E] (h_t has seen x_0..x_{t-1})."""
    h = self.backbone(labels, tokens[:, :-1], deterministic=deterministic)
    return h[:, self.config.backbone.class_prefix_len - 1:]

  def prefill(self, labels: Array, cache: KVCache, layer_params: Mapping[str, Any]
              ) -> tuple[HeadState, KVCache]:
    """Runs the class prefix into the cache; returns the head's decoding state at step 0."""
    h, cache = self.backbone.decode(labels, None, 0, cache, layer_params['backbone'])
    return self.head.decode_init(h[:, -1], layer_params['head']), cache

  def feed(self, tokens: Array, index: Array, cache: KVCache, head_state: HeadState,
           layer_params: Mapping[str, Any]) -> tuple[HeadState, KVCache]:
    """Feeds grid tokens x_index..x_{index+c-1} (int32[B, c]; continuous: float[B, c, C]) in
    one backbone call (c cache entries, causal inside the run) and hands the new states
    h_{index+1..index+c} to the head: its state is then that of step index + c."""
    offset = self.config.backbone.class_prefix_len + index
    h, cache = self.backbone.decode(None, tokens, offset, cache, layer_params['backbone'])
    return self.head.decode_push(head_state, h, index, layer_params['head']), cache

  def predict(self, head_state: HeadState, t: Array, size: int,
              layer_params: Mapping[str, Any]) -> Array:
    """The head's outputs for positions t..t+size-1 at step t: float32[B, size, V] (continuous
    tokens: the diffusion head's conditions [B, size, Wz])."""
    return self.head.decode_outputs(head_state, t, size, layer_params['head'])

  def head_logits(self, states: Array, steps: Array, targets: Array) -> Array:
    """The head alone on given states (entries after each step are never read)."""
    return self.head(states, steps, targets, deterministic=True)


def split_layers(params: Mapping[str, Any], dtype: Any = None) -> dict[str, tuple[Any, ...]]:
  """The backbone's and the head's stacked block parameters (leading 'layers' axis, see
  `layers.stack`) as one tree per layer: the `layer_params` of incremental decoding.

  Call it once per sampling call, outside the token loop: the copies are made once, and
  every decoding step then reads each weight where it lies (slicing the stacked arrays
  inside the loop copies every weight at every token on the CPU). `dtype` (the compute
  dtype) casts the kernels as they are copied, which every matmul does to them anyway, so
  that the copy costs what the compute dtype does (norm scales stay as they are). The
  head's entry is () for the next_token head, which has no blocks.
  """
  def split(stacked):
    depth = jax.tree.leaves(stacked)[0].shape[0]

    def take(a, i):
      a = a[i]
      return a.astype(dtype) if dtype is not None and a.ndim >= 2 else a

    return tuple(jax.tree.map(lambda a, i=i: take(a, i), stacked) for i in range(depth))

  head = params.get('head', {})
  return {'backbone': split(params['backbone']['layers']),
          'head': split(head['layers']) if 'layers' in head else ()}


def init_params(model: Heptapod, rng: Array, batch_size: int = 1) -> Any:
  """Initialises the parameters (boxed with their logical partitioning metadata)."""
  cfg = model.config
  if cfg.continuous:
    tokens = jnp.zeros((batch_size, cfg.num_positions, cfg.token_dim), jnp.float32)
  else:
    tokens = jnp.zeros((batch_size, cfg.num_positions), jnp.int32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  steps, targets, _ = objective.draw_pairs(jax.random.key(0), cfg, batch_size)
  return model.init({'params': rng}, tokens, labels, steps, targets)['params']


def flatten_tokens(config: ModelConfig, tokens: Any) -> Any:
  """int[B, H, W] or int[B, N] -> int[B, N], checking the grid against `model.grid_size`
  (continuous tokens: float[B, H, W, C] or [B, N, C] -> [B, N, C])."""
  shape = tuple(tokens.shape)
  h, w = config.grid_size
  if config.continuous:
    c = config.token_dim
    if len(shape) == 4 and shape[1:] == (h, w, c):
      return tokens.reshape(shape[0], h * w, c)
    if len(shape) == 3 and shape[1:] == (h * w, c):
      return tokens
    raise ValueError(f'continuous tokens must be float[B, {h}, {w}, {c}] or [B, {h * w}, {c}] '
                     f'(model.grid_size={(h, w)}, model.token_dim={c}); got shape {shape}.')
  if len(shape) == 3:
    if shape[1:] != (h, w):
      raise ValueError(f'token grid shape {shape[1:]} does not match model.grid_size={(h, w)}.')
    return tokens.reshape(shape[0], h * w)
  if len(shape) == 2:
    if shape[1] != h * w:
      raise ValueError(f'tokens have {shape[1]} positions per image; model.grid_size={(h, w)} '
                       f'needs {h * w}.')
    return tokens
  raise ValueError(f'tokens must be int[B, H, W] or int[B, N]; got shape {shape}.')


def check_inputs(config: ModelConfig, tokens: Any | None, labels: Any | None,
                 allow_null_class: bool = False) -> None:
  """ValueError naming the problem, before anything is traced.

  Shapes and dtypes are always checked; values only when the arrays are
  concrete (not inside a jit trace).
  """
  if tokens is not None and config.continuous:
    tokens = flatten_tokens(config, tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.floating):
      raise ValueError(f'continuous tokens must be floating point latents, got dtype {tokens.dtype}.')
  elif tokens is not None:
    tokens = flatten_tokens(config, tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'tokens must be integer codebook indices, got dtype {tokens.dtype}.')
    if not isinstance(tokens, jax.core.Tracer):
      t = np.asarray(tokens)
      if t.size and (t.min() < 0 or t.max() >= config.vocab_size):
        raise ValueError(f'token values must be in [0, model.vocab_size={config.vocab_size}); '
                         f'got range [{t.min()}, {t.max()}].')
  if labels is not None:
    if labels.ndim != 1:
      raise ValueError(f'class labels must be int[B]; got shape {tuple(labels.shape)}.')
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'class labels must be integers, got dtype {labels.dtype}.')
    if tokens is not None and labels.shape[0] != tokens.shape[0]:
      raise ValueError(f'{labels.shape[0]} class labels for {tokens.shape[0]} token grids.')
    if not isinstance(labels, jax.core.Tracer):
      lab = np.asarray(labels)
      hi = config.num_classes + (1 if allow_null_class else 0)
      if lab.size and (lab.min() < 0 or lab.max() >= hi):
        raise ValueError(f'class labels must be in [0, model.num_classes={config.num_classes}); '
                         f'got range [{lab.min()}, {lab.max()}].')


def compute_loss(model: Heptapod, params: Any, tokens: Array, labels: Array, rng: Array, *,
                 deterministic: bool = False) -> tuple[Array, Mapping[str, tuple[Array, Array]]]:
  """Draws (step, target) pairs, runs the model, returns (loss, metrics as (sum, count)).

  Args:
    tokens: int32[B, N] (or [B, H, W]) codebook indices, or float[B, N, C] latents for
      continuous tokens; labels: int32[B].
    rng: key for the pair draw and dropout (folded with the step by the trainer).
  """
  cfg = model.config
  tokens = flatten_tokens(cfg, tokens)
  pair_rng, dropout_rng = jax.random.split(rng)
  noise_rng = jax.random.fold_in(rng, 2)  # Diffusion noise (continuous tokens only).
  steps, targets, valid = objective.draw_pairs(pair_rng, cfg, tokens.shape[0])
  fused = cfg.loss_chunk > 0 and not cfg.continuous
  logits = model.apply({'params': params}, tokens, labels, steps, targets,
                       deterministic=deterministic, features_only=fused,
                       rngs={'dropout': dropout_rng})
  if cfg.continuous:
    return continuous_pair_loss(model, params, logits, tokens, steps, targets, valid, noise_rng)
  if fused:  # `logits` are the head's features; the loss projects them chunk by chunk.
    kernel = params['head']['logits']['kernel']
    return objective.fused_pair_loss_and_metrics(cfg, logits, kernel, tokens, steps, targets,
                                                 valid)
  return objective.pair_loss_and_metrics(cfg, logits, tokens, steps, targets, valid)


def continuous_pair_loss(model: Heptapod, params: Any, z: Array, target_tokens: Array, steps: Array,
                         targets: Array, valid: Array, rng: Array
                         ) -> tuple[Array, Mapping[str, tuple[Array, Array]]]:
  """The diffusion loss of the supervised (step, target) pairs, averaged like the discrete loss.

  Args:
    z: float32[B, S, K, Wz] head outputs for `targets`.
    target_tokens: float[B, N, C] latents of every grid position; only the supervised
      pairs' targets are read.
  Returns:
    (scalar loss = the `objective.pair_weights` mean of the per-pair diffusion MSE, metrics
    as (sum, count): loss, mse and mse split by distance ahead).
  """
  x0 = jnp.take_along_axis(target_tokens[:, None], targets[..., None], axis=2)  # [B, S, K, C]
  flat_z = z.reshape(-1, z.shape[-1])
  flat_x0 = x0.reshape(-1, x0.shape[-1]).astype(jnp.float32)
  per_pair = model.apply({'params': params}, flat_z, flat_x0, rng,
                         method=Heptapod.diffusion_loss).reshape(targets.shape)
  weight = valid.astype(jnp.float32)
  count = jnp.sum(weight)
  total = jnp.sum(per_pair * weight)
  loss_weight = objective.pair_weights(model.config, steps, targets, valid)
  metrics = {'loss': (jnp.sum(per_pair * loss_weight), jnp.sum(loss_weight)),
             'mse': (total, count)}
  metrics.update(objective.distance_metrics('mse', per_pair, steps, targets, valid))
  return metrics['loss'][0] / jnp.maximum(metrics['loss'][1], 1e-30), metrics
