"""Compiles the train step for a TPU topology without the hardware: per-device memory, FLOPs.

  python -m heptapod_jax.tools.aot_compile --config=configs/imagenet256.py --topology=v5e-256 \
      --sizes=B,L,XL,H
  python -m heptapod_jax.tools.aot_compile --config=configs/imagenet256.py:size=H \
      --topology=v5p-128 --config.model.remat_policy=full --config.mesh.shape=4,-1,1 \
      --json=/tmp/aot_H.json
  python -m heptapod_jax.tools.aot_compile --config=configs/imagenet256.py:size=L \
      --topology=v5e:8x16 --num_slices=2 --config.mesh.dcn_shape=2,1,1

The CLI is heptapod_jax.main's (`--config=FILE[:options]`, `--config.a.b=value`),
plus `--topology`: a Cloud TPU name (v5e-256 = v5litepod-256, v6e-256: chips;
v4-64, v5p-128: TensorCores, i.e. 2 x chips) or libtpu's `version:shape`
(v5e:16x16, v5p:4x4x4, v4:2x4x4). `--sizes=B,L,XL,H` (or `all`) reloads the
recipe with `size=X` for each row (the recipe's per-size mesh and remat
included) and applies the `--config.*` overrides to every row; without it the
one configuration of `--config` is compiled.

What is compiled is exactly the trainer's step (`steps.train_step`, jitted
with the state/batch shardings and donation of `train.train_and_evaluate`) on
pre-tokenized batches (`config.data.tokenized_dir`: VQ codes, or KL moments
for `tokens=kl`); encoding images on the fly would add the tokenizer's encoder,
which is not included. The tokenizer checkpoint is not needed.

Per device, each row reports (batch/dev: examples per device, /K with K microbatches):
  params, opt+EMA  exact: the shard of every leaf of the TrainState under its
                   NamedSharding (optimizer moments and EMA parameters together);
  batch            the shard of the batch arrays;
  temp             XLA's temporaries (activations kept for the backward pass,
                   gradients, collective buffers), from `memory_analysis()`;
  total            arguments + outputs - donated aliases + temporaries + code, from
                   `memory_analysis()` (the arguments also hold layout padding: the
                   JSON has both figures);
  HBM              what the TPU compiler lets one device use (read from its
                   out-of-memory verdict on a probe program, since compile-only
                   devices report no memory size; --hbm_gib overrides it).
A configuration that does not fit is said so, with the memory XLA asked for and
the knobs that reduce it; the exit status is then 2 (0 when every row fits).

FLOPs per step come from XLA's cost analysis of the same step (global batch,
accumulation folded into one pass) lowered on the host with every layer scan
unrolled and XLA attention: the compiled TPU program's own count sees each
`nn.scan` body once, and Pallas kernels (splash attention) not at all. Causal
attention is counted dense; rematerialised forward passes are included.
TFLOP/dev is that total over the devices.

`--program=sample` compiles the sampler instead: `sampling.sample` (incremental decoding,
`config.sampling`'s settings) from class labels to token grids for
`--sample_batch_per_device` images per device, jitted as sample mode runs it: parameters
under the train state's shardings (the EMA parameters are those), labels and per-sample
key indices sharded over the data axes. Per device: params (the shard), cache (the KV
cache and the head's decoding state, exact from their shapes), temp and total from
`memory_analysis()` (temp holds the per-layer copy of the kernels that decoding makes once
per call, in the compute dtype, and the cache), and XLA's cost estimate of one decoding step
(the loop body: the head's prediction and feeding the sampled tokens, compiled for the
target with the same shardings and XLA attention, since the count cannot see inside the
Pallas splash kernel): GFLOP/step and GB/step per device, next to the analytic
FLOPs of a step (heptapod_jax/flops.py) and the bytes it must read at the least
(flops.sampling_bytes_per_step).

Compile time, measured on a 2-core host: 40 to 100 s per size, about 4 minutes
for B..H on v5e-256 or v5p-128 (peak memory 5 GB); a configuration that does not
fit fails within seconds. The tests use the tiny preset on v5e:2x2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from heptapod_jax.storage import paths

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file (configs/*.py[:options]).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    'topology', None, 'Target TPU slice: v5e-256, v5litepod-256, v6e-256, v5p-128, v4-64, or '
    'libtpu\'s version:shape (v5e:16x16, v5p:4x4x4, v4:2x4x4).')
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, 'Slices of that topology (multi-slice over DCN; set --config.mesh.dcn_shape '
    'to match).')
_SIZES = flags.DEFINE_list('sizes', [], 'Size presets, one row each (recipe option size=X), or '
                           '"all" (B,L,XL,H); empty = the configuration of --config as given.')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 0.0, 'Usable HBM per device in GiB; 0 = what the TPU '
                              'compiler allows for the target.')
_JSON = flags.DEFINE_string('json', None, 'Also write the table (and raw figures) to this file.')
_PROGRAM = flags.DEFINE_enum('program', 'train', ['train', 'sample'], "What to compile: the "
                             "trainer's step, or the sampler's jitted loop (sample mode's "
                             "`sampling.sample` from labels to token grids).")
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch_per_device', 256, '--program=sample: images '
                                     'per device in one sampling call.')
flags.mark_flags_as_required(['config', 'topology'])

ALL_SIZES = ('B', 'L', 'XL', 'H')
GIB = 2**30

# Cloud TPU accelerator names: family -> (libtpu version name, TensorCores counted per chip in
# the name, dimensions of the slice's torus).
_FAMILIES = {
    'v5e': ('v5e', 1, 2),
    'v5litepod': ('v5e', 1, 2),
    'v6e': ('v6e', 1, 2),
    'v4': ('v4', 2, 3),
    'v5p': ('v5p', 2, 3),
}
_MAX_2D_CHIPS = 256  # v5e / v6e single slices end at 16x16.
_VALID_NAMES = ("a Cloud TPU name: v5e-N or v5litepod-N and v6e-N (N chips: 1, 4, 8, 16, ..., "
                "256), v4-N and v5p-N (N TensorCores = 2 x chips: 8, 16, 32, 64, 128, ...), e.g. "
                "v5e-256, v5p-128, v4-64, v6e-256; or libtpu's version:shape in chips, e.g. "
                "v5e:16x16, v6e:8x8, v5p:4x4x4, v5p:4x4x12, v4:2x4x4")
# Nominal HBM per chip (= per JAX device: v4 and v5p run as megacore), used only when the
# compiler's own limit cannot be read.
_NOMINAL_HBM_GIB = {'TPU v4': 32, 'TPU v5 lite': 16, 'TPU v5': 95, 'TPU v6 lite': 32}


# --------------------------------------------------------------------------- topology


@dataclasses.dataclass(frozen=True)
class Topology:
  """A target TPU slice as libtpu names it."""
  name: str  # As the user gave it.
  libtpu_name: str  # 'v5e:16x16'
  chips: int
  options: tuple[tuple[str, str], ...] = ()  # Extra get_topology_desc arguments.


def _standard_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Slice shape of `chips` chips, as Cloud TPU lays them out: 2D 2x2, 2x4, 4x4, ..., 16x16;
  3D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (double the smallest side, the last one
  among equals)."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    i = max(range(dims), key=lambda k: (-shape[k], k))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str) -> Topology:
  """'v5e-256' / 'v5p-128' / 'v5e:16x16' -> Topology; ValueError lists the valid forms."""
  text = name.strip().lower()
  cloud = re.fullmatch(r'([a-z0-9]+)-(\d+)', text)
  raw = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)+)', text)
  if cloud and cloud.group(1) in _FAMILIES:
    version, per_chip, dims = _FAMILIES[cloud.group(1)]
    count = int(cloud.group(2))
    chips = count // per_chip
    power_of_two = chips >= 1 and chips & (chips - 1) == 0
    if (count % per_chip or not power_of_two or (dims == 3 and chips < 4)
        or (dims == 2 and (chips == 2 or chips > _MAX_2D_CHIPS))):
      raise ValueError(f'--topology={name}: no such {cloud.group(1)} slice; give {_VALID_NAMES}.')
    shape = 'x'.join(str(s) for s in _standard_shape(chips, dims))
    libtpu_name = f'{version}:{shape}'
  elif raw:
    version = 'v5e' if raw.group(1) == 'v5litepod' else raw.group(1)
    libtpu_name = f'{version}:{raw.group(2)}'
    chips = math.prod(int(s) for s in raw.group(2).split('x'))
  else:
    raise ValueError(f'--topology={name!r} is not {_VALID_NAMES}.')
  # One JAX device per v4 chip (megacore), as JAX runs v4; libtpu's default is one per core.
  options = (('chip_config_name', 'megacore'),) if libtpu_name.startswith('v4:') else ()
  return Topology(name=name, libtpu_name=libtpu_name, chips=chips, options=options)


@contextlib.contextmanager
def _libtpu_environment():
  """libtpu as a compile-only library on a host without TPUs: let it load beside another
  libtpu process (its machine-wide lock file guards chips a compile never touches) and give
  it a worker list (else it logs a failed metadata-server lookup). Restored afterwards;
  values already set (a real TPU VM) are kept."""
  wanted = {'ALLOW_MULTIPLE_LIBTPU_LOAD': '1', 'TPU_WORKER_HOSTNAMES': 'localhost'}
  saved = {k: os.environ.get(k) for k in wanted}
  for key, value in wanted.items():
    os.environ.setdefault(key, value)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def topology_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
  """The compile-only devices of `num_slices` slices of `topology` (libtpu, no TPU needed)."""
  import jax
  from jax.experimental import topologies
  if importlib.util.find_spec('libtpu') is None and not os.environ.get('TPU_LIBRARY_PATH'):
    raise RuntimeError('Ahead-of-time compilation for TPU needs libtpu, the TPU compiler: '
                       '`pip install libtpu` at the version of requirements-dev.txt (it runs on '
                       'any Linux x86-64 host, no TPU needed).')
  kwargs = dict(topology.options)
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  try:
    with _libtpu_environment():
      devices = list(topologies.get_topology_desc(topology_name=topology.libtpu_name,
                                                  platform='tpu', **kwargs).devices)
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f'--topology={topology.name} ({topology.libtpu_name}): libtpu does not '
                     f'know it ({str(e).splitlines()[0]}); give {_VALID_NAMES}.') from None
  return devices


_HBM_OOM = re.compile(r'required for [\w ]+\(([\d.]+)([KMGT]?)\) exceeds available HBM '
                      r'\(([\d.]+)([KMGT]?)\)')
_HBM_USED = re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm')
_UNIT = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def parse_hbm_oom(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from the TPU compiler's out-of-memory error, or None."""
  match = _HBM_OOM.search(message) or _HBM_USED.search(message)
  if not match:
    return None
  need, need_unit, have, have_unit = match.groups()
  return int(float(need) * _UNIT[need_unit]), int(float(have) * _UNIT[have_unit])


def hbm_limit(device: Any) -> tuple[int, str]:
  """(bytes of HBM one device may use, where the figure comes from).

  An attached device reports its `bytes_limit`. Compile-only devices report
  nothing, so the limit is read from the TPU compiler's verdict on a probe
  program with a 1 TiB output (compiling it takes milliseconds); if that
  message cannot be read, the chip's nominal HBM.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  try:
    return int(device.memory_stats()['bytes_limit']), 'device memory_stats'
  except Exception:  # Compile-only devices: "only supported for addressable PjRt devices".
    pass
  mesh = jax.sharding.Mesh(np.array([device]), ('x',))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  probe = jax.jit(lambda x: jnp.broadcast_to(x, (2**18, 2**20)), in_shardings=one,
                  out_shardings=one)
  try:
    probe.lower(jax.ShapeDtypeStruct((2**20,), jnp.float32)).compile()
  except jax.errors.JaxRuntimeError as e:
    parsed = parse_hbm_oom(str(e))
    if parsed:
      return parsed[1], 'TPU compiler limit'
  nominal = _NOMINAL_HBM_GIB.get(device.device_kind)
  if nominal is None:
    raise ValueError(f'HBM of a {device.device_kind!r} device is unknown: pass --hbm_gib.')
  return nominal * GIB, 'nominal HBM of the chip'


# --------------------------------------------------------------------------- configs


def load_config(config_file: str, overrides: dict[str, Any] | None = None,
                size: str | None = None):
  """The ConfigDict of `config_file` ('configs/x.py[:options]', as --config takes it), with the
  recipe option size=`size` replacing any given one, and the flat `--config.*` overrides."""
  path, _, arg = config_file.partition(':')
  options = [o for o in arg.split(',') if o.strip()]
  if size is not None:
    options = [o for o in options if o.split('=')[0].strip() != 'size'] + [f'size={size}']
  spec = importlib.util.spec_from_file_location('aot_recipe', path)
  if spec is None:
    raise ValueError(f'--config={config_file}: cannot load {path}.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    config = module.get_config(','.join(options) or None)
  except ValueError as e:
    if size is not None and "'size'" in str(e):
      raise ValueError(f'--sizes needs a recipe with a size option; {path}: {e}') from None
    raise
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  return config


def model_config(config):
  """The validated ModelConfig (`config_lib.validate` reads no file). A tokenizer checkpoint is
  not needed to compile from pre-tokenized batches; when the config names one, the model is
  also checked against it."""
  from heptapod_jax import config_lib
  from heptapod_jax.tokenizer_checkpoint import check_model_config
  model = config_lib.validate(config)
  if config.tokenizer.kind in ('vq', 'kl') and config.tokenizer.checkpoint:
    check_model_config(config, model)
  return model


# --------------------------------------------------------------------------- compilation


@dataclasses.dataclass
class StepReport:
  """Per-device memory and FLOPs of one configuration's compiled train step."""
  label: str
  topology: str
  num_devices: int
  mesh: dict[str, int]
  rules_preset: str
  remat_policy: str
  tokens: str
  num_params: int
  global_batch: int
  batch_per_device: int
  grad_accum_steps: int
  params_bytes: int  # Exact per-device shard sizes from the state shardings ...
  opt_state_bytes: int
  ema_bytes: int
  other_state_bytes: int  # step, rng
  batch_bytes: int
  hbm_bytes: int
  fits: bool
  # From memory_analysis() (None when the compiler ran out of memory).
  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  code_bytes: int | None = None
  total_bytes: int | None = None
  required_bytes: int | None = None  # The compiler's figure when it ran out of memory.
  oom_message: str | None = None
  flops_per_step: float = 0.0  # Global batch, unrolled-scan cost analysis.
  flops_per_device: float = 0.0
  compiled_flops_per_device: float | None = None  # The TPU program's own count (scans once).
  compile_seconds: float = 0.0
  advice: list[str] = dataclasses.field(default_factory=list)


def leaf_shard_bytes(x: Any) -> int:
  """Bytes of one device's shard of an abstract array carrying a sharding."""
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def tree_shard_bytes(tree: Any) -> int:
  import jax
  return sum(leaf_shard_bytes(x) for x in jax.tree.leaves(tree))


def abstract_batch(model_cfg, batch_size: int) -> dict[str, Any]:
  """ShapeDtypeStructs of a pre-tokenized batch: codes, or KL moments for continuous tokens."""
  import jax
  import jax.numpy as jnp
  b = batch_size
  if model_cfg.continuous:
    latent = jax.ShapeDtypeStruct((b, *model_cfg.grid_size, model_cfg.token_dim), jnp.float32)
    batch = {'latent_mean': latent, 'latent_std': latent}
  else:
    batch = {'tokens': jax.ShapeDtypeStruct((b, *model_cfg.grid_size), jnp.int32)}
  batch['label'] = jax.ShapeDtypeStruct((b,), jnp.int32)
  return batch


def _step_tokenizer(config, model_cfg):
  """What train_step reads of the tokenizer on pre-tokenized batches: nothing for codes; for KL
  moments the latent scale and posterior sampling (the autoencoder itself is not called)."""
  if not model_cfg.continuous:
    return None
  from heptapod_jax.models.tokenizers import LatentTokenizer
  return LatentTokenizer(autoencoder=None, scale=config.tokenizer.latent_scale,
                         sample_posterior=config.tokenizer.sample_posterior)


def step_flops(config, model_cfg) -> float:
  """FLOPs of one train step on the global batch: XLA's cost analysis of the step lowered on
  the host, unsharded, with every layer scan unrolled and XLA attention (see module doc)."""
  import jax
  from heptapod_jax import optim, steps
  from heptapod_jax.models.heptapod import Heptapod
  depth = max(model_cfg.backbone.depth, model_cfg.head.depth, 1)
  # The plain loss: the fused one's chunk loop (model.loss_chunk) would be counted once.
  cfg = dataclasses.replace(model_cfg, scan_unroll=depth, attention_impl='xla', loss_chunk=0)
  model = Heptapod(cfg)
  tx, schedule = optim.make_optimizer(config.optim, config.train.num_steps)
  state = jax.eval_shape(lambda: steps.init_train_state(model, tx, jax.random.key(0)))
  step = functools.partial(steps.train_step, model=model, tokenizer=_step_tokenizer(config, cfg),
                           tx=tx, schedule=schedule, ema_decay=config.optim.ema_decay)
  lowered = jax.jit(step).trace(state, abstract_batch(cfg, config.train.global_batch_size),
                                {}).lower(lowering_platforms=('cpu',))
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def _mesh_and_rules(config, devices: Sequence[Any]):
  """The mesh of `config.mesh` over `devices` and its logical-axis rules."""
  from heptapod_jax import sharding
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if math.prod(config.mesh.dcn_shape) != num_slices:
    raise ValueError(f'config.mesh.dcn_shape={tuple(config.mesh.dcn_shape)} spans '
                     f'{math.prod(config.mesh.dcn_shape)} slices, the target has {num_slices} '
                     f'(--num_slices): e.g. --config.mesh.dcn_shape={num_slices},1,1.')
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
  if config.mesh.rules_preset not in sharding.RULE_PRESETS:
    raise ValueError(f'config.mesh.rules_preset={config.mesh.rules_preset!r} is not one of '
                     f'{sorted(sharding.RULE_PRESETS)}.')
  return mesh, sharding.RULE_PRESETS[config.mesh.rules_preset]


def compile_train_step(config, devices: Sequence[Any], *, label: str = '',
                       topology_name: str = '', hbm_bytes: int | None = None) -> StepReport:
  """AOT-compiles `config`'s train step for `devices` (a TPU topology's) and measures it.

  The step is built as `train.train_and_evaluate` builds it: same state and batch
  shardings, in/out shardings, donation and gradient accumulation.
  """
  import flax.linen as nn
  import jax
  from heptapod_jax import optim, sharding, steps
  from heptapod_jax.models import attention, layers
  from heptapod_jax.models.heptapod import Heptapod

  mcfg = model_config(config)
  model = Heptapod(mcfg)
  mesh, rules = _mesh_and_rules(config, devices)
  tcfg = config.train
  dp = sharding.data_parallel_size(mesh, rules)
  accum = tcfg.grad_accum_steps
  if tcfg.global_batch_size % (dp * accum):
    raise ValueError(f'config.train.global_batch_size={tcfg.global_batch_size} is not divisible '
                     f'by config.train.grad_accum_steps={accum} microbatches x {dp} data-parallel '
                     f'shards of mesh {dict(mesh.shape)}.')
  if hbm_bytes is None:
    hbm_bytes, _ = hbm_limit(devices[0])
  tx, schedule = optim.make_optimizer(config.optim, tcfg.num_steps)
  tokenizer = _step_tokenizer(config, mcfg)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    attention.check_attention_impl(mcfg.attention_impl, layers.dtype_of(mcfg.dtype))
    shardings = steps.train_state_shardings(model, tx, mesh, rules)
    state = steps.abstract_train_state(model, tx, shardings)
    batch = abstract_batch(mcfg, tcfg.global_batch_size)
    batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
             for k, v in batch.items()}
    step_fn = steps.jit_train_step(model, tokenizer, tx, schedule,
                                   ema_decay=config.optim.ema_decay, accum_steps=accum,
                                   state_shardings=shardings, batch_shardings=batch_shardings,
                                   mesh=mesh)
    t0 = time.time()
    lowered = step_fn.lower(state, batch, {})
    compiled, oom = None, None
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      oom = str(e)
      if parse_hbm_oom(oom) is None:
        raise
    seconds = time.time() - t0

  params = tree_shard_bytes(state.params)
  report = StepReport(
      label=label, topology=topology_name, num_devices=len(devices), mesh=dict(mesh.shape),
      rules_preset=config.mesh.rules_preset, remat_policy=mcfg.remat_policy, tokens=mcfg.tokens,
      num_params=sum(x.size for x in jax.tree.leaves(state.params)),
      global_batch=tcfg.global_batch_size, batch_per_device=tcfg.global_batch_size // dp,
      grad_accum_steps=accum, params_bytes=params,
      opt_state_bytes=tree_shard_bytes(state.opt_state),
      ema_bytes=tree_shard_bytes(state.ema_params),
      other_state_bytes=tree_shard_bytes((state.step, state.rng)),
      batch_bytes=tree_shard_bytes(batch), hbm_bytes=hbm_bytes, fits=False,
      compile_seconds=seconds)
  if compiled is not None:
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.alias_bytes = int(mem.alias_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.total_bytes = (report.argument_bytes + report.output_bytes - report.alias_bytes
                          + report.temp_bytes + report.code_bytes)
    report.fits = report.total_bytes <= hbm_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and 'flops' in cost:
      report.compiled_flops_per_device = float(cost['flops'])
  else:
    report.required_bytes = parse_hbm_oom(oom)[0]
    report.oom_message = oom.splitlines()[0]
  report.flops_per_step = step_flops(config, mcfg)
  report.flops_per_device = report.flops_per_step / len(devices)
  if not report.fits:
    report.advice = advice(report)
  return report


@dataclasses.dataclass
class SamplerReport:
  """Per-device memory and XLA's cost estimate of one configuration's compiled sampler."""
  label: str
  topology: str
  num_devices: int
  mesh: dict[str, int]
  rules_preset: str
  num_params: int
  parallel_tokens: int
  global_batch: int
  batch_per_device: int
  params_bytes: int
  cache_bytes: int  # KV cache + the head's decoding state, from their shapes.
  hbm_bytes: int
  fits: bool
  argument_bytes: int | None = None
  output_bytes: int | None = None
  temp_bytes: int | None = None
  code_bytes: int | None = None
  total_bytes: int | None = None
  required_bytes: int | None = None
  oom_message: str | None = None
  xla_flops: float | None = None  # XLA's estimate of one decoding step, per device.
  xla_bytes_accessed: float | None = None
  step_flops: float = 0.0  # Analytic FLOPs of one decoding step of the device's batch.
  step_min_bytes: float = 0.0  # Bytes such a step must read at the least.
  compile_seconds: float = 0.0
  advice: list[str] = dataclasses.field(default_factory=list)


def _decode_state_bytes(model_cfg, batch: int) -> int:
  """Bytes of the KV cache and the head's decoding state for `batch` images (their shapes)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from heptapod_jax.models.heptapod import Heptapod, init_params, split_layers
  from heptapod_jax.models.transformer import init_cache
  model = Heptapod(model_cfg)

  def prefill():
    params = nn.unbox(init_params(model, jax.random.key(0)))
    return model.apply({'params': params}, jnp.zeros((batch,), jnp.int32),
                       init_cache(model_cfg, batch), split_layers(params),
                       method=Heptapod.prefill)

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(prefill)))


def _decode_step_cost(model, params, global_batch: int, parallel_tokens: int, mesh, rules
                      ) -> tuple[float | None, float | None]:
  """XLA's (FLOPs, bytes accessed) of one decoding step of the sampler's loop body, compiled
  for the target as the loop runs it: the head's prediction for `parallel_tokens` positions,
  then feeding them (KV cache and the head's state), on per-layer parameters, all sharded as
  in the sampler (batch over the data axes; a layer's kernels as its stacked parameters),
  with XLA attention so that the count sees it. The sampling of the tokens between the two
  is elementwise."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from heptapod_jax import sharding
  from heptapod_jax.models import layers
  from heptapod_jax.models.heptapod import Heptapod, split_layers
  from heptapod_jax.models.transformer import init_cache
  # XLA attention: the cost analysis does not see inside Pallas kernels (splash attention).
  mcfg = dataclasses.replace(model.config, attention_impl='xla')
  model = Heptapod(mcfg)
  dtype = layers.dtype_of(mcfg.dtype)

  def per_layer(stacked):  # ShapeDtypeStructs of one layer, sharded as the stack minus its axis.
    def one(a):
      spec = tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
      return jax.ShapeDtypeStruct(a.shape[1:], dtype if a.ndim >= 3 else a.dtype,
                                  sharding=NamedSharding(mesh, PartitionSpec(*spec[1:])))
    return jax.tree.map(one, stacked)

  depths = {k: len(v) for k, v in jax.eval_shape(lambda p: split_layers(p), params).items()}
  layer_params = {'backbone': (per_layer(params['backbone']['layers']),) * depths['backbone'],
                  'head': ((per_layer(params['head']['layers']),) * depths['head']
                           if depths['head'] else ())}
  labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32)
  state = jax.eval_shape(lambda p, y: model.apply(
      {'params': p}, y, init_cache(mcfg, global_batch), split_layers(p, dtype),
      method=Heptapod.prefill), params, labels)
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=sharding.batch_sharding(mesh, rules, a.ndim)), state)
  head_state, cache = state
  rows = sharding.batch_sharding(mesh, rules, 2 if not mcfg.continuous else 3)
  shape = (global_batch, parallel_tokens) + ((mcfg.token_dim,) if mcfg.continuous else ())
  chunk = jax.ShapeDtypeStruct(shape, jnp.float32 if mcfg.continuous else jnp.int32,
                               sharding=rows)
  t = mcfg.num_positions // 2
  variables = {'params': params}
  predict = jax.jit(lambda v, s, lp: model.apply(v, s, jnp.int32(t), parallel_tokens, lp,
                                                 method=Heptapod.predict))
  feed = jax.jit(lambda v, x, c, s, lp: model.apply(v, x, jnp.int32(t), c, s, lp,
                                                    method=Heptapod.feed))
  flops_total = bytes_total = 0.0
  for fn, args in ((predict, (variables, head_state, layer_params)),
                   (feed, (variables, chunk, cache, head_state, layer_params))):
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if not cost or 'flops' not in cost:
      return None, None
    flops_total += float(cost['flops'])
    bytes_total += float(cost.get('bytes accessed', 0.0))
  return flops_total, bytes_total


def compile_sampler(config, devices: Sequence[Any], *, batch_per_device: int, label: str = '',
                    topology_name: str = '', hbm_bytes: int | None = None) -> SamplerReport:
  """AOT-compiles `config`'s sampler for `devices` (a TPU topology's) and measures it."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from heptapod_jax import flops, optim, sampling, sharding, steps
  from heptapod_jax.models import attention, layers
  from heptapod_jax.models.heptapod import Heptapod

  mcfg = model_config(config)
  model = Heptapod(mcfg)
  mesh, rules = _mesh_and_rules(config, devices)
  dp = sharding.data_parallel_size(mesh, rules)
  global_batch = batch_per_device * dp
  scfg = sampling.SamplingConfig(**config.sampling.to_dict())
  if hbm_bytes is None:
    hbm_bytes, _ = hbm_limit(devices[0])
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)

  def run(params, labels, indices, seed):
    return sampling.sample(model, params, labels, sampling.example_keys(seed, indices), scfg)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    attention.check_attention_impl(mcfg.attention_impl, layers.dtype_of(mcfg.dtype))
    state_shardings = steps.train_state_shardings(model, tx, mesh, rules)
    params = steps.abstract_train_state(model, tx, state_shardings).params
    rows = sharding.batch_sharding(mesh, rules, 1)
    labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=rows)
    indices = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=rows)
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=sharding.replicated(mesh))
    ndim = 3 if mcfg.continuous else 2
    fn = jax.jit(run, out_shardings=sharding.batch_sharding(mesh, rules, ndim))
    t0 = time.time()
    lowered = fn.lower(params, labels, indices, seed)
    compiled, oom = None, None
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      oom = str(e)
      if parse_hbm_oom(oom) is None:
        raise
    seconds = time.time() - t0

  param_bytes = 2 if mcfg.dtype == 'bfloat16' else 4
  report = SamplerReport(
      label=label, topology=topology_name, num_devices=len(devices), mesh=dict(mesh.shape),
      rules_preset=config.mesh.rules_preset,
      num_params=sum(x.size for x in jax.tree.leaves(params)),
      parallel_tokens=scfg.parallel_tokens, global_batch=global_batch,
      batch_per_device=batch_per_device, params_bytes=tree_shard_bytes(params),
      cache_bytes=_decode_state_bytes(mcfg, batch_per_device), hbm_bytes=hbm_bytes, fits=False,
      step_flops=flops.sampling_flops_per_image(mcfg, scfg.parallel_tokens)['total']
      * batch_per_device / mcfg.num_positions,
      step_min_bytes=flops.sampling_bytes_per_step(mcfg, batch_per_device, param_bytes,
                                                   param_bytes)['total'],
      compile_seconds=seconds)
  if compiled is not None:
    mem = compiled.memory_analysis()
    report.argument_bytes = int(mem.argument_size_in_bytes)
    report.output_bytes = int(mem.output_size_in_bytes)
    report.temp_bytes = int(mem.temp_size_in_bytes)
    report.code_bytes = int(mem.generated_code_size_in_bytes)
    report.total_bytes = (report.argument_bytes + report.output_bytes + report.temp_bytes
                          + report.code_bytes)
    report.fits = report.total_bytes <= hbm_bytes
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      report.xla_flops, report.xla_bytes_accessed = _decode_step_cost(
          model, params, global_batch, scfg.parallel_tokens, mesh, rules)
  else:
    report.required_bytes = parse_hbm_oom(oom)[0]
    report.oom_message = oom.splitlines()[0]
  if not report.fits:
    report.advice = [f'a smaller --sample_batch_per_device (now {batch_per_device}): the KV '
                     f'cache and decoding state take {report.cache_bytes / GIB:.2f} GiB, '
                     'linear in it',
                     '--config.model.dtype=bfloat16 (half the cache and the decoding copy of '
                     'the kernels)']
  return report


def _misfit_lines(reports: Sequence[Any]) -> list[str]:
  """A paragraph per configuration that does not fit: what it needs and the knobs."""
  lines = []
  for r in reports:
    if r.fits:
      continue
    total = r.total_bytes if r.total_bytes is not None else r.required_bytes
    how = 'the TPU compiler ran out of memory' if r.oom_message else 'memory_analysis'
    lines.append(f'\n{r.label}: DOES NOT FIT: needs {_gib(total)} GiB of {_gib(r.hbm_bytes)} GiB '
                 f'per device ({how}). To reduce it:')
    lines += [f'  {tip}' for tip in r.advice]
  return lines


def format_sampler_table(reports: Sequence[SamplerReport]) -> str:
  """One row per configuration's sampler, then a line per configuration that does not fit."""
  head = (f'{"size":6s} {"params":>7s} {"mesh d,f,t":>11s} {"rules":>11s} {"k":>2s} '
          f'{"batch/dev":>9s} | {"params":>7s} {"cache":>7s} {"temp":>7s} {"total":>7s} '
          f'{"HBM":>7s} {"use":>5s} {"fits":>4s} | {"GFLOP/step":>10s} {"GB/step":>7s} | '
          f'{"GFLOP/step":>10s} {"GB/step":>7s} {"compile":>7s}')
  bars = [i for i, c in enumerate(head) if c == '|']
  units = (' ' * bars[0] + '|' + 'GiB per device'.center(bars[1] - bars[0] - 1) + '|'
           + 'XLA, per device'.center(bars[2] - bars[1] - 1) + '|'
           + 'analytic (floor)'.center(len(head) - bars[2] - 1))
  lines = [head, units, '-' * len(head)]
  for r in reports:
    mesh = ','.join(str(r.mesh.get(a, 1)) for a in ('data', 'fsdp', 'tensor'))
    total = r.total_bytes if r.total_bytes is not None else r.required_bytes
    xla_f = '-' if r.xla_flops is None else f'{r.xla_flops / 1e9:.1f}'
    xla_b = '-' if r.xla_bytes_accessed is None else f'{r.xla_bytes_accessed / 1e9:.2f}'
    lines.append(
        f'{r.label:6s} {r.num_params / 1e6:6.0f}M {mesh:>11s} {r.rules_preset:>11s} '
        f'{r.parallel_tokens:2d} {r.batch_per_device:9d} | {_gib(r.params_bytes):>7s} '
        f'{_gib(r.cache_bytes):>7s} {_gib(r.temp_bytes):>7s} {_gib(total):>7s} '
        f'{_gib(r.hbm_bytes):>7s} {100 * total / r.hbm_bytes:4.0f}% '
        f'{"yes" if r.fits else "NO":>4s} | {xla_f:>10s} {xla_b:>7s} | '
        f'{r.step_flops / 1e9:10.1f} {r.step_min_bytes / 1e9:7.2f} {r.compile_seconds:6.0f}s')
  return '\n'.join(lines + _misfit_lines(reports))


def advice(r: StepReport) -> list[str]:
  """The knobs that reduce per-device memory, for a configuration that does not fit."""
  tips = []
  if r.remat_policy != 'full':
    tips.append(f'--config.model.remat_policy=full (now {r.remat_policy!r}): recompute the '
                'activations in the backward pass instead of keeping them')
  if r.mesh.get('fsdp', 1) == 1 or r.rules_preset == 'data_only':
    tips.append('--config.mesh.shape=1,-1,1 --config.mesh.rules_preset=fsdp: shard parameters, '
                'gradients and optimizer state over all chips (ZeRO-3)')
  state = r.params_bytes + r.opt_state_bytes + r.ema_bytes
  needed = r.total_bytes if r.total_bytes is not None else r.required_bytes
  # Activation-like memory scales with the microbatch; the state (and its gradient) does not.
  fixed = 2 * state + r.params_bytes
  room = r.hbm_bytes * 0.9 - fixed
  micro = r.batch_per_device // r.grad_accum_steps
  if micro > 1 and room > 0:
    k = 2
    while k < micro and (needed - fixed) * r.grad_accum_steps / k > room:
      k *= 2
    tips.append(f'--config.train.grad_accum_steps={k * r.grad_accum_steps} (estimate): '
                f'microbatches of {max(micro // k, 1)} per device, same update')
  tips.append(f'a smaller per-device batch (now {r.batch_per_device}): more chips, or a smaller '
              '--config.train.global_batch_size')
  return tips


# --------------------------------------------------------------------------- report


def _gib(n: int | None) -> str:
  return '-' if n is None else f'{n / GIB:.3f}'


def format_table(reports: Sequence[StepReport]) -> str:
  """One row per configuration, then a line per configuration that does not fit."""
  head = (f'{"size":6s} {"params":>7s} {"mesh d,f,t":>11s} {"rules":>11s} {"remat":>13s} '
          f'{"batch/dev":>9s} | {"params":>7s} {"opt+EMA":>7s} {"batch":>7s} {"temp":>7s} '
          f'{"total":>7s} {"HBM":>7s} {"use":>5s} {"fits":>4s} | {"TFLOP/step":>10s} '
          f'{"TFLOP/dev":>9s} {"compile":>7s}')
  left, right = head.index('|'), head.rindex('|')
  units = ' ' * left + '|' + 'GiB per device'.center(right - left - 1) + '|'
  lines = [head, units, '-' * len(head)]
  for r in reports:
    mesh = ','.join(str(r.mesh.get(a, 1)) for a in ('data', 'fsdp', 'tensor'))
    total = r.total_bytes if r.total_bytes is not None else r.required_bytes
    batch = f'{r.batch_per_device}' + (f'/{r.grad_accum_steps}' if r.grad_accum_steps > 1 else '')
    lines.append(
        f'{r.label:6s} {r.num_params / 1e6:6.0f}M {mesh:>11s} {r.rules_preset:>11s} '
        f'{r.remat_policy:>13s} {batch:>9s} | {_gib(r.params_bytes):>7s} '
        f'{_gib(r.opt_state_bytes + r.ema_bytes):>7s} {_gib(r.batch_bytes):>7s} '
        f'{_gib(r.temp_bytes):>7s} {_gib(total):>7s} {_gib(r.hbm_bytes):>7s} '
        f'{100 * total / r.hbm_bytes:4.0f}% {"yes" if r.fits else "NO":>4s} | '
        f'{r.flops_per_step / 1e12:10.1f} {r.flops_per_device / 1e12:9.2f} '
        f'{r.compile_seconds:6.0f}s')
  return '\n'.join(lines + _misfit_lines(reports))


def _flag_text(value: Any) -> str:
  """A config override as it is typed on the command line (tuples as 1,-1,1)."""
  if isinstance(value, (tuple, list)):
    return ','.join(str(v) for v in value)
  return str(value)


def _size_option(config_file: str) -> str | None:
  """The size=X recipe option of 'configs/x.py:size=X,...', if given."""
  for option in config_file.partition(':')[2].split(','):
    key, _, value = option.partition('=')
    if key.strip() == 'size':
      return value.strip()
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import jax
  # Compile-only: the host's backend is never used to run anything.
  jax.config.update('jax_platforms', 'cpu')
  topology = parse_topology(_TOPOLOGY.value)
  devices = topology_devices(topology, _NUM_SLICES.value)
  if _HBM_GIB.value:
    hbm, source = int(_HBM_GIB.value * GIB), '--hbm_gib'
  else:
    hbm, source = hbm_limit(devices[0])
  config_file = config_flags.get_config_filename(flags.FLAGS['config'])
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  sizes = list(ALL_SIZES) if [s.lower() for s in _SIZES.value] == ['all'] else _SIZES.value
  slices = f'{_NUM_SLICES.value} x ' if _NUM_SLICES.value > 1 else ''
  flags_text = ' '.join(f'--config.{k}={_flag_text(v)}' for k, v in overrides.items())
  sample = _PROGRAM.value == 'sample'
  what = (f'Sampler (sampling.sample, {_SAMPLE_BATCH.value} images per device)' if sample
          else 'Train step')
  print(f'{what} of {config_file} {flags_text}'
        f'\nAOT-compiled for {slices}{topology.name} ({topology.libtpu_name}: {len(devices)} x '
        f'{devices[0].device_kind}); HBM per device {hbm / GIB:.2f} GiB ({source}).'
        + ('' if sample else ' Pre-tokenized batches.'), flush=True)
  reports = []
  for size in sizes or [None]:
    config = load_config(config_file, overrides, size) if size else _CONFIG.value
    label = size or _size_option(config_file) or 'config'
    if sample:
      reports.append(compile_sampler(config, devices, batch_per_device=_SAMPLE_BATCH.value,
                                     label=label, topology_name=topology.name, hbm_bytes=hbm))
    else:
      reports.append(compile_train_step(config, devices, label=label,
                                        topology_name=topology.name, hbm_bytes=hbm))
    print(f'  {label}: compiled in {reports[-1].compile_seconds:.0f} s', flush=True)
  print((format_sampler_table if sample else format_table)(reports), flush=True)
  if _JSON.value:
    paths.write_json(_JSON.value, {
        'config': config_file, 'overrides': {k: _flag_text(v) for k, v in overrides.items()},
        'topology': topology.name, 'libtpu_topology': topology.libtpu_name,
        'num_slices': _NUM_SLICES.value, 'num_devices': len(devices),
        'device_kind': devices[0].device_kind, 'hbm_bytes': hbm, 'hbm_source': source,
        'program': _PROGRAM.value, 'rows': [dataclasses.asdict(r) for r in reports]}, indent=2)
  return 0 if all(r.fits for r in reports) else 2


if __name__ == '__main__':
  app.run(main)
