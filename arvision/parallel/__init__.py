"""Device meshes and sharding of train state and batches."""

from arvision.parallel.mesh import (
  AXES,
  STRATEGIES,
  batch_sharding,
  global_batch,
  make_mesh,
  replicated,
  state_shardings,
)

__all__ = [
  "AXES",
  "STRATEGIES",
  "batch_sharding",
  "global_batch",
  "make_mesh",
  "replicated",
  "state_shardings",
]
