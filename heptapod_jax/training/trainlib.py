"""Pieces shared by the trainers (the AR model's and the tokenizer's)."""
from __future__ import annotations

import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import periodic_actions

from heptapod_jax import console
from heptapod_jax.storage import artifacts
from heptapod_jax.storage import checkpoint as ckpt_lib
from heptapod_jax.storage import paths
from heptapod_jax.training import liveness

Array = jax.Array


class NonFiniteError(FloatingPointError):
  """Loss or gradient norm became NaN/Inf; the update of that step was not applied."""


def reduce_metrics(metric_list: list[dict[str, Array]]) -> dict[str, float]:
  """Mean of per-step scalars; (sum, count) pairs are summed first, then divided."""
  host = jax.device_get(metric_list)
  out = {}
  for name in host[0]:
    values = np.stack([np.asarray(m[name], np.float64) for m in host])
    if values.ndim == 2:  # (sum, count) pairs.
      total, count = values.sum(0)
      if count > 0:
        out[name] = float(total / count)
    else:
      out[name] = float(values.mean())
  return out


def write_config(config, workdir: str) -> None:
  """Writes the run's config as readable JSON to workdir/config.json (local or a bucket)."""
  paths.write_json(paths.join(workdir, 'config.json'), ckpt_lib.to_jsonable(config.to_dict()),
                   indent=2, sort_keys=True)


def check_finite(metrics: dict[str, Array], step: int, checkpointer) -> None:
  """Raises NonFiniteError naming update number `step` and the metric (it was not applied)."""
  if bool(jax.device_get(metrics['finite'])):
    return
  loss, gnorm = (float(jax.device_get(metrics[k])) for k in ('loss_value', 'grad_norm'))
  bad = [f'{k}={v}' for k, v in (('loss', loss), ('grad_norm', gnorm)) if not np.isfinite(v)]
  last = checkpointer.latest_step()
  raise NonFiniteError(
      f'step {step}: non-finite {", ".join(bad)}; the update was not applied. Last checkpoint: '
      f'{"step " + str(last) + " in " + str(checkpointer.directory) if last is not None else "none"}. '
      'Lower config.optim.lr, raise warmup, or check the data.')


def log_compiled(compiled, name: str = 'train_step') -> None:
  """Logs the compiled program's per-device memory and XLA's FLOP count, where the backend reports them."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # Not every backend reports it.
    mem = None
  if mem is not None:
    gib = 1 / 2**30
    logging.info('%s memory per device: arguments %.3f GiB, outputs %.3f GiB, '
                 'temporaries %.3f GiB, generated code %.3f GiB.', name,
                 mem.argument_size_in_bytes * gib, mem.output_size_in_bytes * gib,
                 mem.temp_size_in_bytes * gib, mem.generated_code_size_in_bytes * gib)
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and 'flops' in cost:
      logging.info('%s: %.3f GFLOP per step (XLA cost analysis).', name, cost['flops'] / 1e9)
  except Exception:
    pass


class CheckpointSaveError(OSError):
  """Too many checkpoint saves in a row failed (or the final one did)."""


class StopRequest:
  """SIGTERM / SIGINT -> a flag the training loop polls between steps.

  The loop then finishes the step it is in, saves a checkpoint synchronously, waits
  for pending async saves and returns. A second signal while that happens is only
  logged (the save is never interrupted by us). Used as a context manager: the
  previous handlers come back on exit.

  In a multi-process job no handler is installed: a signal may reach only some
  processes, and a process that stops alone would hang the others in the next
  collective. There JAX's distributed runtime catches SIGTERM (its preemption
  notifier) and all processes agree on a step through
  `Checkpointer.reached_preemption`, which the loop polls as well.
  """

  def __init__(self, install: bool = True):
    self._install = install
    self._previous: dict[int, Any] = {}
    self.signal_name: str | None = None

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is None:
      self.signal_name = name
      logging.warning('%s received: finishing this step, then saving a checkpoint and stopping.',
                      name)
    else:
      logging.warning('%s received again: already stopping; the checkpoint is being saved, '
                      'please wait (interrupting it now is safe: the previous checkpoint stays '
                      'intact, but the steps since it would be lost).', name)

  def __enter__(self) -> 'StopRequest':
    if self._install and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


class NonFiniteGuard:
  """Watches the `finite` metric of every update.

  mode 'stop': the first non-finite update raises NonFiniteError (naming the
  step, the metric and the last checkpoint). mode 'skip': the update was not
  applied (the step leaves parameters, optimizer state and EMA unchanged) and is
  counted; more than `max_skips` of them raise.
  """

  def __init__(self, mode: str, max_skips: int, checkpointer):
    if mode not in ('stop', 'skip'):
      raise ValueError(f"config.train.on_nonfinite={mode!r} is not one of ['stop', 'skip'].")
    self.mode, self.max_skips, self.checkpointer = mode, max_skips, checkpointer
    self.skipped = 0

  def check(self, metrics: dict[str, Array], step: int) -> None:
    if self.mode == 'stop':
      check_finite(metrics, step, self.checkpointer)
      return
    if bool(jax.device_get(metrics['finite'])):
      return
    self.skipped += 1
    loss, gnorm = (float(jax.device_get(metrics[k])) for k in ('loss_value', 'grad_norm'))
    logging.warning('step %d: non-finite update skipped (loss=%s, grad_norm=%s); %d skipped so far '
                    '(config.train.max_nonfinite_skips=%d).', step, loss, gnorm, self.skipped,
                    self.max_skips)
    if self.skipped > self.max_skips:
      last = self.checkpointer.latest_step()
      raise NonFiniteError(
          f'step {step}: {self.skipped} non-finite updates skipped, more than '
          f'config.train.max_nonfinite_skips={self.max_skips} (last: loss={loss}, '
          f'grad_norm={gnorm}). Last checkpoint: '
          f'{"step " + str(last) + " in " + str(self.checkpointer.directory) if last is not None else "none"}.')


class TolerantSaver:
  """Checkpoint saves that survive disk trouble: a failed save is logged with its step and
  the run goes on; `max_failures` failures in a row raise CheckpointSaveError. An async
  save's failure surfaces at the next save or wait, and is counted there."""

  def __init__(self, checkpointer, max_failures: int):
    self.checkpointer, self.max_failures = checkpointer, max_failures
    self.failures_in_a_row = 0
    self.total_failures = 0
    self.last_saved: int | None = None

  def save(self, step: int, state: Any, *, data_state, config, force: bool = False,
           wait: bool = False) -> bool:
    try:
      saved = self.checkpointer.save(step, state, data_state=data_state, config=config, force=force)
      if wait:
        self.checkpointer.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (disk full, permissions, remote FS)
      self.failures_in_a_row += 1
      self.total_failures += 1
      free = artifacts.describe_free_space(self.checkpointer.directory)
      logging.error('Checkpoint save at step %d in %s%s failed (%d in a row; the run stops at %d): '
                    '%s', step, self.checkpointer.directory, free, self.failures_in_a_row,
                    self.max_failures, ckpt_lib.describe_error(e))
      if self.failures_in_a_row >= self.max_failures:
        try:  # Let the saves still in flight finish: the intact checkpoints are what is left.
          self.checkpointer.wait_until_finished()
        except Exception:  # pylint: disable=broad-except
          pass
        raise CheckpointSaveError(
            f'{self.failures_in_a_row} checkpoint saves in a row failed, the last at step {step} '
            f'in {self.checkpointer.directory}{free} ({ckpt_lib.describe_error(e)}); stopping '
            f'(config.train.max_save_failures={self.max_failures}). Latest intact checkpoint: '
            f'{self.last_saved}.') from e
      return False
    if saved:
      self.failures_in_a_row = 0
      self.last_saved = step
    return saved

  def save_on_stop(self, step: int, state: Any, *, data_state, config, cause: str) -> dict:
    """The synchronous save of a run stopped by `cause` (a signal or a preemption notice):
    saves, waits for every pending save, logs where; returns the summary entries."""
    self.save(step, state, data_state=data_state, config=config, force=True, wait=True)
    self.finish(step)
    where = f'{self.checkpointer.directory}/{self.last_saved}'
    logging.warning('Stopped by %s at step %d; checkpoint saved: %s. Run the same command again '
                    'to resume.', cause, step,
                    where if self.last_saved == step else f'none at this step (latest: {where})')
    return {'step': step, 'preempted': cause, 'checkpoint': where}

  def finish(self, step: int, final: bool = False) -> None:
    """Waits for pending async saves; a failure here is fatal (nothing else will retry it).
    With `final`, the run's last step must be saved: a run never ends "done" without it."""
    where = self.checkpointer.directory
    try:
      self.checkpointer.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointSaveError(f'the checkpoint save pending at step {step} in '
                                f'{where}{artifacts.describe_free_space(where)} failed: '
                                f'{ckpt_lib.describe_error(e)}. Newest intact checkpoint: '
                                f'{self.checkpointer.latest_step()}; run the same command again '
                                'to resume from it.') from e
    if final and step not in self.checkpointer.all_steps():
      raise CheckpointSaveError(
          f'the final checkpoint (step {step}) could not be saved in '
          f'{where}{artifacts.describe_free_space(where)}; newest intact checkpoint: '
          f'{self.checkpointer.latest_step()}. Make room, then run the same command again: it '
          'resumes from there and repeats the steps after it.')


class TolerantWriter:
  """A clu metric writer whose failures (a full disk, a flaky remote filesystem) are logged and
  skipped instead of ending the run: metrics are not state, checkpoints are. After a failure
  the broken writer is dropped and a new one is made at most every `retry_s` seconds (a new
  events file), so metrics come back once the disk does; the steps in between are missing
  from TensorBoard, and the log says which.

    writer = TolerantWriter(lambda: metric_writers.create_default_writer(workdir, ...), workdir)
  """

  def __init__(self, make, workdir: str, retry_s: float = 60.0, clock=time.monotonic):
    self._make, self._workdir, self._retry_s, self._clock = make, workdir, retry_s, clock
    self._writer = make()
    self._failed_at: float | None = None
    self.failures = 0

  def _call(self, name: str, *args, **kwargs) -> None:
    if self._writer is None:
      if self._clock() - self._failed_at < self._retry_s:
        self.failures += 1
        return
      try:
        self._writer = self._make()
      except Exception:  # pylint: disable=broad-except
        self._failed_at = self._clock()
        self.failures += 1
        return
      logging.warning('Metrics are written to %s again (%d writes were dropped).',
                      self._workdir, self.failures)
    try:
      getattr(self._writer, name)(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      self.failures += 1
      step = args[0] if args and isinstance(args[0], (int, np.integer)) else kwargs.get('step')
      logging.error('Metrics could not be written to %s%s (%s%s); the run goes on without '
                    'them and retries in %.0f s.', self._workdir,
                    artifacts.describe_free_space(self._workdir),
                    ckpt_lib.describe_error(e), f', at step {step}' if step is not None else '',
                    self._retry_s)
      broken, self._writer, self._failed_at = self._writer, None, self._clock()
      try:
        broken.close()
      except Exception:  # pylint: disable=broad-except
        pass

  def __getattr__(self, name: str):
    if name.startswith('write_') or name in ('flush', 'close'):
      return lambda *args, **kwargs: self._call(name, *args, **kwargs)
    raise AttributeError(name)


_MEASURED_PEAKS: dict[tuple, float] = {}


def _measured_peak(device, dtype) -> float:
  """`flops.measure_peak_matmul_flops` once per device and dtype in a process: a notebook, a
  study or a test that trains many times in one process pays the timing (seconds on a CPU)
  once."""
  from heptapod_jax import flops  # pylint: disable=g-import-not-at-top
  key = (device.platform, device.id, str(jnp.dtype(dtype)))
  if key not in _MEASURED_PEAKS:
    _MEASURED_PEAKS[key] = flops.measure_peak_matmul_flops(dtype=dtype, device=device)
  return _MEASURED_PEAKS[key]


class Throughput:
  """Model FLOPs utilisation of the training step, for the logged metrics.

  FLOPs per step are analytic (`heptapod_jax.flops`: backbone, 2D head and diffusion
  head, forward + backward, remat recomputation not counted) times the global batch.
  The peak per device is `peak_tflops` if given, else the table of known chips, else
  (CPU and unknown devices) a matmul measured once at start-up on this device.
  """

  def __init__(self, model_config, global_batch_size: int, peak_tflops: float = 0.0):
    from heptapod_jax import flops  # pylint: disable=g-import-not-at-top
    self.flops_per_step = flops.train_flops_per_image(model_config)['total'] * global_batch_size
    device = jax.local_devices()[0]
    # CPU "devices" (--xla_force_host_platform_device_count) share the host's cores, and a
    # matmul on one of them already uses all the cores: the peak is per host there.
    self.num_devices = jax.process_count() if device.platform == 'cpu' else jax.device_count()
    compute_dtype = model_config.dtype
    if peak_tflops > 0:
      self.peak, self.peak_source = peak_tflops * 1e12, 'config.train.peak_tflops'
    else:
      found = flops.peak_flops_per_device(device, compute_dtype)
      if found is not None:
        self.peak, self.peak_source = found
      else:
        self.peak = _measured_peak(device, compute_dtype)
        self.peak_source = f'measured {compute_dtype} matmul on {device.device_kind}'
    logging.info('MFU: %.3f TFLOP per step (analytic, %d images), peak %.2f TFLOP/s per device '
                 '(%s) x %d.', self.flops_per_step / 1e12, global_batch_size,
                 self.peak / 1e12, self.peak_source, self.num_devices)

  def scalars(self, steps_per_sec: float) -> dict[str, float]:
    achieved = self.flops_per_step * steps_per_sec
    return {'tflops_per_sec_per_device': achieved / self.num_devices / 1e12,
            'mfu': achieved / (self.num_devices * self.peak)}


class TrainLoop:
  """What a training loop does after each step, in this order (`after_step`):

    1. check the previous update for non-finite values (it has finished while this one
       was dispatched), so a run stops at the bad step without waiting on every step;
    2. report progress; every `train.log_every` steps (and at the last step or a stop)
       check this update too and write one log line of scalars;
    3. on a signal or a preemption notice, save synchronously and stop;
    4. save at the checkpoint interval (and always at the last step);
    5. the trainer's periodic work (`periodic`: evaluation, samples).

  The trainers subclass it: `check` is the non-finite policy (default: stop), `reduce`,
  `speed` and `write` make the log line, `periodic` is the rest, `progress_fields` what the
  progress line shows (`console.progress`: a live bar on a terminal, else a plain line every
  `train.log_every` steps). Use it as a context manager around the loop (`with loop:`): it
  installs the signal handlers and closes the progress line.
  """

  progress_desc = 'train'

  def __init__(self, config, writer, checkpointer, train_iter, summary: dict[str, Any],
               step: int):
    tcfg = config.train
    self.config, self.writer, self.checkpointer = config, writer, checkpointer
    self.train_iter, self.summary = train_iter, summary
    self.report = periodic_actions.ReportProgress(num_train_steps=tcfg.num_steps, writer=writer,
                                                  every_steps=tcfg.log_every)
    self.saver = TolerantSaver(checkpointer, tcfg.max_save_failures)
    self.stop = StopRequest(install=jax.process_count() == 1)
    self.pending: list[dict[str, Array]] = []  # Metrics since the last log line.
    self.unchecked = None  # The previous update's metrics, checked while this one runs.
    self.t_log, self.step_log = time.time(), step
    self.bar = console.progress(tcfg.num_steps, desc=self.progress_desc, initial=step,
                                every=tcfg.log_every)

  def __enter__(self) -> 'TrainLoop':
    self.stop.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self.bar.close()
    self.stop.__exit__(*exc)

  def after_step(self, step: int, state: Any, metrics: dict[str, Array]) -> bool:
    """After update number `step` was dispatched; False when the run must stop now (saved)."""
    tcfg = self.config.train
    if self.unchecked is not None:
      self.check(self.unchecked, step - 1)
    self.unchecked = metrics
    self.pending.append(metrics)
    self.report(step)
    liveness.note_step(step)
    preempted = self.stop.requested or self.checkpointer.reached_preemption(step)
    if step % tcfg.log_every == 0 or step == tcfg.num_steps or preempted:
      self.check(metrics, step)
      self.unchecked = None
      self._log(step)
      self.bar.update(step, **self.progress_fields(self.summary['train']))
    else:
      self.bar.update(step)
    if preempted:  # Synchronous: the process may be killed soon after this returns.
      self.summary.update(self.saver.save_on_stop(
          step, state, data_state=self.train_iter.get_state(), config=self.config.to_dict(),
          cause=self.stop.signal_name or 'a preemption notice'))
      return False
    if self.checkpointer.should_save(step) or step == tcfg.num_steps:
      self.saver.save(step, state, data_state=self.train_iter.get_state(),
                      config=self.config.to_dict(), force=step == tcfg.num_steps)
    if step < tcfg.num_steps:  # The last step's evaluation is the trainer's final phase.
      self.periodic(step, state)
    return True

  def _log(self, step: int) -> None:
    scalars = self.reduce(self.pending)
    self.pending = []
    now = time.time()
    steps_per_s = (step - self.step_log) / max(now - self.t_log, 1e-9)
    self.t_log, self.step_log = now, step
    scalars.update(self.speed(steps_per_s))
    self.write(step, scalars)

  def progress_fields(self, scalars: dict[str, float]) -> dict[str, float]:
    """What the progress line shows beside the step count and speed (the last log line's)."""
    return {'loss': scalars['loss']} if 'loss' in scalars else {}

  def check(self, metrics: dict[str, Array], step: int) -> None:
    """Raises NonFiniteError when update `step` was not finite."""
    check_finite(metrics, step, self.checkpointer)

  def reduce(self, pending: list[dict[str, Array]]) -> dict[str, float]:
    """The metrics of the steps since the last log line, as scalars."""
    scalars = reduce_metrics(pending)
    for name in ('finite', 'loss_value'):  # Internal: the non-finite checks read them.
      scalars.pop(name, None)
    return scalars

  def speed(self, steps_per_sec: float) -> dict[str, float]:
    return {'steps_per_sec': steps_per_sec,
            'images_per_sec': steps_per_sec * self.config.train.global_batch_size,
            'checkpoint_save_failures': self.saver.total_failures}

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """train/* scalars to the writer; the summary keeps the last line and the history."""
    self.writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
    self.summary['train'] = scalars
    self.summary['history'].append(dict(scalars, step=step))

  def periodic(self, step: int, state: Any) -> None:
    """Work at intervals during training (not after the last step)."""
    del step, state
