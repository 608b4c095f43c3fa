"""Tests of the ADM-style metrics: FID/sFID, IS, precision/recall, references, evaluate().

Every metric is checked against an independent brute-force implementation
(closed forms, explicit Python loops, full distance matrices) on small data.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import linalg

from heptapod_jax.evaluators import features
from heptapod_jax.evaluators import fid
from heptapod_jax.evaluators import inception_score
from heptapod_jax.evaluators import metrics
from heptapod_jax.evaluators import precision_recall
from heptapod_jax.evaluators import reference as reference_lib

# ----------------------------------------------------------------------------- helpers


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
  a = rng.normal(size=(d, d))
  return a @ a.T + 0.1 * np.eye(d)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_eig(mu1, s1, mu2, s2) -> float:
  """tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), the symmetric route (no scipy.sqrtm)."""
  h = _psd_sqrt(s1)
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(h @ s2 @ h), 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _fake_extractor(images: np.ndarray) -> dict[str, np.ndarray]:
  """Per-image features of 8x8 uint8 images: pool [B, 12], spatial [B, 2, 2, 1], logits [B, 4]."""
  x = images.astype(np.float32) / 255.0
  pool = np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, 0, 0], x[:, -1, -1]], axis=1)
  spatial = x[:, ::4, ::4, :1]
  logits = 10.0 * pool[:, :4] - 5.0 * pool[:, 4:8]
  return {'pool': pool, 'spatial': spatial, 'logits': logits}


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- FID


def test_frechet_distance_matches_closed_forms():
  rng = np.random.default_rng(0)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  scipy_form = (np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
  np.testing.assert_allclose(got, scipy_form, rtol=1e-10)
  np.testing.assert_allclose(got, _fid_eig(mu1, s1, mu2, s2), rtol=1e-9)
  # Diagonal (commuting) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), exact,
                             rtol=1e-12)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
  # Scalars are 1-D Gaussians (ADM's atleast_1d / atleast_2d).
  np.testing.assert_allclose(fid.frechet_distance(1.0, 4.0, 3.0, 9.0), 4.0 + 1.0, rtol=1e-12)


def test_statistics_and_sampled_fid_approach_the_truth():
  rng = np.random.default_rng(1)
  d, n = 3, 200_000
  mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  x1 = rng.multivariate_normal(mu1, s1, size=n).astype(np.float32)
  x2 = rng.multivariate_normal(mu2, s2, size=n).astype(np.float32)
  m1, c1 = fid.statistics(x1)
  m2, c2 = fid.statistics(x2)
  assert m1.dtype == c1.dtype == np.float64 and m1.shape == (d,) and c1.shape == (d, d)
  np.testing.assert_allclose(m1, mu1, atol=0.02)
  np.testing.assert_allclose(c1, s1, rtol=0.03, atol=0.03)
  true_fid = _fid_eig(mu1, s1, mu2, s2)
  np.testing.assert_allclose(fid.frechet_distance(m1, c1, m2, c2), true_fid, rtol=0.02, atol=0.02)


def test_statistics_equals_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 2.0, size=(50, 7)).astype(np.float32)
  mu, sigma = fid.statistics(x, chunk_size=7)
  np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), axis=0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
  mu, sigma = fid.statistics(x[:, :1])
  assert mu.shape == (1,) and sigma.shape == (1, 1)
  with pytest.raises(ValueError, match=r'N >= 2'):
    fid.statistics(x[:1])


def test_frechet_distance_rank_deficient_covariances():
  # Fewer samples than dimensions: singular covariances, sqrtm with round-off imaginary parts.
  rng = np.random.default_rng(3)
  x1, x2 = rng.normal(size=(5, 10)), rng.normal(size=(7, 10)) + 0.3
  m1, c1 = fid.statistics(x1)
  m2, c2 = fid.statistics(x2)
  got = fid.frechet_distance(m1, c1, m2, c2)
  assert np.isfinite(got) and isinstance(got, float)
  np.testing.assert_allclose(got, _fid_eig(m1, c1, m2, c2), rtol=1e-5, atol=1e-5)


def test_frechet_distance_singular_product_adds_eps():
  s1 = np.array([[0.0, 1.0], [0.0, 0.0]])  # sqrtm(s1 @ I) does not exist: scipy returns inf.
  s2 = np.eye(2)
  eps = 1e-6
  with pytest.warns(RuntimeWarning, match='adding 1e-06 to the diagonal'):
    got = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=eps)
  # sqrtm((1 + eps) [[eps, 1], [0, eps]]) has trace 2 sqrt(eps (1 + eps)).
  np.testing.assert_allclose(got, 2.0 - 4.0 * math.sqrt(eps * (1 + eps)), rtol=1e-9)


def test_frechet_distance_rejects_large_imaginary_part():
  with pytest.raises(ValueError, match='imaginary component'):
    fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


def test_frechet_distance_bad_inputs():
  with pytest.raises(ValueError, match=r'mu1 \(3,\) and mu2 \(4,\)'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r'sigma1 \(3, 3\) and sigma2 \(4, 4\)'):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match=r'\(4, 4\) do not match means of shape \(3,\)'):
    fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match='sigma2 contains NaN'):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))


# ----------------------------------------------------------------------------- Inception Score


def _bf_split_score(logits: list[list[float]]) -> float:
  probs = []
  for row in logits:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    probs.append([v / s for v in e])
  n, k = len(probs), len(probs[0])
  py = [sum(p[c] for p in probs) / n for c in range(k)]
  kl = 0.0
  for p in probs:
    kl += sum(p[c] * (math.log(p[c]) - math.log(py[c])) for c in range(k) if p[c] > 0)
  return math.exp(kl / n)


def test_inception_score_matches_brute_force_both_split_modes():
  rng = np.random.default_rng(4)
  logits = rng.normal(0.0, 3.0, size=(23, 6))
  rows = logits.tolist()
  # ADM: consecutive splits of split_size, the last one shorter (5, 5, 5, 5, 3).
  adm = np.mean([_bf_split_score(rows[i:i + 5]) for i in range(0, 23, 5)])
  np.testing.assert_allclose(inception_score.inception_score(logits, split_size=5), adm, rtol=1e-10)
  # Salimans / pytorch: num_splits splits [i N // n, (i + 1) N // n), mean and std (ddof 0).
  scores = [_bf_split_score(rows[i * 23 // 4:(i + 1) * 23 // 4]) for i in range(4)]
  mean, std = inception_score.inception_score(logits, num_splits=4)
  np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
  # One split holding everything.
  np.testing.assert_allclose(inception_score.inception_score(logits), _bf_split_score(rows),
                             rtol=1e-10)
  # Probabilities in, same score.
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(inception_score.inception_score(probs, 5, from_logits=False), adm,
                             rtol=1e-10)


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
  k = 5
  labels = np.arange(30) % k
  one_hot = np.eye(k)[labels]
  assert inception_score.inception_score(one_hot, split_size=10,
                                         from_logits=False) == pytest.approx(k, 1e-12)
  mean, std = inception_score.inception_score(one_hot, num_splits=3, from_logits=False)
  assert mean == pytest.approx(k, 1e-12) and std == pytest.approx(0.0, abs=1e-12)
  assert inception_score.inception_score(100.0 * one_hot, split_size=10) == pytest.approx(k, 1e-9)
  # All samples the same class: IS = 1.
  assert inception_score.inception_score(np.eye(k)[np.zeros(30, int)],
                                         from_logits=False) == pytest.approx(1.0)


def test_inception_score_bad_inputs():
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    inception_score.inception_score(np.zeros(5))
  with pytest.raises(ValueError, match='probabilities'):
    inception_score.inception_score(np.full((4, 3), 0.5), from_logits=False)
  with pytest.raises(ValueError, match='split_size'):
    inception_score.inception_score(np.zeros((4, 3)), split_size=0)
  with pytest.raises(ValueError, match=r'num_splits must be in \[1, 4\]'):
    inception_score.inception_score(np.zeros((4, 3)), num_splits=5)


# ----------------------------------------------------------------------------- precision / recall


def _bf_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = a.astype(np.float64), b.astype(np.float64)
  out = np.zeros((len(a), len(b)))
  for i in range(len(a)):
    for j in range(len(b)):
      out[i, j] = np.sum((a[i] - b[j]) ** 2)
  return out


def _bf_percentile(values: list[float], p: float) -> float:
  v = sorted(values)
  pos = p / 100.0 * (len(v) - 1)
  lo = int(math.floor(pos))
  hi = min(lo + 1, len(v) - 1)
  return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _bf_radii(x: np.ndarray, k: int, clamp: float | None) -> list[float]:
  dist = _bf_dist(x, x)
  radii = [sorted(dist[i])[k] for i in range(len(x))]  # Entry 0 is the point itself.
  if clamp is not None:
    threshold = _bf_percentile(radii, clamp)
    radii = [0.0 if r > threshold else r for r in radii]
  return radii


def _bf_precision_recall(ref, sam, k, clamp) -> tuple[float, float]:
  r_ref, r_sam = _bf_radii(ref, k, clamp), _bf_radii(sam, k, clamp)
  dist = _bf_dist(ref, sam)
  precision = np.mean([any(dist[i, j] <= r_ref[i] for i in range(len(ref)))
                       for j in range(len(sam))])
  recall = np.mean([any(dist[i, j] <= r_sam[j] for j in range(len(sam)))
                    for i in range(len(ref))])
  return float(precision), float(recall)


def _float_sets(seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  ref = rng.normal(size=(31, 8)).astype(np.float32)
  sam = (rng.normal(size=(23, 8)) * 1.3 + 0.4).astype(np.float32)
  return ref, sam


def _int_sets(seed: int = 6) -> tuple[np.ndarray, np.ndarray]:
  # Small integers: float32 distances are exact, so ties and duplicates behave as in float64.
  rng = np.random.default_rng(seed)
  ref = rng.integers(-2, 3, size=(31, 3)).astype(np.float32)
  sam = rng.integers(-1, 3, size=(23, 3)).astype(np.float32)
  return ref, sam


BATCHES = dict(row_batch_size=7, col_batch_size=5)


def test_pairwise_sq_distances():
  ref, sam = _float_sets()
  d = precision_recall.pairwise_sq_distances(ref, sam)
  assert d.dtype == np.float32 and d.shape == (31, 23)
  np.testing.assert_allclose(d, _bf_dist(ref, sam), rtol=1e-5, atol=1e-5)
  assert np.all(precision_recall.pairwise_sq_distances(ref, ref) >= 0)


@pytest.mark.parametrize('backend', ['numpy', 'jax'])
@pytest.mark.parametrize('clamp', [None, 5, 50])
def test_manifold_radii_match_brute_force(backend, clamp):
  ref, _ = _int_sets()
  radii = precision_recall.manifold_radii(ref, 3, clamp_to_percentile=clamp, backend=backend,
                                          **BATCHES)
  assert radii.dtype == np.float32 and radii.shape == (31,)
  np.testing.assert_array_equal(radii, _bf_radii(ref, 3, clamp))
  ref, _ = _float_sets()
  radii = precision_recall.manifold_radii(ref, 3, backend=backend, **BATCHES)
  np.testing.assert_allclose(radii, _bf_radii(ref, 3, None), rtol=1e-5)
  # Independent of the block shape.
  for rows, cols in ((1, 2), (31, 31), (100, 3)):
    np.testing.assert_allclose(
        precision_recall.manifold_radii(ref, 3, backend=backend, row_batch_size=rows,
                                        col_batch_size=cols),
        radii, rtol=1e-6)


@pytest.mark.parametrize('backend', ['numpy', 'jax'])
def test_precision_recall_match_brute_force(backend):
  ref, sam = _float_sets()
  got = precision_recall.precision_recall(ref, sam, backend=backend, **BATCHES)
  expected = _bf_precision_recall(ref, sam, 3, None)
  assert got == pytest.approx(expected, abs=1e-12)
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # A non-trivial case.
  for clamp in (None, 5, 50):
    ref, sam = _int_sets()
    got = precision_recall.precision_recall(ref, sam, clamp_to_percentile=clamp, backend=backend,
                                            **BATCHES)
    assert got == pytest.approx(_bf_precision_recall(ref, sam, 3, clamp), abs=1e-12), clamp
  # k is a parameter.
  ref, sam = _float_sets()
  got = precision_recall.precision_recall(ref, sam, k=1, backend=backend, **BATCHES)
  assert got == pytest.approx(_bf_precision_recall(ref, sam, 1, None), abs=1e-12)


@pytest.mark.parametrize('backend', ['numpy', 'jax'])
def test_precision_recall_of_identical_sets(backend):
  ref, _ = _float_sets()
  assert precision_recall.precision_recall(ref, ref, backend=backend, **BATCHES) == (1.0, 1.0)
  # With ADM's clamp option at 5, 95% of the balls have radius 0 and only contain exact
  # duplicates; every point is still in its own ball when its self-distance is exactly 0
  # (exact arithmetic here), so identical sets still give 1.
  ref, _ = _int_sets()
  assert precision_recall.precision_recall(ref, ref, clamp_to_percentile=5, backend=backend,
                                           **BATCHES) == (1.0, 1.0)
  # 31 distinct radii: the 5th percentile lies between the 2nd and 3rd smallest.
  ref, _ = _float_sets()
  assert np.sum(precision_recall.manifold_radii(ref, clamp_to_percentile=5) > 0) == 2


@pytest.mark.parametrize('backend', ['numpy', 'jax'])
def test_evaluate_manifold_matches_brute_force(backend):
  ref, sam = _float_sets()
  radii = precision_recall.manifold_radii(ref, 3)
  res = precision_recall.evaluate_manifold(ref, radii, sam, eps=1e-5, backend=backend, **BATCHES)
  dist = _bf_dist(sam, ref)
  np.testing.assert_array_equal(res.in_manifold, np.any(dist <= radii[None], axis=1))
  np.testing.assert_allclose(res.realism, np.max(radii[None] / (dist + 1e-5), axis=1), rtol=1e-4)
  np.testing.assert_array_equal(res.nearest, np.argmin(dist, axis=1))
  in_ref, _ = precision_recall.manifold_overlap(sam, precision_recall.manifold_radii(sam), ref,
                                                radii, **BATCHES)
  assert res.fraction == pytest.approx(precision_recall.precision_recall(ref, sam, **BATCHES)[0])
  assert in_ref.shape == (23,)


def test_precision_recall_bad_inputs():
  ref, sam = _float_sets()
  with pytest.raises(ValueError, match=r'different dimensions: \(31, 8\) and \(23, 7\)'):
    precision_recall.precision_recall(ref, sam[:, :7])
  with pytest.raises(ValueError, match='more than k points'):
    precision_recall.manifold_radii(ref[:3], 3)
  with pytest.raises(ValueError, match='backend'):
    precision_recall.manifold_radii(ref, backend='torch')
  with pytest.raises(ValueError, match=r'radii of shape \(4,\)'):
    precision_recall.manifold_overlap(ref, np.zeros(4), sam, np.zeros(23))


# ----------------------------------------------------------------------------- features


def test_extract_features_chunks_and_iterators():
  rng = np.random.default_rng(7)
  images = _images(rng, 20)
  full = _fake_extractor(images)
  calls: list[int] = []

  def extractor(batch):
    calls.append(batch.shape[0])
    return _fake_extractor(batch)

  seen = []
  feats = features.extract_features(extractor, images, 7, progress=lambda d, t: seen.append((d, t)))
  assert calls == [7, 7, 6] and seen == [(7, 20), (14, 20), (20, 20)]
  assert feats['spatial'].shape == (20, 4)
  for key in ('pool', 'logits'):
    np.testing.assert_array_equal(feats[key], full[key])
  np.testing.assert_array_equal(feats['spatial'], full['spatial'].reshape(20, -1))
  # An iterator of uneven batches is re-chunked; a short last chunk can be padded.
  calls.clear()
  feats = features.extract_features(extractor, iter([images[:3], images[3:12], images[12:]]), 7,
                                    pad_to_batch=True)
  assert calls == [7, 7, 7]
  np.testing.assert_array_equal(feats['pool'], full['pool'])


def test_extract_features_errors():
  images = _images(np.random.default_rng(8), 4)
  with pytest.raises(ValueError, match='uint8'):
    features.extract_features(_fake_extractor, images.astype(np.float32))
  with pytest.raises(ValueError, match="'pool'"):
    features.extract_features(lambda x: {'logits': np.zeros((len(x), 3))}, images)
  with pytest.raises(ValueError, match=r"'pool' has shape \(3, 2\) for a batch of 4"):
    features.extract_features(lambda x: {'pool': np.zeros((3, 2))}, images)


# ----------------------------------------------------------------------------- references


def test_reference_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(9)
  feats = _fake_extractor(_images(rng, 30))
  feats['spatial'] = feats['spatial'].reshape(30, -1)
  ref = reference_lib.Reference.from_features(feats)
  mu, sigma = fid.statistics(feats['pool'])
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma, sigma)
  assert ref.has_spatial and ref.pool_features.shape == (30, 12)
  path = str(tmp_path / 'ref.npz')
  ref.save(path)
  assert os.listdir(tmp_path) == ['ref.npz']
  back = reference_lib.Reference.load(path)
  for name in ('mu', 'sigma', 'mu_s', 'sigma_s', 'pool_features'):
    np.testing.assert_array_equal(getattr(back, name), getattr(ref, name))
  bare = reference_lib.Reference(mu=ref.mu, sigma=ref.sigma)
  bare.save(path)
  back = reference_lib.Reference.load(path)
  assert back.mu_s is None and back.sigma_s is None and back.pool_features is None
  with pytest.raises(ValueError, match='mu_s and sigma_s'):
    reference_lib.Reference(mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu_s)
  with pytest.raises(ValueError, match=r'pool_features of shape \(30, 11\)'):
    reference_lib.Reference(mu=ref.mu, sigma=ref.sigma, pool_features=np.zeros((30, 11)))


def _write_adm_file(path, images, keys=('mu', 'sigma', 'mu_s', 'sigma_s', 'arr_0'),
                    compressed=True):
  rng = np.random.default_rng(10)
  arrays = {'mu': rng.normal(size=12), 'sigma': _random_spd(rng, 12), 'mu_s': rng.normal(size=4),
            'sigma_s': _random_spd(rng, 4), 'arr_0': images}
  (np.savez_compressed if compressed else np.savez)(path, **{k: arrays[k] for k in keys})
  return arrays


@pytest.mark.parametrize('compressed', [True, False])
def test_iter_npz_array_streams_rows(tmp_path, compressed):
  images = _images(np.random.default_rng(11), 13)
  path = str(tmp_path / 'batch.npz')
  _write_adm_file(path, images, keys=('arr_0',), compressed=compressed)
  batches = list(reference_lib.iter_npz_array(path, 'arr_0', 5))
  assert [len(b) for b in batches] == [5, 5, 3]
  np.testing.assert_array_equal(np.concatenate(batches), images)
  # The row count from the header alone (the progress bar's total), as np.load reads it.
  assert reference_lib.npz_rows(path, 'arr_0') == 13 == np.load(path)['arr_0'].shape[0]
  assert reference_lib.npz_rows(path, 'mu') is None


def test_load_adm_reference(tmp_path):
  images = _images(np.random.default_rng(12), 20)
  path = str(tmp_path / 'VIRTUAL_test.npz')
  arrays = _write_adm_file(path, images)
  # Statistics only, taken from the file as they are (ADM's read_statistics).
  ref = reference_lib.load_adm_reference(path)
  for name in ('mu', 'sigma', 'mu_s', 'sigma_s'):
    np.testing.assert_array_equal(getattr(ref, name), arrays[name])
  assert ref.pool_features is None
  np.testing.assert_array_equal(reference_lib.Reference.load(path).sigma_s, arrays['sigma_s'])
  # With an extractor: the reference images' pool features for precision/recall.
  ref = reference_lib.load_adm_reference(path, _fake_extractor, batch_size=6)
  np.testing.assert_array_equal(ref.mu, arrays['mu'])
  np.testing.assert_allclose(ref.pool_features, _fake_extractor(images)['pool'])
  # Cached: the second call does not touch the extractor.
  cache = str(tmp_path / 'cache.npz')
  first = reference_lib.load_adm_reference(path, _fake_extractor, batch_size=6, cache_path=cache)

  def broken(images):
    raise AssertionError('the cache should have been used')

  second = reference_lib.load_adm_reference(path, broken, cache_path=cache)
  np.testing.assert_array_equal(second.pool_features, first.pool_features)
  np.testing.assert_array_equal(second.sigma_s, arrays['sigma_s'])
  # Images only (like ADM's sample batches): statistics from the extractor's features.
  only_images = str(tmp_path / 'samples.npz')
  _write_adm_file(only_images, images, keys=('arr_0',))
  ref = reference_lib.load_adm_reference(only_images, _fake_extractor, batch_size=6)
  feats = _fake_extractor(images)
  mu, sigma = fid.statistics(feats['pool'])
  np.testing.assert_allclose(ref.mu, mu, rtol=1e-12)
  np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-10)
  mu_s, _ = fid.statistics(feats['spatial'].reshape(20, -1))
  np.testing.assert_allclose(ref.mu_s, mu_s, rtol=1e-12)


def test_load_adm_reference_missing_keys(tmp_path):
  images = _images(np.random.default_rng(13), 4)
  path = str(tmp_path / 'broken.npz')
  _write_adm_file(path, images, keys=('mu', 'mu_s', 'sigma_s', 'arr_0'))
  with pytest.raises(ValueError, match=r"broken\.npz: missing key 'sigma'"):
    reference_lib.load_adm_reference(path)
  _write_adm_file(path, images, keys=('arr_0',))
  with pytest.raises(ValueError, match=r"broken\.npz: missing key 'mu'"):
    reference_lib.load_adm_reference(path)
  _write_adm_file(path, images, keys=('mu', 'sigma'))
  with pytest.raises(ValueError, match=r"broken\.npz: missing key 'arr_0'"):
    reference_lib.load_adm_reference(path, _fake_extractor)
  _write_adm_file(path, images, keys=('mu', 'sigma', 'mu_s'))
  with pytest.raises(ValueError, match=r"broken\.npz: missing key 'sigma_s'"):
    reference_lib.load_adm_reference(path)
  with pytest.raises(FileNotFoundError, match='nothere.npz'):
    reference_lib.load_adm_reference(str(tmp_path / 'nothere.npz'))


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_and_evaluate_images():
  rng = np.random.default_rng(14)
  ref_images, sample_images = _images(rng, 40), _images(rng, 30)
  ref_feats = features.extract_features(_fake_extractor, ref_images)
  reference = reference_lib.Reference.from_features(ref_feats)
  sample_feats = features.extract_features(_fake_extractor, sample_images)
  labels = np.argmax(sample_feats['logits'], axis=1)
  labels[:10] = (labels[:10] + 1) % 4  # 2/3 correct.
  res = metrics.evaluate(sample_feats, reference, labels, is_split_size=10, **BATCHES)
  assert set(res) == {'fid', 'sfid', 'inception_score', 'precision', 'recall', 'class_accuracy'}
  mu, sigma = fid.statistics(sample_feats['pool'])
  assert res['fid'] == pytest.approx(fid.frechet_distance(mu, sigma, reference.mu, reference.sigma))
  mu_s, sigma_s = fid.statistics(sample_feats['spatial'])
  assert res['sfid'] == pytest.approx(
      fid.frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s))
  assert res['inception_score'] == pytest.approx(
      inception_score.inception_score(sample_feats['logits'], 10))
  assert (res['precision'], res['recall']) == precision_recall.precision_recall(
      ref_feats['pool'], sample_feats['pool'])
  assert res['class_accuracy'] == pytest.approx(2 / 3)
  assert all(isinstance(v, float) for v in res.values())
  assert metrics.evaluate_images(_fake_extractor, sample_images, reference, labels, batch_size=7,
                                 is_split_size=10) == res
  # What the inputs do not allow is left out.
  bare = reference_lib.Reference(mu=reference.mu, sigma=reference.sigma)
  assert set(metrics.evaluate({'pool': sample_feats['pool']}, bare)) == {'fid'}
  assert metrics.evaluate(sample_feats, reference)['fid'] == res['fid']


def test_evaluate_bad_inputs():
  rng = np.random.default_rng(15)
  feats = features.extract_features(_fake_extractor, _images(rng, 10))
  reference = reference_lib.Reference.from_features(feats)
  with pytest.raises(ValueError, match=r"'pool' features of shape \(10, 11\) do not match the "
                     r'reference mu of shape \(12,\)'):
    metrics.evaluate({'pool': feats['pool'][:, :11]}, reference)
  with pytest.raises(ValueError, match="no 'logits'"):
    metrics.evaluate({'pool': feats['pool']}, reference, labels=np.zeros(10, int))
  with pytest.raises(ValueError, match=r'labels of shape \(10,\)'):
    metrics.evaluate(feats, reference, labels=np.zeros(9, int))
  with pytest.raises(ValueError, match=r"'spatial' features of shape \(10, 3\)"):
    metrics.evaluate(dict(feats, spatial=feats['spatial'][:, :3]), reference)
