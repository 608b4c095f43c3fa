"""Raster-order sampling with a functional KV cache, entirely inside `jax.jit`.

At step t the backbone has consumed x_0..x_{t-1} (one token per step through
the KV cache), the head predicts position t from h_0..h_t only, and the
sampled token is fed back. No classifier-free guidance unless `cfg_scale != 1`
(which runs a second, null-class batch; the model must have been trained with
class dropout for that to mean anything).

    tokens = jax.jit(functools.partial(sample, model, config=SamplingConfig()))(params, labels, rng)

Incremental decoding (`Heptapod.prefill / feed / predict`): the blocks' parameters are split
into one tree per layer once per call (`split_layers`), the layer loop is unrolled inside the
token loop, each layer's KV cache is a [B, heads, slots, head_dim] buffer written in place,
and the head carries a decoding state so that a step computes only what changed (models/
heads.py: the global head keeps its grid tokens' inputs and first-layer projections, the
local head its memory's keys and values; the last head layer has the wanted positions as its
only queries). The samples are those of the straightforward sampler, which reran the head
over every state at every step: tests/test_model.py checks the outputs against the full
forward, and benchmarks/sampling_speed.py and vs_llamagen.py measure the speed.

`use_kv_cache=False` is the baseline without a cache: before step t+1 the backbone reruns
causally over [class, x_0 .. x_t] to get h_{t+1}. Shapes must be static under jit, so the
steps are cut into up to `NO_CACHE_SEGMENTS` runs and every step of a run reruns the backbone
over the run's last prefix (`recompute_runs`): about (1 + 1/runs) / 2 of rerunning the whole
sequence at every step, while the tokens are exactly those of the cached sampler
(causal attention: the not-yet-sampled tokens inside the prefix change no state the head reads).

Parallel decoding (`parallel_tokens = k`, beyond the paper). The 2D head at step t already
predicts every remaining position from h_t, so one head call can give the k positions
t..t+k-1 at once: each is drawn from its own predicted marginal (position t+i with the key
that the one-token sampler uses for it, `fold_in(rng, t + i)`), the k tokens go through the
backbone in one multi-token KV-cached call (k cache entries, causal inside the chunk), and
decoding continues from h_{t+k}. ceil(N / k) head calls and backbone calls per image instead
of N; the last chunk is shorter when k does not divide N. k = 1 is the exact sampler above.

The trade-off, honestly: the k tokens of a chunk are sampled independently given h_t, so
their joint dependence is ignored (two neighbours may each be likely and yet not fit each
other), and positions t+1..t+k-1 are predicted from less context than the one-token sampler
gives them. The distribution is no longer the model's autoregressive one, and sample quality
degrades as k grows; benchmarks/parallel_decoding.py measures how much against the speed-up.
Only the 2D heads support k > 1 ('global': any k; 'local': k <= head.window); the next-token
head predicts one position per state. Continuous tokens draw the k rows with the diffusion
head; classifier-free guidance and `use_kv_cache=False` work with any k.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from heptapod_jax.models import layers
from heptapod_jax.models.config import ModelConfig
from heptapod_jax.models.heads import HeadState
from heptapod_jax.models.heptapod import Heptapod, check_inputs, split_layers
from heptapod_jax.models.transformer import KVCache, init_cache

Array = jax.Array

# use_kv_cache=False cuts the steps into at most NO_CACHE_SEGMENTS runs of at least
# NO_CACHE_MIN_RUN steps; the steps of a run share one static backbone length (fewer runs:
# fewer programs to compile, more recomputation).
NO_CACHE_SEGMENTS = 8
NO_CACHE_MIN_RUN = 8


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to turn logits into tokens. temperature 0 = greedy (argmax)."""
  temperature: float = 1.0
  top_k: int = 0  # 0 = off.
  top_p: float = 1.0  # 1 = off.
  cfg_scale: float = 1.0  # 1 = off (the paper's setting).
  # False: no KV cache; every step reruns the backbone causally over the tokens sampled so
  # far (`recompute_runs`), O(N^2) instead of O(N) backbone work per image. Same samples;
  # the baseline of benchmarks/sampling_speed.py.
  use_kv_cache: bool = True
  # Positions sampled per head call (parallel decoding, see the module docstring); 1 = exact.
  parallel_tokens: int = 1

  def validate(self) -> None:
    if self.temperature < 0:
      raise ValueError(f'sampling.temperature={self.temperature}: must be >= 0.')
    if self.top_k < 0:
      raise ValueError(f'sampling.top_k={self.top_k}: must be >= 0 (0 = off).')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'sampling.top_p={self.top_p}: must be in (0, 1].')
    if isinstance(self.parallel_tokens, bool) or not isinstance(self.parallel_tokens, int) \
        or self.parallel_tokens < 1:
      raise ValueError(f'sampling.parallel_tokens={self.parallel_tokens!r}: must be an integer '
                       '>= 1 (1 = one position per step, the exact sampler).')

  def check_model(self, config: ModelConfig) -> None:
    """ValueError when the model's head cannot predict `parallel_tokens` positions at once."""
    k = self.parallel_tokens
    if k == 1:
      return
    kind = config.head.kind
    if kind == 'next_token':
      raise ValueError(f'sampling.parallel_tokens={k} needs a 2D head (model.head.kind global or '
                       'local): the next_token head predicts only the next position from each '
                       'state. Use sampling.parallel_tokens=1.')
    if kind == 'local' and k > config.head.window:
      raise ValueError(f'sampling.parallel_tokens={k} exceeds model.head.window='
                       f'{config.head.window}: the local head predicts only the positions inside '
                       'its window.')


@flax.struct.dataclass
class DecodeState:
  """Loop carry. With the KV cache: the cache and the head's decoding state (that of the
  next step); without it: `states[:, t]` = h_t, recomputed run by run."""
  tokens: Array  # int32[B, N] (continuous: float32[B, N, C])
  rng: Array
  cache: KVCache | None = None
  head: HeadState | None = None
  states: Array | None = None  # [B', N, E] (B' = 2B with CFG), no-cache sampler only.


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits outside the top-k and outside the top-p nucleus to -inf.

  top_k keeps exactly k entries (ties broken by index). top_p keeps the
  smallest prefix of the sorted distribution whose mass reaches p (the most
  likely token is always kept).
  """
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    _, idx = jax.lax.top_k(logits, top_k)
    keep = jnp.zeros(logits.shape, bool)
    keep = jnp.put_along_axis(keep, idx, True, axis=-1, inplace=False)
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, keep_sorted, axis=-1,
                              inplace=False)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_logits(rng: Array, logits: Array, config: SamplingConfig) -> Array:
  """int32[B] tokens from float[B, V] logits.

  `rng` is one key for the whole batch, or a batch of keys [B] (one per row:
  then row i depends only on its own key, not on the batch it is part of).
  """
  if config.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits.astype(jnp.float32) / config.temperature, config.top_k,
                         config.top_p)
  if rng.ndim == 1:
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def fold_in(rng: Array, data: Array | int) -> Array:
  """`jax.random.fold_in` for one key or a batch of keys [B] (folds `data` into each)."""
  if rng.ndim == 1:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, data)
  return jax.random.fold_in(rng, data)


def example_keys(seed: int | Array, indices: Array) -> Array:
  """One key per sample, from the run seed and the sample's global index: int[B] -> key[B].

  Samples drawn with these keys do not depend on the batch size, the chunking
  or the number of devices and hosts -- only on (seed, index).
  """
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(indices.astype(jnp.uint32))


def recompute_runs(num_positions: int) -> list[tuple[int, int]]:
  """The no-cache sampler's runs [lo, hi) of steps t = 0..N-2: every step of a run feeds the
  backbone [class, x_0 .. x_{hi-1}] (static length; t < hi, so h_{t+1} is in it).

  min(NO_CACHE_SEGMENTS, (N-1) // NO_CACHE_MIN_RUN) runs (at least one) of near-equal
  length; the last ends at N-1, so its prefix is the whole backbone sequence. With G runs
  the backbone processes about (1 + 1/G) / 2 * N^2 grid tokens per image, against N^2 for
  rerunning the whole sequence at every step and N with the cache. (With parallel_tokens k
  the runs are over the fed chunks instead of the steps: `recompute_runs(num_chunks + 1)`.)
  """
  steps = num_positions - 1
  segments = max(1, min(NO_CACHE_SEGMENTS, steps // NO_CACHE_MIN_RUN))
  bounds = [round(i * steps / segments) for i in range(segments + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def chunk_plan(num_positions: int, parallel_tokens: int) -> tuple[int, int]:
  """(fed, last): the sampler makes `fed` head calls of `parallel_tokens` positions whose
  tokens are fed back through the backbone, then one final head call for the `last`
  (1..parallel_tokens) positions that remain, which are never fed (no state follows x_{N-1}).

  `fed + 1` = ceil(N / k) head calls per image; k = 1 gives N - 1 fed steps and a last one.
  """
  fed = (num_positions - 1) // parallel_tokens
  return fed, num_positions - fed * parallel_tokens


def _sample_continuous(model: Heptapod, variables: Any, z: Array, rng: Array) -> Array:
  """One continuous token per row from the diffusion head: z [B, Wz] -> float32[B, C].

  With one key per row (key[B]) each row is sampled with its own key, as for discrete tokens.
  """
  if rng.ndim == 1:
    one = lambda k, zz: model.apply(variables, zz[None], k, method=Heptapod.diffusion_sample)[0]
    return jax.vmap(one)(rng, z)
  return model.apply(variables, z, rng, method=Heptapod.diffusion_sample)


def _sample_chunk(draw, rng: Array, outputs: Array, t: Array) -> Array:
  """Draws positions t..t+c-1 independently from their head outputs [B, c, ...] -> [B, c, ...].

  `draw(key, outputs[:, i])` samples one position; position t+i uses `fold_in(rng, t + i)`,
  the key the one-token sampler uses for it (c = 1 is exactly that sampler's call).
  """
  size = outputs.shape[1]
  if size == 1:
    return draw(fold_in(rng, t), outputs[:, 0])[:, None]
  keys = jax.vmap(lambda i: fold_in(rng, t + i))(jnp.arange(size))  # key[c] or key[c, B]
  return jax.vmap(draw, in_axes=(0, 1), out_axes=1)(keys, outputs)


def sample(model: Heptapod, params: Any, labels: Array, rng: Array,
           config: SamplingConfig = SamplingConfig()) -> Array:
  """Generates token grids for `labels`: int32[B] -> int32[B, N] (raster order;
  continuous tokens: float32[B, N, C], each drawn by the diffusion head's DDPM sampler).

  Jit it with `config` static (functools.partial); shard `labels` over the
  data axes and `params` with their logical shardings. `rng` is one key, or one
  key per sample (key[B], e.g. from `example_keys`) for batch-independent samples.
  `config.parallel_tokens` = k > 1 samples k positions per head call (module docstring).
  """
  mcfg = model.config
  config.validate()
  config.check_model(mcfg)
  check_inputs(mcfg, None, labels)
  n, batch, k = mcfg.num_positions, labels.shape[0], config.parallel_tokens
  num_fed, last = chunk_plan(n, k)
  use_cfg = config.cfg_scale != 1.0
  if use_cfg and mcfg.continuous:
    raise ValueError('sampling.cfg_scale != 1 is not supported for continuous tokens '
                     '(model.tokens="kl").')
  if use_cfg:
    labels = jnp.concatenate([labels, jnp.full_like(labels, mcfg.num_classes)])
  variables = {'params': params}
  if mcfg.continuous:
    init_tokens = jnp.zeros((batch, n, mcfg.token_dim), jnp.float32)
  else:
    init_tokens = jnp.zeros((batch, n), jnp.int32)

  def draw_discrete(key: Array, logits: Array) -> Array:
    return sample_logits(key, logits, config)

  def draw_continuous(key: Array, z: Array) -> Array:
    # DDPM steps and temperature: model.diffusion.num_sampling_steps / temperature.
    return _sample_continuous(model, variables, z, key)

  def pick(state: DecodeState, t: Array, outputs: Array) -> tuple[DecodeState, Array]:
    """Samples positions t..t+c-1 from the head's outputs [B', c, V] (or Wz) of step t."""
    if mcfg.continuous:
      chunk = _sample_chunk(draw_continuous, state.rng, outputs, t)
      tokens = jax.lax.dynamic_update_slice(state.tokens, chunk, (0, t, 0))
      return state.replace(tokens=layers.constrain(tokens, ('batch', None, None))), chunk
    if use_cfg:
      cond, uncond = jnp.split(outputs, 2)
      outputs = uncond + config.cfg_scale * (cond - uncond)
    chunk = _sample_chunk(draw_discrete, state.rng, outputs, t)
    tokens = jax.lax.dynamic_update_slice(state.tokens, chunk, (0, t))
    return state.replace(tokens=layers.constrain(tokens, ('batch', None))), chunk

  if config.use_kv_cache:
    # Incremental decoding: per-layer parameters split once, outside the token loop.
    layer_params = split_layers(params, layers.dtype_of(mcfg.dtype))

    def predict(state: DecodeState, t: Array, size: int) -> Array:
      return model.apply(variables, state.head, t, size, layer_params, method=Heptapod.predict)

    def body(j, state: DecodeState) -> DecodeState:
      t = j * k
      state, chunk = pick(state, t, predict(state, t, k))
      if use_cfg:
        chunk = jnp.concatenate([chunk, chunk])
      head, cache = model.apply(variables, chunk, t, state.cache, state.head, layer_params,
                                method=Heptapod.feed)
      return state.replace(head=head, cache=cache)

    head, cache = model.apply(variables, labels, init_cache(mcfg, labels.shape[0]), layer_params,
                              method=Heptapod.prefill)
    state = DecodeState(tokens=init_tokens, rng=rng, cache=cache, head=head)
    state = jax.lax.fori_loop(0, num_fed, body, state)
    t_last = jnp.asarray(num_fed * k, jnp.int32)
    state, _ = pick(state, t_last, predict(state, t_last, last))
    return state.tokens

  # No KV cache: h_0 from the class prefix, then the backbone reruns run by run.
  h0 = model.apply(variables, labels, method=lambda m, lab: m.backbone(lab, None))[:, -1]
  states = jnp.zeros((labels.shape[0], n, h0.shape[-1]), h0.dtype).at[:, 0].set(h0)
  state = DecodeState(tokens=init_tokens, rng=rng, states=states)

  def head_outputs(state: DecodeState, t: Array, size: int) -> Array:
    steps = jnp.full((state.states.shape[0], 1), t, jnp.int32)
    targets = steps[..., None] + jnp.arange(size, dtype=jnp.int32)  # [B', 1, size]
    return model.apply(variables, state.states, steps, targets,
                       method=Heptapod.head_logits)[:, 0]  # [B', size, V] (or Wz)

  def body_no_cache(j, state: DecodeState, fed: int) -> DecodeState:
    t = j * k
    state, _ = pick(state, t, head_outputs(state, t, k))
    # Causal pass over [class, x_0 .. x_{fed-1}] -> h_0..h_fed. h_{t+k} has seen x_0..x_{t+k-1}
    # only; the states after it come from not-yet-sampled (zero) tokens, and the head of step
    # t+k masks them out exactly as the cached sampler's head never reads them.
    tokens = state.tokens[:, :fed + 1]
    tokens = jnp.concatenate([tokens, tokens]) if use_cfg else tokens
    h = model.apply(variables, tokens, labels, method=Heptapod.states)
    states = jax.lax.dynamic_update_slice(state.states, h.astype(state.states.dtype), (0, 0, 0))
    return state.replace(states=states)

  for lo, hi in recompute_runs(num_fed + 1):
    if hi > lo:
      state = jax.lax.fori_loop(lo, hi, functools.partial(body_no_cache, fed=hi * k), state)
  t_last = jnp.asarray(num_fed * k, jnp.int32)
  state, _ = pick(state, t_last, head_outputs(state, t_last, last))
  return state.tokens
