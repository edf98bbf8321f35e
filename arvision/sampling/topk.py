"""Logit filtering and sampling: top-k, top-p (the official VAR rule), Gumbel softmax.

All functions are pure and jit-able; `top_k` and `top_p` may be traced values, so changing them
does not recompile a sampler. Guidance lives in `arvision.sampling.guidance`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_top_k_top_p(logits: jax.Array, top_k=0, top_p=0.0) -> jax.Array:
  """Sets removed entries of `logits [..., V]` to -inf (official `sample_with_top_k_top_p_`).

  top-k (k > 0): removes logits strictly below the k-th largest (ties with it are kept).
  top-p (p > 0): sorts ascending and removes entries whose cumulative softmax (of the top-k
  filtered logits) is <= 1 - p; the largest entry is always kept. k <= 0 / p <= 0 disables a rule;
  k >= V keeps everything.

  Args:
    logits: float logits, last axis the vocabulary.
    top_k: int (may be traced).
    top_p: float (may be traced).

  Returns:
    float32 logits of the same shape with -inf at removed entries.
  """
  logits = logits.astype(jnp.float32)
  V = logits.shape[-1]
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  # One ascending sort serves both rules; masking below the k-th largest keeps the order.
  order = jnp.argsort(logits, axis=-1)
  sorted_asc = jnp.take_along_axis(logits, order, axis=-1)
  kth_pos = V - jnp.clip(top_k, 1, V)
  kth = jnp.take(sorted_asc, kth_pos[None], axis=-1)  # [..., 1]
  kth = jnp.where(top_k > 0, kth, -jnp.inf)
  logits = jnp.where(logits < kth, -jnp.inf, logits)
  sorted_asc = jnp.where(sorted_asc < kth, -jnp.inf, sorted_asc)

  cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
  remove_sorted = cum <= 1.0 - top_p
  remove_sorted = remove_sorted.at[..., -1].set(False)
  remove_sorted = jnp.logical_and(remove_sorted, top_p > 0)
  inverse = jnp.argsort(order, axis=-1)
  remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
  return jnp.where(remove, -jnp.inf, logits)


def sample_top_k_top_p(rng: jax.Array, logits: jax.Array, top_k=0, top_p=0.0):
  """Samples indices from `logits [..., V]` after top-k/top-p filtering.

  Returns:
    `(idx int32 [...], filtered_logits [..., V])`.
  """
  filtered = filter_top_k_top_p(logits, top_k, top_p)
  idx = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
  return idx, filtered


def gumbel_softmax(rng: jax.Array, logits: jax.Array, tau) -> jax.Array:
  """Soft Gumbel-softmax sample `softmax((logits + g) / tau)` over the last axis (hard=False)."""
  g = jax.random.gumbel(rng, logits.shape, jnp.float32)
  return jax.nn.softmax((logits.astype(jnp.float32) + g) / tau, axis=-1)
