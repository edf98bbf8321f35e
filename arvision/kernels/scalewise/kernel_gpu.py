"""Block-sparse flash attention for segment masks: a `pl.pallas_call` kernel (Triton on GPU).

Any mask spec from `arvision.ops.masks` whose visible keys form one interval per query
(`kv_range`) runs here: `full`, `causal`, `scale_causal`, `block_diagonal`, `chunk_causal`.

How the mask becomes tile skipping. Queries are cut into tiles of `block_q` rows, keys into tiles
of `block_k`. On the host (numpy, O(L)) `tile_tables` evaluates `kv_range` for every query row and
gives each q tile four kv tile indices `lo <= full_lo <= full_hi <= hi`:

- tiles `[full_lo, full_hi)` are visible to every row of the q tile: they run with no mask;
- tiles `[lo, full_lo)` and `[full_hi, hi)` are partial: they run with an in-kernel mask built from
  iota positions and the spec's `kv_range` (static segment bounds, unrolled compares);
- every other tile is invisible to the whole q tile and is never loaded.

The backward pass uses the transposed tables (for each kv tile, the q tiles that see it). The
tables reach the kernel as int32 arrays with one scalar per program (`BlockSpec((None,), ...)`).

Numerics: logits, online softmax and accumulators are float32; probabilities meet `v` in v's dtype
(as in the xla reference). The forward saves the logsumexp per row; the backward recomputes the
probabilities from it (a dq kernel over kv tiles and a dk/dv kernel over q tiles), with the usual
`delta = rowsum(dO * O)`. Rows that see no key give zeros and have lse = +inf, so their
recomputed probabilities are exactly 0 (no NaN in the gradients).

Padding: L is padded to the tile sizes internally and the head dim to a power of two >= 16 (Triton
needs power-of-two tensor shapes; zero features change no dot product). Keys at or past the real
key length are outside every `kv_range`, so padded keys are never visible to real queries; padded
query rows are computed and dropped.

Layout `[B, L, H, D]`; grouped-query attention maps query head `h` to kv head `h // (H // Hkv)`.
On CPU the kernels run in Pallas interpret mode (`interpret=None` picks it from the backend).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from arvision.kernels.common import cdiv, resolve_interpret
from arvision.ops import masks as masks_lib

DEFAULT_BLOCK = 64
_MIN_HEAD_DIM = 16


@dataclasses.dataclass(frozen=True)
class TileTables:
  """Per-tile loop bounds (all int32 numpy arrays; see the module docstring).

  Attributes:
    q_lo, q_full_lo, q_full_hi, q_hi: `[num_q_tiles]`: kv tiles of each q tile.
    k_lo, k_full_lo, k_full_hi, k_hi: `[num_k_tiles]`: q tiles that see each kv tile.
  """

  q_lo: np.ndarray
  q_full_lo: np.ndarray
  q_full_hi: np.ndarray
  q_hi: np.ndarray
  k_lo: np.ndarray
  k_full_lo: np.ndarray
  k_full_hi: np.ndarray
  k_hi: np.ndarray

  def counts(self) -> dict:
    """Numbers of (q tile, kv tile) pairs computed with and without a mask, and skipped."""
    full = int(np.sum(self.q_full_hi - self.q_full_lo))
    visited = int(np.sum(self.q_hi - self.q_lo))
    total = len(self.q_lo) * len(self.k_lo)
    return {"full": full, "partial": visited - full, "skipped": total - visited, "total": total}


def tile_tables(
  mask, q_len, kv_len, *, q_offset=0, block_q, block_k, q_len_padded=None, kv_len_padded=None
) -> TileTables:
  """Loop bounds for every q tile and every kv tile, computed on the host from `mask.kv_range`.

  Args:
    mask: a mask spec.
    q_len: real number of queries (positions `q_offset ..`); rows past it are padding.
    kv_len: real number of keys; keys past it are never visible.
    q_offset: static position of the first query.
    block_q, block_k: tile sizes.
    q_len_padded, kv_len_padded: padded lengths (multiples of the tile sizes); default: rounded up.

  Returns:
    A `TileTables`. Correct for any spec whose visible keys per query form one interval:
    `[lo, hi)` covers every visible key of every row, `[full_lo, full_hi)` holds only tiles that
    every row sees entirely.
  """
  q_len_padded = q_len_padded or cdiv(q_len, block_q) * block_q
  kv_len_padded = kv_len_padded or cdiv(kv_len, block_k) * block_k
  nq, nk = q_len_padded // block_q, kv_len_padded // block_k
  rows = np.arange(q_offset, q_offset + q_len_padded, dtype=np.int64)
  start, end = mask.kv_range(rows, kv_len)
  start = np.broadcast_to(np.asarray(start, np.int64), rows.shape)
  end = np.broadcast_to(np.asarray(end, np.int64), rows.shape)
  empty = end <= start
  # Empty rows contribute nothing to the visited hull but forbid unmasked tiles in their q tile.
  big = np.int64(1) << 40
  s_lo = np.where(empty, big, start).reshape(nq, block_q).min(1)
  e_hi = np.where(empty, -1, end).reshape(nq, block_q).max(1)
  lo = np.where(e_hi > s_lo, s_lo // block_k, 0)
  hi = np.where(e_hi > s_lo, cdiv(e_hi, block_k), 0)
  full_lo = cdiv(np.where(empty, big, start).reshape(nq, block_q).max(1), block_k)
  full_hi = np.where(empty, -1, end).reshape(nq, block_q).min(1) // block_k
  full_lo = np.clip(full_lo, lo, hi)
  full_hi = np.clip(full_hi, full_lo, hi)

  # Transposed tables: for kv tile j, the hull of q tiles visiting it and the run of q tiles that
  # see it fully. A non-contiguous pattern only shrinks the unmasked run (still exact).
  j = np.arange(nk)[:, None]
  visits = (lo[None, :] <= j) & (j < hi[None, :])  # [nk, nq]
  fully = (full_lo[None, :] <= j) & (j < full_hi[None, :])
  k_lo = np.where(visits.any(1), visits.argmax(1), 0)
  k_hi = np.where(visits.any(1), nq - visits[:, ::-1].argmax(1), 0)
  k_full_lo = np.where(fully.any(1), fully.argmax(1), k_lo)
  k_full_hi = np.where(fully.any(1), nq - fully[:, ::-1].argmax(1), k_lo)
  contiguous = np.array(
    [fully[t, k_full_lo[t] : k_full_hi[t]].all() for t in range(nk)], dtype=bool
  )
  k_full_hi = np.where(contiguous, k_full_hi, k_full_lo)
  k_full_lo = np.clip(k_full_lo, k_lo, np.maximum(k_hi, k_lo))
  k_full_hi = np.clip(k_full_hi, k_full_lo, np.maximum(k_hi, k_lo))
  as32 = lambda x: np.asarray(x, np.int32)
  return TileTables(
    as32(lo),
    as32(full_lo),
    as32(full_hi),
    as32(hi),
    as32(k_lo),
    as32(k_full_lo),
    as32(k_full_hi),
    as32(k_hi),
  )


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static arguments of one kernel call (hashable: a `nondiff_argnums` of the custom_vjp)."""

  mask: masks_lib.MaskSpec
  scale: float
  q_offset: int
  q_len: int  # real lengths (before padding)
  kv_len: int
  block_q: int
  block_k: int
  groups: int  # query heads per kv head
  interpret: bool
  num_warps: int
  num_stages: int

  @functools.cached_property
  def tables(self) -> TileTables:
    return tile_tables(
      self.mask,
      self.q_len,
      self.kv_len,
      q_offset=self.q_offset,
      block_q=self.block_q,
      block_k=self.block_k,
    )


def _compiler_params(cfg):
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415 (GPU-only import)

  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _visible(cfg, q_pos, k_pos):
  """`[bq, bk]` bool from the spec's interval per row: positions from iota + static bounds."""
  start, end = cfg.mask.kv_range(q_pos, cfg.kv_len)
  return (k_pos[None, :] >= start[:, None]) & (k_pos[None, :] < end[:, None])


def _dot(a, b, contract_a, contract_b):
  return lax.dot_general(
    a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
  )


def _scalar_spec():
  # One scalar per program from a [num_tiles] table.
  return pl.BlockSpec((None,), lambda b, h, i: (i,))


# ----------------------------------------------------------------------------------- forward


def _fwd_kernel(lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg):
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(2)
  q = q_ref[...]
  q_pos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
  dv = v_ref.shape[-1]

  def body(j, carry, masked):
    m, l, acc = carry
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s = _dot(q, k, 1, 1) * cfg.scale
    if masked:
      k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
      s = jnp.where(_visible(cfg, q_pos, k_pos), s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=1))
    # A row that has seen no key yet keeps max -inf; shift it by 0 so exp gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = alpha * l + p.sum(axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0)
    return m_new, l, acc

  carry = (
    jnp.full((bq,), -jnp.inf, jnp.float32),
    jnp.zeros((bq,), jnp.float32),
    jnp.zeros((bq, dv), jnp.float32),
  )
  lo, flo, fhi, hi = lo_ref[()], flo_ref[()], fhi_ref[()], hi_ref[()]
  carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
  m, l, acc = lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)
  seen = l > 0
  o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)


def _forward(cfg, q, k, v):
  """Padded inputs `[B, Lq_p, H, D]`, `[B, Lk_p, Hkv, D]` -> (out, lse `[B, H, Lq_p]`)."""
  b, lq_p, h, d = q.shape
  lk_p, dv = k.shape[1], v.shape[-1]
  t = cfg.tables
  g = cfg.groups
  kernel = functools.partial(_fwd_kernel, cfg=cfg)
  return pl.pallas_call(
    kernel,
    grid=(b, h, lq_p // cfg.block_q),
    in_specs=[_scalar_spec()] * 4
    + [
      pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, lk_p, None, d), lambda b, h, i: (b, 0, h // g, 0)),
      pl.BlockSpec((None, lk_p, None, dv), lambda b, h, i: (b, 0, h // g, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, cfg.block_q, None, dv), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, lq_p, h, dv), q.dtype),
      jax.ShapeDtypeStruct((b, h, lq_p), jnp.float32),
    ],
    compiler_params=_compiler_params(cfg),
    interpret=cfg.interpret,
    name="scalewise_fwd",
  )(t.q_lo, t.q_full_lo, t.q_full_hi, t.q_hi, q, k, v)


# ---------------------------------------------------------------------------------- backward


def _dq_kernel(
  lo_ref, flo_ref, fhi_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg
):
  bq, bk = cfg.block_q, cfg.block_k
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)

  def body(j, dq, masked):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s = _dot(q, k, 1, 1) * cfg.scale
    if masked:
      k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
      s = jnp.where(_visible(cfg, q_pos, k_pos), s, -jnp.inf)
    p = jnp.exp(s - lse[:, None])
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, 1, 0)

  dq = jnp.zeros(q.shape, jnp.float32)
  lo, flo, fhi, hi = lo_ref[()], flo_ref[()], fhi_ref[()], hi_ref[()]
  dq = lax.fori_loop(lo, flo, functools.partial(body, masked=True), dq)
  dq = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(fhi, hi, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
  lo_ref,
  flo_ref,
  fhi_ref,
  hi_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  cfg,
):
  bq, bk = cfg.block_q, cfg.block_k
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)

  def body(i, carry, masked):
    dk, dv = carry
    q = q_ref[pl.ds(i * bq, bq), :]
    do = do_ref[pl.ds(i * bq, bq), :]
    lse = lse_ref[pl.ds(i * bq, bq)]
    delta = delta_ref[pl.ds(i * bq, bq)]
    s = _dot(q, k, 1, 1) * cfg.scale
    if masked:
      q_pos = cfg.q_offset + i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
      s = jnp.where(_visible(cfg, q_pos, k_pos), s, -jnp.inf)
    p = jnp.exp(s - lse[:, None])  # [bq, bk]
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  lo, flo, fhi, hi = lo_ref[()], flo_ref[()], fhi_ref[()], hi_ref[()]
  carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
  dk, dv = lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg, q, k, v, out, lse, do):
  b, lq_p, h, d = q.shape
  lk_p, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = cfg.groups
  t = cfg.tables
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(q.dtype)
  common = dict(compiler_params=_compiler_params(cfg), interpret=cfg.interpret)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, cfg=cfg),
    grid=(b, h, lq_p // cfg.block_q),
    in_specs=[_scalar_spec()] * 4
    + [
      pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, lk_p, None, d), lambda b, h, i: (b, 0, h // g, 0)),
      pl.BlockSpec((None, lk_p, None, dv), lambda b, h, i: (b, 0, h // g, 0)),
      pl.BlockSpec((None, cfg.block_q, None, dv), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i)),
      pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i)),
    ],
    out_specs=pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0)),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    name="scalewise_bwd_dq",
    **common,
  )(t.q_lo, t.q_full_lo, t.q_full_hi, t.q_hi, q, k, v, do, lse, delta)
  # dk/dv per query head (grid over query heads), summed over each kv head's group below.
  dk, dv_ = pl.pallas_call(
    functools.partial(_dkv_kernel, cfg=cfg),
    grid=(b, h, lk_p // cfg.block_k),
    in_specs=[_scalar_spec()] * 4
    + [
      pl.BlockSpec((None, lq_p, None, d), lambda b, h, j: (b, 0, h, 0)),
      pl.BlockSpec((None, cfg.block_k, None, d), lambda b, h, j: (b, j, h // g, 0)),
      pl.BlockSpec((None, cfg.block_k, None, dv), lambda b, h, j: (b, j, h // g, 0)),
      pl.BlockSpec((None, lq_p, None, dv), lambda b, h, j: (b, 0, h, 0)),
      pl.BlockSpec((None, None, lq_p), lambda b, h, j: (b, h, 0)),
      pl.BlockSpec((None, None, lq_p), lambda b, h, j: (b, h, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, cfg.block_k, None, d), lambda b, h, j: (b, j, h, 0)),
      pl.BlockSpec((None, cfg.block_k, None, dv), lambda b, h, j: (b, j, h, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, lk_p, h, d), jnp.float32 if g > 1 else k.dtype),
      jax.ShapeDtypeStruct((b, lk_p, h, dv), jnp.float32 if g > 1 else v.dtype),
    ],
    name="scalewise_bwd_dkv",
    **common,
  )(t.k_lo, t.k_full_lo, t.k_full_hi, t.k_hi, q, k, v, do, lse, delta)
  if g > 1:
    dk = dk.reshape(b, lk_p, hkv, g, d).sum(3).astype(k.dtype)
    dv_ = dv_.reshape(b, lk_p, hkv, g, dv).sum(3).astype(v.dtype)
  return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_padded(cfg, q, k, v):
  return _forward(cfg, q, k, v)[0]


def _attention_fwd(cfg, q, k, v):
  out, lse = _forward(cfg, q, k, v)
  return out, (q, k, v, out, lse)


def _attention_bwd(cfg, res, do):
  return _backward(cfg, *res, do)


_attention_padded.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------ public


def _pad_axis(x, axis, size):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _head_dim_padded(d):
  return max(_MIN_HEAD_DIM, 1 << (int(d) - 1).bit_length())


def _check(q, k, v, mask, q_offset, block_q, block_k):
  if not isinstance(mask, masks_lib.MaskSpec):
    raise ValueError(f"scalewise_attention: mask must be a MaskSpec, got {mask!r}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"scalewise_attention: {name} must be [B, L, H, D], got shape {x.shape}")
  if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
    raise ValueError(
      f"scalewise_attention: incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}"
    )
  if q.shape[2] % k.shape[2]:
    raise ValueError(
      f"scalewise_attention: kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})"
    )
  if isinstance(q_offset, bool) or not isinstance(q_offset, (int, np.integer)) or q_offset < 0:
    raise ValueError(
      f"scalewise_attention: q_offset must be a static non-negative int, got {q_offset!r}"
    )
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if blk is not None and (blk < 1 or blk & (blk - 1)):
      raise ValueError(f"scalewise_attention: {name} must be a power of two, got {blk!r}")


def _default_block(length):
  return max(_MIN_HEAD_DIM, min(DEFAULT_BLOCK, 1 << (int(length) - 1).bit_length()))


def scalewise_attention(
  q,
  k,
  v,
  *,
  mask,
  scale=None,
  q_offset: int = 0,
  kv_len: int | None = None,
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
  num_warps: int = 4,
  num_stages: int = 2,
):
  """Block-sparse flash attention with a structured mask (differentiable: custom_vjp).

  Args:
    q: `[B, Lq, H, D]` queries (positions `q_offset .. q_offset + Lq - 1`).
    k: `[B, Lk, Hkv, D]` keys (positions `0 .. Lk - 1`); `Hkv` divides `H`.
    v: `[B, Lk, Hkv, Dv]` values.
    mask: a spec from `arvision.ops.masks` (static).
    scale: logit scale; None means `1 / sqrt(D)`.
    q_offset: static int position of the first query.
    kv_len: number of valid keys (keys at or past it are invisible: a preallocated KV cache);
      default `Lk`.
    block_q, block_k: tile sizes (powers of two); default min(64, L rounded up to a power of 2).
    interpret: Pallas interpret mode; None means "when the default backend is CPU".
    num_warps, num_stages: Triton compiler parameters (GPU only).

  Returns:
    `[B, Lq, H, Dv]` in q's dtype; rows that see no key are zeros.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check(q, k, v, mask, q_offset, block_q, block_k)
  b, lq, h, d = q.shape
  lk, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
  kv_len = lk if kv_len is None else int(kv_len)
  if not 1 <= kv_len <= lk:
    raise ValueError(f"scalewise_attention: kv_len must be in [1, {lk}], got {kv_len}")
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  block_q = block_q or _default_block(lq)
  block_k = block_k or _default_block(kv_len)
  interpret = resolve_interpret(interpret)
  cfg = _Config(
    mask=mask,
    scale=scale,
    q_offset=int(q_offset),
    q_len=lq,
    kv_len=kv_len,
    block_q=block_q,
    block_k=block_k,
    groups=h // hkv,
    interpret=interpret,
    num_warps=num_warps,
    num_stages=num_stages,
  )
  # Keys past kv_len are never visited: trim a long cache down to the tiles that can be read.
  lk_p = cdiv(kv_len, block_k) * block_k
  k, v = k[:, : min(lk, lk_p)], v[:, : min(lk, lk_p)]
  dp, dvp = _head_dim_padded(d), _head_dim_padded(dv)
  lq_p = cdiv(lq, block_q) * block_q
  qp = _pad_axis(_pad_axis(q, 1, lq_p), 3, dp)
  kp = _pad_axis(_pad_axis(k, 1, lk_p), 3, dp)
  vp = _pad_axis(_pad_axis(v, 1, lk_p), 3, dvp)
  out = _attention_padded(cfg, qp, kp, vp)
  return out[:, :lq, :, :dv]


def scalewise_decode(
  q,
  k_cache,
  v_cache,
  *,
  mask,
  q_offset: int,
  kv_len: int | None = None,
  scale=None,
  block_q: int | None = None,
  block_k: int | None = None,
  interpret: bool | None = None,
):
  """Decoding step: the queries of the current scale against a preallocated KV cache.

  Args:
    q: `[B, Lq, H, D]`: the current scale's queries, positions `q_offset .. q_offset + Lq - 1`.
    k_cache, v_cache: `[B, L_cache, Hkv, D]` caches holding positions `0 .. kv_len - 1`
      (this scale's keys already written); entries past `kv_len` are never read.
    mask: the mask spec of the full sequence (e.g. `scale_causal(lengths)`).
    q_offset: static start of the current scale.
    kv_len: valid cache length; default `q_offset + Lq`.
    scale, block_q, block_k, interpret: as for `scalewise_attention`.

  Returns:
    `[B, Lq, H, Dv]` in q's dtype.
  """
  kv_len = q_offset + q.shape[1] if kv_len is None else kv_len
  return scalewise_attention(
    q,
    k_cache,
    v_cache,
    mask=mask,
    scale=scale,
    q_offset=q_offset,
    kv_len=kv_len,
    block_q=block_q,
    block_k=block_k,
    interpret=interpret,
  )
