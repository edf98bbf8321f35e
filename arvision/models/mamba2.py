"""Mamba2 (`mamba_ssm.modules.mamba2.Mamba2`, Dao & Gu 2024) as a flax layer, with a state cache.

The same parameters and forward as the official module without tensor parallelism and with
`d_ssm = d_inner` (no extra gated-MLP channels), `rmsnorm=True`, `norm_before_gate=False`,
`D_has_hdim=False`, `dt_limit=(0, inf)` (its defaults; M-VAR uses them):

  z, xBC, dt = split(in_proj(u), [d_inner, d_inner + 2 G N, H])
  xBC = silu(causal depthwise conv1d(xBC))       (kernel d_conv, with bias)
  x, B, C = split(xBC, [d_inner, G N, G N])
  y = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x     (`arvision.ops.ssd`)
  out = out_proj(RMSNorm(y * silu(z)) * norm.weight)

Param names (flax -> official): `in_proj/kernel` (= `in_proj.weight`^T), `conv1d/kernel`
`[d_conv, conv_dim]` (= `conv1d.weight [conv_dim, 1, d_conv]` transposed), `conv1d/bias`,
`dt_bias`, `A_log`, `D`, `norm/scale` (= `norm.weight`), `out_proj/kernel`.

State: `(conv [B, d_conv - 1, conv_dim], ssm [B, H, P, N])`, the last d_conv - 1 conv inputs and
the SSD state. `__call__(u, state)` continues from `state` and returns the state after `u`, so a
sequence fed piece by piece gives the outputs of one full call (what the official M-VAR sampler
gets by re-running Mamba over the whole prefix).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.models.layers import trunc_normal_init
from arvision.ops.ssd import ssd_chunked
from arvision.parallel.logical import param_init
from arvision.precision import current_dtype

Mamba2State = tuple[jax.Array, jax.Array]


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """Official: dt ~ exp(U(log dt_min, log dt_max)), clamped at `floor`, stored as softplus^-1."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


def a_log_init(low: float, high: float):
  """Official: A ~ U(low, high), stored as log A (the decay is -exp(A_log))."""

  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)

  return init


def gated_rms_norm(y: jax.Array, z: jax.Array, scale: jax.Array, eps: float, groups: int = 1):
  """`mamba_ssm` `RMSNormGated(norm_before_gate=False)`: RMS-normalise `y * silu(z)` per group
  (float32), times `scale`."""
  h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
  hg = h.reshape(*h.shape[:-1], groups, h.shape[-1] // groups)
  hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + eps)
  return (hg.reshape(h.shape) * scale.astype(jnp.float32)).astype(y.dtype)


class GatedRMSNorm(nn.Module):
  """`gated_rms_norm` with its `scale` param (official `norm.weight`, ones)."""

  eps: float = 1e-5
  groups: int = 1

  @nn.compact
  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    scale = self.param("scale", param_init(nn.initializers.ones, ("mlp",)), (y.shape[-1],))
    return gated_rms_norm(y, z, scale, self.eps, self.groups)


class CausalConv1d(nn.Module):
  """Depthwise causal conv over the sequence (torch `Conv1d(groups=D, padding=W-1)` trimmed)."""

  width: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, past_BxWm1xD: jax.Array) -> jax.Array:
    D = x_BxLxD.shape[-1]
    kernel = self.param(
      "kernel", param_init(trunc_normal_init(self.init_std), (None, "mlp")), (self.width, D)
    )
    bias = self.param("bias", param_init(nn.initializers.zeros, ("mlp",)), (D,))
    full = jnp.concatenate([past_BxWm1xD.astype(x_BxLxD.dtype), x_BxLxD], axis=1)
    L = x_BxLxD.shape[1]
    # out_t = sum_k kernel[k] * x_{t - (W - 1) + k}: W shifted multiply-adds (W = 4).
    out = sum(full[:, k : k + L] * kernel[k].astype(x_BxLxD.dtype) for k in range(self.width))
    return out + bias.astype(x_BxLxD.dtype)


class Mamba2(nn.Module):
  """The Mamba2 mixer (see the module docstring).

  Attributes:
    d_state: N (M-VAR: 64). d_conv: conv width W. expand: d_inner = expand * d_model.
    headdim: P (H = d_inner / P heads). ngroups: G (B and C shared by H / G heads).
    chunk: SSD chunk length (official `chunk_size` 256; the result does not depend on it).
    init_std: trunc-normal std of `in_proj` / `out_proj` (M-VAR re-inits every Linear with it).
    conv_std: trunc-normal std of the conv kernel (M-VAR's `conv_std_or_gain` 0.02).
    a_init_range, dt_min, dt_max, dt_init_floor: the official `A_log` / `dt_bias` inits.
    norm_eps: the gated RMSNorm epsilon (official 1e-5).
  """

  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  chunk: int = 256
  init_std: float = 0.02
  conv_std: float = 0.02
  a_init_range: tuple[float, float] = (1.0, 16.0)
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  norm_eps: float = 1e-5

  def dims(self, d_model: int) -> tuple[int, int, int]:
    """`(d_inner, nheads, conv_dim)` for a model width."""
    d_inner = self.expand * d_model
    if d_inner % self.headdim:
      raise ValueError(
        f"mamba: d_inner = expand * width = {d_inner} is not divisible by headdim={self.headdim}"
      )
    nheads = d_inner // self.headdim
    if nheads % self.ngroups:
      raise ValueError(f"mamba: {nheads} heads are not divisible into ngroups={self.ngroups}")
    return d_inner, nheads, d_inner + 2 * self.ngroups * self.d_state

  def init_state(self, batch: int, d_model: int, dtype=jnp.float32) -> Mamba2State:
    """The zero state: `(conv [B, W - 1, conv_dim], ssm [B, H, P, N])` (ssm in float32)."""
    _, nheads, conv_dim = self.dims(d_model)
    conv = jnp.zeros((batch, self.d_conv - 1, conv_dim), dtype)
    return conv, jnp.zeros((batch, nheads, self.headdim, self.d_state), jnp.float32)

  @nn.compact
  def __call__(
    self, u_BxLxC: jax.Array, state: Mamba2State | None = None
  ) -> tuple[jax.Array, Mamba2State]:
    """Mixes `u` causally, continuing from `state` (zeros when None); returns `(out, state)`."""
    Bn, L, C = u_BxLxC.shape
    d_inner, H, conv_dim = self.dims(C)
    G, N, P = self.ngroups, self.d_state, self.headdim
    dtype = current_dtype()
    if state is None:
      state = self.init_state(Bn, C, u_BxLxC.dtype)
    conv_past, ssm_state = state
    tn = trunc_normal_init(self.init_std)
    zxbcdt = nn.Dense(
      2 * d_inner + 2 * G * N + H,
      use_bias=False,
      kernel_init=param_init(tn, ("embed", "mlp")),
      name="in_proj",
      dtype=dtype,
    )(u_BxLxC)
    z, xBC, dt = jnp.split(zxbcdt, [d_inner, d_inner + conv_dim], axis=-1)
    # The conv input history for the next call: the last W - 1 of (past, this call's inputs).
    history = jnp.concatenate([conv_past.astype(xBC.dtype), xBC], axis=1)
    new_conv = history[:, history.shape[1] - (self.d_conv - 1) :]
    xBC = nn.silu(CausalConv1d(self.d_conv, self.conv_std, name="conv1d")(xBC, conv_past))
    x, B, C_ = jnp.split(xBC, [d_inner, d_inner + G * N], axis=-1)

    dt_bias = self.param(
      "dt_bias",
      param_init(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), ("heads",)),
      (H,),
    )
    a_log = self.param("A_log", param_init(a_log_init(*self.a_init_range), ("heads",)), (H,))
    d_skip = self.param("D", param_init(nn.initializers.ones, ("heads",)), (H,))
    A = -jnp.exp(a_log.astype(jnp.float32))
    dt_BxLxH = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    x_BxLxHxP = x.reshape(Bn, L, H, P)
    y, new_ssm = ssd_chunked(
      x_BxLxHxP.astype(jnp.float32),
      dt_BxLxH,
      A,
      B.reshape(Bn, L, G, N),
      C_.reshape(Bn, L, G, N),
      chunk=self.chunk,
      initial_state=ssm_state,
    )
    y = y + d_skip.astype(jnp.float32)[:, None] * x_BxLxHxP.astype(jnp.float32)
    y = GatedRMSNorm(self.norm_eps, G, name="norm")(y.reshape(Bn, L, d_inner), z)
    out = nn.Dense(
      C,
      use_bias=False,
      kernel_init=param_init(tn, ("mlp", "embed")),
      name="out_proj",
      dtype=dtype,
    )(y.astype(dtype))
    return out, (new_conv, new_ssm)
