"""Damaged checkpoints: the newest intact step restores; damaged steps are logged, moved
aside into `<checkpoints>/damaged/` and never deleted; none intact stops unless allow_scratch.

The same through `train.train_and_evaluate`: tests/faults/test_damaged_resume.py."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from heptapod_jax.storage import checkpoint as ckpt_lib

from _multiprocess import multiprocess_env


def _mesh():
  return jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))


def _state(mesh, seed: int) -> dict:
  """A train-state-like pytree: fsdp-sharded params and moments, a replicated step and key."""
  k1, k2 = jax.random.split(jax.random.key(seed))

  def put(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

  params = {'kernel': put(jax.random.normal(k1, (16, 32)), P(None, 'fsdp')),
            'embed': put(jax.random.normal(k2, (64, 8)), P('fsdp', None))}
  return {'step': put(jnp.int32(seed), P()), 'params': params,
          'mu': jax.tree.map(lambda x: 0.5 * x, params), 'rng': put(jax.random.key(seed + 1), P())}


def _assert_equal(a, b):
  def host(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  la, ta = jax.tree.flatten(jax.tree.map(host, a))
  lb, tb = jax.tree.flatten(jax.tree.map(host, b))
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)  # Bit-identical.


def _files(path) -> dict[str, int]:
  """Relative path -> size of every file under `path`."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = os.path.getsize(full)
  return out


def _open(directory) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(str(directory), save_interval_steps=1, max_to_keep=3)


@pytest.fixture(scope='module')
def template(tmp_path_factory):
  """Steps 1, 2, 3 of distinct states, saved once; each test damages its own copy."""
  directory = tmp_path_factory.mktemp('template') / 'ckpt'
  mesh = _mesh()
  with ckpt_lib.Checkpointer(str(directory), save_interval_steps=1, max_to_keep=3,
                             async_save=False) as ckpt:
    for step in (1, 2, 3):
      assert ckpt.save(step, _state(mesh, step), data_state={'position': step},
                       config={'step': step})
  return directory


# --------------------------------------------------------------------------- damage
def _garbage(path):
  path.write_bytes(b'\x00\x17not json{{')


def _truncate_array_data(step_dir):
  data = [p for p in step_dir.glob('state/**/d/*') if p.is_file()]
  assert data, sorted(_files(step_dir))
  for p in data:
    with open(p, 'r+b') as f:
      f.truncate(p.stat().st_size // 2)
  return step_dir


def _delete_manifest(step_dir):
  (step_dir / 'state' / 'manifest.ocdbt').unlink()
  return step_dir


def _delete_array_data(step_dir):
  # The merged OCDBT data files the root manifest points to.
  data = list((step_dir / 'state' / 'd').iterdir())
  assert data
  for p in data:
    p.unlink()
  return step_dir


def _garbage_step_metadata(step_dir):
  _garbage(step_dir / '_CHECKPOINT_METADATA')
  return step_dir


def _garbage_array_metadata(step_dir):
  _garbage(step_dir / 'state' / '_METADATA')
  return step_dir


def _garbage_data_item(step_dir):
  _garbage(step_dir / 'data' / 'metadata')
  return step_dir


def _no_state_item(step_dir):
  # A save that wrote its JSON items but never its arrays.
  shutil.rmtree(step_dir / 'state')
  return step_dir


def _unfinished_save(step_dir):
  # What a save killed before Orbax's atomic rename leaves: a temporary directory,
  # here also missing its manifest and commit marker.
  tmp = step_dir.parent / f'{step_dir.name}.orbax-checkpoint-tmp-1732800000123456'
  step_dir.rename(tmp)
  (tmp / 'state' / 'manifest.ocdbt').unlink()
  (tmp / 'commit_success.txt').unlink()
  return tmp


# kind -> (damage(step_dir) -> path now holding the damaged step, words of the reason).
_DAMAGE = {
    'deleted_manifest': (_delete_manifest, 'NOT_FOUND'),
    'deleted_array_data': (_delete_array_data, 'NOT_FOUND'),
    'truncated_array_data': (_truncate_array_data, 'OUT_OF_RANGE'),
    'garbage_step_metadata': (_garbage_step_metadata, '3/_CHECKPOINT_METADATA: JSONDecodeError'),
    'garbage_array_metadata': (_garbage_array_metadata, '3/state/_METADATA: JSONDecodeError'),
    'garbage_data_item': (_garbage_data_item, '3/data/metadata: JSONDecodeError'),
    'missing_state_item': (_no_state_item, "item directories ['state'] missing"),
    'unfinished_save': (_unfinished_save, 'unfinished save'),
}


@pytest.mark.parametrize('kind', sorted(_DAMAGE))
def test_damaged_latest_falls_back_and_is_kept_aside(kind, template, tmp_path, caplog):
  directory = tmp_path / 'ckpt'
  shutil.copytree(template, directory)
  damage, words = _DAMAGE[kind]
  damaged = damage(directory / '3')
  damaged_files = _files(damaged)
  mesh = _mesh()

  with caplog.at_level(logging.WARNING):
    ckpt = _open(directory)
    restored = ckpt.restore_latest_intact(_state(mesh, 0))
  assert restored.step == 2
  _assert_equal(restored.state, _state(mesh, 2))
  assert restored.data_state == {'position': 2} and restored.config == {'step': 2}
  [(step, reason)] = restored.skipped
  assert step == 3 and words in reason, reason
  # Logged with the step directory and why.
  assert str(damaged) in caplog.text and words in caplog.text

  # Kept, file for file, under damaged/, where Orbax no longer counts it as a step.
  [aside] = (directory / ckpt_lib.DAMAGED_DIR).iterdir()
  assert aside.name.startswith(damaged.name + '.') and reason.endswith(f'moved to {aside}')
  assert _files(aside) == damaged_files
  assert not damaged.exists() and ckpt.all_steps() == [1, 2]

  # Step 3 can be saved again, and keep-3 holds 1, 2 and the new 3 (the damaged one
  # neither blocks the save nor pushes the intact steps out).
  new = _state(mesh, 30)
  assert ckpt.save(3, new, data_state={'position': 30}, config={'step': 30})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [1, 2, 3]
  state, data_state, _ = ckpt.restore(_state(mesh, 0))
  _assert_equal(state, new)
  assert data_state == {'position': 30}
  assert ckpt.save(4, new, data_state={'position': 40}, config={})
  ckpt.close()
  assert ckpt.all_steps() == [2, 3, 4]  # The ordinary keep-3 rotation.
  assert _files(aside) == damaged_files  # Never touched by the rotation.


def test_older_damaged_steps_are_skipped_too(template, tmp_path):
  directory = tmp_path / 'ckpt'
  shutil.copytree(template, directory)
  _truncate_array_data(directory / '3')
  _garbage_array_metadata(directory / '2')
  with _open(directory) as ckpt:
    restored = ckpt.restore_latest_intact(_state(_mesh(), 0))
    assert ckpt.all_steps() == [1]
  assert restored.step == 1 and [s for s, _ in restored.skipped] == [3, 2]
  _assert_equal(restored.state, _state(_mesh(), 1))
  assert sorted(p.name.split('.')[0] for p in (directory / 'damaged').iterdir()) == ['2', '3']


def test_no_intact_checkpoint_stops_unless_allow_scratch(template, tmp_path):
  directory = tmp_path / 'ckpt'
  shutil.copytree(template, directory)
  _truncate_array_data(directory / '3')
  _garbage_array_metadata(directory / '2')
  _no_state_item(directory / '1')
  mesh = _mesh()
  ckpt = _open(directory)
  with pytest.raises(ckpt_lib.NoIntactCheckpointError) as error:
    ckpt.restore_latest_intact(_state(mesh, 0))
  message = str(error.value)
  for step in (1, 2, 3):
    assert f'step {step} ({directory}/{step}):' in message
  assert 'OUT_OF_RANGE' in message and 'JSONDecodeError' in message and "['state']" in message
  assert '--config.allow_scratch=True' in message
  assert [s for s, _ in error.value.found] == [3, 2, 1]
  # Nothing moved or deleted without the user's say-so.
  assert ckpt.all_steps() == [1, 2, 3] and not (directory / 'damaged').exists()

  assert ckpt.restore_latest_intact(_state(mesh, 0), allow_scratch=True) is None
  assert ckpt.all_steps() == [] and ckpt.latest_step() is None
  assert len(list((directory / 'damaged').iterdir())) == 3
  # Starting over: step 1 saves and restores.
  assert ckpt.save(1, _state(mesh, 5), data_state={'position': 0}, config={})
  restored = ckpt.restore_latest_intact(_state(mesh, 0))
  ckpt.close()
  assert restored.step == 1 and restored.skipped == []
  _assert_equal(restored.state, _state(mesh, 5))


def test_process_count_mismatch_and_unavailable_storage_are_not_damage(template, tmp_path,
                                                                        monkeypatch):
  directory = tmp_path / 'ckpt'
  shutil.copytree(template, directory)
  data_file = directory / '3' / 'data' / 'metadata'
  data = json.loads(data_file.read_text())
  data.update(process_count=2, per_process=[{'position': 3}, {'position': 4}])
  data_file.write_text(json.dumps(data))
  abstract = _state(_mesh(), 0)
  with _open(directory) as ckpt:
    with pytest.raises(ckpt_lib.ProcessCountMismatchError, match='2 processes but this job has 1'):
      ckpt.restore_latest_intact(abstract)
    assert ckpt.all_steps() == [1, 2, 3]

  shutil.rmtree(directory)
  shutil.copytree(template, directory)
  with _open(directory) as ckpt:
    def unavailable(step, args):
      raise ValueError(f'UNAVAILABLE: the storage of {directory}/{step} did not answer')

    monkeypatch.setattr(ckpt._manager, 'restore', unavailable)  # pylint: disable=protected-access
    with pytest.raises(ValueError, match='UNAVAILABLE'):
      ckpt.restore_latest_intact(abstract)
    monkeypatch.undo()
    assert ckpt.all_steps() == [1, 2, 3]
  assert not (directory / 'damaged').exists()


_TWO_PROCESS_WORKER = r'''
import glob, os, sys
process_id, port, directory, repo = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, repo)
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from heptapod_jax.storage import checkpoint as ckpt_lib

mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
sharding = NamedSharding(mesh, P("x"))
def state(step):
  value = np.arange(64, dtype=np.float32).reshape(16, 4) + step
  return {"w": jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])}
def gather(x):
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))

with ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=3) as ckpt:
  for step in (1, 2):
    assert ckpt.save(step, state(step), data_state={"position": 10 * step + process_id}, config={})
if process_id == 0:  # Damage step 2 and leave a killed save of step 3.
  for path in glob.glob(f"{directory}/2/state/**/d/*", recursive=True):
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  os.makedirs(f"{directory}/3.orbax-checkpoint-tmp-1/state")
multihost_utils.sync_global_devices("damaged")

ckpt = ckpt_lib.Checkpointer(directory, save_interval_steps=1, max_to_keep=3)
restored = ckpt.restore_latest_intact(state(0))
assert restored.step == 1, restored.step
assert [s for s, _ in restored.skipped] == [2, 3], restored.skipped
assert restored.data_state == {"position": 10 + process_id}, restored.data_state
np.testing.assert_array_equal(gather(restored.state["w"]), gather(state(1)["w"]))
assert ckpt.all_steps() == [1], ckpt.all_steps()
assert sorted(p.split(".")[0] for p in os.listdir(f"{directory}/damaged")) == ["2", "3"]
assert ckpt.save(2, state(20), data_state={"position": 200 + process_id}, config={})
ckpt.wait_until_finished()
restored = ckpt.restore_latest_intact(state(0))
ckpt.close()
assert restored.step == 2 and restored.data_state == {"position": 200 + process_id}
np.testing.assert_array_equal(gather(restored.state["w"]), gather(state(20)["w"]))
print("WORKER_OK", process_id, flush=True)
'''


def test_two_processes_agree_and_only_process_0_moves(tmp_path):
  """Two JAX processes (4 CPU devices each): the same fallback on both, one rename."""
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  worker = tmp_path / 'worker.py'
  worker.write_text(_TWO_PROCESS_WORKER)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {k: v for k, v in multiprocess_env().items() if k != 'XLA_FLAGS'}
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), str(port),
                             str(tmp_path / 'ckpt'), repo],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
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
  assert sorted(p.name.split('.')[0] for p in (tmp_path / 'ckpt' / 'damaged').iterdir()) == [
      '2', '3']
