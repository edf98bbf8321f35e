"""Scale-wise attention on TPU: splash attention with a computable mask built from our mask spec.

Splash (`jax.experimental.pallas.ops.tpu.splash_attention`) scans the mask on the host in
`(block_q, block_kv)` tiles, skips empty tiles, runs full tiles unmasked, and for a
`_ComputableMask` evaluates `mask_function(q_ids, kv_ids)` inside the kernel on partial tiles. Our
specs' `allowed` is written with operators only, so the same function serves both the host scan
(numpy) and the kernel (traced int32).

Padding: L is padded to a multiple of the block size. The mask function also hides keys at or past
the real key length, so padded keys are never visible to real queries; padded query rows are
dropped. Splash applies no logit scale: q is multiplied by it first (in q's dtype for bf16, as
MaxText does). Splash works on one example `[H, L, D]`; the batch is a `vmap`.

Kernels are cached by (spec, shapes, offset, block sizes, interpret) because building the mask
info scans the whole mask on the host.

On CPU the kernel runs in Pallas interpret mode (`interpret=None` picks it from the backend).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from arvision.kernels.common import cdiv, resolve_interpret
from arvision.ops import masks as masks_lib

DEFAULT_BLOCK = 128


class SpecMask(splash_mask._ComputableMask):  # noqa: SLF001 (the documented extension point)
  """A splash computable mask for a `MaskSpec` (+ query offset and real key length).

  Query row `r` is position `q_offset + r`; key column `c` is visible iff
  `spec.allowed(q_offset + r, c)` and `c < kv_len`.
  """

  def __init__(self, spec, shape, q_offset=0, kv_len=None, shard_count=1):
    self.spec = spec
    self.q_offset = int(q_offset)
    self.kv_len = int(shape[1] if kv_len is None else kv_len)

    def mask_function(q_ids, kv_ids):
      return spec.allowed(q_ids + self.q_offset, kv_ids) & (kv_ids < self.kv_len)

    super().__init__(shape=tuple(shape), mask_function=mask_function, shard_count=shard_count)

  def _key(self):
    return (self.spec, self.shape, self.q_offset, self.kv_len)

  def __eq__(self, other):
    return isinstance(other, SpecMask) and self._key() == other._key()

  def __hash__(self):
    return hash((type(self), self._key()))


@functools.lru_cache(maxsize=64)
def splash_kernel(
  spec, num_heads, q_len_p, kv_len_p, q_offset, kv_len, block_q, block_k, interpret
):
  """The cached single-device splash kernel for one (spec, shape) (takes `[H, L, D]` inputs)."""
  mask = SpecMask(spec, (q_len_p, kv_len_p), q_offset=q_offset, kv_len=kv_len)
  multi = splash_mask.MultiHeadMask(tuple(mask for _ in range(num_heads)))
  blocks = splash.BlockSizes(
    block_q=block_q,
    block_kv=block_k,
    block_kv_compute=block_k,
    block_q_dkv=block_q,
    block_kv_dkv=block_k,
    block_kv_dkv_compute=block_k,
    block_q_dq=block_q,
    block_kv_dq=block_k,
  )
  # Mask info arrays must be concrete: the cache outlives any trace that first builds it. JAX's
  # trace state is per thread, so a fresh thread builds them outside every trace (inside an
  # `nn.scan` body `ensure_compile_time_eval` still hands back tracers that leak into the next).
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(
      splash.make_splash_mha_single_device, multi, block_sizes=blocks, interpret=interpret
    ).result()


def _pad_len(x, size):
  if x.shape[1] == size:
    return x
  return jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, 0), (0, 0)))


def splash_scalewise_attention(
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
):
  """Splash attention with a structured mask, `[B, L, H, D]` layout (differentiable).

  Args:
    q: `[B, Lq, H, D]`; k, v: `[B, Lk, Hkv, D]` with `Hkv` dividing `H` (GQA is native in splash).
    mask: a spec from `arvision.ops.masks` (static).
    scale: logit scale; None means `1 / sqrt(D)`.
    q_offset: static position of the first query.
    kv_len: valid key length (default `Lk`).
    block_q, block_k: splash tile sizes; default 128 (splash needs `block_k % 128 == 0`).
    interpret: None means interpret mode when the default backend is CPU.

  Returns:
    `[B, Lq, H, Dv]` in q's dtype.
  """
  if not isinstance(mask, masks_lib.MaskSpec):
    raise ValueError(f"splash_scalewise_attention: mask must be a MaskSpec, got {mask!r}")
  if isinstance(q_offset, bool) or not isinstance(q_offset, (int, np.integer)) or q_offset < 0:
    raise ValueError(
      f"splash_scalewise_attention: q_offset must be a static non-negative int, got {q_offset!r}"
    )
  b, lq, h, d = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"splash_scalewise_attention: kv heads ({hkv}) must divide heads ({h})")
  kv_len = lk if kv_len is None else int(kv_len)
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  interpret = resolve_interpret(interpret)
  block_q = block_q or DEFAULT_BLOCK
  block_k = block_k or DEFAULT_BLOCK
  if block_k % 128:
    raise ValueError(
      f"splash_scalewise_attention: block_k must be a multiple of 128, got {block_k}"
    )
  lq_p, lk_p = cdiv(lq, block_q) * block_q, cdiv(kv_len, block_k) * block_k
  k, v = k[:, : min(lk, lk_p)], v[:, : min(lk, lk_p)]
  kernel = splash_kernel(mask, h, lq_p, lk_p, int(q_offset), kv_len, block_q, block_k, interpret)
  # Scale in float32, then back to q's dtype (splash multiplies q @ k^T unscaled).
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  to_hld = lambda x, n: jnp.transpose(_pad_len(x, n), (0, 2, 1, 3))
  out = jax.vmap(kernel)(to_hld(qs, lq_p), to_hld(k, lk_p), to_hld(v, lk_p))
  return jnp.transpose(out, (0, 2, 1, 3))[:, :lq].astype(q.dtype)
