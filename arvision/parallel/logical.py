"""Logical axis names carried by every parameter and activation of arvision's models.

Layers name their dimensions with the names below (flax's logical partitioning): parameters via
`param_init(init, names)` (an `nn.with_logical_partitioning` box), activations via
`constrain(x, names)` (a sharding constraint while `rules.use_rules(mesh, rules)` is active during
tracing, a no-op otherwise). A sharding strategy (`arvision.parallel.rules`) maps each name to mesh
axes; models never name mesh axes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import NamedSharding

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
)


def param_init(init, names: tuple[str | None, ...]):
  """`init` wrapped so the created param carries logical axis `names` (one per dim)."""
  return nn.with_logical_partitioning(init, names)


def constrain(x, names: tuple[str | None, ...]):
  """Asks the compiler to lay activation `x` out as the active strategy maps `names`.

  A mesh axis that does not divide a dimension is dropped for it (see `rules.spec`), so odd shapes
  (e.g. a batch of 1 while sampling) stay valid under any strategy.
  """
  from arvision.parallel import rules  # late: rules imports LOGICAL_AXES from here

  active = rules.active()
  if active is None:
    return x
  mesh, table = active
  spec = rules.spec(names, x.shape, table, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
