"""Heptapod on ImageNet 256x256, class-conditional, no guidance: the paper's recipe family.

Options (`--config=configs/imagenet256.py:size=L,head=global`):
  size             B | L | XL | H            model size preset (heptapod_jax/presets.py)
  head             global | local | next_token   2D head (paper) or the 1D baseline
  steps_per_image  steps t drawn per image for the 2D head (the head's cost scales with it)
  window           prediction window of the local head
  epochs           training length in ImageNet epochs (paper: 800)
  batch            global batch size
  tokens           vq | kl   discrete VQ-16 codes (cross-entropy) or continuous KL-16 latents
                   (MAR's diffusion loss on the 2D head; tokenizer: convert_mar_kl or
                   configs/vq_imagenet256.py:kind=kl)
  runlocal         a few tiny steps, to check a machine's set-up

Command (TPU pod; see launch/ for the pod scripts):
  python -m heptapod_jax.main --config=configs/imagenet256.py:size=H,head=global \
      --workdir=gs://BUCKET/heptapod-H --config.data.data_dir=gs://BUCKET/tfds \
      --config.tokenizer.checkpoint=gs://BUCKET/vq16/tokenizer

Data: TFDS `imagenet2012` prepared from the manual download (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in <data_dir>/downloads/manual); ADM center crop to 256, random flip.
Tokenizer: VQ-16 (16x16 grid of a 16384-entry codebook): train it with
configs/vq_imagenet256.py or import LlamaGen's vq_ds16_c2i.pt with
heptapod_jax.tools.convert_llamagen_vq, and pass its directory as
--config.tokenizer.checkpoint. At scale, tokenize the data set once
(heptapod_jax.tools.tokenize_dataset, ten-crop + flip as LlamaGen) and train from codes with
--config.data.tokenized_dir=DIR --config.data.augment=ten_crop.

Hyperparameters: the paper's method section is not available to us, so these follow MAR's
recipe for a bidirectional/causal generator of this size: AdamW (0.9, 0.95), weight decay 0.02,
lr = 1e-4 * batch / 256 after 100 epochs of linear warmup, constant, EMA 0.9999, batch 2048,
800 epochs = 500,460 steps.

Hardware and time (ESTIMATES, not measured runs): analytic training FLOPs per image
(heptapod_jax/flops.py: fwd + bwd, steps_per_image 4, tokenizer and optimizer excluded;
checked against XLA's count in tests/test_flops.py) converted to 800 epochs at an assumed 40%
MFU on a TPU v5e-256 (197 bf16 TFLOP/s per chip):
  size  head        TFLOP/image  est. days on v5e-256   head share
  B     global         0.24        0.14     (next_token 0.16 TFLOP/image)   41%
  L     global         0.68        0.40     (next_token 0.52)               28%
  XL    global         1.36        0.80     (next_token 1.06)               24%
  H     global         1.80        1.06     (next_token 1.39)               25%
The global head's cost scales linearly with steps_per_image (benchmarks/scaling.py). Why 4
steps and B's 2-layer head: benchmarks/train_throughput.py --ablation measured the global step
at 1.73x the next_token step with this setting on the B backbone (2.23x with 4 layers, 3.52x
at 8 steps), within the 2x budget. Per-device memory of every size on v5e-256 / v5p-128:
`python -m heptapod_jax.tools.aot_compile --config=configs/imagenet256.py --topology=v5e-256`.

Evaluation (ADM protocol: 50 samples per class, no guidance, against ADM's reference batch):
  python -m heptapod_jax.tools.convert_inception --src pt_inception-2015-12-05-6726825d.pth \
      --dst inception_fid.npz
  python -m heptapod_jax.main --mode=sample --config=configs/imagenet256.py:size=H \
      --workdir=gs://BUCKET/heptapod-H --config.tokenizer.checkpoint=gs://BUCKET/vq16/tokenizer \
      --config.evaluator.features=inception --config.evaluator.inception_weights=inception_fid.npz \
      --config.evaluator.reference=VIRTUAL_imagenet256_labeled.npz
writes <workdir>/samples_<step>_seed0/samples_50000x256x256x3.npz (ADM's format, also readable
by ADM's own evaluator) and metrics.json. During training, --config.evaluator.every_steps=K
(with features/weights/reference as above) logs FID on config.evaluator.num_samples (5,000).

Expected numbers (the paper's, not reproduced here): Heptapod-H (941M parameters), FID 2.70,
IS 229.8 on ImageNet 256 without classifier-free guidance.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from heptapod_jax import config_lib  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None):
  opts = config_lib.parse_arg(arg, size='B', head='global', steps_per_image=4, window=32,
                              tokens='vq', epochs=800, batch=2048, runlocal=False)
  c = common.base_config()
  common.apply_size(c, 'tiny' if opts.runlocal else opts.size)
  c.seed = 0

  c.data.source = 'imagenet2012'
  c.data.image_size = 256
  c.data.augment = 'flip'  # 'ten_crop' for LlamaGen's augmentation
  c.data.shuffle_buffer = 20_000
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'

  if opts.tokens not in ('vq', 'kl'):
    raise ValueError(f"configs/imagenet256.py option tokens={opts.tokens!r} is not one of ['vq', 'kl'].")
  c.tokenizer.kind = opts.tokens

  m = c.model
  m.vocab_size = 16384
  m.grid_size = (16, 16)
  m.num_classes = 1000
  m.head.kind = opts.head
  m.head.steps_per_image = opts.steps_per_image if opts.head != 'next_token' else -1
  m.head.targets_per_step = -1
  m.head.window = opts.window
  m.head.visible_context = True
  m.backbone.class_prefix_len = 1
  m.backbone.dropout = 0.1
  m.backbone.token_dropout = 0.1
  m.dtype = 'bfloat16'
  m.param_dtype = 'float32'
  m.remat_policy = 'dots_no_batch' if opts.size in ('XL', 'H') else 'none'
  # Splash attention on TPU, cuDNN flash attention on GPU (bf16), XLA elsewhere.
  m.attention_impl = 'auto'
  if opts.tokens == 'kl':
    # MAR's continuous setting: KL-16 latents (16 channels, scaled by 0.2325), a diffusion MLP
    # of 3 adaLN blocks (MAR: width 1024 for B/L, 1280 for H), 4 noise draws per target,
    # 100 DDPM steps at sampling.
    m.tokens = 'kl'
    m.token_dim = 16
    m.diffusion.width = 1280 if opts.size in ('XL', 'H') else 1024
    m.diffusion.depth = 3
    m.diffusion.batch_mul = 4
    m.diffusion.num_sampling_steps = 100
    c.tokenizer.latent_scale = 0.2325

  batch = 8 if opts.runlocal else opts.batch
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
  c.optim.lr = 1e-4 * batch / 256
  c.optim.warmup_steps = 100 * steps_per_epoch if not opts.runlocal else 2
  c.optim.schedule = 'constant'
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.02
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.9999

  c.train.global_batch_size = batch
  c.train.num_steps = 10 if opts.runlocal else opts.epochs * steps_per_epoch
  c.train.log_every = 1 if opts.runlocal else 100
  c.train.checkpoint_every = 5 if opts.runlocal else 5000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 0 if opts.runlocal else 25_000
  c.train.eval_every = 0
  c.train.eval_batches = 2 if opts.runlocal else 10
  c.train.num_sample_images = 40

  # Data parallel for B; ZeRO-3 style FSDP for L/XL/H (parameters, gradients and optimizer
  # state sharded over all chips). `python -m heptapod_jax.tools.aot_compile --topology=v5e-256`:
  # L data-parallel needs 16.0 GiB of v5e's 15.75 GiB per chip; FSDP brings it to 10.2 GiB.
  c.mesh.shape = (1, -1, 1) if opts.size in ('L', 'XL', 'H') else (-1, 1, 1)
  c.mesh.rules_preset = 'fsdp'
  return c
