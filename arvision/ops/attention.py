"""One attention call for every model, with the mask given as a spec (`arvision.ops.masks`).

`attention(q, k, v, mask=spec, impl=...)` picks an implementation:

- `"xla"`: the reference. einsum, the spec's dense boolean mask, float32 softmax. Supports
  every spec, dtype and backend; every kernel is tested against it (forward and gradients).
  Segment masks (`scale_causal`, `block_diagonal`) run per group of query segments against the
  keys each group sees (`_query_groups`), the same math as the one dense pass.
- `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")`, only where the spec needs no
  dense bias (`full`, or `causal` with aligned queries and keys, either with per-example key
  padding `key_length`), in bf16/fp16 on a GPU.
- `"pallas"`: the block-sparse scale-wise Pallas kernel (`arvision.kernels.scalewise`): tile
  skipping from the spec, Triton on GPU, Pallas interpret mode on CPU (correct, not fast).
- `"splash"`: splash attention with a computable mask from the spec (TPU; interpret mode on CPU).
- `"auto"`: CPU -> xla; GPU -> cudnn where supported, else pallas; TPU -> splash. A fast backend
  never gets a dense L x L mask from auto; only a traced `q_offset` (cached decoding with a
  dynamic position, whose mask is `[Lq, Lk]` with small Lq) falls back to xla there.

Layouts are `[B, L, H, D]` (batch, sequence, heads, head dim). Grouped-query attention: with `Hkv`
kv heads, query head `h` uses kv head `h // (H // Hkv)` (PyTorch `repeat_interleave` order).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arvision.ops import masks as masks_lib
from arvision.target import backend, target_backend  # noqa: F401 (target_backend: re-exported)

IMPLS = ("auto", "xla", "cudnn", "pallas", "splash")

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Hopper's limit; older GPUs allow 128 and jax raises its own error there.
_CUDNN_MAX_HEAD_DIM = 256

SUPPORTS = {
  "xla": "every mask spec, any float dtype, any backend (dense [Lq, Lk] mask; the reference)",
  "cudnn": (
    "masks full, and causal with Lq == Lk and q_offset == 0, each optionally inside key_length; "
    "bf16/fp16 q, k, v of one dtype; "
    f"head dim a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, equal for q and v; GPU backend"
  ),
  "pallas": (
    "every structural mask spec (not key_length); static int q_offset; float dtypes; GPU (Triton; head dim <= 256) or CPU "
    "(interpret mode)"
  ),
  "splash": "every structural mask spec (not key_length); static int q_offset; float dtypes; TPU or CPU (interpret mode)",
}


def _check_inputs(q, k, v, mask, scale):
  if not isinstance(mask, masks_lib.MaskSpec):
    raise ValueError(
      f"attention: mask must be a MaskSpec from arvision.ops.masks (full(), causal(), "
      f"scale_causal(lengths), block_diagonal(lengths), chunk_causal(chunk), "
      f"key_length(kv_len, base)), got {mask!r}"
    )
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"attention: {name} must be [B, L, H, D], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"attention: {name} must have a float dtype, got {x.dtype}")
  b, _, h, d = q.shape
  bk, lk, hkv, dk = k.shape
  if bk != b or v.shape[0] != b:
    raise ValueError(f"attention: batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
  if v.shape[1] != lk or v.shape[2] != hkv:
    raise ValueError(f"attention: k and v must share [B, Lk, Hkv]: k {k.shape}, v {v.shape}")
  if dk != d:
    raise ValueError(f"attention: q and k head dims differ: q {q.shape}, k {k.shape}")
  if hkv < 1 or h % hkv:
    raise ValueError(
      f"attention: kv heads ({hkv}) must divide query heads ({h}) for grouped-query attention"
    )
  if isinstance(mask, masks_lib.KeyLength) and mask.kv_len.shape != (b,):
    raise ValueError(
      f"attention: key_length kv_len must be [B={b}] (one length per example), got "
      f"{mask.kv_len.shape}"
    )
  if scale is not None and not isinstance(scale, (int, float, np.floating, jax.Array)):
    raise ValueError(f"attention: scale must be a float or None (1/sqrt(D)), got {scale!r}")


def _static_offset(q_offset):
  """The offset as an int, or None when it is a traced value."""
  if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
    if q_offset < 0:
      raise ValueError(f"attention: q_offset must be >= 0, got {q_offset}")
    return int(q_offset)
  if isinstance(q_offset, jax.Array) and q_offset.ndim == 0:
    if jnp.issubdtype(q_offset.dtype, jnp.integer):
      return None
  raise ValueError(
    f"attention: q_offset must be a non-negative int or int scalar, got {q_offset!r}"
  )


def unsupported_reason(impl: str, q, k, v, *, mask, q_offset=0) -> str | None:
  """Why `impl` cannot run this call, or None when it can. See `SUPPORTS`.

  Args:
    impl: one of `IMPLS` other than "auto".
    q, k, v, mask, q_offset: as for `attention` (only shapes and dtypes are read).
  """
  if impl == "xla":
    return None
  if impl in ("pallas", "splash"):
    if isinstance(mask, masks_lib.KeyLength):
      return f"{impl} has no per-example key lengths (key_length); its tile tables are one per call"
    if isinstance(mask, masks_lib.SegmentCausal):
      return f"{impl} needs static segment boundaries; segment_causal holds them as data"
    return _kernel_unsupported_reason(impl, q, q_offset)
  if impl != "cudnn":
    raise ValueError(f"attention: impl must be one of {IMPLS[1:]}, got {impl!r}")
  if isinstance(mask, masks_lib.KeyLength):
    mask = mask.base  # cuDNN takes the lengths as `key_value_seq_lengths`
  if not isinstance(mask, (masks_lib.Full, masks_lib.Causal)):
    return (
      f"mask {mask!r} needs a dense bias in cuDNN (no tile skipping); cudnn supports full and "
      "causal masks only"
    )
  if isinstance(mask, masks_lib.Causal):
    offset = _static_offset(q_offset)
    if offset != 0 or q.shape[1] != k.shape[1]:
      return (
        f"causal in cuDNN needs aligned queries and keys (Lq == Lk and q_offset == 0), got "
        f"Lq={q.shape[1]}, Lk={k.shape[1]}, q_offset={q_offset!r}"
      )
  dtypes = {q.dtype, k.dtype, v.dtype}
  if len(dtypes) != 1 or q.dtype not in _CUDNN_DTYPES:
    return f"cuDNN needs bf16 or fp16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
  d = q.shape[-1]
  if d % 8 or d > _CUDNN_MAX_HEAD_DIM or v.shape[-1] != d:
    return (
      f"cuDNN needs a head dim that is a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, the same for "
      f"q and v; got q {d}, v {v.shape[-1]}"
    )
  # Checked last, so that on CPU the reasons above still show up in errors and tests.
  if backend() != "gpu":
    return f"cuDNN needs a GPU backend; the default backend is {backend()!r}"
  return None


def _kernel_unsupported_reason(impl, q, q_offset) -> str | None:
  if _static_offset(q_offset) is None:
    return f"impl={impl!r} needs a static int q_offset (its tile tables are built on the host)"
  platform = backend()
  if impl == "pallas":
    if platform not in ("gpu", "cpu"):
      return f"pallas (Triton) runs on GPU, or on CPU in interpret mode; backend is {platform!r}"
    if platform == "gpu" and q.shape[-1] > _CUDNN_MAX_HEAD_DIM:
      return f"pallas on GPU needs a head dim <= {_CUDNN_MAX_HEAD_DIM}, got {q.shape[-1]}"
  elif platform not in ("tpu", "cpu"):
    return f"splash runs on TPU, or on CPU in interpret mode; backend is {platform!r}"
  return None


def choose_impl(q, k, v, *, mask, q_offset=0) -> str:
  """The implementation `impl="auto"` runs for this call on the current default backend."""
  platform = backend()
  if platform == "gpu":
    if unsupported_reason("cudnn", q, k, v, mask=mask, q_offset=q_offset) is None:
      return "cudnn"
    if unsupported_reason("pallas", q, k, v, mask=mask, q_offset=q_offset) is None:
      return "pallas"
  if platform == "tpu":
    if unsupported_reason("splash", q, k, v, mask=mask, q_offset=q_offset) is None:
      return "splash"
  return "xla"


def attention(q, k, v, *, mask: masks_lib.MaskSpec, impl: str = "auto", scale=None, q_offset=0):
  """Multi-head (and grouped-query) attention with a structured mask.

  Args:
    q: `[B, Lq, H, D]` queries.
    k: `[B, Lk, Hkv, D]` keys; `Hkv` divides `H`.
    v: `[B, Lk, Hkv, Dv]` values.
    mask: a spec from `arvision.ops.masks` (hashable: pass it as a static argument under jit).
    impl: one of "auto", "xla", "cudnn", "pallas", "splash" (see the module docstring).
    scale: logit scale; None means `1 / sqrt(D)`.
    q_offset: position of the first query in the full sequence (cached decoding: queries are
      positions `q_offset .. q_offset + Lq - 1`, keys are positions `0 .. Lk - 1`). An int, or a
      traced int scalar for the xla path.

  Returns:
    `[B, Lq, H, Dv]` in q's dtype. Queries that see no key (e.g. padding) give zeros.

  Raises:
    ValueError: bad shapes or dtypes, or an explicit `impl` that does not support this call.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_inputs(q, k, v, mask, scale)
  offset = _static_offset(q_offset)
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if impl == "auto":
    impl = choose_impl(q, k, v, mask=mask, q_offset=q_offset)
  if impl == "xla":
    return _xla_attention(q, k, v, mask, scale, q_offset if offset is None else offset)
  if impl in ("pallas", "splash"):
    reason = unsupported_reason(impl, q, k, v, mask=mask, q_offset=q_offset)
    if reason is not None:
      raise ValueError(
        f"attention: impl={impl!r} does not support this call: {reason}. impl='xla' supports "
        "every call."
      )
    # Imported here: the kernels import this module's package (ops.masks, ops.attention).
    if impl == "pallas":
      from arvision.kernels.scalewise.kernel_gpu import scalewise_attention as kernel  # noqa: PLC0415
    else:
      from arvision.kernels.scalewise.kernel_tpu import (  # noqa: PLC0415
        splash_scalewise_attention as kernel,
      )
    fn = lambda q, k, v: kernel(q, k, v, mask=mask, scale=scale, q_offset=offset)
    return _per_shard(fn, q, k)(q, k, v)
  if impl == "cudnn":
    reason = unsupported_reason("cudnn", q, k, v, mask=mask, q_offset=q_offset)
    if reason is not None:
      raise ValueError(
        f"attention: impl='cudnn' does not support this call: {reason}. "
        f"impl='xla' supports every mask; 'auto' picks a supported impl."
      )
    kv_len = mask.kv_len if isinstance(mask, masks_lib.KeyLength) else None
    base = mask.base if kv_len is not None else mask
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      scale=scale,
      is_causal=isinstance(base, masks_lib.Causal),
      key_value_seq_lengths=kv_len,
      implementation="cudnn",
    ).astype(q.dtype)
  raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")


def _per_shard(fn, q, k):
  """`fn` under `shard_map` when a sharding strategy is active (`parallel.use_rules`, i.e. inside
  the loop's jitted step): a Pallas/Mosaic call cannot be partitioned by the compiler, so each
  device runs the kernel on its own examples (batch over ("data", "fsdp") when they divide it)
  and heads (over "tensor" when it divides the q and kv heads)."""
  from arvision.parallel import logical  # noqa: PLC0415 (parallel imports flax; ops stays light)

  current = logical.active()
  if current is None or current[0].size == 1:
    return fn
  mesh = current[0]
  from arvision.kernels import shard_attention  # noqa: PLC0415

  size = lambda axes: math.prod(int(mesh.shape[a]) for a in axes)
  batch_axes = ("data", "fsdp") if q.shape[0] % size(("data", "fsdp")) == 0 else ()
  t = size(("tensor",))
  head_axis = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
  return shard_attention(fn, mesh, batch_axes=batch_axes, head_axis=head_axis)


def _xla_attention(q, k, v, mask, scale, q_offset, blocked: bool = True):
  """XLA ops: float32 logits and softmax, the spec's boolean mask, GQA without repeats.

  With `blocked` and a segment mask (`scale_causal`, `block_diagonal`) at a static offset, the
  queries are split into groups along segment bounds (`_query_groups`): each group meets only
  the key range it can see, with a mask only where part of that range is hidden. VAR's training
  attention then computes ~2/3 of the dense `[L, L]` scores (L=680: 0.64, L=130: 0.67) and no
  mask on its largest scales, which on CPU (where "auto" runs this path) is the larger part of
  its cost; `blocked=False` is the single dense pass over `[Lq, Lk]` that every other spec takes.
  """
  b, lq, h, d = q.shape
  _, lk, hkv, dv = v.shape
  g = h // hkv
  # float32 inputs are multiplied at full precision (TPUs default to bf16 passes).
  hi = jax.lax.Precision.HIGHEST if jnp.float32 in (q.dtype, k.dtype) else None
  hv = jax.lax.Precision.HIGHEST if v.dtype == jnp.float32 else None
  q_BxQxKxGxD = q.reshape(b, lq, hkv, g, d)

  # Both products are `dot_general`s over [B, Hkv, rows, D] operands, batch axes leading, with
  # the results in the layout they are used in: the scores come out as [B, Hkv, G * Q, K] (the
  # `einsum` "bqhgd,bkhd->bhgqk" made XLA:CPU compute k . q^T and copy the largest tensor
  # transposed), and only the [B, L, H, D] q, k, v and the output are transposed. Key padding
  # keeps the einsums: its float ops are `jax.nn.dot_product_attention`'s (see _padded_softmax).
  padded = isinstance(mask, masks_lib.KeyLength)

  def scores(q_part, k_part):
    nq, nk = q_part.shape[1], k_part.shape[1]
    if padded:
      logits = jnp.einsum(
        "bqhgd,bkhd->bhgqk", q_part, k_part, precision=hi, preferred_element_type=jnp.float32
      )
      return logits * jnp.float32(scale)
    q_h = q_part.transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * nq, d)
    logits = jax.lax.dot_general(
      q_h,
      k_part.transpose(0, 2, 1, 3),
      (((3,), (3,)), ((0, 1), (0, 1))),
      precision=hi,
      preferred_element_type=jnp.float32,
    )
    return logits.reshape(b, hkv, g, nq, nk) * jnp.float32(scale)

  def weighted(probs, v_part):
    # Probabilities meet v in v's dtype with float32 accumulation, like torch's and jax's
    # references.
    nq, nk = probs.shape[3], probs.shape[4]
    if padded:
      return jnp.einsum(
        "bhgqk,bkhd->bqhgd",
        probs.astype(v.dtype),
        v_part,
        precision=hv,
        preferred_element_type=jnp.float32,
      )
    out = jax.lax.dot_general(
      probs.astype(v.dtype).reshape(b, hkv, g * nq, nk),
      v_part.transpose(0, 2, 1, 3),
      (((3,), (2,)), ((0, 1), (0, 1))),
      precision=hv,
      preferred_element_type=jnp.float32,
    )
    return out.reshape(b, hkv, g, nq, dv).transpose(0, 3, 1, 2, 4)  # [B, Q, Hkv, G, Dv]

  groups = _query_groups(mask, lq, lk, q_offset) if blocked else None
  if groups is not None:
    outs = []
    for q0, q1, k0, k1, allowed in groups:
      logits = scores(q_BxQxKxGxD[:, q0:q1], k[:, k0:k1])
      visible = jnp.bool_(True) if allowed is None else jnp.asarray(allowed)
      outs.append(weighted(_masked_softmax(logits, visible), v[:, k0:k1]))
    return jnp.concatenate(outs, axis=1).reshape(b, lq, h, dv).astype(q.dtype)
  logits = scores(q_BxQxKxGxD, k)
  allowed_QxK = jnp.asarray(mask.dense(lq, lk, q_offset))
  if allowed_QxK.ndim == 3:  # per-example (key_length): [B, Q, K] -> [B, 1, 1, Q, K]
    allowed_QxK = allowed_QxK[:, None, None]
  if isinstance(mask, masks_lib.KeyLength):
    probs = _padded_softmax(logits, allowed_QxK)
  else:
    probs = _masked_softmax(logits, allowed_QxK)
  return weighted(probs, v).reshape(b, lq, h, dv).astype(q.dtype)


# A segment with at least this fraction of the queries is a query group of its own; runs of
# smaller consecutive segments share one (their score blocks are too small to pay for separate
# ops). A split that keeps more than `_MAX_BLOCKED_FRACTION` of the dense scores is not used.
_MIN_GROUP_FRACTION = 1 / 8
_MAX_BLOCKED_FRACTION = 0.9


def _query_groups(mask, lq: int, lk: int, q_offset) -> list | None:
  """`[(q0, q1, k0, k1, allowed or None)]`: query rows `[q0, q1)` see keys only in `[k0, k1)`,
  `allowed` the `[q1 - q0, k1 - k0]` mask there (None: all visible). None when the spec has no
  static segments, or splitting would not save work."""
  if not isinstance(mask, masks_lib._Segments) or not isinstance(q_offset, int):
    return None
  seg = mask.segment_ids(q_offset + lq)[q_offset:]
  cuts = [0, *(np.flatnonzero(np.diff(seg)) + 1).tolist(), lq]
  min_rows = max(1, int(lq * _MIN_GROUP_FRACTION))
  rows, small = [], None  # small: the start of the pending run of small segments
  for s, e in zip(cuts[:-1], cuts[1:], strict=True):
    if e - s >= min_rows:
      if small is not None:
        rows.append((small, s))
        small = None
      rows.append((s, e))
    elif small is None:
      small = s
  if small is not None:
    rows.append((small, lq))
  if len(rows) < 2:
    return None
  dense = mask.dense(lq, lk, q_offset)
  groups, work = [], 0
  for q0, q1 in rows:
    cols = np.flatnonzero(dense[q0:q1].any(axis=0))
    if cols.size == 0:  # rows that see nothing: the dense path gives them zeros
      return None
    k0, k1 = int(cols[0]), int(cols[-1]) + 1
    part = dense[q0:q1, k0:k1]
    groups.append((q0, q1, k0, k1, None if part.all() else np.array(part)))
    work += (q1 - q0) * (k1 - k0)
  if work > _MAX_BLOCKED_FRACTION * lq * lk:
    return None
  return groups


def _padded_softmax(logits, allowed):
  """Key padding the way `jax.nn.dot_product_attention(key_value_seq_lengths=...)` does it (a
  finite large negative, then `jax.nn.softmax`): MAR's encoder ran on that before it came through
  this dispatch, and the same float ops keep its losses and samples bit-identical (our own
  softmax below differs from it in the last bit after XLA's fusion). Rows without a visible key
  give zeros, as everywhere in this module."""
  big_negative = jnp.float32(-0.7 * np.finfo(np.float32).max)
  probs = jax.nn.softmax(jnp.where(allowed, logits, big_negative), axis=-1)
  return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), probs, 0.0)


@jax.custom_vjp
def _masked_softmax(logits, allowed_QxK):
  """float32 softmax over the visible keys; a row without one gives zeros (finite gradients).

  Its gradient is the softmax's own, `p * (g - sum(g * p))` (one reduction over keys), instead of
  autodiff through the max/exp/sum/divide below (several full `[.., Q, K]` passes: on CPU the
  largest part of a VAR training step's attention time). Masked keys have p = 0: zero gradient.
  """
  return _masked_softmax_fwd(logits, allowed_QxK)[0]


def _masked_softmax_fwd(logits, allowed_QxK):
  probs = _masked_softmax_value(logits, allowed_QxK)
  return probs, probs


def _masked_softmax_bwd(probs, g):
  g_dot_p = jnp.sum(g * probs, axis=-1, keepdims=True)
  return probs * (g - g_dot_p), None


def _masked_softmax_value(logits, allowed_QxK):
  # Masked logits become -inf *before* exp (not a where after it): exp never sees a large masked
  # logit, so neither the forward nor the gradient can produce inf * 0 = NaN.
  masked = jnp.where(allowed_QxK, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
  # A row with no visible key has max -inf; shift by 0 so it yields zeros, not NaN.
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(masked - row_max)
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  return probs / jnp.where(denom > 0, denom, 1.0)


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)
