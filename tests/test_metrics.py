"""Metrics from features against closed forms, and the ADM npz / stats-cache I/O."""

import os

import numpy as np
import pytest

from arvision.evaluation import metrics, npz


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_identical_gaussians_is_zero():
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=6), _random_spd(rng, 6)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-10


def test_fd_diagonal_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def _fd_reference(mu1, s1, mu2, s2):
  # Independent route: tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2)); S1 S2 is similar to a PSD matrix, so
  # its (real-part) eigenvalues are non-negative.
  eig = np.linalg.eigvals(s1 @ s2)
  return float(
    np.sum((mu1 - mu2) ** 2)
    + np.trace(s1)
    + np.trace(s2)
    - 2 * np.sum(np.sqrt(np.clip(eig.real, 0, None)))
  )


def test_fd_full_covariance_matches_reference():
  rng = np.random.default_rng(2)
  d = 12
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _fd_reference(mu1, s1, mu2, s2), rtol=1e-9)
  # A distance: symmetric and positive for different Gaussians.
  np.testing.assert_allclose(got, metrics.frechet_distance(mu2, s2, mu1, s1), rtol=1e-9)
  assert got > 0


def test_fd_rank_deficient_covariance_is_finite():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(4, 10))  # 4 samples in 10-d: covariance of rank 3
  mu, sigma = metrics.feature_stats(feats)
  fd = metrics.frechet_distance(mu, sigma, mu, sigma)
  # sqrt of ~1e-16 round-off eigenvalues is ~1e-8 each: small against tr(sigma).
  assert np.isfinite(fd) and abs(fd) < 1e-5 * np.trace(sigma)


def test_fd_of_samples_converges_to_gaussian_fd():
  rng = np.random.default_rng(4)
  d = 4
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  want = metrics.frechet_distance(mu1, s1, mu2, s2)
  errs = []
  for n in (1_000, 100_000):
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    errs.append(abs(metrics.frechet_distance_from_features(x, y) - want))
  assert errs[1] < 0.02 * want + 0.01
  assert errs[1] < errs[0]


def test_feature_stats_matches_numpy_cov():
  x = np.random.default_rng(5).normal(size=(50, 3)).astype(np.float32)
  mu, sigma = metrics.feature_stats(x)
  assert mu.dtype == np.float64 and sigma.shape == (3, 3)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_spatial_stats_keeps_channels_and_flattens_nhwc():
  x = np.random.default_rng(6).normal(size=(20, 2, 3, 5))
  mu, sigma = metrics.spatial_stats(x, channels=2)
  assert mu.shape == (2 * 3 * 2,) and sigma.shape == (12, 12)
  np.testing.assert_allclose(mu, x[..., :2].reshape(20, -1).mean(0))
  with pytest.raises(ValueError, match="channels"):
    metrics.spatial_stats(x, channels=6)


def test_fd_bad_shapes_raise():
  with pytest.raises(ValueError, match="sigma1"):
    metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_one_hot_and_identical():
  k, splits = 5, 4
  labels = np.tile(np.arange(k), splits * 3)  # every split sees each class equally
  logits = 50.0 * np.eye(k)[labels]
  mean, std = metrics.inception_score(logits, splits=splits)
  np.testing.assert_allclose(mean, k, rtol=1e-6)
  assert std < 1e-6
  same = np.tile(np.random.default_rng(7).normal(size=(1, k)), (40, 1))
  np.testing.assert_allclose(metrics.inception_score(same, splits=4)[0], 1.0, atol=1e-12)
  # Uniform predictions carry no information either.
  np.testing.assert_allclose(metrics.inception_score(np.zeros((10, k)), splits=2)[0], 1.0)
  with pytest.raises(ValueError, match="splits"):
    metrics.inception_score(logits, splits=len(logits) + 1)


def test_knn_radii_excludes_self():
  x = np.array([[0.0], [1.0], [3.0], [7.0]])
  # Squared distance to the 1st neighbour (self excluded): 1, 1, 4, 16.
  np.testing.assert_allclose(metrics.knn_radii(x, k=1, batch_size=3), [1, 1, 4, 16])
  np.testing.assert_allclose(metrics.knn_radii(x, k=2, batch_size=2), [9, 4, 9, 36])


def test_precision_recall_constructed_manifolds():
  rng = np.random.default_rng(8)
  real = rng.normal(size=(300, 8))
  p, r = metrics.precision_recall(real, real, batch_size=128)
  assert p == 1.0 and r == 1.0
  p, r = metrics.precision_recall(real, real + 100.0, batch_size=128)
  assert p == 0.0 and r == 0.0
  # Two far-apart clusters of real data; the fake set covers only the first one.
  a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 50.0
  real = np.concatenate([a, b])
  p, r = metrics.precision_recall(real, a[:150], batch_size=64)
  assert p == 1.0
  assert r < 0.6  # at most cluster a (0.5 of the real set) plus nothing from b


def test_precision_recall_blocking_invariant():
  rng = np.random.default_rng(9)
  real, fake = rng.normal(size=(130, 4)), rng.normal(size=(90, 4)) * 1.3
  want = metrics.precision_recall(real, fake, batch_size=1000, dtype=np.float64)
  got = metrics.precision_recall(real, fake, batch_size=17, dtype=np.float64)
  assert want == got
  assert 0 < want[0] < 1 and 0 < want[1] < 1


def test_kid_same_vs_shifted():
  rng = np.random.default_rng(10)
  x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  same, same_std = metrics.kid(x, y, subsets=20, subset_size=200)
  shifted, _ = metrics.kid(x, y + 1.0, subsets=20, subset_size=200)
  assert abs(same) < 3 * same_std + 1e-3
  assert shifted > 10 * max(abs(same), 1e-4)
  # Seeded: the same call gives the same numbers; subset_size is clipped to the set sizes.
  assert metrics.kid(x, y, subsets=3, subset_size=10_000, seed=1) == metrics.kid(
    x, y, subsets=3, subset_size=10_000, seed=1
  )


def test_kid_unbiased_estimator_formula():
  rng = np.random.default_rng(11)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
  kern = lambda a, b: (a @ b / 3 + 1) ** 3
  kxx = [kern(x[i], x[j]) for i in range(6) for j in range(6) if i != j]
  kyy = [kern(y[i], y[j]) for i in range(5) for j in range(5) if i != j]
  kxy = [kern(x[i], y[j]) for i in range(6) for j in range(5)]
  want = np.mean(kxx) + np.mean(kyy) - 2 * np.mean(kxy)
  got, std = metrics.kid(x, y, subsets=2, subset_size=100)  # full sets every time
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert std < 1e-12


def test_samples_npz_round_trip(tmp_path):
  rng = np.random.default_rng(12)
  images = rng.integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, size=7)
  path = str(tmp_path / "samples.npz")
  npz.save_samples(path, images, labels)
  with np.load(path) as f:
    assert sorted(f.files) == ["arr_0", "labels"] and f["arr_0"].dtype == np.uint8
  got_images, got_labels = npz.load_samples(path)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  with pytest.raises(ValueError, match="uint8"):
    npz.save_samples(path, images.astype(np.float32), labels)
  with pytest.raises(ValueError, match="labels"):
    npz.save_samples(path, images, labels[:3])
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_reference_stats_round_trip_and_missing_keys(tmp_path):
  rng = np.random.default_rng(13)
  mu, sigma = rng.normal(size=4), _random_spd(rng, 4)
  path = str(tmp_path / "ref.npz")
  npz.save_reference_stats(
    path, mu, sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2], arr_0=np.zeros((2, 4, 4, 3), np.uint8)
  )
  ref = npz.load_reference_stats(
    path, required=("mu", "sigma", "mu_s", "sigma_s"), load_images=True
  )
  np.testing.assert_array_equal(ref["mu"], mu)
  np.testing.assert_array_equal(ref["sigma_s"], sigma[:2, :2])
  assert ref["arr_0"].shape == (2, 4, 4, 3)
  assert "arr_0" not in npz.load_reference_stats(path)
  partial = str(tmp_path / "partial.npz")
  np.savez(partial, arr_0=np.zeros((1, 2, 2, 3), np.uint8), mu=mu)
  with pytest.raises(KeyError, match="sigma"):
    npz.load_reference_stats(partial)
  with pytest.raises(KeyError, match="mu_s"):
    npz.load_reference_stats(partial, required=("mu", "mu_s"))
  with pytest.raises(FileNotFoundError):
    npz.load_reference_stats(str(tmp_path / "nope.npz"))


def test_cached_stats_computes_once(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return {"mu": np.arange(3.0), "sigma": np.eye(3)}

  path = npz.stats_cache_path(str(tmp_path), "fashion_mnist", "test", "fmnist_cnn@abc", 10_000)
  first = npz.cached_stats(path, compute)
  second = npz.cached_stats(path, compute)
  assert len(calls) == 1
  np.testing.assert_array_equal(first["sigma"], second["sigma"])
  # Every part of the key changes the file.
  others = {
    npz.stats_cache_path(str(tmp_path), *args)
    for args in [
      ("fashion_mnist", "train", "fmnist_cnn@abc", 10_000),
      ("fashion_mnist", "test", "fmnist_cnn@abd", 10_000),
      ("fashion_mnist", "test", "fmnist_cnn@abc", 5_000),
      ("mnist", "test", "fmnist_cnn@abc", 10_000),
    ]
  }
  assert len(others) == 4 and path not in others


def test_fingerprint_tracks_values():
  tree = {"a": np.ones((2, 2), np.float32), "b": {"c": np.zeros(3)}}
  changed = {"a": np.ones((2, 2), np.float32), "b": {"c": np.array([0.0, 0.0, 1e-6])}}
  assert npz.fingerprint(tree) == npz.fingerprint({k: v for k, v in tree.items()})
  assert npz.fingerprint(tree) != npz.fingerprint(changed)
