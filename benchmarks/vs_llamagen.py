"""Heptapod-JAX beside its peer LlamaGen, in one run, at ImageNet 256 shapes: training step and
sampling, with the machine's limits measured in the same run.

  python benchmarks/vs_llamagen.py --llamagen_dir=PATH/LlamaGen          # B, CPU: ~15 minutes
  python benchmarks/vs_llamagen.py --llamagen_dir=... --dtype=bfloat16 --torch_device=cuda \\
      --sampling_batches=8,256                                          # a GPU

LlamaGen's own code, unmodified, comes from a checkout the user points to (--llamagen_dir; it
is never vendored or copied here; torch comes from requirements-dev.txt): its GPT-B
(`autoregressive/models/gpt.py`, random weights from its own initialisation), its `generate()`
with the KV cache (`autoregressive/models/generate.py`, eager, no torch.compile), its own loss
(the model's cross-entropy) and its AdamW (`creat_optimizer` of
`autoregressive/train/train_c2i.py`: lr 1e-4, betas (0.9, 0.95), weight decay 0.05 on matrices,
fused when available) with its gradient clipping at 1.0 and its dropout (0.1 residual and
token dropout, as its training script sets them). Against it, this project's B preset at the
same shapes (12 x 768 backbone, 16x16 grid, 16384 codes, 1000 classes, the same dropout), each
head as configs/imagenet256.py sets it, random weights, trained by `steps.train_step` (loss,
gradients, clipped AdamW, EMA) and sampled by `decode.sample` (incremental decoding), one
key per sample, temperature 1, no guidance, no top-k/top-p, the same for LlamaGen.

Tables (medians of --repeats after a warm-up that compiles):
  training, batch --train_batch: s/step, tokens/s, ratio to LlamaGen's tokens/s, analytic
    TFLOP/step (heptapod_jax/flops.py; LlamaGen's GPT-B is the next_token row's architecture,
    so it gets that count), MFU against the matmul peak measured here, and for the 2D heads the
    step time over the next_token step's beside their FLOP ratio (equal = the same MFU);
  sampling, each of --sampling_batches: s/image, images/s, ratio to LlamaGen's images/s and to
    the next_token sampler's time, and the decode step against the measured read bandwidth
    and matmul peak (benchmarks/sampling_speed.py explains the columns).
Without --llamagen_dir the script says what it needs and exits with status 2.
"""
from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from _util import decode_roofline, imagenet_model_config, make_train_step, time_sampler
from heptapod_jax import flops
from heptapod_jax.models.heptapod import Heptapod, init_params
from heptapod_jax.sampling import decode

_LLAMAGEN = flags.DEFINE_string('llamagen_dir', None, 'A checkout of '
                                'https://github.com/FoundationVision/LlamaGen (its '
                                'autoregressive/ and utils/ folders are imported as they are).')
_SIZE = flags.DEFINE_enum('size', 'B', ['B', 'L', 'XL'], 'Size preset; LlamaGen GPT-B/L/XL.')
_HEADS = flags.DEFINE_list('heads', ['next_token', 'local', 'global'], 'Head kinds of ours.')
_PARALLEL = flags.DEFINE_list('parallel_tokens', ['4'], 'Extra sampling rows of the global head '
                              'with these positions per head call (beyond the paper).')
_TRAIN_BATCH = flags.DEFINE_integer('train_batch', 4, 'Images per training step.')
_BATCHES = flags.DEFINE_list('sampling_batches', ['1', '8'], 'Images per sampling call.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype of both '
                           '(LlamaGen: autocast in training, a bf16 model in sampling).')
_TORCH_DEVICE = flags.DEFINE_string('torch_device', 'cpu', 'Device of LlamaGen (cpu, cuda).')
_ATTENTION = flags.DEFINE_enum('attention_impl', 'xla', ['xla', 'cudnn', 'auto', 'einsum'],
                               'Our attention kernel (model.attention_impl): xla everywhere; '
                               'cudnn (flash) or auto on a GPU with bf16. KV-cached decoding '
                               'runs its own attention in every case.')
_UNROLL = flags.DEFINE_integer('scan_unroll', 0, 'Our layers per nn.scan iteration in training; '
                               '0 = all of them (fastest on the CPU).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed training steps per row (median).')
_SAMPLING_REPEATS = flags.DEFINE_integer('sampling_repeats', 1, 'Timed sampling calls per row.')
_SKIP_TRAIN = flags.DEFINE_bool('skip_train', False, 'Sampling only.')
_SKIP_SAMPLING = flags.DEFINE_bool('skip_sampling', False, 'Training only.')

LLAMAGEN_FILES = ('autoregressive/models/gpt.py', 'autoregressive/models/generate.py',
                  'autoregressive/train/train_c2i.py')


def import_llamagen(root: str):
  """LlamaGen's gpt, generate and train_c2i modules from the checkout at `root`."""
  path = pathlib.Path(root).expanduser().resolve()
  missing = [f for f in LLAMAGEN_FILES if not (path / f).is_file()]
  if missing:
    raise app.UsageError(f'--llamagen_dir={root} is not a LlamaGen checkout: missing '
                         f'{", ".join(missing)}.')
  sys.path.insert(0, str(path))
  # pylint: disable=g-import-not-at-top
  from autoregressive.models import generate, gpt
  from autoregressive.train import train_c2i
  return gpt, generate, train_c2i


def _torch_dtype(torch):
  return {'float32': torch.float32, 'bfloat16': torch.bfloat16}[_DTYPE.value]


def llamagen_model(gpt, dropout: float):
  """LlamaGen's GPT of --size at ImageNet 256 shapes, its own random initialisation."""
  build = {'B': gpt.GPT_B, 'L': gpt.GPT_L, 'XL': gpt.GPT_XL}[_SIZE.value]
  return build(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
               model_type='c2i', resid_dropout_p=dropout, ffn_dropout_p=dropout,
               token_dropout_p=dropout, drop_path_rate=0.0)


def llamagen_train_seconds(gpt, train_c2i, batch: int, repeats: int) -> float:
  """Median time of LlamaGen's training step (its loop in train_c2i.py, one process)."""
  import torch  # pylint: disable=g-import-not-at-top
  device = torch.device(_TORCH_DEVICE.value)
  torch.manual_seed(0)
  model = llamagen_model(gpt, dropout=0.1).to(device).train()
  quiet = type('Log', (), {'info': staticmethod(lambda *a, **k: None)})()
  optimizer = train_c2i.creat_optimizer(model, 5e-2, 1e-4, (0.9, 0.95), quiet)
  codes = torch.randint(0, 16384, (batch, 256), device=device)
  labels = torch.randint(0, 1000, (batch,), device=device)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if _DTYPE.value == 'bfloat16'
              else contextlib.nullcontext())

  def step():
    with autocast:
      _, loss = model(cond_idx=labels, idx=codes[:, :-1], targets=codes)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # Synchronises, as its training loop does.

  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def llamagen_sampling_seconds(gpt, generate, batch: int) -> float:
  """Time of one `generate()` call for `batch` images of 256 tokens (after a short warm-up)."""
  import torch  # pylint: disable=g-import-not-at-top
  device = torch.device(_TORCH_DEVICE.value)
  torch.manual_seed(0)
  model = llamagen_model(gpt, dropout=0.0).to(device=device, dtype=_torch_dtype(torch)).eval()
  cond = torch.arange(batch, device=device) % 1000
  kw = dict(cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, sample_logits=True)
  with torch.no_grad():
    generate.generate(model, cond, 16, **kw)
    if device.type == 'cuda':
      torch.cuda.synchronize()
    start = time.perf_counter()
    generate.generate(model, cond, 256, **kw)
    if device.type == 'cuda':
      torch.cuda.synchronize()
  return time.perf_counter() - start


def train_table(gpt, train_c2i, peak: float) -> None:
  batch = _TRAIN_BATCH.value
  tokens = batch * 256
  print(f'\ntraining step, batch {batch}, {_DTYPE.value}; LlamaGen on {_TORCH_DEVICE.value}, '
        f'ours on {jax.devices()[0].platform} (attention {_ATTENTION.value})')
  print(f'{"code":9s} {"head":10s} {"s/step":>7s} {"tok/s":>7s} {"vs LlamaGen":>11s} '
        f'{"TFLOP/step":>10s} {"MFU":>5s} {"time/next_token":>15s} {"FLOP ratio":>10s}')
  base_cfg = imagenet_model_config(_SIZE.value, 'next_token', dtype=_DTYPE.value, dropout=0.1,
                                   attention_impl=_ATTENTION.value)
  base_flops = flops.train_flops_per_image(base_cfg)['total'] * batch
  theirs = llamagen_train_seconds(gpt, train_c2i, batch, _REPEATS.value)
  print(f'{"LlamaGen":9s} {"(GPT-" + _SIZE.value + ")":10s} {theirs:7.4f} {tokens / theirs:7.0f} '
        f'{1.0:10.2f}x {base_flops / 1e12:10.3f} {base_flops / theirs / peak:5.2f}', flush=True)
  seconds = {}
  for kind in _HEADS.value:
    cfg = imagenet_model_config(_SIZE.value, kind, dtype=_DTYPE.value, dropout=0.1,
                                scan_unroll=_UNROLL.value, attention_impl=_ATTENTION.value)
    per_step = flops.train_flops_per_image(cfg)['total'] * batch
    run = make_train_step(cfg, batch)
    jax.block_until_ready(run())
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(run())
      times.append(time.perf_counter() - start)
    s = seconds[kind] = statistics.median(times)
    line = (f'{"ours":9s} {kind:10s} {s:7.4f} {tokens / s:7.0f} {theirs / s:10.2f}x '
            f'{per_step / 1e12:10.3f} {per_step / s / peak:5.2f}')
    if kind != 'next_token' and 'next_token' in seconds:
      line += f' {s / seconds["next_token"]:15.2f} {per_step / base_flops:10.2f}'
    print(line, flush=True)


def sampling_table(gpt, generate, peak: float, bandwidth: float) -> None:
  param_bytes = 2 if _DTYPE.value == 'bfloat16' else 4
  print(f'\nsampling: 256 tokens per image, temperature 1, no guidance, {_DTYPE.value}; LlamaGen '
        f'generate() on {_TORCH_DEVICE.value}, ours decode.sample on {jax.devices()[0].platform}')
  print(f'{"code":9s} {"head":10s} {"k":>2s} {"batch":>5s} {"s/img":>7s} {"img/s":>7s} '
        f'{"vs LlamaGen":>11s} {"time/next_token":>15s} {"ms/step":>8s} {"GB/s":>6s} {"%bw":>4s} '
        f'{"TFLOP/s":>7s} {"%peak":>5s}')
  models = {}
  for kind in _HEADS.value:
    cfg = imagenet_model_config(_SIZE.value, kind, dtype=_DTYPE.value,
                                attention_impl=_ATTENTION.value)
    model = Heptapod(cfg)
    params = jax.jit(lambda key, m=model: nn.unbox(init_params(m, key)))(jax.random.key(0))
    models[kind] = (model, params)
  base_cfg = imagenet_model_config(_SIZE.value, 'next_token', dtype=_DTYPE.value)

  def roofline(cfg, batch, seconds, k=1):
    r = decode_roofline(cfg, batch, seconds, peak, bandwidth, parallel_tokens=k,
                        param_bytes=param_bytes)
    io = f'{r["gbps"]:6.1f} {r["of_bandwidth"]:4.0%}' if k == 1 else f'{"-":>6s} {"-":>4s}'
    return f'{r["ms_step"]:8.1f} {io} {r["tflops"]:7.3f} {r["of_peak"]:5.0%}'

  for batch in (int(b) for b in _BATCHES.value):
    theirs = llamagen_sampling_seconds(gpt, generate, batch)
    print(f'{"LlamaGen":9s} {"(GPT-" + _SIZE.value + ")":10s} {1:2d} {batch:5d} '
          f'{theirs / batch:7.4f} {batch / theirs:7.2f} {1.0:10.2f}x {"":15s} '
          f'{roofline(base_cfg, batch, theirs)}', flush=True)
    base = None
    rows = [(kind, 1) for kind in _HEADS.value]
    if 'global' in _HEADS.value:
      rows += [('global', int(k)) for k in _PARALLEL.value if int(k) > 1]
    for kind, k in rows:
      model, params = models[kind]
      seconds = time_sampler(model, params, batch, decode.SamplingConfig(parallel_tokens=k),
                             _SAMPLING_REPEATS.value)['seconds']
      if kind == 'next_token':
        base = seconds
      versus = f'{seconds / base:15.2f}' if base is not None and kind != 'next_token' else ' ' * 15
      print(f'{"ours":9s} {kind:10s} {k:2d} {batch:5d} {seconds / batch:7.4f} '
            f'{batch / seconds:7.2f} {theirs / seconds:10.2f}x {versus} '
            f'{roofline(model.config, batch, seconds, k)}', flush=True)


def main(argv):
  del argv
  if not _LLAMAGEN.value:
    print('vs_llamagen.py needs a LlamaGen checkout: git clone '
          'https://github.com/FoundationVision/LlamaGen and pass --llamagen_dir=PATH (its code '
          'is imported as it is, never copied here; torch from requirements-dev.txt).',
          file=sys.stderr)
    sys.exit(2)
  gpt, generate, train_c2i = import_llamagen(_LLAMAGEN.value)
  device = jax.devices()[0]
  dtype = jnp.dtype(_DTYPE.value)
  peak = flops.measure_peak_matmul_flops(dtype)
  bandwidth = flops.measure_memory_bandwidth()
  import torch  # pylint: disable=g-import-not-at-top
  print(f'{_SIZE.value} shapes: 16x16 grid, 16384 codes, 1000 classes; JAX {jax.__version__} on '
        f'{device.device_kind} ({device.platform}), torch {torch.__version__}; measured here: '
        f'{_DTYPE.value} matmul peak '
        f'{peak / 1e12:.3f} TFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s')
  if not _SKIP_TRAIN.value:
    train_table(gpt, train_c2i, peak)
  if not _SKIP_SAMPLING.value:
    sampling_table(gpt, generate, peak, bandwidth)


if __name__ == '__main__':
  app.run(main)
