"""Chunked attention kernels.

(a) `chunk_causal_attention`: uniform chunks, causal across them. It is the scale-wise
    block-sparse kernel with `masks.chunk_causal(chunk)` (tile skipping, unmasked full tiles).
(b) `hybrid_chunk_attention`: ARFlow-style softmax attention inside each chunk plus linear
    attention (optional per-head decay) over all earlier chunks, carried as a running `[D, Dv]`
    state; the exact definition and combination rule are in `reference.py`.

Two lowerings of the hybrid forward share one chunk step:
- "tpu": grid `(B, H, num_chunks)`, the chunk axis "arbitrary" (sequential), the state in a VMEM
  scratch buffer reset at chunk 0 (`pl.when`). Runs on CPU under
  `pltpu.force_tpu_interpret_mode()`.
- "gpu": grid `(B, H)`, an in-kernel `fori_loop` over chunks with the state as the loop carry
  (Triton has no scratch that persists across grid steps). Runs on CPU with `interpret=True`.

(c) `gated_hybrid_chunk_attention`: the same kernel with ARFlow's data-dependent gates (per-position
    query decay, per-chunk state decay; `reference.gated_decays`).

The kernels take general decays (`reference.decayed_hybrid_scan`): per-position query and key
decays and a per-chunk state decay; (b) and (c) only build them differently.

Backward: `jax.custom_vjp` whose backward is the autodiff of `reference.decayed_hybrid_scan`
(recomputes the forward as a `lax.scan`; no reverse-chunk Pallas kernel yet). Gradients flow to
q, k, v and the decays (so to a learned decay or to ARFlow's gate projections).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from arvision.kernels.chunked import reference
from arvision.kernels.common import resolve_interpret
from arvision.kernels.scalewise.kernel_gpu import scalewise_attention
from arvision.ops import masks as masks_lib

LOWERINGS = ("auto", "tpu", "gpu")


def chunk_causal_attention(q, k, v, *, chunk: int, scale=None, **kwargs):
  """Chunk-causal softmax attention `[B, L, H, D]`: the block-sparse scale-wise kernel.

  Args:
    q, k, v: as for `scalewise_attention`.
    chunk: tokens per chunk.
    scale: logit scale (None: `1 / sqrt(D)`).
    **kwargs: passed to `scalewise_attention` (block sizes, interpret, q_offset, kv_len).
  """
  return scalewise_attention(q, k, v, mask=masks_lib.chunk_causal(chunk), scale=scale, **kwargs)


def _dot(a, b, contract_a, contract_b):
  return lax.dot_general(
    a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
  )


def _chunk_step(q, k, v, qdec_Cx1, kdec_Cx1, cdec_1x1, state_DxDv, *, scale, phi):
  """One chunk: (out `[C, Dv]` float32, new state `[D, Dv]`); decays as in `reference.py`."""
  s = _dot(q, k, 1, 1) * scale
  m = s.max(axis=1, keepdims=True)
  p = jnp.exp(s - m)
  p = p / p.sum(axis=1, keepdims=True)
  intra = _dot(p.astype(v.dtype), v, 1, 0)
  fq = reference.feature_map(q, phi) * qdec_Cx1
  inter = _dot(fq, state_DxDv, 1, 0) * scale
  fk = reference.feature_map(k, phi) * kdec_Cx1
  state = cdec_1x1 * state_DxDv + _dot(fk, v.astype(jnp.float32), 0, 0)
  return intra + inter, state


def _tpu_kernel(q_ref, k_ref, v_ref, qdec_ref, kdec_ref, cdec_ref, o_ref, state_ref, *, scale, phi):
  @pl.when(pl.program_id(2) == 0)
  def _():
    state_ref[...] = jnp.zeros(state_ref.shape, jnp.float32)

  out, state = _chunk_step(
    q_ref[...],
    k_ref[...],
    v_ref[...],
    qdec_ref[...],
    kdec_ref[...],
    cdec_ref[0:1, :],
    state_ref[...],
    scale=scale,
    phi=phi,
  )
  state_ref[...] = state
  o_ref[...] = out.astype(o_ref.dtype)


def _gpu_kernel(q_ref, k_ref, v_ref, qdec_ref, kdec_ref, cdec_ref, o_ref, *, scale, phi, chunk, n):
  def body(c, state):
    sl = pl.ds(c * chunk, chunk)
    out, state = _chunk_step(
      q_ref[sl, :],
      k_ref[sl, :],
      v_ref[sl, :],
      qdec_ref[sl, :],
      kdec_ref[sl, :],
      cdec_ref[pl.ds(c * chunk, 1), :],
      state,
      scale=scale,
      phi=phi,
    )
    o_ref[sl, :] = out.astype(o_ref.dtype)
    return state

  lax.fori_loop(0, n, body, jnp.zeros((q_ref.shape[-1], v_ref.shape[-1]), jnp.float32))


def _forward(q, k, v, qdec, kdec, cdec, *, chunk, phi, scale, lowering, interpret):
  b, length, h, d = q.shape
  dv = v.shape[-1]
  n = length // chunk
  # Heads-major [B, H, L, D]: the tile's last two dims are (C, D), as Mosaic wants. The decays
  # go heads-major as [B, H, L, 1]; the per-chunk state decay is repeated over its chunk's rows
  # (same tiling as q; the kernel reads the chunk's first row).
  qt, kt, vt = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))
  dec = lambda x: jnp.transpose(x.astype(jnp.float32), (0, 2, 1))[..., None]
  qd, kd = dec(qdec), dec(kdec)
  cd = dec(jnp.repeat(cdec, chunk, axis=1))
  out_shape = jax.ShapeDtypeStruct((b, h, length, dv), q.dtype)
  if lowering == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

    tile = lambda w: pl.BlockSpec((None, None, chunk, w), lambda b, h, c: (b, h, c, 0))
    out = pl.pallas_call(
      functools.partial(_tpu_kernel, scale=scale, phi=phi),
      grid=(b, h, n),
      in_specs=[tile(d), tile(d), tile(dv), tile(1), tile(1), tile(1)],
      out_specs=tile(dv),
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((d, dv), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary")
      ),
      interpret=interpret,
      name="hybrid_chunk_fwd_tpu",
    )(qt, kt, vt, qd, kd, cd)
  else:
    compiler_params = None
    if not interpret:
      from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415

      compiler_params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    whole = lambda w: pl.BlockSpec((None, None, length, w), lambda b, h: (b, h, 0, 0))
    out = pl.pallas_call(
      functools.partial(_gpu_kernel, scale=scale, phi=phi, chunk=chunk, n=n),
      grid=(b, h),
      in_specs=[whole(d), whole(d), whole(dv), whole(1), whole(1), whole(1)],
      out_specs=whole(dv),
      out_shape=out_shape,
      compiler_params=compiler_params,
      interpret=interpret,
      name="hybrid_chunk_fwd_gpu",
    )(qt, kt, vt, qd, kd, cd)
  return jnp.transpose(out, (0, 2, 1, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _hybrid(q, k, v, qdec, kdec, cdec, chunk, phi, scale, lowering, interpret):
  return _forward(
    q, k, v, qdec, kdec, cdec, chunk=chunk, phi=phi, scale=scale, lowering=lowering,
    interpret=interpret,
  )  # fmt: skip


def _hybrid_fwd(q, k, v, qdec, kdec, cdec, chunk, phi, scale, lowering, interpret):
  out = _hybrid(q, k, v, qdec, kdec, cdec, chunk, phi, scale, lowering, interpret)
  return out, (q, k, v, qdec, kdec, cdec)


def _hybrid_bwd(chunk, phi, scale, lowering, interpret, res, do):
  del lowering, interpret
  scan = lambda *args: reference.decayed_hybrid_scan(*args, chunk=chunk, phi=phi, scale=scale)
  _, vjp = jax.vjp(scan, *res)
  return vjp(do)


_hybrid.defvjp(_hybrid_fwd, _hybrid_bwd)


def _resolve(q, lowering, interpret, scale):
  if lowering not in LOWERINGS:
    raise ValueError(
      f"hybrid_chunk_attention: lowering must be one of {LOWERINGS}, got {lowering!r}"
    )
  if lowering == "auto":
    lowering = "tpu" if jax.default_backend() == "tpu" else "gpu"
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  return lowering, scale, resolve_interpret(interpret)


def hybrid_chunk_attention(
  q,
  k,
  v,
  *,
  chunk: int,
  decay=None,
  phi: str = "identity",
  scale=None,
  lowering: str = "auto",
  interpret: bool | None = None,
):
  """Softmax attention inside chunks + decayed linear attention over earlier chunks.

  Args:
    q, k: `[B, L, H, D]`; v: `[B, L, H, Dv]`; `L` a multiple of `chunk`.
    chunk: tokens per chunk `C`.
    decay: None (no decay) or `[H]` values in (0, 1] (may be traced, e.g. a learned parameter).
    phi: linear-attention feature map, "identity" or "elu1".
    scale: logit scale of both terms; None means `1 / sqrt(D)`.
    lowering: "tpu" (scratch state over an "arbitrary" chunk grid axis), "gpu" (in-kernel loop
      over chunks), or "auto" (tpu on a TPU backend, else gpu).
    interpret: Pallas interpret mode; None means "when the default backend is CPU". The "tpu"
      lowering on CPU additionally needs `pltpu.force_tpu_interpret_mode()` around the call.

  Returns:
    `[B, L, H, Dv]` in q's dtype (see `reference.py` for the exact definition).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _, decay_H = reference.check_hybrid_args(q, k, v, chunk, decay, phi)
  lowering, scale, interpret = _resolve(q, lowering, interpret, scale)
  # The decays are built outside the custom_vjp: gradients reach a traced `decay` through them.
  qdec, kdec, cdec = reference.constant_decays(decay_H, q.shape[0], q.shape[1], int(chunk))
  return _hybrid(q, k, v, qdec, kdec, cdec, int(chunk), phi, scale, lowering, interpret)


def gated_hybrid_chunk_attention(
  q,
  k,
  v,
  log_gate,
  *,
  chunk: int,
  scale=None,
  lowering: str = "auto",
  interpret: bool | None = None,
):
  """ARFlow's gated hybrid attention (official `chunk_gate_retention`): softmax inside chunks,
  gated linear attention across chunks with data-dependent per-position log-gates.

  Args:
    q, k: `[B, L, H, D]`; v: `[B, L, H, Dv]`; `L` a multiple of `chunk`.
    log_gate: `[B, L, H]` log-gates (ARFlow: `logsigmoid(.) / 16 <= 0`); the decays are
      `reference.gated_decays` (query: cumulative inside the chunk; state: the chunk's mean).
    chunk: tokens per chunk (ARFlow: the tokens of one image).
    scale, lowering, interpret: as for `hybrid_chunk_attention`.

  Returns:
    `[B, L, H, Dv]` in q's dtype. Gradients flow to q, k, v and log_gate (backward: autodiff of
    `reference.decayed_hybrid_scan`).
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  reference.check_hybrid_args(q, k, v, chunk, None, "identity")
  if log_gate.shape != q.shape[:3]:
    raise ValueError(
      f"gated_hybrid_chunk_attention: log_gate must be [B, L, H]={q.shape[:3]}, got "
      f"{log_gate.shape}"
    )
  lowering, scale, interpret = _resolve(q, lowering, interpret, scale)
  qdec, kdec, cdec = reference.gated_decays(log_gate, int(chunk))
  return _hybrid(q, k, v, qdec, kdec, cdec, int(chunk), "identity", scale, lowering, interpret)
