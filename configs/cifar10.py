"""CIFAR-10 (or any 32x32 TFDS image data set) for a Colab GPU or TPU runtime: tokenizer + Heptapod.

Prepare the data once (TFDS downloads it; nothing is downloaded at run time):
  tfds build cifar10 --data_dir=$HOME/tensorflow_datasets
Then the two stages, from the repository root:
  python -m heptapod_jax.main --config=configs/cifar10.py:stage=tokenizer \
      --workdir=workdirs/cifar10/tokenizer
  python -m heptapod_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10
  python -m heptapod_jax.sample --checkpoint=workdirs/cifar10 --n=40 --out=cifar10.png
(`notebooks/cifar10.ipynb` runs the same stages with live loss plots.)

Grid: the VQ tokenizer has stride 4, so a 32x32 image is an 8x8 grid (N = 64 tokens) of
1,024 codes. Stride 8 (4x4) leaves each token 8x8 pixels, too coarse for CIFAR's detail;
stride 2 (16x16 = 256 tokens) multiplies the global 2D head's per-image work (it attends
over the whole grid at every step) by 16 for little gain at this resolution.

Sizes: tokenizer ch 64, ch_mult (1, 2, 2), L2 + LPIPS, no GAN, 3,000 steps of 128 (8
epochs). Heptapod: backbone 12 x 384 (6 heads), global 2D head 2 x 256, steps_per_image 4,
23.7M parameters, 6,000 steps of 128 (15 epochs), EMA 0.999. At the end: 5,000
class-balanced samples scored with FID, precision/recall and class accuracy in the
feature space of a small CNN trained on the train split (`evaluator.features=feature_net`;
reference: the train split's own statistics), and the held-out test images scored the
same way as the reference point.

Compute (measured here, analytic and XLA counts): 11.43 GFLOP per training image for the
model stage (backbone 8.38, 2D head 3.05), 7.85 GFLOP for the tokenizer stage (with LPIPS);
so 8.8 PFLOP and 3.0 PFLOP for the two stages. Time: NOT measured on a GPU or TPU (none was
available), estimated at an assumed 35% of peak: a T4 (float32, 8.1 TFLOP/s: Turing has no
bfloat16) about 52 min for the model and 18 min for the tokenizer; a v2-8 TPU runtime
(bfloat16, 180 TFLOP/s) about 2.5 min and 1 min. For an hour on a v2-8, train longer:
`:dtype=bfloat16,batch=512,steps=40000` (about 62 min, estimated) and the tokenizer with
`:stage=tokenizer,dtype=bfloat16,batch=512,steps=10000` (about 6 min, estimated).

Options (`--config=configs/cifar10.py:stage=tokenizer,dtype=bfloat16`):
  stage      model | tokenizer
  head       global | local | next_token
  steps      training steps (0 = the stage's default)
  batch      global batch (0 = the stage's default)
  dtype      float32 | bfloat16   compute dtype
  name       the TFDS data set ('cifar10'; any data set of >= 32x32 images, e.g. 'svhn_cropped')
  classes    its number of classes (10)
  data_dir   where it is prepared ('' = TFDS's default, ~/tensorflow_datasets)
  workdir    the run directory the model stage finds the tokenizer in (workdirs/cifar10)
  tiny       CPU-sized widths and a few steps (the notebook's CPU runtime and its test)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from heptapod_jax import config_lib  # noqa: E402


def _data(c, opts) -> None:
  c.data.source = 'tfds'
  c.data.name = opts.name
  c.data.data_dir = opts.data_dir or None
  c.data.image_size = 32
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.augment = 'flip'
  c.data.shuffle_buffer = 50_000


def _tokenizer_config(opts):
  c = config_lib.tokenizer_base_config()
  _data(c, opts)
  c.tokenizer.kind = 'vq'
  v = c.tokenizer.vq
  v.image_size = 32
  v.ch_mult = (1, 2, 2)  # Stride 4: an 8x8 grid.
  v.codebook_size = 1024
  v.codebook_embed_dim = 8
  v.dtype = opts.dtype
  if opts.tiny:
    v.ch, v.num_res_blocks, v.dec_num_res_blocks, v.z_channels = 32, 1, 1, 32
    v.codebook_size = 64
  else:
    v.ch, v.num_res_blocks, v.dec_num_res_blocks, v.z_channels = 64, 2, 2, 64
  c.loss.reconstruction = 'l2'
  c.loss.perceptual_weight = 0.0 if opts.tiny else 0.5
  c.loss.disc_weight = 0.0
  c.optim.lr = 2e-3 if opts.tiny else 2e-4
  c.optim.warmup_steps = 10 if opts.tiny else 500
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.99 if opts.tiny else 0.999
  c.train.global_batch_size = opts.batch or (8 if opts.tiny else 128)
  c.train.num_steps = opts.steps or (30 if opts.tiny else 3000)
  c.train.log_every = 10 if opts.tiny else 200
  c.train.checkpoint_every = c.train.num_steps if opts.tiny else 1000
  c.train.keep_checkpoints = 1
  c.train.eval_batches = 2 if opts.tiny else 0
  c.train.num_recon_images = 16
  return c


def _model_config(opts):
  c = common.base_config()
  common.apply_size(c, 'tiny')
  c.seed = 0
  _data(c, opts)
  c.tokenizer.kind = 'vq'
  c.tokenizer.checkpoint = os.path.join(opts.workdir, 'tokenizer', 'tokenizer')
  m = c.model
  m.vocab_size = 64 if opts.tiny else 1024
  m.grid_size = (8, 8)
  m.num_classes = opts.classes
  m.dtype = opts.dtype
  if not opts.tiny:
    b, h = m.backbone, m.head
    b.width, b.depth, b.num_heads, b.mlp_multiple_of = 384, 12, 6, 64
    h.width, h.depth, h.num_heads, h.mlp_multiple_of = 256, 2, 4, 64
  m.head.kind = opts.head
  m.head.steps_per_image = 4 if opts.head != 'next_token' else -1
  m.head.targets_per_step = -1
  m.head.window = 8
  m.backbone.dropout = 0.1
  m.head.dropout = 0.1

  c.optim.lr = 1e-3 if opts.tiny else 4e-4
  c.optim.warmup_steps = 10 if opts.tiny else 500
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 0.05
  c.optim.weight_decay = 0.05
  c.optim.ema_decay = 0.99 if opts.tiny else 0.999

  t = c.train
  t.global_batch_size = opts.batch or (8 if opts.tiny else 128)
  t.num_steps = opts.steps or (30 if opts.tiny else 6000)
  t.log_every = 10 if opts.tiny else 200
  t.checkpoint_every = t.num_steps if opts.tiny else 2000
  t.keep_checkpoints = 2
  t.sample_every = 0 if opts.tiny else 2000
  t.eval_every = 0 if opts.tiny else 2000
  t.eval_batches = 2 if opts.tiny else 0
  t.num_sample_images = 20 if opts.tiny else 40

  e = c.evaluator
  e.features = 'feature_net'
  e.feature_net_steps = 20 if opts.tiny else 1000
  e.at_end = True
  e.real_baseline = True
  e.num_samples = 40 if opts.tiny else 5000
  e.reference_split = 'train'
  e.batch_size = 20 if opts.tiny else 500
  c.sample.num_per_class = 4 if opts.tiny else 500
  c.sample.chunk_size = 20 if opts.tiny else 500
  c.mesh.shape = (-1, 1, 1)
  return c


def get_config(arg: str | None = None):
  opts = config_lib.parse_arg(arg, stage='model', head='global', steps=0, batch=0,
                              dtype='float32', name='cifar10', classes=10, data_dir='',
                              workdir='workdirs/cifar10', tiny=False)
  if opts.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"configs/cifar10.py option dtype={opts.dtype!r} is not one of "
                     "['float32', 'bfloat16'].")
  if opts.stage == 'tokenizer':
    return _tokenizer_config(opts)
  if opts.stage == 'model':
    return _model_config(opts)
  raise ValueError(f"configs/cifar10.py option stage={opts.stage!r} is not one of "
                   "['model', 'tokenizer'].")
