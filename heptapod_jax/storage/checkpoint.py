"""Checkpointing: a thin wrapper around Orbax's `CheckpointManager`.

Every saved step is a directory `<directory>/<step>/` with three items:

* `state`: the train state, any pytree of (sharded, possibly multi-host)
  `jax.Array`s, written collectively by all processes with
  `StandardSave`. Typed PRNG keys (`jax.random.key`) are supported natively
  by Orbax: it writes their key data and re-wraps them on restore.
* `data`: the input pipeline position. Each process has its own small JSON
  dict; they are all-gathered so that the single JSON file written by the
  primary process holds one entry per process, and each process gets its own
  entry back on restore.
* `config`: the run's config as JSON, for provenance (best-effort encoded).

Restoring takes an *abstract* state (`jax.ShapeDtypeStruct`s carrying the
current mesh's shardings), so a checkpoint written on one mesh or device count
restores onto another.

Damaged checkpoints (`Checkpointer.restore_latest_intact`, what resuming uses):
steps are tried newest first and one that fails to restore (missing item
directory, missing or truncated array data, unreadable metadata) is skipped
with a logged reason. Skipped steps and saves that never committed (Orbax
temporary directories left by a killed save) are never deleted: they are moved
into `<directory>/damaged/<name>.<UTC time>`, where Orbax no longer counts them
as steps, so they neither block a new save of the same step number nor make
keep-N delete the intact steps.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import re
import time
from typing import Any, Mapping, NamedTuple

import jax
from jax.experimental import multihost_utils
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from heptapod_jax.storage import paths

PyTree = Any

STATE = 'state'
DATA = 'data'
CONFIG = 'config'
ITEM_NAMES = (STATE, DATA, CONFIG)

# Version of the layout of the `data` item, so that a future change can still
# read old checkpoints.
_DATA_FORMAT_VERSION = 1

# Subdirectory of the checkpoint root that damaged and unfinished steps are moved
# into; not a step name, so Orbax ignores it.
DAMAGED_DIR = 'damaged'
# JSON files of a step (relative paths): Orbax's step metadata (commit time, item
# handlers), the state's tree metadata, and the JSON items (the handler's file name).
_JSON_FILES = ('_CHECKPOINT_METADATA', f'{STATE}/_METADATA', f'{DATA}/metadata',
               f'{CONFIG}/metadata')
# A step directory, or the temporary directory of a save that never committed
# ('<step>.orbax-checkpoint-tmp-<time>').
_STEP_OR_TMP_NAME = re.compile(r'^(\d+)(\.orbax-checkpoint-tmp.*)?$')
# Status codes (tensorstore, XLA) of failures of the environment rather than of
# the checkpoint's bytes: retrying later may succeed, so they are never "damage".
_ENVIRONMENT_STATUS = ('PERMISSION_DENIED', 'UNAUTHENTICATED', 'UNAVAILABLE',
                       'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'CANCELLED', 'ABORTED')


class NoIntactCheckpointError(RuntimeError):
  """Checkpoints were found, but none of them restores.

  Attributes:
    directory: the checkpoint root.
    found: `[(step, reason), ...]`, newest first, every step that failed.
  """

  def __init__(self, directory: epath.Path, found: list[tuple[int, str]],
               set_aside: list[tuple[int, str]]):
    self.directory = directory
    self.found = list(found)
    lines = [f'  step {step} ({directory}/{step}): {reason}' for step, reason in found]
    if set_aside:
      lines.append('Unfinished saves, already moved aside:')
      lines += [f'  step {step}: {reason}' for step, reason in set_aside]
    super().__init__(
        f'no intact checkpoint in {directory}: all {len(found)} steps fail to restore '
        f'(steps {[s for s, _ in found]}):\n' + '\n'.join(lines) + '\n'
        'These steps were left in place. Repair or remove them, or pass '
        '--config.allow_scratch=True to start from scratch (the steps are then moved into '
        f'{directory}/{DAMAGED_DIR}/, not deleted). If every step reports the same shape or '
        'structure mismatch, the config changed rather than the checkpoints being damaged.')


class ProcessCountMismatchError(ValueError):
  """The checkpoint's input positions were written by a different number of processes."""


class RestoredCheckpoint(NamedTuple):
  """What `Checkpointer.restore_latest_intact` returns.

  Attributes:
    state: the train state, with the structure and shardings of the abstract state.
    data_state: this process's input pipeline position.
    config: the saved config dict.
    step: the step restored.
    skipped: `[(step, reason), ...]`, newest first: the steps newer than `step`
      that failed to restore, then the unfinished saves found when the
      checkpointer was opened; each reason ends with where it was moved.
  """
  state: PyTree
  data_state: dict[str, Any]
  config: dict[str, Any]
  step: int
  skipped: list[tuple[int, str]]


def to_jsonable(value: Any) -> Any:
  """Best-effort conversion of `value` into something `json.dumps` accepts.

  Config dicts hold tuples, numpy scalars, enums, dtypes, callables and the
  like; none of that should prevent a checkpoint from being written, because
  the config item is for provenance only and is never fed back into code
  automatically. Unknown objects therefore become their `str`.

  Args:
    value: any Python object, usually a (nested) config dict.

  Returns:
    A structure of dicts with string keys, lists, str, int, float, bool and
    None.
  """
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, enum.Enum):
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    return [to_jsonable(v) for v in items]
  # ml_collections.ConfigDict / FrozenConfigDict, without importing it.
  to_dict = getattr(value, 'to_dict', None)
  if callable(to_dict):
    try:
      return to_jsonable(to_dict())
    except Exception:  # pylint: disable=broad-except
      pass
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, enum.Enum):
    return str(value.name)
  return str(value)


def _allgather_json(obj: Any) -> list[Any]:
  """Returns `[obj of process 0, obj of process 1, ...]` on every process.

  Values are sent as UTF-8 JSON bytes rather than as numeric arrays: this keeps
  the gather generic (any JSON dict, keys need not match) and avoids 64-bit
  positions being silently truncated to int32 when `jax_enable_x64` is off.
  """
  payload = np.frombuffer(json.dumps(obj, sort_keys=True).encode('utf-8'), dtype=np.uint8)
  if jax.process_count() == 1:
    return [json.loads(payload.tobytes().decode('utf-8'))]
  # Two rounds because process_allgather needs equal shapes on every process.
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(payload.size))).reshape(-1)
  padded = np.zeros((int(lengths.max()),), dtype=np.uint8)
  padded[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [
      json.loads(gathered[i, :int(n)].tobytes().decode('utf-8'))
      for i, n in enumerate(lengths)
  ]


def with_sharding_check(abstract_state: PyTree) -> PyTree:
  """Validates that every array leaf of `abstract_state` carries a sharding.

  Without a sharding Orbax restores a leaf as a host numpy array (or with the
  sharding stored in the checkpoint, which may name devices that do not exist
  any more), which is never what the trainer wants.
  """
  missing = []

  def check(path, leaf):
    is_array = isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array))
    if is_array and getattr(leaf, 'sharding', None) is None:
      missing.append(jax.tree_util.keystr(path))
    return leaf

  jax.tree_util.tree_map_with_path(check, abstract_state)
  if missing:
    shown = ', '.join(missing[:5]) + (' ...' if len(missing) > 5 else '')
    raise ValueError(
        f'abstract_state leaves need a `.sharding` (the current mesh\'s); missing on '
        f'{len(missing)} leaves: {shown}. Build it with jax.eval_shape + '
        'jax.ShapeDtypeStruct(..., sharding=...).')
  return abstract_state


def describe_error(error: BaseException) -> str:
  """One line for a restore failure: the type and the first line of the message."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  # Tensorstore appends the whole JSON spec of the array; the path is already named before it.
  text = text.split(' [tensorstore_spec', 1)[0]
  if len(text) > 300:
    text = text[:300] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def is_environment_error(error: BaseException) -> bool:
  """True for failures of permissions, network or memory rather than of the checkpoint."""
  if isinstance(error, (PermissionError, TimeoutError, ConnectionError, MemoryError)):
    return True
  return str(error).lstrip().startswith(_ENVIRONMENT_STATUS)


def to_abstract(tree: PyTree) -> PyTree:
  """Maps concrete arrays to `jax.ShapeDtypeStruct`s, keeping their sharding."""

  def convert(leaf):
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf

  return jax.tree.map(convert, tree)


class Checkpointer:
  """Saves and restores train state, input position and config with Orbax.

  All methods must be called on every process (they contain collectives);
  Orbax makes only the primary process write the JSON items and metadata.
  """

  def __init__(
      self,
      directory: str,
      *,
      save_interval_steps: int,
      max_to_keep: int,
      async_save: bool = True,
  ):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: root directory; steps live in `<directory>/<step>/`. Any path
        `etils.epath` understands (local, gs://...).
      save_interval_steps: `should_save` is True on multiples of this.
      max_to_keep: how many most recent steps to keep; older ones are deleted
        once a newer save has finalised.
      async_save: if True, `save` returns once arrays are copied to host
        memory and Orbax writes them in a background thread.
    """
    if save_interval_steps < 1:
      raise ValueError(f'save_interval_steps must be >= 1, got {save_interval_steps}')
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self._directory = epath.Path(directory)
    # Orbax's default policy also saves whenever no checkpoint exists yet
    # (InitialSavePolicy); we want exactly "on the interval or on preemption",
    # and the trainer can pass force=True for anything else.
    save_policy = ocp_policies.AnySavePolicy([
        ocp_policies.FixedIntervalPolicy(save_interval_steps),
        ocp_policies.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=ocp_policies.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save,
        create=True,
        # Orbax would delete the leftovers of a save interrupted by a kill
        # without a word; `_set_aside_unfinished_saves` moves them aside instead.
        cleanup_tmp_directories=False,
    )
    # Handlers are registered up front (rather than inferred from the first
    # save's args) so that restore and metadata work in a fresh process.
    self._manager = ocp.CheckpointManager(
        self._directory,
        item_names=ITEM_NAMES,
        item_handlers={
            STATE: ocp.StandardCheckpointHandler(),
            DATA: ocp.JsonCheckpointHandler(),
            CONFIG: ocp.JsonCheckpointHandler(),
        },
        options=options,
    )
    self._set_aside_at_open = self._set_aside_unfinished_saves()

  @property
  def directory(self) -> epath.Path:
    """The root checkpoint directory."""
    return self._directory

  def latest_step(self) -> int | None:
    """Returns the newest step (possibly still being written), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Returns all steps, ascending; includes an async save still in flight."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """True if `step` is on the save interval or Orbax reports a preemption.

    Also False for steps not newer than the latest saved one. Must be called
    on every process, every step, for preemption syncing to work.
    """
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True if all processes agreed to checkpoint at `step` due to preemption."""
    return self._manager.reached_preemption(step)

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      data_state: Mapping[str, Any],
      config: Mapping[str, Any] | Any,
      force: bool = False,
  ) -> bool:
    """Saves a step (asynchronously unless constructed with async_save=False).

    Args:
      step: the step number, used as directory name.
      state: the train state pytree of jax.Arrays.
      data_state: this process's input pipeline position, a JSON-able dict
        (different on every process).
      config: the run config (dict or ConfigDict); best-effort JSON encoded.
      force: save even if `should_save(step)` is False.

    Returns:
      True if a save was started, False if skipped (not on the interval and
      not forced, or `step` is already saved).
    """
    step = int(step)
    if step in self._manager.all_steps():
      # Orbax raises StepAlreadyExistsError; re-saving a step happens
      # naturally (e.g. a preemption save followed by the final save).
      logging.info('Checkpoint step %d already exists in %s; not saving.', step, self._directory)
      return False
    if not force and not self._manager.should_save(step):
      return False
    # The gather is a collective, so it has to happen on every process before
    # Orbax decides that only the primary writes the JSON.
    per_process = _allgather_json(to_jsonable(dict(data_state)))
    data_item = {
        'version': _DATA_FORMAT_VERSION,
        'process_count': len(per_process),
        'per_process': per_process,
    }
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: ocp.args.JsonSave(data_item),
        CONFIG: ocp.args.JsonSave(to_jsonable(config)),
    })
    return self._manager.save(step, args=args, force=True)

  def restore(
      self,
      abstract_state: PyTree,
      *,
      step: int | None = None,
  ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
    """Restores a step onto the shardings given by `abstract_state`.

    Args:
      abstract_state: pytree with the train state's structure whose array
        leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` with the
        CURRENT mesh's shardings (concrete jax.Arrays are accepted too; only
        their shape/dtype/sharding are used). Typed PRNG key leaves must have
        the key dtype (e.g. from `jax.eval_shape`).
      step: which step; None means the latest.

    Returns:
      `(state, data_state, config)`: the state with the structure of
      `abstract_state`; this process's data dict; the saved config dict.

    Raises:
      FileNotFoundError: no checkpoint, or the requested step is missing.
      ProcessCountMismatchError: (a ValueError) the checkpoint was written by
        a different number of processes (the data positions cannot be mapped).
      ValueError: structure/shape mismatch (from Orbax).
    """
    # An in-flight async save is listed as a step but cannot be read yet.
    self._manager.wait_until_finished()
    # A checkpoint written by another process (e.g. a previous run in the same
    # directory after this object was created) must be visible.
    self._manager.reload()
    steps = self.all_steps()
    if step is None:
      step = steps[-1] if steps else None
    if step is None or step not in steps:
      what = 'no checkpoint' if step is None else f'no checkpoint for step {step}'
      raise FileNotFoundError(
          f'{what} in {self._directory} (steps found: {steps}).')
    abstract_state = with_sharding_check(to_abstract(abstract_state))
    return self._restore_step(abstract_state, step)

  def restore_latest_intact(
      self,
      abstract_state: PyTree,
      *,
      allow_scratch: bool = False,
  ) -> RestoredCheckpoint | None:
    """Restores the newest step that restores; moves the newer, damaged ones aside.

    Steps are tried newest first with a full restore (the only reliable check:
    Orbax's commit marker and metadata say nothing about truncated array
    data), after a cheap look at the step's files. A step that fails (missing
    item directory, unparsable JSON metadata, any Orbax / tensorstore error, a
    shape that disagrees with its own metadata) is logged with
    its directory and the reason. Once an intact step is found, the failed
    newer ones are moved into `<directory>/damaged/` (never deleted), so that
    Orbax no longer lists them: a later save may reuse their step numbers and
    keep-N never deletes an intact step on their account.

    Not damage, re-raised as is: a checkpoint written by a different number of
    processes (`ProcessCountMismatchError`), and failures of the environment
    (permissions, network, out of memory).

    Must be called on every process; all processes agree on which step is
    intact (a step that fails on any process is skipped everywhere).

    Args:
      abstract_state: as for `restore`.
      allow_scratch: what to do when steps exist but none restores: False
        raises NoIntactCheckpointError and changes nothing on disk; True moves
        them all aside, logs a warning and returns None.

    Returns:
      A `RestoredCheckpoint`, or None when there is no finished step at all
      (a fresh run, or only saves that never committed) or, with
      `allow_scratch`, none that restores.

    Raises:
      NoIntactCheckpointError: no step restores and `allow_scratch` is False;
        the message lists every step with its reason.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    abstract_state = with_sharding_check(to_abstract(abstract_state))
    failed: list[tuple[int, str]] = []
    restored = None
    for step in sorted(self.all_steps(), reverse=True):
      error, reason = None, self._check_step_files(step)
      if reason is None:
        try:
          restored = self._restore_step(abstract_state, step)
        except Exception as e:  # pylint: disable=broad-except  (classified below)
          error, reason = e, describe_error(e)
      fatal = isinstance(error, ProcessCountMismatchError) or (
          error is not None and is_environment_error(error))
      # Every process must take the same branch: one that failed where the
      # others succeeded makes the step damaged (or fatal) for all of them.
      outcomes = _allgather_json(['fatal' if fatal else 'failed' if reason else 'ok', reason])
      if any(kind == 'fatal' for kind, _ in outcomes):
        if fatal:
          raise error
        i, (_, other) = next((i, o) for i, o in enumerate(outcomes) if o[0] == 'fatal')
        raise RuntimeError(f'restoring {self._directory}/{step} failed on process {i}: {other}')
      if all(kind == 'ok' for kind, _ in outcomes):
        break
      restored = None
      if reason is None:
        i, (_, reason) = next((i, o) for i, o in enumerate(outcomes) if o[0] == 'failed')
        reason = f'on process {i}: {reason}'
      logging.warning('Checkpoint %s cannot be restored, skipping it: %s',
                      self._directory / str(step), reason)
      failed.append((step, reason))
    if restored is None and failed and not allow_scratch:
      raise NoIntactCheckpointError(self._directory, failed, self._set_aside_at_open)
    moved = self._set_aside([(str(step), step, reason) for step, reason in failed])
    if restored is None:
      if failed:
        logging.warning('No intact checkpoint in %s; starting from scratch '
                        '(config.allow_scratch=True). The %d damaged steps are kept in %s.',
                        self._directory, len(failed), self._directory / DAMAGED_DIR)
      return None
    state, data_state, config = restored
    return RestoredCheckpoint(state, data_state, config, step, moved + self._set_aside_at_open)

  def _check_step_files(self, step: int) -> str | None:
    """Cheap checks of a finished step's files; the reason it is damaged, or None."""
    path = self._directory / str(step)
    missing = [name for name in ITEM_NAMES if not (path / name).is_dir()]
    if missing:
      return f'partially written: item directories {missing} missing in {path}'
    # Parsed here to name the file: Orbax's own JSON errors do not.
    for name in _JSON_FILES:
      metadata = path / name
      if metadata.exists():
        try:
          json.loads(metadata.read_text())
        except (ValueError, UnicodeDecodeError) as e:
          return f'unreadable {metadata}: {describe_error(e)}'
    return None

  def _set_aside_unfinished_saves(self) -> list[tuple[int, str]]:
    """Moves saves that never committed into `damaged/`, before Orbax sees them.

    They are Orbax temporary directories (`<step>.orbax-checkpoint-tmp-*`, a
    save killed before its atomic rename) or, on filesystems where Orbax
    commits with a marker file instead (GCS), step directories Orbax does not
    list as finished.
    """
    names = []
    if jax.process_index() == 0 and self._directory.exists():
      finished = set(self._manager.all_steps())
      for path in self._directory.iterdir():
        match = _STEP_OR_TMP_NAME.match(path.name)
        if match and (match.group(2) or int(match.group(1)) not in finished) and path.is_dir():
          names.append(path.name)
    names = _allgather_json(sorted(names))[0]
    entries = []
    for name in names:
      how = ('Orbax temporary directory' if _STEP_OR_TMP_NAME.match(name).group(2)
             else 'no commit marker')
      entries.append((name, int(_STEP_OR_TMP_NAME.match(name).group(1)),
                      f'unfinished save ({how}: {self._directory / name}); it never committed'))
    return self._set_aside(entries)

  def _set_aside(self, entries: list[tuple[str, int, str]]) -> list[tuple[int, str]]:
    """Moves `(name, step, reason)` directories into `damaged/`; returns `(step, reason + where)`.

    Only process 0 renames; the all-gather of the new paths is the barrier
    after which every process sees the same directory.
    """
    if not entries:
      return []
    results = []
    if jax.process_index() == 0:
      aside = self._directory / DAMAGED_DIR
      stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
      for name, _, _ in entries:
        dest = aside / f'{name}.{stamp}'
        n = 1
        while paths.exists(str(dest)):
          dest, n = aside / f'{name}.{stamp}-{n}', n + 1
        try:
          paths.makedirs(str(aside))
          # On a bucket a directory moves object by object (copies first, then deletes).
          paths.rename(str(self._directory / name), str(dest))
          results.append([str(dest), ''])
        except OSError as e:
          results.append(['', describe_error(e)])
    results = _allgather_json(results)[0]
    self._manager.reload()
    moved = []
    for (name, step, reason), (dest, error) in zip(entries, results):
      if error:
        raise OSError(
            f'could not move the damaged checkpoint {self._directory / name} (step {step}: '
            f'{reason}) into {self._directory / DAMAGED_DIR}: {error}. Left in place, it would '
            'block a new save of that step and count against keep-N; move it away by hand.')
      logging.warning('Moved checkpoint step %d (%s) to %s; kept for inspection, delete it when '
                      'no longer needed. Reason: %s', step, self._directory / name, dest, reason)
      moved.append((step, f'{reason}; moved to {dest}'))
    return moved

  def _restore_step(
      self,
      abstract_state: PyTree,
      step: int,
  ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
    """`restore` of a listed step, with an already validated abstract state."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }),
    )
    data_item = restored[DATA]
    per_process = data_item.get('per_process') if isinstance(data_item, dict) else None
    if not isinstance(per_process, list):
      raise ValueError(
          f'{self._directory}/{step}/{DATA} does not hold per-process input positions: '
          f'{str(data_item)[:200]}')
    if len(per_process) != jax.process_count():
      raise ProcessCountMismatchError(
          f'checkpoint {self._directory}/{step} holds input positions for {len(per_process)} '
          f'processes but this job has {jax.process_count()}; the per-process data positions '
          'cannot be mapped.')
    return restored[STATE], per_process[jax.process_index()], restored[CONFIG]

  def wait_until_finished(self) -> None:
    """Blocks until any in-flight async save has been finalised."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for in-flight saves, then releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
