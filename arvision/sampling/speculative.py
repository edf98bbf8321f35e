"""Acceptance rules of speculative decoding for token-by-token generators (SJD, LANTERN).

Speculative Jacobi decoding (SJD; Teng et al., "Accelerating Auto-regressive Text-to-Image
Generation with Training-free Speculative Jacobi Decoding") drafts a window of future tokens,
scores them all in one model call, and keeps the longest prefix that passes the speculative
sampling test: draft `x_j`, drawn from `q_j`, is accepted with probability
`min(1, p_j(x_j) / q_j(x_j))`, where `p_j` is the model's (guided, temperature-scaled, top-k/top-p
filtered) distribution given the accepted tokens and drafts before it. At the first rejection the
token is drawn from the residual `norm(max(p_j - q_j, 0))`; if every draft passes, the call's last
distribution gives one more token. Either way each token is distributed exactly as in plain
decoding (Leviathan et al. 2023, Chen et al. 2023). Drafts come from the previous call's outputs
(the Jacobi update; `q` = the distribution they were drawn from) and, for positions no call has
seen yet, from a uniform random token with a one-hot `q` (SJD's `random` initialisation).

LANTERN (Jang et al., "LANTERN: Accelerating Visual Autoregressive Models via Relaxed Speculative
Decoding") relaxes the test with the tokenizer's latent geometry: the target `p_j` is replaced by
`p~_j`, which moves onto `x_j` the probability of `A`, the longest run of `x_j`'s `k` nearest
other codebook entries (in distance order) whose total probability is at most `delta`, so that
TV(p, p~) = p(A) <= delta. Acceptance and residual then use `p~` in place of `p`. `delta = 0` moves
nothing (`p~ = p`), which is SJD.

All functions are pure and jit-able with static shapes; `delta` may be traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DECODES = ("plain", "sjd", "lantern")


def nearest_codes(codebook_VxC: jax.Array, x_K: jax.Array, k: int) -> jax.Array:
  """int32 `[K, k]`: for each token `x`, the `k` nearest OTHER codebook entries (L2 distance in
  the tokenizer's latent space), nearest first (LANTERN's `nearest_latents[x, :k]`)."""
  V = codebook_VxC.shape[0]
  if not 1 <= k < V:
    raise ValueError(f"lantern_k={k} must be in [1, {V - 1}] (codebook of {V} entries)")
  cb = codebook_VxC.astype(jnp.float32)
  d_KxV = jnp.sum(jnp.square(cb[x_K][:, None, :] - cb[None]), axis=-1)
  d_KxV = jnp.where(jnp.arange(V)[None] == x_K[:, None], jnp.inf, d_KxV)  # not itself
  return jax.lax.top_k(-d_KxV, k)[1].astype(jnp.int32)


def lantern_relax(p_KxV: jax.Array, x_K: jax.Array, nbr_Kxk: jax.Array, delta) -> jax.Array:
  """`p~`: each row of `p` with the mass of `A` moved onto its token `x`, where `A` is the longest
  prefix of `nbr` (nearest first) whose cumulative probability is <= `delta` (official rule:
  the largest index with cumsum <= delta). Rows sum to 1 like `p`; TV(p, p~) = p(A)."""
  rows = jnp.arange(p_KxV.shape[0])[:, None]
  pn_Kxk = p_KxV[rows, nbr_Kxk]
  pooled = jnp.cumsum(pn_Kxk, axis=-1) <= delta  # a prefix: the cumsum never decreases
  moved_K = jnp.sum(jnp.where(pooled, pn_Kxk, 0.0), axis=-1)
  p = p_KxV.at[rows, nbr_Kxk].set(jnp.where(pooled, 0.0, pn_Kxk))
  return p.at[rows[:, 0], x_K].add(moved_K)


def accept_drafts(target_KxV, q_KxV, x_K, u_K):
  """The speculative test of K drafts in order.

  Args:
    target_KxV: the target distributions (`p`, or LANTERN's `p~`) at the drafts' positions.
    q_KxV: the distributions the drafts were drawn from.
    x_K: the drafts.
    u_K: uniforms in [0, 1), one per draft.

  Returns:
    `(m, residual_KxV)`: the number of leading drafts accepted (int32, 0..K), and
    `norm(max(target - q, 0))` per row (the target itself where that is all zero, which happens
    only when target == q and the draft is then accepted with probability 1).
  """
  rows = jnp.arange(x_K.shape[0])
  pt, pq = target_KxV[rows, x_K], q_KxV[rows, x_K]
  ok = u_K * pq < pt  # u < pt / pq without dividing (pq > 0: x was drawn from q)
  m = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
  res = jnp.maximum(target_KxV - q_KxV, 0.0)
  tot = jnp.sum(res, axis=-1, keepdims=True)
  res = jnp.where(tot > 0, res / jnp.where(tot > 0, tot, 1.0), target_KxV)
  return m.astype(jnp.int32), res


def categorical(rng, p_xV: jax.Array) -> jax.Array:
  """int32 draws from probability rows `p [..., V]` (zeros never drawn)."""
  logp = jnp.where(p_xV > 0, jnp.log(jnp.where(p_xV > 0, p_xV, 1.0)), -jnp.inf)
  return jax.random.categorical(rng, logp, axis=-1).astype(jnp.int32)


def check_decode(decode: str, window: int, lantern_k: int, lantern_delta) -> None:
  """Raises a ValueError naming the bad decoding option and what is accepted."""
  if decode not in DECODES:
    raise ValueError(f"decode={decode!r} is unknown; accepted: {DECODES}")
  if decode == "plain":
    return
  if isinstance(window, bool) or not isinstance(window, int) or window < 2:
    raise ValueError(f"window={window!r} must be an int >= 2 (the draft window of {decode})")
  if decode == "lantern":
    if isinstance(lantern_k, bool) or not isinstance(lantern_k, int) or lantern_k < 1:
      raise ValueError(f"lantern_k={lantern_k!r} must be a positive int (neighbours pooled)")
    if not isinstance(lantern_delta, jax.core.Tracer) and not 0.0 <= float(lantern_delta) <= 1.0:
      raise ValueError(
        f"lantern_delta={lantern_delta!r} must be in [0, 1] (a total-variation budget)"
      )
