"""launch/ scripts: what their dry runs print, their usage errors, and the TPU worker side for real.

Every test puts a fake `gcloud`, `srun` and `sbatch` first on PATH that records its call and
fails; the fixture asserts at the end that none was called. Printed commands are split back into
words (shlex, POSIX rules), so a quoting mistake shows up as wrong words; the command a TPU
worker's shell gets is run by bash against a stand-in script, so that its quoting is bash's.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ['local.sh', 'gpu.sh', 'slurm.sbatch', 'tpu_vm.sh']
# Overrides whose values must reach heptapod_jax.main exactly as given.
OVERRIDES = ['--config.optim.lr=4e-4', '--config.note=two words',
             '--config.title=it\'s "quoted" $HOME `date` ; exec x']
JAX_PIN = re.search(r'^jax==(\S+)', (REPO / 'requirements.txt').read_text(), re.M).group(1)


def split_words(line: str) -> list[str]:
  """The words a POSIX shell makes of `line`."""
  return shlex.split(line)


def worker_argv(command: str, tmp_path: pathlib.Path) -> list[str]:
  """The arguments that `launch/tpu_vm.sh` gets when a worker's bash runs `command`.

  A stand-in script at heptapod-jax/launch/tpu_vm.sh under a scratch home records them.
  """
  stub = tmp_path / 'worker_home' / 'heptapod-jax' / 'launch' / 'tpu_vm.sh'
  stub.parent.mkdir(parents=True, exist_ok=True)
  stub.write_text('printf "%s\\0" "$@"\n')
  out = subprocess.run(['bash', '-c', command], cwd=stub.parents[2], capture_output=True,
                       text=True, check=True, timeout=10).stdout
  return out.split('\0')[:-1]


class Launcher:
  """Runs launch/ scripts with a clean environment and fake cluster tools that must stay unused."""

  def __init__(self, tmp_path: pathlib.Path):
    self.fake_bin = tmp_path / 'fake_bin'
    self.fake_bin.mkdir()
    self.calls = tmp_path / 'calls.log'
    for tool in ('gcloud', 'srun', 'sbatch'):
      path = self.fake_bin / tool
      path.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> {self.calls}\nexit 1\n')
      path.chmod(0o755)
    self.home = tmp_path / 'home'
    self.home.mkdir()
    self.env = {'PATH': f'{self.fake_bin}:{os.environ["PATH"]}', 'HOME': str(self.home),
                'TMPDIR': str(tmp_path), 'LANG': 'C.UTF-8'}

  def __call__(self, script: str, *args: str, env: dict[str, str] | None = None,
               cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(LAUNCH / script), *args], env={**self.env, **(env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=60)

  def lines(self, script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    result = self(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture
def launch(tmp_path):
  launcher = Launcher(tmp_path)
  yield launcher
  assert not launcher.calls.exists(), f'a cluster tool was called:\n{launcher.calls.read_text()}'


TPU = {'TPU_NAME': 'heptapod-pod', 'ZONE': 'us-west4-a'}


def test_scripts_are_executable_and_parse():
  for name in SCRIPTS:
    path = LAUNCH / name
    assert os.access(path, os.X_OK), f'{name} is not executable'
    subprocess.run(['bash', '-n', str(path)], check=True, timeout=10)
  if shutil.which('shellcheck'):
    result = subprocess.run(['shellcheck', '-x', '-s', 'bash', *SCRIPTS], cwd=LAUNCH,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_tpu_create(launch):
  [line] = launch.lines('tpu_vm.sh', 'create', '--accelerator-type=v5litepod-256', '--dry-run',
                        env=TPU)
  assert split_words(line) == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'heptapod-pod',
                               '--zone=us-west4-a', '--accelerator-type=v5litepod-256',
                               '--version=v2-alpha-tpuv5-lite']
  # Flags instead of the environment; a queued Spot v5p with its own runtime default.
  [line] = launch.lines('tpu_vm.sh', '--dry-run', 'create', '--queued', '--spot', '--name', 'qr',
                        '--zone=us-east5-a', '--accelerator-type', 'v5p-128', env={'PROJECT': 'p'})
  assert split_words(line) == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'qr',
                               '--node-id=qr', '--zone=us-east5-a', '--project=p',
                               '--accelerator-type=v5p-128', '--runtime-version=v2-alpha-tpuv5',
                               '--spot']


def test_tpu_setup_ships_the_repo_and_installs_the_pinned_jax(launch, tmp_path):
  archive, scp, ssh = launch.lines('tpu_vm.sh', 'setup', env={**TPU, 'DRY_RUN': '1'})
  assert split_words(archive)[:2] == ['git', 'archive'] and split_words(archive)[-1] == 'HEAD'
  tarball = split_words(archive)[split_words(archive).index('-o') + 1]
  assert split_words(scp) == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
                              'heptapod-pod:heptapod-jax.tar.gz', '--zone=us-west4-a',
                              '--worker=all']
  words = split_words(ssh)
  assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'heptapod-pod']
  assert '--zone=us-west4-a' in words and '--worker=all' in words
  command = words[-1].removeprefix('--command=')
  assert command.startswith('mkdir -p heptapod-jax && cd heptapod-jax && rm -rf heptapod_jax && ')
  assert command.endswith(' && cd heptapod-jax && bash launch/tpu_vm.sh _worker-setup')
  # What each worker then runs: the pinned jax with the TPU extra, in one pip resolve.
  installs = [split_words(line) for line in launch.lines('tpu_vm.sh', '_worker-setup', '--dry-run')]
  assert ['.venv/bin/python', '-m', 'pip', 'install', '--quiet', '-r', 'requirements.txt',
          f'jax[tpu]=={JAX_PIN}'] in installs


def test_tpu_setup_for_real_with_a_stand_in_gcloud(tmp_path):
  """Not a dry run: the tarball of HEAD is made, handed to `gcloud ... scp`, then removed."""
  launcher = Launcher(tmp_path)
  seen = tmp_path / 'seen.tar.gz'
  (launcher.fake_bin / 'gcloud').write_text(
      '#!/usr/bin/env bash\n'
      f'printf "%s\\0" "$@" >> {launcher.calls}; echo >> {launcher.calls}\n'
      f'if [[ $4 == scp ]]; then cp "$5" {seen}; fi\n')
  result = launcher('tpu_vm.sh', 'setup', env={**TPU, 'PROJECT': 'p'})
  assert result.returncode == 0, result.stderr
  scp, ssh = [c.split('\0')[:-1] for c in launcher.calls.read_text().splitlines()]
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert ssh[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'heptapod-pod'] and '--worker=all' in ssh
  assert '--project=p' in scp and '--project=p' in ssh
  assert not pathlib.Path(scp[4]).exists()  # removed on exit
  names = subprocess.run(['tar', '-tzf', str(seen)], capture_output=True, text=True, check=True,
                         timeout=30).stdout.split()
  assert 'heptapod_jax/main.py' in names and 'requirements.txt' in names
  assert not any(n.startswith(('.venv/', 'workdirs/')) for n in names)


def _worker_run(launch, worker_words: list[str], worker_id: str) -> tuple[list[str], str, str]:
  """Dry-runs `_worker-run` as worker `worker_id`: (python argv, log file, latest.log target)."""
  mkdir, link, tmux = launch.lines('tpu_vm.sh', *worker_words,
                                   env={'DRY_RUN': '1', 'TPU_WORKER_ID': worker_id})
  assert split_words(mkdir) == ['mkdir', '-p', f'{launch.home}/heptapod_logs']
  link_words = split_words(link)
  assert link_words[:2] == ['ln', '-sfn'] and link_words[3] == f'{launch.home}/heptapod_logs/latest.log'
  tmux_words = split_words(tmux)
  assert tmux_words[:6] == ['tmux', 'new-session', '-d', '-s', 'heptapod', 'bash']
  inner = tmux_words[-1]
  log = re.search(r'exec >> (\S+) 2>&1', inner).group(1)
  argv = split_words(inner.rsplit('; exec ', 1)[1])
  return argv, split_words(log)[0], link_words[2]


def test_tpu_run_passes_arguments_exactly_with_one_log_per_worker(launch, tmp_path):
  [line] = launch.lines('tpu_vm.sh', 'run', 'configs/imagenet256.py:size=H', 'gs://bucket/heptapod-H/',
                        *OVERRIDES, '--dry-run', env=TPU)
  words = split_words(line)
  assert words[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'heptapod-pod']
  assert '--zone=us-west4-a' in words and '--worker=all' in words
  worker_words = worker_argv(words[-1].removeprefix('--command='), tmp_path)
  assert worker_words[:4] == ['_worker-run', '--session=heptapod', '--run-name=heptapod-H', '--']
  logs = set()
  for worker_id in ('0', '3'):
    argv, log, latest = _worker_run(launch, worker_words, worker_id)
    assert argv == ['.venv/bin/python', '-m', 'heptapod_jax.main', '--distributed=on',
                    '--config=configs/imagenet256.py:size=H', '--workdir=gs://bucket/heptapod-H/',
                    *OVERRIDES]
    assert log == f'{launch.home}/heptapod_logs/heptapod-H.worker{worker_id}.log'
    assert latest == f'heptapod-H.worker{worker_id}.log'
    logs.add(log)
  assert len(logs) == 2


def test_tpu_logs_status_stop_delete(launch):
  [line] = launch.lines('tpu_vm.sh', 'logs', '2', '--dry-run', env=TPU)
  words = split_words(line)
  assert words[4:7] == ['ssh', 'heptapod-pod', '--zone=us-west4-a'] and '--worker=2' in words
  assert words[-1] == '--command=tail -n 200 -F heptapod_logs/latest.log'

  describe, ssh = launch.lines('tpu_vm.sh', 'status', '--dry-run', env=TPU)
  assert split_words(describe)[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe',
                                       'heptapod-pod']
  assert '--worker=all' in split_words(ssh) and '_worker-status' in ssh

  [line] = launch.lines('tpu_vm.sh', 'stop', '--dry-run', env=TPU)
  words = split_words(line)
  assert '--worker=all' in words and '_worker-stop' in words[-1]

  [line] = launch.lines('tpu_vm.sh', 'delete', '--dry-run', env=TPU)
  assert split_words(line) == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'heptapod-pod',
                               '--zone=us-west4-a']
  [line] = launch.lines('tpu_vm.sh', 'delete', '--queued', '--dry-run', env=TPU)
  assert split_words(line) == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
                               'heptapod-pod', '--zone=us-west4-a', '--force']


@pytest.mark.parametrize('script, args, env, missing', [
    ('tpu_vm.sh', ['run', 'configs/demo.py'], TPU, 'WORKDIR'),
    ('tpu_vm.sh', ['run'], TPU, 'CONFIG'),
    ('tpu_vm.sh', ['run', 'configs/demo.py', 'gs://b/w'], {}, 'TPU_NAME'),
    ('tpu_vm.sh', ['setup'], {'TPU_NAME': 'x'}, 'ZONE'),
    ('tpu_vm.sh', ['create'], TPU, 'ACCELERATOR_TYPE'),
    ('tpu_vm.sh', [], TPU, 'SUBCOMMAND'),
    ('tpu_vm.sh', ['frobnicate'], TPU, "unknown subcommand 'frobnicate'"),
    ('tpu_vm.sh', ['logs', 'two'], TPU, 'WORKER'),
    ('gpu.sh', ['run', 'configs/demo.py'], {}, 'WORKDIR'),
    ('gpu.sh', [], {}, 'SUBCOMMAND'),
    ('slurm.sbatch', [], {}, 'CONFIG'),
    ('slurm.sbatch', ['configs/demo.py'], {}, 'WORKDIR'),
    ('slurm.sbatch', ['configs/demo.py', 'w'], {}, 'not inside a SLURM job'),
])
def test_bad_input_exits_with_usage(launch, script, args, env, missing):
  result = launch(script, *args, env=env)
  assert result.returncode == 2
  assert missing in result.stderr and 'usage:' in result.stderr
  assert not result.stdout


def test_gpu_run_dry_run_and_for_real(launch, tmp_path):
  [line] = launch.lines('gpu.sh', '--dry-run', 'run', 'configs/demo.py', 'workdirs/w', *OVERRIDES,
                        env={'XLA_FLAGS': '--xla_dump_to=/tmp/d'})
  command, tee = line.split(' 2>&1 | ')
  words = split_words(command)
  assert words[0] == 'env' and words[1].startswith('XLA_FLAGS=--xla_gpu_enable_latency_hiding')
  assert words[1].endswith(' --xla_dump_to=/tmp/d')  # the caller's flags last: they win
  assert words[2] == 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9'
  assert words[3:] == ['.venv/bin/python', '-m', 'heptapod_jax.main', '--config=configs/demo.py',
                       '--workdir=workdirs/w', *OVERRIDES]
  assert split_words(tee) == ['tee', '-a', '-i', 'workdirs/w/log.txt']

  # For real, with a stand-in for python: the same argv arrives and lands in WORKDIR/log.txt.
  fake = tmp_path / 'python'
  fake.write_text('#!/usr/bin/env bash\nprintf "arg:%s\\n" "$@"\necho "flags:$XLA_FLAGS"\n')
  fake.chmod(0o755)
  workdir = tmp_path / 'work'
  result = launch('gpu.sh', 'run', 'configs/demo.py', str(workdir), *OVERRIDES,
                  env={'PYTHON': str(fake)})
  assert result.returncode == 0, result.stderr
  expected = [f'arg:{a}' for a in ['-m', 'heptapod_jax.main', '--config=configs/demo.py',
                                   f'--workdir={workdir}', *OVERRIDES]]
  log = workdir / 'log.txt'
  for _ in range(50):  # tee may still be writing when the script returns
    if log.exists() and log.read_text().count('\n') >= len(expected) + 1:
      break
    time.sleep(0.1)
  assert log.read_text().splitlines()[:len(expected)] == expected
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in log.read_text()


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib(launch):
  """XLA aborts on an unknown flag name; the CPU jaxlib parses the GPU flags as well."""
  [line] = launch.lines('gpu.sh', 'run', 'c', 'w', '--dry-run')
  flags = split_words(line.split(' 2>&1 | ')[0])[1].removeprefix('XLA_FLAGS=')
  env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', 'import jax.numpy as jnp; print(jnp.ones(2).sum())'],
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]


def test_gpu_setup_installs_the_pinned_jax(launch):
  installs = [split_words(line) for line in launch.lines('gpu.sh', 'setup', '--dry-run')]
  assert ['.venv/bin/python', '-m', 'pip', 'install', '--quiet', '-r', 'requirements.txt',
          f'jax[cuda12]=={JAX_PIN}'] in installs


def test_slurm_dry_run_prints_srun_with_distributed_on(launch, tmp_path):
  [line] = launch.lines('slurm.sbatch', 'configs/imagenet256.py:size=XL', '/shared/w', *OVERRIDES,
                        env={'DRY_RUN': '1'})
  words = split_words(line)
  assert words[:4] == ['srun', '--ntasks-per-node=1', '--kill-on-bad-exit=1',
                       '--output=/shared/w/logs/slurm-JOBID.task%t.log']
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in words
  main = words.index('heptapod_jax.main')
  assert words[main + 1:] == ['--distributed=on', '--config=configs/imagenet256.py:size=XL',
                              '--workdir=/shared/w', *OVERRIDES]
  # Inside a job: the repo is found from SLURM_SUBMIT_DIR (sbatch runs a copy of the script
  # elsewhere) and the GPUs per node from SLURM.
  slurm = {'SLURM_JOB_ID': '42', 'SLURM_SUBMIT_DIR': str(REPO), 'SLURM_GPUS_ON_NODE': '4'}
  copy = tmp_path / 'spool' / 'slurm_script'
  copy.parent.mkdir()
  shutil.copy(LAUNCH / 'slurm.sbatch', copy)
  result = subprocess.run(['bash', str(copy), 'c', 'w', '--dry-run'], cwd=tmp_path,
                          env={**launch.env, **slurm}, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  words = split_words(result.stdout)
  assert '--output=w/logs/slurm-42.task%t.log' in words and 'JAX_LOCAL_DEVICE_IDS=0,1,2,3' in words


def test_slurm_directives_ask_for_one_task_per_node():
  text = (LAUNCH / 'slurm.sbatch').read_text().splitlines()
  first_command = next(i for i, l in enumerate(text) if l.strip() and not l.startswith('#'))
  directives = [l for l in text[:first_command] if l.startswith('#SBATCH')]
  assert '#SBATCH --ntasks-per-node=1' in directives
  assert not any(l.startswith('#SBATCH') for l in text[first_command:])


@pytest.mark.skipif(not shutil.which('tmux'), reason='needs tmux')
def test_tpu_worker_run_status_stop_for_real(tmp_path):
  """The worker side under a private tmux server, with a stand-in trainer that waits for SIGTERM."""
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  shutil.copy(LAUNCH / 'tpu_vm.sh', repo / 'launch')
  (repo / '.venv' / 'bin').mkdir(parents=True)
  fake = repo / '.venv' / 'bin' / 'python'
  fake.write_text('#!/usr/bin/env bash\n'
                  'trap \'echo "trainer: got SIGTERM, checkpointing"; exit 0\' TERM\n'
                  'printf "%s\\0" "$@" > "$HOME/argv"\n'
                  'echo "trainer: up"\n'
                  'while :; do sleep 0.1; done\n')
  fake.chmod(0o755)
  home = tmp_path / 'home'
  home.mkdir()
  socket_dir = tempfile.mkdtemp(prefix='tmx')  # tmux socket paths must stay short
  env = {'PATH': os.environ['PATH'], 'HOME': str(home), 'TMUX_TMPDIR': socket_dir,
         'TPU_WORKER_ID': '2', 'LANG': 'C.UTF-8'}

  def worker(*args):
    return subprocess.run(['bash', str(repo / 'launch' / 'tpu_vm.sh'), *args], env=env,
                          capture_output=True, text=True, timeout=60)

  try:
    started = worker('_worker-run', '--session=t', '--run-name=r', '--', 'cfg', 'gs://b/r', *OVERRIDES)
    assert started.returncode == 0, started.stderr
    log = home / 'heptapod_logs' / 'r.worker2.log'
    for _ in range(100):
      if (home / 'argv').exists() and 'trainer: up' in log.read_text():
        break
      time.sleep(0.1)
    assert (home / 'argv').read_text().split('\0')[:-1] == [
        '-m', 'heptapod_jax.main', '--distributed=on', '--config=cfg', '--workdir=gs://b/r',
        *OVERRIDES]
    assert (home / 'heptapod_logs' / 'latest.log').resolve() == log.resolve()
    assert 'worker 2:' in log.read_text().splitlines()[0]  # the header names worker and command

    assert worker('_worker-status', '--session=t').stdout.startswith('worker 2: running | trainer: up')
    again = worker('_worker-run', '--session=t', '--', 'cfg', 'w')
    assert again.returncode != 0 and 'running already' in again.stderr

    stopped = worker('_worker-stop', '--session=t', '--grace=20')
    assert stopped.returncode == 0, stopped.stderr
    assert 'worker 2: stopped' in stopped.stdout
    for _ in range(50):
      if 'got SIGTERM' in log.read_text():
        break
      time.sleep(0.1)
    assert 'trainer: got SIGTERM, checkpointing' in log.read_text()
    assert worker('_worker-status', '--session=t').stdout.startswith('worker 2: stopped')
  finally:
    subprocess.run(['tmux', 'kill-server'], env=env, capture_output=True, timeout=10)
    shutil.rmtree(socket_dir, ignore_errors=True)
