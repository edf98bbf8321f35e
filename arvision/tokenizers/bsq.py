"""Binary spherical quantization (BSQ) over scales: Infinity's `MultiScaleBSQ` (NHWC, JAX).

A latent vector z of d channels is l2-normalised and each channel is quantized to its sign:
`code = sign(z) / sqrt(d)` (a corner of the hypercube on the unit sphere; z == 0 gives -1). The
codebook is implicit (2^d entries), so a code is stored as its d **bits** (int32 0/1, bit 1 =
positive channel), never as an integer index (2^32 and 2^64 do not fit an int32).

Over scales (Infinity's `BitwiseSelfCorrection.flip_requant`, which is what its transformer trains
on): with `cum` the running sum of the upsampled codes (zeros at first), scale k quantizes
`area(f - cum, (h_k, w_k))` (the last scale takes `f - cum` as is), adds
`bilinear(code_k, (H, W))` to `cum`, and the transformer's input for scale k+1 is
`bilinear(cum, (h_{k+1}, w_{k+1}))`. "bilinear" is the official `F.interpolate(..., mode=
'trilinear')` on `[B, d, 1, h, w]` latents (`ops.resize.bilinear`: no antialias, also downwards).
The VAE's own training forward (`MultiScaleBSQ.forward`) has the same codes and sum; only its
unused `var_inputs` differ (area instead of bilinear). experiments/parity_bsq_official.py checks
the codes bit for bit against both official paths on the same features.

Bitwise self-correction (BSC): flipping some bits of the first scales and re-quantizing the
residual *given the flipped codes* gives a teacher input that carries the model's kind of errors
and targets that correct them (`requantize(flips=...)`, `flip_requant(rng, ...)`).

Shapes: a scale schedule is a tuple of `(h, w)` pairs, small to large (`schedule_of(patch_nums)`
turns square sides into pairs); bits of scale k are int32 `[B, h_k * w_k, d]` (row-major, the
official `bit_indices.reshape(B, -1, d)`); features are `[B, H, W, d]` float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.ops.resize import area, bilinear

Schedule = tuple[tuple[int, int], ...]


def schedule_of(patch_nums) -> Schedule:
  """`(1, 2, 4)` or `((1, 1), (2, 2), (4, 3))` -> `((1, 1), (2, 2), (4, 4))` / as given."""
  out = []
  for p in patch_nums:
    hw = (int(p), int(p)) if isinstance(p, (int,)) or getattr(p, "ndim", 1) == 0 else tuple(p)
    if len(hw) != 2 or min(hw) < 1:
      raise ValueError(f"a BSQ scale is a side or an (h, w) pair of positive ints, got {p!r}")
    out.append((int(hw[0]), int(hw[1])))
  if not out:
    raise ValueError("a BSQ scale schedule needs at least one scale")
  return tuple(out)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch `F.normalize(x, dim=-1)`: x / max(|x|, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def bits_to_codes(bits_Nxd: jax.Array) -> jax.Array:
  """Bits (0/1, any int or float dtype) [..., d] -> codes float32 [..., d], +-1/sqrt(d) (the
  official `indices_to_codes(label_type='bit_label')`: `2 b - 1` scaled, then l2-normalised)."""
  d = bits_Nxd.shape[-1]
  return (2.0 * bits_Nxd.astype(jnp.float32) - 1.0) * (d**-0.5)


def quantize(z_Nxd: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One BSQ step (`BSQ.forward` with `new_quant`): (straight-through codes float32 [..., d],
  bits int32 [..., d]). The forward value is `sign(z)/sqrt(d)` (0 -> negative); the gradient is
  that of `l2_normalize(z)`."""
  z = l2_normalize(z_Nxd.astype(jnp.float32))
  d = z.shape[-1]
  zhat = jnp.where(z > 0, 1.0, -1.0) * (d**-0.5)
  return z + jax.lax.stop_gradient(zhat - z), (z > 0).astype(jnp.int32)


def quantize_bits(z_Nxd: jax.Array) -> jax.Array:
  """Bits int32 [..., d] of features (1 where the channel is > 0)."""
  return quantize(z_Nxd)[1]


def _check_features(f_BxHxWxd: jax.Array, schedule: Schedule) -> tuple[int, int, int, int]:
  if f_BxHxWxd.ndim != 4:
    raise ValueError(f"BSQ features must be [B, H, W, d], got shape {f_BxHxWxd.shape}")
  b, h, w, d = f_BxHxWxd.shape
  if schedule[-1] != (h, w):
    raise ValueError(
      f"the last BSQ scale {schedule[-1]} must equal the latent's size {(h, w)} (scales {schedule})"
    )
  return b, h, w, d


def _check_bits(bits_list: Sequence[jax.Array], schedule: Schedule, n: int | None = None) -> None:
  n = len(schedule) if n is None else n
  if len(bits_list) != n:
    raise ValueError(f"got bits for {len(bits_list)} scales; the schedule {schedule} needs {n}")
  for (h, w), bits in zip(schedule, bits_list, strict=False):
    if bits.ndim != 3 or bits.shape[1] != h * w:
      raise ValueError(
        f"bits of scale {(h, w)} must be [B, {h * w}, d], got shape {tuple(bits.shape)}"
      )


def requantize(
  f_BxHxWxd: jax.Array,
  schedule,
  flips: Sequence[jax.Array | None] | None = None,
) -> dict[str, Any]:
  """The multi-scale residual loop, optionally with bits flipped (bitwise self-correction).

  Args:
    f_BxHxWxd: encoder features (the last scale's size).
    schedule: scale sides or (h, w) pairs, small to large.
    flips: per scale, None or a bool/int mask `[B, h*w, d]` of bits to flip after quantizing that
      scale; the flipped code is what goes into the running sum (re-quantization: later scales
      quantize the residual left by the *flipped* codes, as the official `flip_requant`).

  Returns:
    dict: `bits` (list of int32 [B, h*w, d], the quantizer's codes, the transformer's targets),
    `used_bits` (after the flips), `var_input` (float32 [B, sum_{k>=1} h_k w_k, d], the
    transformer's teacher input built from the used codes), `f_hat` ([B, H, W, d], straight-through
    sum of the used codes).
  """
  schedule = schedule_of(schedule)
  b, hh, ww, d = _check_features(f_BxHxWxd, schedule)
  f = f_BxHxWxd.astype(jnp.float32)
  flips = list(flips) if flips is not None else [None] * len(schedule)
  if len(flips) > len(schedule):
    raise ValueError(f"flips for {len(flips)} scales; the schedule has {len(schedule)}")
  flips += [None] * (len(schedule) - len(flips))
  cum = jnp.zeros_like(f)
  f_hat = jnp.zeros_like(f)
  bits_out, used_out, inputs = [], [], []
  for si, (h, w) in enumerate(schedule):
    last = si == len(schedule) - 1
    # the residual left by the codes so far; gradients reach f only here (official: the codes
    # are detached from the residual, `residual - quantized.detach()`)
    residual = f - jax.lax.stop_gradient(cum)
    z = residual if last else area(residual, (h, w))
    code, bits = quantize(z)
    bits = bits.reshape(b, h * w, d)
    used = bits
    if flips[si] is not None:
      mask = jnp.asarray(flips[si]).astype(bool).reshape(b, h * w, d)
      used = jnp.where(mask, 1 - bits, bits)
      # re-quantize: the flipped code replaces the quantizer's (value), straight-through kept
      code = code + jax.lax.stop_gradient(bits_to_codes(used).reshape(code.shape) - code)
    up = code if (h, w) == (hh, ww) else bilinear(code, (hh, ww))
    cum = cum + up
    f_hat = f_hat + up
    bits_out.append(bits)
    used_out.append(used)
    if not last:
      nh, nw = schedule[si + 1]
      inputs.append(bilinear(jax.lax.stop_gradient(cum), (nh, nw)).reshape(b, nh * nw, d))
  var_input = jnp.concatenate(inputs, axis=1) if inputs else jnp.zeros((b, 0, d), jnp.float32)
  return dict(bits=bits_out, used_bits=used_out, var_input=var_input, f_hat=f_hat)


def flip_masks(rng: jax.Array, schedule, batch: int, bits: int, layers: int, strength: float):
  """BSC's random flips (`noise_apply_layers`, `noise_apply_strength`): for each of the first
  `layers` scales a rate `p = randint(0, 100 strength + 1) / 100` (one per scale, as the official
  per-step draw), then each bit flips with probability p. Returns a list of bool masks (None for
  the scales after `layers`)."""
  schedule = schedule_of(schedule)
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"noise_apply_strength={strength}; accepted: 0 <= strength <= 1")
  out = []
  for si, (h, w) in enumerate(schedule):
    if si >= layers:
      out.append(None)
      continue
    k_rate, k_bits, rng = jax.random.split(rng, 3)
    rate = jax.random.randint(k_rate, (), 0, int(round(100 * strength)) + 1) * 0.01
    out.append(jax.random.uniform(k_bits, (batch, h * w, bits)) < rate)
  return out


def flip_requant(
  f_BxHxWxd: jax.Array, schedule, rng: jax.Array, layers: int, strength: float
) -> tuple[list[jax.Array], jax.Array]:
  """Infinity's `BitwiseSelfCorrection.flip_requant`: (target bits per scale, teacher input
  [B, L - h_0 w_0, d]) with random flips in the first `layers` scales (none when layers <= 0)."""
  schedule = schedule_of(schedule)
  b, _, _, d = _check_features(f_BxHxWxd, schedule)
  flips = flip_masks(rng, schedule, b, d, layers, strength) if layers > 0 else None
  out = requantize(f_BxHxWxd, schedule, flips)
  return out["bits"], out["var_input"]


def bits_to_fhat(bits_list: Sequence[jax.Array], schedule) -> jax.Array:
  """Bits of every scale -> the summed codes at the last scale's size [B, H, W, d] (what the
  decoder takes; the official `decode_from_indices` before the decoder)."""
  schedule = schedule_of(schedule)
  _check_bits(bits_list, schedule)
  hh, ww = schedule[-1]
  f_hat = None
  for (h, w), bits in zip(schedule, bits_list, strict=True):
    code = bits_to_codes(bits).reshape(bits.shape[0], h, w, bits.shape[-1])
    up = code if (h, w) == (hh, ww) else bilinear(code, (hh, ww))
    f_hat = up if f_hat is None else f_hat + up
  return f_hat


def bits_to_var_input(bits_list: Sequence[jax.Array], schedule) -> jax.Array:
  """Teacher forcing from known bits (no flips): float32 [B, sum_{k>=1} h_k w_k, d]. The last
  scale's bits are not used (pass all scales or all but the last)."""
  schedule = schedule_of(schedule)
  if len(bits_list) not in (len(schedule) - 1, len(schedule)):
    raise ValueError(
      f"bits_to_var_input: expected {len(schedule) - 1} or {len(schedule)} scales, got "
      f"{len(bits_list)}"
    )
  _check_bits(bits_list, schedule, len(bits_list))
  b, d = bits_list[0].shape[0], bits_list[0].shape[-1]
  hh, ww = schedule[-1]
  cum = jnp.zeros((b, hh, ww, d), jnp.float32)
  inputs = []
  for si in range(len(schedule) - 1):
    cum, nxt = next_input(si, cum, bits_list[si], schedule)
    inputs.append(nxt.reshape(b, -1, d))
  return jnp.concatenate(inputs, axis=1)


def next_input(
  si: int, cum_BxHxWxd: jax.Array, bits_Bxnxd: jax.Array, schedule
) -> tuple[jax.Array, jax.Array | None]:
  """One sampling step (Infinity's `autoregressive_infer_cfg` with a BSQ VAE): add scale `si`'s
  codes (bits [B, h*w, d] or [B, h, w, d]) to the running sum; return (new sum, the next scale's
  input [B, h', w', d]) or (sum, None) after the last scale. `si` is a Python int."""
  schedule = schedule_of(schedule)
  b, d = bits_Bxnxd.shape[0], bits_Bxnxd.shape[-1]
  h, w = schedule[si]
  hh, ww = schedule[-1]
  code = bits_to_codes(bits_Bxnxd).reshape(b, h, w, d)
  cum = cum_BxHxWxd + (code if (h, w) == (hh, ww) else bilinear(code, (hh, ww)))
  if si == len(schedule) - 1:
    return cum, None
  return cum, bilinear(cum, schedule[si + 1])


def bit_stats(bits_list: Sequence[jax.Array]) -> dict[str, jax.Array]:
  """Code-use metrics of an implicit 2^d codebook: `bit_mean` (fraction of 1s; 0.5 is balanced)
  and `bit_entropy` (mean per-bit entropy in bits over the batch; 1 is the maximum)."""
  bits = jnp.concatenate([b.reshape(-1, b.shape[-1]) for b in bits_list], axis=0)
  p = jnp.mean(bits.astype(jnp.float32), axis=0)
  q = jnp.clip(p, 1e-6, 1 - 1e-6)
  ent = -(q * jnp.log2(q) + (1 - q) * jnp.log2(1 - q))
  return dict(bit_mean=jnp.mean(p), bit_entropy=jnp.mean(jnp.where((p > 0) & (p < 1), ent, 0.0)))


class MultiScaleBSQ(nn.Module):
  """The tokenizer's quantizer module (no params): `__call__(f, train) -> (f_hat, aux)` as every
  quantizer of `tokenizers/quantizers.py`; `aux["codes"]` is the bits of every scale concatenated,
  int32 `[B, L, d]`; `aux["loss"]` is 0 (the official VAE trains BSQ with the straight-through
  estimator alone: its commitment and entropy terms are zero with `new_quant`).

  Attributes:
    bits: d, the code width (the latent's channels; the implicit codebook has 2^d codes).
    patch_nums: scale sides (or (h, w) pairs), small to large; the last = the latent's size.
  """

  bits: int
  patch_nums: Sequence[Any] = (1, 2, 4, 6, 8, 12, 16)

  @property
  def schedule(self) -> Schedule:
    return schedule_of(self.patch_nums)

  def __call__(self, f_BxHxWxd: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    if f_BxHxWxd.shape[-1] != self.bits:
      raise ValueError(
        f"MultiScaleBSQ: features have {f_BxHxWxd.shape[-1]} channels; bits is {self.bits}"
      )
    out = requantize(f_BxHxWxd, self.schedule)
    codes = jnp.concatenate(out["bits"], axis=1)
    aux = dict(loss=jnp.zeros((), jnp.float32), codes=codes, **bit_stats(out["bits"]))
    return out["f_hat"], aux
