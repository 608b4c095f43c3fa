"""The demo's tokenizer: a small VQ autoencoder on the built-in digits (first stage of `make demo`).

  python -m heptapod_jax.main --config=configs/vq_demo.py --workdir=workdirs/demo/tokenizer

Architecture: LlamaGen's VQ design at toy width (ch 32, ch_mult (1, 2, 2): stride 4, so a
32x32 digit becomes an 8x8 grid), 64 l2-normalised codes of dimension 8. Loss: L2 pixels +
codebook/commitment; LPIPS and the PatchGAN are available (config.loss) but off here,
because VGG16 on every step would dominate a CPU budget of about a minute.

Hardware: any CPU; 400 steps of batch 16 take about 1 min 40 s on a 2-core machine (of
which ~35 s are start-up, compilation and the evaluation). Measured: held-out PSNR 29.4 dB,
SSIM 0.917, 29 of the 64 codes in use (perplexity 17.0).

`kind=kl` trains the continuous-token variant instead (a KL autoencoder, 4 latent channels
per grid position) for configs/demo.py:tokenizer=kl:
  python -m heptapod_jax.main --config=configs/vq_demo.py:kind=kl --workdir=workdirs/demo_kl/tokenizer
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (keeps the recipes importable the same way)

from heptapod_jax import config_lib  # noqa: E402


def get_config(arg: str | None = None):
  opts = config_lib.parse_arg(arg, steps=400, codes=64, kind='vq')
  c = config_lib.tokenizer_base_config()
  c.data.source = 'builtin_digits'
  c.data.image_size = 32
  c.data.augment = 'none'
  c.data.shuffle_buffer = 2000

  c.tokenizer.kind = 'vq'
  v = c.tokenizer.vq
  v.image_size = 32
  v.ch = 32
  v.ch_mult = (1, 2, 2)
  v.num_res_blocks = 1
  v.dec_num_res_blocks = 1
  v.z_channels = 32
  v.codebook_size = opts.codes
  v.codebook_embed_dim = 8
  if opts.kind == 'kl':
    # The continuous-token variant: the same encoder/decoder widths as a KL autoencoder with
    # 4 latent channels per position (8x8 grid), for configs/demo.py:tokenizer=kl.
    c.tokenizer.kind = 'kl'
    k = c.tokenizer.kl
    k.image_size = 32
    k.ch = 32
    k.ch_mult = (1, 2, 2)
    k.num_res_blocks = 1
    k.dec_num_res_blocks = 1
    k.embed_dim = 4
    k.encoder_attn_levels = (-1,)
    c.loss.kl_weight = 1e-6
  elif opts.kind != 'vq':
    raise ValueError(f"configs/vq_demo.py option kind={opts.kind!r} is not one of ['vq', 'kl'].")

  c.loss.reconstruction = 'l2'
  c.loss.perceptual_weight = 0.0
  c.loss.disc_weight = 0.0

  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 0.1
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.99

  c.train.global_batch_size = 16
  c.train.num_steps = opts.steps
  c.train.log_every = 100
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 1
  c.train.num_recon_images = 16
  return c
