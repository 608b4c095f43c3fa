"""The embedded default: Heptapod on the built-in digits, end to end on a CPU.

  make demo
  # = python -m heptapod_jax.main --config=configs/vq_demo.py --workdir=workdirs/demo/tokenizer
  #   python -m heptapod_jax.tools.tokenize_dataset --config=configs/demo.py --variants=center \
  #       --config.tokenizer.checkpoint=workdirs/demo/tokenizer/tokenizer --out=workdirs/demo/codes
  #   python -m heptapod_jax.main --config=configs/demo.py --workdir=workdirs/demo \
  #       --config.tokenizer.checkpoint=workdirs/demo/tokenizer/tokenizer \
  #       --config.data.tokenized_dir=workdirs/demo/codes
  # (without the last flag the trainer encodes the images at every step: same numbers, slower)

Data: scikit-learn's 1,797 handwritten digits (bundled with the package, no
download), rendered as 32x32 RGB through the project's TFDS builder; 1,500
train / 297 held-out. Tokenizer (`tokenizer=vq`, default): the small VQ
autoencoder that configs/vq_demo.py trains first (stride 4, 64 codes), so each
image is an 8x8 grid of tokens (N = 64); `make demo` encodes the training split
once (tools/tokenize_dataset.py -> workdirs/demo/codes, passed as
--config.data.tokenized_dir: the same codes, so the same numbers, 10% faster steps).
`tokenizer=pixel` instead uses gray levels of 4x4 patches (16 levels, no training
stage). Model: the `tiny` preset (backbone 4 x 128, global 2D head 2 x 64, every
layer unrolled), steps_per_image = 4, batch 32, 1,000 steps.

At the end: generative metrics (config.evaluator) -- a small CNN trained on the train split
(workdirs/demo/feature_net) gives the features; 300 class-balanced samples and the 297
held-out real digits (raw and through the tokenizer) are scored against the train split.

Hardware: any CPU; `make demo` from a fresh clone takes 9 min 16 s on a 2-core AMD EPYC
(venv 42 s, tokenizer 2 min 18 s, codes 10 s, this stage 6 min 4 s at 3.26 steps/s).
Measured (deterministic): held-out NLL 1.519 nats/token (uniform: log 64 = 4.16), next-token
accuracy 0.506; samples FID 19.52 / precision 0.807 / recall 0.587 / class accuracy 0.950,
held-out real digits FID 34.99 / 0.747 / 0.763 / 0.960 (see docs/getting-started.md on reading these, and on
how the budget was chosen: 1,200 steps gave 17.62 / 0.963 in 1.2x the time); sample grids
under workdirs/demo/samples/ with one column per digit 0..9, everything on one page in
workdirs/demo/summary.html.

Options (`--config=configs/demo.py:head=local,steps=500`):
  head       global | local | next_token   the 2D head or the 1D baseline
  steps      training steps
  size       model size preset (tiny by default)
  tokenizer  vq | kl | pixel   kl = continuous tokens with the diffusion loss: train its
             tokenizer first with configs/vq_demo.py:kind=kl --workdir=workdirs/demo_kl/tokenizer

The 2D head keeps the paper's design (model.head.loss_weighting=pairs, next_weight=0,
condition=context, direct_next=False): benchmarks/objective_study.py (3 seeds, 600 steps each)
found no option that beats it on both held-out NLL and FID by more than two standard deviations.
The closest: --config.model.head.direct_next=True (h_t projected straight onto the next
position's output) cuts the held-out NLL from 1.561 to 1.288 with FID 36.9 +/- 3.3 against
37.3 +/- 3.7, lower precision and higher recall (docs/objective-study.md).
Sampling stays at temperature 1 (sampling.temperature, model.diffusion.temperature): the best of
0.8 / 0.9 / 1.0 / 1.1, picked per run on the held-out split, is within the seeds' spread of it
for every head, on VQ and KL tokens (1,000 samples, 3 seeds). On KL tokens (tokenizer=kl) the
1D baseline leads as well: held-out diffusion loss 0.142 against the global head's 0.154 and
FID 22.6 against 58.9 at 600 steps.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from heptapod_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  opts = config_lib.parse_arg(arg, head='global', steps=1000, size='tiny', tokenizer='vq')
  c = common.base_config()
  common.apply_size(c, opts.size)
  c.seed = 0

  c.data.source = 'builtin_digits'
  c.data.image_size = 32
  c.data.augment = 'none'
  c.data.shuffle_buffer = 2000

  if opts.tokenizer == 'vq':
    c.tokenizer.kind = 'vq'
    # Written by the first stage of `make demo` (configs/vq_demo.py); paths are relative to
    # the repository root, where the documented commands run.
    c.tokenizer.checkpoint = 'workdirs/demo/tokenizer/tokenizer'
    vocab = 64
  elif opts.tokenizer == 'kl':
    # Continuous tokens: the KL autoencoder of configs/vq_demo.py:kind=kl (4 channels per
    # position) and the diffusion loss on the 2D head.
    c.tokenizer.kind = 'kl'
    c.tokenizer.checkpoint = 'workdirs/demo_kl/tokenizer/tokenizer'
    c.tokenizer.latent_scale = 1.0  # Its latents' std on the digits is ~1.15 already.
    vocab = 64  # Unused with continuous tokens.
  elif opts.tokenizer == 'pixel':
    c.tokenizer.kind = 'pixel'
    c.tokenizer.patch = 4
    c.tokenizer.levels = 16
    vocab = 16
  else:
    raise ValueError(f"configs/demo.py option tokenizer={opts.tokenizer!r} is not one of "
                     "['vq', 'kl', 'pixel'].")

  m = c.model
  m.vocab_size = vocab
  m.grid_size = (8, 8)
  m.num_classes = 10
  m.head.kind = opts.head
  m.head.steps_per_image = 4 if opts.head != 'next_token' else -1
  m.head.targets_per_step = -1
  m.head.window = 8
  m.backbone.dropout = 0.1
  m.head.dropout = 0.1
  # Every layer unrolled: on a CPU the scan's per-layer loop costs ~7% of a step this small.
  m.scan_unroll = 4
  if opts.tokenizer == 'kl':
    m.tokens = 'kl'
    m.token_dim = 4
    m.diffusion.width = 128
    m.diffusion.depth = 2
    m.diffusion.batch_mul = 2
    m.diffusion.num_sampling_steps = 50
    # MAR's cosine schedule amplifies the denoiser's error at the noisiest step ~300x when
    # sampling (abar_T ~ 2e-9); a head trained for minutes is not accurate enough for that,
    # the linear schedule has no such step.
    m.diffusion.schedule = 'linear'

  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.05
  c.optim.ema_decay = 0.999

  c.train.global_batch_size = 32
  c.train.num_steps = opts.steps
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  c.train.sample_every = 500
  c.train.eval_every = 500
  c.train.num_sample_images = 40

  # Generative metrics at the end: a small CNN trained on the train split (workdirs/demo/
  # feature_net) gives the feature space; 300 class-balanced samples (about the size of the
  # 297-image held-out split, which is scored the same way as the reference point).
  c.evaluator.features = 'feature_net'
  c.evaluator.at_end = True
  c.evaluator.real_baseline = True
  c.evaluator.num_samples = 300
  c.evaluator.reference_split = 'train'
  c.sample.num_per_class = 30
  c.sample.chunk_size = 100

  c.mesh.shape = (-1, 1, 1)
  return c
