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

from heptapod_jax.models import objective
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heads import make_head
from heptapod_jax.models.transformer import CausalTransformer, KVCache

Array = jax.Array


class Heptapod(nn.Module):
  """The class-conditional next-2D-distribution model.

  Methods (use with `model.apply(variables, ..., method=...)`):
    __call__(tokens, labels, steps, targets) -> logits [B, S, K, V]   (training)
    states(tokens, labels) -> [B, N, E]                               (h_0..h_{N-1})
    prefill(labels, cache) -> (h_0 [B, E], cache)                     (sampling)
    decode(token, index, cache) -> (h_{index+1} [B, E], cache)        (sampling)
    head_logits(states, steps, targets) -> logits                     (sampling)
  """
  config: ModelConfig

  def setup(self):
    self.backbone = CausalTransformer(self.config, name='backbone')
    self.head = make_head(self.config, name='head')

  def __call__(self, tokens: Array, labels: Array, steps: Array, targets: Array, *,
               deterministic: bool = True) -> Array:
    """Teacher-forced logits for the (step, target) pairs: float32[B, S, K, V]."""
    states = self.states(tokens, labels, deterministic=deterministic)
    return self.head(states, steps, targets, deterministic=deterministic)

  def states(self, tokens: Array, labels: Array, *, deterministic: bool = True) -> Array:
    """Causal states h_0..h_{N-1}: [B, N, E] (h_t has seen x_0..x_{t-1})."""
    h, _ = self.backbone(labels, tokens[:, :-1], deterministic=deterministic)
    return h[:, self.config.backbone.class_prefix_len - 1:]

  def prefill(self, labels: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Runs the class prefix into the cache; returns h_0: [B, E]."""
    h, cache = self.backbone(labels, None, offset=0, cache=cache)
    return h[:, -1], cache

  def decode(self, token: Array, index: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Feeds grid token x_index: int32[B]; returns h_{index+1}: [B, E]."""
    offset = self.config.backbone.class_prefix_len + index
    h, cache = self.backbone(None, token[:, None], offset=offset, cache=cache)
    return h[:, 0], cache

  def head_logits(self, states: Array, steps: Array, targets: Array) -> Array:
    """The head alone on given states (entries after each step are never read)."""
    return self.head(states, steps, targets, deterministic=True)


def init_params(model: Heptapod, rng: Array, batch_size: int = 1) -> Any:
  """Initialises the parameters (boxed with their logical partitioning metadata)."""
  cfg = model.config
  tokens = jnp.zeros((batch_size, cfg.num_positions), jnp.int32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  steps, targets, _ = objective.draw_pairs(jax.random.key(0), cfg, batch_size)
  return model.init({'params': rng}, tokens, labels, steps, targets)['params']


def flatten_tokens(config: ModelConfig, tokens: Any) -> Any:
  """int[B, H, W] or int[B, N] -> int[B, N], checking the grid against `model.grid_size`."""
  shape = tuple(tokens.shape)
  h, w = config.grid_size
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
  if tokens is not None:
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
    tokens: int32[B, N] (or [B, H, W]) codebook indices; labels: int32[B].
    rng: key for the pair draw and dropout (folded with the step by the trainer).
  """
  cfg = model.config
  tokens = flatten_tokens(cfg, tokens)
  pair_rng, dropout_rng = jax.random.split(rng)
  steps, targets, valid = objective.draw_pairs(pair_rng, cfg, tokens.shape[0])
  logits = model.apply({'params': params}, tokens, labels, steps, targets,
                       deterministic=deterministic, rngs={'dropout': dropout_rng})
  target_dist = jax.nn.one_hot(tokens, cfg.vocab_size, dtype=jnp.float32)
  return objective.pair_loss_and_metrics(cfg, logits, target_dist, steps, targets, valid)
