"""Tokenizers for ImageNet 256: LlamaGen's VQ-16 (default) or MAR's KL-16, trained here.

  python -m heptapod_jax.main --config=configs/vq_imagenet256.py \
      --workdir=gs://BUCKET/vq16 --config.data.data_dir=gs://BUCKET/tfds
  python -m heptapod_jax.main --config=configs/vq_imagenet256.py:kind=kl --workdir=gs://BUCKET/kl16

The run ends by exporting `<workdir>/tokenizer`, which an AR recipe takes as
`--config.tokenizer.checkpoint=<workdir>/tokenizer`. Public weights instead:
`python -m heptapod_jax.tools.convert_llamagen_vq --src vq_ds16_c2i.pt --dst DIR`
(or `convert_mar_kl --src kl16.ckpt`).

Options:
  kind       vq | kl
  epochs     ImageNet epochs (LlamaGen trains VQ-16 for 40)
  batch      global batch
  runlocal   a few tiny steps on whatever data_dir holds, to check a set-up

Hyperparameters follow LlamaGen's VQ-16 training (the Heptapod paper says only that the
tokenizer is reconstruction-only): AdamW lr 1e-4, betas (0.9, 0.95), weight decay 0.05,
batch 128, L2 pixels + LPIPS-VGG (weight 1) + codebook/commitment (beta 0.25), PatchGAN
hinge loss (weight 0.5) from step 20,000, EMA 0.9999. For KL: the KL term at 1e-6 (LDM/MAR).

Hardware and time: NOT measured here (the CPU benchmark `benchmarks/tokenizer_throughput.py`
gives encode/decode speed only). Expected numbers, as the original papers report them for their
own checkpoints (not reproduced here): VQ-16 rFID 2.19 / PSNR 20.79 on ImageNet 256 val
(LlamaGen); KL-16 rFID 1.22 (MAR).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401

from heptapod_jax import config_lib  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None):
  opts = config_lib.parse_arg(arg, kind='vq', epochs=40, batch=128, runlocal=False)
  c = config_lib.tokenizer_base_config()
  c.data.source = 'imagenet2012'
  c.data.image_size = 256
  c.data.augment = 'flip'
  c.data.shuffle_buffer = 20_000
  c.data.eval_split = 'validation'

  c.tokenizer.kind = opts.kind
  c.tokenizer.vq.image_size = 256
  c.tokenizer.kl.image_size = 256

  c.loss.reconstruction = 'l2'
  c.loss.perceptual_weight = 1.0
  c.loss.codebook_weight = 1.0
  c.loss.kl_weight = 1e-6
  c.loss.disc_weight = 0.5
  c.loss.disc_start = 20_000
  c.loss.disc_loss = 'hinge'

  batch = 8 if opts.runlocal else opts.batch
  c.optim.lr = 1e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.05
  c.optim.ema_decay = 0.9999
  c.disc_optim.lr = 1e-4
  c.disc_optim.b1, c.disc_optim.b2 = 0.9, 0.95

  c.train.global_batch_size = batch
  c.train.num_steps = 10 if opts.runlocal else opts.epochs * IMAGENET_TRAIN_IMAGES // batch
  c.train.log_every = 1 if opts.runlocal else 100
  c.train.checkpoint_every = 5 if opts.runlocal else 5000
  c.train.eval_every = 0 if opts.runlocal else 20_000
  c.train.eval_batches = 2 if opts.runlocal else 50
  c.mesh.shape = (-1, 1, 1)
  c.mesh.rules_preset = 'data_only'
  return c
