"""Logical axis names and the sharding strategies that map them to mesh axes.

Layers name their dimensions with `LOGICAL_AXES` (flax's logical partitioning): parameters via
`param_init(init, names)` (an `nn.with_logical_partitioning` box), activations via
`constrain(x, names)` (a sharding constraint while `use_rules(mesh, rules)` is active during
tracing, a no-op otherwise). Models never name mesh axes: a strategy's rules table does.

A table is an ordered sequence of `(logical name, mesh axes)` pairs (flax's `logical_axis_rules`
format). A name may appear several times: later entries are fallbacks. `spec` resolves the names of
one array in table order: a dimension takes the first rule for its name whose mesh axes are still
unused by the array, skipping mesh axes of size 1 and **dropping any mesh axis that does not divide
the dimension** (that dimension is then replicated over it, e.g. a 3-channel output conv under
`tp`). So every table works on every mesh; the mesh (`config.mesh`) decides the sizes.

| strategy  | batch           | params                                                     |
|-----------|-----------------|------------------------------------------------------------|
| `dp`      | (data, fsdp)    | replicated                                                 |
| `fsdp`    | (data, fsdp)    | one dim of each weight over (data, fsdp) (ZeRO-3)          |
| `hsdp`    | (data, fsdp)    | one dim over fsdp, replicated over data (FSDP within a group)|
| `tp`      | (data, fsdp)    | Megatron: heads, mlp hidden, vocab (and conv out) over tensor |
| `fsdp_tp` | (data, fsdp)    | tp over tensor plus the other weight dim over (data, fsdp) |

Typical meshes: `dp`/`fsdp` data=-1 (or fsdp=-1); `hsdp` data=hosts, fsdp=chips per host; `tp`
tensor=N (data=-1 for the rest); `fsdp_tp` fsdp=-1, tensor=N.
"""

from __future__ import annotations

import contextlib
import contextvars

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# The vocabulary of logical axis names. A name not listed here is a bug (tests check every model).
LOGICAL_AXES = (
  "batch",  # examples
  "seq",  # token positions
  "embed",  # model width (residual stream)
  "heads",  # attention heads (q, or kv heads under GQA)
  "kv",  # per-head feature dim
  "mlp",  # FFN hidden
  "vocab",  # codebook / output vocabulary
  "classes",  # class-embedding rows (num_classes + null)
  "conv_h",  # conv kernel height
  "conv_w",  # conv kernel width
  "conv_in",  # conv input channels
  "conv_out",  # conv output channels
  "latent",  # tokenizer latent / codebook feature dim
  "norm",  # per-channel norm scales/biases
  "layers",  # the stacked layer axis of scanned blocks (`config.model.scan_layers`); unsharded
)


def param_init(init, names: tuple[str | None, ...]):
  """`init` wrapped so the created param carries logical axis `names` (one per dim)."""
  return nn.with_logical_partitioning(init, names)


# --- strategies -----------------------------------------------------------------------------------
Rules = tuple[tuple[str, tuple[str, ...] | str | None], ...]

_BATCH = (("batch", ("data", "fsdp")),)


def _shard(axes, names) -> Rules:
  return tuple((n, axes) for n in names)


# Dimensions FSDP may split, in order of preference (the first that divides wins per array).
_FSDP_NAMES = ("embed", "conv_out", "conv_in", "mlp", "vocab", "heads", "classes", "latent")
# Megatron column/row split: heads (q/k/v out, proj in), FFN hidden, output vocab; conv outputs.
_TP_NAMES = ("heads", "mlp", "vocab", "conv_out")

RULES: dict[str, Rules] = {
  "dp": _BATCH,
  "fsdp": _BATCH + _shard(("data", "fsdp"), _FSDP_NAMES),
  "hsdp": _BATCH + _shard("fsdp", _FSDP_NAMES),
  "tp": _BATCH + _shard("tensor", _TP_NAMES) + (("conv_in", "tensor"),),
  "fsdp_tp": _BATCH
  + _shard("tensor", _TP_NAMES)
  + (("conv_in", "tensor"),)
  + _shard(("data", "fsdp"), _FSDP_NAMES),
}
STRATEGIES = tuple(RULES)


def get_rules(strategy: str) -> Rules:
  """The rules table of `strategy` (`config.sharding.strategy`)."""
  if strategy not in RULES:
    raise ValueError(f"config.sharding.strategy={strategy!r} is not known; accepted: {STRATEGIES}")
  return RULES[strategy]


def check_names(rules: Rules) -> None:
  """Raises if a table names a logical axis outside `LOGICAL_AXES` (a typo would never match)."""
  bad = sorted({n for n, _ in rules if n not in LOGICAL_AXES})
  if bad:
    raise ValueError(f"rules name unknown logical axes {bad}; known: {LOGICAL_AXES}")


def spec(names, shape, rules: Rules, mesh) -> P:
  """The mesh `PartitionSpec` of an array of `shape` whose dims carry logical `names`.

  Args:
    names: one logical name (or None) per dim; a shorter tuple is padded with None (an empty
      `PartitionSpec()` = unannotated = replicated).
    shape: the array's shape (divisibility decides which mesh axes are kept).
    rules: a rules table (`get_rules`).
    mesh: a `Mesh` or `AbstractMesh`.
  """
  names = tuple(names)
  if len(names) > len(shape):
    raise ValueError(f"logical names {names} have more entries than shape {tuple(shape)}")
  names = names + (None,) * (len(shape) - len(names))
  for n in names:
    if n is not None and not isinstance(n, str):
      raise ValueError(f"logical names {names}: each entry must be one name or None")
  out: list = [None] * len(shape)
  used: set[str] = set()
  for name, axes in rules:
    if axes is None or name not in names:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for i, n in enumerate(names):
      if n != name or out[i] is not None:
        continue
      picked, size = [], 1
      for a in axes:
        s = int(mesh.shape[a])
        if a in used or s == 1 or shape[i] % (size * s):
          continue
        picked.append(a)
        size *= s
      if picked:
        out[i] = picked[0] if len(picked) == 1 else tuple(picked)
        used.update(picked)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _leaf_names(logical) -> tuple:
  """`PartitionSpec` of logical names (or None) -> a tuple of names."""
  return () if logical is None else tuple(logical)


def tree_shardings(abstract_tree, logical_tree, rules: Rules, mesh):
  """`NamedSharding` per leaf of `abstract_tree` from its logical `PartitionSpec` tree.

  Leaves missing from `logical_tree` (matched by path) are replicated.
  """
  by_path = {
    jax.tree_util.keystr(k): v
    for k, v in jax.tree_util.tree_leaves_with_path(
      logical_tree, is_leaf=lambda x: isinstance(x, P) or x is None
    )
  }

  def one(path, leaf):
    names = _leaf_names(by_path.get(jax.tree_util.keystr(path)))
    return NamedSharding(mesh, spec(names, leaf.shape, rules, mesh))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def match_by_path(abstract_tree, param_shardings, mesh):
  """Shardings for a tree whose leaves mirror params (optimizer moments, EMA): a leaf whose path
  ends with a param's path and has its shape takes that param's sharding (the longest match); all
  other leaves (counts, scalars) are replicated."""
  flat = [
    (jax.tree_util.keystr(k), s)
    for k, s in jax.tree_util.tree_leaves_with_path(
      param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
  ]
  rep = NamedSharding(mesh, P())

  def one(path, leaf):
    key = jax.tree_util.keystr(path)
    best, best_len = rep, -1
    for k, s in flat:
      if key.endswith(k) and len(k) > best_len and _shape_ok(leaf, s):
        best, best_len = s, len(k)
    return best

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def _shape_ok(leaf, sharding) -> bool:
  """Whether `sharding` (made for a param) fits `leaf` (same rank and divisible dims)."""
  parts = tuple(sharding.spec)
  if len(parts) > len(leaf.shape):
    return False
  for dim, p in zip(leaf.shape, parts, strict=False):
    axes = () if p is None else ((p,) if isinstance(p, str) else p)
    size = 1
    for a in axes:
      size *= int(sharding.mesh.shape[a])
    if dim % size:
      return False
  return True


# --- activations ----------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("arvision_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh, rules: Rules):
  """Within this context (active while a function is *traced*), `constrain` lays
  activations out by `rules` on `mesh`; flax's own `nn.logical_axis_rules` are set too."""
  token = _ACTIVE.set((mesh, rules))
  try:
    with nn.logical_axis_rules(rules):
      yield
  finally:
    _ACTIVE.reset(token)


def active():
  """`(mesh, rules)` of the innermost `use_rules`, or None."""
  return _ACTIVE.get()


def constrain(x, names: tuple[str | None, ...]):
  """Asks the compiler to lay activation `x` out as the active strategy maps `names`.

  A mesh axis that does not divide a dimension is dropped for it (see `spec`), so odd shapes
  (e.g. a batch of 1 while sampling) stay valid under any strategy.
  """
  current = active()
  if current is None:
    return x
  mesh, table = current
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(names, x.shape, table, mesh)))
