"""Preallocated, static-shape KV caches for jitted decoding.

A cache is a `(k, v)` pair of `[B, Lmax, H, hd]` arrays per layer. Decoding writes each step's k/v
at a static offset with `lax.dynamic_update_slice`, so shapes never change between steps and a
whole decode loop compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KVCache = tuple[jax.Array, jax.Array]


def init_kv_caches(
  num_layers: int, batch: int, length: int, num_heads: int, head_dim: int, dtype=jnp.float32
) -> list[KVCache]:
  """Zero caches for `num_layers` attention layers, each `(k, v)` of `[batch, length, H, hd]`."""
  for name, val in (
    ("num_layers", num_layers),
    ("batch", batch),
    ("length", length),
    ("num_heads", num_heads),
    ("head_dim", head_dim),
  ):
    if int(val) <= 0:
      raise ValueError(f"init_kv_caches: {name}={val} must be a positive int")
  shape = (batch, length, num_heads, head_dim)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def update_kv_cache(
  cache: KVCache, k_BxLxHxD: jax.Array, v_BxLxHxD: jax.Array, index: int
) -> KVCache:
  """Writes `k`/`v` (this step's tokens) into `cache` at sequence position `index`."""
  k_cache, v_cache = cache
  L = k_BxLxHxD.shape[1]
  if k_cache.shape[0] != k_BxLxHxD.shape[0] or k_cache.shape[2:] != k_BxLxHxD.shape[2:]:
    raise ValueError(
      f"KV cache shape {k_cache.shape} does not match new keys {k_BxLxHxD.shape} "
      "(expected the same batch, heads and head_dim)"
    )
  if isinstance(index, int) and not 0 <= index <= k_cache.shape[1] - L:
    raise ValueError(f"cache index={index} + {L} tokens exceed the cache length {k_cache.shape[1]}")
  k_cache = jax.lax.dynamic_update_slice(k_cache, k_BxLxHxD.astype(k_cache.dtype), (0, index, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v_BxLxHxD.astype(v_cache.dtype), (0, index, 0, 0))
  return k_cache, v_cache
