"""Compiles the sampler for a TPU topology without the hardware: per-device memory, cost.

`python -m heptapod_jax.tools.aot_compile --program=sample` (see there for the flags)
compiles `decode.sample` (incremental decoding, `config.sampling`'s settings) from class
labels to token grids for `--sample_batch_per_device` images per device, jitted as sample
mode runs it: parameters under the train state's shardings (the EMA parameters are those),
labels and per-sample key indices sharded over the data axes. Per device: params (the
shard), cache (the KV cache and the head's decoding state, exact from their shapes), temp
and total from `memory_analysis()` (temp holds the per-layer copy of the kernels that
decoding makes once per call, in the compute dtype, and the cache), and XLA's cost
estimate of one decoding step (the loop body: the head's prediction and feeding the
sampled tokens, compiled for the target with the same shardings and XLA attention, since
the count cannot see inside the Pallas splash kernel): GFLOP/step and GB/step per device,
next to the analytic FLOPs of a step (heptapod_jax/flops.py) and the bytes it must read
at the least (flops.sampling_bytes_per_step).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from heptapod_jax.tools.aot_common import (gib, mesh_and_rules, misfit_lines, model_config,
                                           tree_shard_bytes)
from heptapod_jax.tools.tpu_topology import GIB, hbm_limit, parse_hbm_oom


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
  from heptapod_jax import flops, sharding
  from heptapod_jax.models import attention, layers
  from heptapod_jax.models.heptapod import Heptapod
  from heptapod_jax.sampling import decode
  from heptapod_jax.training import optim, steps

  mcfg = model_config(config)
  model = Heptapod(mcfg)
  mesh, rules = mesh_and_rules(config, devices)
  dp = sharding.data_parallel_size(mesh, rules)
  global_batch = batch_per_device * dp
  scfg = decode.SamplingConfig(**config.sampling.to_dict())
  if hbm_bytes is None:
    hbm_bytes, _ = hbm_limit(devices[0])
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)

  def run(params, labels, indices, seed):
    return decode.sample(model, params, labels, decode.example_keys(seed, indices), scfg)

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
        f'{r.parallel_tokens:2d} {r.batch_per_device:9d} | {gib(r.params_bytes):>7s} '
        f'{gib(r.cache_bytes):>7s} {gib(r.temp_bytes):>7s} {gib(total):>7s} '
        f'{gib(r.hbm_bytes):>7s} {100 * total / r.hbm_bytes:4.0f}% '
        f'{"yes" if r.fits else "NO":>4s} | {xla_f:>10s} {xla_b:>7s} | '
        f'{r.step_flops / 1e9:10.1f} {r.step_min_bytes / 1e9:7.2f} {r.compile_seconds:6.0f}s')
  return '\n'.join(lines + misfit_lines(reports))
