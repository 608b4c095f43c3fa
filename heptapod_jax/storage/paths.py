"""The path layer: every file the project reads or writes under a path a user gave goes through
here, and works the same for a local path and for an object store (`gs://bucket/...`).

On a pod the workdir, the data, the tokenizer, the codes and the samples live in a bucket: a
file written with the local file API under a `gs://...` string lands in a folder named `gs:` on
one VM's boot disk and is gone with the VM. So no module outside this one calls `open`,
`os.makedirs`, `os.path.exists`, `shutil`, `np.load(path)` ... on such a path
(tests/test_paths.py enforces it).

Backends:
  * a local path: Python's own file API (atomic renames, fsync-free as before);
  * `gs://`: TensorFlow's GCS client (`tf.io.gfile`). It is the client TensorFlow's data
    pipeline, TFDS and `tf.summary` use anyway, and Orbax's metadata files too (etils.epath
    picks it when TensorFlow is installed), so a pod job talks to its bucket through one client
    with one set of credentials (a TPU VM's service account; nothing to configure). TensorFlow
    is imported on the first remote call only: local use stays light.
Other schemes (`s3://`, `http://`) are refused with the path named: TensorFlow's core has no S3
client any more, and Orbax's tensorstore would need its own.

Object stores are not file systems, and the functions say so where it matters:
  * no atomic rename: `rename` of an object is a copy and a delete, of a directory object by
    object. A piece of work is finished when an object written LAST says so (Orbax's commit
    marker, the codes' metadata.json, a sample chunk's own upload), never because a directory
    was renamed into place;
  * an upload is atomic per object: `atomic_write` writes locally (a temporary file next to the
    target for a local path, one in the system's temporary folder for a remote one) and moves or
    uploads it only when the writer finished without an error, so a killed or failed writer
    never leaves a half-written file under the final name;
  * no append: a growing file (the run's log) is kept locally and uploaded whole
    (`console.py`);
  * directories are prefixes: `makedirs` of a remote path writes nothing (an object under it
    makes it exist), `isdir` is true once one object lies under it.

Errors: TensorFlow's errors become OSError (FileNotFoundError for a missing object) naming the
path, so callers handle a local and a remote failure alike.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob as _glob
import io
import json
import os
import posixpath
import shutil
import tempfile
from typing import IO, Any, Iterator

# The schemes this layer serves, and the client that serves them.
REMOTE_SCHEMES = ('gs',)


class UnsupportedPathError(ValueError):
  """A URL whose scheme this project cannot read or write (s3://, http://, ...)."""


def scheme(path: Any) -> str | None:
  """'gs' for 'gs://bucket/x', None for a local path."""
  path = os.fspath(path)
  head, sep, _ = path.partition('://')
  return head.lower() if sep and head and '/' not in head else None


def is_remote(path: Any) -> bool:
  """True for a URL (gs://...), False for a local path."""
  return scheme(path) is not None


def check(path: Any, what: str = 'path') -> str:
  """`path` as a str, or UnsupportedPathError naming `what` (a config field, a flag) when it is a
  URL of a scheme no client here serves."""
  path = os.fspath(path)
  s = scheme(path)
  if s is not None and s not in REMOTE_SCHEMES:
    raise UnsupportedPathError(
        f'{what}={path!r}: {s}:// paths are not supported; use a local path or one of '
        f'{", ".join(p + "://" for p in REMOTE_SCHEMES)} (TensorFlow has no {s}:// client).')
  return path


def resolve(path: Any, what: str = 'path') -> str:
  """A local path made absolute (~ expanded), a URL unchanged but for trailing slashes: the
  form stored in configs and printed to users."""
  path = check(path, what)
  if is_remote(path):
    head, _, rest = path.partition('://')
    return f'{head}://{rest.rstrip("/")}' if rest.strip('/') else path
  return os.path.abspath(os.path.expanduser(path))


def join(path: Any, *parts: str) -> str:
  """os.path.join for a local path, '/'-joined for a URL."""
  path = os.fspath(path)
  return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def dirname(path: Any) -> str:
  """The parent of `path` (a URL keeps its scheme and bucket: dirname('gs://b') is 'gs://b')."""
  path = os.fspath(path).rstrip('/') or os.fspath(path)
  if is_remote(path):
    head, _, rest = path.partition('://')
    if '/' not in rest:
      return path
    return f'{head}://{rest.rpartition("/")[0]}'
  return os.path.dirname(path)


def basename(path: Any) -> str:
  return os.path.basename(os.fspath(path).rstrip('/'))


def display(path: Any) -> str:
  """How a path is shown to a person: absolute when local, as given when a URL."""
  return resolve(path) if not is_remote(path) else os.fspath(path)


# ------------------------------------------------------------------------------- the remote client

def _gfile():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # An accelerator image without TensorFlow.
    raise OSError(errno.EPROTONOSUPPORT,
                  f'gs:// paths are read and written with TensorFlow\'s GCS client, which is not '
                  f'installed here ({e}); install tensorflow-cpu (requirements.txt)') from e
  return tf.io.gfile


@contextlib.contextmanager
def _remote_errors(path: str, doing: str) -> Iterator[None]:
  """TensorFlow's errors as OSError naming the path and what was being done."""
  try:
    yield
  except OSError:
    raise
  except Exception as e:  # tf.errors.OpError and its subclasses.
    kind = type(e).__name__
    if kind == 'NotFoundError':
      raise FileNotFoundError(errno.ENOENT, f'{doing} {path}: not found') from e
    message = getattr(e, 'message', None) or str(e)
    if kind in ('OpError', 'UnavailableError', 'DeadlineExceededError', 'AbortedError',
                'InternalError', 'UnknownError', 'PermissionDeniedError', 'FailedPreconditionError',
                'ResourceExhaustedError', 'AlreadyExistsError', 'InvalidArgumentError',
                'UnauthenticatedError', 'OutOfRangeError', 'CancelledError', 'DataLossError',
                'UnimplementedError'):
      code = errno.EEXIST if kind == 'AlreadyExistsError' else (
          errno.EACCES if kind in ('PermissionDeniedError', 'UnauthenticatedError') else errno.EIO)
      raise OSError(code, f'{doing} {path} failed ({kind}: {message.strip().splitlines()[0]})') from e
    raise


# ------------------------------------------------------------------------------------- queries

def exists(path: Any) -> bool:
  path = check(path)
  if not is_remote(path):
    return os.path.exists(path)
  with _remote_errors(path, 'checking'):
    return bool(_gfile().exists(path))


def isdir(path: Any) -> bool:
  """A directory; for a URL, a prefix that at least one object lies under."""
  path = check(path)
  if not is_remote(path):
    return os.path.isdir(path)
  with _remote_errors(path, 'checking'):
    return bool(_gfile().isdir(path))


def isfile(path: Any) -> bool:
  """A file; for a URL, an object (not a prefix)."""
  path = check(path)
  if not is_remote(path):
    return os.path.isfile(path)
  with _remote_errors(path, 'checking'):
    gfile = _gfile()
    return bool(gfile.exists(path)) and not gfile.isdir(path)


def listdir(path: Any) -> list[str]:
  """The names in a directory (sorted, no trailing '/'); FileNotFoundError when it is missing."""
  path = check(path)
  if not is_remote(path):
    return sorted(os.listdir(path))
  with _remote_errors(path, 'listing'):
    gfile = _gfile()
    if not gfile.isdir(path):
      raise FileNotFoundError(errno.ENOENT, f'listing {path}: no such directory')
    return sorted({name.rstrip('/') for name in gfile.listdir(path)} - {''})


def glob(pattern: Any) -> list[str]:
  """The paths matching a pattern (sorted); wildcards in the last component only for a URL."""
  pattern = check(pattern)
  if not is_remote(pattern):
    return sorted(_glob.glob(pattern))
  parent, leaf = dirname(pattern), basename(pattern)
  if any(c in parent for c in '*?['):
    with _remote_errors(pattern, 'matching'):
      return sorted(_gfile().glob(pattern))
  if not isdir(parent):
    return []
  return [join(parent, n) for n in listdir(parent) if fnmatch.fnmatchcase(n, leaf)]


def getsize(path: Any) -> int:
  path = check(path)
  if not is_remote(path):
    return os.path.getsize(path)
  with _remote_errors(path, 'reading the size of'):
    return int(_gfile().stat(path).length)


def free_space(path: Any) -> tuple[int, int] | None:
  """(free, total) bytes of the file system holding `path` (or its nearest existing parent);
  None for a URL (a bucket has no such limit) or when it cannot be read."""
  path = check(path)
  if is_remote(path):
    return None
  while path and not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  try:
    usage = shutil.disk_usage(path or '.')
  except OSError:
    return None
  return usage.free, usage.total


def is_writable_dir(path: Any) -> bool:
  """Whether files can be created in directory `path` (its nearest existing parent, locally);
  a URL is taken as writable (a failed upload says why)."""
  path = check(path)
  if is_remote(path):
    return True
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return os.access(path, os.W_OK)


# ------------------------------------------------------------------------------------- changes

def makedirs(path: Any) -> None:
  """Creates a directory and its parents (a no-op for a URL: an object written under a prefix
  makes it exist, and empty "directory" objects are what other tools trip over)."""
  path = check(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: Any, *, missing_ok: bool = False) -> None:
  path = check(path)
  try:
    if not is_remote(path):
      os.remove(path)
      return
    with _remote_errors(path, 'removing'):
      _gfile().remove(path)
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(path: Any) -> None:
  """Removes a directory and everything under it (nothing when it is missing)."""
  path = check(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  with _remote_errors(path, 'removing'):
    gfile = _gfile()
    if gfile.isdir(path):
      gfile.rmtree(path)
    elif gfile.exists(path):
      gfile.remove(path)


def copy(src: Any, dst: Any, *, overwrite: bool = False) -> None:
  """Copies one file; either side may be local or a URL (an upload or a download)."""
  src, dst = check(src), check(dst)
  if not is_remote(src) and not is_remote(dst):
    if not overwrite and os.path.exists(dst):
      raise FileExistsError(errno.EEXIST, f'copying {src}: {dst} exists')
    makedirs(os.path.dirname(dst) or '.')
    shutil.copyfile(src, dst)
    return
  if not is_remote(dst):
    makedirs(os.path.dirname(dst) or '.')
  with _remote_errors(dst if is_remote(dst) else src, f'copying {src} to'):
    _gfile().copy(src, dst, overwrite=overwrite)


def rename(src: Any, dst: Any, *, overwrite: bool = False) -> None:
  """Moves a file or a directory. Local: one atomic rename. A URL: a copy and a delete, object by
  object, NOT atomic: never use it to mark a piece of work finished (see the module docstring)."""
  src, dst = check(src), check(dst)
  if is_remote(src) != is_remote(dst):
    raise ValueError(f'rename {src} -> {dst}: both must be local or both URLs')
  if not is_remote(src):
    if not overwrite and os.path.exists(dst):
      raise FileExistsError(errno.EEXIST, f'renaming {src}: {dst} exists')
    os.replace(src, dst) if overwrite else os.rename(src, dst)
    return
  with _remote_errors(src, f'renaming to {dst}:'):
    gfile = _gfile()
    if not gfile.isdir(src):
      gfile.rename(src, dst, overwrite=overwrite)
      return
    if not overwrite and gfile.exists(dst):
      raise FileExistsError(errno.EEXIST, f'renaming {src}: {dst} exists')
    # Object by object: every copy first, then the deletes, so that an interrupted move leaves
    # the whole source in place (and a partial destination), never a half of each.
    moves = []
    for directory, _, files in gfile.walk(src):
      rel = directory[len(src.rstrip('/')):].strip('/')
      for name in files:
        moves.append((posixpath.join(directory, name), posixpath.join(dst, rel, name)))
    for a, b in moves:
      gfile.copy(a, b, overwrite=True)
    for a, _ in moves:
      gfile.remove(a)


# ------------------------------------------------------------------------------- reading, writing

def open(path: Any, mode: str = 'r') -> IO:  # pylint: disable=redefined-builtin
  """A file opened for reading ('r' text, 'rb' bytes; seekable). Writing goes through
  `atomic_write`, which never leaves a half-written file."""
  path = check(path)
  if mode not in ('r', 'rb'):
    raise ValueError(f'paths.open({path!r}, {mode!r}): only reading; write with atomic_write')
  if not is_remote(path):
    return io.open(path, mode, encoding='utf-8' if mode == 'r' else None)
  with _remote_errors(path, 'opening'):
    gfile = _gfile()
    if not gfile.exists(path):
      raise FileNotFoundError(errno.ENOENT, f'opening {path}: not found')
    return gfile.GFile(path, mode)


def read_bytes(path: Any) -> bytes:
  with open(path, 'rb') as f, _remote_errors(os.fspath(path), 'reading'):
    return f.read()


def read_text(path: Any) -> str:
  with open(path, 'r') as f, _remote_errors(os.fspath(path), 'reading'):
    return f.read()


def read_json(path: Any) -> Any:
  return json.loads(read_text(path))


@contextlib.contextmanager
def atomic_write(path: Any, mode: str = 'wb') -> Iterator[IO]:
  """A file to write `path` through: it appears under its name, whole, only when the block ends
  without an error (a local temporary file renamed into place; for a URL, a local temporary file
  uploaded as one object). A failed or killed writer leaves no file under the final name; a
  failure raises OSError naming `path`.

  Locally the temporary name is `<path>.tmp`, next to the target (same file system, so the
  rename is atomic): a killed writer's stray file is replaced by the rerun's write of the same
  file. Every file of the project has one writer at a time."""
  path = check(path)
  if mode not in ('w', 'wb'):
    raise ValueError(f'atomic_write({path!r}, {mode!r}): mode must be "w" or "wb"')
  encoding = 'utf-8' if mode == 'w' else None
  if not is_remote(path):
    makedirs(os.path.dirname(path) or '.')
    tmp = f'{path}.tmp'
    try:
      with io.open(tmp, mode, encoding=encoding) as f:
        yield f
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise
    return
  fd, tmp = tempfile.mkstemp(prefix='heptapod-upload-', suffix='-' + basename(path))
  try:
    with io.open(fd, mode, encoding=encoding) as f:
      yield f
    with _remote_errors(path, 'uploading'):
      _gfile().copy(tmp, path, overwrite=True)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


def write_bytes(path: Any, data: bytes) -> None:
  with atomic_write(path, 'wb') as f:
    f.write(data)


def write_text(path: Any, text: str) -> None:
  with atomic_write(path, 'w') as f:
    f.write(text)


def write_json(path: Any, obj: Any, **kwargs: Any) -> None:
  """`obj` as JSON (json.dumps' keyword arguments), written atomically."""
  write_text(path, json.dumps(obj, **kwargs))


@contextlib.contextmanager
def local_file(path: Any) -> Iterator[str]:
  """A local file name holding `path`'s bytes, for readers that need one (a remote object is
  downloaded to a temporary file, removed afterwards)."""
  path = check(path)
  if not is_remote(path):
    yield path
    return
  fd, tmp = tempfile.mkstemp(prefix='heptapod-download-', suffix='-' + basename(path))
  os.close(fd)
  try:
    with _remote_errors(path, 'downloading'):
      _gfile().copy(path, tmp, overwrite=True)
    yield tmp
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)
