"""What a person sees in a terminal: stage headings, one live progress line per stage, short
result lines and the final summary. Everything else (absl INFO records, the metric writer's
dictionaries of scalars, the dependencies' notices) goes to `<workdir>/log.txt`, always in
full; an explicit `--verbosity` / `-v` (absl's flags, e.g. `--verbosity=1`) brings every record
back to the terminal as before.

  console.quiet_dependencies()        # first thing of an entry point: before TF or JAX load
  console.setup(workdir)              # after the flags: log.txt, the terminal's threshold
  console.stage('Training Heptapod (tiny, global head) in workdirs/demo')
  with console.progress(total=1200, initial=step, desc='train', every=100) as bar:
    bar.update(step, loss=1.23)       # every step; fields shown as they change
  console.say('eval at step 100: NLL 1.5100 nats/token, accuracy 0.412')

On a terminal the progress line is a tqdm bar redrawn in place. Otherwise (CI, `nohup`, a
pod's log) the same information comes as one plain line every `every` updates. Only process 0
prints. Without `setup` (a notebook, a test, a library caller) nothing here prints: `say` is
`logging.info` and progress lines are logged, so callers keep control of their output.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import logging as pylogging
import logging.handlers  # noqa: F401  (pylogging.handlers.MemoryHandler)
import os
import platform
import sys
import time
from typing import Any

from absl import logging

from heptapod_jax.storage import paths

_STATE: dict[str, Any] = {'quiet': False, 'chief': True, 'bar': None, 'log_path': None,
                          'held': None, 'mirror': None}
# A log on a bucket (which cannot append) is written locally and uploaded whole this often, at
# exit and on failure (`sync_log`).
LOG_UPLOAD_INTERVAL_S = 30.0
# Google's PCI vendor id: a TPU chip of this machine shows up under /sys/bus/pci/devices.
_GOOGLE_PCI_VENDOR = '0x1ae0'


def host_cpu_fingerprint() -> str:
  """A short hash of this host's CPU model and instruction-set flags.

  XLA compiles CPU executables for the host's own instruction set, and JAX's cache key holds
  the program, the flags and the jax version but not the CPU: an entry written on one machine
  (an Intel with AVX-512/AMX) and read on another (an AMD EPYC) can crash the reading process
  when it is deserialized. Machines whose /tmp outlives a change of processor therefore keep
  one cache per CPU (tests/conftest.py; benchmarks/objective_study.py's cache folder).
  """
  lines = []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key = line.split(':', 1)[0].strip()
        if key in ('vendor_id', 'model name', 'flags', 'Features', 'CPU part'):
          lines.append(line.strip())
          if key in ('flags', 'Features'):
            break  # the first core's description is the host's
  except OSError:
    lines.append(platform.processor() or platform.machine())
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()[:12]


def _tpu_present() -> bool:
  if glob.glob('/dev/accel*'):
    return True
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _platforms_without_tpu() -> str | None:
  """JAX_PLATFORMS for a machine with libtpu installed but no TPU: what is usable besides it
  ('cuda,cpu' where a JAX CUDA plugin and an NVIDIA device exist, else 'cpu'); None when
  unsure (a ROCm plugin), so that JAX's own probing stays in charge."""
  names = {(d.metadata['Name'] or '').lower() for d in importlib.metadata.distributions()}
  if any('rocm' in n and n.startswith('jax') for n in names):
    return None
  cuda = any(n.startswith('jax-cuda') and n.endswith('plugin') for n in names)
  return 'cuda,cpu' if cuda and os.path.exists('/dev/nvidiactl') else 'cpu'


def quiet_dependencies(environ=None) -> None:
  """Silences the dependencies' known start-up notices at their source; call it before
  TensorFlow or JAX is imported. Settings already in the environment win.

  - TensorFlow's C++ INFO records (the CPU-feature notice among them): TF_CPP_MIN_LOG_LEVEL=1
    (warnings and errors stay). The oneDNN notice ignores it: see `import_tensorflow`.
  - libtpu installed (the dev requirements bring it for ahead-of-time TPU compiles) on a machine
    without a TPU: JAX would load it to probe for one, and libtpu prints initialisation errors
    and a source trace. JAX_PLATFORMS then names the platforms that exist (see
    `_platforms_without_tpu`), so the probe never runs.
  """
  environ = os.environ if environ is None else environ
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  if ('JAX_PLATFORMS' not in environ and importlib.util.find_spec('libtpu') is not None
      and not _tpu_present()):
    platforms = _platforms_without_tpu()
    if platforms:
      environ['JAX_PLATFORMS'] = platforms
      if 'jax' in sys.modules:
        # Imported already: JAX read the variable at import, but its backends start at first
        # use, so the setting still applies through the config.
        import jax  # pylint: disable=g-import-not-at-top
        if not jax.config.jax_platforms:
          jax.config.update('jax_platforms', platforms)


# What TensorFlow prints on stderr while it loads, before any log setting applies (absl's C++
# logging writes everything to stderr until it is initialised; TF_CPP_MIN_LOG_LEVEL no longer
# reaches these in TF 2.21): the oneDNN notice, twice, and the CPU-feature notice.
_TF_IMPORT_NOTICES = ('All log messages before absl::InitializeLog() is called',
                      'oneDNN custom operations are on', 'cpu_feature_guard.cc',
                      'To enable the following instructions:')


def import_quietly(name: str, notices: tuple[str, ...]):
  """`importlib.import_module(name)` with the lines of stderr that contain one of `notices`
  kept off the terminal: stderr (the file descriptor, which C++ libraries write to) goes to a
  temporary file during the import, then every other line is written back to stderr, and all
  of it to the log. Imported already: returned as it is."""
  if name in sys.modules:
    return sys.modules[name]
  import tempfile  # pylint: disable=g-import-not-at-top
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      module = importlib.import_module(name)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode('utf-8', errors='replace')
  lines = text.splitlines()
  if lines:
    logging.info('%s printed while loading:\n%s', name, text.rstrip())
  kept = [l for l in lines if not any(n in l for n in notices)]
  if kept:
    sys.stderr.write('\n'.join(kept) + '\n')
    sys.stderr.flush()
  return module


def import_tensorflow():
  """`import tensorflow` without its load-time notices (`_TF_IMPORT_NOTICES`) on the terminal."""
  return import_quietly('tensorflow', _TF_IMPORT_NOTICES)


def _orbax_read_only_notice(record: pylogging.LogRecord) -> bool:
  """False for Orbax's warnings on every read-only open of a checkpoint (loading a tokenizer or
  a run for sampling opens several): expected, and nothing for the user to do."""
  msg = str(record.msg)
  return not ('read_only=True' in msg or 'is read only' in msg)


def _not_unretrieved_task(record: pylogging.LogRecord) -> bool:
  """False for asyncio's 'Task exception was never retrieved' records: when a checkpoint save
  fails (a full disk), Orbax leaves one per array, each with the tensorstore spec; the failure
  itself is reported once, with its step, by the trainer. They stay in log.txt."""
  return not (record.name == 'asyncio' and str(record.msg).startswith('Task exception was never'))


def quiet_read_only_warnings() -> None:
  """Drops Orbax's warning on every read-only open of a checkpoint from absl's output (for
  notebooks and other callers that load runs without `setup`)."""
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    if _orbax_read_only_notice not in target.filters:
      target.addFilter(_orbax_read_only_notice)


def _verbosity_asked() -> bool:
  from absl import flags  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  return any(name in fl and fl[name].present for name in ('verbosity', 'v'))


class _LogFile(pylogging.FileHandler):
  """log.txt. A record that cannot be written (a full disk) is dropped with one line on stderr
  for the whole failing stretch, instead of logging's traceback for every record."""

  def __init__(self, path: str):
    super().__init__(path)
    self._failing = self._error = False

  def handleError(self, record: pylogging.LogRecord) -> None:
    self._error = True
    if not self._failing:
      self._failing = True
      sys.stderr.write(f'{self.baseFilename} cannot be written ({sys.exc_info()[1]}); its '
                       'records are dropped until it can be written again.\n')

  def emit(self, record: pylogging.LogRecord) -> None:
    self._error = False
    super().emit(record)
    if self._failing and not self._error:
      self._failing = False
      sys.stderr.write(f'{self.baseFilename} is written again.\n')


def setup(workdir: str | None, *, process_index: int = 0, quiet: bool | None = None,
          hold: bool = False) -> str | None:
  """Routes the run's records: all of them (INFO and up, every library's) to
  `<workdir>/log.txt` (`log.process<i>.txt` on process i > 0), appended across restarts; the
  terminal shows warnings and errors, plus what `say`, `stage` and `progress` print. With
  `quiet=False` (or an explicit --verbosity/-v) the terminal keeps every record as absl prints
  it. An entry point may call it first with `workdir=None, hold=True` (the terminal is set,
  records are held), then with the workdir once the process index is known: the held records
  go to the file first. A workdir on a bucket (gs://...) gets the same log, written locally and
  uploaded (`_LogMirror`: object stores cannot append). Returns the log file's path (None
  without a workdir: the held records are dropped)."""
  quiet = (not _verbosity_asked()) if quiet is None else quiet
  _STATE.update(quiet=quiet, chief=process_index == 0)
  absl_handler = logging.get_absl_handler()
  quiet_read_only_warnings()
  if quiet:
    absl_handler.setLevel(pylogging.WARNING)
    if _not_unretrieved_task not in absl_handler.filters:
      absl_handler.addFilter(_not_unretrieved_task)
  root = pylogging.getLogger()
  if hold or workdir:  # A file will take every INFO record.
    if root.level == pylogging.NOTSET or root.level > pylogging.INFO:
      root.setLevel(pylogging.INFO)
    if logging.get_verbosity() < logging.INFO:  # absl: WARNING is -1, INFO 0.
      logging.set_verbosity(logging.INFO)
  elif quiet:  # No file: records below warnings go nowhere (outside absl's app.run, whatever
    logging.set_verbosity(logging.WARNING)  # handler a library installed would print them).
  held = _STATE['held']
  if workdir:
    paths.check(workdir, '--workdir')
  if not workdir and hold:
    if held is None and _STATE['log_path'] is None:
      # Until the file exists: records are kept (no target yet), then written to it first.
      _STATE['held'] = pylogging.handlers.MemoryHandler(capacity=1 << 30,
                                                        flushLevel=pylogging.CRITICAL + 1)
      root.addHandler(_STATE['held'])
    return None
  if not workdir:
    if held is not None:  # No file will take them.
      root.removeHandler(held)
      held.buffer.clear()
      held.close()
      _STATE['held'] = None
    return None
  name = 'log.txt' if process_index == 0 else f'log.process{process_index}.txt'
  path = paths.join(workdir, name)
  if _STATE['log_path'] != path:
    for old in [h for h in root.handlers if getattr(h, '_heptapod_log', False)]:
      root.removeHandler(old)
      old.close()
    if _STATE['mirror'] is not None:
      _STATE['mirror'].stop()
      _STATE['mirror'] = None
    if paths.is_remote(path):
      mirror = _LogMirror(path, LOG_UPLOAD_INTERVAL_S)
      _STATE['mirror'] = mirror
      handler = _LogFile(mirror.local)
    else:
      paths.makedirs(workdir)
      handler = _LogFile(path)
    handler._heptapod_log = True  # pylint: disable=protected-access
    handler.setLevel(pylogging.INFO)
    handler.setFormatter(logging.PythonFormatter())
    handler.addFilter(_orbax_read_only_notice)
    if held is not None:
      root.removeHandler(held)
      held.setTarget(handler)
      held.close()  # Flushes the held records into the file.
      _STATE['held'] = None
    root.addHandler(handler)
    _STATE['log_path'] = path
  return path


def log_path() -> str | None:
  """The log file `setup` opened, if any (for a workdir on a bucket, the object it is uploaded
  to)."""
  return _STATE['log_path']


def sync_log() -> None:
  """Uploads a bucket workdir's log now (a no-op for a local one): called on failure, before a
  process may be killed, and at exit."""
  for handler in pylogging.getLogger().handlers:
    if getattr(handler, '_heptapod_log', False):
      handler.flush()
  if _STATE['mirror'] is not None:
    _STATE['mirror'].upload()


class _LogMirror:
  """The log of a workdir on a bucket. Object stores cannot append, so the records go to a local
  file (`local`, under the system's temporary folder, one per log object) and the whole file is
  uploaded as one object: every `interval_s` seconds when it grew, at `sync_log`, and at exit.
  A rerun first downloads the object, so the log goes on across restarts as a local one does.
  What a process killed outright (SIGKILL, a lost VM) last wrote reaches the bucket within
  `interval_s`; the local file keeps it on that VM. A failed upload is said once on stderr and
  retried at the next interval: the run never stops for its log."""

  def __init__(self, remote: str, interval_s: float):
    import atexit  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    import threading  # pylint: disable=g-import-not-at-top
    self.remote = remote
    folder = os.path.join(tempfile.gettempdir(), f'heptapod-logs-{os.getuid()}',
                          hashlib.sha256(remote.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    self.local = os.path.join(folder, paths.basename(remote))
    try:  # The bucket's copy is the log so far; a stale local file of an earlier run gives way.
      if paths.exists(remote):
        paths.copy(remote, self.local, overwrite=True)
    except OSError as e:
      sys.stderr.write(f'{remote} could not be read ({e}); this run\'s log starts anew in '
                       f'{self.local} and replaces it at the next upload.\n')
    self._uploaded: tuple[int, float] | None = None
    self._lock = threading.Lock()
    self._failing = False
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True,
                                    name='heptapod-log-upload')
    self._thread.start()
    atexit.register(self.upload)

  def _loop(self, interval_s: float) -> None:
    while not self._stop.wait(interval_s):
      self.upload()

  def upload(self) -> None:
    with self._lock:
      try:
        stat = os.stat(self.local)
      except OSError:
        return
      if self._uploaded == (stat.st_size, stat.st_mtime):
        return
      try:
        paths.copy(self.local, self.remote, overwrite=True)
      except OSError as e:
        if not self._failing:
          sys.stderr.write(f'The log could not be uploaded to {self.remote} ({e}); it is kept in '
                           f'{self.local} and uploaded again in {LOG_UPLOAD_INTERVAL_S:.0f} s.\n')
        self._failing = True
        return
      if self._failing:
        sys.stderr.write(f'The log is uploaded to {self.remote} again.\n')
      self._failing = False
      self._uploaded = (stat.st_size, stat.st_mtime)

  def stop(self) -> None:
    self._stop.set()
    self.upload()


def summary(text: str) -> None:
  """The final summary of a command: printed by process 0 whatever the verbosity, and logged."""
  logging.info('%s', text)
  if _STATE['chief']:
    _write(text)


def _printing() -> bool:
  return _STATE['quiet'] and _STATE['chief']


def _write(line: str) -> None:
  bar = _STATE['bar']
  if bar is not None and getattr(bar, 'bar', None) is not None:
    bar.bar.write(line, file=sys.stdout)
  else:
    print(line, file=sys.stdout, flush=True)


def say(message: str) -> None:
  """One short line for the person at the terminal (and the log file)."""
  logging.info('%s', message)
  if _printing():
    _write(message)


def error(text: str, *, terminal: bool = True) -> None:
  """An error a person must read, from any process: the plain text on stderr (each process has
  its own terminal or log stream; not with terminal=False) and an ERROR record in the log file.
  Without `setup`'s quiet terminal, an absl error record as usual."""
  if not _STATE['quiet']:
    logging.error('%s', text)
    return
  record = pylogging.LogRecord('absl', pylogging.ERROR, __file__, 0, '%s', (text,), None)
  for handler in pylogging.getLogger().handlers:
    if getattr(handler, '_heptapod_log', False):
      handler.handle(record)
      handler.flush()
  if terminal:
    sys.stderr.write('\n' + text + '\n')
    sys.stderr.flush()


def stage(title: str) -> None:
  """A stage heading: a blank line, then `== title ==`."""
  logging.info('== %s ==', title)
  if _printing():
    _write(f'\n== {title} ==')


def _clock(seconds: float) -> str:
  if not seconds == seconds or seconds == float('inf'):  # NaN or unknown.
    return '?'
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def _format_fields(fields: dict[str, Any]) -> str:
  parts = []
  for k, v in fields.items():
    parts.append(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}')
  return '  '.join(parts)


class Progress:
  """Progress of one stage: `update(n, **fields)` sets the absolute count (and shown fields).

  A tqdm bar on a terminal (process 0, after `setup`); else one plain line each time the count
  crosses a multiple of `every` (at least `min_seconds` after the previous line) and one at
  the end, printed after `setup` and always logged; nothing at all (bar or line) during the
  first `delay` seconds, so a job that ends sooner stays silent:
    `train 300/1200 (25%)  loss 2.311  2.21 step/s  ETA 6m47s`
  """

  def __init__(self, total: int, *, desc: str, initial: int = 0, every: int | None = None,
               unit: str = 'step', stream=None, min_seconds: float = 0.0, delay: float = 0.0):
    self.total, self.desc, self.unit = int(total), desc, unit
    self.min_seconds, self.delay = float(min_seconds), float(delay)
    self.last_plain = time.time()
    self.initial = self.n = int(initial)
    self.every = max(1, int(every) if every else max(1, self.total // 10))
    self.fields: dict[str, Any] = {}
    self.t0 = time.time()
    self.bar = None
    self.closed = False
    self.printed = self.initial  # The count of the last plain line.
    stream = stream or sys.stdout
    if _printing() and hasattr(stream, 'isatty') and stream.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      try:  # A terminal that reports no size (a bare pseudo-terminal): tqdm would draw nothing.
        size = os.get_terminal_size(stream.fileno())
        sized = size.columns > 0 and size.lines > 0
      except (OSError, ValueError, AttributeError):
        sized = False
      self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, file=stream,
                      dynamic_ncols=sized, ncols=None if sized else 100,
                      nrows=None if sized else 24, mininterval=0.5, smoothing=0.1, leave=True,
                      delay=self.delay)
    self.prev = _STATE['bar']
    _STATE['bar'] = self

  def line(self) -> str:
    elapsed = max(time.time() - self.t0, 1e-9)
    rate = (self.n - self.initial) / elapsed
    eta = (self.total - self.n) / rate if rate > 0 else float('nan')
    pct = 100.0 * self.n / max(self.total, 1)
    head = f'{self.desc} {self.n}/{self.total} ({pct:.0f}%)'
    fields = _format_fields(self.fields)
    return '  '.join(p for p in (head, fields, f'{rate:.2f} {self.unit}/s',
                                 f'ETA {_clock(eta)}' if self.n < self.total else
                                 f'in {_clock(elapsed)}') if p)

  def update(self, n: int, **fields: Any) -> None:
    n = int(n)
    if fields:
      self.fields.update(fields)
    if self.bar is not None:
      if fields:
        self.bar.set_postfix_str(_format_fields(self.fields), refresh=False)
      self.bar.update(n - self.n)
      self.n = n
      return
    self.n = n
    if n >= self.total or (n // self.every > self.printed // self.every  # Crossed a multiple,
                           and time.time() - self.last_plain >= self.min_seconds):  # not too soon.
      self._plain()

  def _plain(self) -> None:
    self.printed = self.n
    self.last_plain = time.time()
    if self.last_plain - self.t0 < self.delay:  # A short job: no line at all.
      return
    line = self.line()
    logging.info('%s', line)
    if _printing():
      _write(line)

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    _STATE['bar'] = self.prev
    if self.bar is not None:
      self.bar.close()
    elif self.n != self.printed:
      self._plain()  # The last count, when the loop ended between two plain lines.

  def __enter__(self) -> 'Progress':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(total: int, *, desc: str, initial: int = 0, every: int | None = None,
             unit: str = 'step', stream=None, min_seconds: float = 0.0,
             delay: float = 0.0) -> Progress:
  return Progress(total, desc=desc, initial=initial, every=every, unit=unit, stream=stream,
                  min_seconds=min_seconds, delay=delay)
