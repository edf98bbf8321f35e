"""Quantizers: plain / l2-normalised VQ, VAR's multi-scale residual VQ, and the KL Gaussian.

Every quantizer is a linen module whose `__call__(f_BxhxwxC, train)` returns
`(f_q, aux)`: the (straight-through) quantized features that go to `post_quant_conv`, and a dict
with at least `loss` (the quantizer's training term) and, for VQ types, `codes` (int32 [B, N]),
`usage` and `perplexity` (over this batch). The generator-facing methods are called with
`module.apply({"params": params_of_quantize}, ..., method="name")`.

Codebook init follows VAR's `eini`: > 0 truncated normal with that std, < 0 uniform in
±|eini|/V (taming/LlamaGen use -1), 0 standard normal (torch's `nn.Embedding` default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision.ops.resize import area, bicubic
from arvision.parallel.logical import param_init
from arvision.tokenizers.metrics import codebook_usage

_HI = jax.lax.Precision.HIGHEST

# VAR's default 10 scales with share_quant_resi=4: the phi used at each scale (official table).
VAR_PHI_TABLE = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def codebook_init(eini: float, vocab_size: int):
  """Initializer for a [V, C] codebook with VAR's `eini` convention (see the module docstring)."""
  if eini > 0:
    return nn.initializers.truncated_normal(stddev=eini)
  if eini < 0:
    lim = abs(eini) / vocab_size

    def init(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -lim, lim)

    return init
  return nn.initializers.normal(stddev=1.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch `F.normalize(x, dim=-1)`: x / max(|x|, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def nearest_code(z_NxC: jax.Array, codebook_VxC: jax.Array) -> jax.Array:
  """argmin_v |z - e_v|^2 computed as |z|^2 + |e|^2 - 2 z.e (as the official code), int32 [N]."""
  z = jax.lax.stop_gradient(z_NxC.astype(jnp.float32))
  e = jax.lax.stop_gradient(codebook_VxC.astype(jnp.float32))
  d = (
    jnp.sum(z * z, axis=1, keepdims=True)
    + jnp.sum(e * e, axis=1)[None, :]
    - 2.0 * jnp.matmul(z, e.T, precision=_HI)
  )
  return jnp.argmin(d, axis=1).astype(jnp.int32)


class VectorQuantizer(nn.Module):
  """Single-scale VQ (taming / LlamaGen `VectorQuantizer`).

  loss = beta * |sg(zq) - z|^2 (commitment) + |zq - sg(z)|^2 (codebook); output z + sg(zq - z).
  With `l2_norm=True` (LlamaGen) z and the codebook are l2-normalised before the distance, and the
  quantized vector is the normalised entry (the straight-through output carries normalised z's
  gradient).

  Attributes:
    vocab_size: number of codes V.
    dim: code dimension C.
    beta: commitment weight.
    l2_norm: normalise z and codebook (cosine-similarity lookup).
    eini: codebook init (see module docstring).
  """

  vocab_size: int
  dim: int
  beta: float = 0.25
  l2_norm: bool = False
  eini: float = -1.0

  def setup(self):
    self.embedding = self.param(
      "embedding",
      param_init(codebook_init(self.eini, self.vocab_size), ("vocab", "latent")),
      (self.vocab_size, self.dim),
    )

  def codebook(self) -> jax.Array:
    """The [V, C] entries used for lookup (normalised when `l2_norm`)."""
    return l2_normalize(self.embedding) if self.l2_norm else self.embedding

  def embed(self, idx: jax.Array) -> jax.Array:
    """int codes [...] -> vectors [..., C]."""
    return jnp.take(self.codebook(), idx, axis=0)

  def f_to_idx(self, z_BxhxwxC: jax.Array) -> jax.Array:
    """Features -> codes int32 [B, h*w] (row-major)."""
    b, h, w, c = z_BxhxwxC.shape
    z = z_BxhxwxC.reshape(-1, c)
    if self.l2_norm:
      z = l2_normalize(z)
    return nearest_code(z, self.codebook()).reshape(b, h * w)

  def idx_to_f(self, idx_BxN: jax.Array, side: int | None = None) -> jax.Array:
    """Codes [B, h*w] -> quantized features [B, h, w, C] (square grid unless `side` given)."""
    b, n = idx_BxN.shape
    h = side or int(round(n**0.5))
    if n % h:
      raise ValueError(f"idx_to_f: {n} codes do not form a grid with side {h}")
    return self.embed(idx_BxN).reshape(b, h, n // h, self.dim)

  def __call__(self, z_BxhxwxC: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    b, h, w, c = z_BxhxwxC.shape
    if c != self.dim:
      raise ValueError(f"VectorQuantizer: input has {c} channels, codebook dim is {self.dim}")
    z = z_BxhxwxC.astype(jnp.float32)
    if self.l2_norm:
      z = l2_normalize(z)
    idx_N = nearest_code(z.reshape(-1, c), self.codebook())
    zq = self.embed(idx_N).reshape(z.shape)
    commit = self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - z))
    codebook_loss = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(z)))
    zq_st = z + jax.lax.stop_gradient(zq - z)
    aux = dict(
      loss=commit + codebook_loss,
      commit_loss=commit,
      codebook_loss=codebook_loss,
      codes=idx_N.reshape(b, h * w),
      **codebook_usage(idx_N, self.vocab_size),
    )
    return zq_st, aux


def phi_index_table(num_scales: int, share_quant_resi: int) -> tuple[int, ...]:
  """Which phi conv VAR applies at each scale, computed exactly as the official code does.

  `share_quant_resi`: 0 = one phi per scale, 1 = one shared phi, K >= 2 = K partially shared phis.
  With K phis, ticks = linspace(1/3/K, 1 - 1/3/K, K) when K == 4, else linspace(1/2/K, 1 - 1/2/K, K)
  (`PhiPartiallyShared`/`PhiNonShared`), and scale si takes argmin |ticks - si/(SN-1)| in float64.
  For 10 scales and K=4 this is (0, 0, 1, 1, 1, 2, 2, 3, 3, 3); si=2 and si=7 are near-ties decided
  by float64 rounding, so the table is computed once here, never on device.
  """
  if num_scales < 2:
    raise ValueError(f"patch_nums must have at least 2 scales for MultiScaleVQ, got {num_scales}")
  if share_quant_resi < 0:
    raise ValueError(f"share_quant_resi={share_quant_resi}; accepted: 0, 1 or K >= 2")
  if share_quant_resi == 1:
    return (0,) * num_scales
  k = num_scales if share_quant_resi == 0 else share_quant_resi
  ticks = (
    np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
  )
  return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


def num_phis(num_scales: int, share_quant_resi: int) -> int:
  return num_scales if share_quant_resi == 0 else (1 if share_quant_resi == 1 else share_quant_resi)


class Phi(nn.Module):
  """phi(h) = (1 - r) h + r conv3x3(h); params `kernel` (HWIO) and `bias` directly under the module."""

  dim: int
  resi_ratio: float = 0.5

  @nn.compact
  def __call__(self, h_BxHxWxC: jax.Array) -> jax.Array:
    kernel = self.param(
      "kernel",
      param_init(
        nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
        ("conv_h", "conv_w", "conv_in", "conv_out"),
      ),
      (3, 3, self.dim, self.dim),
    )
    bias = self.param("bias", param_init(nn.initializers.zeros, ("conv_out",)), (self.dim,))
    y = jax.lax.conv_general_dilated(
      h_BxHxWxC,
      kernel.astype(h_BxHxWxC.dtype),
      window_strides=(1, 1),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HI,
    )
    r = abs(self.resi_ratio)
    return h_BxHxWxC * (1.0 - r) + (y + bias) * r


class MultiScaleVQ(nn.Module):
  """VAR's `VectorQuantizer2`: residual quantization over scales `patch_nums` (NHWC).

  For scale si with side pn: z = area(f_rest, pn) (the last scale takes f_rest as is), idx = L2
  argmin, h = bicubic(embed(idx), H) (not at the last scale), h = phi_si(h), f_hat += h,
  f_rest -= h. Loss = mean over scales of beta*MSE(sg(f_hat), f) + MSE(f_hat, sg(f)); the output is
  straight-through, sg(f_hat - f) + f. `using_znorm` (cosine lookup) is not supported: VAR's
  released VAE has it off.

  Attributes:
    vocab_size: V. dim: Cvae.
    patch_nums: scale sides, small to large; the last must equal the latent side.
    beta: commitment weight.
    quant_resi: phi's residual ratio r (VAR 0.5); |r| <= 1e-6 makes phi the identity (no params).
    share_quant_resi: 0 non-shared, 1 shared, K partially shared (VAR 4); see `phi_index_table`.
    eini: codebook init (see module docstring).
  """

  vocab_size: int
  dim: int
  patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  beta: float = 0.25
  quant_resi: float = 0.5
  share_quant_resi: int = 4
  eini: float = 0.0

  def setup(self):
    self.embedding = self.param(
      "embedding",
      param_init(codebook_init(self.eini, self.vocab_size), ("vocab", "latent")),
      (self.vocab_size, self.dim),
    )
    self.phi_table = phi_index_table(len(self.patch_nums), self.share_quant_resi)
    if abs(self.quant_resi) > 1e-6:
      n = num_phis(len(self.patch_nums), self.share_quant_resi)
      self.quant_resi_ = [Phi(self.dim, self.quant_resi, name=f"quant_resi_{k}") for k in range(n)]
    else:
      self.quant_resi_ = []

  # ----- small pieces ---------------------------------------------------------------------------
  def codebook(self) -> jax.Array:
    return self.embedding

  def embed(self, idx: jax.Array) -> jax.Array:
    """int codes [...] -> vectors [..., C]."""
    return jnp.take(self.embedding, idx, axis=0)

  def phi(self, si: int, h_BxHxWxC: jax.Array) -> jax.Array:
    """The phi conv of scale `si` (a Python int), or the identity when quant_resi is 0."""
    if not self.quant_resi_:
      return h_BxHxWxC
    return self.quant_resi_[self.phi_table[si]](h_BxHxWxC)

  def _check(self, f_BxHxWxC: jax.Array) -> tuple[int, int, int, int]:
    b, h, w, c = f_BxHxWxC.shape
    if h != w or h != self.patch_nums[-1]:
      raise ValueError(
        f"MultiScaleVQ: latent is {h}x{w}; patch_nums[-1]={self.patch_nums[-1]} must equal its side"
      )
    if c != self.dim:
      raise ValueError(f"MultiScaleVQ: input has {c} channels, codebook dim is {self.dim}")
    return b, h, w, c

  def _h_of(self, si: int, idx_Bxpnxpn: jax.Array, side: int) -> jax.Array:
    """phi(bicubic_up(embed(idx))) for scale si; no resize at the last scale."""
    h = self.embed(idx_Bxpnxpn)
    if si != len(self.patch_nums) - 1:
      h = bicubic(h, (side, side))
    return self.phi(si, h)

  def _residual_loop(self, f_BxHxWxC: jax.Array):
    """Yields (si, idx_Bxpnxpn, f_hat after si) over the scales, gradients only via codebook/phi."""
    b, side, _, c = self._check(f_BxHxWxC)
    sn = len(self.patch_nums)
    f_rest = jax.lax.stop_gradient(f_BxHxWxC.astype(jnp.float32))
    f_hat = jnp.zeros_like(f_rest)
    for si, pn in enumerate(self.patch_nums):
      z = area(f_rest, (pn, pn)) if si != sn - 1 else f_rest
      idx = nearest_code(z.reshape(-1, c), self.embedding).reshape(b, pn, pn)
      h = self._h_of(si, idx, side)
      f_hat = f_hat + h
      f_rest = f_rest - h
      yield si, idx, f_hat

  # ----- training forward -----------------------------------------------------------------------
  def __call__(self, f_BxHxWxC: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    f = f_BxHxWxC.astype(jnp.float32)
    if self.is_initializing():  # create every phi, as the official module holds K convs even if
      for phi in self.quant_resi_:  # few scales use them (checkpoints carry all of them)
        phi(f[:1])
    f_ng = jax.lax.stop_gradient(f)
    loss = 0.0
    codes = []
    f_hat = None
    for _, idx, f_hat in self._residual_loop(f):
      codes.append(idx.reshape(idx.shape[0], -1))
      loss = loss + self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
      loss = loss + jnp.mean(jnp.square(f_hat - f_ng))
    loss = loss / len(self.patch_nums)
    codes = jnp.concatenate(codes, axis=1)
    f_hat_st = jax.lax.stop_gradient(f_hat - f) + f
    aux = dict(loss=loss, codes=codes, f_hat=f_hat, **codebook_usage(codes, self.vocab_size))
    return f_hat_st, aux

  # ----- generator-facing API -------------------------------------------------------------------
  def f_to_idx(self, f_BxHxWxC: jax.Array) -> list[jax.Array]:
    """Features -> per-scale codes, a list of int32 [B, pn*pn] (row-major), small to large."""
    return [idx.reshape(idx.shape[0], -1) for _, idx, _ in self._residual_loop(f_BxHxWxC)]

  def f_to_fhat(self, f_BxHxWxC: jax.Array) -> list[jax.Array]:
    """Features -> f_hat after each scale (the last one is the full reconstruction)."""
    return [f_hat for _, _, f_hat in self._residual_loop(f_BxHxWxC)]

  def idx_to_fhat(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """Per-scale codes [B, pn*pn] -> f_hat [B, H, W, C] (sum of phi'd upsampled embeddings)."""
    self._check_idx(idx_list)
    side = self.patch_nums[-1]
    f_hat = None
    for si, (pn, idx) in enumerate(zip(self.patch_nums, idx_list, strict=True)):
      h = self._h_of(si, idx.reshape(idx.shape[0], pn, pn), side)
      f_hat = h if f_hat is None else f_hat + h
    return f_hat

  def _check_idx(self, idx_list: Sequence[jax.Array]) -> None:
    if len(idx_list) != len(self.patch_nums):
      raise ValueError(
        f"got codes for {len(idx_list)} scales; patch_nums has {len(self.patch_nums)}"
      )
    for pn, idx in zip(self.patch_nums, idx_list, strict=True):
      if idx.shape[-1] != pn * pn:
        raise ValueError(
          f"codes of scale pn={pn} must have {pn * pn} entries, got shape {idx.shape}"
        )

  def idx_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
    """VAR teacher forcing: float32 [B, L - pn_0^2, C] from the ground-truth codes of all scales.

    For si < SN-1: f_hat += phi(bicubic(embed(idx_si), H)); emit area(f_hat, pn_{si+1}) flattened.
    Codes of the last scale are not used (they may be omitted: pass SN-1 or SN scales).
    """
    sn = len(self.patch_nums)
    if len(idx_list) not in (sn - 1, sn):
      raise ValueError(f"idx_to_var_input: expected {sn - 1} or {sn} scales, got {len(idx_list)}")
    self._check_idx(
      list(idx_list)[: sn - 1] + [jnp.zeros((1, self.patch_nums[-1] ** 2), jnp.int32)]
    )
    b = idx_list[0].shape[0]
    side = self.patch_nums[-1]
    f_hat = jnp.zeros((b, side, side, self.dim), jnp.float32)
    outs = []
    for si in range(sn - 1):
      pn = self.patch_nums[si]
      f_hat = f_hat + self._h_of(si, idx_list[si].reshape(b, pn, pn), side)
      pn_next = self.patch_nums[si + 1]
      outs.append(area(f_hat, (pn_next, pn_next)).reshape(b, pn_next * pn_next, self.dim))
    return jnp.concatenate(outs, axis=1)

  def next_input(
    self, si: int, f_hat_BxHxWxC: jax.Array, h_BxpnxpnxC: jax.Array
  ) -> tuple[jax.Array, jax.Array | None]:
    """One autoregressive step (VAR's `get_next_autoregressive_input`).

    Args:
      si: the scale just sampled (Python int).
      f_hat_BxHxWxC: the running f_hat (zeros before scale 0).
      h_BxpnxpnxC: embeddings of the codes sampled at scale si.

    Returns:
      (new f_hat, area(f_hat, pn_{si+1}) [B, pn_next, pn_next, C]), or (f_hat, None) at the last.
    """
    side = f_hat_BxHxWxC.shape[1]
    sn = len(self.patch_nums)
    if si != sn - 1:
      f_hat = f_hat_BxHxWxC + self.phi(si, bicubic(h_BxpnxpnxC.astype(jnp.float32), (side, side)))
      pn_next = self.patch_nums[si + 1]
      return f_hat, area(f_hat, (pn_next, pn_next))
    return f_hat_BxHxWxC + self.phi(si, h_BxpnxpnxC.astype(jnp.float32)), None


def gaussian_moments(moments_BxhxwxC2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """KL moments -> (mean, logvar), logvar clipped to [-30, 20] (LDM/MAR)."""
  mean, logvar = jnp.split(moments_BxhxwxC2.astype(jnp.float32), 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def gaussian_sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent dims, per example [B]."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


class DiagonalGaussian(nn.Module):
  """KL "quantizer" (MAR/LDM `DiagonalGaussianDistribution`): no params.

  `__call__(moments, train)` samples the posterior when `train` (rng stream "sample") and takes the
  mode otherwise. `aux["loss"]` is the batch-mean KL summed over latent dims (LDM convention; the
  family multiplies it by `loss.kl_weight`). The latent `scale_factor` (MAR 0.2325) is applied by the
  family's `encode_latent`/`decode_latent`, not here.
  """

  @nn.compact
  def __call__(self, moments: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    mean, logvar = gaussian_moments(moments)
    z = gaussian_sample(mean, logvar, self.make_rng("sample")) if train else mean
    kl = jnp.mean(gaussian_kl(mean, logvar))
    return z, dict(loss=kl, kl=kl, mean=mean, logvar=logvar)
