"""A real 2-process job: JAX's distributed runtime on this machine (CPU backend, the
coordinator on 127.0.0.1, gloo CPU collectives), 4 CPU devices per process, one global
mesh of 8. It trains a few steps through `python -m heptapod_jax.main --distributed=on`,
checkpoints collectively, and must reach the same losses and parameters as a single process
with 8 devices fed the same global batches (process 0's rows, then process 1's).
"""
import glob
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from heptapod_jax.data import builtin, input_pipeline
from heptapod_jax.training import train

from _multiprocess import multiprocess_env
from test_train import ROOT, tiny_config

STEPS = 4
_create_train_iterator = input_pipeline.create_train_iterator
# The same run as tests/test_train.py's tiny config, spelled as command-line overrides.
OVERRIDES = {
    'model.backbone.width': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2,
    'model.head.width': 32, 'model.head.depth': 1, 'model.head.num_heads': 2,
    'model.backbone.dropout': 0.0, 'model.head.dropout': 0.0,
    'optim.warmup_steps': 2, 'optim.lr': 3e-3, 'train.global_batch_size': 16,
    'train.log_every': 1, 'train.checkpoint_every': 2, 'train.sample_every': 0,
    'train.eval_every': 0, 'train.eval_at_end': False, 'train.sample_at_end': False,
    'evaluator.at_end': False, 'evaluator.real_baseline': False, 'mesh.shape': '(4,2,1)',
    'train.peak_tflops': 1.0,  # The logged MFU's peak: no matmul timing at each start-up.
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _BothProcessesIterator:
  """The global batches of a 2-process run, in one process: process 0's rows, then 1's."""

  def __init__(self, data_config, *, global_batch_size, seed, state=None):
    assert state is None
    self._parts = [_create_train_iterator(
        data_config, global_batch_size=global_batch_size, seed=seed, process_index=p,
        process_count=2) for p in range(2)]
    self.num_classes = self._parts[0].num_classes

  def __next__(self):
    a, b = (next(p) for p in self._parts)
    return {k: np.concatenate([a[k], b[k]]) for k in a}

  def get_state(self):
    return self._parts[0].get_state()


def _losses_from_events(workdir):
  losses = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'train/loss':
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return [losses[s] for s in sorted(losses)]


def _params(workdir, step):
  """The saved parameters as numpy arrays (the 2-process run's shardings name devices that
  this process does not have)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata['params'])
  raw = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item={'params': metadata['params']}, restore_args={'params': args}, partial_restore=True))
  return raw['params']


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  builtin.prepare(data_dir)
  port = _free_port()
  workdir = tmp_path / 'two'
  flags = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  env = dict(multiprocess_env(), XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
  procs = []
  for pid in range(2):
    cmd = [sys.executable, '-m', 'heptapod_jax.main',
           f'--config={ROOT}/configs/demo.py:steps={STEPS},tokenizer=pixel', f'--workdir={workdir}',
           f'--config.data.data_dir={data_dir}', '--distributed=on',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={pid}',
           *flags]
    log = open(tmp_path / f'worker{pid}.log', 'w')
    procs.append((subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                  log))
  for proc, log in procs:
    try:
      proc.wait(timeout=420)
    finally:
      proc.kill()
      log.close()
  logs = [(tmp_path / f'worker{pid}.log').read_text() for pid in range(2)]
  for pid, (proc, _) in enumerate(procs):
    assert proc.returncode == 0, f'worker {pid} failed:\n{logs[pid][-4000:]}'
  # Each process's records go to its own file in the workdir (the terminal shows no records).
  assert 'JAX process 0 of 2, 4 local / 8 global devices' in (workdir / 'log.txt').read_text()
  assert 'JAX process 1 of 2, 4 local / 8 global devices' in (
      workdir / 'log.process1.txt').read_text()
  # Process 0 alone prints the summary and writes metrics and the config.
  assert f'Done: {STEPS} steps' in logs[0] and 'Done:' not in logs[1]
  assert len(glob.glob(str(workdir / 'events.out.tfevents.*'))) == 1
  steps_saved = sorted(int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit())
  assert steps_saved == [2, 4]

  # The reference: one process, 8 devices, the same global batches.
  c = tiny_config(tmp_path, steps=STEPS)
  c.data.data_dir = data_dir
  c.train.log_every = 1
  monkeypatch.setattr(train.input_pipeline, 'create_train_iterator', _BothProcessesIterator)
  summary = train.train_and_evaluate(c, str(tmp_path / 'one'))
  single = [h['loss'] for h in summary['history']]
  multi = _losses_from_events(str(workdir))
  print('2-process losses:', multi, '\n1-process losses:', single)
  assert len(multi) == len(single) == STEPS
  np.testing.assert_allclose(multi, single, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               _params(str(workdir), STEPS), _params(str(tmp_path / 'one'), STEPS))
