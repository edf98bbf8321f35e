"""Generative-model metrics from feature arrays: FD (FID/sFID), IS, precision/recall, KID.

Everything here is generic over the feature extractor: pass Inception pool3 features for FID, the
domain classifier's features for `fd_fmnist`, and so on. Conventions follow the OpenAI ADM evaluator
(guided-diffusion `evaluations/evaluator.py`) that VAR and LlamaGen report with; KID follows
torch-fidelity. Statistics are float64 numpy: the covariance square root is where float32 loses FID
digits.
"""

from __future__ import annotations

import numpy as np


def _as_2d(name: str, feats) -> np.ndarray:
  feats = np.asarray(feats)
  if feats.ndim != 2 or feats.shape[0] < 1:
    raise ValueError(f"{name} has shape {feats.shape}; accepted: [N, D] features with N >= 1")
  return feats


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[D]` and covariance `[D, D]` (ddof=1, as `np.cov(rowvar=False)`) in float64."""
  feats = _as_2d("feats", feats).astype(np.float64)
  if feats.shape[0] < 2:
    raise ValueError(f"feats has {feats.shape[0]} row; a covariance needs at least 2")
  return feats.mean(0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def spatial_stats(feats, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """sFID statistics: mean/covariance of spatial features flattened per sample.

  Args:
    feats: `[N, H, W, C]` channel-last spatial features (ADM: Inception `mixed_6/conv`, 17x17).
    channels: keep the first `channels` channels before flattening (ADM sFID uses 7, giving
      7*17*17 = 2023-d); None keeps all.
  """
  feats = np.asarray(feats)
  if feats.ndim < 2:
    raise ValueError(f"spatial feats have shape {feats.shape}; accepted: [N, H, W, C]")
  if channels is not None:
    if feats.ndim != 4 or not 1 <= channels <= feats.shape[-1]:
      raise ValueError(
        f"channels={channels!r} for spatial feats of shape {feats.shape}; accepted: "
        "1 <= channels <= C for [N, H, W, C] features"
      )
    feats = feats[..., :channels]
  # Row-major NHWC flattening, the order ADM's evaluator uses.
  return feature_stats(feats.reshape(feats.shape[0], -1))


def _sym_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root by eigendecomposition; tiny negative eigenvalues are clipped."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  `||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2)`. `tr sqrtm(S1 S2)` equals the
  trace term (S1 S2 is similar to the symmetric S1^1/2 S2 S1^1/2), so two symmetric
  eigendecompositions replace scipy's `sqrtm` and no complex parts or offsets are needed.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,):
    raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape} must both be [D] vectors of equal D")
  if s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"sigma1 {s1.shape} and sigma2 {s2.shape} must both be [D, D] with D={d}")
  for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} has non-finite values; accepted: finite statistics")
  # Symmetrize: covariances read from files or accumulated in float32 can be slightly asymmetric.
  s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
  root1 = _sym_sqrt(s1)
  m = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def frechet_distance_from_features(feats1, feats2) -> float:
  """`frechet_distance` of the Gaussians fitted to two feature sets `[N1, D]`, `[N2, D]`."""
  return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


def frechet_distance_to_stats(feats, mu, sigma) -> float:
  """`frechet_distance(*feature_stats(feats), mu, sigma)`, fast when N <= D.

  With `S1 = Xc^T Xc / (N-1)` (`Xc` the centered `[N, D]` features), the non-zero eigenvalues of
  `S1 S2` (whose square roots sum to the trace term) are those of the `[N, N]` matrix
  `Xc S2 Xc^T / (N-1)`. So evaluations with fewer samples than feature dimensions (the loop's
  periodic evals, rFID on small splits) need one small eigendecomposition instead of two `D x D`
  ones (seconds each for D = 2048 on a CPU). The result is the same up to float64 rounding.
  """
  x = np.asarray(feats, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"feats have shape {x.shape}; accepted: [N, D] with N >= 2")
  n, d = x.shape
  mu2, s2 = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if n > d:
    return frechet_distance(*feature_stats(x), mu2, s2)
  if mu2.shape != (d,) or s2.shape != (d, d):
    raise ValueError(f"mu {mu2.shape} / sigma {s2.shape}; accepted: [{d}] and [{d}, {d}]")
  if not (np.all(np.isfinite(mu2)) and np.all(np.isfinite(s2))):
    raise ValueError("reference mu/sigma have non-finite values; accepted: finite statistics")
  s2 = (s2 + s2.T) / 2
  mu1 = x.mean(0)
  xc = x - mu1
  m = xc @ s2 @ xc.T / (n - 1)
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(xc * xc) / (n - 1) + np.trace(s2) - 2.0 * tr_covmean)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score from classifier logits `[N, K]`: mean and std over `splits` of
  `exp(E_x KL(p(y|x) || p(y)))`, with p(y) the split's marginal (ADM/torch-fidelity convention:
  contiguous splits, ADM uses 5,000 samples per split)."""
  logits = _as_2d("logits", logits).astype(np.float64)
  n = logits.shape[0]
  if not isinstance(splits, (int, np.integer)) or not 1 <= splits <= n:
    raise ValueError(f"splits={splits!r}; accepted: an int in [1, N={n}]")
  logp = _log_softmax(logits)
  scores = []
  for i in range(splits):
    part = logp[i * n // splits : (i + 1) * n // splits]
    p = np.exp(part)
    log_marginal = np.log(p.mean(0))
    # p * (log p - log p(y)); where p underflows to 0 the term is 0, never 0 * inf.
    kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("nd,nd->n", x, x)


def _block_sq_dists(a, a_sq, b, b_sq) -> np.ndarray:
  # ||a||^2 - 2 a.b + ||b||^2; cancellation can go slightly negative for (near) duplicates.
  return np.maximum(a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :], 0.0)


def knn_radii(feats, k: int = 3, batch_size: int = 2048) -> np.ndarray:
  """Squared distance of each row to its k-th nearest neighbour in `feats`, excluding itself.

  Computed in row x column blocks, keeping the running k+1 smallest per row, so memory stays at
  `batch_size**2` distances whatever N is.
  """
  feats = _as_2d("feats", feats)
  n = feats.shape[0]
  if not isinstance(k, (int, np.integer)) or not 1 <= k < n:
    raise ValueError(f"k={k!r}; accepted: an int in [1, N-1] with N={n} feature rows")
  sq = _sq_norms(feats)
  radii = np.empty(n, feats.dtype)
  for r0 in range(0, n, batch_size):
    rows, rows_sq = feats[r0 : r0 + batch_size], sq[r0 : r0 + batch_size]
    best = None  # [rows, k+1] smallest squared distances so far (self included, at ~0)
    for c0 in range(0, n, batch_size):
      d = _block_sq_dists(rows, rows_sq, feats[c0 : c0 + batch_size], sq[c0 : c0 + batch_size])
      cand = d if best is None else np.concatenate([best, d], 1)
      kk = min(k + 1, cand.shape[1])
      best = np.partition(cand, kk - 1, axis=1)[:, :kk]
    # Index k of the sorted k+1 smallest skips the row itself (ADM: `nhood_sizes=[3]`).
    radii[r0 : r0 + batch_size] = np.sort(best, 1)[:, k]
  return radii


def _fraction_inside(points, manifold, manifold_radii, batch_size: int) -> float:
  """Fraction of `points` within the radius of at least one `manifold` point."""
  p_sq, m_sq = _sq_norms(points), _sq_norms(manifold)
  inside = np.zeros(points.shape[0], bool)
  for r0 in range(0, points.shape[0], batch_size):
    rows, rows_sq = points[r0 : r0 + batch_size], p_sq[r0 : r0 + batch_size]
    hit = np.zeros(rows.shape[0], bool)
    for c0 in range(0, manifold.shape[0], batch_size):
      d = _block_sq_dists(rows, rows_sq, manifold[c0 : c0 + batch_size], m_sq[c0 : c0 + batch_size])
      hit |= (d <= manifold_radii[None, c0 : c0 + batch_size]).any(1)
    inside[r0 : r0 + batch_size] = hit
  return float(inside.mean())


def precision_recall(
  real_feats, fake_feats, k: int = 3, batch_size: int = 2048, dtype=np.float32, real_radii=None
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

  Precision: fraction of fake samples inside the real manifold (union of balls around each real
  feature with radius = distance to its k-th nearest real neighbour). Recall: fraction of real
  samples inside the fake manifold. ADM uses k=3 on pool3 features and squared distances in
  float16 blocks (float32 on overflow); `dtype` picks the precision here (float32 by default).
  `real_radii` (from `knn_radii(real_feats, k)`) skips recomputing the fixed real manifold.

  Returns:
    `(precision, recall)` in [0, 1].
  """
  real = _as_2d("real_feats", real_feats).astype(dtype)
  fake = _as_2d("fake_feats", fake_feats).astype(dtype)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real_feats D={real.shape[1]} != fake_feats D={fake.shape[1]}")
  if real_radii is None:
    real_radii = knn_radii(real, k, batch_size)
  elif np.shape(real_radii) != (real.shape[0],):
    raise ValueError(
      f"real_radii has shape {np.shape(real_radii)}; accepted: [N_real={real.shape[0]}]"
    )
  fake_radii = knn_radii(fake, k, batch_size)
  precision = _fraction_inside(fake, real, real_radii, batch_size)
  recall = _fraction_inside(real, fake, fake_radii, batch_size)
  return precision, recall


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3 (KID; Binkowski et al. 2018)."""
  d = x.shape[1]
  m, n = x.shape[0], y.shape[0]
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  # Unbiased: the diagonal (a sample with itself) is left out of the within-set means.
  sum_xx = k_xx.sum() - np.trace(k_xx)
  sum_yy = k_yy.sum() - np.trace(k_yy)
  return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def kid(
  real_feats, fake_feats, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
  """Kernel Inception Distance: mean and std over random subsets of the unbiased polynomial MMD^2.

  Each subset draws `subset_size` rows without replacement from each set (clipped to that set's
  size), with a `np.random.RandomState(seed)` stream (torch-fidelity's convention).
  """
  real = _as_2d("real_feats", real_feats).astype(np.float64)
  fake = _as_2d("fake_feats", fake_feats).astype(np.float64)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"real_feats D={real.shape[1]} != fake_feats D={fake.shape[1]}")
  if not isinstance(subsets, (int, np.integer)) or subsets < 1:
    raise ValueError(f"subsets={subsets!r}; accepted: an int >= 1")
  if not isinstance(subset_size, (int, np.integer)) or subset_size < 2:
    raise ValueError(f"subset_size={subset_size!r}; accepted: an int >= 2")
  m, n = min(subset_size, real.shape[0]), min(subset_size, fake.shape[0])
  if m < 2 or n < 2:
    raise ValueError(
      f"KID needs >= 2 rows per set; got real N={real.shape[0]}, fake N={fake.shape[0]}"
    )
  rng = np.random.RandomState(seed)
  mmds = np.empty(subsets)
  for i in range(subsets):
    x = real[rng.choice(real.shape[0], m, replace=False)]
    y = fake[rng.choice(fake.shape[0], n, replace=False)]
    mmds[i] = _poly_mmd2(x, y)
  return float(mmds.mean()), float(mmds.std())
