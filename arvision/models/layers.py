"""Shared transformer layers: VAR's AdaLN self-attention block, its head norm, init helpers.

The modules mirror the official VAR code (`models/basic_var.py`) so that official weights map 1:1:
fused `mat_qkv` (no bias) plus `q_bias`/`v_bias` params and an implicit zero k bias, per-head
`scale_mul` for L2-normalised attention, a fused 6C `ada_lin`, LayerNorm without affine.

Weight layout: a torch `Linear.weight` is `[out, in]`; a flax `Dense.kernel` is `[in, out]`, so the
official "rows [2C:] of ada_lin.weight" are columns `[:, 2C:]` of our kernel.

Logical axes (`arvision.parallel.logical`): the fused `mat_qkv` kernel is `(embed, heads)` (its 3C
outputs are split contiguously; q/k/v are then constrained to `(batch, seq, heads, kv)`), `proj`
`(heads, embed)`, `fc1` `(embed, mlp)`, `fc2` `(mlp, embed)`; the AdaLN linears' 6C / 2C outputs are
named `mlp` (column-split like an FFN hidden; their `[B, 6C]` outputs are tiny to gather).

KV cache: every attention call can take a preallocated `(k, v)` cache of shape `[B, L, H, hd]`;
the current tokens' k/v are written at a static offset and the queries attend to the valid prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.models.common import Dense, add_bias
from arvision.ops.attention import attention
from arvision.parallel.logical import constrain, param_init
from arvision.precision import current_dtype
from arvision.sampling.kv_cache import KVCache, update_kv_cache


def trunc_normal_init(std: float):
  """torch `trunc_normal_(std=std)`: a normal with std `std` truncated at *absolute* +-2.

  Unlike `nn.initializers.truncated_normal` (truncation at +-2 std), torch's default bounds are the
  absolute values a=-2, b=2, which for the small stds used here is effectively an untruncated
  normal. Matching it keeps init statistics equal to the official ones.
  """

  def init(key, shape, dtype=jnp.float32):
    bound = 2.0 / std
    return (jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32) * std).astype(dtype)

  return init


def scaled_init(base, multiplier: float):
  """`base` init multiplied by a constant (the official post-init `weight.mul_(...)`)."""

  def init(key, shape, dtype=jnp.float32):
    return base(key, shape, dtype) * multiplier

  return init


def adaln_kernel_init(std: float, aln: float, alng: float, chunks: int = 6):
  """Init of the fused `[D, chunks*C]` AdaLN kernel: the first 2C outputs (gamma1, gamma2) get
  `alng`, the rest (scale1, scale2, shift1, shift2) get `aln` (official `init_weights`)."""
  base = trunc_normal_init(std)

  def init(key, shape, dtype=jnp.float32):
    w = base(key, shape, dtype)
    c = shape[-1] // chunks
    mult = jnp.concatenate([jnp.full((2 * c,), alng), jnp.full((shape[-1] - 2 * c,), aln)])
    return (w * mult).astype(dtype)

  return init


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine (torch `elementwise_affine=False`), two-pass variance like torch."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return (xc * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch `F.normalize(x, dim=-1)`: x / max(||x||, eps), the norm in float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
  return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample, rescaling kept ones by 1/keep.

  `rate` is a float, or a traced scalar (a scanned layer's rate; 0 then keeps every sample)."""
  if deterministic or (not isinstance(rate, jax.Array) and rate == 0.0):
    return x
  if rng is None:
    raise ValueError("drop_path with rate > 0 in training needs a 'dropout' rng")
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(rate: float, depth: int) -> list[float]:
  """The official linear schedule: `torch.linspace(0, rate, depth)`."""
  if depth == 1:
    return [0.0]
  return [rate * i / (depth - 1) for i in range(depth)]


class SelfAttention(nn.Module):
  """VAR `SelfAttention`: fused qkv without bias + q/v biases, optional L2-normalised q/k.

  Attributes:
    num_heads: number of heads H; head_dim = C / H.
    attn_l2_norm: L2-normalise q and k per head, multiply q by exp(clamp(scale_mul, ln 100)) and
      use softmax scale 1; otherwise the official plain scale 0.25 / sqrt(head_dim).
    depth: total number of blocks (the proj init is divided by sqrt(2 * depth)).
    init_std: std of the trunc-normal init of the Dense kernels.
    attn_impl: implementation passed to `arvision.ops.attention`.
  """

  num_heads: int
  attn_l2_norm: bool = True
  depth: int = 1
  init_std: float = 0.02
  attn_impl: str = "auto"

  @nn.compact
  def __call__(
    self,
    x_BxLxC: jax.Array,
    *,
    mask: Any,
    cache: KVCache | None = None,
    cache_index: int = 0,
  ) -> tuple[jax.Array, KVCache | None]:
    """Self-attention over `x`, or over the cache when one is given.

    Args:
      x_BxLxC: input tokens.
      mask: a mask spec from `arvision.ops.masks` (training: `scale_causal(lengths)`). With a
        cache, the spec applies to the queries at `cache_index..` against the cache prefix
        `[0, cache_index + L)` (`masks.full()` for VAR: earlier scales are all visible).
      cache: optional `(k, v)`, each `[B, Lmax, H, hd]`; this call's k/v are written at
        `cache_index` (a static int).
      cache_index: where this call's tokens sit in the full sequence.

    Returns:
      `(out_BxLxC, new_cache)`; `new_cache` is None without a cache.
    """
    B, L, C = x_BxLxC.shape
    if C % self.num_heads:
      raise ValueError(f"width {C} is not divisible by num_heads={self.num_heads}")
    H, hd = self.num_heads, C // self.num_heads
    kinit = trunc_normal_init(self.init_std)
    qkv = Dense(
      3 * C,
      use_bias=False,
      kernel_init=param_init(kinit, ("embed", "heads")),
      name="mat_qkv",
      dtype=current_dtype(),
    )(x_BxLxC)
    q_bias = self.param("q_bias", param_init(nn.initializers.zeros, ("heads",)), (C,))
    v_bias = self.param("v_bias", param_init(nn.initializers.zeros, ("heads",)), (C,))
    # The k bias is a zero buffer in the official code: not a parameter.
    qkv = add_bias(qkv, jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype))
    qkv = qkv.reshape(B, L, 3, H, hd)  # torch: view(B, L, 3, H, hd)
    qkv_names = ("batch", "seq", "heads", "kv")
    q, k, v = (constrain(qkv[:, :, i], qkv_names) for i in range(3))

    if self.attn_l2_norm:
      scale_mul_H = self.param(
        "scale_mul", param_init(nn.initializers.constant(math.log(4.0)), ("heads",)), (H,)
      )
      scale_mul_H = jnp.exp(jnp.minimum(scale_mul_H, math.log(100.0)))
      q = l2_normalize(q) * scale_mul_H[:, None].astype(q.dtype)
      k = l2_normalize(k)
      scale = 1.0
    else:
      scale = 0.25 / math.sqrt(hd)

    new_cache = None
    if cache is not None:
      new_cache = update_kv_cache(cache, k, v, cache_index)
      k_cache, v_cache = new_cache
      # Static prefix: entries past this scale are not written yet and are never read.
      k = k_cache[:, : cache_index + L].astype(q.dtype)
      v = v_cache[:, : cache_index + L].astype(q.dtype)

    out = attention(q, k, v, mask=mask, impl=self.attn_impl, scale=scale, q_offset=cache_index)
    out = constrain(out, qkv_names).reshape(B, L, C)
    proj_init = scaled_init(kinit, 1.0 / math.sqrt(2 * self.depth))
    out = Dense(
      C,
      kernel_init=param_init(proj_init, ("heads", "embed")),
      bias_init=param_init(nn.initializers.zeros, ("embed",)),
      name="proj",
      dtype=current_dtype(),
    )(out)
    return out, new_cache


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation: torch's `GELU(approximate="tanh")` formula, term by term.

  Same function as `nn.gelu(x, approximate=True)`, written out because XLA:CPU fused this form
  better inside a training step than `jax.nn`'s (a separately jitted function with `x ** 3`).
  """
  u = 0.7978845608028654 * (x + 0.044715 * (x * x * x))  # sqrt(2 / pi)
  return 0.5 * x * (1.0 + jnp.tanh(u))


def gelu_erf(x: jax.Array) -> jax.Array:
  """GELU, exact: torch's `GELU()` formula, `x / 2 * (1 + erf(x / sqrt(2)))`.

  `nn.gelu(x, approximate=False)` computes the same function through `erfc`, which XLA:CPU
  expands into a longer series than its `erf` (forward and backward slower in a training step).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


class FFN(nn.Module):
  """fc1 -> GELU(tanh) -> fc2, fc2 init divided by sqrt(2 * depth) (official `init_weights`)."""

  hidden: int
  depth: int = 1
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = x.shape[-1]
    kinit = trunc_normal_init(self.init_std)
    h = Dense(
      self.hidden,
      kernel_init=param_init(kinit, ("embed", "mlp")),
      bias_init=param_init(nn.initializers.zeros, ("mlp",)),
      name="fc1",
      dtype=current_dtype(),
    )(x)
    h = constrain(gelu_tanh(h), ("batch", "seq", "mlp"))
    fc2_init = scaled_init(kinit, 1.0 / math.sqrt(2 * self.depth))
    return Dense(
      C,
      kernel_init=param_init(fc2_init, ("mlp", "embed")),
      bias_init=param_init(nn.initializers.zeros, ("embed",)),
      name="fc2",
      dtype=current_dtype(),
    )(h)


class AdaLNSelfAttn(nn.Module):
  """VAR's `AdaLNSelfAttn` block (pre-norm, AdaLN-modulated attention and FFN).

  `gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond)` in this order (official chunk
  order); x += drop_path(attn(LN(x)(1+scale1)+shift1) * gamma1); same for the FFN with index 2.

  Attributes:
    num_heads: attention heads.
    mlp_ratio: FFN hidden = round(C * mlp_ratio).
    drop_path_rate: this block's stochastic-depth rate.
    attn_l2_norm: see `SelfAttention`.
    shared_aln: the block receives the shared AdaLN output `[B, 1, 6, C]` and adds its own
      `ada_gss` `(1, 1, 6, C)` param instead of owning an `ada_lin`.
    depth: total number of blocks (init scaling).
    init_std: std of the Dense kernels' trunc-normal init.
    aln, alng: official `init_adaln` / `init_adaln_gamma` multipliers.
    norm_eps: LayerNorm epsilon.
    attn_impl: implementation for `arvision.ops.attention`.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  attn_l2_norm: bool = True
  shared_aln: bool = False
  depth: int = 1
  init_std: float = 0.02
  aln: float = 0.5
  alng: float = 1e-5
  norm_eps: float = 1e-6
  attn_impl: str = "auto"

  @nn.compact
  def __call__(
    self,
    x_BxLxC: jax.Array,
    cond: jax.Array,
    *,
    mask: Any,
    deterministic: bool = True,
    cache: KVCache | None = None,
    cache_index: int = 0,
    layer_drop_path: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Applies the block.

    Args:
      x_BxLxC: tokens.
      cond: `[B, D]` class condition, or `[B, 1, 6, C]` shared AdaLN output when `shared_aln`.
      mask: attention mask spec (see `SelfAttention`).
      deterministic: disables drop path.
      cache, cache_index: optional KV cache (see `SelfAttention`).
      layer_drop_path: this layer's drop-path rate as a traced scalar (scanned blocks, whose
        `drop_path_rate` attribute is then the largest rate: it decides whether rngs are drawn).

    Returns:
      `(x_BxLxC, new_cache)`.
    """
    C = x_BxLxC.shape[-1]
    if self.shared_aln:
      if cond.ndim != 4 or cond.shape[1:] != (1, 6, C):
        raise ValueError(f"shared_aln block expects cond [B, 1, 6, {C}], got {cond.shape}")

      def gss_init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, dtype) / math.sqrt(C)
        mult = jnp.asarray([self.alng] * 2 + [self.aln] * 4, dtype)[None, None, :, None]
        return w * mult

      ada_gss = self.param(
        "ada_gss", param_init(gss_init, (None, None, None, "embed")), (1, 1, 6, C)
      )
      ada_Bx1x6xC = (ada_gss + cond).astype(x_BxLxC.dtype)
    else:
      ada = Dense(
        6 * C,
        kernel_init=param_init(
          adaln_kernel_init(self.init_std, self.aln, self.alng), ("embed", "mlp")
        ),
        bias_init=param_init(nn.initializers.zeros, ("mlp",)),
        name="ada_lin",
        dtype=current_dtype(),
      )(nn.silu(cond))
      ada_Bx1x6xC = ada.reshape(-1, 1, 6, C)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = [ada_Bx1x6xC[:, :, i] for i in range(6)]

    need_rng = not deterministic and self.drop_path_rate > 0
    # A traced per-layer rate only where rngs are drawn (a float 0 is a no-op without one).
    rate = layer_drop_path if need_rng and layer_drop_path is not None else self.drop_path_rate
    x_BxLxC = constrain(x_BxLxC, ("batch", "seq", "embed"))
    h = layer_norm(x_BxLxC, self.norm_eps) * (1 + scale1) + shift1
    h, new_cache = SelfAttention(
      num_heads=self.num_heads,
      attn_l2_norm=self.attn_l2_norm,
      depth=self.depth,
      init_std=self.init_std,
      attn_impl=self.attn_impl,
      name="attn",
    )(h, mask=mask, cache=cache, cache_index=cache_index)
    rng = self.make_rng("dropout") if need_rng else None
    x_BxLxC = x_BxLxC + drop_path(h * gamma1, rate, rng, deterministic)

    h = layer_norm(x_BxLxC, self.norm_eps) * (1 + scale2) + shift2
    h = FFN(hidden=round(C * self.mlp_ratio), depth=self.depth, init_std=self.init_std, name="ffn")(
      h
    )
    rng = self.make_rng("dropout") if need_rng else None
    x_BxLxC = x_BxLxC + drop_path(h * gamma2, rate, rng, deterministic)
    return constrain(x_BxLxC, ("batch", "seq", "embed")), new_cache


class AdaLNBeforeHead(nn.Module):
  """LN without affine modulated by `ada_lin = SiLU, Dense(2C)` (chunk order scale, shift)."""

  init_std: float = 0.02
  init_adaln: float = 0.5
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxLxC: jax.Array, cond_BxD: jax.Array) -> jax.Array:
    C = x_BxLxC.shape[-1]
    ada = Dense(
      2 * C,
      kernel_init=param_init(
        scaled_init(trunc_normal_init(self.init_std), self.init_adaln), ("embed", "mlp")
      ),
      bias_init=param_init(nn.initializers.zeros, ("mlp",)),
      name="ada_lin",
    )(nn.silu(cond_BxD)).reshape(-1, 1, 2, C)
    scale, shift = ada[:, :, 0], ada[:, :, 1]
    return layer_norm(x_BxLxC, self.norm_eps) * (1 + scale) + shift


def scale_lengths(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """Tokens per scale, `pn * pn`."""
  return tuple(int(pn) * int(pn) for pn in patch_nums)


__all__ = [
  "AdaLNBeforeHead",
  "AdaLNSelfAttn",
  "FFN",
  "KVCache",
  "SelfAttention",
  "adaln_kernel_init",
  "drop_path",
  "drop_path_rates",
  "layer_norm",
  "l2_normalize",
  "scale_lengths",
  "scaled_init",
  "trunc_normal_init",
]
