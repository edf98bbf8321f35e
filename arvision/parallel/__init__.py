"""Device meshes and batch assembly (`mesh`), logical axis names and the sharding strategies that map
them to mesh axes (`logical`), the per-device cost of a sharded step: predicted (`cost`) and as XLA
reports it (`measure`)."""

from arvision.parallel.logical import (
  RULES,
  STRATEGIES,
  get_rules,
  match_by_path,
  spec,
  tree_shardings,
  use_rules,
)
from arvision.parallel.mesh import (
  AXES,
  BATCH_AXES,
  batch_sharding,
  global_batch,
  make_mesh,
  maybe_initialize_distributed,
  replicated,
)

__all__ = [
  "AXES",
  "BATCH_AXES",
  "RULES",
  "STRATEGIES",
  "batch_sharding",
  "get_rules",
  "global_batch",
  "make_mesh",
  "match_by_path",
  "maybe_initialize_distributed",
  "replicated",
  "spec",
  "tree_shardings",
  "use_rules",
]
