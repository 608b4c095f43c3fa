"""Files this project wrote, read back checked: a damaged or foreign one is refused, named.

Pre-tokenized shards (`data/codes_format.py`) and sample chunks (`sampling/generation.py`) are npz
files: zip archives of .npy members, each with the CRC-32 of its bytes recorded by the writer.
Python's zipfile checks that CRC only when a member is read to its very end, and np.load stops
where the member's .npy header says the array ends: a flipped bit in that header (a shape of 40
read as 00) gives a shorter array with no CRC check at all, and a member that is never asked for is
never checked. `read_npz` reads every member it returns to its end, `check_npz` every member of the
file, so the CRC always runs; both raise `DamagedFileError` naming the file and what is wrong
(truncated, a checksum mismatch in member X, ...). The CRC costs one pass over the bytes that are
read anyway; nothing is held twice in memory.

Writes that fail (a full disk) raise `write_error(path, error)`: an OSError naming the file, the
free space and what to do; the files written before it are complete (each is written whole
through `storage.paths.atomic_write`: a local temporary file renamed, or one upload of an
object), so the rerun resumes.

`save_npz` writes an npz that way, locally or to a bucket.
`move_aside` renames a damaged file to `<name>.bad-<UTC time>` rather than letting a rewrite
overwrite it (kept for inspection, never deleted); `first_difference` and `lookup` name the
field where two settings (a manifest, a header) differ.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import time
import zipfile
import zlib
from typing import Any, BinaryIO, Callable, Iterator, Union

import numpy as np

from heptapod_jax.storage import paths

# Bytes per read when a member is read through (its CRC is updated as it goes).
_CHUNK = 1 << 20
# The smallest zip file: its end-of-directory record alone.
_MIN_ZIP_SIZE = 22
NpzSource = Union[str, BinaryIO]


class DamagedFileError(ValueError):
  """A file read back is not what its writer wrote (truncated, a checksum mismatch, contents
  of the wrong shape or kind); the message names the file and what is wrong."""


def _open_zip(source: NpzSource, where: str) -> zipfile.ZipFile:
  """The zip archive of an npz file; DamagedFileError naming it when its directory is lost."""
  if isinstance(source, str):
    size = paths.getsize(source)
  else:
    source.seek(0, os.SEEK_END)  # tf.io.gfile.GFile.seek returns None: tell() says where.
    size = source.tell()
    source.seek(0)
  problem = f'{where} is truncated or not an npz file ({size} bytes): no complete zip directory'
  if size < _MIN_ZIP_SIZE:  # Seeking to where the directory would start fails on some files.
    raise DamagedFileError(problem)
  try:
    return zipfile.ZipFile(source)
  except (zipfile.BadZipFile, EOFError) as e:
    # The zip directory is at the end of the file: a cut anywhere loses it.
    raise DamagedFileError(f'{problem} at its end ({e})') from e


def _member_error(e: Exception, member: str, where: str) -> DamagedFileError:
  """The DamagedFileError for an error zipfile raised while reading `member`."""
  if isinstance(e, zipfile.BadZipFile) and 'CRC' in str(e):
    return DamagedFileError(f'{where}: checksum mismatch in member {member} (its zip CRC-32): '
                            'the bytes changed after they were written')
  if isinstance(e, EOFError):
    return DamagedFileError(f'{where}: member {member} is truncated ({e})')
  return DamagedFileError(f'{where}: member {member} is damaged ({type(e).__name__}: {e})')


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


def _drain(fp: BinaryIO, member: str, where: str) -> int:
  """Reads `fp` (an open member) to its end, so that zipfile checks the CRC; the bytes read."""
  count = 0
  try:
    while True:
      data = fp.read(_CHUNK)
      if not data:
        return count
      count += len(data)
  except _READ_ERRORS as e:
    raise _member_error(e, member, where) from e


def _read_member(fp: BinaryIO, size: int, member: str, where: str) -> np.ndarray:
  """The .npy array of an open member of `size` bytes, read to its end (CRC checked)."""
  fmt = np.lib.format
  try:
    major, _ = fmt.read_magic(fp)
    read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
    shape, fortran_order, dtype = read_header(fp)
  except ValueError as e:
    _drain(fp, member, where)  # A flipped bit in the header: the CRC says so first.
    raise DamagedFileError(f'{where}: member {member} has no valid .npy header ({e})') from e
  except _READ_ERRORS as e:
    raise _member_error(e, member, where) from e
  if dtype.hasobject:
    raise DamagedFileError(f'{where}: member {member} holds Python objects ({dtype}); only plain '
                           'arrays are read')
  data_size = math.prod(shape) * dtype.itemsize
  header_size = fp.tell()
  if header_size + data_size != size:
    _drain(fp, member, where)
    raise DamagedFileError(f'{where}: member {member} has {size - header_size} bytes of data but '
                           f'its .npy header says {dtype}{list(shape)} ({data_size} bytes)')
  array = np.empty(shape[::-1] if fortran_order else shape, dtype)
  buffer = array.reshape(-1).view(np.uint8)
  done = 0
  try:
    while done < data_size:
      got = fp.readinto(buffer[done:done + _CHUNK])
      if not got:
        break
      done += got
  except _READ_ERRORS as e:
    raise _member_error(e, member, where) from e
  if done < data_size:
    raise DamagedFileError(f'{where}: member {member} ends after {done} of its {data_size} bytes '
                           'of array data')
  _drain(fp, member, where)  # Nothing is left; the read that reaches the end checks the CRC.
  return array.T if fortran_order else array


def read_npz(source: NpzSource, keys: tuple[str, ...], where: str) -> dict[str, np.ndarray]:
  """The arrays `keys` of an npz file, each member read to its end so that its CRC is checked.

  Args:
    source: a path, or a seekable binary file (tf.io.gfile.GFile for remote files).
    keys: array names (np.savez's keywords).
    where: the file's name for messages.

  Returns:
    {key: array}, as np.load would give them (object arrays are refused).

  Raises:
    DamagedFileError naming `where` and the problem: truncated (no zip directory), a missing
    member, a checksum mismatch, a member that is not one whole .npy array.
  """
  if isinstance(source, str) and paths.is_remote(source):
    with paths.open(source, 'rb') as f:
      return read_npz(f, keys, where)
  with _open_zip(source, where) as archive:
    sizes = {info.filename: info.file_size for info in archive.infolist()}
    out = {}
    for key in keys:
      member = f'{key}.npy'
      if member not in sizes:
        raise DamagedFileError(f'{where} has no member {member} (it holds {sorted(sizes)})')
      try:
        fp = archive.open(member)
      except _READ_ERRORS as e:
        raise _member_error(e, member, where) from e
      with fp:
        out[key] = _read_member(fp, sizes[member], member, where)
  return out


def check_npz(source: NpzSource, where: str) -> list[str]:
  """Reads every member of an npz file to its end (each CRC checked), keeping nothing.

  Returns:
    The member names.

  Raises:
    DamagedFileError as `read_npz`.
  """
  if isinstance(source, str) and paths.is_remote(source):
    with paths.open(source, 'rb') as f:
      return check_npz(f, where)
  with _open_zip(source, where) as archive:
    names = archive.namelist()
    for member in names:
      try:
        fp = archive.open(member)
      except _READ_ERRORS as e:
        raise _member_error(e, member, where) from e
      with fp:
        _drain(fp, member, where)
  return names


def move_aside(path: str, *, exists: Callable[[str], bool] = paths.exists,
               rename: Callable[[str, str], None] = paths.rename) -> str:
  """Renames a damaged file to `<path>.bad-<UTC time>` (`-1`, `-2`, ... when taken); the new path.

  Works on a local path and on a URL (where the rename is a copy and a delete: the damaged object
  is kept under the new name before the old one goes). The file is kept for inspection: a
  rewrite of `path` no longer overwrites it.
  """
  stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  dest, n = f'{path}.bad-{stamp}', 1
  while exists(dest):
    dest, n = f'{path}.bad-{stamp}-{n}', n + 1
  rename(path, dest)
  return dest


def first_difference(got: Any, want: Any, path: str) -> str | None:
  """Dotted path of the first field where `got` differs from `want`, or None."""
  if isinstance(got, dict) and isinstance(want, dict):
    for key in list(want) + [k for k in got if k not in want]:
      if key not in got or key not in want:
        return f'{path}.{key}' if path else key
      found = first_difference(got[key], want[key], f'{path}.{key}' if path else key)
      if found:
        return found
    return None
  return None if got == want else path


def lookup(tree: Any, dotted: str) -> Any:
  """The value at a dotted path of nested dicts, or '<missing>'."""
  for key in dotted.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return '<missing>'
    tree = tree[key]
  return tree


def describe_free_space(path: Any) -> str:
  """' [0.4 MB free of 32.0 MB]' on the filesystem holding `path` (or its nearest existing
  parent), to follow a path in a message; '' for a remote path (gs://...) or when it cannot
  be read."""
  usage = paths.free_space(path)
  if usage is None:
    return ''
  return f' [{usage[0] / 1e6:.1f} MB free of {usage[1] / 1e6:.1f} MB]'


def write_error(path: str, error: BaseException) -> OSError:
  """The OSError for a failed write of `path`: the file, the free space, what to do."""
  free = describe_free_space(paths.dirname(os.fspath(path)) or '.')
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  code = getattr(error, 'errno', None) or (  # TensorFlow's file errors carry no errno.
      errno.ENOSPC if 'No space left on device' in str(error) else errno.EIO)
  return OSError(code,
                 f'{path} could not be written{free} '
                 f'({type(error).__name__}: {text}); the files written before it are complete: '
                 'make room and run the same command again, it resumes')


@contextlib.contextmanager
def writing(path: str) -> Iterator[BinaryIO]:
  """`paths.atomic_write(path)` whose failure raises `write_error` (the free space, what to do)."""
  try:
    with paths.atomic_write(path, 'wb') as f:
      yield f
  except OSError as e:
    raise write_error(path, e) from e


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """np.savez to `path` (local or a URL), whole or not at all (`paths.atomic_write`); a failed
  write (a full disk) raises `write_error`."""
  with writing(path) as f:
    np.savez(f, **arrays)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: a parameter tree saved flat in an npz."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
