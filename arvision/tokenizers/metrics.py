"""Reconstruction and codebook metrics: PSNR, SSIM and codebook usage/perplexity.

Images come in [-1, 1] (the model range) and are mapped to [0, 1] before measuring, so the numbers
compare with papers that report PSNR/SSIM on [0, 1] (or 8-bit) images. `psnr` and `ssim` return one
value per image (`[B]`) so callers can mask padded examples before averaging (`jnp.mean`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_unit(x: jax.Array) -> jax.Array:
  """[-1, 1] -> [0, 1], clipped (reconstructions may overshoot)."""
  return jnp.clip((x.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def psnr(x_BxHxWxC: jax.Array, y_BxHxWxC: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Per-image PSNR (dB) [B] between two batches in [-1, 1], measured on [0, 1] (peak 1).

  `eps` caps identical images at 100 dB instead of inf. Average over images with `jnp.mean`.
  """
  if x_BxHxWxC.shape != y_BxHxWxC.shape:
    raise ValueError(f"psnr: shapes differ: {x_BxHxWxC.shape} vs {y_BxHxWxC.shape}")
  mse_B = jnp.mean(jnp.square(to_unit(x_BxHxWxC) - to_unit(y_BxHxWxC)), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse_B, eps))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  g = np.exp(-((np.arange(size) - (size - 1) / 2.0) ** 2) / (2.0 * sigma**2))
  return (g / g.sum()).astype(np.float32)


def _filter_valid(x_BxHxWxC: jax.Array, g: np.ndarray) -> jax.Array:
  """Separable Gaussian filter per channel, 'valid' (no padding), as in Wang et al.'s reference."""
  k = g.shape[0]
  g = jnp.asarray(g)
  h = x_BxHxWxC.shape[1] - k + 1
  w = x_BxHxWxC.shape[2] - k + 1
  rows = sum(g[i] * x_BxHxWxC[:, i : i + h] for i in range(k))
  return sum(g[j] * rows[:, :, j : j + w] for j in range(k))


def ssim(
  x_BxHxWxC: jax.Array,
  y_BxHxWxC: jax.Array,
  window: int = 11,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """Per-image SSIM [B] (Wang et al. 2004) of two batches in [-1, 1], measured on [0, 1].

  Gaussian window 11x11, sigma 1.5, C1 = (0.01)^2, C2 = (0.03)^2 (data range 1), computed per
  channel over the valid region and averaged over positions and channels. Images must be at least
  `window` pixels on each side.
  """
  if x_BxHxWxC.shape != y_BxHxWxC.shape:
    raise ValueError(f"ssim: shapes differ: {x_BxHxWxC.shape} vs {y_BxHxWxC.shape}")
  if min(x_BxHxWxC.shape[1:3]) < window:
    raise ValueError(f"ssim: images {x_BxHxWxC.shape[1:3]} are smaller than the window {window}")
  g = _gaussian_window(window, sigma)
  x, y = to_unit(x_BxHxWxC), to_unit(y_BxHxWxC)
  mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
  sxx = _filter_valid(x * x, g) - mu_x**2
  syy = _filter_valid(y * y, g) - mu_y**2
  sxy = _filter_valid(x * y, g) - mu_x * mu_y
  c1, c2 = k1**2, k2**2
  num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
  den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def codebook_usage(codes: jax.Array, vocab_size: int) -> dict[str, jax.Array]:
  """`{"usage", "perplexity"}` of integer `codes` (any shape) over a codebook of `vocab_size`.

  usage: fraction of the codes used at least once. perplexity: exp(entropy) of the empirical code
  distribution (vocab_size when uniform, 1 when a single code is used).
  """
  counts = jnp.bincount(jnp.asarray(codes).reshape(-1).astype(jnp.int32), length=vocab_size)
  usage = jnp.mean((counts > 0).astype(jnp.float32))
  p = counts.astype(jnp.float32) / jnp.maximum(jnp.sum(counts), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return dict(usage=usage, perplexity=jnp.exp(entropy))
