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

`--program=sample` compiles the sampler instead (`decode.sample` for
`--sample_batch_per_device` images per device; what it measures:
heptapod_jax/tools/aot_sampler.py). The topology names, the compile-only devices and
the HBM limit: heptapod_jax/tools/tpu_topology.py.

Compile time, measured on a 2-core host: 40 to 100 s per size, about 4 minutes
for B..H on v5e-256 or v5p-128 (peak memory 5 GB); a configuration that does not
fit fails within seconds. The tests use the tiny preset on v5e:2x2.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

from heptapod_jax.storage import paths
from heptapod_jax.tools.aot_common import (gib, load_config, mesh_and_rules, misfit_lines,
                                           model_config, tree_shard_bytes)
from heptapod_jax.tools.aot_sampler import compile_sampler, format_sampler_table
from heptapod_jax.tools.tpu_topology import (GIB, hbm_limit, parse_hbm_oom, parse_topology,
                                             topology_devices)

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
                             "`decode.sample` from labels to token grids).")
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch_per_device', 256, '--program=sample: images '
                                     'per device in one sampling call.')
flags.mark_flags_as_required(['config', 'topology'])

ALL_SIZES = ('B', 'L', 'XL', 'H')


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
  from heptapod_jax.models.heptapod import Heptapod
  from heptapod_jax.training import optim, steps
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


def compile_train_step(config, devices: Sequence[Any], *, label: str = '',
                       topology_name: str = '', hbm_bytes: int | None = None) -> StepReport:
  """AOT-compiles `config`'s train step for `devices` (a TPU topology's) and measures it.

  The step is built as `train.train_and_evaluate` builds it: same state and batch
  shardings, in/out shardings, donation and gradient accumulation.
  """
  import flax.linen as nn
  import jax
  from heptapod_jax import sharding
  from heptapod_jax.models import attention, layers
  from heptapod_jax.models.heptapod import Heptapod
  from heptapod_jax.training import optim, steps

  mcfg = model_config(config)
  model = Heptapod(mcfg)
  mesh, rules = mesh_and_rules(config, devices)
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
        f'{r.remat_policy:>13s} {batch:>9s} | {gib(r.params_bytes):>7s} '
        f'{gib(r.opt_state_bytes + r.ema_bytes):>7s} {gib(r.batch_bytes):>7s} '
        f'{gib(r.temp_bytes):>7s} {gib(total):>7s} {gib(r.hbm_bytes):>7s} '
        f'{100 * total / r.hbm_bytes:4.0f}% {"yes" if r.fits else "NO":>4s} | '
        f'{r.flops_per_step / 1e12:10.1f} {r.flops_per_device / 1e12:9.2f} '
        f'{r.compile_seconds:6.0f}s')
  return '\n'.join(lines + misfit_lines(reports))


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
  what = (f'Sampler (decode.sample, {_SAMPLE_BATCH.value} images per device)' if sample
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
