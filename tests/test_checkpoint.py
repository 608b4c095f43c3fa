"""Tests for heptapod_jax.storage.checkpoint on 8 fake CPU devices."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import checkpoint_read

from _multiprocess import multiprocess_env


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def _mesh(n: int, axis_names: tuple[str, ...], shape: tuple[int, ...] | None = None):
  shape = shape or (n,)
  return jax.make_mesh(
      shape, axis_names, devices=jax.devices()[:n],
      axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names))


def _param_specs(axis: str | None) -> dict[str, P]:
  return {'dense': {'kernel': P(None, axis), 'bias': P(axis)}, 'embed': P(axis, None)}


def _make_state(mesh, axis: str, seed: int = 0) -> TrainState:
  """A TrainState with sharded params, adamw state after one update, EMA and a typed key."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {
      'dense': {'kernel': jax.random.normal(k1, (16, 32)), 'bias': jax.random.normal(k2, (32,))},
      'embed': jax.random.normal(k3, (64, 16)),
  }
  specs = _param_specs(axis)
  params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.sin(x) * 0.1, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, params, new_params)
  replicated = NamedSharding(mesh, P())
  return TrainState(
      step=jax.device_put(jnp.int32(1), replicated),
      params=new_params,
      opt_state=opt_state,
      ema_params=ema,
      rng=jax.device_put(jax.random.key(seed + 42), replicated),
  )


def _abstract_for(state: TrainState, mesh, axis: str | None) -> TrainState:
  """Abstract state for `mesh`: params-shaped leaves use `axis`, the rest is replicated."""
  abstract = jax.eval_shape(lambda: state)
  specs = _param_specs(axis)
  replicated = NamedSharding(mesh, P())

  def with_sharding(x, spec=None):
    sharding = NamedSharding(mesh, spec) if spec is not None else replicated
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  def params_like(tree):
    return jax.tree.map(with_sharding, tree, specs)

  opt_state = jax.tree.map(with_sharding, abstract.opt_state)
  adam = opt_state[0]  # ScaleByAdamState; then weight decay, lr (no arrays).
  adam = adam._replace(mu=params_like(adam.mu), nu=params_like(adam.nu))
  opt_state = (adam,) + tuple(opt_state[1:])
  return abstract.replace(
      step=with_sharding(abstract.step),
      params=params_like(abstract.params),
      opt_state=opt_state,
      ema_params=params_like(abstract.ema_params),
      rng=with_sharding(abstract.rng),
  )


def _assert_bit_identical(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _assert_shardings(tree, abstract):
  for x, a in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)):
    assert isinstance(x, jax.Array)
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)
    assert x.sharding.mesh.devices.size == a.sharding.mesh.devices.size


def test_round_trip_8_devices(tmp_path):
  mesh = _mesh(8, ('fsdp',))
  state = _make_state(mesh, 'fsdp')
  config = {'model': {'dims': (4, 8), 'dtype': jnp.bfloat16, 'name': 'tiny'}, 'lr': 1e-3,
            'steps': np.int64(10), 'fn': len}
  data_state = {'position': 123, 'num_skipped': 0, 'big': 2**40}
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), save_interval_steps=1, max_to_keep=3)
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  assert ckpt.save(1, state, data_state=data_state, config=config)
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]

  abstract = _abstract_for(state, mesh, 'fsdp')
  restored, restored_data, restored_config = ckpt.restore(abstract)
  ckpt.close()

  assert isinstance(restored, TrainState)
  _assert_bit_identical(state, restored)
  _assert_shardings(restored, abstract)
  # The typed key survives as a typed key and still works as one.
  assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(
      jax.random.key_data(jax.random.split(restored.rng)),
      jax.random.key_data(jax.random.split(state.rng)))
  assert restored_data == data_state
  assert restored_config == {
      'model': {'dims': [4, 8], 'dtype': str(jnp.bfloat16), 'name': 'tiny'}, 'lr': 1e-3,
      'steps': 10, 'fn': str(len)}


def test_cross_mesh_restore_8_to_4_devices(tmp_path):
  mesh8 = _mesh(8, ('fsdp',))
  state = _make_state(mesh8, 'fsdp')
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=5, max_to_keep=1)
  assert ckpt.save(5, state, data_state={'position': 7}, config={})
  ckpt.close()

  # A new process would create a new Checkpointer; so do we.
  mesh4 = _mesh(4, ('data', 'model'), shape=(2, 2))
  abstract = _abstract_for(state, mesh4, 'model')
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=5, max_to_keep=1)
  restored, data_state, _ = ckpt.restore(abstract, step=5)
  ckpt.close()
  _assert_bit_identical(state, restored)
  _assert_shardings(restored, abstract)
  kernel = restored.params['dense']['kernel']
  assert kernel.sharding.spec == P(None, 'model')
  assert {d.id for d in kernel.sharding.device_set} == {d.id for d in jax.devices()[:4]}
  assert data_state == {'position': 7}


def test_keep_n_and_save_interval(tmp_path):
  mesh = _mesh(8, ('fsdp',))
  state = _make_state(mesh, 'fsdp')
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2)
  assert [s for s in range(1, 9) if ckpt.should_save(s)] == [2, 4, 6, 8]
  saved = []
  for step in range(1, 9):
    if ckpt.save(step, state, data_state={'position': step}, config={'step': step}):
      saved.append(step)
  assert saved == [2, 4, 6, 8]
  # Off-interval steps only with force; already-saved steps are skipped.
  assert not ckpt.should_save(9)
  assert ckpt.save(9, state, data_state={'position': 9}, config={}, force=True)
  assert not ckpt.save(9, state, data_state={'position': 9}, config={}, force=True)
  # A step not newer than the latest one is never due.
  assert not ckpt.should_save(8)
  ckpt.close()
  assert ckpt.all_steps() == [8, 9]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ['8', '9']

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=2, max_to_keep=2)
  abstract = _abstract_for(state, mesh, 'fsdp')
  _, data_state, config = ckpt.restore(abstract, step=8)
  assert data_state == {'position': 8} and config == {'step': 8}
  _, data_state, _ = ckpt.restore(abstract)  # Latest.
  assert data_state == {'position': 9}
  with pytest.raises(FileNotFoundError, match=r'step 2 .*\[8, 9\]'):
    ckpt.restore(abstract, step=2)
  ckpt.close()


def test_data_state_is_per_process_on_disk(tmp_path):
  """The JSON item holds a list indexed by process, which restore unpacks."""
  import json

  mesh = _mesh(8, ('fsdp',))
  state = _make_state(mesh, 'fsdp')
  with ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=1,
                             async_save=False) as ckpt:
    ckpt.save(3, state, data_state={'position': 3, 'num_skipped': 1}, config={'a': (1, 2)})
  # 'metadata' is the JSON handler's default file name.
  on_disk = json.loads((tmp_path / '3' / 'data' / 'metadata').read_text())
  assert on_disk['process_count'] == jax.process_count() == 1
  assert on_disk['per_process'] == [{'num_skipped': 1, 'position': 3}]


def test_load_params_without_optimizer_structure(tmp_path):
  mesh = _mesh(8, ('fsdp',))
  state = _make_state(mesh, 'fsdp')
  with ckpt_lib.Checkpointer(str(tmp_path), save_interval_steps=1, max_to_keep=2) as ckpt:
    ckpt.save(1, state, data_state={'position': 0}, config={})
    ckpt.save(2, state.replace(ema_params=jax.tree.map(lambda x: x + 1, state.ema_params)),
              data_state={'position': 1}, config={})

  # The caller knows only the params' shapes (e.g. a new run with another optimizer).
  mesh4 = _mesh(4, ('model',))
  abstract_params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh4, s)),
      state.params, _param_specs('model'))
  params = checkpoint_read.load_params(str(tmp_path), abstract_params, step=1)
  _assert_bit_identical(state.params, params)
  _assert_shardings(params, abstract_params)

  ema = checkpoint_read.load_params(str(tmp_path), abstract_params, key='ema_params')  # Latest = 2.
  _assert_bit_identical(jax.tree.map(lambda x: x + 1, state.ema_params), ema)

  with pytest.raises(KeyError, match=r'no subtree .*target_params.*ema_params'):
    checkpoint_read.load_params(str(tmp_path), abstract_params, key='target_params')
  with pytest.raises(FileNotFoundError, match='step 7'):
    checkpoint_read.load_params(str(tmp_path), abstract_params, step=7)


def test_restore_empty_directory_names_it(tmp_path):
  directory = tmp_path / 'empty_run'
  ckpt = ckpt_lib.Checkpointer(str(directory), save_interval_steps=1, max_to_keep=1)
  mesh = _mesh(8, ('fsdp',))
  abstract = _abstract_for(_make_state(mesh, 'fsdp'), mesh, 'fsdp')
  with pytest.raises(FileNotFoundError, match=str(directory)):
    ckpt.restore(abstract)
  ckpt.close()
  with pytest.raises(FileNotFoundError, match=str(directory)):
    checkpoint_read.load_params(str(directory), abstract.params)
  with pytest.raises(FileNotFoundError, match='does_not_exist'):
    checkpoint_read.load_params(str(tmp_path / 'does_not_exist'), abstract.params)


def test_to_jsonable():
  class Color:
    def __str__(self):
      return 'red'

  out = ckpt_lib.to_jsonable({1: (1, 2.5, None), 'x': {'y': np.float32(0.5), 'z': Color()},
                              'arr': np.arange(3), 's': {3, 1}})
  assert out == {'1': [1, 2.5, None], 'x': {'y': 0.5, 'z': 'red'}, 'arr': [0, 1, 2], 's': [1, 3]}


_MULTIHOST_WORKER = r'''
import os, sys
process_id, port, directory, repo = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, repo)
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import checkpoint_read

auto = jax.sharding.AxisType.Auto
mesh = jax.make_mesh((8,), ("x",), axis_types=(auto,))
value = np.arange(64, dtype=np.float32).reshape(16, 4)
w = jax.make_array_from_callback(value.shape, NamedSharding(mesh, P("x")), lambda i: value[i])
rng = jax.jit(lambda: jax.random.key(3), out_shardings=NamedSharding(mesh, P()))()
state = {"params": {"w": w}, "opt": {"m": w * 2}, "rng": rng}
data_state = {"position": 100 + process_id, "big": 2**40 + process_id}
ckpt = ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=2)
assert ckpt.save(1, state, data_state=data_state, config={"a": (1,)})
ckpt.wait_until_finished()

mesh2 = jax.make_mesh((2, 4), ("a", "b"), axis_types=(auto, auto))
def sds(shape, dtype, spec):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh2, spec))
abstract = {
    "params": {"w": sds(value.shape, jnp.float32, P("b", "a"))},
    "opt": {"m": sds(value.shape, jnp.float32, P())},
    "rng": sds((), rng.dtype, P()),
}
gather = lambda x: multihost_utils.process_allgather(x, tiled=True)
restored, restored_data, config = ckpt.restore(abstract)
ckpt.close()
assert restored_data == data_state, restored_data
assert config == {"a": [1]}, config
np.testing.assert_array_equal(gather(restored["params"]["w"]), value)
np.testing.assert_array_equal(gather(restored["opt"]["m"]), 2 * value)
params = checkpoint_read.load_params(directory, abstract["params"])
np.testing.assert_array_equal(gather(params["w"]), value)
print("WORKER_OK", process_id)
'''


def test_two_processes(tmp_path):
  """Two real JAX processes (4 CPU devices each): collective writes, per-process data."""
  import json
  import pathlib
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  worker = tmp_path / 'worker.py'
  worker.write_text(_MULTIHOST_WORKER)
  directory = tmp_path / 'ckpt'
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  procs = [
      subprocess.Popen([sys.executable, str(worker), str(i), str(port), str(directory), repo],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=multiprocess_env())
      for i in range(2)
  ]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0 and f'WORKER_OK {i}' in out, out[-3000:]

  # One JSON file, written by the primary, holding both processes' positions.
  on_disk = json.loads((directory / '1' / 'data' / 'metadata').read_text())
  assert on_disk['per_process'] == [
      {'big': 2**40, 'position': 100}, {'big': 2**40 + 1, 'position': 101}]
  # This (single-process) job cannot know which of the two positions is its own.
  mesh = _mesh(8, ('x',))
  replicated = NamedSharding(mesh, P())
  abstract = {
      'params': {'w': jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated)},
      'opt': {'m': jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated)},
      'rng': jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
  }
  with ckpt_lib.Checkpointer(str(directory), save_interval_steps=1, max_to_keep=2) as ckpt:
    with pytest.raises(ValueError, match='2 processes but this job has 1'):
      ckpt.restore(abstract)
  # Params alone do not depend on the process count.
  params = checkpoint_read.load_params(str(directory), abstract['params'])
  np.testing.assert_array_equal(
      np.asarray(params['w']), np.arange(64, dtype=np.float32).reshape(16, 4))
