"""Restore across topologies: a checkpoint written on 8 devices restores on 4 (another mesh
shape and other shardings), is saved there and restores on 8 again, values bit-identical
throughout; the parameters alone then load onto a single device for sampling."""
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from heptapod_jax import sharding
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import checkpoint_read
from heptapod_jax.storage import runs
from heptapod_jax.training import train

import _harness as h

_AUTO = jax.sharding.AxisType.Auto


@flax.struct.dataclass
class _TrainState:
  step: jax.Array
  params: dict
  opt_state: tuple
  ema_params: dict
  rng: jax.Array


def _host(tree):
  def convert(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(convert, tree)


def _assert_equal(a, b):
  la, ta = jax.tree.flatten(_host(a))
  lb, tb = jax.tree.flatten(_host(b))
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)  # Bit-identical.


def _assert_placed(tree, expected, devices):
  """Every leaf has the expected leaf's sharding (`expected` holds shardings or abstract
  arrays), on exactly `devices`."""
  for x, e in zip(jax.tree.leaves(tree), jax.tree.leaves(expected)):
    want = getattr(e, 'sharding', e)
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    assert x.sharding.device_set == set(devices)


def _abstract(state, mesh, specs):
  """The state's shapes on `mesh`: leaves named like a parameter get its spec, the rest is
  replicated (step, optimizer count, key)."""
  def leaf(path, x):
    name = getattr(path[-1], 'key', None)
    spec = specs.get(name, P()) if x.ndim else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(lambda: state))


def test_checkpointer_8_to_4_to_8_devices_then_params_onto_one(tmp_path):
  devices = jax.devices()
  mesh8 = jax.make_mesh((8,), ('fsdp',), devices=devices, axis_types=(_AUTO,))
  specs8 = {'kernel': P(None, 'fsdp'), 'embed': P('fsdp', None), 'bias': P('fsdp')}
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {'kernel': jax.random.normal(k1, (16, 32)), 'embed': jax.random.normal(k2, (64, 16)),
            'bias': jax.random.normal(k3, (32,))}
  params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh8, s)), params, specs8)
  tx = optax.adamw(1e-2)
  updates, opt_state = tx.update(jax.tree.map(jnp.sin, params), tx.init(params), params)
  replicated = NamedSharding(mesh8, P())
  original = _TrainState(
      step=jax.device_put(jnp.int32(1), replicated), params=optax.apply_updates(params, updates),
      opt_state=opt_state, ema_params=jax.tree.map(lambda p: 0.5 * p, params),
      rng=jax.device_put(jax.random.key(7), replicated))
  assert not original.params['kernel'].sharding.is_fully_replicated
  directory = str(tmp_path / 'ckpt')
  with ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=2) as ckpt:
    assert ckpt.save(1, original, data_state={'position': 16}, config={})

  # 4 devices, a 2-D mesh, every parameter sharded differently. A new Checkpointer, as a new
  # process would have.
  mesh4 = jax.make_mesh((2, 2), ('data', 'fsdp'), devices=devices[:4], axis_types=(_AUTO,) * 2)
  specs4 = {'kernel': P('fsdp', 'data'), 'embed': P(None, 'fsdp'), 'bias': P(None)}
  abstract4 = _abstract(original, mesh4, specs4)
  with ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=2) as ckpt:
    restored = ckpt.restore_latest_intact(abstract4)
    assert restored.step == 1 and restored.skipped == [] and restored.data_state == {'position': 16}
    _assert_equal(restored.state, original)
    _assert_placed(restored.state, abstract4, devices[:4])
    # An update on the 4 devices, saved from there.
    second = restored.state.replace(
        step=restored.state.step + 1,
        params=jax.tree.map(lambda p: 2 * p + 1, restored.state.params),
        ema_params=jax.tree.map(lambda p: p - 1, restored.state.ema_params))
    assert ckpt.save(2, second, data_state={'position': 32}, config={})

  mesh8b = jax.make_mesh((4, 2), ('fsdp', 'tensor'), devices=devices, axis_types=(_AUTO,) * 2)
  specs8b = {'kernel': P('tensor', 'fsdp'), 'embed': P('fsdp', 'tensor'),
             'bias': P(('fsdp', 'tensor'))}
  abstract8 = _abstract(original, mesh8b, specs8b)
  with ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=2) as ckpt:
    back = ckpt.restore_latest_intact(abstract8)
  assert back.step == 2 and back.data_state == {'position': 32}
  _assert_equal(back.state, second)
  _assert_placed(back.state, abstract8, devices)

  # The params-only export onto one device, no mesh at all (sampling on one chip).
  one = SingleDeviceSharding(devices[0])
  for key in ('params', 'ema_params'):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                            getattr(original, key))
    loaded = checkpoint_read.load_params(directory, abstract, key=key)
    _assert_equal(loaded, getattr(second, key))
    _assert_placed(loaded, abstract, devices[:1])


# --------------------------------------------------------------------------- trainer
_create_mesh = sharding.create_mesh


def _trainer(monkeypatch, workdir, num_devices: int, mesh_shape):
  """A real Trainer whose mesh spans only the first `num_devices` devices (`create_mesh`
  always takes all of them, and the process has 8)."""
  config = h.config(4, str(workdir / 'no_data'), **{
      'mesh.shape': mesh_shape, 'mesh.rules_preset': 'fsdp', 'train.peak_tflops': 1.0})
  with monkeypatch.context() as m:
    m.setattr(sharding, 'create_mesh',
              functools.partial(_create_mesh, devices=jax.devices()[:num_devices]))
    return train.Trainer(config, str(workdir))


def _start(trainer, workdir):
  """What train_and_evaluate does at start-up: (state, data position, shardings)."""
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    shardings = trainer.state_shardings()
    with ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), save_interval_steps=1,
                               max_to_keep=3) as ckpt:
      state, data_state = trainer.initial_state(shardings, ckpt)
  return state, data_state, shardings


def _save(trainer, workdir, state, step, position):
  with jax.set_mesh(trainer.mesh):
    with ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), save_interval_steps=1,
                               max_to_keep=3) as ckpt:
      assert ckpt.save(step, state, data_state={'position': position}, config={}, force=True)


def test_trainer_resumes_8_to_4_to_8_devices_and_samples_params_on_one(tmp_path, monkeypatch):
  devices = jax.devices()
  trainer8 = _trainer(monkeypatch, tmp_path, 8, (1, 8, 1))
  first, data_state, shardings8 = _start(trainer8, tmp_path)
  assert data_state is None and int(first.step) == 0  # Nothing to resume: a fresh state.
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(first.params))
  _save(trainer8, tmp_path, first, 3, 48)

  trainer4 = _trainer(monkeypatch, tmp_path, 4, (1, 4, 1))
  on4, data_state, shardings4 = _start(trainer4, tmp_path)
  assert data_state == {'position': 48}
  _assert_equal(on4, first)
  _assert_placed(on4, shardings4, devices[:4])
  with jax.set_mesh(trainer4.mesh):
    second = on4.replace(step=on4.step + 1, params=jax.tree.map(lambda p: p + 0.5, on4.params),
                         ema_params=jax.tree.map(lambda p: p * 0.25, on4.ema_params))
  _save(trainer4, tmp_path, second, 4, 64)

  trainer8 = _trainer(monkeypatch, tmp_path, 8, (2, 4, 1))
  back, data_state, shardings8 = _start(trainer8, tmp_path)
  assert data_state == {'position': 64}
  _assert_equal(back, second)
  _assert_placed(back, shardings8, devices)

  # Sample mode's loading path, on a one-device mesh.
  trainer1 = _trainer(monkeypatch, tmp_path, 1, (1, 1, 1))
  with jax.set_mesh(trainer1.mesh), nn.logical_axis_rules(trainer1.rules):
    params, step, key = runs.restore_params(trainer1, str(tmp_path))
  assert step == 4
  _assert_equal(params, getattr(second, key))
  assert all(x.sharding.device_set == {devices[0]} for x in jax.tree.leaves(params))
