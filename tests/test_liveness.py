"""The peer watchdog's rules (heptapod_jax/training/liveness.py) on a fake key-value store and
clock. The real fault, a killed process of a 2-process job, is tests/faults/test_lost_process.py."""
import os

import pytest

from heptapod_jax import config_lib
from heptapod_jax.training import liveness


class FakeStore:
  """The coordination service's key-value calls; `down` makes every call fail like a lost
  coordinator, a missing key fails like JAX's NOT_FOUND."""

  def __init__(self):
    self.values, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError('UNAVAILABLE: failed to connect to all addresses')
    assert allow_overwrite
    self.values[key] = value

  def key_value_try_get(self, key):
    if self.down:
      raise RuntimeError('UNAVAILABLE: failed to connect to all addresses')
    if key not in self.values:
      raise RuntimeError(f'NOT_FOUND: Config key {key} not found.')
    return self.values[key]


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _watchdog(store, clock, workdir, index=0, count=3, exits=None):
  kwargs = {'exit_fn': exits.append} if exits is not None else {}
  return liveness.PeerWatchdog(store, process_index=index, process_count=count, timeout_s=10,
                               workdir=str(workdir), interval_s=1, clock=clock, **kwargs)


def _peer(store, peer, seq, step, state='running'):
  store.values[f'heptapod/liveness/{peer}'] = f'{seq} {step} {state}'


def test_a_silent_peer_is_lost_after_the_timeout_and_not_before(tmp_path):
  store, clock = FakeStore(), Clock()
  w = _watchdog(store, clock, tmp_path)
  for t in range(12):  # Both peers beat for 12 s.
    clock.now += 1
    _peer(store, 1, t, 7 + t)
    _peer(store, 2, t, 7 + t)
    w.check()
  for _ in range(10):  # Peer 2 goes silent: 10 s is the limit, not yet over it.
    clock.now += 1
    _peer(store, 1, int(clock.now), 30)
    w.check()
  clock.now += 1
  _peer(store, 1, int(clock.now), 30)
  with pytest.raises(liveness.PeerLost) as lost:
    w.check()
  assert lost.value.process == 2 and lost.value.peer_step == 18
  assert 'no heartbeat for 11 s' in lost.value.reason


def test_a_peer_that_never_beat_is_lost_and_done_or_failed_peers_are_told_apart(tmp_path):
  store, clock = FakeStore(), Clock()
  w = _watchdog(store, clock, tmp_path, count=2)
  clock.now += 11
  with pytest.raises(liveness.PeerLost, match='no heartbeat for 11 s'):
    w.check()
  # A peer that finished ('done') is never lost, however long it stays silent.
  w = _watchdog(store, clock, tmp_path, count=2)
  _peer(store, 1, 5, 40, 'done')
  w.check()
  clock.now += 1000
  w.check()
  # A peer that failed is lost at once, with its error.
  w = _watchdog(store, clock, tmp_path, count=2)
  _peer(store, 1, 6, 41, 'failed: ValueError: bad batch')
  with pytest.raises(liveness.PeerLost, match=r'stopped with an error \(ValueError: bad batch\)'):
    w.check()


def test_an_unreachable_coordinator_is_lost_after_the_timeout(tmp_path):
  store, clock = FakeStore(), Clock()
  w = _watchdog(store, clock, tmp_path, index=1, count=2)
  _peer(store, 0, 1, 3)
  w.check()
  store.down = True
  w._beat()  # pylint: disable=protected-access
  clock.now += 10
  w._beat()  # pylint: disable=protected-access
  clock.now += 1
  with pytest.raises(liveness.PeerLost, match=r'coordination service \(process 0\) has been '
                                              r'unreachable for 11 s') as lost:
    w._beat()  # pylint: disable=protected-access
  assert lost.value.process == 0


def test_the_last_word_names_the_step_and_the_newest_finalized_checkpoint(tmp_path):
  for name in ('10', '20', '30.orbax-checkpoint-tmp-1733', 'notes'):
    os.makedirs(tmp_path / 'checkpoints' / name)
  assert liveness.finalized_checkpoint_steps(str(tmp_path / 'checkpoints')) == [10, 20]
  store, clock, exits = FakeStore(), Clock(), []
  w = _watchdog(store, clock, tmp_path, count=2, exits=exits)
  w.interval_s = 0.01  # Process 0 lingers two beats before it exits.
  liveness.note_step(23)
  w.last_word(liveness.PeerLost(1, 'no heartbeat for 11 s', 21))
  assert exits == [liveness.EXIT_PEER_LOST]
  text = (tmp_path / 'failure.txt').read_text()
  assert text.startswith('Process 1 of 2 was lost: no heartbeat for 11 s (its last step: 21).\n'
                         'This process (0) stopped at step 23 and exits with code 75')
  assert f'Newest finalized checkpoint: step 20 ({tmp_path}/checkpoints/20).' in text
  assert 'they resume from step 20' in text


def test_a_failing_process_tells_the_others_and_names_the_cause(tmp_path):
  os.makedirs(tmp_path / 'checkpoints' / '4')
  liveness.note_step(5)
  store, clock, exits = FakeStore(), Clock(), []
  # Its peers alive: this process's own error is the cause; exit 1, its peers read 'failed'.
  w = _watchdog(store, clock, tmp_path, index=1, count=2, exits=exits)
  w.interval_s = 0.001
  _peer(store, 0, 1, 5)

  def beating():
    clock.now += 1
    store.values['heptapod/liveness/0'] = f'{int(clock.now)} 5 running'
    return clock.now

  w.clock = beating
  w.fail(ValueError('bad batch at row 3'))
  assert exits == [1]
  assert store.values['heptapod/liveness/1'].endswith('failed: ValueError: bad batch at row 3')
  text = (tmp_path / 'failure.process1.txt').read_text()
  assert text.startswith('Process 1 of 2 failed at step 5: ValueError: bad batch at row 3')
  assert 'fix the cause, then start all 2 processes again' in text and 'from step 4' in text
  # A peer gone silent meanwhile: the loss is the cause, this error its consequence; exit 75.
  exits.clear()
  w = _watchdog(store, clock, tmp_path, index=1, count=2, exits=exits)
  w.interval_s = 0.001
  w.clock = clock
  last_seq = store.values['heptapod/liveness/0'].split()[0]
  w.seen[0] = (last_seq, clock.now - 100, 5)  # Its last beat, 100 s ago.
  w.fail(RuntimeError('Gloo all-reduce failed: Connection reset by peer'))
  assert exits == [liveness.EXIT_PEER_LOST]
  text = (tmp_path / 'failure.process1.txt').read_text()
  assert text.startswith('Process 0 of 2 was lost: no heartbeat for 100 s')
  assert 'Its own error, a consequence of the loss: RuntimeError: Gloo all-reduce failed' in text


def test_distributed_timeouts_are_validated():
  c = config_lib.base_config()
  c.distributed.heartbeat_timeout_s = 30
  c.distributed.peer_timeout_s = 60
  with pytest.raises(ValueError, match=r'config.distributed.heartbeat_timeout_s=30 must be longer '
                                       r'than config.distributed.peer_timeout_s=60'):
    config_lib.validate_distributed(c)
  c.distributed.peer_timeout_s = 0  # The watchdog off: JAX's timeout alone.
  config_lib.validate_distributed(c)
  c.distributed.peer_timeout_s = -1
  with pytest.raises(ValueError, match='config.distributed.peer_timeout_s=-1'):
    config_lib.validate_distributed(c)
