"""`config.model.scan_layers`: a model's identical transformer blocks as ONE `nn.scan`.

Unrolled (the default), a depth-N model has params `blocks_0 .. blocks_{N-1}` and the compiler sees
N copies of the block (XLA's TPU backend generates code per fusion per layer: compile time and
host memory grow with depth). With `scan_layers=True` the blocks run as one
`nn.scan` over params stacked along a leading axis (one entry per layer, logical axis name
`LAYERS`, unsharded by every strategy), so the compiler sees one layer body (MaxText's
`scan_layers`). The forward is the same function; only the param layout and the trace differ.

- `scan_blocks` applies a block module (created once, under the stacked name) `depth` times; the
  current remat mode (`precision.block`) checkpoints the scan body. Per-layer values that differ
  (VAR's linearly spaced drop-path rates, each layer's KV cache) are scanned inputs `xs`; each
  layer's outputs (its updated cache) come back stacked as `ys`.
- `stack_layers` / `unstack_layers` convert params between the layouts (pure functions);
  `to_layout` converts a tree to the layout of another (`config.init_from` uses it, so a
  checkpoint converted from official weights, which is unrolled, initialises a scanned model).
- `stack_caches` turns `init_kv_caches`'s per-layer list into the stacked `(k, v)` pair.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import errors, precision

LAYERS = "layers"  # the logical axis name of the stacked layer dimension
# Families whose models accept `config.model.scan_layers=True` (error messages list them).
ACCEPTED = ("var", "raster", "mar")


def enabled(config) -> bool:
  """`config.model.scan_layers` checked (absent in configs saved before the field: False)."""
  value = (config.get("model") or {}).get("scan_layers", False)
  if not isinstance(value, bool | np.bool_):
    raise errors.UserError(f"config.model.scan_layers={value!r} must be True or False")
  return bool(value)


def refuse(config, family: str) -> None:
  """Raises a `UserError` when `scan_layers` is on for a family that does not support it."""
  if enabled(config):
    raise errors.UserError(
      f"config.model.scan_layers=True is not supported by the {family!r} family; accepted by: "
      f"{list(ACCEPTED)} (set config.model.scan_layers=False)"
    )


def scan_blocks(block: nn.Module, depth: int, call, carry, xs=None, *broadcast):
  """`depth` applications of `block` as one `nn.scan` over stacked params.

  Args:
    block: the block module (one instance; its params get a leading `[depth]` axis named `LAYERS`).
    depth: number of layers.
    call: `call(block, carry, xs_i, *broadcast) -> (carry, ys_i)`, one layer; static settings
      (mask specs, flags) are closed over.
    carry: the residual stream (the scan carry).
    xs: a pytree of per-layer inputs with leading axis `depth` (or None).
    broadcast: inputs every layer sees unchanged (the condition, RoPE rows, a cache index).

  Returns:
    `(carry, ys)`: the output stream and the per-layer outputs stacked along axis 0.
  """
  policy = precision.remat_policy()
  body = call if policy is None else nn.checkpoint(call, policy=policy, prevent_cse=False)
  scanned = nn.scan(
    body,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=(0,) + (nn.broadcast,) * len(broadcast),
    length=depth,
    metadata_params={nn.PARTITION_NAME: LAYERS},
  )
  return scanned(block, carry, xs, *broadcast)


def stack_caches(caches):
  """A list of per-layer `(k, v)` caches -> one `(k, v)` pair with a leading layer axis."""
  if caches is None:
    return None
  return tuple(jnp.stack(parts) for parts in zip(*caches, strict=True))


# --- param layout conversion ----------------------------------------------------------------------


def _indexed(tree: dict, name: str) -> list[int]:
  pat = re.compile(rf"{re.escape(name)}_(\d+)$")
  found = sorted(int(m.group(1)) for k in tree if (m := pat.match(k)))
  if found and found != list(range(len(found))):
    raise ValueError(f"layers {name}_i are not numbered 0..{len(found) - 1}: {found}")
  return found


def stack_layers(params: dict, names: tuple[str, ...]) -> dict:
  """Unrolled -> scanned: `{name}_0 .. {name}_{N-1}` become `{name}` with leaves `[N, ...]`.

  Works on plain nested dicts of arrays (the family's params, without boxing); other keys are
  kept as they are. Raises if a name has no unrolled layers.
  """
  out = dict(params)
  for name in names:
    idx = _indexed(out, name)
    if not idx:
      raise ValueError(f"params have no unrolled layers {name}_0..; keys: {sorted(out)}")
    layers = [out.pop(f"{name}_{i}") for i in idx]
    out[name] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return out


def unstack_layers(params: dict, names: tuple[str, ...]) -> dict:
  """Scanned -> unrolled: `{name}` with leaves `[N, ...]` becomes `{name}_0 .. {name}_{N-1}`."""
  out = dict(params)
  for name in names:
    if name not in out:
      raise ValueError(f"params have no stacked layers {name!r}; keys: {sorted(out)}")
    stacked = out.pop(name)
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      out[f"{name}_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out


def to_layout(params: dict, like: dict) -> dict:
  """`params` (top-level dict) converted to the layer layout of `like` (same model, either
  layout): names stacked in `like` but unrolled in `params` are stacked, and the reverse."""
  stack = tuple(n for n in like if n not in params and _indexed(params, n))
  out = stack_layers(params, stack) if stack else dict(params)
  unstack = tuple(n for n in out if n not in like and isinstance(out[n], dict) and f"{n}_0" in like)
  return unstack_layers(out, unstack) if unstack else out
