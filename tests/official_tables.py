"""Stand-ins for official checkpoints in the converter tests: a state dict with the official keys
and shapes from a `tests/data/<name>_official_keys.json` table, and a parameter count."""

import jax
import numpy as np


def zeros_sd(table: dict) -> dict:
  """A state dict with the official keys and shapes, backed by one scalar (no memory)."""
  zero = np.zeros((), np.float32)
  return {k: np.broadcast_to(zero, tuple(s)) for k, s in table.items()}


def count_params(tree) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))
