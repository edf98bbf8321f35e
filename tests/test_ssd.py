"""The Mamba2 SSD scan (`arvision/ops/ssd.py`) and the Mamba2 layer (`arvision/models/mamba2.py`).

The reference is the recurrence itself, token by token, in float64:
S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.models.mamba2 import Mamba2
from arvision.ops.ssd import ssd_chunked, ssd_recurrent

BATCH, LENGTH, HEADS, HEADDIM, GROUPS, STATE = 2, 13, 4, 3, 2, 5


def _inputs(seed=0, dtype=np.float64):
  r = np.random.default_rng(seed)
  x = r.normal(size=(BATCH, LENGTH, HEADS, HEADDIM))
  dt = np.log1p(np.exp(r.normal(size=(BATCH, LENGTH, HEADS))))  # softplus: > 0
  A = -np.exp(r.uniform(-1.0, 1.0, size=(HEADS,)))
  B = r.normal(size=(BATCH, LENGTH, GROUPS, STATE))
  C = r.normal(size=(BATCH, LENGTH, GROUPS, STATE))
  s0 = r.normal(size=(BATCH, HEADS, HEADDIM, STATE))
  return tuple(np.asarray(t, dtype) for t in (x, dt, A, B, C, s0))


def _loop(x, dt, A, B, C, s0):
  """The recurrence, one token at a time (python loop; jnp so that it differentiates)."""
  per = HEADS // GROUPS
  state, ys = s0, []
  for t in range(x.shape[1]):
    Bh = jnp.repeat(B[:, t], per, axis=1)  # [B, H, N]
    Ch = jnp.repeat(C[:, t], per, axis=1)
    decay = jnp.exp(dt[:, t] * A)[:, :, None, None]
    state = decay * state + (dt[:, t][:, :, None, None] * x[:, t][..., None] * Bh[:, :, None, :])
    ys.append(jnp.einsum("bhpn,bhn->bhp", state, Ch))
  return jnp.stack(ys, axis=1), state


def _objective(fn):
  w = np.random.default_rng(1).normal(size=(BATCH, LENGTH, HEADS, HEADDIM))
  w_s = np.random.default_rng(2).normal(size=(BATCH, HEADS, HEADDIM, STATE))

  def f(*args):
    y, s = fn(*args)
    return jnp.sum(y * w) + jnp.sum(s * w_s)

  return f


@pytest.fixture(scope="module")
def reference():
  """The float64 loop's outputs and gradients (computed once)."""
  args = _inputs()
  with jax.enable_x64(True):
    y_ref, s_ref = _loop(*args)
    g_ref = jax.grad(_objective(_loop), argnums=tuple(range(6)))(*args)
  return args, np.asarray(y_ref), np.asarray(s_ref), [np.asarray(g) for g in g_ref]


# chunk 5: two whole chunks and a padded one (the general case); 1: every token its own chunk.
@pytest.mark.parametrize("chunk", [5, pytest.param(1, marks=pytest.mark.slow)])
def test_chunked_equals_the_float64_recurrence_forward_and_gradients(chunk, reference):
  args, y_ref, s_ref, g_ref = reference
  with jax.enable_x64(True):
    y, s = ssd_chunked(*args[:5], chunk=chunk, initial_state=args[5])
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(s, s_ref, rtol=1e-10, atol=1e-10)
    chunked = lambda x, dt, A, B, C, s0: ssd_chunked(x, dt, A, B, C, chunk, s0)  # noqa: E731
    g = jax.grad(_objective(chunked), argnums=tuple(range(6)))(*args)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "initial_state"), g, g_ref, strict=True):
      assert np.all(np.isfinite(a)), name
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=name)
  # float32 (what models run): close to the float64 reference.
  y32, s32 = ssd_chunked(*(a.astype(np.float32) for a in args[:5]), chunk, args[5])
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, y_ref, rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(s32, s_ref, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_recurrent_reference_and_zero_initial_state():
  args = _inputs(3, np.float32)
  zero = np.zeros_like(args[5])
  y, s = ssd_chunked(*args[:5], chunk=4)
  y_rec, s_rec = ssd_recurrent(*args[:5])
  y_loop, s_loop = _loop(*args[:5], zero)
  np.testing.assert_allclose(y, y_loop, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y_rec, y_loop, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s_rec, s_loop, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s, s_loop, rtol=1e-4, atol=1e-4)


def test_pieces_with_carried_state_equal_one_pass():
  x, dt, A, B, C, _ = _inputs(4, np.float32)
  y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk=4)
  state, ys = None, []
  for b, e in ((0, 1), (1, 5), (5, 13)):  # scale-sized pieces
    y, state = ssd_chunked(x[:, b:e], dt[:, b:e], A, B[:, b:e], C[:, b:e], 4, state)
    ys.append(y)
  np.testing.assert_allclose(np.concatenate(ys, 1), y_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, s_full, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
  x, dt, A, B, C, _ = _inputs(0, np.float32)
  with pytest.raises(ValueError, match=r"dt .* \[B, L, H\]"):
    ssd_chunked(x, dt[:, :, :2], A, B, C)
  with pytest.raises(ValueError, match="not divisible into 3 groups"):
    ssd_chunked(x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="chunk=0"):
    ssd_chunked(x, dt, A, B, C, chunk=0)


@pytest.mark.slow  # covered in the default run by test_mvar's decoding test
def test_mamba2_layer_state_cache_equals_full_forward():
  """Feeding the layer scale by scale with its (conv, ssm) state gives the full call's outputs
  (the M-VAR sampler's cache), for any chunk length."""
  mamba = Mamba2(d_state=8, headdim=8, chunk=4)
  u = jax.random.normal(jax.random.key(0), (2, 14, 16))
  params = mamba.init(jax.random.key(1), u)
  full, (conv_f, ssm_f) = mamba.apply(params, u)
  assert full.shape == u.shape
  other, _ = mamba.clone(chunk=64).apply(params, u)
  np.testing.assert_allclose(other, full, rtol=1e-5, atol=1e-5)
  state, outs = mamba.init_state(2, 16), []
  for b, e in ((0, 1), (1, 5), (5, 14)):
    out, state = mamba.apply(params, u[:, b:e], state)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state[0], conv_f, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state[1], ssm_f, rtol=1e-5, atol=1e-5)
  # Causal: the outputs of the first 5 tokens do not depend on the later ones.
  changed, _ = mamba.apply(params, u.at[:, 5:].set(0.0))
  np.testing.assert_allclose(changed[:, :5], full[:, :5], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[:, 5:], full[:, 5:])


def test_mamba2_param_layout_matches_the_official_module():
  """d_model 16, expand 2, headdim 8, d_state 8: in_proj 2*32 + 2*8 + 4 outputs (z, xBC, dt)."""
  mamba = Mamba2(d_state=8, headdim=8)
  real = nn.unbox(mamba.init(jax.random.key(0), jnp.zeros((1, 3, 16)))["params"])
  shapes = jax.tree.map(lambda a: a.shape, real)
  assert shapes == {
    "in_proj": {"kernel": (16, 84)},
    "conv1d": {"kernel": (4, 48), "bias": (48,)},
    "dt_bias": (4,),
    "A_log": (4,),
    "D": (4,),
    "norm": {"scale": (32,)},
    "out_proj": {"kernel": (32, 16)},
  }
  a = -np.exp(np.asarray(real["A_log"]))
  assert np.all((a <= -1.0) & (a >= -16.0))
  dt = np.log1p(np.exp(np.asarray(real["dt_bias"])))  # softplus(dt_bias) = the initial dt
  assert np.all((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7))
