"""Analytic model FLOPs of a training image, device peaks, and model FLOPs utilisation (MFU).

    from heptapod_jax import flops
    per_image = flops.train_flops_per_image(model_config)   # {'backbone', 'head', 'diffusion', 'total'}
    peak, source = flops.peak_flops_per_device(jax.devices()[0], 'bfloat16') or (
        flops.measure_peak_matmul_flops(), 'measured')
    mfu = flops.mfu(per_image['total'] * batch, steps_per_sec, jax.device_count(), peak)

Conventions (those of PaLM's MFU):
  * Every matmul of shapes [m, k] x [k, n] counts 2 m k n; elementwise work (norms,
    softmax, RoPE, activations) and embedding gathers count 0.
  * Attention counts the scores and the weighted sum in full, 4 * Lq * Lk * width per
    layer, also for causal attention (what a dense kernel executes).
  * Training = 3 x forward (the backward pass is two matmuls per forward matmul).
    Recomputation under `nn.remat` is NOT counted: this is model FLOPs, so a remat
    policy lowers MFU, as it should.
The counts follow the modules exactly (models/transformer.py, heads.py, diffusion.py);
tests/test_flops.py checks them against XLA's cost analysis of the real fwd+bwd.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

from heptapod_jax.models import objective
from heptapod_jax.models.config import ModelConfig, mlp_hidden_dim

# Dense bf16 peak per chip (TFLOP/s), by a substring of `jax.Device.device_kind`. Public figures
# of the vendors; float32 on TPU runs through bf16 passes, float32 on GPU through TF32 (not
# listed: half the bf16 rate on A100/H100, so MFU is reported against bf16 there).
PEAK_BF16_TFLOPS = (
    ('TPU v6', 918.0),  # v6e (Trillium).
    ('TPU v5p', 459.0),
    ('TPU v5 lite', 197.0),  # v5e.
    ('TPU v5e', 197.0),
    ('TPU v5', 459.0),  # v5p reports 'TPU v5'.
    ('TPU v4', 275.0),
    ('H200', 989.0),
    ('H100', 989.0),
    ('A100', 312.0),
    ('L4', 121.0),
)


def _block_forward(tokens: float, width: int, heads_dim: int, kv_dim: int, mlp: int,
                   attn_len: float) -> float:
  """Forward FLOPs of one pre-norm block over `tokens` tokens, each attending to `attn_len` keys:
  q and out projections (width x heads_dim), k and v (width x kv_dim), SwiGLU (3 matrices)."""
  proj = 2 * tokens * (2 * width * heads_dim + 2 * width * kv_dim + 3 * width * mlp)
  return proj + 4 * tokens * attn_len * heads_dim


def _pairs(config: ModelConfig) -> tuple[int, int]:
  """(S steps per image, K targets per step) as the objective draws them."""
  steps, targets, _ = jax.eval_shape(lambda: objective.draw_pairs(jax.random.key(0), config, 1))
  return steps.shape[1], targets.shape[2]


def _diffusion_matmul_params(config: ModelConfig) -> int:
  """Kernel entries of the denoiser MLP (every 2-D weight), from the real module."""
  from heptapod_jax.models import diffusion  # pylint: disable=g-import-not-at-top
  cond_width = config.head.width if config.head.kind != 'next_token' else config.backbone.width
  module = diffusion.DenoiserMLP(config.diffusion, config.token_dim)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, config.token_dim)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, cond_width))))
  return sum(x.size for x in jax.tree.leaves(shapes) if len(x.shape) >= 2)


def forward_flops_per_image(config: ModelConfig) -> dict[str, float]:
  """Forward FLOPs of one image's teacher-forced pass, by part."""
  b, h = config.backbone, config.head
  n = config.num_positions
  seq = config.seq_len
  head_dim = b.width // b.num_heads
  backbone = b.depth * _block_forward(seq, b.width, b.num_heads * head_dim, b.kv_heads * head_dim,
                                      mlp_hidden_dim(b.width, b.mlp_ratio, b.mlp_multiple_of), seq)
  if config.continuous:  # Linear embedding of the N-1 input latents.
    backbone += 2 * (n - 1) * config.token_dim * b.width
  s, k = _pairs(config)
  out_width = b.width if h.kind == 'next_token' else h.width
  head = 0.0
  if h.kind != 'next_token':
    hmlp = mlp_hidden_dim(h.width, h.mlp_ratio, h.mlp_multiple_of)
  if h.kind == 'global':
    tokens = s * (n + 1)
    head += 2 * s * b.width * h.width  # context_proj
    if h.visible_context:
      head += 2 * (n - 1) * b.width * h.width  # visible_proj on h_1..h_{N-1}
    head += h.depth * _block_forward(tokens, h.width, h.width, h.width, hmlp, n + 1)
  elif h.kind == 'local':
    queries = s * h.window
    head += 2 * n * b.width * h.width  # memory_proj
    cross = 2 * queries * 2 * h.width * h.width + 2 * n * 2 * h.width * h.width  # q, out | k, v
    cross += 4 * queries * n * h.width  # scores and sum over the N memory slots
    self_attn = _block_forward(queries, h.width, h.width, h.width, hmlp, h.window)
    head += h.depth * (cross + self_attn)
  if not config.continuous:
    head += 2 * s * k * out_width * config.vocab_size  # logits of every supervised target
  diffusion = 0.0
  if config.continuous:
    diffusion = 2 * config.diffusion.batch_mul * s * k * _diffusion_matmul_params(config)
  return {'backbone': float(backbone), 'head': float(head), 'diffusion': float(diffusion),
          'total': float(backbone + head + diffusion)}


def train_flops_per_image(config: ModelConfig) -> dict[str, float]:
  """Training (forward + backward) model FLOPs of one image, by part: 3 x forward."""
  return {k: 3.0 * v for k, v in forward_flops_per_image(config).items()}


def sampling_flops_per_image(config: ModelConfig) -> float:
  """Forward FLOPs of KV-cached raster sampling of one image (discrete tokens): the backbone
  one token per step attending to the cache, and the head at every one of the N steps for
  one target (the global head runs over all N+1 tokens each time)."""
  b, h = config.backbone, config.head
  n, seq = config.num_positions, config.seq_len
  head_dim = b.width // b.num_heads
  mlp = mlp_hidden_dim(b.width, b.mlp_ratio, b.mlp_multiple_of)
  per_token = _block_forward(1, b.width, b.num_heads * head_dim, b.kv_heads * head_dim, mlp, seq)
  total = b.depth * per_token * seq
  if h.kind == 'global':
    hmlp = mlp_hidden_dim(h.width, h.mlp_ratio, h.mlp_multiple_of)
    per_step = 2 * b.width * h.width * (1 + (n - 1 if h.visible_context else 0))
    per_step += h.depth * _block_forward(n + 1, h.width, h.width, h.width, hmlp, n + 1)
    total += n * (per_step + 2 * h.width * config.vocab_size)
  elif h.kind == 'local':
    hmlp = mlp_hidden_dim(h.width, h.mlp_ratio, h.mlp_multiple_of)
    w = h.window
    per_step = 2 * n * b.width * h.width
    per_step += h.depth * (2 * w * 2 * h.width * h.width + 2 * n * 2 * h.width * h.width
                           + 4 * w * n * h.width
                           + _block_forward(w, h.width, h.width, h.width, hmlp, w))
    total += n * (per_step + 2 * h.width * config.vocab_size)
  else:
    total += n * 2 * b.width * config.vocab_size
  return float(total)


def peak_flops_per_device(device: Any = None, dtype: str = 'bfloat16') -> tuple[float, str] | None:
  """(peak FLOP/s, where the figure comes from) of a known accelerator, or None (CPU, unknown).

  The table holds dense bf16 rates; they are returned for bf16/fp16 compute and for float32
  on TPU (matmuls run as bf16 passes at default precision). For float32 on a GPU the peak
  is unknown here (TF32 or not) and None is returned, so the caller measures it.
  """
  device = device or jax.local_devices()[0]
  kind = getattr(device, 'device_kind', '')
  if device.platform == 'gpu' and jnp.dtype(dtype) == jnp.float32:
    return None
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12, f'table: {kind} {tflops:g} bf16 TFLOP/s'
  return None


def measure_peak_matmul_flops(dtype: Any = jnp.float32, size: int | None = None,
                              device: Any = None, repeats: int = 3) -> float:
  """Achievable matmul FLOP/s of one device: the best of `repeats` timed chains of square
  matmuls (size 1024 on CPU, 8192 on accelerators), compiled and warmed up first."""
  device = device or jax.local_devices()[0]  # A device of this process (multi-host jobs too).
  size = size or (1024 if device.platform == 'cpu' else 8192)
  chain = 8
  x = jax.device_put(jnp.ones((size, size), dtype) / size, device)

  @jax.jit
  def run(a, b):
    for _ in range(chain):
      a = a @ b
    return a

  jax.block_until_ready(run(x, x))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(x, x))
    best = min(best, time.perf_counter() - t)
  return 2.0 * size ** 3 * chain / best


def mfu(flops_per_step: float, steps_per_sec: float, num_devices: int,
        peak_per_device: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return flops_per_step * steps_per_sec / (num_devices * peak_per_device)
