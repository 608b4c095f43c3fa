"""Analytic model FLOPs (training and sampling), device peaks, and model FLOPs utilisation (MFU).

    from heptapod_jax import flops
    per_image = flops.train_flops_per_image(model_config)  # backbone, head, diffusion, total
    found = flops.peak_flops_per_device(jax.devices()[0], 'bfloat16')
    peak, source = found or (flops.measure_peak_matmul_flops(), 'measured')
    mfu = flops.mfu(per_image['total'] * batch, steps_per_sec, jax.device_count(), peak)

Conventions (those of PaLM's MFU):
  * Every matmul of shapes [m, k] x [k, n] counts 2 m k n; elementwise work (norms, softmax,
    RoPE, activations, the loss) and gathers (embeddings, `take_along_axis`) count 0.
  * Attention counts the scores and the weighted sum in full, 4 * Lq * Lk * width per layer,
    also when it is causal (the backbone in training, the KV-cached decode step over the
    whole static cache): what a dense kernel executes, not half of it.
  * Training = 3 x forward (the backward pass runs two matmuls per forward matmul), also for
    layers whose input is data (`DATA_INPUT_TERMS`), where XLA runs only the weight gradient.
    Recomputation under `nn.remat` is NOT counted: these are model FLOPs (MFU), not hardware
    FLOPs (HFU), so a remat policy lowers the MFU, as it should.
The counts follow the modules term by term (models/transformer.py, heads.py, diffusion.py);
tests/test_flops.py checks them against XLA's cost analysis of the real forward + backward.
"""
from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from heptapod_jax.models import objective
from heptapod_jax.models.heptapod import Heptapod, init_params
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim

PARTS = ('backbone', 'head', 'diffusion')

# Forward terms whose input is data, not an activation (the continuous-token embedding, the
# denoiser's x_t and timestep layers): a backward pass computes only their weight gradient.
DATA_INPUT_TERMS = ('backbone/token_proj', 'diffusion/data_input')

# Dense bf16 peak per chip (TFLOP/s), matched case-insensitively as a substring of
# `jax.Device.device_kind`, first match wins (so 'TPU v5 lite' comes before 'TPU v5').
# Public vendor figures; NVIDIA's are the SXM parts without sparsity.
PEAK_BF16_TFLOPS = (
    ('TPU v6 lite', 918.0),  # v6e (Trillium).
    ('TPU v6e', 918.0),
    ('TPU v5 lite', 197.0),  # v5e.
    ('TPU v5e', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),  # v5p reports 'TPU v5'.
    ('TPU v4', 275.0),
    ('H200', 989.0),
    ('H100', 989.0),
    ('A100', 312.0),
)


# --------------------------------------------------------------------------- analytic counts


def _attention_block(terms: dict[str, float], part: str, *, queries: float, keys: float,
                     kv_tokens: float, width: int, q_dim: int, kv_dim: int,
                     name: str = 'attention') -> None:
  """Adds one attention layer: q/out projections on `queries` tokens, k/v on `kv_tokens`,
  scores and weighted sum of every query over `keys` keys (4 * queries * keys * q_dim)."""
  terms[f'{part}/attention_proj'] += (2 * queries * 2 * width * q_dim
                                      + 2 * kv_tokens * 2 * width * kv_dim)
  terms[f'{part}/{name}'] += 4 * queries * keys * q_dim


def _mlp(terms: dict[str, float], part: str, tokens: float, width: int, hidden: int) -> None:
  """Adds one SwiGLU MLP (gate, up, down) on `tokens` tokens."""
  terms[f'{part}/mlp'] += 2 * tokens * 3 * width * hidden


def _head_mlp_hidden(config: ModelConfig) -> int:
  h = config.head
  return mlp_hidden_dim(h.width, h.mlp_ratio, h.mlp_multiple_of)


def _pairs(config: ModelConfig) -> tuple[int, int]:
  """(S steps per image, K targets per step) exactly as the objective draws them."""
  steps, targets, _ = jax.eval_shape(lambda: objective.draw_pairs(jax.random.key(0), config, 1))
  return steps.shape[1], targets.shape[2]


@functools.lru_cache(maxsize=64)
def _denoiser_kernels(config: ModelConfig) -> tuple[int, int]:
  """(entries of the denoiser kernels whose input is data: x_t's input_proj and the timestep
  MLP's first layer; entries of every other kernel), from the real module's shapes."""
  from heptapod_jax.models import diffusion  # pylint: disable=g-import-not-at-top
  cond_width = config.backbone.width if config.head.kind == 'next_token' else config.head.width
  module = diffusion.DenoiserMLP(config.diffusion, config.token_dim)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, config.token_dim)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, cond_width))))
  data, rest = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    if len(leaf.shape) < 2:  # Biases and norms: elementwise.
      continue
    names = {getattr(p, 'key', None) for p in path}
    if names & {'input_proj', 'time_mlp_in'}:
      data += leaf.size
    else:
      rest += leaf.size
  return data, rest


def _backbone_block_terms(terms: dict[str, float], config: ModelConfig, tokens: float,
                          keys: float) -> None:
  """`depth` backbone blocks on `tokens` tokens, each attending to `keys` keys."""
  b = config.backbone
  head_dim = b.width // b.num_heads
  mlp = mlp_hidden_dim(b.width, b.mlp_ratio, b.mlp_multiple_of)
  for _ in range(b.depth):
    _attention_block(terms, 'backbone', queries=tokens, keys=keys, kv_tokens=tokens,
                     width=b.width, q_dim=b.num_heads * head_dim, kv_dim=b.kv_heads * head_dim)
    _mlp(terms, 'backbone', tokens, b.width, mlp)


def _global_head_terms(terms: dict[str, float], config: ModelConfig, steps: int) -> None:
  """GlobalHead on `steps` steps: projections in, `depth` blocks over steps * (N+1) tokens."""
  b, h, n = config.backbone, config.head, config.num_positions
  terms['head/input_proj'] += 2 * steps * b.width * h.width  # context_proj on h_t.
  if h.visible_context:
    terms['head/input_proj'] += 2 * (n - 1) * b.width * h.width  # visible_proj on h_1..h_{N-1}.
  tokens = steps * (n + 1)
  for _ in range(h.depth):
    _attention_block(terms, 'head', queries=tokens, keys=n + 1, kv_tokens=tokens, width=h.width,
                     q_dim=h.width, kv_dim=h.width)
    _mlp(terms, 'head', tokens, h.width, _head_mlp_hidden(config))


def _local_head_terms(terms: dict[str, float], config: ModelConfig, steps: int) -> None:
  """LocalHead on `steps` steps: memory_proj on the N states, then per layer cross-attention of
  the steps * W queries to the N memory slots, self-attention inside each W window, MLP."""
  b, h, n = config.backbone, config.head, config.num_positions
  terms['head/input_proj'] += 2 * n * b.width * h.width  # memory_proj.
  queries = steps * h.window
  for _ in range(h.depth):
    _attention_block(terms, 'head', queries=queries, keys=n, kv_tokens=n, width=h.width,
                     q_dim=h.width, kv_dim=h.width, name='cross_attention')
    _attention_block(terms, 'head', queries=queries, keys=h.window, kv_tokens=queries,
                     width=h.width, q_dim=h.width, kv_dim=h.width)
    _mlp(terms, 'head', queries, h.width, _head_mlp_hidden(config))


def _output_terms(terms: dict[str, float], config: ModelConfig, rows: float,
                  denoiser_calls: float) -> None:
  """The vocabulary projection of `rows` head outputs (discrete tokens), or the denoiser MLP
  on `rows * denoiser_calls` rows (continuous tokens)."""
  if config.continuous:
    data, rest = _denoiser_kernels(config)
    terms['diffusion/data_input'] += 2 * rows * denoiser_calls * data
    terms['diffusion/mlp'] += 2 * rows * denoiser_calls * rest
  else:
    width = config.backbone.width if config.head.kind == 'next_token' else config.head.width
    terms['head/logits'] += 2 * rows * width * config.vocab_size


def forward_flops_terms(config: ModelConfig) -> dict[str, float]:
  """Forward FLOPs of one image's teacher-forced training pass, term by term.

  Keys are 'part/term', part in PARTS: backbone/{attention_proj, attention, mlp, token_proj},
  head/{input_proj, attention_proj, attention, cross_attention, mlp, logits},
  diffusion/{data_input, mlp}; only the terms the config has are present.
  """
  terms: dict[str, float] = collections.defaultdict(float)
  b, n, seq = config.backbone, config.num_positions, config.seq_len
  _backbone_block_terms(terms, config, seq, seq)
  if config.continuous:  # Linear embedding of the N-1 input latents.
    terms['backbone/token_proj'] += 2 * (n - 1) * config.token_dim * b.width
  s, k = _pairs(config)
  if config.head.kind == 'global':
    _global_head_terms(terms, config, s)
  elif config.head.kind == 'local':
    _local_head_terms(terms, config, s)
  _output_terms(terms, config, s * k, config.diffusion.batch_mul)
  return dict(terms)


def _by_part(terms: dict[str, float], scale: float = 1.0) -> dict[str, float]:
  out = {part: 0.0 for part in PARTS}
  for key, value in terms.items():
    out[key.split('/')[0]] += scale * value
  out['total'] = sum(out[part] for part in PARTS)
  return out


def forward_flops_per_image(config: ModelConfig) -> dict[str, float]:
  """Forward FLOPs of one image's teacher-forced pass: backbone, head, diffusion, total."""
  return _by_part(forward_flops_terms(config))


def train_flops_per_image(config: ModelConfig) -> dict[str, float]:
  """Training model FLOPs of one image (forward + backward = 3 x forward), by part:
  {'backbone', 'head', 'diffusion' (continuous tokens; else 0), 'total'}."""
  return _by_part(forward_flops_terms(config), 3.0)


def _global_head_decode_terms(terms: dict[str, float], config: ModelConfig,
                              predictions: int) -> None:
  """The global head's incremental decoding of one image (models/heads.py, decode_*), with
  `predictions` head calls for the N positions (N with one position per call).

  Per fed token (N-1): visible_proj of its state and the first layer's q, k, v of the grid
  token it makes visible. Per call: the context token (context_proj and its q, k, v), the
  first layer over all N+1 tokens with the grid's projections read from the state, middle
  layers in full, and the last layer's keys and values of every token; per wanted position
  (N in all): the last layer's query, attention, output projection and MLP.
  """
  b, h, n = config.backbone, config.head, config.num_positions
  wh, tokens, hidden = h.width, n + 1, _head_mlp_hidden(config)
  if h.visible_context:
    terms['head/input_proj'] += 2 * (n - 1) * b.width * wh
    terms['head/attention_proj'] += 2 * (n - 1) * 3 * wh * wh
  terms['head/input_proj'] += 2 * predictions * b.width * wh  # context_proj.
  for i in range(h.depth):
    last = i == h.depth - 1
    queries = n if last else predictions * tokens  # Summed over the calls.
    kv_tokens = predictions * (1 if i == 0 else tokens)  # Projected here, not read from state.
    q_tokens = predictions if i == 0 else queries
    terms['head/attention_proj'] += 2 * wh * wh * (q_tokens + 2 * kv_tokens + queries)
    terms['head/attention'] += 4 * queries * tokens * wh
    _mlp(terms, 'head', queries, wh, hidden)


def _local_head_decode_terms(terms: dict[str, float], config: ModelConfig,
                             predictions: int) -> None:
  """The local head's incremental decoding of one image (models/heads.py, decode_*), with
  `predictions` head calls for the N positions.

  Per state (N, h_0 included): memory_proj and every layer's cross-attention k, v of that
  memory slot. Per call: every layer cross-attends from the W window queries over the N
  memory slots (masked), then self-attends inside the window, then the MLP; the last layer
  has only the wanted positions (N in all) as self-attention queries and MLP rows.
  """
  b, h, n = config.backbone, config.head, config.num_positions
  wh, window, hidden = h.width, h.window, _head_mlp_hidden(config)
  terms['head/input_proj'] += 2 * n * b.width * wh
  for i in range(h.depth):
    queries = n if i == h.depth - 1 else predictions * window
    windows = predictions * window
    terms['head/attention_proj'] += 2 * n * 2 * wh * wh  # Memory k, v of each slot, once.
    terms['head/attention_proj'] += 2 * wh * wh * (2 * windows + queries + 2 * windows + queries)
    terms['head/cross_attention'] += 4 * windows * n * wh
    terms['head/attention'] += 4 * queries * window * wh
    _mlp(terms, 'head', queries, wh, hidden)


def sampling_flops_terms(config: ModelConfig, parallel_tokens: int = 1) -> dict[str, float]:
  """Forward FLOPs of KV-cached raster sampling of one image (cfg_scale 1), term by term.

  As sampling/decode.py runs it (incremental decoding, `parallel_tokens` positions per head call):
  the P prefix slots and N-1 fed tokens through the backbone, each attending over the whole
  static cache (seq_len keys); the head's work per fed token, per call and per wanted
  position (`_global_head_decode_terms`, `_local_head_decode_terms`); the logits of the N
  positions, or for continuous tokens the denoiser on one row per position at each of the
  num_sampling_steps DDPM steps.
  """
  terms: dict[str, float] = collections.defaultdict(float)
  b, n, seq = config.backbone, config.num_positions, config.seq_len
  predictions = (n - 1) // parallel_tokens + 1  # sampling.chunk_plan: fed calls + the last.
  _backbone_block_terms(terms, config, seq, seq)
  if config.continuous:
    terms['backbone/token_proj'] += 2 * (n - 1) * config.token_dim * b.width
  if config.head.kind == 'global':
    _global_head_decode_terms(terms, config, predictions)
  elif config.head.kind == 'local':
    _local_head_decode_terms(terms, config, predictions)
  _output_terms(terms, config, n, config.diffusion.num_sampling_steps)
  return dict(terms)


def sampling_flops_per_image(config: ModelConfig, parallel_tokens: int = 1) -> dict[str, float]:
  """Forward FLOPs of KV-cached sampling of one image: backbone, head, diffusion, total."""
  return _by_part(sampling_flops_terms(config, parallel_tokens))


@functools.lru_cache(maxsize=64)
def _param_sizes(config: ModelConfig) -> dict[str, int]:
  """Entries of the model's parameters by top-level part, the embedding tables apart:
  {'backbone', 'head', 'diffusion', 'token_embedding', 'class_embedding'} (from the module)."""
  model = Heptapod(config)
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  sizes = collections.Counter()
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    names = [getattr(p, 'key', None) for p in path]
    leaf = getattr(leaf, 'value', leaf)  # Boxed with partitioning metadata.
    part = names[1] if names[1] in ('token_embedding', 'class_embedding') else names[0]
    sizes[part] += int(math.prod(leaf.shape))
  return dict(sizes)


def sampling_bytes_per_step(config: ModelConfig, batch: int, param_bytes: int = 4,
                            activation_bytes: int = 4) -> dict[str, float]:
  """Bytes one exact decoding step must read at the least, averaged over the N steps of an
  image: the memory-bound floor of sampling at small batch (benchmarks/sampling_speed.py).

  weights     every parameter once per step (the backbone's blocks and final norm, the head,
              the logits; the denoiser once per DDPM step for continuous tokens), but of the
              token embedding only the `batch` rows fed and of the class embedding nothing;
  kv_cache    the backbone's keys and values written so far (the P prefix slots and t tokens
              at step t: P + (N - 2) / 2 on average over the N - 1 fed tokens);
  head_state  what the head's decoding state holds so far: the global head's grid inputs and
              first-layer q, k, v (N positions, 4 x head width; the inputs only under
              head.condition='add', whose q, k, v are recomputed), the local head's memory keys
              and values for every layer (t + 1 slots at step t: (N + 1) / 2 on average).
  Cached or recomputed, a step cannot read less and still be exact; `total` is their sum.
  """
  b, h, n = config.backbone, config.head, config.num_positions
  sizes = _param_sizes(config)
  diffusion_reads = config.diffusion.num_sampling_steps if config.continuous else 0
  weights = (sizes.get('backbone', 0) + sizes.get('head', 0)
             + diffusion_reads * sizes.get('diffusion', 0)
             + (0 if config.continuous else batch * b.width))
  kv_width = b.kv_heads * (b.width // b.num_heads)
  kv_cache = 2 * b.depth * batch * kv_width * (b.class_prefix_len + (n - 2) / 2)
  head_state = 0.0
  if h.kind == 'global':
    # condition='add' keeps the grid inputs only (their q, k, v change with h_t every step).
    head_state = (1 if h.condition == 'add' else 4) * batch * n * h.width
  elif h.kind == 'local':
    head_state = 2 * h.depth * batch * h.width * (n + 1) / 2
  out = {'weights': weights * param_bytes, 'kv_cache': kv_cache * activation_bytes,
         'head_state': head_state * activation_bytes}
  out['total'] = sum(out.values())
  return out


# --------------------------------------------------------------------------- peaks and MFU


def peak_flops_per_device(device: Any = None, dtype: Any = 'bfloat16') -> tuple[float, str] | None:
  """(peak FLOP/s, where the figure comes from) of a known accelerator, or None.

  The table holds dense bf16 rates (TPU v4 275, v5e 197, v5p 459, v6e 918; A100 312, H100
  and H200 989 TFLOP/s). They are returned for bf16/fp16 compute, and for float32 on TPU
  (float32 matmuls run as bf16 passes at default precision). None for CPUs, unknown chips,
  and float32 on GPUs (TF32 or full float32 depends on the precision setting): measure those
  with `measure_peak_matmul_flops`.
  """
  device = device or jax.devices()[0]
  kind = getattr(device, 'device_kind', '') or ''
  if device.platform == 'cpu':
    return None
  if device.platform == 'gpu' and jnp.dtype(dtype) == jnp.float32:
    return None
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12, f'table: {kind}, {tflops:g} dense bf16 TFLOP/s'
  return None


@functools.lru_cache(maxsize=8)
def _matmul_chain(chain: int):
  """A jitted chain of `chain` square matmuls a @ x @ x ... (operands are arguments, so no
  constant folds away)."""

  def run(a, x):
    for _ in range(chain):
      a = a @ x
    return a

  return jax.jit(run)


def measure_peak_matmul_flops(dtype: Any = jnp.float32, size: int | None = None,
                              device: Any = None, repeats: int = 3) -> float:
  """Achievable matmul FLOP/s of one device: the best of `repeats` timed chains of square
  [size, size] matmuls after a compiled warm-up run.

  Default size 2048 on CPU (a chain of 4: about 1 s in all on 2 cores; smaller matrices
  leave the thread pool's start-up in the time and read up to 2x low), 8192 elsewhere.
  """
  device = device or jax.devices()[0]
  if size is None:
    size = 2048 if device.platform == 'cpu' else 8192
  chain = 4 if device.platform == 'cpu' else 16
  # Random entries in [0, 2/size) keep every product's entries near 1/size (no overflow, no
  # denormals); constant or zero operands can run faster than real data (less switching).
  ka, kx = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.uniform(ka, (size, size), dtype, 0.0, 2.0 / size), device)
  x = jax.device_put(jax.random.uniform(kx, (size, size), dtype, 0.0, 2.0 / size), device)
  run = _matmul_chain(chain)
  jax.block_until_ready(run(a, x))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(a, x))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 * chain / best


@functools.lru_cache(maxsize=4)
def _sum_fn():
  return jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))


def measure_memory_bandwidth(num_bytes: int | None = None, device: Any = None,
                             repeats: int = 3) -> float:
  """Achievable read bandwidth of one device in bytes/s: the best of `repeats` timed sums of
  a float32 array of `num_bytes` (default 1 GiB on a CPU, 4 GiB elsewhere: far beyond any
  cache, and on an accelerator long enough that the dispatch is noise) after a warm-up.
  The physical limit that a memory-bound decoding step is held against."""
  device = device or jax.devices()[0]
  num_bytes = num_bytes or (2 ** 30 if device.platform == 'cpu' else 2 ** 32)
  x = jax.device_put(jnp.full((num_bytes // 4,), 1.0, jnp.float32), device)
  run = _sum_fn()
  jax.block_until_ready(run(x))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(x))
    best = min(best, time.perf_counter() - start)
  return x.nbytes / best


def mfu(flops_per_step: float, steps_per_sec: float, num_devices: int,
        peak_per_device: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' total peak."""
  return flops_per_step * steps_per_sec / (num_devices * peak_per_device)
