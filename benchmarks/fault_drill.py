"""Fault drill: inject every kind of fault several times, at seeded random moments, into tiny
runs of each long job, and check that a rerun of the same command recovers exactly.

  python benchmarks/fault_drill.py                 # every kind, 5 trials each (about 60 min)
  python benchmarks/fault_drill.py --quick         # every kind, 1 trial each (about 12 min)
  python benchmarks/fault_drill.py --kinds=lost_process,full_disk --trials=3 --seed=1
  python benchmarks/fault_drill.py --kinds=sigkill_save_gs,sigkill_sample_gs,bucket_outage
      # the bucket kinds, 5 trials each: 40 min on a 2-core Intel Xeon (beside the test suite)

Kinds (each trial starts from an empty directory, injects the fault into real child
processes, reruns the same command until it completes, and compares with an uninterrupted run
of the same command):

  sigterm               SIGTERM to the trainer at a random step (it saves and stops);
  sigkill_training      SIGKILL to the trainer at a random step;
  sigkill_async_save    SIGKILL while Orbax's background commit of a checkpoint is pending;
  lost_process          SIGKILL to process 1 of a 2-process job (jax.distributed, gloo) at a
                        random step: process 0 must stop by itself within
                        config.distributed.peer_timeout_s with exit code 75 and a failure.txt;
  lost_process_in_save  the same while both processes hold a checkpoint commit open;
  full_disk             the trainer's workdir on a small tmpfs filled up at a random step
                        (needs root or CAP_SYS_ADMIN to mount; the row says so otherwise);
                        the rerun, with the space back, resumes from the newest intact step;
  sigkill_tokenizer     SIGKILL to tokenizer training at a random step;
  sigkill_sample        SIGKILL to sample mode (class-balanced generation in chunks) at a
                        random moment of its run; samples must equal the uninterrupted ones;
  sigkill_tokenize      SIGKILL to tools/tokenize_dataset at a random moment; every shard and
                        metadata.json must equal the uninterrupted run's.
  sigkill_reference     SIGKILL to tools/reference_stats (the FID reference statistics of the
                        train split, in saved parts) at a random moment; the statistics and
                        pool features must equal the uninterrupted run's.

Bucket kinds: the job's files on gs:// of a real GCS server on loopback (tests/gcs_world.py:
the unmodified clients reach it as storage.googleapis.com inside a network namespace; needs
`unshare`/`nsenter`). The result is downloaded over plain HTTP and compared with the same
uninterrupted LOCAL run, so a bucket run must equal a disk run bit for bit:

  sigkill_save_gs       SIGKILL while Orbax's commit of a checkpoint to gs:// is pending (its
                        step directory is there under its final name, without the commit
                        marker); the rerun must set it aside and resume from the newest
                        committed step;
  sigkill_sample_gs     SIGKILL to sample mode while its chunks go to gs://;
  bucket_outage         the server stopped for --outage_s seconds (default 30) at a random step
                        of a training run on gs://, then started again: the run rides it out
                        (the clients retry) or stops naming the path; then the same command
                        until it completes.

Columns: recovered = the final result equals the uninterrupted run's (train state bit-identical:
parameters, optimizer state, EMA, RNG and data position; samples and shards array-equal);
steps lost = updates done before the fault that were redone (trainer kinds, mean); data lost =
trials whose final result differs (a lost or repeated batch, a lost checkpoint or chunk would
show there; must be 0); detected = seconds from the kill to the survivor's exit (lost-process
kinds, mean / max over trials).
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# The drilled runs use 8 CPU devices (mesh 4 x 2), in this process and in the children.
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
from heptapod_jax import console  # noqa: E402
console.quiet_dependencies()  # Before TensorFlow loads: its start-up notices.

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, 'tests', 'faults'), os.path.join(ROOT, 'tests')]
import _harness as h  # noqa: E402

KINDS = ('sigterm', 'sigkill_training', 'sigkill_async_save', 'lost_process',
         'lost_process_in_save', 'full_disk', 'sigkill_tokenizer', 'sigkill_sample',
         'sigkill_tokenize', 'sigkill_reference', 'sigkill_save_gs', 'sigkill_sample_gs',
         'bucket_outage')
# Kinds that are not the trainer: no steps to lose.
_JOB_KINDS = ('sigkill_sample', 'sigkill_tokenize', 'sigkill_reference', 'sigkill_sample_gs')
_BUCKET_KINDS = ('sigkill_save_gs', 'sigkill_sample_gs', 'bucket_outage')
_REFERENCE = os.path.join('feature_net', 'reference_builtin_digits_train_32.npz')
_REFERENCE_PARTS = 94  # 1,500 images in parts of 16.
_TRIALS = flags.DEFINE_integer('trials', 5, 'Trials per fault kind.')
_QUICK = flags.DEFINE_bool('quick', False, 'One trial per kind (overrides --trials).')
_STEPS = flags.DEFINE_integer('steps', 12, 'Training steps of the drilled trainer runs.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the fault moments (a failure reproduces).')
_KINDS = flags.DEFINE_list('kinds', list(KINDS), f'Fault kinds to drill, of {list(KINDS)}.')
_OUTAGE_S = flags.DEFINE_float('outage_s', 30.0, 'bucket_outage: seconds the server is down.')
_PEER_TIMEOUT = 4  # config.distributed.peer_timeout_s of the 2-process runs.
_DISTRIBUTED = {'distributed.peer_timeout_s': _PEER_TIMEOUT,
                'distributed.heartbeat_timeout_s': 30}
_TOKENIZER = {  # configs/vq_demo.py shrunk as tests/test_train_tokenizer.py does.
    'tokenizer.vq.ch': 32, 'tokenizer.vq.ch_mult': (1, 2, 2), 'tokenizer.vq.num_res_blocks': 1,
    'tokenizer.vq.dec_num_res_blocks': 1, 'tokenizer.vq.z_channels': 32,
    'train.global_batch_size': 8, 'train.log_every': 2, 'train.checkpoint_every': 2,
    'train.eval_batches': 1, 'train.num_recon_images': 4, 'mesh.shape': (-1, 1, 1),
    'loss.perceptual_weight': 0.0}


def _flag_list(overrides: dict) -> list[str]:
  out = []
  for key, value in overrides.items():
    value = '(' + ','.join(str(v) for v in value) + ')' if isinstance(value, tuple) else value
    out.append(f'--config.{key}={value}')
  return out


class Trial:
  """What one trial reports."""

  def __init__(self, done_before: int = 0, resumed_from: int = 0, detected_s: float | None = None,
               note: str = ''):
    self.done_before, self.resumed_from = done_before, resumed_from
    self.detected_s, self.note = detected_s, note


class Drill:
  """The uninterrupted references (made once, when a kind first needs them) and the kinds."""

  def __init__(self, root: str, data_dir: str, steps: int):
    self.root, self.data_dir, self.steps = root, data_dir, steps
    self._refs: dict[str, str] = {}
    self._durations: dict[str, float] = {}
    self._world = None

  def world(self):
    """The GCS server and namespace of the bucket kinds (started on first use)."""
    if self._world is None:
      from gcs_world import GcsWorld  # pylint: disable=g-import-not-at-top
      self._world = GcsWorld(os.path.join(self.root, 'gcs_world')).start()
    return self._world

  def close(self) -> None:
    if self._world is not None:
      self._world.close()

  # -- commands ------------------------------------------------------------------------------

  def train_argv(self, workdir: str, **extra) -> list[str]:
    return h.flags(self.steps, workdir, self.data_dir, **extra)

  def tokenizer_argv(self, workdir: str) -> list[str]:
    return [f'--config={ROOT}/configs/vq_demo.py:steps={self.steps},codes=16',
            f'--workdir={workdir}', f'--config.data.data_dir={self.data_dir}',
            *_flag_list(_TOKENIZER)]

  def sample_argv(self, out_dir: str) -> list[str]:
    return [*self.train_argv(self.reference('train')), '--mode=sample',
            '--config.sample.num_per_class=8', '--config.sample.chunk_size=8',  # 10 chunks
            '--config.sample.evaluate=False', f'--config.sample.out_dir={out_dir}']

  def tokenize_command(self, out_dir: str) -> list[str]:
    return [sys.executable, '-m', 'heptapod_jax.tools.tokenize_dataset',
            f'--config={ROOT}/configs/demo.py:tokenizer=pixel',
            f'--config.data.data_dir={self.data_dir}',
            '--config.data.train_split=train[:480]',  # 30 shards of 16
            f'--out={out_dir}', '--variants=center', '--shard_size=16', '--batch_size=16']

  def reference_stats_command(self, workdir: str) -> list[str]:
    return [sys.executable, '-m', 'heptapod_jax.tools.reference_stats',
            f'--config={ROOT}/configs/demo.py:tokenizer=pixel', f'--workdir={workdir}',
            f'--config.data.data_dir={self.data_dir}', '--config.evaluator.batch_size=8',
            '--config.evaluator.reference_part_size=16']

  # -- references ----------------------------------------------------------------------------

  def reference(self, name: str) -> str:
    """The uninterrupted run of `name` (train, train2, tokenizer, sample, tokenize,
    reference_stats)."""
    if name in self._refs:
      return self._refs[name]
    path = os.path.join(self.root, f'reference_{name}')
    t0 = time.time()
    if name == 'train':
      rcs = [h.Child(self.train_argv(path)).finish()]
    elif name == 'train2':
      rcs = [c.finish() for c in h.job(self.train_argv(path, **_DISTRIBUTED))]
    elif name == 'tokenizer':
      rcs = [h.Child(self.tokenizer_argv(path)).finish()]
    elif name == 'sample':
      self.reference('train')
      t0 = time.time()
      rcs = [h.Child(self.sample_argv(path)).finish()]
    elif name == 'tokenize':
      rcs = [subprocess.run(self.tokenize_command(path), env=_child_env(), cwd=ROOT,
                            capture_output=True, check=False).returncode]
    elif name == 'reference_stats':
      rcs = [subprocess.run(self.reference_stats_command(path), env=_child_env(), cwd=ROOT,
                            capture_output=True, check=False).returncode]
    else:
      raise ValueError(name)
    if any(rcs):
      raise RuntimeError(f'the uninterrupted {name} run failed (exit codes {rcs}) in {path}')
    self._durations[name] = time.time() - t0
    console.say(f'reference: an uninterrupted {name} run in {path} '
                f'({self._durations[name]:.0f} s)')
    self._refs[name] = path
    return path

  # -- the kinds -----------------------------------------------------------------------------

  def run(self, kind: str, workdir: str, rng: random.Random) -> tuple[Trial, bool]:
    """One trial of `kind` in `workdir`: (its report, whether it recovered exactly)."""
    return getattr(self, f'_{kind}')(workdir, rng)

  def _trainer(self, kind, workdir, rng, runner_args=()):
    steps = self.steps
    child = h.Child(self.train_argv(workdir), runner_args=runner_args)
    if kind == 'sigkill_async_save':
      for _ in range(rng.randint(1, steps // 2 - 1)):
        child.wait_for('COMMIT_PENDING')
      child.proc.kill()
    else:
      child.wait_for(f'STEP {rng.randint(1, steps - 2)}')
      if kind == 'sigterm':
        child.proc.send_signal(signal.SIGTERM)
      else:
        time.sleep(rng.uniform(0.0, 0.5))
        child.proc.kill()
    child.finish()
    trial = Trial(_last_step(child), _newest(workdir))
    return trial, self._rerun_and_compare(workdir, 'train')

  def _sigterm(self, workdir, rng):
    return self._trainer('sigterm', workdir, rng)

  def _sigkill_training(self, workdir, rng):
    return self._trainer('sigkill_training', workdir, rng)

  def _sigkill_async_save(self, workdir, rng):
    return self._trainer('sigkill_async_save', workdir, rng, runner_args=('--slow_commit=30',))

  def _rerun_and_compare(self, workdir, reference: str, argv=None) -> bool:
    rc = h.Child(argv or self.train_argv(workdir)).finish()
    return rc == 0 and _same_state(self.reference(reference), workdir, self.steps)

  def _lost(self, workdir, rng, in_save: bool):
    self.reference('train2')
    argv = self.train_argv(workdir, **_DISTRIBUTED)
    survivor, victim = h.job(argv, runner_args=('--slow_commit=8',) if in_save else ())
    if in_save:
      for _ in range(rng.randint(1, self.steps // 2 - 1)):
        survivor.wait_for('COMMIT_PENDING')
    else:
      survivor.wait_for(f'STEP {rng.randint(2, self.steps - 2)}')
      time.sleep(rng.uniform(0.0, 0.5))
    victim.proc.kill()
    killed = time.time()
    rc = survivor.finish(timeout=300)
    detected = time.time() - killed
    victim.finish()
    failure = os.path.join(workdir, 'failure.txt')
    said = os.path.exists(failure) and open(failure).read().startswith('Process 1 of 2 was lost')
    trial = Trial(_last_step(survivor), _newest(workdir), detected,
                  '' if rc == 75 and said else f'survivor exit {rc}, failure.txt: {said}')
    rcs = [c.finish() for c in h.job(argv)]
    same = rcs == [0, 0] and _same_state(self.reference('train2'), workdir, self.steps)
    return trial, same and rc == 75 and said

  def _lost_process(self, workdir, rng):
    return self._lost(workdir, rng, in_save=False)

  def _lost_process_in_save(self, workdir, rng):
    return self._lost(workdir, rng, in_save=True)

  def _full_disk(self, workdir, rng):
    with _small_disk(workdir, 48) as mounted:
      if not mounted:
        return Trial(note='skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)'), None
      run = os.path.join(workdir, 'run')
      child = h.Child(self.train_argv(run))
      child.wait_for(f'STEP {rng.randint(1, self.steps - 3)}')
      filler = os.path.join(workdir, 'filler')
      _fill(filler)
      rc = child.finish()
      trial = Trial(_last_step(child), _newest(run), note=f'first run exit {rc}')
      os.remove(filler)
      return trial, self._rerun_and_compare(run, 'train', self.train_argv(run))

  def _sigkill_tokenizer(self, workdir, rng):
    reference = self.reference('tokenizer')
    child = h.Child(self.tokenizer_argv(workdir))
    child.wait_for(f'STEP {rng.randint(1, self.steps - 2)}')
    time.sleep(rng.uniform(0.0, 0.5))
    child.proc.kill()
    child.finish()
    trial = Trial(_last_step(child), _newest(workdir))
    rc = h.Child(self.tokenizer_argv(workdir)).finish()
    return trial, rc == 0 and _same_state(reference, workdir, self.steps)

  def _sigkill_sample(self, workdir, rng):
    reference = self.reference('sample')
    child = h.Child(self.sample_argv(workdir))
    _wait_for_files(os.path.join(workdir, 'chunks', 'chunk_*.npz'), rng.randint(1, 9), child.proc)
    time.sleep(rng.uniform(0.0, 0.3))
    child.proc.kill()
    child.finish()
    chunks = len(glob.glob(os.path.join(workdir, 'chunks', 'chunk_*.npz')))
    rc = h.Child(self.sample_argv(workdir)).finish()
    return Trial(note=f'{chunks} chunks on disk at the kill'), rc == 0 and _same_samples(
        reference, workdir)

  def _sigkill_tokenize(self, workdir, rng):
    reference = self.reference('tokenize')
    proc = subprocess.Popen(self.tokenize_command(workdir), env=_child_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_files(os.path.join(workdir, 'codes-*.npz'), rng.randint(1, 29), proc)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    proc.wait()
    shards = len(glob.glob(os.path.join(workdir, 'codes-*.npz')))
    rc = subprocess.run(self.tokenize_command(workdir), env=_child_env(), cwd=ROOT,
                        capture_output=True, check=False).returncode
    return Trial(note=f'{shards} shards on disk at the kill'), rc == 0 and _same_shards(
        reference, workdir)

  # -- the bucket kinds ----------------------------------------------------------------------

  def _sigkill_save_gs(self, workdir, rng):
    world, name = self.world(), os.path.basename(workdir)
    url = world.url(name)
    child = h.Child(self.train_argv(url), runner_args=('--slow_commit=30',), world=world)
    for _ in range(rng.randint(1, self.steps // 2 - 1)):
      child.wait_for('COMMIT_PENDING')
    child.proc.kill()
    child.finish()
    committed = _committed_steps(world, name)
    pending = sorted(set(_step_dirs(world, name)) - set(committed))
    trial = Trial(_last_step(child), committed[-1] if committed else 0,
                  note=f'uncommitted step directories at the kill: {pending}')
    rc = h.Child(self.train_argv(url), world=world).finish()
    _download(world, name, workdir)
    return trial, rc == 0 and _same_state(self.reference('train'), workdir, self.steps)

  def _sigkill_sample_gs(self, workdir, rng):
    reference = self.reference('sample')
    world, name = self.world(), os.path.basename(workdir)
    argv = self.sample_argv(world.url(name))
    child = h.Child(argv, world=world)
    count = rng.randint(1, 9)
    deadline = time.time() + 300
    while (len(_objects(world, f'{name}/chunks/', '.npz')) < count and child.proc.poll() is None
           and time.time() < deadline):
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.3))
    child.proc.kill()
    child.finish()
    chunks = len(_objects(world, f'{name}/chunks/', '.npz'))
    rc = h.Child(argv, world=world).finish()
    _download(world, name, workdir)
    return Trial(note=f'{chunks} chunks in the bucket at the kill'), rc == 0 and _same_samples(
        reference, workdir)

  def _bucket_outage(self, workdir, rng):
    world, name = self.world(), os.path.basename(workdir)
    url = world.url(name)
    child = h.Child(self.train_argv(url), world=world,
                    log_path=os.path.join(self.root, f'{name}.stderr'))
    at = rng.randint(1, self.steps - 3)
    child.wait_for(f'STEP {at}')
    time.sleep(rng.uniform(0.0, 0.5))
    world.stop_server()
    time.sleep(_OUTAGE_S.value)
    world.start_server()
    rc = child.finish(timeout=900)
    said = [l.strip() for l in (child.stdout() + child.stderr_tail()).splitlines()
            if 'gs://' in l and ('Error' in l or 'fail' in l or 'could not' in l)]
    note = 'rode it out' if rc == 0 else f'stopped, exit {rc}: {said[-1][:200] if said else "?"}'
    # Steps lost: none when the run rode the outage out, else those after the newest commit.
    trial = Trial(at, at if rc == 0 else (_committed_steps(world, name) or [0])[-1], note=note)
    reruns = 0
    while rc != 0 and reruns < 3:
      rc, reruns = h.Child(self.train_argv(url), world=world).finish(timeout=900), reruns + 1
    _download(world, name, workdir)
    return trial, rc == 0 and _same_state(self.reference('train'), workdir, self.steps)

  def _sigkill_reference(self, workdir, rng):
    reference = self.reference('reference_stats')
    # The uninterrupted run's trained feature net: what is killed is the statistics' job.
    shutil.copytree(os.path.join(reference, 'feature_net'), os.path.join(workdir, 'feature_net'),
                    ignore=shutil.ignore_patterns('reference_*'))
    parts = os.path.join(workdir, _REFERENCE + '.parts', 'part-??????.npz')
    proc = subprocess.Popen(self.reference_stats_command(workdir), env=_child_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Parts come about 30 a second: the moment within a part is random enough by itself.
    _wait_for_files(parts, rng.randint(1, _REFERENCE_PARTS - 4), proc, poll=0.005)
    proc.kill()
    proc.wait()
    saved = len(glob.glob(parts))
    finished = os.path.exists(os.path.join(workdir, _REFERENCE))
    rc = subprocess.run(self.reference_stats_command(workdir), env=_child_env(), cwd=ROOT,
                        capture_output=True, check=False).returncode
    note = ('it had finished before the kill' if finished
            else f'{saved} of {_REFERENCE_PARTS} parts on disk at the kill')
    return Trial(note=note), (
        rc == 0 and _same_npz(os.path.join(reference, _REFERENCE),
                              os.path.join(workdir, _REFERENCE)))


def _wait_for_files(pattern: str, count: int, proc: subprocess.Popen, timeout: float = 300,
                    poll: float = 0.05):
  """Until `count` files match `pattern` (a job's outputs so far) or the job has ended."""
  deadline = time.time() + timeout
  while (len(glob.glob(pattern)) < count and proc.poll() is None and time.time() < deadline):
    time.sleep(poll)


def _objects(world, prefix: str, suffix: str = '') -> list[str]:
  return [n for n in world.list(prefix) if n.endswith(suffix) and not n.endswith('/')]


def _step_dirs(world, name: str) -> list[int]:
  prefix = f'{name}/checkpoints/'
  return sorted({int(n[len(prefix):].split('/')[0]) for n in world.list(prefix)
                 if n[len(prefix):].split('/')[0].isdigit()})


def _committed_steps(world, name: str) -> list[int]:
  """Steps whose Orbax commit marker is in the bucket (the finished saves)."""
  return [s for s in _step_dirs(world, name)
          if f'{name}/checkpoints/{s}/commit_success.txt' in world.list(f'{name}/checkpoints/{s}/')]


def _download(world, name: str, local_dir: str) -> None:
  """Every object under `name/` into `local_dir`, over plain HTTP (not the tested clients)."""
  for obj in _objects(world, name + '/'):
    path = os.path.join(local_dir, obj[len(name) + 1:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(world.read(obj))


def _child_env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='', TF_CPP_MIN_LOG_LEVEL='3',
              PYTHONPATH=ROOT)


def _last_step(child: h.Child) -> int:
  # The gloo library writes to the same stdout ('STEP 1[Gloo] Rank 0 is connected ...').
  steps = [int(m.group(1)) for m in map(re.compile(r'STEP (\d+)').match, child.lines) if m]
  return steps[-1] if steps else 0


def _newest(workdir: str) -> int:
  steps = h.saved_steps(workdir)
  return steps[-1] if steps else 0


def _same_state(reference: str, workdir: str, step: int) -> bool:
  try:
    h.assert_same_state(reference, workdir, step)
    return True
  except (AssertionError, OSError, ValueError, FileNotFoundError):
    return False


def _same_samples(reference: str, out_dir: str) -> bool:
  [ref] = glob.glob(os.path.join(reference, 'samples_*.npz'))
  found = glob.glob(os.path.join(out_dir, 'samples_*.npz'))
  if len(found) != 1:
    return False
  with np.load(ref) as a, np.load(found[0]) as b:
    return all(np.array_equal(a[k], b[k]) for k in ('arr_0', 'arr_1'))


def _same_npz(want: str, got: str) -> bool:
  if not os.path.exists(got):
    return False
  with np.load(want) as a, np.load(got) as b:
    return sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def _same_shards(reference: str, out_dir: str) -> bool:
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(reference, 'codes-*.npz')))
  if names != sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, 'codes-*.npz'))):
    return False
  for name in names:
    with np.load(os.path.join(reference, name)) as a, np.load(os.path.join(out_dir, name)) as b:
      if sorted(a.files) != sorted(b.files) or not all(np.array_equal(a[k], b[k]) for k in a.files):
        return False
  meta = [json.load(open(os.path.join(d, 'metadata.json'))) for d in (reference, out_dir)]
  return meta[0] == meta[1]


@contextlib.contextmanager
def _small_disk(path: str, megabytes: int):
  """A tmpfs of `megabytes` MB at `path` (yields False when mounting is not allowed)."""
  os.makedirs(path, exist_ok=True)
  mounted = shutil.which('mount') is not None and subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', f'size={megabytes}m', 'tmpfs', path],
      capture_output=True, check=False).returncode == 0
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(['umount', '-l', path], check=False)


def _fill(path: str) -> None:
  block = b'\0' * (1 << 16)
  with open(path, 'wb', buffering=0) as f:
    while True:
      try:
        f.write(block)
      except OSError as e:
        if e.errno != errno.ENOSPC:
          raise
        return


def main(argv):
  del argv
  unknown = sorted(set(_KINDS.value) - set(KINDS))
  if unknown:
    raise app.UsageError(f'--kinds: unknown {unknown}; known: {list(KINDS)}')
  trials = 1 if _QUICK.value else _TRIALS.value
  root = tempfile.mkdtemp(prefix='fault_drill_')
  data_dir = os.path.join(root, 'tfds')
  # The terminal: a progress bar over the trials and a line per trial; the records of this
  # process go to <root>/log.txt (removed with the drill's files).
  console.setup(root)
  console.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  from heptapod_jax.data import builtin
  builtin.prepare(data_dir)
  drill = Drill(root, data_dir, _STEPS.value)
  rng = random.Random(_SEED.value)
  with contextlib.closing(drill):
    rows, t_start = _drill_all(drill, root, rng, trials)
  _print_table(rows, t_start)
  shutil.rmtree(root, ignore_errors=True)


def _drill_all(drill: Drill, root: str, rng: random.Random, trials: int):
  """Every kind's trials; (rows of (kind, [(Trial, recovered)]), start time)."""
  rows = []
  t_start = time.time()
  bar = console.progress(len(_KINDS.value) * trials, desc='fault drill', unit='trial', every=1)
  try:
    for kind in _KINDS.value:
      results = []
      for trial in range(trials):
        workdir = os.path.join(root, f'{kind}_{trial}')
        report, same = drill.run(kind, workdir, rng)
        results.append((report, same))
        what = ('skipped' if same is None else 'recovered' if same else 'NOT RECOVERED')
        console.say(f'  {kind} trial {trial}: {what}; fault after {report.done_before} updates, '
                    f'resumed from step {report.resumed_from}'
                    + (f', detected in {report.detected_s:.1f} s' if report.detected_s else '')
                    + (f' ({report.note})' if report.note else ''))
        bar.update(bar.n + 1)
        shutil.rmtree(workdir, ignore_errors=True)
      rows.append((kind, results))
  finally:
    bar.close()
  return rows, t_start


def _print_table(rows, t_start: float) -> None:
  print(f'\n{"fault injected":22s} {"trials":>6s} {"recovered":>9s} {"steps lost":>10s} '
        f'{"data lost":>9s} {"detected (s)":>14s}')
  for kind, results in rows:
    ran = [(r, s) for r, s in results if s is not None]
    if not ran:
      print(f'{kind:22s} {len(results):6d} {"-":>9s} {"-":>10s} {"-":>9s} {"-":>14s}  '
            f'{results[0][0].note}')
      continue
    trainer_kind = kind not in _JOB_KINDS
    lost = (f'{np.mean([max(r.done_before - r.resumed_from, 0) for r, _ in ran]):.1f}'
            if trainer_kind else '-')
    det = [r.detected_s for r, _ in ran if r.detected_s is not None]
    det = f'{np.mean(det):.1f} / {max(det):.1f}' if det else '-'
    print(f'{kind:22s} {len(ran):6d} {sum(bool(s) for _, s in ran):9d} {lost:>10s} '
          f'{sum(not s for _, s in ran):9d} {det:>14s}')
  print(f'(tiny configs: trainer {_STEPS.value} steps, checkpoint every 2, async saves; '
        f'2-process runs with peer_timeout_s={_PEER_TIMEOUT}; seed {_SEED.value}; '
        f'{(time.time() - t_start) / 60:.1f} min)')


if __name__ == '__main__':
  app.run(main)
