"""Reference data sets for the generative metrics: their statistics, pool features and files.

`Reference` holds what the metrics compare samples against (FID / sFID
statistics, pool features for precision/recall) and saves / loads it as .npz;
`load_adm_reference` reads ADM's reference batches (such as
`VIRTUAL_imagenet256_labeled.npz`), streaming their images with
`iter_npz_array`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from heptapod_jax.storage import artifacts
from heptapod_jax.storage import paths
from heptapod_jax.evaluators.features import (FeatureExtractor, ProgressFn, extract_features,
                                              extract_features_resumable)
from heptapod_jax.evaluators.fid import statistics


@dataclasses.dataclass
class Reference:
  """What the metrics need of a reference data set.

  Attributes:
    mu, sigma: float64[D], [D, D] statistics of its 'pool' features (FID).
    mu_s, sigma_s: float64[D_s], [D_s, D_s] statistics of its 'spatial' features (sFID), or None.
    pool_features: float32[N, D] 'pool' features of its images (precision/recall), or None.
  """
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool_features: np.ndarray | None = None

  def __post_init__(self):
    self.mu = np.asarray(self.mu, np.float64)
    self.sigma = np.asarray(self.sigma, np.float64)
    _check_stats(self.mu, self.sigma, 'Reference', 'mu', 'sigma')
    if (self.mu_s is None) != (self.sigma_s is None):
      raise ValueError('Reference: mu_s and sigma_s must be given together.')
    if self.mu_s is not None:
      self.mu_s = np.asarray(self.mu_s, np.float64)
      self.sigma_s = np.asarray(self.sigma_s, np.float64)
      _check_stats(self.mu_s, self.sigma_s, 'Reference', 'mu_s', 'sigma_s')
    if self.pool_features is not None:
      self.pool_features = np.asarray(self.pool_features, np.float32)
      if self.pool_features.ndim != 2 or self.pool_features.shape[1] != self.mu.shape[0]:
        raise ValueError(f'Reference: pool_features of shape {self.pool_features.shape} do not '
                         f'match mu of shape {self.mu.shape}; expected [N, {self.mu.shape[0]}].')

  @classmethod
  def from_features(cls, features: Mapping[str, np.ndarray],
                    keep_pool_features: bool = True) -> Reference:
    """Statistics (and pool features, for precision/recall) from `extract_features` output."""
    if 'pool' not in features:
      raise ValueError(f"Reference.from_features: no 'pool' features; got keys {sorted(features)}.")
    mu, sigma = statistics(features['pool'])
    mu_s = sigma_s = None
    if features.get('spatial') is not None:
      mu_s, sigma_s = statistics(features['spatial'])
    pool = np.asarray(features['pool'], np.float32) if keep_pool_features else None
    return cls(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool_features=pool)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes exactly `path`, atomically: an .npz of mu, sigma[, mu_s, sigma_s][, pool_features]."""
    arrays = {'mu': self.mu, 'sigma': self.sigma}
    if self.mu_s is not None:
      arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
    if self.pool_features is not None:
      arrays['pool_features'] = self.pool_features
    artifacts.save_npz(os.fspath(path), **arrays)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Reference:
    """Reads a `save`d file. ADM reference batches load too (their statistics, no pool features)."""
    with _open_npz(path) as data:
      _require_keys(data, path, ('mu', 'sigma'))
      spatial = {}
      if 'mu_s' in data.files or 'sigma_s' in data.files:
        _require_keys(data, path, ('mu_s', 'sigma_s'))
        spatial = dict(mu_s=data['mu_s'], sigma_s=data['sigma_s'])
      pool = data['pool_features'] if 'pool_features' in data.files else None
      return cls(mu=data['mu'], sigma=data['sigma'], pool_features=pool, **spatial)

  @property
  def has_spatial(self) -> bool:
    return self.mu_s is not None


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str, mu_name: str,
                 sigma_name: str) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{where}: {mu_name} of shape {mu.shape} and {sigma_name} of shape '
                     f'{sigma.shape} are not a [D] mean and a [D, D] covariance.')


def _open_npz(path: str | os.PathLike[str]) -> Any:
  """np.load of a local or remote .npz (members read on demand; closing it closes the file)."""
  try:
    fp = paths.open(os.fspath(path), 'rb')
  except FileNotFoundError:
    raise FileNotFoundError(f'No such reference file: {os.fspath(path)}') from None
  try:
    data = np.load(fp, allow_pickle=False)
  except (ValueError, OSError, zipfile.BadZipFile) as e:
    fp.close()
    raise ValueError(f'{os.fspath(path)}: not a readable .npz file ({e}).') from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    fp.close()
    raise ValueError(f'{os.fspath(path)}: expected an .npz archive, found a single .npy array.')
  data.fid = fp  # NpzFile.close closes its fid: the file goes with the archive.
  return data


@contextlib.contextmanager
def _zip(path: str) -> Iterator[zipfile.ZipFile]:
  """The zip archive of a local or remote .npz."""
  with paths.open(path, 'rb') as f, zipfile.ZipFile(f) as zf:
    yield zf


def _require_keys(data: Any, path: str | os.PathLike[str], keys: Sequence[str]) -> None:
  for key in keys:
    if key not in data.files:
      raise ValueError(f"{os.fspath(path)}: missing key '{key}' (the file has "
                       f'{sorted(data.files)}).')


def iter_npz_array(path: str | os.PathLike[str], key: str,
                   batch_size: int) -> Iterator[np.ndarray]:
  """Reads the array `key` of an .npz file in row batches without loading all of it.

  ADM's reference batches hold 10000 256x256 images (about 2 GB) in 'arr_0';
  this streams them from the (possibly compressed) zip member, as ADM's
  `StreamingNpzArrayReader` does. Arrays in Fortran order or with object dtype
  are loaded whole.
  """
  path = os.fspath(path)
  with _zip(path) as zf:
    member = f'{key}.npy'
    if member not in zf.namelist():
      raise ValueError(f"{path}: missing key '{key}'.")
    with zf.open(member) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        shape, fortran, dtype = (), True, np.dtype(object)  # Fall back to np.load.
      if fortran or dtype.hasobject or len(shape) == 0:
        streaming = False
      else:
        streaming = True
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
          rows = min(batch_size, shape[0] - start)
          buf = f.read(rows * row_bytes)
          if len(buf) != rows * row_bytes:
            raise ValueError(f"{path}: '{key}' is truncated (expected {shape[0]} rows).")
          yield np.frombuffer(buf, dtype=dtype).reshape(rows, *shape[1:])
  if not streaming:
    with _open_npz(path) as data:
      arr = data[key]
    for start in range(0, arr.shape[0], batch_size):
      yield arr[start:start + batch_size]


def npz_keys(path: str | os.PathLike[str]) -> list[str]:
  """The array names of an .npz (from its zip directory: nothing is read)."""
  with _zip(os.fspath(path)) as zf:
    return [os.path.splitext(name)[0] for name in zf.namelist()]


def npz_rows(path: str | os.PathLike[str], key: str) -> int | None:
  """Rows of array `key` in an .npz, from its header alone (None when it cannot be read so)."""
  with _zip(os.fspath(path)) as zf:
    if f'{key}.npy' not in zf.namelist():
      return None
    with zf.open(f'{key}.npy') as f:
      version = np.lib.format.read_magic(f)
      if version not in ((1, 0), (2, 0)):
        return None
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
      shape = read(f)[0]
  return int(shape[0]) if shape else None


def load_adm_reference(path: str | os.PathLike[str], extractor: FeatureExtractor | None = None, *,
                       batch_size: int = 256, progress: ProgressFn | None = None,
                       cache_path: str | os.PathLike[str] | None = None,
                       resume_dir: str | None = None, part_size: int | None = None,
                       write_parts: bool = True) -> Reference:
  """Loads an ADM reference batch such as `VIRTUAL_imagenet256_labeled.npz`.

  Those files hold 'mu', 'sigma', 'mu_s', 'sigma_s' (ADM's TF Inception
  statistics of pool_3 and spatial features) and 'arr_0' (the uint8 reference
  images, [N, H, W, 3]). As ADM's `read_statistics` does, the stored
  statistics are used as they are; precision/recall needs the images' pool
  features, which are computed with `extractor` when given. Without stored
  statistics ('mu' absent, as in ADM's sample batches) they are computed from
  the extractor's features of 'arr_0' too.

  Args:
    path: the .npz file.
    extractor: a `FeatureExtractor` for 'arr_0', or None for statistics only.
    batch_size: images per extractor call.
    progress: passed to `extract_features`.
    cache_path: if given, a `Reference.save` file: returned directly when it
      exists (and has pool features, if an extractor was given), else written
      after computing.
    resume_dir: if given, the features are computed in parts saved there as they are made
      (`extract_features_resumable`, `part_size` images each, by default a twentieth), so
      that a killed run resumes; the caller removes it.
    write_parts: save those parts (False on all but one process of a multi-host job).
  Returns:
    The Reference (pool_features None without extractor).
  """
  if cache_path is not None and paths.exists(cache_path):
    cached = Reference.load(cache_path)
    if extractor is None or cached.pool_features is not None:
      return cached
  with _open_npz(path) as data:
    files = set(data.files)
    has_stats = 'mu' in files or 'sigma' in files
    if has_stats:
      _require_keys(data, path, ('mu', 'sigma'))
    elif extractor is None:
      _require_keys(data, path, ('mu',))  # Raises, naming the missing key.
    if extractor is not None:
      _require_keys(data, path, ('arr_0',))
    stats = {key: data[key] for key in ('mu', 'sigma', 'mu_s', 'sigma_s') if key in files}
  if ('mu_s' in stats) != ('sigma_s' in stats):
    missing = 'sigma_s' if 'mu_s' in stats else 'mu_s'
    raise ValueError(f"{os.fspath(path)}: missing key '{missing}' (the file has {sorted(files)}).")
  features: dict[str, np.ndarray] = {}
  if extractor is not None:
    batches = iter_npz_array(path, 'arr_0', batch_size)
    if resume_dir is None:
      features = extract_features(extractor, batches, batch_size, progress=progress)
    else:
      features = extract_features_resumable(extractor, batches, batch_size, resume_dir,
                                            every=part_size, total=npz_rows(path, 'arr_0'),
                                            write=write_parts, progress=progress)
  if has_stats:
    mu, sigma = stats['mu'], stats['sigma']
  else:
    mu, sigma = statistics(features['pool'])
  mu_s, sigma_s = stats.get('mu_s'), stats.get('sigma_s')
  if mu_s is None and features.get('spatial') is not None:
    mu_s, sigma_s = statistics(features['spatial'])
  reference = Reference(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                        pool_features=features.get('pool'))
  if cache_path is not None:
    reference.save(cache_path)
  return reference


__all__ = ['Reference', 'iter_npz_array', 'load_adm_reference']
