"""Infinity's multi-scale BSQ (`arvision/tokenizers/bsq.py`): codes round-trip, bit flips
re-quantize (what bitwise self-correction relies on), the teacher input and sampling steps agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.tokenizers import bsq

SCHEDULE = (1, 3, 5)  # 5 -> 3 has overlapping area windows
D = 6
# jitted once per shape (eager op-by-op dispatch costs tens of CPU-seconds here)
requantize = jax.jit(bsq.requantize, static_argnums=1)
bits_to_var_input = jax.jit(bsq.bits_to_var_input, static_argnums=1)
bits_to_fhat = jax.jit(bsq.bits_to_fhat, static_argnums=1)
flip_requant = jax.jit(bsq.flip_requant, static_argnums=(1, 3, 4))


def _features(seed=0, b=2):
  return jax.random.normal(jax.random.key(seed), (b, 5, 5, D))


def _no_flips(b=2):
  # the flips argument always given (as one scale's mask), so every call reuses one compile
  return [jnp.zeros((b, 1, D), bool)]


def test_codes_round_trip_through_the_embedding():
  bits = jax.random.bernoulli(jax.random.key(0), 0.5, (64, D)).astype(jnp.int32)
  codes = bsq.bits_to_codes(bits)
  np.testing.assert_allclose(jnp.abs(codes), D**-0.5, rtol=1e-6)  # on the unit sphere
  np.testing.assert_allclose(jnp.linalg.norm(codes, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(bsq.quantize_bits(codes), bits)
  # any positive rescaling of a code is the same code; zero is the negative side (official)
  np.testing.assert_array_equal(bsq.quantize_bits(codes * 7.5), bits)
  assert int(bsq.quantize_bits(jnp.zeros((1, D))).sum()) == 0
  # encoded features round-trip too: their codes' embedding re-quantizes to the same bits
  f = _features()
  out = requantize(f, SCHEDULE, _no_flips())
  for (h, w), bits_k in zip(bsq.schedule_of(SCHEDULE), out["bits"], strict=True):
    assert bits_k.shape == (2, h * w, D) and bits_k.dtype == jnp.int32
    np.testing.assert_array_equal(bsq.quantize_bits(bsq.bits_to_codes(bits_k)), bits_k)


def test_every_single_bit_flip_requantizes_to_the_flipped_code():
  bits = jax.random.bernoulli(jax.random.key(1), 0.5, (5, D)).astype(jnp.int32)
  for j in range(D):
    flipped = bits.at[:, j].set(1 - bits[:, j])
    np.testing.assert_array_equal(bsq.quantize_bits(bsq.bits_to_codes(flipped)), flipped)


def test_flips_reach_the_teacher_input_and_later_scales_correct_them():
  f = _features(2)
  clean = requantize(f, SCHEDULE, _no_flips())
  flips = [jnp.ones((2, 1, D), bool)]  # every bit of the 1x1 scale flipped
  noisy = requantize(f, SCHEDULE, flips)
  np.testing.assert_array_equal(noisy["bits"][0], clean["bits"][0])  # the target is unchanged
  np.testing.assert_array_equal(noisy["used_bits"][0], 1 - clean["bits"][0])
  # the teacher input is built from the flipped codes ...
  np.testing.assert_allclose(
    noisy["var_input"], bits_to_var_input(noisy["used_bits"], SCHEDULE), atol=1e-6
  )
  assert not np.allclose(noisy["var_input"], clean["var_input"])
  # ... and the later targets re-quantize the residual the flipped code left
  shifted = f - jax.image.resize(
    bsq.bits_to_codes(noisy["used_bits"][0]).reshape(2, 1, 1, D), (2, 5, 5, D), "nearest"
  )
  rest = requantize(shifted, SCHEDULE[1:], [jnp.zeros((2, 9, D), bool)])
  for a, b in zip(noisy["bits"][1:], rest["bits"], strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(
    bool(jnp.any(a != b)) for a, b in zip(noisy["bits"][1:], clean["bits"][1:], strict=True)
  )
  # self-correction: the re-quantized later scales undo much of the error
  err_fixed = jnp.linalg.norm(f - bits_to_fhat(noisy["used_bits"], SCHEDULE))
  err_kept = jnp.linalg.norm(
    f - bits_to_fhat([noisy["used_bits"][0]] + clean["bits"][1:], SCHEDULE)
  )
  assert float(err_fixed) < 0.9 * float(err_kept)


def test_teacher_input_and_sampling_steps_agree_with_the_encode():
  f = _features(3)
  out = requantize(f, SCHEDULE, _no_flips())
  np.testing.assert_allclose(out["var_input"], bits_to_var_input(out["bits"], SCHEDULE), atol=1e-6)
  assert out["var_input"].shape == (2, sum(p * p for p in SCHEDULE[1:]), D)
  step = jax.jit(bsq.next_input, static_argnums=(0, 3))
  cum, parts, errors = jnp.zeros_like(f), [], []
  for si, bits in enumerate(out["bits"]):
    cum, nxt = step(si, cum, bits, SCHEDULE)
    errors.append(float(jnp.linalg.norm(f - cum)))
    if nxt is not None:
      parts.append(nxt.reshape(2, -1, D))
  assert nxt is None
  np.testing.assert_allclose(jnp.concatenate(parts, 1), out["var_input"], atol=1e-6)
  np.testing.assert_allclose(cum, bits_to_fhat(out["bits"], SCHEDULE), atol=1e-6)
  np.testing.assert_allclose(cum, out["f_hat"], atol=1e-6)
  # each scale brings the running sum closer to f: the residual loop converges
  assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors


# slow: eager random draws and one more compile (~5 CPU-s)
@pytest.mark.slow
def test_random_flips_follow_the_official_rates():
  masks = bsq.flip_masks(jax.random.key(0), SCHEDULE, 4, D, layers=2, strength=0.3)
  assert [m is None for m in masks] == [False, False, True]
  assert all(float(jnp.mean(m)) <= 0.45 for m in masks[:2])
  none = bsq.flip_masks(jax.random.key(0), SCHEDULE, 4, D, layers=5, strength=0.0)
  assert not any(bool(jnp.any(m)) for m in none)
  bits, x = flip_requant(_features(4), SCHEDULE, jax.random.key(1), 0, 0.3)
  np.testing.assert_allclose(x, bits_to_var_input(bits, SCHEDULE), atol=1e-6)
  with pytest.raises(ValueError, match="noise_apply_strength"):
    bsq.flip_masks(jax.random.key(0), SCHEDULE, 1, D, layers=1, strength=1.5)
  with pytest.raises(ValueError, match="must equal the latent"):
    requantize(_features(), (1, 2, 4))


@pytest.mark.slow  # a gradient compile (~4 CPU-s)
def test_straight_through_gradient_reaches_the_features():
  f = _features(5)
  g = jax.jit(jax.grad(lambda x: jnp.sum(bsq.requantize(x, SCHEDULE)["f_hat"] * f)))(f)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
