"""Torch-parity image resizing: `F.interpolate` modes 'area', 'bicubic' and 'bilinear' in JAX.

`jax.image.resize` matches neither: PyTorch's 'area' is adaptive average pooling with overlapping
windows at non-integer ratios (16->13, 16->10, ...), and its 'bicubic' uses A = -0.75 with clamped
border taps, while JAX's 'cubic' uses Keys' A = -0.5. VAR's multi-scale quantizer runs both on every
scale, so bit-level parity of the tokenizer and `f_hat` needs these exact kernels. Infinity's BSQ
tokenizer resizes with 'trilinear' on `[B, C, 1, h, w]` latents, which is 'bilinear' in (h, w)
(`bilinear`; `jax.image.resize` antialiases when it downsamples, PyTorch does not).

Both resizes are linear and separable: `out = W_h @ x @ W_w^T` per channel, with small weight
matrices that depend only on the (static) sizes. They are built once in numpy and applied as two
matmuls, which is what TPUs and GPUs do fastest; gradients are the transposed matrices for free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's cubic convolution constant (`upsample_bicubic2d`); Keys' classic value is -0.5.
_BICUBIC_A = -0.75


def _check_size(in_size: int, out_size: int, name: str) -> None:
  if not isinstance(out_size, (int, np.integer)) or isinstance(out_size, bool) or out_size < 1:
    raise ValueError(f"resize: {name} must be a positive int, got {out_size!r}")
  if in_size < 1:
    raise ValueError(f"resize: input {name} must be >= 1, got {in_size}")


@functools.lru_cache(maxsize=256)
def area_weights(in_size: int, out_size: int) -> np.ndarray:
  """The `[out_size, in_size]` matrix of PyTorch's 'area' (adaptive average pooling) along one axis.

  Output `i` averages the inputs in `[floor(i * in / out), ceil((i + 1) * in / out))`; windows of
  neighbouring outputs overlap when the ratio is not an integer. Upsampling repeats inputs.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.

  Returns:
    float64 numpy array; rows sum to 1. Read-only (it is cached).
  """
  _check_size(in_size, out_size, "size")
  w = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    # Integer arithmetic, as in PyTorch's `start_index`/`end_index`: no float rounding at the edges.
    start = (i * in_size) // out_size
    end = ((i + 1) * in_size + out_size - 1) // out_size
    w[i, start:end] = 1.0 / (end - start)
  w.setflags(write=False)
  return w


def _cubic_coefficients(t: np.ndarray) -> np.ndarray:
  """PyTorch's `get_cubic_upsample_coefficients` for fractional offsets `t`, in float32 like it."""
  a = np.float32(_BICUBIC_A)
  one = np.float32(1)

  def conv1(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + one

  def conv2(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([conv2(t + one), conv1(t), conv1(one - t), conv2(one - t + one)], axis=-1)


@functools.lru_cache(maxsize=256)
def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
  """The `[out_size, in_size]` matrix of PyTorch's 'bicubic' (align_corners=False) along one axis.

  Source coordinate `(i + 0.5) * in / out - 0.5` (PyTorch uses the size ratio when only `size` is
  given), taps at `floor - 1 .. floor + 2` clamped to `[0, in - 1]`, cubic convolution with
  A = -0.75, no antialiasing. The scale, coordinate and coefficients are computed in float32 as
  PyTorch does for float32 inputs, so the weights agree with it to a few ulps (< 1e-6).

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.

  Returns:
    float64 numpy array; rows sum to 1 up to float32 rounding. Read-only (it is cached).
  """
  _check_size(in_size, out_size, "size")
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  # PyTorch's build contracts `scale * (i + 0.5) - 0.5` into one fused multiply-add: the product is
  # exact in float64 and only the result is rounded to float32. Rounding the product separately
  # shifts `t` by up to a float32 ulp of the coordinate (weights off by ~1e-6 at 32 -> 13). What is
  # left is ~1 ulp from how the compiler contracts the cubic polynomials.
  src = (np.float64(scale) * (dst + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
  base = np.floor(src)
  t = (src - base).astype(np.float32)
  coeffs = _cubic_coefficients(t)  # [out, 4]
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  for tap in range(4):
    # Clamped taps can coincide at the border; their weights add up.
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(w, (rows, idx), coeffs[:, tap].astype(np.float64))
  w.setflags(write=False)
  return w


@functools.lru_cache(maxsize=256)
def linear_weights(in_size: int, out_size: int) -> np.ndarray:
  """The `[out_size, in_size]` matrix of PyTorch's 'bilinear'/'trilinear' (align_corners=False)
  along one axis.

  Source coordinate `max((i + 0.5) * in / out - 0.5, 0)` in float32 (computed as in
  `bicubic_weights`), taps `floor` and `floor + 1` (the second clamped to `in - 1`), weights
  `1 - t` and `t`; no antialiasing, also when downsampling. Same sizes: the identity, as PyTorch.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.

  Returns:
    float64 numpy array; rows sum to 1. Read-only (it is cached).
  """
  _check_size(in_size, out_size, "size")
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = (np.float64(scale) * (dst + np.float32(0.5)).astype(np.float64) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  base = np.floor(src).astype(np.int64)
  t = np.clip(src - base.astype(np.float32), 0, 1).astype(np.float32)
  w = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(w, (rows, base), (np.float32(1) - t).astype(np.float64))
  np.add.at(w, (rows, np.minimum(base + 1, in_size - 1)), t.astype(np.float64))
  w.setflags(write=False)
  return w


def _normalize_size(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    size = (size, size)
  try:
    h, w = size
  except (TypeError, ValueError):
    raise ValueError(f"resize: size must be (height, width) or an int, got {size!r}") from None
  return h, w


def _separable(x_BxHxWxC: jax.Array, size, weights_fn, name: str) -> jax.Array:
  x = jnp.asarray(x_BxHxWxC)
  if x.ndim != 4:
    raise ValueError(f"{name}: x must be NHWC with 4 dims, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: x must have a float dtype, got {x.dtype}")
  out_h, out_w = _normalize_size(size)
  _, in_h, in_w, _ = x.shape
  _check_size(in_h, out_h, "height")
  _check_size(in_w, out_w, "width")
  if (in_h, in_w) == (out_h, out_w):
    return x
  # Low-precision inputs are resized in float32 (the weights like 1/3 are not exact in bf16).
  compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
  w_h = jnp.asarray(weights_fn(in_h, out_h), compute_dtype)
  w_w = jnp.asarray(weights_fn(in_w, out_w), compute_dtype)
  # HIGHEST: TPUs otherwise multiply float32 in bf16 passes, breaking torch parity.
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,bhwc->bowc", w_h, x.astype(compute_dtype), precision=hi)
  y = jnp.einsum("pw,bowc->bopc", w_w, y, precision=hi)
  return y.astype(x.dtype)


def area(x_BxHxWxC: jax.Array, size: tuple[int, int] | int) -> jax.Array:
  """PyTorch `F.interpolate(x, size, mode='area')` on NHWC arrays.

  Adaptive average pooling: output `i` averages inputs `[floor(i*in/out), ceil((i+1)*in/out))`.
  Works for down- and upsampling and non-integer ratios. Jit-able (`size` is static) and
  differentiable.

  Args:
    x_BxHxWxC: float array.
    size: `(out_height, out_width)`, or one int for both.

  Returns:
    `[B, out_height, out_width, C]` in the dtype of `x`.
  """
  return _separable(x_BxHxWxC, size, area_weights, "area")


def bicubic(x_BxHxWxC: jax.Array, size: tuple[int, int] | int) -> jax.Array:
  """PyTorch `F.interpolate(x, size, mode='bicubic', align_corners=False)` on NHWC arrays.

  Cubic convolution with A = -0.75, border taps clamped, no antialias, no output clamping (values
  can overshoot the input range, as in PyTorch). Jit-able (`size` is static) and differentiable.

  Args:
    x_BxHxWxC: float array.
    size: `(out_height, out_width)`, or one int for both.

  Returns:
    `[B, out_height, out_width, C]` in the dtype of `x`.
  """
  return _separable(x_BxHxWxC, size, bicubic_weights, "bicubic")


def bilinear(x_BxHxWxC: jax.Array, size: tuple[int, int] | int) -> jax.Array:
  """PyTorch `F.interpolate(x, size, mode='bilinear', align_corners=False)` on NHWC arrays (and
  'trilinear' on a `[B, C, 1, H, W]` video of one frame, as Infinity's BSQ tokenizer uses it).

  No antialias when downsampling (unlike `jax.image.resize`). Jit-able (`size` is static) and
  differentiable.

  Args:
    x_BxHxWxC: float array.
    size: `(out_height, out_width)`, or one int for both.

  Returns:
    `[B, out_height, out_width, C]` in the dtype of `x`.
  """
  return _separable(x_BxHxWxC, size, linear_weights, "bilinear")
