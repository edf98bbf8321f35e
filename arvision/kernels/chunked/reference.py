"""Pure-jnp references for chunked attention.

Chunk-causal softmax attention is the dense `xla` path of `arvision.ops.attention` with
`masks.chunk_causal(chunk)`.

Hybrid chunk attention (ARFlow-style: softmax inside a chunk, linear attention across chunks).
The sequence `[B, L, H, D]` is cut into `n = L / C` chunks of `C` tokens; `chunk(t) = t // C`.
For a query position `t` (head `h`, logit scale `scale`, feature map `phi`, decay `gamma_h`):

    intra_t = sum_{s: chunk(s) == chunk(t)} softmax_s(scale * q_t . k_s) v_s      (bidirectional)
    inter_t = scale * sum_{s: chunk(s) < chunk(t)} gamma_h^(t - s) (phi(q_t) . phi(k_s)) v_s
    out_t   = intra_t + inter_t

- `intra` is normalised by its softmax; `inter` is not normalised (RetNet / lightning-attention
  style; models put a norm after the attention). `scale` keeps both terms on the logit scale.
- `phi`: "identity" (`phi(x) = x`) or "elu1" (`phi(x) = elu(x) + 1`, positive features).
- `gamma_h` in (0, 1] per head (None means 1: no decay). `gamma^(t - s)` decays with distance.

Recurrent form (what the kernels compute, one chunk at a time, state `S` of shape `[D, Dv]`):

    S_c        = gamma^C * S_{c-1} + sum_{j < C} gamma^(C - 1 - j) phi(k_{cC+j})^T v_{cC+j},  S_{-1} = 0
    inter_t    = scale * gamma^(i + 1) * phi(q_t) S_{c-1}      for t = cC + i

since a key `s = c'C + j` reaches query `t = cC + i` with weight
`gamma^(C(c-1-c')) * gamma^(C-1-j) * gamma^(i+1) = gamma^(t - s)`.

`hybrid_chunk_attention_reference` is the quadratic definition above (an `[L, L]` weight matrix,
for tests only); `hybrid_chunk_attention_scan` is the recurrent form as a `lax.scan` over chunks
(O(L C D) work, O(D Dv) state); the Pallas kernel's backward is the autodiff of the scan.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arvision.ops import masks as masks_lib
from arvision.ops.attention import attention

FEATURE_MAPS = ("identity", "elu1")


def feature_map(x, kind: str):
  """phi(x) in float32: "identity" or "elu1" (= elu(x) + 1)."""
  x = x.astype(jnp.float32)
  if kind == "identity":
    return x
  if kind == "elu1":
    return jax.nn.elu(x) + 1.0
  raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def check_hybrid_args(q, k, v, chunk, decay, phi):
  """Validates the hybrid attention arguments; returns (num_chunks, decay `[H]` float32)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"hybrid_chunk_attention: {name} must be [B, L, H, D], got {x.shape}")
  if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
    raise ValueError(
      f"hybrid_chunk_attention: q and k must share [B, L, H, D] and v [B, L, H]: "
      f"q {q.shape}, k {k.shape}, v {v.shape}"
    )
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
    raise ValueError(f"hybrid_chunk_attention: chunk must be a positive int, got {chunk!r}")
  length, heads = q.shape[1], q.shape[2]
  if length % chunk:
    raise ValueError(f"hybrid_chunk_attention: L={length} must be a multiple of chunk={chunk}")
  if phi not in FEATURE_MAPS:
    raise ValueError(f"hybrid_chunk_attention: phi must be one of {FEATURE_MAPS}, got {phi!r}")
  if decay is None:
    decay = jnp.ones((heads,), jnp.float32)
  else:
    decay = jnp.asarray(decay, jnp.float32)
    if decay.shape != (heads,):
      raise ValueError(
        f"hybrid_chunk_attention: decay must be None or [H]={heads} values in (0, 1], "
        f"got shape {decay.shape}"
      )
    if not isinstance(decay, jax.core.Tracer):
      bad = np.asarray(decay)
      if np.any(bad <= 0) or np.any(bad > 1):
        raise ValueError(f"hybrid_chunk_attention: decay must lie in (0, 1], got {bad}")
  return length // chunk, decay


def decay_vectors(decay_H, chunk):
  """`(q_decay [H, C], k_decay [H, C])`: gamma^(i + 1) and gamma^(C - 1 - j) (float32)."""
  i = jnp.arange(chunk, dtype=jnp.float32)
  log_g = jnp.log(decay_H)[:, None]
  return jnp.exp((i + 1.0) * log_g), jnp.exp((chunk - 1.0 - i) * log_g)


def hybrid_chunk_attention_reference(
  q, k, v, *, chunk: int, decay=None, phi="identity", scale=None
):
  """The quadratic definition (module docstring): `[B, L, H, Dv]` in q's dtype. Tests only."""
  _, decay_H = check_hybrid_args(q, k, v, chunk, decay, phi)
  length = q.shape[1]
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  intra = attention(
    q, k, v, mask=masks_lib.block_diagonal((chunk,) * (length // chunk)), impl="xla", scale=scale
  ).astype(jnp.float32)
  t = jnp.arange(length)
  earlier = (t[None, :] // chunk) < (t[:, None] // chunk)  # [t, s]
  dist = jnp.maximum(t[:, None] - t[None, :], 0).astype(jnp.float32)
  w_HxTxS = jnp.where(earlier, jnp.exp(dist * jnp.log(decay_H)[:, None, None]), 0.0)
  hi = jax.lax.Precision.HIGHEST
  a = jnp.einsum("bthd,bshd->bhts", feature_map(q, phi), feature_map(k, phi), precision=hi)
  inter = jnp.einsum("bhts,bshd->bthd", a * w_HxTxS, v.astype(jnp.float32), precision=hi)
  return (intra + scale * inter).astype(q.dtype)


def hybrid_chunk_attention_scan(q, k, v, *, chunk: int, decay=None, phi="identity", scale=None):
  """The recurrent form as a `lax.scan` over chunks (differentiable by autodiff)."""
  n, decay_H = check_hybrid_args(q, k, v, chunk, decay, phi)
  b, length, h, d = q.shape
  dv = v.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  qdec_HxC, kdec_HxC = decay_vectors(decay_H, chunk)
  hi = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  # [n, B, H, C, D]: scan over chunks.
  split = lambda x: jnp.transpose(x.reshape(b, n, chunk, h, x.shape[-1]), (1, 0, 3, 2, 4))

  def step(state_BxHxDxDv, xs):
    qc, kc, vc = xs
    s = (
      jnp.einsum("bhid,bhjd->bhij", qc, kc, precision=hi, preferred_element_type=jnp.float32)
      * scale
    )
    p = jax.nn.softmax(s, axis=-1)
    intra = jnp.einsum(
      "bhij,bhjd->bhid", p.astype(vc.dtype), vc, precision=hi, preferred_element_type=jnp.float32
    )
    fq = feature_map(qc, phi) * qdec_HxC[None, :, :, None]
    inter = jnp.einsum("bhid,bhde->bhie", fq, state_BxHxDxDv, precision=hi) * scale
    fk = feature_map(kc, phi) * kdec_HxC[None, :, :, None]
    g_c = qdec_HxC[None, :, -1, None, None]  # gamma^C
    state = g_c * state_BxHxDxDv + jnp.einsum(
      "bhjd,bhje->bhde", fk, vc.astype(jnp.float32), precision=hi
    )
    return state, intra + inter

  state0 = jnp.zeros((b, h, d, dv), jnp.float32)
  _, out = jax.lax.scan(step, state0, (split(q), split(k), split(v)))
  out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, length, h, dv)
  return out.astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# General decays: per-position query/key decays and a per-chunk state decay.
#
# The recurrent form above with its decays made inputs (float32):
#
#     S_c     = cdec_c * S_{c-1} + sum_{j < C} kdec_{cC+j} phi(k_{cC+j})^T v_{cC+j},   S_{-1} = S0
#     inter_t = scale * qdec_t * phi(q_t) S_{c-1}                                  for t in chunk c
#
# i.e. key s reaches query t (chunk(s) < chunk(t)) with weight
# `qdec_t * kdec_s * prod_{chunk(s) < c' < chunk(t)} cdec_c'`. The constant decay above is
# `qdec = gamma^(i + 1)`, `kdec = gamma^(C - 1 - j)`, `cdec = gamma^C`. ARFlow's gated retention
# (TheFllood/ARFlow `chunk_gate_retention`, per-position log-gates `g <= 0`) is
# `qdec_t = exp(sum_{j <= i} g_{cC+j})` (cumulative inside the chunk), `kdec = 1` ("remove the
# intra-chunk init decay") and `cdec_c = exp(mean_{j} g_{cC+j})`.


def gated_decays(log_gate_BxLxH, chunk: int):
  """ARFlow's decays from per-position log-gates `[B, L, H]`: `(qdec [B, L, H], kdec [B, L, H],
  cdec [B, n, H])` in float32 (module comment above)."""
  b, length, h = log_gate_BxLxH.shape
  g = log_gate_BxLxH.astype(jnp.float32).reshape(b, length // chunk, chunk, h)
  qdec = jnp.exp(jnp.cumsum(g, axis=2)).reshape(b, length, h)
  return qdec, jnp.ones_like(qdec), jnp.exp(jnp.mean(g, axis=2))


def constant_decays(decay_H, batch: int, length: int, chunk: int):
  """The constant per-head decay as general decays (`[B, L, H]`, `[B, L, H]`, `[B, n, H]`)."""
  qdec_HxC, kdec_HxC = decay_vectors(decay_H, chunk)
  n, h = length // chunk, decay_H.shape[0]
  tile = lambda d: jnp.broadcast_to(jnp.tile(d.T, (n, 1))[None], (batch, length, h))
  cdec = jnp.broadcast_to(qdec_HxC[:, -1][None, None], (batch, n, h))
  return tile(qdec_HxC), tile(kdec_HxC), cdec


def decayed_hybrid_reference(q, k, v, qdec, kdec, cdec, *, chunk: int, phi="identity", scale=None):
  """The quadratic definition with general decays (`[L, L]` weights; tests only)."""
  check_hybrid_args(q, k, v, chunk, None, phi)
  b, length, h, d = q.shape
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  intra = attention(
    q, k, v, mask=masks_lib.block_diagonal((chunk,) * (length // chunk)), impl="xla", scale=scale
  ).astype(jnp.float32)
  c_t = jnp.arange(length) // chunk
  # log prod_{chunk(s) < c' < chunk(t)} cdec_c' from a prefix sum over chunks: P[c] = sum_{c' < c}.
  log_c = jnp.log(cdec.astype(jnp.float32))  # [B, n, H]
  prefix = jnp.concatenate([jnp.zeros_like(log_c[:, :1]), jnp.cumsum(log_c, axis=1)], axis=1)
  between = prefix[:, c_t][:, :, None] - prefix[:, c_t + 1][:, None, :]  # [B, t, s, H]
  earlier = (c_t[None, :] < c_t[:, None])[None, :, :, None]
  w = jnp.where(earlier, jnp.exp(jnp.where(earlier, between, 0.0)), 0.0)
  w = w * qdec.astype(jnp.float32)[:, :, None] * kdec.astype(jnp.float32)[:, None, :]
  hi = jax.lax.Precision.HIGHEST
  a = jnp.einsum("bthd,bshd->bths", feature_map(q, phi), feature_map(k, phi), precision=hi)
  inter = jnp.einsum("bths,bshd->bthd", a * w.transpose(0, 1, 3, 2), v.astype(jnp.float32),
                     precision=hi)  # fmt: skip
  return (intra + scale * inter).astype(q.dtype)


def decayed_hybrid_scan(
  q, k, v, qdec, kdec, cdec, *, chunk: int, phi="identity", scale=None, state0=None,
  return_state: bool = False,
):  # fmt: skip
  """The recurrent form with general decays as a `lax.scan` over chunks (differentiable).

  `state0 [B, H, D, Dv]` float32 is the state entering the first chunk (None: zeros); with
  `return_state` the result is `(out, state after the last chunk)`: running chunks one call at a
  time with the state carried gives the same outputs as one call over all of them (ARFlow's
  recurrent sampling cache)."""
  n, _ = check_hybrid_args(q, k, v, chunk, None, phi)
  b, length, h, d = q.shape
  dv = v.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  hi = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  split = lambda x: jnp.transpose(x.reshape(b, n, chunk, h, x.shape[-1]), (1, 0, 3, 2, 4))
  qd, kd = (split(x.astype(jnp.float32)[..., None]) for x in (qdec, kdec))  # [n, B, H, C, 1]
  cd = jnp.transpose(cdec.astype(jnp.float32), (1, 0, 2))[..., None, None]  # [n, B, H, 1, 1]

  def step(state_BxHxDxDv, xs):
    qc, kc, vc, qdc, kdc, cdc = xs
    s = (
      jnp.einsum("bhid,bhjd->bhij", qc, kc, precision=hi, preferred_element_type=jnp.float32)
      * scale
    )
    p = jax.nn.softmax(s, axis=-1)
    intra = jnp.einsum(
      "bhij,bhjd->bhid", p.astype(vc.dtype), vc, precision=hi, preferred_element_type=jnp.float32
    )
    inter = jnp.einsum("bhid,bhde->bhie", feature_map(qc, phi) * qdc, state_BxHxDxDv, precision=hi)
    fk = feature_map(kc, phi) * kdc
    state = cdc * state_BxHxDxDv + jnp.einsum(
      "bhjd,bhje->bhde", fk, vc.astype(jnp.float32), precision=hi
    )
    return state, intra + scale * inter

  if state0 is None:
    state0 = jnp.zeros((b, h, d, dv), jnp.float32)
  state, out = jax.lax.scan(
    step, state0.astype(jnp.float32), (split(q), split(k), split(v), qd, kd, cd)
  )
  out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, length, h, dv).astype(q.dtype)
  return (out, state) if return_state else out
