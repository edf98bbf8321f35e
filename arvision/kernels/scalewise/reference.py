"""Pure-jnp references for scale-wise attention.

- `dense_reference`: the dense-mask path (`arvision.ops.attention(impl="xla")`): einsum, the spec's
  `[Lq, Lk]` boolean mask, float32 softmax. What every kernel is tested against.
- `per_segment_reference`: no mask at all. The queries of each segment attend, unmasked, to the
  contiguous key interval the segment sees (`kv_range` is the same for every query of a segment
  for `scale_causal`, `block_diagonal` and `chunk_causal`): one small attention per segment (VAR's
  "prefix per scale"). Exact, O(sum_i n_i * end_i) work, but one op per segment.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from arvision.ops import masks as masks_lib
from arvision.ops.attention import attention


def dense_reference(q, k, v, *, mask, scale=None, q_offset=0):
  """`arvision.ops.attention(..., impl="xla")`: `[B, Lq, H, Dv]` in q's dtype."""
  return attention(q, k, v, mask=mask, impl="xla", scale=scale, q_offset=q_offset)


def segment_intervals(mask, q_len: int, kv_len: int, q_offset: int = 0):
  """`[(q_start, q_end, k_start, k_end)]`: runs of queries that share one visible key interval."""
  rows = np.arange(q_offset, q_offset + q_len, dtype=np.int64)
  start, end = mask.kv_range(rows, kv_len)
  start = np.broadcast_to(np.asarray(start, np.int64), rows.shape)
  end = np.broadcast_to(np.asarray(end, np.int64), rows.shape)
  change = np.flatnonzero((np.diff(start) != 0) | (np.diff(end) != 0)) + 1
  bounds = [0, *change.tolist(), q_len]
  return [(a, b, int(start[a]), int(end[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def per_segment_reference(q, k, v, *, mask, scale=None, q_offset: int = 0):
  """Exact masked attention as one unmasked attention per run of queries with equal key interval.

  Args:
    q: `[B, Lq, H, D]`; k, v: `[B, Lk, Hkv, D]` (GQA as in `arvision.ops.attention`).
    mask: a mask spec; q_offset: static int.
    scale: logit scale (None: `1 / sqrt(D)`).

  Returns:
    `[B, Lq, H, Dv]` in q's dtype. Fine for segment masks (a few runs); `causal` makes one run per
    query, so use it only for small L there.
  """
  if not isinstance(mask, masks_lib.MaskSpec):
    raise ValueError(f"per_segment_reference: mask must be a MaskSpec, got {mask!r}")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  outs = []
  for qa, qb, ka, kb in segment_intervals(mask, q.shape[1], k.shape[1], q_offset):
    if kb <= ka:  # nothing visible: zeros, like the dense reference
      outs.append(jnp.zeros((q.shape[0], qb - qa, q.shape[2], v.shape[-1]), q.dtype))
      continue
    outs.append(
      attention(
        q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], mask=masks_lib.full(), impl="xla", scale=scale
      )
    )
  return jnp.concatenate(outs, axis=1)
