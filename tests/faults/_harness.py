"""Shared pieces of the fault-injection tests: one tiny run, spelled both as command-line
flags (for child processes killed and restarted) and as a ConfigDict (for in-process
reference runs), and helpers to drive a child process and compare checkpoints."""
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from _multiprocess import multiprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, 'tests', 'faults', 'runner.py')

OVERRIDES = {
    'model.backbone.width': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2,
    'model.head.width': 32, 'model.head.depth': 1, 'model.head.num_heads': 2,
    'model.backbone.dropout': 0.0, 'model.head.dropout': 0.0,
    'optim.warmup_steps': 2, 'optim.lr': 3e-3, 'train.global_batch_size': 16,
    'train.log_every': 2, 'train.checkpoint_every': 2, 'train.keep_checkpoints': 3,
    'train.async_checkpoints': True, 'train.sample_every': 0,
    'train.eval_every': 0, 'train.eval_at_end': False, 'train.sample_at_end': False,
    'evaluator.at_end': False, 'evaluator.real_baseline': False, 'mesh.shape': (4, 2, 1),
    'train.peak_tflops': 1.0,  # The logged MFU's peak: no matmul timing at each start-up.
}


def recipe(steps: int) -> str:
  return f'{ROOT}/configs/demo.py:steps={steps},tokenizer=pixel'


def config(steps: int, data_dir: str, **extra):
  """The run as a ConfigDict, exactly as `main` builds it from `flags(...)`."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('demo', os.path.join(ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f'steps={steps},tokenizer=pixel')
  for key, value in dict(OVERRIDES, **{'data.data_dir': data_dir}, **extra).items():
    node = c
    *path, leaf = key.split('.')
    for name in path:
      node = node[name]
    node[leaf] = value
  return c


def flags(steps: int, workdir, data_dir: str, **extra) -> list[str]:
  out = [f'--config={recipe(steps)}', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
  for key, value in dict(OVERRIDES, **extra).items():
    value = '(' + ','.join(str(v) for v in value) + ')' if isinstance(value, tuple) else value
    out.append(f'--config.{key}={value}')
  return out


class Child:
  """`tests/faults/runner.py` in a child process with 8 CPU devices; stdout read by line."""

  def __init__(self, argv: list[str], runner_args: tuple[str, ...] = (), log_path=None,
               devices: int = 8, multiprocess: bool = False, world=None):
    """`world`: a started tests/gcs_world.GcsWorld to run in (its bucket reachable as gs://)."""
    env = dict(multiprocess_env() if multiprocess else os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT,
               PYTHONUNBUFFERED='1')
    self.stderr_path = log_path
    self._stderr = open(log_path, 'w') if log_path else subprocess.DEVNULL
    command = [sys.executable, RUNNER, *runner_args, '--', *argv]
    if world is not None:  # nsenter execs the command: proc is the job itself (kill reaches it).
      command, env = world.command(command, cwd=ROOT), world.env(env)
    self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True)
    self.lines: list[str] = []

  def wait_for(self, prefix: str, timeout: float = 300) -> str:
    """Reads stdout until a line starts with `prefix`; returns it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        if self.proc.poll() is not None:
          break
        continue
      self.lines.append(line)
      if line.startswith(prefix):
        return line.strip()
    raise AssertionError(f'no line starting with {prefix!r} within {timeout} s; exit code '
                         f'{self.proc.poll()}; stdout:\n{"".join(self.lines)[-3000:]}\n'
                         f'stderr: {self.stderr_tail()}')

  def finish(self, timeout: float = 300) -> int:
    out, _ = self.proc.communicate(timeout=timeout)
    self.lines.extend(out.splitlines(keepends=True))
    if self._stderr is not subprocess.DEVNULL:
      self._stderr.close()
    return self.proc.returncode

  def stdout(self) -> str:
    return ''.join(self.lines)

  def stderr_tail(self) -> str:
    if not self.stderr_path or not os.path.exists(self.stderr_path):
      return ''
    return open(self.stderr_path).read()[-4000:]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def job(argv: list[str], processes: int = 2, runner_args: tuple[str, ...] = (),
        log_dir=None) -> list[Child]:
  """One run as `processes` real processes joined by jax.distributed (gloo collectives on the
  CPU), 8 // processes devices each: the same 8-device mesh as a one-process Child."""
  port = free_port()
  return [Child([*argv, '--distributed=on', f'--coordinator_address=127.0.0.1:{port}',
                 f'--num_processes={processes}', f'--process_id={pid}'], runner_args,
                log_path=os.path.join(log_dir, f'process{pid}.stderr') if log_dir else None,
                devices=8 // processes, multiprocess=True)
          for pid in range(processes)]


def saved_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def restore_state(workdir, step: int):
  """The saved train state (numpy leaves; typed keys as their data)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=metadata, restore_args=args))


def assert_same_state(workdir_a, workdir_b, step: int) -> None:
  a, b = restore_state(workdir_a, step), restore_state(workdir_b, step)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # Bit-identical.
