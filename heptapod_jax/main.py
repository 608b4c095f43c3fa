"""Entry point: parse flags, start the distributed runtime, hand off to the trainer.

The config's `trainer` field picks the trainer: 'ar' (training/train.py, Heptapod)
or 'tokenizer' (training/train_tokenizer.py, the VQ/KL autoencoders).

  python -m heptapod_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m heptapod_jax.main --config=configs/imagenet256.py:size=L,head=global \
      --workdir=gs://bucket/run --config.optim.lr=4e-4

Multi-process (TPU pods, SLURM, several GPU hosts): `jax.distributed.initialize()`
runs when `--distributed=auto` detects a multi-host environment, or always with
`--distributed=on` (explicit `--coordinator_address/--num_processes/--process_id`
are passed through).

The terminal shows stage headings, one progress line per stage, evaluation results and the
summary; every record goes to <workdir>/log.txt (`console.py`). --verbosity=1 shows them all.
"""
from __future__ import annotations

import os
import traceback

if __name__ == '__main__':  # Before TensorFlow or JAX load: their start-up notices.
  from heptapod_jax import console as _console
  _console.quiet_dependencies()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from heptapod_jax import config_lib, console  # noqa: E402
from heptapod_jax.storage import paths  # noqa: E402
from heptapod_jax.training import liveness  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file (configs/*.py[:options]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample'],
                          'train: train (resuming) and evaluate; sample: generate config.sample\'s '
                          'samples from the workdir\'s checkpoint, write the .npz, evaluate.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'Call jax.distributed.initialize(): auto = when a multi-host '
                                 'environment is detected.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
flags.mark_flags_as_required(['config', 'workdir'])


def _multihost_environment() -> bool:
  """True on a multi-host TPU slice, under multi-task SLURM, or with explicit coordinator flags."""
  if _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  if len([h for h in hosts.split(',') if h]) > 1 or os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1


def _title(config) -> str:
  """The stage heading of a run: what is trained, for how long, on what, where."""
  return f'Training {config_lib.describe(config)} in {_WORKDIR.value}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.setup(None, hold=True)  # The terminal's threshold; records held until log.txt exists.
  tf = console.import_tensorflow()  # Before tfds, which imports it: its load-time notices.
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  # TensorFlow only feeds data: keep it off the accelerators JAX owns.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None

  import jax
  config = _CONFIG.value
  if _DISTRIBUTED.value == 'on' or (_DISTRIBUTED.value == 'auto' and _multihost_environment()):
    config_lib.validate_distributed(config)
    kwargs = {k: v for k, v in (('coordinator_address', _COORDINATOR.value),
                                ('num_processes', _NUM_PROCESSES.value),
                                ('process_id', _PROCESS_ID.value)) if v is not None}
    jax.distributed.initialize(
        heartbeat_timeout_seconds=int(config.distributed.heartbeat_timeout_s), **kwargs)
  log_path = console.setup(_WORKDIR.value, process_index=jax.process_index())
  logging.info('JAX process %d of %d, %d local / %d global devices (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  if log_path:
    logging.info('Full log of this run: %s', log_path)
  _report_previous_failure(_WORKDIR.value, jax.process_index())
  try:
    with liveness.watch(liveness.PeerWatchdog.for_job(config.distributed, _WORKDIR.value)):
      _run(config)
  except BaseException as e:
    # The error in the log file (the terminal gets Python's own traceback), then the log to
    # the bucket at once for a workdir there: the process may not live to its next upload.
    if not (isinstance(e, SystemExit) and not e.code):
      console.error(f'The run stopped with:\n{"".join(traceback.format_exception(e))}',
                    terminal=False)
    console.sync_log()
    raise
  console.sync_log()


def _report_previous_failure(workdir: str, process_index: int) -> None:
  """The previous run's last word (training/liveness.py): logged, then moved into the log."""
  path = liveness.failure_file(workdir, process_index)
  if not paths.exists(path):
    return
  text = paths.read_text(path).strip()
  logging.warning('The previous run of this workdir ended with:\n%s', text)
  if process_index == 0:
    console.say(f'Resuming after a lost process (previous run: {text.splitlines()[0]})')
  if console.log_path():  # Its text is in log.txt now; without a log file it stays.
    console.sync_log()  # On a bucket: in the uploaded log before the file goes.
    paths.remove(path, missing_ok=True)


def _run(config) -> None:
  """The job of --mode for the config's trainer."""
  if _MODE.value == 'sample' and config.trainer != 'ar':
    raise app.UsageError(f'--mode=sample needs an AR config (config.trainer=ar), got '
                         f'config.trainer={config.trainer!r}.')
  import jax
  if config.trainer == 'tokenizer':
    from heptapod_jax.training import train_tokenizer
    console.stage(_title(config))
    summary = train_tokenizer.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
      _print_tokenizer_summary(summary)
    return
  if config.trainer != 'ar':
    raise app.UsageError(f"config.trainer={config.trainer!r} is not one of ['ar', 'tokenizer'].")
  if _MODE.value == 'sample':
    from heptapod_jax.sampling import sample_mode
    console.stage(f'Sampling from the run in {_WORKDIR.value}')
    summary = sample_mode.sample_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
      _print_sample_summary(summary)
    return
  from heptapod_jax.training import train
  console.stage(_title(config))
  summary = train.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() == 0:
    _print_summary(summary)


def _print_if_preempted(summary) -> bool:
  """The stop message of a run stopped by a signal or preemption notice; False otherwise."""
  if not summary.get('preempted'):
    return False
  console.summary(f'\nStopped by {summary["preempted"]} at step {summary["step"]}; checkpoint: '
                  f'{summary["checkpoint"]}. Run the same command again to resume from it.')
  return True


def _print_tokenizer_summary(summary) -> None:
  if _print_if_preempted(summary):
    return
  lines = [f'\nDone: tokenizer trained for {summary.get("step")} steps in {summary["workdir"]}']
  ev = summary.get('eval') or {}
  if ev:
    parts = [f'{k} {ev[k]:.4f}' for k in ('psnr', 'ssim', 'lpips', 'codebook_usage',
                                            'codebook_perplexity') if k in ev]
    lines.append('  eval (held-out split): ' + ', '.join(parts))
  if summary.get('reconstructions'):
    lines.append(f'  reconstructions (originals above reconstructions): {summary["reconstructions"]}')
  lines.append(f'  tokenizer checkpoint for AR training: --config.tokenizer.checkpoint={summary["export"]}')
  if console.log_path():
    lines.append(f'  full log: {console.log_path()}')
  console.summary('\n'.join(lines))


def _print_summary(summary) -> None:
  if _print_if_preempted(summary):
    return
  lines = [f'\nDone: {summary.get("step")} steps in {summary["workdir"]}']
  train = summary.get('train') or {}
  if train:
    lines.append(f'  train: loss {train.get("loss", float("nan")):.4f}, '
                 f'{train.get("steps_per_sec", 0):.2f} steps/s')
  ev = summary.get('eval') or {}
  if ev and 'nll' in ev:
    lines.append(f'  eval (held-out split): NLL {ev["nll"]:.4f} nats/token = '
                 f'{ev["bits_per_token"]:.4f} bits/token, next-token accuracy {ev["accuracy"]:.3f}')
  elif ev and 'mse' in ev:
    lines.append(f'  eval (held-out split): diffusion loss (noise-prediction MSE) {ev["mse"]:.4f}')
  for path in summary.get('samples', [])[-1:]:
    lines.append(f'  samples (one column per class): {path}')
  if summary.get('reference'):
    lines.append(f'  real held-out images through the tokenizer, same layout: {summary["reference"]}')
  lines += _generative_lines(summary)
  if summary.get('page'):
    lines.append(f'  summary page (metrics, loss curve, pictures): {summary["page"]}')
  lines.append(f'  TensorBoard: tensorboard --logdir {summary["workdir"]}')
  if console.log_path():
    lines.append(f'  full log: {console.log_path()}')
  console.summary('\n'.join(lines))


def _generative_lines(summary) -> list[str]:
  from heptapod_jax.evaluators.generative import format_metrics
  lines = []
  info = summary.get('generative_info') or summary.get('evaluator') or {}
  if info:
    acc = info.get('feature_net_eval_accuracy')
    lines.append(f'  generative metrics: features of {info.get("features")}'
                 + (f' (held-out accuracy {acc:.3f})' if acc is not None else '')
                 + f', reference {info.get("reference")}')
  gen = summary.get('generative') or summary.get('metrics')
  if gen:
    lines.append(f'    samples ({int(gen["num_images"])}):{" " * 19}{format_metrics(gen)}')
  real = summary.get('generative_real') or {}
  if 'real' in real:
    lines.append(f'    held-out real images ({int(real["real"]["num_images"])}):  '
                 f'{format_metrics(real["real"])}')
  if 'real_tokenized' in real:
    lines.append(f'    same through the tokenizer: {format_metrics(real["real_tokenized"])}')
  return lines


def _print_sample_summary(summary) -> None:
  lines = [f'\nDone: {summary["num_samples"]} samples of step {summary["step"]} in '
           f'{summary["seconds"]:.0f} s ({summary["num_samples"] / max(summary["seconds"], 1e-9):.2f} '
           f'img/s this run)',
           f'  ADM-format samples (arr_0 images, arr_1 labels): {summary["npz"]}']
  if summary.get('grid'):
    lines.append(f'  first rows, one column per class: {summary["grid"]}')
  if summary.get('png'):
    lines.append(f'  {summary["png"]} PNG files in {summary["out_dir"]}/png')
  lines += _generative_lines(summary)
  console.summary('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
