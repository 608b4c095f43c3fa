"""A multi-process job whose process dies ends cleanly, with a last word, within a set time.

Without this, the survivors of a dead process wait in their next collective until JAX's
coordination service notices the missing heartbeats (`jax.distributed.initialize`'s
`heartbeat_timeout_seconds`, 100 s by default) and aborts them with a native stack dump
that names neither the step nor the checkpoint a restart resumes from.

`PeerWatchdog` is a daemon thread in every process of a multi-process job. Every
`interval_s` it publishes a beat in the coordination service's key-value store (a counter,
the newest finished step, and `running` / `done` / `failed: why`), and reads the others'.
A process whose counter has not moved for `config.distributed.peer_timeout_s` seconds, or
that published `failed`, is lost: the watchdog writes the last word (which process, its
last step, this process's step, the newest finalized checkpoint, how to resume) to the log,
to stderr and to `<workdir>/failure.txt` (`failure.process<i>.txt` on the others), and ends
this process with exit code 75 (EX_TEMPFAIL: rerun) without waiting on any collective.
JAX's own heartbeat timeout (`config.distributed.heartbeat_timeout_s`, which must be
longer) remains the backstop. The thread beats on its own, independently of the training
loop, so a long compilation or evaluation is not mistaken for a death.

When this process's job raises (`watch` -> `PeerWatchdog.fail`), it publishes `failed` so
the others stop at once, then waits up to the timeout to tell whether a lost peer is the
cause (a collective errors out as soon as its peer's connection drops) and says which; it
exits without JAX's shutdown barrier, which would wait for the peers until JAX's heartbeat
timeout and end in an abort.

Limits: when process 0, which hosts the coordination service, dies, JAX's client ends the
other processes within about a second by itself (it polls the service for errors), before
any Python code can run there; the newest finalized checkpoint is then found by the rerun
as always. A process that hangs with its beat thread alive is not detected here.

  watchdog = liveness.PeerWatchdog.for_job(config.distributed, workdir)  # None: 1 process
  with liveness.watch(watchdog):                                    # done / failed at exit
    train.train_and_evaluate(config, workdir)
  liveness.note_step(step)      # the training loops, after each step (shown in the last word)
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import traceback
from typing import Any, Callable, Iterator

from absl import logging

from heptapod_jax import console
from heptapod_jax.storage import paths

EXIT_PEER_LOST = 75  # EX_TEMPFAIL (sysexits.h): a transient failure; run the same command again.
_KEY = 'heptapod/liveness/{}'
_STEP: list[int | None] = [None]  # The newest finished step of this process (note_step).


def note_step(step: int) -> None:
  """Records the newest finished step (cheap; read by the watchdog's next beat)."""
  _STEP[0] = int(step)


def failure_file(workdir: str, process_index: int) -> str:
  """Where a process writes its last word: failure.txt (process 0), failure.process<i>.txt."""
  name = 'failure.txt' if process_index == 0 else f'failure.process{process_index}.txt'
  return paths.join(workdir, name)


# What Orbax writes last into a step directory on an object store (no atomic rename there);
# orbax.checkpoint's atomicity.CommitFileTemporaryPath.
COMMIT_MARKER = 'commit_success.txt'


def finalized_checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """Steps whose save finished. Locally Orbax writes a step under a temporary name and renames
  it into place: a directory named by its step is final. On a bucket (no atomic rename) it
  writes the step directory under its final name from the start and the commit marker
  (`COMMIT_MARKER`) last: only a step holding it is final. Only lists files: no Orbax call,
  which could wait on the dead peer."""
  try:
    names = paths.listdir(checkpoint_dir)
  except OSError:
    return []
  if paths.is_remote(checkpoint_dir):
    return sorted(int(n) for n in names if n.isdigit()
                  and paths.exists(paths.join(checkpoint_dir, n, COMMIT_MARKER)))
  return sorted(int(n) for n in names if n.isdigit()
                and paths.isdir(paths.join(checkpoint_dir, n)))


class PeerLost(Exception):
  """What the watchdog found (carried to `last_word`)."""

  def __init__(self, process: int, reason: str, peer_step: int | None):
    super().__init__(reason)
    self.process, self.reason, self.peer_step = process, reason, peer_step


class PeerWatchdog:
  """Beats in the coordination service's key-value store and watches the other processes."""

  def __init__(self, client: Any, *, process_index: int, process_count: int, timeout_s: float,
               workdir: str, interval_s: float | None = None,
               clock: Callable[[], float] = time.monotonic,
               exit_fn: Callable[[int], None] = os._exit):  # pylint: disable=protected-access
    if timeout_s <= 0:
      raise ValueError(f'timeout_s={timeout_s}: must be > 0.')
    self.client, self.index, self.count = client, process_index, process_count
    self.timeout_s, self.workdir = float(timeout_s), workdir
    self.interval_s = interval_s or min(max(self.timeout_s / 6, 0.2), 10.0)
    self.clock, self.exit_fn = clock, exit_fn
    self.state = 'running'
    self.seq = 0
    self.started = clock()
    # Per peer: (its last counter, when it last moved, its last step).
    self.seen: dict[int, tuple[str | None, float, int | None]] = {
        p: (None, self.started, None) for p in range(process_count) if p != process_index}
    self.unreachable_since: float | None = None
    self.finished: dict[int, str] = {}
    self._stop = threading.Event()
    self._speaking = threading.Lock()  # One last word per process.
    self._thread = threading.Thread(target=self._run, name='heptapod-peer-watchdog', daemon=True)

  @classmethod
  def for_job(cls, distributed_config, workdir: str) -> 'PeerWatchdog | None':
    """The watchdog of this job, or None (one process, or `peer_timeout_s=0`)."""
    import jax
    from jax._src import distributed  # The client of jax.distributed.initialize().
    client = distributed.global_state.client
    if jax.process_count() == 1 or not distributed_config.peer_timeout_s or client is None:
      return None
    return cls(client, process_index=jax.process_index(), process_count=jax.process_count(),
               timeout_s=distributed_config.peer_timeout_s, workdir=workdir)

  # -- the thread --------------------------------------------------------------------------

  def start(self) -> 'PeerWatchdog':
    self._beat()  # The first beat before the job's first collective.
    self._thread.start()
    logging.info('Peer watchdog: process %d of %d beats every %.1f s; a peer silent for %.0f s '
                 'ends the job (config.distributed.peer_timeout_s).', self.index, self.count,
                 self.interval_s, self.timeout_s)
    return self

  def stop(self, state: str = 'done') -> None:
    """Publishes this process's outcome ('done' or 'failed: why') and stops watching."""
    self.state = state
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=2 * self.interval_s + 1)
    with contextlib.suppress(Exception):
      self._beat()

  def _run(self) -> None:
    while not self._stop.wait(self.interval_s):
      try:
        self._beat()
        self.check()
      except PeerLost as lost:
        if not self._stop.is_set():
          self.last_word(lost)
        return

  def _beat(self) -> None:
    self.seq += 1
    step = _STEP[0]
    value = f'{self.seq} {-1 if step is None else step} {self.state}'
    try:
      self.client.key_value_set(_KEY.format(self.index), value, allow_overwrite=True)
    except Exception as e:  # The coordination service (process 0) is gone or unreachable.
      self._unreachable(e)
    else:
      self.unreachable_since = None

  def _unreachable(self, error: Exception) -> None:
    now = self.clock()
    if self.unreachable_since is None:
      self.unreachable_since = now
    elif now - self.unreachable_since > self.timeout_s:
      raise PeerLost(0, f'the coordination service (process 0) has been unreachable for '
                        f'{now - self.unreachable_since:.0f} s: {error}', None)

  def check(self) -> None:
    """Reads every peer's beat; raises PeerLost for a silent or failed one."""
    now = self.clock()
    for peer, (last_seq, moved_at, last_step) in list(self.seen.items()):
      try:
        value = self.client.key_value_try_get(_KEY.format(peer))
      except Exception as e:  # Not published yet (NOT_FOUND), or the service is gone.
        if 'NOT_FOUND' not in str(e) and 'not found' not in str(e).lower():
          self._unreachable(e)
        value = None
      if value is not None:
        match = re.fullmatch(r'(\d+) (-?\d+) (.*)', value, flags=re.S)
        if match:
          seq, step, state = match.group(1), int(match.group(2)), match.group(3)
          last_step = None if step < 0 else step
          if state == 'done':
            self.finished[peer] = state
            del self.seen[peer]
            continue
          if state.startswith('failed'):
            raise PeerLost(peer, f'it stopped with an error ({state[len("failed"):].lstrip(": ")})',
                           last_step)
          if seq != last_seq:
            self.seen[peer] = (seq, now, last_step)
            continue
      silent = now - moved_at
      if silent > self.timeout_s:
        raise PeerLost(peer, f'no heartbeat for {silent:.0f} s (config.distributed.'
                             f'peer_timeout_s={self.timeout_s:g})', last_step)
      self.seen[peer] = (last_seq, moved_at, last_step)

  # -- the last word -----------------------------------------------------------------------

  def _checkpoint_lines(self, resume_how: str) -> list[str]:
    ckpt_dir = paths.join(self.workdir, 'checkpoints')
    steps = finalized_checkpoint_steps(ckpt_dir)
    if not steps:
      return [f'No finalized checkpoint in {ckpt_dir}: a rerun of all {self.count} processes '
              'starts over.']
    return [f'Newest finalized checkpoint: step {steps[-1]} '
            f'({paths.join(ckpt_dir, str(steps[-1]))}).',
            f'To resume: {resume_how}start all {self.count} processes again with the same '
            f'command; they resume from step {steps[-1]} (or from the newest older step that '
            'restores, if that one is damaged).']

  def _this_step(self) -> str:
    return str(_STEP[0]) if _STEP[0] is not None else '(none yet)'

  def describe(self, lost: PeerLost, own_error: str | None = None) -> str:
    at = f' (its last step: {lost.peer_step})' if lost.peer_step is not None else ''
    lines = [f'Process {lost.process} of {self.count} was lost: {lost.reason}{at}.',
             f'This process ({self.index}) stopped at step {self._this_step()} and exits with '
             f'code {EXIT_PEER_LOST} without waiting on the lost process.']
    if own_error:
      lines.append(f'Its own error, a consequence of the loss: {own_error}')
    lines += self._checkpoint_lines('')
    lines.append(f'Detected at {time.strftime("%Y-%m-%d %H:%M:%S %Z")}.')
    return '\n'.join(lines)

  def describe_own_failure(self, error: str) -> str:
    return '\n'.join([
        f'Process {self.index} of {self.count} failed at step {self._this_step()}: {error}',
        'The other processes were told and stop too (the full traceback is in the log).',
        *self._checkpoint_lines('fix the cause, then '),
        f'At {time.strftime("%Y-%m-%d %H:%M:%S %Z")}.'])

  def _speak(self, text: str) -> None:
    """The text to the workdir's failure file, the log (uploaded now, for a bucket workdir) and
    stderr."""
    with contextlib.suppress(OSError):
      paths.write_text(failure_file(self.workdir, self.index), text + '\n')
    with contextlib.suppress(Exception):
      console.error(text)
    with contextlib.suppress(Exception):
      console.sync_log()

  def last_word(self, lost: PeerLost, own_error: str | None = None) -> None:
    """Says what happened, then ends this process without waiting on any collective. Process 0
    (the coordination service's host) lingers two beats so the others can speak first."""
    with self._speaking:
      self._speak(self.describe(lost, own_error))
      if self.index == 0:
        time.sleep(2 * self.interval_s)
      self.exit_fn(EXIT_PEER_LOST)

  def fail(self, error: BaseException) -> None:
    """This process's job raised: tell the others, then find out whether a lost peer is the
    cause (a collective fails fast when its peer's connection drops) or this error is; say
    so and exit (75 for a lost peer, 1 for this error) without JAX's shutdown barrier, which
    would wait on the peers until JAX's heartbeat timeout."""
    summary = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
    console.error(f'Process {self.index} raised:\n' + ''.join(
        traceback.format_exception(type(error), error, error.__traceback__)), terminal=False)
    self.state = f'failed: {summary}'[:300]
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout=2 * self.interval_s + 1)
    own = self.describe_own_failure(summary)
    with contextlib.suppress(OSError):  # Provisional: JAX may end this process any moment.
      paths.write_text(failure_file(self.workdir, self.index), own + '\n')
    deadline = self.clock() + self.timeout_s + 2 * self.interval_s
    while True:
      try:
        self._beat()
        self.check()
      except PeerLost as lost:
        self.last_word(lost, own_error=summary)
        return
      if self.clock() >= deadline:
        break
      time.sleep(self.interval_s)
    with self._speaking:
      self._speak(own)
      with contextlib.suppress(Exception):
        traceback.print_exception(type(error), error, error.__traceback__)
      self.exit_fn(1)


@contextlib.contextmanager
def watch(watchdog: PeerWatchdog | None) -> Iterator[None]:
  """Runs the block under `watchdog` (if any): 'done' on return; on an error, `fail`."""
  if watchdog is None:
    yield
    return
  watchdog.start()
  try:
    yield
  except BaseException as e:
    watchdog.fail(e)
    raise  # Only reached when exit_fn returns (tests).
  watchdog.stop('done')


__all__ = ['COMMIT_MARKER', 'EXIT_PEER_LOST', 'PeerLost', 'PeerWatchdog', 'failure_file',
           'finalized_checkpoint_steps', 'note_step', 'watch']
