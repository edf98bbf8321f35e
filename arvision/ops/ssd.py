"""Mamba2's state-space duality (SSD) scan in JAX: chunked (training) and one step (reference).

The recurrence (Dao & Gu, 2024; `mamba_ssm` `Mamba2`), per head h with a scalar decay:

  a_t = exp(dt_t * A_h)                                  (A_h < 0, dt_t > 0)
  S_t = a_t * S_{t-1} + dt_t * x_t B_t^T                 (state S: [P, N])
  y_t = S_t C_t                                          ([P])

`ssd_chunked` computes it in chunks of `chunk` tokens: inside a chunk as a masked
(attention-like) matrix product, across chunks by carrying the state (a `lax.scan` over chunks),
so the cost is linear in the sequence length and every piece is a matmul. The result does not
depend on `chunk` (tests check it against the token-by-token recurrence in float64), and an
`initial_state` / returned final state let a caller continue a sequence piece by piece
(M-VAR decodes scale by scale this way).

Shapes: x `[B, L, H, P]`, dt `[B, L, H]` (already positive, e.g. softplus(dt + dt_bias)),
A `[H]`, B and C `[B, L, G, N]` with G groups shared by H / G heads each (Mamba2 `ngroups`).
The math runs in float32 (or float64 when given float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(x, dt, A, B, C):
  if x.ndim != 4 or dt.shape != x.shape[:3] or A.shape != x.shape[2:3]:
    raise ValueError(
      f"ssd: x {x.shape} must be [B, L, H, P], dt {dt.shape} [B, L, H], A {A.shape} [H]"
    )
  if B.shape != C.shape or B.ndim != 4 or B.shape[:2] != x.shape[:2]:
    raise ValueError(f"ssd: B {B.shape} and C {C.shape} must both be [B, L, G, N]")
  if x.shape[2] % B.shape[2]:
    raise ValueError(f"ssd: {x.shape[2]} heads are not divisible into {B.shape[2]} groups")


def _per_head(B_BxLxGxN: jax.Array, heads: int) -> jax.Array:
  """Groups -> heads: `[B, L, G, N]` -> `[B, L, H, N]` (head h uses group h // (H / G))."""
  return jnp.repeat(B_BxLxGxN, heads // B_BxLxGxN.shape[2], axis=2)


def _dtype(x):
  return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def ssd_chunked(
  x: jax.Array,
  dt: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  chunk: int = 256,
  initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The SSD scan over `L` tokens in chunks of `chunk`.

  Args:
    x, dt, A, B, C: see the module docstring.
    chunk: tokens per chunk (official Mamba2 `chunk_size` 256); the sequence is zero-padded to a
      multiple (padded tokens have dt = 0: no input and no decay, so the final state is exact).
    initial_state: `[B, H, P, N]` state before the first token (zeros when None).

  Returns:
    `(y [B, L, H, P], final_state [B, H, P, N])`, y in x's dtype, the state in float32/64.
  """
  _check(x, dt, A, B, C)
  if chunk < 1:
    raise ValueError(f"ssd: chunk={chunk} must be a positive int")
  Bn, L, H, P = x.shape
  N = B.shape[-1]
  f = _dtype(x)
  Q = min(chunk, L)
  n_chunks = -(-L // Q)
  pad = n_chunks * Q - L
  xs, dts = x.astype(f), dt.astype(f)
  Bh, Ch = _per_head(B, H).astype(f), _per_head(C, H).astype(f)
  if pad:
    xs, dts, Bh, Ch = (
      jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)) for t in (xs, dts, Bh, Ch)
    )

  # [B, c, Q, ...]: chunks of Q tokens.
  def chunks(t):
    return t.reshape(Bn, n_chunks, Q, *t.shape[2:])

  xs, dts, Bh, Ch = chunks(xs), chunks(dts), chunks(Bh), chunks(Ch)
  log_a = dts * A.astype(f)  # [B, c, Q, H], <= 0
  cum = jnp.cumsum(log_a, axis=2)  # within a chunk
  xdt = xs * dts[..., None]  # the discretised input dt_t x_t

  # 1. Inside a chunk: y_t += sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s.
  seg = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # [B, c, t, s, H]
  causal = jnp.tril(jnp.ones((Q, Q), bool))[None, None, :, :, None]
  # exp only where s <= t (the difference is <= 0 there; above the diagonal it could overflow).
  decay = jnp.exp(jnp.where(causal, seg, -jnp.inf))
  cb = jnp.einsum("bctgn,bcsgn->bctsg", Ch, Bh)  # [B, c, t, s, H]
  y_diag = jnp.einsum("bctsh,bcshp->bcthp", cb * decay, xdt)

  # 2. Each chunk's own contribution to the state at its end.
  to_end = jnp.exp(cum[:, :, -1:, :] - cum)  # [B, c, Q, H]
  chunk_states = jnp.einsum("bcsh,bcshn,bcshp->bchpn", to_end, Bh, xdt)  # [B, c, H, P, N]
  chunk_decay = jnp.exp(cum[:, :, -1, :])  # [B, c, H]: decay across a whole chunk

  # 3. Across chunks: the state entering chunk c (a scan over the few chunks).
  s0 = jnp.zeros((Bn, H, P, N), f) if initial_state is None else initial_state.astype(f)

  def carry(state, inp):
    decay_H, new = inp
    return decay_H[:, :, None, None] * state + new, state

  final, entering = jax.lax.scan(
    carry, s0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0))
  )
  entering = jnp.moveaxis(entering, 0, 1)  # [B, c, H, P, N]

  # 4. The entering state's share of each output: C_t . (exp(cum_t) S_in).
  y_off = jnp.einsum("bcthn,bchpn,bcth->bcthp", Ch, entering, jnp.exp(cum))
  y = (y_diag + y_off).reshape(Bn, n_chunks * Q, H, P)[:, :L]
  return y.astype(x.dtype), final


def ssd_step(
  state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One token of the recurrence (official `Mamba2.step` without the kernel).

  Args:
    state: `[B, H, P, N]`; x `[B, H, P]`; dt `[B, H]`; A `[H]`; B, C `[B, G, N]`.

  Returns:
    `(y [B, H, P], new_state)`.
  """
  f = _dtype(x)
  H = x.shape[1]
  Bh = jnp.repeat(B, H // B.shape[1], axis=1).astype(f)
  Ch = jnp.repeat(C, H // C.shape[1], axis=1).astype(f)
  dts = dt.astype(f)
  a = jnp.exp(dts * A.astype(f))
  new = a[:, :, None, None] * state.astype(f) + jnp.einsum("bh,bhn,bhp->bhpn", dts, Bh, x.astype(f))
  y = jnp.einsum("bhpn,bhn->bhp", new, Ch)
  return y.astype(x.dtype), new


def ssd_recurrent(
  x: jax.Array,
  dt: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The same scan token by token (`lax.scan` of `ssd_step`): a slow reference."""
  _check(x, dt, A, B, C)
  Bn, _, H, P = x.shape
  s0 = initial_state
  if s0 is None:
    s0 = jnp.zeros((Bn, H, P, B.shape[-1]), _dtype(x))

  def body(state, inp):
    y, state = ssd_step(state, *inp[:2], A, *inp[2:])
    return state, y

  inputs = tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C))
  final, ys = jax.lax.scan(body, s0, inputs)
  return jnp.moveaxis(ys, 0, 1), final
