"""Infinity (`arvision/models/infinity.py`): the bitwise loss against a float64 definition, bitwise
self-correction (flipped bits re-quantise the later targets), cached sampling = the teacher-forced
forward, the RoPE table, and the class/text conditioning errors. Parity with the official code:
experiments/parity_infinity_official.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import config_util, families
from arvision.models import infinity as inf
from arvision.ops.resize import area, bilinear


@pytest.fixture(scope="module")
def tok_kit():
  """The smoke family (not initialised) with its BSQ tokenizer's params and a few images."""
  c = config_util.load_config_file("configs/infinity.py:smoke")
  tok = families.build(c.tokenizer.config)
  fam = families.build(c, tokenizer=tok)
  params = {"tokenizer": tok.init(jax.random.key(1))}
  images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 1), minval=-1.0, maxval=1.0)
  return fam, tok, params, images


@pytest.fixture(scope="module")
def kit(tok_kit):
  fam, tok, params, images = tok_kit
  return fam, tok, {**fam.init(jax.random.key(0)), **params}, images


def test_bit_cross_entropy_and_token_weights_are_the_float64_definitions():
  """Per token: the mean over bits of the 2-way CE (official `CrossEntropyLoss` on
  `logits.reshape(B, L, d, 2)`, `.mean(-1)`); token weights: 1/L, or the official scale
  reweighting `s_last / s` normalised to sum 1."""
  rng = np.random.default_rng(0)
  lg2, bits2 = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.integers(0, 2, (2, 3, 4))
  lsm = lg2.astype(np.float64).reshape(2, 3, 4, 2)
  lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
  want = -np.take_along_axis(lsm, bits2[..., None], -1)[..., 0].mean(-1)
  got = np.asarray(inf.bit_cross_entropy(jnp.asarray(lg2), jnp.asarray(bits2)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  pns = (1, 2, 4)
  w = np.concatenate([np.full(p * p, 4 / p) for p in pns])
  np.testing.assert_allclose(inf.token_weights(pns, True), w / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(inf.token_weights(pns, False), np.full(21, 1 / 21), rtol=1e-6)


@pytest.mark.slow
def test_family_loss_is_the_float64_definition(kit):
  """The family's loss = mean_B sum_L w_L mean_d CE_2(logits, bits) over the tokenizer's targets
  and the teacher-forced logits (no flips when not training)."""
  fam, tok, params, images = kit
  labels = jnp.asarray([0, 3, 7, 10])  # 10 = the null class
  loss, metrics = fam.loss(params, dict(image=images, label=labels), None, False)
  bits, teacher = tok.flip_requant(params["tokenizer"], images, jax.random.key(0), 0, 0.0)
  logits = np.asarray(fam.apply(params, labels, None, None, teacher), np.float64)
  gt = np.concatenate([np.asarray(b) for b in bits], axis=1)
  B, L, d = gt.shape
  lg = logits.reshape(B, L, d, 2)
  ce = np.log(np.exp(lg).sum(-1)) - np.take_along_axis(lg, gt[..., None], -1)[..., 0]
  ref = np.mean(ce.mean(-1).sum(-1) / L)
  assert abs(float(loss) - ref) < 1e-5 * max(1.0, abs(ref))
  assert abs(float(metrics["bit_acc"]) - np.mean(lg.argmax(-1) == gt)) < 1e-6


def test_self_correction_flips_requantise_the_later_targets(tok_kit):
  """With flips on scale 0 only: scale 1's teacher input is the *flipped* scale-0 code (a 1x1
  code is constant when resized), scale 0's targets stay the clean bits, and scale 1's targets
  are the BSQ bits of area(f - bilinear(flipped code), pn_1) -- computed here from the features."""
  fam, tok, params, images = tok_kit
  tp = params["tokenizer"]
  saved = fam.noise_layers, fam.noise_strength
  fam.noise_layers, fam.noise_strength = 1, 1.0
  try:
    bits, teacher = fam.flip_requant(tp, images, jax.random.key(4))
    clean_bits, clean_teacher = fam.flip_requant(tp, images, None)
  finally:
    fam.noise_layers, fam.noise_strength = saved
  pn, P, d = tok.patch_nums, tok.patch_nums[-1], tok.bits
  np.testing.assert_array_equal(np.asarray(bits[0]), np.asarray(clean_bits[0]))
  used0 = (np.asarray(teacher[:, : pn[1] ** 2]) > 0).astype(np.int32)  # [B, pn1^2, d]
  assert np.all(used0 == used0[:, :1]), "the 1x1 code is constant over scale 1"
  flipped = used0[:, 0] != np.asarray(bits[0])[:, 0]
  assert flipped.any(), "this seed flips some bits of scale 0"
  assert not np.allclose(np.asarray(teacher), np.asarray(clean_teacher))
  f = tok.encode_f(tp, images).astype(jnp.float32)
  code0 = (2.0 * used0[:, :1].reshape(-1, 1, 1, d) - 1.0) / math.sqrt(d)
  cum = bilinear(jnp.asarray(code0, jnp.float32), (P, P))
  want1 = (np.asarray(area(f - cum, (pn[1], pn[1]))) > 0).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(bits[1]), want1.reshape(want1.shape[0], -1, d))


@pytest.mark.slow
def test_cached_sampling_equals_the_teacher_forced_forward(kit):
  """Greedy, unguided sampling through the KV cache (per-scale RoPE slices, cross-attention at
  every step) gives the same logits as one teacher-forced pass over the sampled bits."""
  fam, tok, params, _ = kit
  labels = jnp.asarray([1, 5])
  _, bits, logits = fam.sample_tokens(params, labels, jax.random.key(0), cfg=1.0, top_k=1,
                                      top_p=0.0, return_logits=True)  # fmt: skip
  teacher = tok.bits_to_var_input(params["tokenizer"], bits)
  full = np.asarray(fam.apply(params, labels, None, None, teacher))
  B, d = 2, tok.bits
  for (b, e), lg, bt in zip(inf.scale_bounds(tok.patch_nums), logits, bits, strict=True):
    want = full[:, b:e].reshape(B, e - b, d, 2)
    np.testing.assert_allclose(np.asarray(lg), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(bt), want.argmax(-1))


def test_rope_tables_stretch_each_scale_onto_the_reference_grid():
  cos, sin = inf.rope_tables((1, 2, 4), 8, mode=2, grid=8)
  assert cos.shape == sin.shape == (21, 4)
  inv = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
  # scale (4x4), token (row 1, col 3): positions stretched by 8/4 -> (2, 6)
  tok = 1 + 4 + 1 * 4 + 3
  want = np.concatenate([2 * inv, 6 * inv])
  np.testing.assert_allclose(cos[tok], np.cos(want), atol=1e-6)
  np.testing.assert_allclose(sin[tok], np.sin(want), atol=1e-6)
  _, raw_sin = inf.rope_tables((1, 2, 4), 8, mode=0, grid=8)
  np.testing.assert_allclose(raw_sin[tok], np.sin(np.concatenate([1 * inv, 3 * inv])), atol=1e-6)
  with pytest.raises(ValueError, match="rope_mode=1"):
    inf.rope_tables((1, 2), 8, mode=1, grid=2)


def test_conditioning_errors_name_what_is_accepted(tok_kit):
  fam, _, params, _ = tok_kit
  with pytest.raises(ValueError, match="class-conditional"):
    fam.sample_tokens(
      params, (jnp.zeros((1, 2, 128)), jnp.ones((1,), jnp.int32)), jax.random.key(0)
    )
  with pytest.raises(ValueError, match="unknown"):
    fam.sample_tokens(params, [0], jax.random.key(0), temperature=2.0)
  with pytest.raises(ValueError, match="FFN width of 0"):
    inf.ffn_hidden(32, 4.0)
