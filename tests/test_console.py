"""What a person sees: a run prints stage headings, progress and results, not the records,
which go whole to <workdir>/log.txt; dependency notices stay off the terminal."""
import importlib.util
import os
import pty
import re
import select
import subprocess
import sys
import time


from heptapod_jax import console

from test_data import digits_dir  # noqa: F401  (fixture: the built-in digits, prepared once)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the dependencies printed on every run before (see console.py): none may reach the user.
NOTICES = ('oneDNN custom operations', 'absl::InitializeLog', 'cpu_feature_guard',
           'unexpected worker hostname', 'Source Location Trace', 'libtpu',
           "Unable to initialize backend 'tpu'", 'read_only=True', 'is read only')


def _run_argv(workdir, data_dir, steps=4):
  """A tiny AR run of the demo recipe (pixel tokens, 2 x 32 backbone) through the real CLI."""
  overrides = {
      'model.backbone.width': 32, 'model.backbone.depth': 2, 'model.backbone.num_heads': 2,
      'model.head.width': 32, 'model.head.depth': 1, 'model.head.num_heads': 2,
      'train.global_batch_size': 16, 'train.log_every': 2, 'train.checkpoint_every': 4,
      'train.sample_every': 0, 'train.eval_every': 0, 'train.eval_batches': 1,
      'train.num_sample_images': 0, 'evaluator.at_end': False, 'evaluator.real_baseline': False,
      'train.peak_tflops': 1.0, 'data.data_dir': data_dir}
  return ([sys.executable, '-m', 'heptapod_jax.main',
           f'--config={ROOT}/configs/demo.py:steps={steps},tokenizer=pixel',
           f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()])


def _user_env():
  """The environment of a user's shell: none of the test suite's quieting variables."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'PYTHONWARNINGS')}
  # TensorFlow prints its oneDNN notice only where oneDNN is on by default (Intel CPUs with
  # AVX-512 VNNI or AMX, not the AMD EPYC machines some runs get): switched on here, the notice
  # that the console must keep off the terminal and in the log is there on every CPU.
  env.update(PYTHONPATH=ROOT, PYTHONUNBUFFERED='1', TF_ENABLE_ONEDNN_OPTS='1')
  return env


def test_a_run_without_a_terminal_prints_plain_lines_and_logs_everything(tmp_path, digits_dir):
  workdir = tmp_path / 'run'
  out = subprocess.run(_run_argv(workdir, digits_dir), env=_user_env(), cwd=ROOT, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
  text = out.stdout
  assert out.returncode == 0, text[-3000:]
  assert '== Training Heptapod (2 x 32 backbone, global head, pixel tokens)' in text
  assert 'train 2/4 (50%)  loss ' in text and 'train 4/4 (100%)  loss ' in text, text
  assert 'eval at step 4: NLL ' in text and 'Done: 4 steps' in text
  assert f'full log: {workdir}/log.txt' in text
  assert f'summary page (metrics, loss curve, pictures): {workdir}/summary.html' in text
  assert '<svg' in (workdir / 'summary.html').read_text()  # The loss curve (report.py).
  # No absl records, no metric dictionaries, none of the dependencies' notices.
  assert 'train/grad_norm=' not in text and not re.search(r'^I\d{4} ', text, re.M), text
  found = [n for n in NOTICES if n in text]
  assert not found, f'{found} reached the terminal:\n{text}'
  assert len(text.strip().splitlines()) <= 20, text
  log = (workdir / 'log.txt').read_text()
  assert 'train/grad_norm=' in log and 'train_step memory per device' in log
  assert 'eval at step 4: NLL ' in log and 'oneDNN custom operations' in log

  # The sampling command line on that run: its two result lines, no records, no notices.
  out = subprocess.run([sys.executable, '-m', 'heptapod_jax.sample', f'--checkpoint={workdir}',
                        '--classes=1,2', '--n=2', f'--out={tmp_path / "grid.png"}'],
                       env=_user_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith('2 samples of classes [1, 2] from step 4') and len(lines) == 2, lines
  assert not [n for n in NOTICES if n in out.stdout], out.stdout


def test_a_terminal_gets_a_live_progress_bar(tmp_path, digits_dir):
  """Under a pseudo-terminal the same run redraws one progress line in place (tqdm)."""
  leader, follower = pty.openpty()
  proc = subprocess.Popen(_run_argv(tmp_path / 'run', digits_dir), env=_user_env(), cwd=ROOT,
                          stdin=follower, stdout=follower, stderr=follower)
  os.close(follower)
  chunks, deadline = [], time.time() + 600
  while time.time() < deadline:
    ready, _, _ = select.select([leader], [], [], 1.0)
    if ready:
      try:
        data = os.read(leader, 65536)
      except OSError:  # The child closed the terminal.
        break
      if not data:
        break
      chunks.append(data)
    elif proc.poll() is not None:
      break
  proc.wait(timeout=60)
  os.close(leader)
  text = b''.join(chunks).decode('utf-8', errors='replace')
  assert proc.returncode == 0, text[-3000:]
  assert '\r' in text and 'train: 100%' in text and '4/4' in text, text
  assert 'train 2/4 (50%)' not in text  # The plain lines are for pipes and files.
  assert not [n for n in NOTICES if n in text], text


def test_plain_progress_lines_every_n_updates_and_at_the_end(capsys, monkeypatch):
  monkeypatch.setitem(console._STATE, 'quiet', True)  # As after setup(): the terminal prints.
  monkeypatch.setitem(console._STATE, 'chief', True)
  with console.progress(10, desc='train', initial=2, every=3) as bar:
    for n in range(3, 9):
      bar.update(n, **({'loss': 1.25} if n == 6 else {}))
  lines = capsys.readouterr().out.splitlines()
  assert [l.split('  ')[0] for l in lines] == ['train 3/10 (30%)', 'train 6/10 (60%)',
                                               'train 8/10 (80%)']
  assert 'loss 1.25' in lines[1] and 'loss 1.25' in lines[2] and 'loss' not in lines[0]
  assert 'step/s' in lines[0] and 'ETA' in lines[0]
  # Counts that jump (batches of images): a line when a multiple of `every` is crossed; with
  # `min_seconds`, none sooner than that after the previous one (the last line always).
  with console.progress(100, desc='tokenize', every=10, unit='image') as bar:
    for n in (25, 28, 31, 100):
      bar.update(n)
  with console.progress(100, desc='slow', every=10, min_seconds=1e9) as bar:
    for n in (25, 60, 100):
      bar.update(n)
  lines = [l.split('  ')[0] for l in capsys.readouterr().out.splitlines()]
  assert lines == ['tokenize 25/100 (25%)', 'tokenize 31/100 (31%)', 'tokenize 100/100 (100%)',
                   'slow 100/100 (100%)']
  # `delay`: a job that ends sooner prints nothing at all (the digits' reference statistics).
  with console.progress(100, desc='short', every=10, delay=1e9) as bar:
    for n in (50, 100):
      bar.update(n)
  assert capsys.readouterr().out == ''
  monkeypatch.setitem(console._STATE, 'chief', False)  # Other processes print nothing.
  with console.progress(4, desc='train', every=1) as bar:
    bar.update(4)
  assert capsys.readouterr().out == ''


def test_the_tpu_probe_is_skipped_only_where_libtpu_is_installed_without_a_tpu(monkeypatch):
  real_find_spec = importlib.util.find_spec

  def env_after(libtpu: bool, tpu: bool, preset: dict | None = None):
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: (object() if libtpu else None) if name == 'libtpu'
                        else real_find_spec(name, *a))
    monkeypatch.setattr(console, '_tpu_present', lambda: tpu)
    monkeypatch.setattr(console, '_platforms_without_tpu', lambda: 'cpu')
    environ = dict(preset or {})
    console.quiet_dependencies(environ)
    return environ

  assert env_after(libtpu=True, tpu=False)['JAX_PLATFORMS'] == 'cpu'
  assert 'JAX_PLATFORMS' not in env_after(libtpu=True, tpu=True)  # A TPU VM: JAX finds it.
  assert 'JAX_PLATFORMS' not in env_after(libtpu=False, tpu=False)
  assert env_after(libtpu=True, tpu=False, preset={'JAX_PLATFORMS': 'tpu'})['JAX_PLATFORMS'] == 'tpu'
  assert env_after(libtpu=False, tpu=False)['TF_CPP_MIN_LOG_LEVEL'] == '1'


def test_a_quiet_import_drops_the_known_notices_and_keeps_the_rest(tmp_path, capfd, monkeypatch):
  (tmp_path / 'noisy_pkg.py').write_text(
      'import os\n'
      'os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see...\\n")\n'
      'os.write(2, b"E0000 something real went wrong\\n")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  module = console.import_quietly('noisy_pkg', ('oneDNN custom operations are on',))
  assert module.__name__ == 'noisy_pkg'
  err = capfd.readouterr().err
  assert 'something real went wrong' in err and 'oneDNN' not in err
