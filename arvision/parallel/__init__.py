"""Device meshes, sharding strategies (rules tables over logical axis names), batch assembly."""

from arvision.parallel.mesh import (
  AXES,
  BATCH_AXES,
  batch_sharding,
  global_batch,
  make_mesh,
  maybe_initialize_distributed,
  replicated,
)
from arvision.parallel.rules import (
  RULES,
  STRATEGIES,
  get_rules,
  match_by_path,
  spec,
  tree_shardings,
  use_rules,
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
