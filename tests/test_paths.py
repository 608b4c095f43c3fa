"""The path layer (heptapod_jax/storage/paths.py): its local behaviour, and the rule that no
other module of the package calls a local-only file API (which would write a `gs://...` path
into a local folder named `gs:`). The same functions against a real GCS server:
tests/test_bucket_jobs.py.
"""
import ast
import os
import pathlib

import pytest

from heptapod_jax.storage import paths

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'heptapod_jax'
LAYER = 'heptapod_jax/storage/paths.py'

# Calls that only know local files: on a user's path they must go through the path layer.
LOCAL_ONLY = {
    'open', 'io.open', 'os.makedirs', 'os.mkdir', 'os.listdir', 'os.scandir', 'os.walk',
    'os.replace', 'os.rename', 'os.remove', 'os.unlink', 'os.rmdir', 'os.stat', 'os.access',
    'os.path.exists', 'os.path.isdir', 'os.path.isfile', 'os.path.getsize', 'os.path.abspath',
    'os.path.realpath', 'os.path.getmtime', 'shutil.rmtree', 'shutil.copyfile', 'shutil.copy',
    'shutil.copy2', 'shutil.move', 'shutil.disk_usage', 'glob.glob', 'np.load', 'np.save',
    'np.savez', 'np.savez_compressed', 'Image.open', 'tempfile.mkstemp', 'tempfile.mkdtemp',
    'tempfile.TemporaryFile', 'tempfile.gettempdir', 'zipfile.ZipFile',
}
# (module, call) -> (how many, why it is not a user's path). A new use fails the test: route it
# through heptapod_jax.storage.paths, or add it here with the reason.
ALLOWED = {
    ('heptapod_jax/console.py', 'open'): (2, '/proc/cpuinfo and /sys PCI ids: this host'),
    ('heptapod_jax/console.py', 'glob.glob'): (2, '/dev/accel*, /sys/bus/pci: this host'),
    ('heptapod_jax/console.py', 'os.path.exists'): (1, '/dev/nvidiactl: this host'),
    ('heptapod_jax/console.py', 'tempfile.TemporaryFile'): (1, 'stderr of an import, captured'),
    ('heptapod_jax/console.py', 'tempfile.gettempdir'): (1, 'the local copy of a bucket log'),
    ('heptapod_jax/console.py', 'os.makedirs'): (1, 'the local copy of a bucket log'),
    ('heptapod_jax/console.py', 'os.stat'): (1, 'the local copy of a bucket log'),
    ('heptapod_jax/tools/recipes.py', 'os.path.abspath'): (1, 'the package\'s own configs/'),
    ('heptapod_jax/models/tokenizers/lpips.py', 'np.load'): (1, 'bytes read through the layer'),
    ('heptapod_jax/evaluators/inception.py', 'np.load'): (1, 'a file from paths.open'),
    ('heptapod_jax/evaluators/inception.py', 'np.savez'): (1, 'a file from paths.atomic_write'),
    ('heptapod_jax/evaluators/reference.py', 'np.load'): (1, 'a file from paths.open'),
    ('heptapod_jax/evaluators/reference.py', 'zipfile.ZipFile'): (1, 'a file from paths.open'),
    ('heptapod_jax/evaluators/features.py', 'zipfile.ZipFile'): (1, 'a file from paths.open'),
    ('heptapod_jax/storage/artifacts.py', 'zipfile.ZipFile'): (1, 'a local path or a paths.open file'),
    ('heptapod_jax/storage/artifacts.py', 'np.savez'): (1, 'a file from paths.atomic_write'),
    ('heptapod_jax/data/codes_format.py', 'np.savez'): (1, 'a file from artifacts.writing'),
    ('heptapod_jax/tools/readme_figures.py', 'Image.open'): (1, 'bytes read through the layer'),
}


def dotted(node: ast.AST) -> str | None:
  """'os.path.exists' for the expression os.path.exists; None for anything else."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = dotted(node.value)
    return f'{base}.{node.attr}' if base else None
  return None


def local_file_calls(root: pathlib.Path) -> dict[tuple[str, str], list[int]]:
  """(module file, call) -> line numbers, for every LOCAL_ONLY call in the package outside the
  layer. `numpy` and `PIL.Image` are matched under the names the package imports them as."""
  found: dict[tuple[str, str], list[int]] = {}
  for path in sorted(root.rglob('*.py')):
    rel = path.relative_to(root.parent).as_posix()
    if rel == LAYER:
      continue
    for node in ast.walk(ast.parse(path.read_text(), rel)):
      if isinstance(node, ast.Call):
        name = dotted(node.func)
        if name in LOCAL_ONLY:
          found.setdefault((rel, name), []).append(node.lineno)
  return found


def test_no_module_calls_local_file_apis_outside_the_path_layer():
  found = local_file_calls(PACKAGE)
  problems = []
  for (module, call), lines in sorted(found.items()):
    allowed, _ = ALLOWED.get((module, call), (0, ''))
    if len(lines) > allowed:
      problems.append(f'{module}:{",".join(map(str, lines))} calls {call} ({len(lines)}, allowed '
                      f'{allowed})')
  assert not problems, ('local-only file calls outside heptapod_jax/storage/paths.py (a gs:// '
                        'path would end up in a local folder named gs:); use storage.paths: '
                        + '; '.join(problems))
  stale = [key for key, (n, _) in ALLOWED.items() if n and len(found.get(key, [])) < n]
  assert not stale, f'allowances no longer used (lower them): {stale}'


def test_the_checker_finds_local_calls(tmp_path):
  pkg = tmp_path / 'heptapod_jax'
  (pkg / 'storage').mkdir(parents=True)
  (pkg / 'storage' / 'paths.py').write_text('import os\nos.makedirs("x")\n')
  (pkg / 'a.py').write_text('import os\nimport numpy as np\n\ndef f(p):\n  os.makedirs(p)\n'
                            '  with open(p) as f:\n    pass\n  return np.load(p), os.path.join(p)\n')
  assert local_file_calls(pkg) == {('heptapod_jax/a.py', 'os.makedirs'): [5],
                                   ('heptapod_jax/a.py', 'open'): [6],
                                   ('heptapod_jax/a.py', 'np.load'): [8]}


# ------------------------------------------------------------------------- the layer, locally

def test_schemes_and_names():
  assert paths.is_remote('gs://b/x') and not paths.is_remote('/tmp/x')
  assert not paths.is_remote('relative/gs:/b')  # What the old code created: a local folder.
  assert paths.join('gs://b/run', 'checkpoints', '10') == 'gs://b/run/checkpoints/10'
  assert paths.dirname('gs://b/run/config.json') == 'gs://b/run'
  assert paths.dirname('gs://b') == 'gs://b'
  assert paths.basename('gs://b/run/') == 'run'
  assert paths.resolve('gs://b/run/') == 'gs://b/run'
  assert paths.resolve('x/y') == os.path.abspath('x/y')
  with pytest.raises(paths.UnsupportedPathError, match=r'config.data.tokenized_dir=.s3://b/c.*s3://'):
    paths.check('s3://b/c', 'config.data.tokenized_dir')
  with pytest.raises(paths.UnsupportedPathError, match='http://'):
    paths.exists('http://example.com/x')


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / 'sub' / 'f.json'
  paths.write_json(str(target), {'a': 1})
  assert paths.read_json(str(target)) == {'a': 1}
  with pytest.raises(RuntimeError):
    with paths.atomic_write(str(target), 'w') as f:
      f.write('{"a": 2')
      raise RuntimeError('killed halfway')
  assert paths.read_json(str(target)) == {'a': 1}  # The old file, whole.
  assert sorted(os.listdir(target.parent)) == ['f.json']


def test_local_queries_and_changes(tmp_path):
  d = str(tmp_path / 'd')
  paths.makedirs(paths.join(d, 'sub'))
  paths.write_bytes(paths.join(d, 'a.npz'), b'1234')
  paths.write_text(paths.join(d, 'b.txt'), 'x')
  assert paths.listdir(d) == ['a.npz', 'b.txt', 'sub']
  assert paths.glob(paths.join(d, '*.npz')) == [paths.join(d, 'a.npz')]
  assert paths.getsize(paths.join(d, 'a.npz')) == 4
  assert paths.isfile(paths.join(d, 'b.txt')) and paths.isdir(paths.join(d, 'sub'))
  paths.rename(paths.join(d, 'b.txt'), paths.join(d, 'c.txt'))
  with pytest.raises(FileExistsError):
    paths.rename(paths.join(d, 'a.npz'), paths.join(d, 'c.txt'))
  paths.copy(paths.join(d, 'a.npz'), paths.join(d, 'sub', 'a.npz'))
  assert paths.read_bytes(paths.join(d, 'sub', 'a.npz')) == b'1234'
  paths.remove(paths.join(d, 'missing'), missing_ok=True)
  with pytest.raises(FileNotFoundError):
    paths.remove(paths.join(d, 'missing'))
  with pytest.raises(FileNotFoundError):
    paths.listdir(paths.join(d, 'missing'))
  with pytest.raises(ValueError, match='atomic_write'):
    paths.open(paths.join(d, 'x'), 'w')
  paths.rmtree(d)
  assert not paths.exists(d)
  assert paths.free_space(str(tmp_path)) is not None and paths.free_space('gs://b/x') is None
