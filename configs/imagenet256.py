"""Heptapod on ImageNet 256x256, class-conditional, no guidance: the paper's recipe family.

Options (`--config=configs/imagenet256.py:size=L,head=local,window=16`), one switch per ablation:
  size              B | L | XL | H           model size preset (heptapod_jax/presets.py)
  head              global | local | next_token   2D prediction (paper: global) or the 1D
                    next-token baseline (2D vs 1D)
  window            prediction window of the local head (default 32)
  steps_per_image   steps t drawn per image for the 2D head (default 4; cost is linear in it)
  targets_per_step  supervision density: targets drawn per step (-1 = every remaining position)
  visible_context   true | false   the global head also sees the already-visible positions
  loss_weighting    pairs | steps   every (step, target) pair alike (default) or every step alike
  next_weight       lambda >= 0: the next position's loss added with this weight (default 0)
  condition         context | add   h_t reaches the 2D head through one context token (paper)
                    or is also added to every grid token
  direct_next       true | false   h_t also projected straight onto the next position's output
                    (these four are studied on the digits by benchmarks/objective_study.py,
                    3 seeds each; docs/objective-study.md. There: direct_next
                    cuts the held-out NLL by 0.27 nats/token (1.56 -> 1.29, 17%) with FID
                    unchanged within the seeds' spread; condition=add moves neither much;
                    next_weight=1 with loss_weighting=steps buys NLL with a worse FID, alone
                    it is worse on both; loss_weighting=steps alone is worse on FID. The
                    defaults stay the paper's design. ImageNet may differ.)
  tokens            vq | kl   VQ-16 codes (cross-entropy) or KL-16 latents (MAR's diffusion loss)
                    (on the digits, 3 seeds at 600 steps: with KL tokens the 1D baseline
                    leads the global head on diffusion loss and FID, as with VQ tokens; the
                    best sampling temperature of 0.8-1.1 moves no head's FID beyond the
                    spread, so sampling.temperature and model.diffusion.temperature stay 1;
                    docs/objective-study.md#each-head-at-its-best-temperature)
  tokenizer         imported | trained   sets tokenizer.checkpoint to <tokenizer_root>/...:
                    imported = LlamaGen VQ-16 / MAR KL-16 converted once
                    (python -m heptapod_jax.tools.convert_llamagen_vq --src vq_ds16_c2i.pt
                    --dst <root>/llamagen_vq16; convert_mar_kl --src kl16.ckpt --dst
                    <root>/mar_kl16); trained = configs/vq_imagenet256.py run with
                    --workdir=<root>/vq16 (or :kind=kl, <root>/kl16). Unset: pass
                    --config.tokenizer.checkpoint yourself.
  tokenizer_root    directory or bucket of the tokenizers (default tokenizers/)
  epochs            ImageNet epochs (paper: 800)
  batch             global batch (default 2048; lr scales as 1e-4 * batch / 256)
  runlocal          the tiny model for a few steps, to check a machine's set-up

TPU pod (launch/tpu_vm.sh creates the slice, installs, runs on every worker in tmux):
  launch/tpu_vm.sh run configs/imagenet256.py:size=H,tokenizer=imported,tokenizer_root=gs://B/tok \
      gs://B/heptapod-H --config.data.data_dir=gs://B/tfds
GPU node (8 GPUs, one process; launch/slurm.sbatch for several nodes):
  launch/gpu.sh run configs/imagenet256.py:size=B,tokenizer=imported,tokenizer_root=/data/tok \
      workdirs/heptapod-B --config.data.data_dir=/data/tfds
Both end in `python -m heptapod_jax.main --config=... --workdir=...`; see docs/pods.md.

Global batch 2048 for every size; 800 epochs = 800 x (1,281,167 // 2048) = 500,000 steps.
Data: TFDS `imagenet2012` prepared from the manual download (ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in <data_dir>/downloads/manual); ADM center crop to 256, random flip.
At scale, tokenize the data set once (heptapod_jax.tools.tokenize_dataset, ten-crop + flip as
LlamaGen) and train from codes with --config.data.tokenized_dir=DIR --config.data.augment=ten_crop.

Hyperparameters: the paper's method section is not available to us, so these follow MAR's
recipe for a bidirectional/causal generator of this size: AdamW (0.9, 0.95), weight decay 0.02,
lr = 1e-4 * batch / 256 after 100 epochs of linear warmup, constant, EMA 0.9999.

Parameters, training FLOPs and wall time of the family (analytic FLOPs of heptapod_jax/flops.py,
fwd + bwd, tokenizer and optimizer excluded, checked against XLA's count in tests/test_flops.py;
tests/test_recipes.py checks that this table is what the tool prints):
ESTIMATED days at an assumed 40% MFU (not measured; python -m heptapod_jax.tools.recipes):
  options                          params TFLOP/img   steps  v5e-256  v5p-128   8xH100
  size=B                             114M     0.235  500000     0.14     0.12     0.88
  size=L                             356M     0.681  500000     0.40     0.34     2.55
  size=XL                            725M     1.363  500000     0.80     0.69     5.11
  size=H                             947M     1.800  500000     1.06     0.91     6.74
  size=B,head=local                  116M     0.153  500000     0.09     0.08     0.57
  size=B,head=local,window=16        116M     0.146  500000     0.09     0.07     0.55
  size=B,head=next_token             111M     0.157  500000     0.09     0.08     0.59
  size=B,targets_per_step=16         114M     0.187  500000     0.11     0.09     0.70
  size=B,visible_context=false       114M     0.235  500000     0.14     0.12     0.88
  size=B,tokens=kl                   113M     0.668  500000     0.39     0.34     2.50
Measured here, on a 2-core CPU only: the B train step at ImageNet shapes (float32, batch 8)
runs at MFU 0.63 with the next_token head and 0.60 with the global one
(benchmarks/train_throughput.py); no accelerator run exists yet, so the 40% above is an
assumption. Why 4 steps and B's 2-layer head: benchmarks/train_throughput.py --quick measured
the global step at 1.38x the next_token step with this setting (1.57x with a 4-layer head,
1.81x at 8 steps; docs/benchmarks.md). Per-device memory of every size on v5e-256 / v5p-128:
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

The paper's numbers (not reproduced here): Heptapod-H (941M parameters), FID 2.70, IS 229.8 on
ImageNet 256 without classifier-free guidance. No other recipe has a number in the paper's
abstract or figure captions.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from heptapod_jax import config_lib  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
# Where option tokenizer=... looks, under option tokenizer_root (a local directory or a bucket).
# imported: the public weights converted once (heptapod_jax.tools.convert_llamagen_vq /
# convert_mar_kl --dst <root>/<dir>); trained: the export of configs/vq_imagenet256.py run with
# --workdir=<root>/vq16 (or :kind=kl, --workdir=<root>/kl16).
TOKENIZER_DIRS = {'imported': {'vq': 'llamagen_vq16', 'kl': 'mar_kl16'},
                  'trained': {'vq': 'vq16/tokenizer', 'kl': 'kl16/tokenizer'}}


def get_config(arg: str | None = None):
  opts = config_lib.parse_arg(arg, size='B', head='global', steps_per_image=4, window=32,
                              targets_per_step=-1, visible_context=True,
                              loss_weighting='pairs', next_weight=0.0, condition='context',
                              direct_next=False, tokens='vq',
                              tokenizer='', tokenizer_root='tokenizers', epochs=800,
                              batch=2048, runlocal=False)
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
    raise ValueError(f"configs/imagenet256.py option tokens={opts.tokens!r} is not one of "
                     "['vq', 'kl'].")
  if opts.tokenizer and opts.tokenizer not in TOKENIZER_DIRS:
    raise ValueError(f'configs/imagenet256.py option tokenizer={opts.tokenizer!r} is not one of '
                     f'{sorted(TOKENIZER_DIRS)} (or unset: pass --config.tokenizer.checkpoint).')
  c.tokenizer.kind = opts.tokens
  if opts.tokenizer:
    c.tokenizer.checkpoint = (f'{opts.tokenizer_root}/'
                              f'{TOKENIZER_DIRS[opts.tokenizer][opts.tokens]}')

  m = c.model
  m.vocab_size = 16384
  m.grid_size = (16, 16)
  m.num_classes = 1000
  m.head.kind = opts.head
  m.head.steps_per_image = opts.steps_per_image if opts.head != 'next_token' else -1
  m.head.targets_per_step = opts.targets_per_step
  m.head.window = opts.window
  m.head.visible_context = opts.visible_context
  m.head.loss_weighting = opts.loss_weighting
  m.head.next_weight = float(opts.next_weight)
  m.head.condition = opts.condition
  m.head.direct_next = opts.direct_next
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
