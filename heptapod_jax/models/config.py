"""Typed model configuration.

The experiment config (`configs/*.py`, an `ml_collections.ConfigDict`) holds a
`model` section; `ModelConfig.from_dict(config.model.to_dict())` turns it into
these frozen dataclasses, rejecting unknown fields and values outside the valid
choices with a message that names the field. Modules receive the dataclass, not
the whole experiment config.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping

from heptapod_jax.models.diffusion import DiffusionConfig

HEAD_KINDS = ('global', 'local', 'next_token')
LOSS_WEIGHTINGS = ('pairs', 'steps')
HEAD_CONDITIONS = ('context', 'add')
TOKEN_KINDS = ('vq', 'kl')  # Discrete codes (cross-entropy) | continuous latents (diffusion loss).
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save_attention_out')
ATTENTION_IMPLS = ('auto', 'einsum', 'xla', 'cudnn', 'splash')
DTYPES = ('float32', 'bfloat16', 'float16')
ALL = -1  # `steps_per_image` / `targets_per_step` value meaning "every one".


def _parse_all(value: Any, field: str) -> int:
  """Accepts an int >= 1, or -1 / 'all' meaning every step / target."""
  if isinstance(value, str):
    if value.strip().lower() == 'all':
      return ALL
    try:
      value = int(value)
    except ValueError:
      raise ValueError(f'{field}={value!r}: expected a positive int or "all" (-1).') from None
  if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != ALL):
    raise ValueError(f'{field}={value!r}: expected a positive int or "all" (-1).')
  return value


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The causal Transformer (LlamaGen-style decoder)."""
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  num_kv_heads: int = 0  # 0 = num_heads (no grouped-query attention).
  mlp_ratio: float = 8 / 3
  mlp_multiple_of: int = 256
  qk_norm: bool = False
  rope_base: float = 10000.0
  class_prefix_len: int = 1
  norm_eps: float = 1e-5
  token_dropout: float = 0.0  # On the input embeddings.
  dropout: float = 0.0  # Residual dropout after attention and MLP.
  attention_dropout: float = 0.0  # Needs attention_impl='einsum'.
  class_dropout: float = 0.0  # Label -> null class during training; only useful with CFG.

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """The 2D prediction head and the training objective it defines.

  kind: 'global' (bidirectional Transformer over a context token and all N grid
    positions), 'local' (a window of future positions cross-attending to the
    causal states) or 'next_token' (the 1D baseline, shifted input positions).
  steps_per_image: steps t drawn per image (uniform, without replacement);
    -1 = all N steps.
  targets_per_step: future positions supervised per step; -1 = all of them
    (for 'local' all = the window).
  loss_weighting: how the supervised (step, target) pairs of a batch weigh in the loss.
    'pairs': every pair alike (the mean over pairs; a step with m targets weighs m times
    one with a single target); 'steps': every step alike (its targets averaged first).
  next_weight: lambda >= 0: the next position's loss (distance 1, the one prediction that
    raster-order sampling uses) is added with weight lambda, as
    loss = (L + lambda * L_next) / (1 + lambda), L the loss `loss_weighting` says and L_next
    the mean over steps of the distance-1 pair's loss; the next position is then always
    among the supervised targets. 0 = off.
  condition: how h_t reaches the 2D head's tokens. 'context': through one context token
    (global) / the cross-attended memory (local), the paper's design; 'add': a projection
    of h_t is also added to every grid token's (query's) input (initialised at zero, so a
    new run starts as 'context').
  direct_next: also add a projection of h_t (initialised at zero) to the next position's
    output features, before the final norm: a direct path from h_t to the one prediction
    sampling uses, as the next_token head has.
  """
  kind: str = 'global'
  width: int = 768
  depth: int = 4
  num_heads: int = 12
  mlp_ratio: float = 8 / 3
  mlp_multiple_of: int = 256
  visible_context: bool = True
  window: int = 16
  steps_per_image: int = 16
  targets_per_step: int = ALL
  dropout: float = 0.0
  loss_weighting: str = 'pairs'
  next_weight: float = 0.0
  condition: str = 'context'
  direct_next: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines the parameters and the forward pass."""
  vocab_size: int = 16384
  grid_size: tuple[int, int] = (16, 16)
  num_classes: int = 1000
  tokens: str = 'vq'
  # tokens='kl': channels of a continuous token (KL-16: 16); vocab_size is then unused.
  token_dim: int = 16
  backbone: BackboneConfig = BackboneConfig()
  head: HeadConfig = HeadConfig()
  # tokens='kl': the per-position diffusion head (MAR's diffusion loss) on the 2D head's output.
  diffusion: DiffusionConfig = DiffusionConfig()
  dtype: str = 'float32'  # Compute dtype of matmuls.
  param_dtype: str = 'float32'
  remat_policy: str = 'none'
  # Layers per nn.scan iteration; >= depth unrolls fully (exact XLA cost analysis,
  # sometimes faster for small models). The parameter layout does not change.
  scan_unroll: int = 1
  # 'xla' | 'einsum' (plain ops, attention dropout) | 'cudnn' (GPU flash, bf16) | 'splash'
  # (TPU Pallas kernel) | 'auto' (splash on TPU, cudnn on GPU with bf16, else xla).
  attention_impl: str = 'xla'
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  # Discrete tokens: 0 = the head's logits [B, S, K, V] then the cross-entropy; > 0 = the
  # vocabulary projection fused with the cross-entropy over chunks of this many (step,
  # target) pairs per image (objective.fused_vocab_loss): the logits are never all alive,
  # for one more vocabulary matmul in the backward pass. Same loss and gradients.
  loss_chunk: int = 0

  @property
  def num_positions(self) -> int:
    return self.grid_size[0] * self.grid_size[1]

  @property
  def seq_len(self) -> int:
    """Backbone sequence length: class prefix plus the first N-1 tokens."""
    return self.backbone.class_prefix_len + self.num_positions - 1

  @property
  def continuous(self) -> bool:
    """True for continuous tokens (float latents, diffusion loss), False for codebook indices."""
    return self.tokens == 'kl'

  @property
  def position_shift(self) -> int:
    """0: token x_i carries its own grid position (2D heads); 1: the next one (1D baseline)."""
    return 1 if self.head.kind == 'next_token' else 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """Builds and validates a ModelConfig from a (nested) mapping, e.g. `config.model.to_dict()`."""
    d = dict(d)
    backbone = _build(BackboneConfig, d.pop('backbone', {}), 'model.backbone')
    head = _build(HeadConfig, d.pop('head', {}), 'model.head')
    diffusion = _build(DiffusionConfig, d.pop('diffusion', {}), 'model.diffusion')
    head = dataclasses.replace(
        head,
        steps_per_image=_parse_all(head.steps_per_image, 'model.head.steps_per_image'),
        targets_per_step=_parse_all(head.targets_per_step, 'model.head.targets_per_step'))
    if 'grid_size' in d:
      d['grid_size'] = tuple(int(x) for x in d['grid_size'])
    config = _build(cls, dict(d, backbone=backbone, head=head, diffusion=diffusion), 'model')
    config.validate()
    return config

  def validate(self) -> None:
    """Raises ValueError naming the first field that is out of range."""
    b, h = self.backbone, self.head
    _choice('model.head.kind', h.kind, HEAD_KINDS)
    _choice('model.head.loss_weighting', h.loss_weighting, LOSS_WEIGHTINGS)
    _choice('model.head.condition', h.condition, HEAD_CONDITIONS)
    if not h.next_weight >= 0.0:
      raise ValueError(f'model.head.next_weight={h.next_weight}: must be >= 0 (0 = off).')
    if h.kind == 'next_token' and (h.condition != 'context' or h.direct_next):
      raise ValueError('model.head.condition / direct_next shape how h_t reaches a 2D head; the '
                       'next_token head is a projection of h_t already: leave them at '
                       "'context' / False.")
    _choice('model.tokens', self.tokens, TOKEN_KINDS)
    _choice('model.remat_policy', self.remat_policy, REMAT_POLICIES)
    _choice('model.attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _choice('model.dtype', self.dtype, DTYPES)
    _choice('model.param_dtype', self.param_dtype, DTYPES)
    if self.scan_unroll < 1:
      raise ValueError(f'model.scan_unroll={self.scan_unroll}: must be >= 1.')
    if len(self.grid_size) != 2 or min(self.grid_size) < 1:
      raise ValueError(f'model.grid_size={self.grid_size}: expected (rows, cols), both >= 1.')
    if self.num_positions < 2:
      raise ValueError('model.grid_size: need at least 2 grid positions.')
    for name, value in (('model.vocab_size', self.vocab_size), ('model.num_classes', self.num_classes),
                        ('model.backbone.width', b.width), ('model.backbone.depth', b.depth),
                        ('model.backbone.num_heads', b.num_heads),
                        ('model.backbone.class_prefix_len', b.class_prefix_len)):
      if value < 1:
        raise ValueError(f'{name}={value}: must be >= 1.')
    if b.width % b.num_heads:
      raise ValueError(f'model.backbone.width={b.width} is not divisible by num_heads={b.num_heads}.')
    if (b.width // b.num_heads) % 4:
      raise ValueError(f'model.backbone: head dim {b.width // b.num_heads} must be divisible by 4 '
                       '(2D RoPE gives half of the rotary pairs to rows, half to columns).')
    if b.num_heads % b.kv_heads:
      raise ValueError(f'model.backbone.num_kv_heads={b.num_kv_heads} must divide num_heads={b.num_heads}.')
    if h.kind != 'next_token':
      if h.width % h.num_heads:
        raise ValueError(f'model.head.width={h.width} is not divisible by num_heads={h.num_heads}.')
      if h.depth < 1:
        raise ValueError(f'model.head.depth={h.depth}: must be >= 1 for head kind {h.kind!r}.')
    if h.kind == 'local' and not 1 <= h.window <= self.num_positions:
      raise ValueError(f'model.head.window={h.window}: must be in [1, {self.num_positions}].')
    if h.steps_per_image != ALL and h.steps_per_image > self.num_positions:
      raise ValueError(f'model.head.steps_per_image={h.steps_per_image} exceeds the '
                       f'{self.num_positions} grid positions.')
    max_targets = {'global': self.num_positions, 'local': h.window, 'next_token': 1}[h.kind]
    if h.targets_per_step != ALL and h.targets_per_step > max_targets:
      raise ValueError(f'model.head.targets_per_step={h.targets_per_step}: head kind {h.kind!r} '
                       f'has at most {max_targets} targets per step.')
    for name, p in (('token_dropout', b.token_dropout), ('dropout', b.dropout),
                    ('attention_dropout', b.attention_dropout), ('class_dropout', b.class_dropout)):
      if not 0.0 <= p < 1.0:
        raise ValueError(f'model.backbone.{name}={p}: must be in [0, 1).')
    if b.attention_dropout > 0 and self.attention_impl != 'einsum':
      raise ValueError('model.backbone.attention_dropout > 0 needs model.attention_impl="einsum" '
                       f'(got {self.attention_impl!r}: jax.nn.dot_product_attention has no dropout).')
    if self.continuous:
      if self.token_dim < 1:
        raise ValueError(f'model.token_dim={self.token_dim}: must be >= 1 for tokens="kl".')
      self.diffusion.validate()
    if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) \
        or self.loss_chunk < 0:
      raise ValueError(f'model.loss_chunk={self.loss_chunk!r}: must be an int >= 0 (0 = off).')
    if self.loss_chunk and self.continuous:
      raise ValueError(f'model.loss_chunk={self.loss_chunk} fuses the vocabulary projection with '
                       'the cross-entropy of discrete tokens; tokens="kl" trains with the '
                       'diffusion loss: set model.loss_chunk=0.')
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f'model.label_smoothing={self.label_smoothing}: must be in [0, 1).')


def mlp_hidden_dim(width: int, ratio: float, multiple_of: int) -> int:
  """SwiGLU hidden size, LlamaGen's rule: int(ratio * width) rounded up to `multiple_of`."""
  return multiple_of * math.ceil(int(ratio * width) / multiple_of)


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f'{field}={value!r} is not one of {list(choices)}.')


def _build(cls, d: Mapping[str, Any] | Any, where: str):
  """Instantiates dataclass `cls` from `d`, naming unknown fields and wrong types."""
  if dataclasses.is_dataclass(d):
    return d
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f'{where}: unknown field(s) {unknown}; valid fields: {sorted(fields)}.')
  hints = typing.get_type_hints(cls)
  for name, value in d.items():
    expected = hints[name]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if expected in (int, float, bool, str) and not isinstance(value, expected):
      if not (name in ('steps_per_image', 'targets_per_step') and isinstance(value, str)):
        raise ValueError(f'{where}.{name}={value!r}: expected {expected.__name__}, '
                         f'got {type(value).__name__}.')
    if expected is int and isinstance(value, bool):
      raise ValueError(f'{where}.{name}={value!r}: expected int, got bool.')
  return cls(**d)
