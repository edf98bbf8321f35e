"""Pallas kernels for structured attention, each with a pure-jnp reference beside it.

- `arvision.kernels.scalewise`: block-sparse flash attention for segment masks (GPU-style
  `pallas_call`, splash on TPU), the kernels behind `arvision.ops.attention(impl="pallas"/"splash")`.
- `arvision.kernels.chunked`: chunk-causal attention and the softmax + linear hybrid.

`shard_attention` runs any of them under `jax.shard_map` with the batch split over the mesh's
("data", "fsdp") axes and the heads over "tensor" (mesh axes of `arvision.parallel.mesh`). The
kernels are per-example and per-head, so each shard computes its slice exactly.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from arvision.parallel.mesh import BATCH_AXES

HEAD_AXIS = "tensor"


def shard_attention(
  fn, mesh, *, batch_axes=BATCH_AXES, head_axis: str | None = HEAD_AXIS, extra_in_specs=()
):
  """Wraps `fn(q, k, v, *extra) -> [B, L, H, Dv]` to run once per shard of a mesh.

  Args:
    fn: an attention function over `[B, L, H, D]` arrays (static arguments bound already).
    mesh: a `jax.sharding.Mesh` with the axes named in `batch_axes` and `head_axis`.
    batch_axes: mesh axes the batch dimension is split over.
    head_axis: mesh axis the (query and kv) heads are split over, or None. With grouped-query
      attention the kv heads must be divisible by its size (contiguous groups stay together).
    extra_in_specs: PartitionSpecs of the extra positional arguments (e.g. `P("tensor")` for a
      per-head decay `[H]`).

  Returns:
    The wrapped function (same signature as `fn`); its output is sharded like q.
  """
  for axis in (*batch_axes, *([head_axis] if head_axis else [])):
    if axis not in mesh.axis_names:
      raise ValueError(
        f"shard_attention: mesh axis {axis!r} not in the mesh's axes {mesh.axis_names}"
      )
  spec = P(tuple(batch_axes), None, head_axis, None)
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(spec, spec, spec, *extra_in_specs),
    out_specs=spec,
    # pallas_call outputs carry no varying-manual-axes annotation.
    check_vma=False,
  )


__all__ = ["HEAD_AXIS", "shard_attention"]
