"""Torch-parity resizing: `area` and `bicubic` against loop implementations and PyTorch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.ops import resize

# (in, out) pairs along one axis: up, down, integer and non-integer ratios, VAR's 16 -> 13 / 10.
PAIRS = [(1, 16), (2, 16), (13, 16), (16, 13), (16, 10), (16, 1), (32, 13), (7, 5), (5, 7), (3, 1)]


def _area_loop(x_HxW, out_h, out_w):
  """Adaptive average pooling written from its definition, one output pixel at a time."""
  in_h, in_w = x_HxW.shape
  out = np.zeros((out_h, out_w), np.float64)
  for i in range(out_h):
    h0, h1 = math.floor(i * in_h / out_h), math.ceil((i + 1) * in_h / out_h)
    for j in range(out_w):
      w0, w1 = math.floor(j * in_w / out_w), math.ceil((j + 1) * in_w / out_w)
      out[i, j] = x_HxW[h0:h1, w0:w1].astype(np.float64).mean()
  return out


def _cubic(d, a=-0.75):
  """Keys' cubic convolution kernel at distance d."""
  d = abs(d)
  if d <= 1:
    return (a + 2) * d**3 - (a + 3) * d**2 + 1
  if d < 2:
    return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
  return 0.0


def _bicubic_loop(x_HxW, out_h, out_w):
  """PyTorch bicubic (align_corners=False) from its formulas: 16 clamped taps per output pixel."""
  in_h, in_w = x_HxW.shape
  out = np.zeros((out_h, out_w), np.float64)
  for i in range(out_h):
    sy = (i + 0.5) * in_h / out_h - 0.5
    fy = math.floor(sy)
    for j in range(out_w):
      sx = (j + 0.5) * in_w / out_w - 0.5
      fx = math.floor(sx)
      acc = 0.0
      for a in range(-1, 3):
        wy = _cubic(sy - (fy + a))
        yy = min(max(fy + a, 0), in_h - 1)
        for b in range(-1, 3):
          wx = _cubic(sx - (fx + b))
          xx = min(max(fx + b, 0), in_w - 1)
          acc += wy * wx * float(x_HxW[yy, xx])
      out[i, j] = acc
  return out


LOOPS = {"area": _area_loop, "bicubic": _bicubic_loop}
FNS = {"area": resize.area, "bicubic": resize.bicubic}


def _loop_nhwc(mode, x_BxHxWxC, out_h, out_w):
  b, _, _, c = x_BxHxWxC.shape
  out = np.zeros((b, out_h, out_w, c))
  for bi in range(b):
    for ci in range(c):
      out[bi, :, :, ci] = LOOPS[mode](x_BxHxWxC[bi, :, :, ci], out_h, out_w)
  return out


def _loop_matrix(mode, in_size, out_size):
  """The 1-D resize matrix, recovered from the loop by resizing unit vectors (width 1 -> 1)."""
  eye = np.eye(in_size)
  return np.stack([LOOPS[mode](eye[:, j : j + 1], out_size, 1)[:, 0] for j in range(in_size)], 1)


@pytest.mark.parametrize("mode", ["area", "bicubic"])
@pytest.mark.parametrize("in_size,out_size", PAIRS)
def test_matches_loop(mode, in_size, out_size):
  rng = np.random.default_rng(in_size * 100 + out_size)
  # Different height and width pairs in one call: the two axes must not be mixed up.
  in_w, out_w = out_size + 1, in_size + 2
  x = rng.standard_normal((2, in_size, in_w, 3)).astype(np.float32)
  got = np.asarray(FNS[mode](jnp.asarray(x), (out_size, out_w)))
  assert got.shape == (2, out_size, out_w, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got, _loop_nhwc(mode, x, out_size, out_w), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["area", "bicubic"])
@pytest.mark.parametrize("in_size,out_size", PAIRS)
def test_weight_matrices_match_loop(mode, in_size, out_size):
  weights = {"area": resize.area_weights, "bicubic": resize.bicubic_weights}[mode]
  w = weights(in_size, out_size)
  np.testing.assert_allclose(w, _loop_matrix(mode, in_size, out_size), atol=3e-6, rtol=0)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)


def test_area_known_values():
  # 4 -> 3: windows [0, 2), [1, 3), [2, 4) overlap; 2 -> 4 repeats.
  x = jnp.arange(4.0).reshape(1, 4, 1, 1)
  np.testing.assert_allclose(resize.area(x, (3, 1))[0, :, 0, 0], [0.5, 1.5, 2.5])
  y = jnp.asarray([1.0, 3.0]).reshape(1, 2, 1, 1)
  np.testing.assert_allclose(resize.area(y, (4, 1))[0, :, 0, 0], [1, 1, 3, 3])


def test_bicubic_differs_from_jax_cubic():
  # The whole point: jax.image.resize('cubic') uses A = -0.5 and is not torch's bicubic.
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  ours = resize.bicubic(x, (16, 16))
  theirs = jax.image.resize(x, (1, 16, 16, 1), "cubic")
  assert float(jnp.abs(ours - theirs).max()) > 1e-2


@pytest.mark.parametrize("mode", ["area", "bicubic"])
@pytest.mark.parametrize("in_size,out_size", [(16, 13), (5, 7)])
def test_gradient_is_transpose(mode, in_size, out_size):
  rng = np.random.default_rng(1)
  in_w, out_w = 6, 4
  x = jnp.asarray(rng.standard_normal((1, in_size, in_w, 1)), jnp.float32)
  g = rng.standard_normal((out_size, out_w))
  fn = FNS[mode]
  grad = jax.grad(lambda x: jnp.sum(fn(x, (out_size, out_w))[0, :, :, 0] * g))(x)
  m_h = _loop_matrix(mode, in_size, out_size)
  m_w = _loop_matrix(mode, in_w, out_w)
  np.testing.assert_allclose(grad[0, :, :, 0], m_h.T @ g @ m_w, atol=1e-5, rtol=0)


def test_jit_dtype_identity_and_int_size():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4)).astype(jnp.bfloat16)
  y = jax.jit(resize.area, static_argnums=1)(x, (13, 13))
  assert y.shape == (2, 13, 13, 4) and y.dtype == jnp.bfloat16
  ref = resize.area(x.astype(jnp.float32), 13)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=2e-2)
  assert resize.bicubic(x, (16, 16)) is x


@pytest.mark.parametrize(
  "x_shape,size,match",
  [
    ((16, 16, 3), (8, 8), "NHWC"),
    ((1, 16, 16, 3), (0, 8), "height"),
    ((1, 16, 16, 3), (8, 2.5), "width"),
    ((1, 16, 16, 3), (8, 8, 8), "size"),
  ],
)
def test_bad_input(x_shape, size, match):
  with pytest.raises(ValueError, match=match):
    resize.area(jnp.zeros(x_shape), size)


def test_int_input_rejected():
  with pytest.raises(ValueError, match="float dtype"):
    resize.bicubic(jnp.zeros((1, 4, 4, 1), jnp.int32), (8, 8))


@pytest.mark.torch
@pytest.mark.parametrize("mode", ["area", "bicubic"])
@pytest.mark.parametrize("in_size,out_size", PAIRS + [(16, 16)])
def test_matches_torch(mode, in_size, out_size):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(7)
  in_w, out_w = in_size + 3, out_size + 1
  x = rng.standard_normal((2, 3, in_size, in_w)).astype(np.float32)  # NCHW for torch
  kw = {"align_corners": False} if mode == "bicubic" else {}
  want = torch.nn.functional.interpolate(
    torch.from_numpy(x), size=(out_size, out_w), mode=mode, **kw
  ).numpy()
  got = np.asarray(FNS[mode](jnp.asarray(x.transpose(0, 2, 3, 1)), (out_size, out_w)))
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=1e-5, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("in_size,out_size", [(16, 13), (32, 13), (7, 5), (13, 16)])
def test_bicubic_weights_match_torch(in_size, out_size):
  # Resizing unit vectors reads torch's weight matrix off exactly (width 1 -> 1 is the identity).
  torch = pytest.importorskip("torch")
  eye = torch.eye(in_size, dtype=torch.float32).reshape(1, in_size, in_size, 1)
  out = torch.nn.functional.interpolate(
    eye, size=(out_size, 1), mode="bicubic", align_corners=False
  )
  want = out[0, :, :, 0].numpy().T
  np.testing.assert_allclose(resize.bicubic_weights(in_size, out_size), want, atol=1e-6, rtol=0)


@pytest.mark.torch
@pytest.mark.parametrize("in_size,out_size", PAIRS + [(16, 12), (64, 48), (12, 16)])
def test_bilinear_matches_torch_trilinear_on_one_frame(in_size, out_size):
  # Infinity's BSQ tokenizer resizes [B, C, 1, h, w] latents with 'trilinear': on one frame that
  # is bilinear without antialias, which `bilinear` must reproduce in both directions.
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(in_size * 7 + out_size)
  in_w, out_w = out_size + 1, in_size + 2
  x = rng.standard_normal((2, 3, 1, in_size, in_w)).astype(np.float32)
  want = torch.nn.functional.interpolate(
    torch.from_numpy(x), size=(1, out_size, out_w), mode="trilinear"
  ).numpy()[:, :, 0]
  got = np.asarray(
    resize.bilinear(jnp.asarray(x[:, :, 0].transpose(0, 2, 3, 1)), (out_size, out_w))
  )
  np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, atol=2e-6, rtol=0)
  np.testing.assert_allclose(resize.linear_weights(in_size, out_size).sum(1), 1.0, atol=1e-6)
