"""AOT compilation of the train step for a TPU topology (libtpu as a compiler, no TPU needed).

libtpu is a test dependency (requirements-dev.txt): without it these tests fail, they do not skip.
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from heptapod_jax import sharding
from heptapod_jax.models.heptapod import Heptapod
from heptapod_jax.tools import aot_common, aot_sampler, tpu_topology
from heptapod_jax.tools import aot_compile as aot
from heptapod_jax.training import optim, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, 'configs', 'imagenet256.py')


def test_libtpu_is_installed():
  assert importlib.util.find_spec('libtpu') is not None, (
      'libtpu (the TPU compiler) is missing: pip install -r requirements-dev.txt')


@pytest.mark.parametrize('name, libtpu_name, chips', [
    ('v5e-256', 'v5e:16x16', 256), ('v5litepod-256', 'v5e:16x16', 256), ('v5e-8', 'v5e:2x4', 8),
    ('v5e-32', 'v5e:4x8', 32), ('v6e-256', 'v6e:16x16', 256), ('v5p-128', 'v5p:4x4x4', 64),
    ('v5p-8', 'v5p:2x2x1', 4), ('v5p-512', 'v5p:4x8x8', 256), ('v4-64', 'v4:2x4x4', 32),
    ('V5E:2x2', 'v5e:2x2', 4), ('v5p:4x4x12', 'v5p:4x4x12', 192)])
def test_topology_names(name, libtpu_name, chips):
  topo = tpu_topology.parse_topology(name)
  assert (topo.libtpu_name, topo.chips) == (libtpu_name, chips)
  assert dict(topo.options) == ({'chip_config_name': 'megacore'} if name.startswith('v4') else {})


@pytest.mark.parametrize('name', ['v5e-3', 'v5e-512', 'v5p-2', 'v5p-12', 'v9-8', 'tpu', 'v5e'])
def test_bad_topology_names_list_the_valid_ones(name):
  with pytest.raises(ValueError, match=r'v5e-256.*v5p-128.*v4-64.*v5e:16x16'):
    tpu_topology.parse_topology(name)


def test_topology_unknown_to_libtpu_lists_the_valid_names():
  with pytest.raises(ValueError, match=r'libtpu does not know it.*v5e-256.*v5p:4x4x4'):
    tpu_topology.topology_devices(tpu_topology.parse_topology('v9:2x2'))


def test_parse_hbm_oom_messages():
  msg = ('RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total '
         'memory required for HLO temporaries (245.40G) exceeds available HBM (15.75G).')
  assert tpu_topology.parse_hbm_oom(msg) == (int(245.40 * 2**30), int(15.75 * 2**30))
  old = 'Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm. Exceeded hbm capacity'
  assert tpu_topology.parse_hbm_oom(old) == (int(20.5 * 2**30), int(15.75 * 2**30))
  assert tpu_topology.parse_hbm_oom('INVALID_ARGUMENT: something else') is None


def _device_shard_bytes(tree, device) -> int:
  """Bytes of `device`'s slice of every leaf, from the sharding's index map (not shard_shape)."""
  total = 0
  for x in jax.tree.leaves(tree):
    index = x.sharding.devices_indices_map(x.shape)[device]
    elements = 1
    for sl, dim in zip(index, x.shape):
      start, stop, _ = sl.indices(dim)
      elements *= stop - start
    total += elements * x.dtype.itemsize
  return total


def test_tiny_fsdp_step_on_v5e_2x2():
  devices = tpu_topology.topology_devices(tpu_topology.parse_topology('v5e:2x2'))
  assert len(devices) == 4 and devices[0].device_kind == 'TPU v5 lite'
  hbm, source = tpu_topology.hbm_limit(devices[0])
  assert source == 'TPU compiler limit' and 15 * 2**30 <= hbm <= 16 * 2**30
  config = aot_common.load_config(f'{RECIPE}:runlocal=True',
                                  {'mesh.shape': (1, -1, 1), 'train.global_batch_size': 8})
  # conftest asks for float32 matmuls; the splash kernel's bf16 matmuls cannot lower at fp32
  # contract precision (Mosaic: "Bad lhs type"): compile at the default one, as training does.
  with jax.default_matmul_precision('default'):
    report = aot.compile_train_step(config, devices, label='tiny', hbm_bytes=hbm)
  assert report.fits and not report.advice
  assert report.mesh == {'data': 1, 'fsdp': 4, 'tensor': 1} and report.batch_per_device == 2

  # The per-device state, recomputed independently from the trainer's own shardings.
  mcfg = aot_common.model_config(config)
  model = Heptapod(mcfg)
  tx, _ = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.create_mesh(config.mesh.shape, config.mesh.dcn_shape, devices=devices)
  rules = sharding.RULE_PRESETS[config.mesh.rules_preset]
  with jax.set_mesh(mesh):
    shardings = train.train_state_shardings(model, tx, mesh, rules)
    state = train.abstract_train_state(model, tx, shardings)
  params = _device_shard_bytes(state.params, devices[0])
  assert report.params_bytes == params == report.ema_bytes
  assert report.opt_state_bytes == _device_shard_bytes(state.opt_state, devices[0])
  full = 4 * report.num_params  # float32 parameters
  assert full / 4 <= params < full / 2  # FSDP over 4: the big matrices are split four ways.
  # memory_analysis' arguments = the state and batch shards, plus TPU layout padding.
  exact = (report.params_bytes + report.opt_state_bytes + report.ema_bytes
           + report.other_state_bytes + report.batch_bytes)
  assert exact <= report.argument_bytes <= 1.1 * exact
  assert 0 < report.temp_bytes and report.total_bytes <= hbm
  # FLOPs of the unrolled step; the compiled program counts each scanned layer stack once.
  assert report.flops_per_step > 0 and report.compiled_flops_per_device > 0
  assert report.flops_per_step == pytest.approx(report.flops_per_device * 4)
  assert report.flops_per_step > report.compiled_flops_per_device * 4
  assert 'tiny' in aot.format_table([report])


def test_continuous_tokens_step_flops():
  config = aot_common.load_config(f'{RECIPE}:runlocal=True,tokens=kl')
  mcfg = aot_common.model_config(config)
  assert mcfg.continuous
  assert aot._step_tokenizer(config, mcfg).scale == config.tokenizer.latent_scale
  assert aot.step_flops(config, mcfg) > 0


def test_cli_absurd_batch_does_not_fit(tmp_path):
  out = tmp_path / 'aot.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'heptapod_jax.tools.aot_compile',
       f'--config={RECIPE}:runlocal=True', '--topology=v5litepod-4',
       '--config.train.global_batch_size=4096', f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
  assert 'DOES NOT FIT' in proc.stdout and 'grad_accum_steps' in proc.stdout, proc.stdout
  result = json.loads(out.read_text())
  assert result['libtpu_topology'] == 'v5e:2x2' and result['num_devices'] == 4
  (row,) = result['rows']
  assert not row['fits'] and row['required_bytes'] > result['hbm_bytes']
  assert row['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  # Data parallel: every device holds all float32 parameters.
  assert row['params_bytes'] == 4 * row['num_params'] and row['batch_per_device'] == 1024


def test_tiny_sampler_on_v5e_2x2():
  """The sampler's jitted loop compiles for a TPU slice: the per-device parameters and cache
  are exact, the cache grows linearly with the batch, and XLA's estimate of the loop body is
  one decoding step of the device's batch (within the elementwise share of the analytic count)."""
  devices = tpu_topology.topology_devices(tpu_topology.parse_topology('v5e:2x2'))
  config = aot_common.load_config(f'{RECIPE}:runlocal=True', {'mesh.shape': (-1, 1, 1)})
  with jax.default_matmul_precision('default'):
    small = aot_sampler.compile_sampler(config, devices, batch_per_device=4, label='tiny',
                                        hbm_bytes=16 * 2**30)
    large = aot_sampler.compile_sampler(config, devices, batch_per_device=8, label='tiny',
                                        hbm_bytes=16 * 2**30)
  assert small.fits and small.global_batch == 16 and small.mesh['data'] == 4
  assert small.params_bytes == 4 * small.num_params  # Data parallel: replicated float32.
  mcfg = aot_common.model_config(config)
  b, n = mcfg.backbone, mcfg.num_positions
  kv = 2 * b.depth * 4 * mcfg.seq_len * b.width * 2  # bf16 K and V of 4 images.
  head = 4 * 4 * n * mcfg.head.width * 2  # Global head: grid inputs and q, k, v.
  assert small.cache_bytes >= kv + head and large.cache_bytes == 2 * small.cache_bytes
  assert small.cache_bytes <= small.temp_bytes
  # XLA also counts elementwise work (softmax, norms), a large share at the tiny widths.
  assert 0.8 <= small.step_flops / small.xla_flops <= 1.0, small.step_flops / small.xla_flops
  assert small.step_min_bytes <= small.xla_bytes_accessed
  assert 'tiny' in aot_sampler.format_sampler_table([small, large])
