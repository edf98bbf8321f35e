"""Attention mask specs: the structure of a mask, never a dense matrix.

A spec says which key positions a query position may see. It is a frozen, hashable dataclass, so it
can be a static argument of `jax.jit` and a key of kernel caches. Every spec answers the same
questions:

- `segment_id(idx)` and `allowed(q_idx, k_idx)`: built from integer comparisons and arithmetic
  only, so they run unchanged on Python ints, numpy arrays and traced int32 arrays (Pallas kernels
  call them on block indices).
- `kv_range(q_idx, kv_len)`: the visible keys of a query always form one interval
  `[start, end)`; kernels use it to skip blocks and bound their kv loops.
- `dense(q_len, kv_len, q_offset)`: the boolean `[q_len, kv_len]` matrix for the reference path.
- `density(q_len, ...)`: the fraction of visible (query, key) pairs, for FLOP counting.

Positions are absolute positions in the full sequence. In cached decoding the queries are positions
`q_offset .. q_offset + q_len - 1` and the keys are positions `0 .. kv_len - 1`.

`key_length(kv_len, base)` adds per-example key padding to a structural spec; it is the one spec
that holds data (an int `[B]` array) and answers with a leading batch axis.

For segment specs (`scale_causal`, `block_diagonal`) positions past `sum(lengths)` are padding:
they form one extra segment with id `len(lengths)`, so real queries never see padding keys (kernels
pad L = 680 to 768 this way) while padded query rows stay well defined and are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Stands in for "no upper bound" in `kv_range` before clipping to kv_len; fits int32.
_UNBOUNDED = 1 << 30


def _min(a, b):
  """min(a, b) with operators only (works on ints, numpy and traced arrays alike)."""
  return a - (a > b) * (a - b)


def _positive_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{field} must be a positive int, got {value!r}")
  return int(value)


class MaskSpec:
  """Base class of mask specs. Subclasses are frozen dataclasses (hashable, compared by value)."""

  kind: str = ""

  def segment_id(self, idx):
    """Segment of position(s) `idx`; ints, numpy or traced int arrays."""
    raise NotImplementedError

  def allowed(self, q_idx, k_idx):
    """Whether query position `q_idx` sees key position `k_idx` (broadcasts like `==`)."""
    raise NotImplementedError

  def kv_range(self, q_idx, kv_len: int):
    """`(start, end)`: query `q_idx` sees exactly the keys in `[start, end)` (clipped to kv_len).

    The interval may be empty (`start >= end`): a fully masked row.
    """
    raise NotImplementedError

  def segment_ids(self, length: int) -> np.ndarray:
    """int32 `[length]` segment ids of positions `0 .. length - 1`."""
    length = _positive_int(length, "length")
    return np.asarray(self.segment_id(np.arange(length, dtype=np.int32)), np.int32)

  def dense(self, q_len: int, kv_len: int | None = None, q_offset=0):
    """Boolean `[q_len, kv_len]` visibility matrix (True = the query sees the key).

    Args:
      q_len: number of queries; they are positions `q_offset .. q_offset + q_len - 1`.
      kv_len: number of keys (positions `0 .. kv_len - 1`); default `q_offset + q_len`.
      q_offset: int, or a traced int scalar (then the result is a jnp array).

    Returns:
      A numpy bool array when `q_offset` is a Python/numpy int, else a jnp bool array.
    """
    q_len = _positive_int(q_len, "q_len")
    if isinstance(q_offset, jax.Array) and not isinstance(q_offset, np.ndarray):
      if kv_len is None:
        raise ValueError("dense: kv_len is required when q_offset is a traced array")
      kv_len = _positive_int(kv_len, "kv_len")
      q = jnp.arange(q_len, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
      k = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
      return jnp.asarray(self.allowed(q, k), jnp.bool_)
    q_offset = _offset(q_offset)
    kv_len = q_offset + q_len if kv_len is None else _positive_int(kv_len, "kv_len")
    q = np.arange(q_offset, q_offset + q_len, dtype=np.int64)[:, None]
    k = np.arange(kv_len, dtype=np.int64)[None, :]
    return np.broadcast_to(np.asarray(self.allowed(q, k), bool), (q_len, kv_len))

  def visible_counts(self, q_len: int, kv_len: int | None = None, q_offset: int = 0) -> np.ndarray:
    """int64 `[q_len]`: how many keys each query sees. O(q_len), no dense matrix."""
    q_len = _positive_int(q_len, "q_len")
    q_offset = _offset(q_offset)
    kv_len = q_offset + q_len if kv_len is None else _positive_int(kv_len, "kv_len")
    q = np.arange(q_offset, q_offset + q_len, dtype=np.int64)
    start, end = self.kv_range(q, kv_len)
    return np.maximum(np.asarray(end, np.int64) - np.asarray(start, np.int64), 0)

  def density(self, q_len: int, kv_len: int | None = None, q_offset: int = 0) -> float:
    """Fraction of visible (query, key) pairs; self-attention over `q_len` tokens by default."""
    counts = self.visible_counts(q_len, kv_len, q_offset)
    kv_len = q_offset + q_len if kv_len is None else kv_len
    return float(counts.sum()) / float(q_len * kv_len)


def _offset(q_offset) -> int:
  if isinstance(q_offset, bool) or not isinstance(q_offset, (int, np.integer)) or q_offset < 0:
    raise ValueError(f"q_offset must be a non-negative int (or a traced int), got {q_offset!r}")
  return int(q_offset)


@dataclasses.dataclass(frozen=True)
class Full(MaskSpec):
  """Every query sees every key (bidirectional; MAR, class-conditional encoders)."""

  kind = "full"

  def segment_id(self, idx):
    return idx * 0

  def allowed(self, q_idx, k_idx):
    return (q_idx * 0 + k_idx * 0) == 0

  def kv_range(self, q_idx, kv_len):
    return q_idx * 0, q_idx * 0 + kv_len


@dataclasses.dataclass(frozen=True)
class Causal(MaskSpec):
  """Query `i` sees keys `<= i` (raster next-token AR; LlamaGen)."""

  kind = "causal"

  def segment_id(self, idx):
    return idx

  def allowed(self, q_idx, k_idx):
    return q_idx >= k_idx

  def kv_range(self, q_idx, kv_len):
    return q_idx * 0, _min(q_idx + 1, kv_len)


@dataclasses.dataclass(frozen=True)
class _Segments(MaskSpec):
  """Consecutive segments of the given lengths; positions past their sum are one padding segment."""

  lengths: tuple[int, ...]

  def __post_init__(self):
    lengths = self.lengths
    if isinstance(lengths, (int, np.integer)) or not hasattr(lengths, "__iter__"):
      raise ValueError(f"{self.kind}: lengths must be a sequence of positive ints, got {lengths!r}")
    lengths = tuple(_positive_int(n, f"{self.kind}: lengths[{i}]") for i, n in enumerate(lengths))
    if not lengths:
      raise ValueError(f"{self.kind}: lengths must be non-empty, got {self.lengths!r}")
    # Frozen dataclass: normalise to a tuple of Python ints so equal specs hash equal.
    object.__setattr__(self, "lengths", lengths)

  @property
  def bounds(self) -> tuple[int, ...]:
    """End position (exclusive) of each segment: the cumulative sums of `lengths`."""
    return tuple(int(b) for b in np.cumsum(self.lengths))

  @property
  def total(self) -> int:
    """Number of real (non-padding) positions."""
    return self.bounds[-1]

  def segment_id(self, idx):
    # Static, unrolled compares: works on traced int32 inside kernels. Padding gets len(lengths).
    seg = idx * 0
    for b in self.bounds:
      seg = seg + (idx >= b)
    return seg

  def _segment_start_end(self, idx):
    """Start and (unbounded for padding) end of the segment holding `idx`."""
    start = idx * 0
    end = idx * 0 + self.lengths[0]
    nxt = self.lengths[1:] + (_UNBOUNDED,)
    for b, n, nn in zip(self.bounds, self.lengths, nxt, strict=True):
      past = idx >= b
      start = start + past * n
      end = end + past * nn
    return start, end


@dataclasses.dataclass(frozen=True)
class ScaleCausal(_Segments):
  """A token of segment `i` sees every token of segments `<= i` (VAR's next-scale mask).

  For VAR, `lengths = (p * p for p in patch_nums)`, e.g. (1, 4, 9, ..., 256), L = 680.
  """

  kind = "scale_causal"

  def allowed(self, q_idx, k_idx):
    return self.segment_id(q_idx) >= self.segment_id(k_idx)

  def kv_range(self, q_idx, kv_len):
    _, end = self._segment_start_end(q_idx)
    return q_idx * 0, _min(end, kv_len)


@dataclasses.dataclass(frozen=True)
class BlockDiagonal(_Segments):
  """A token sees only the tokens of its own segment (HMAR, M-VAR intra-scale attention)."""

  kind = "block_diagonal"

  def allowed(self, q_idx, k_idx):
    return self.segment_id(q_idx) == self.segment_id(k_idx)

  def kv_range(self, q_idx, kv_len):
    start, end = self._segment_start_end(q_idx)
    return _min(start, kv_len), _min(end, kv_len)


@dataclasses.dataclass(frozen=True)
class ChunkCausal(MaskSpec):
  """Uniform segments of `chunk` tokens, causal across segments (xAR cells, ACDiT, ARFlow).

  Equals `scale_causal((chunk,) * n)` on the first `n * chunk` positions, for any length.
  """

  chunk: int
  kind = "chunk_causal"

  def __post_init__(self):
    object.__setattr__(self, "chunk", _positive_int(self.chunk, "chunk_causal: chunk"))

  def segment_id(self, idx):
    return idx // self.chunk

  def allowed(self, q_idx, k_idx):
    return q_idx // self.chunk >= k_idx // self.chunk

  def kv_range(self, q_idx, kv_len):
    return q_idx * 0, _min((q_idx // self.chunk + 1) * self.chunk, kv_len)


@dataclasses.dataclass(frozen=True, eq=False)
class KeyLength(MaskSpec):
  """`base`, and each example's keys at positions `>= kv_len[b]` hidden (key padding; MAR's
  encoder over a variable number of kept tokens).

  The only spec that carries data: `kv_len` is an int `[B]` array (traced under jit), so answers
  gain a leading batch axis (`allowed`, `kv_range`, `segment_id`: `[B, ...]`; `dense`:
  `[B, q_len, kv_len]`). It is hashable by identity (`eq=False`), never by its lengths; build it
  inside the traced function, not as a static argument.
  """

  kv_len: Any
  base: MaskSpec = Full()
  kind = "key_length"

  def __post_init__(self):
    if isinstance(self.base, KeyLength) or not isinstance(self.base, MaskSpec):
      raise ValueError(f"key_length: base must be a structural MaskSpec, got {self.base!r}")
    kv_len = self.kv_len
    if not hasattr(kv_len, "ndim") or kv_len.ndim != 1:
      raise ValueError(f"key_length: kv_len must be an int array [B], got {kv_len!r}")
    if not jnp.issubdtype(kv_len.dtype, jnp.integer):
      raise ValueError(f"key_length: kv_len must have an int dtype, got {kv_len.dtype}")

  def _lengths(self, ndim: int):
    """kv_len shaped `[B, 1, ...]` to broadcast against `ndim`-d positions."""
    return jnp.reshape(self.kv_len, (-1,) + (1,) * ndim)

  def segment_id(self, idx):
    """The base's segment ids per example; padding keys get -1."""
    idx = jnp.asarray(idx)
    return jnp.where(idx < self._lengths(idx.ndim), self.base.segment_id(idx), -1)

  def allowed(self, q_idx, k_idx):
    both = self.base.allowed(q_idx, k_idx)
    k = jnp.asarray(k_idx)
    ndim = max(jnp.ndim(both), k.ndim)
    return jnp.logical_and(both, k < self._lengths(ndim))

  def kv_range(self, q_idx, kv_len):
    start, end = self.base.kv_range(q_idx, kv_len)
    q = jnp.asarray(q_idx)
    lim = self._lengths(q.ndim)
    return start + lim * 0, _min(end, lim)

  def dense(self, q_len: int, kv_len: int | None = None, q_offset=0):
    """Boolean jnp `[B, q_len, kv_len]` (the base's matrix, padding keys cleared)."""
    base = jnp.asarray(self.base.dense(q_len, kv_len, q_offset))
    keys = jnp.arange(base.shape[-1], dtype=jnp.int32)
    return jnp.logical_and(base[None], keys[None, None, :] < self._lengths(2))

  def visible_counts(self, q_len: int, kv_len: int | None = None, q_offset: int = 0):
    """int `[B, q_len]`: how many keys each query of each example sees."""
    q = jnp.arange(q_offset, q_offset + _positive_int(q_len, "q_len"), dtype=jnp.int32)
    start, end = self.kv_range(q, q_offset + q_len if kv_len is None else kv_len)
    return jnp.maximum(end - start, 0)

  def density(self, q_len: int, kv_len: int | None = None, q_offset: int = 0) -> float:
    """Fraction of visible (query, key) pairs over the batch."""
    counts = self.visible_counts(q_len, kv_len, q_offset)
    kv_len = q_offset + q_len if kv_len is None else kv_len
    return float(jnp.sum(counts)) / float(counts.size * kv_len)


@dataclasses.dataclass(frozen=True, eq=False)
class SegmentCausal(MaskSpec):
  """`scale_causal` over per-position segment ids held as data: query `i` sees key `j` when
  `segment_ids[i] >= segment_ids[j]`.

  For a scale schedule that changes every step under one compiled program (FlexVAR trains on a
  random scale list per step, padded to a fixed length): `segment_ids` is an int `[L]` array
  (traced under jit), non-decreasing, padding given a larger id than every real segment so real
  queries never see it. Like `key_length` it carries data, so it is hashable by identity and only
  the dense `xla` path runs it (its boundaries are unknown when kernel tile tables are built).
  """

  segment_ids: Any
  kind = "segment_causal"

  def __post_init__(self):
    ids = self.segment_ids
    if not hasattr(ids, "ndim") or ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"segment_causal: segment_ids must be an int array [L], got {ids!r}")

  def segment_id(self, idx):
    return jnp.take(self.segment_ids, jnp.asarray(idx), mode="clip")

  def allowed(self, q_idx, k_idx):
    return self.segment_id(q_idx) >= self.segment_id(k_idx)

  def kv_range(self, q_idx, kv_len):
    # Non-decreasing ids: the visible keys are the prefix up to the end of the query's segment.
    end = jnp.searchsorted(self.segment_ids, self.segment_id(q_idx), side="right")
    return jnp.zeros_like(end), jnp.minimum(end, kv_len)

  def dense(self, q_len: int, kv_len: int | None = None, q_offset=0):
    """Boolean jnp `[q_len, kv_len]`."""
    kv_len = q_offset + q_len if kv_len is None else _positive_int(kv_len, "kv_len")
    q = jnp.arange(_positive_int(q_len, "q_len"), dtype=jnp.int32)[:, None] + q_offset
    return self.allowed(q, jnp.arange(kv_len, dtype=jnp.int32)[None, :])


def full() -> Full:
  """Every query sees every key."""
  return Full()


def causal() -> Causal:
  """Query position `i` sees key positions `<= i`."""
  return Causal()


def scale_causal(lengths) -> ScaleCausal:
  """Segments of the given token counts; a token of segment `i` sees segments `<= i` (VAR)."""
  return ScaleCausal(tuple(lengths) if not isinstance(lengths, (int, np.integer)) else lengths)


def block_diagonal(lengths) -> BlockDiagonal:
  """Segments of the given token counts; a token sees only its own segment."""
  return BlockDiagonal(tuple(lengths) if not isinstance(lengths, (int, np.integer)) else lengths)


def chunk_causal(chunk: int) -> ChunkCausal:
  """Uniform segments of `chunk` tokens, causal across segments."""
  return ChunkCausal(chunk)


def key_length(kv_len, base: MaskSpec | None = None) -> KeyLength:
  """`base` (default `full()`) with each example's keys past `kv_len[b]` hidden (key padding)."""
  return KeyLength(jnp.asarray(kv_len), Full() if base is None else base)


def segment_causal(segment_ids) -> SegmentCausal:
  """`scale_causal` whose segment of each position is data (an int `[L]` array): FlexVAR's
  per-step random scale lists under one compiled training step."""
  return SegmentCausal(jnp.asarray(segment_ids))
