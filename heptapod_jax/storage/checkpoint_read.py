"""Parameters out of a run's checkpoints, read-only: no `Checkpointer`, no writes.

  load_params(dir, abstract, step=None, key='params')   one step's subtree (init_from, the
                                                          probe, tokenizers saved as runs)
  load_newest_intact_params(dir, abstract, ...)          the newest step that restores, the
                                                          damaged newer ones skipped (sampling)
  checkpoint_steps(dir) / resolve_step(manager, ...)    the finished steps there are

Only the wanted subtree is read (Orbax's partial restore), so the source run's optimizer state
may have any structure. The layout is storage/checkpoint.py's (items state / data / config).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from etils import epath
import orbax.checkpoint as ocp

from heptapod_jax.storage import checkpoint as ckpt_lib

PyTree = Any


def _subtree(tree: Any, keys: list[str]) -> Any:
  """Follows `keys` down a nested metadata tree (dicts or attribute objects)."""
  for k in keys:
    if isinstance(tree, Mapping):
      if k not in tree:
        raise KeyError(k)
      tree = tree[k]
    elif hasattr(tree, k):
      tree = getattr(tree, k)
    else:
      raise KeyError(k)
  return tree


def _top_keys(tree: Any) -> list[str]:
  if isinstance(tree, Mapping):
    return sorted(str(k) for k in tree.keys())
  return sorted(k for k in vars(tree) if not k.startswith('_')) if hasattr(tree, '__dict__') else []


def _read_only_manager(path: epath.Path) -> ocp.CheckpointManager:
  # Read-only, and PyTree (not Standard) handler since only it supports
  # partial restore; the on-disk format is the same.
  return ocp.CheckpointManager(
      path,
      item_names=ckpt_lib.ITEM_NAMES,
      # The JSON handlers only keep Orbax from warning about unknown items.
      item_handlers={
          ckpt_lib.STATE: ocp.PyTreeCheckpointHandler(),
          ckpt_lib.DATA: ocp.JsonCheckpointHandler(),
          ckpt_lib.CONFIG: ocp.JsonCheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )


def resolve_step(manager: ocp.CheckpointManager, path: Any, step: int | None) -> int:
  """`step`, or the newest one when None; FileNotFoundError listing the steps if there is none."""
  steps = sorted(manager.all_steps())
  if step is None:
    step = steps[-1] if steps else None
  if step is None or step not in steps:
    what = 'no checkpoint' if step is None else f'no checkpoint for step {step}'
    raise FileNotFoundError(f'{what} in {path} (steps found: {steps}).')
  return step


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """The finished steps in a checkpoint directory, ascending (read-only; [] if none)."""
  path = epath.Path(checkpoint_dir)
  if not path.exists():
    return []
  manager = _read_only_manager(path)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_params(
    checkpoint_dir: str,
    abstract_params: PyTree,
    *,
    step: int | None = None,
    key: str = 'params',
) -> PyTree:
  """Loads only one subtree (e.g. the params) of another run's train state.

  Used for `init_from=`: the optimizer state of the source run is neither
  needed nor read, so its structure may differ from the current run's.

  Args:
    checkpoint_dir: the source run's checkpoint root (the directory given to
      its `Checkpointer`).
    abstract_params: pytree of `jax.ShapeDtypeStruct` with shardings (or
      arrays) with the structure, shapes and dtypes of the subtree.
    step: which step; None means the latest.
    key: name of the subtree in the train state, e.g. 'params' or
      'ema_params'; nested subtrees as 'a/b'.

  Returns:
    The subtree, with the structure and shardings of `abstract_params`.

  Raises:
    FileNotFoundError: no checkpoint or no such step in `checkpoint_dir`.
    KeyError: the state has no subtree `key`.
  """
  path = epath.Path(checkpoint_dir)
  keys = [k for k in key.split('/') if k]
  if not keys:
    raise ValueError(f'key must name a subtree, got {key!r}')
  abstract_params = ckpt_lib.with_sharding_check(ckpt_lib.to_abstract(abstract_params))
  if not path.exists():
    raise FileNotFoundError(f'checkpoint directory {path} does not exist')
  manager = _read_only_manager(path)
  try:
    step = resolve_step(manager, path, step)
    metadata = manager.item_metadata(step)[ckpt_lib.STATE]
    tree = getattr(metadata, 'tree', metadata)
    try:
      _subtree(tree, keys)
    except KeyError:
      raise KeyError(
          f'train state in {path}/{step}/{ckpt_lib.STATE} has no subtree {key!r} '
          f'(top-level keys: {_top_keys(tree)})') from None
    # Build a nested-dict target holding only the wanted subtree; with
    # partial_restore=True Orbax skips every other leaf (the optimizer state
    # is never read) and matches dataclass fields by name.
    target: Any = abstract_params
    for k in reversed(keys):
      target = {k: target}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(**{
            ckpt_lib.STATE: ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True),
        }),
    )[ckpt_lib.STATE]
  finally:
    manager.close()
  return _subtree(restored, keys)


class NoRestorableStepError(RuntimeError):
  """Checkpoints exist but the wanted one (or, for the latest, every one) fails to restore."""


def load_newest_intact_params(checkpoint_dir: str, abstract: Any, *, step: int | None, key: str,
                              what: str = 'sampling', hint: str = 'train first',
                              step_name: str = '--step'
                              ) -> tuple[Any, int, list[tuple[int, str]]]:
  """(params, step, skipped): one parameter tree of a run's checkpoint, read-only.

  `abstract`: the tree's ShapeDtypeStructs with their shardings (`load_params`); `key`: its
  name in the saved state ('params' or 'ema_params'); what / hint / step_name: how the
  caller's errors name the job, what to do, and the setting that chose `step`.

  With `step` None the newest step that restores is used: a newer step that
  fails to restore (truncated or missing array data, unreadable metadata) is
  logged and skipped, and listed in `skipped` as (step, reason). Nothing on disk
  is moved (a training run may still be writing there; resuming the run is what
  sets damaged steps aside, `Checkpointer.restore_latest_intact`). An explicit
  `step` is never replaced by another one. Call inside the mesh of the shardings.

  Raises:
    FileNotFoundError: no checkpoint in `checkpoint_dir`, or no such step.
    NoRestorableStepError: every candidate step fails to restore (each with its reason).
    KeyError: the saved state has no subtree `key`.
  """
  steps = checkpoint_steps(checkpoint_dir)
  if not steps:
    raise FileNotFoundError(f'{what}: no checkpoint in {checkpoint_dir} ({hint}).')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'{step_name}={step}: {checkpoint_dir} has steps {steps}.')
  failed: list[tuple[int, str]] = []
  for candidate in [step] if step is not None else sorted(steps, reverse=True):
    try:
      params = load_params(checkpoint_dir, abstract, step=candidate, key=key)
    except (KeyError, ckpt_lib.ProcessCountMismatchError):
      raise
    except Exception as e:  # noqa: BLE001  Damage or a mismatch: named below, then the next step.
      if ckpt_lib.is_environment_error(e):
        raise
      reason = ckpt_lib.describe_error(e)
      logging.warning('Checkpoint %s/%d cannot be restored, trying an older step: %s',
                      checkpoint_dir, candidate, reason)
      failed.append((candidate, reason))
      continue
    if failed:
      logging.warning('%s: using step %d of %s; newer steps fail to restore: %s', what, candidate,
                      checkpoint_dir, failed)
    return params, candidate, failed
  lines = '\n'.join(f'  step {s} ({checkpoint_dir}/{s}): {r}' for s, r in failed)
  tried = f'{step_name}={step}' if step is not None else 'every step tried, newest first'
  raise NoRestorableStepError(
      f'{what}: no step of {checkpoint_dir} restores ({tried}):\n{lines}\n'
      'If every step reports the same shape or structure mismatch, the config (model settings) '
      'does not match the checkpoint rather than the checkpoint being damaged.')
