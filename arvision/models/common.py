"""Helpers every generator family shares."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def param_count(params: Any) -> int:
  """Number of scalars in a (possibly abstract) param tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def images_to_uint8(img: jax.Array) -> jax.Array:
  """Decoded images in [-1, 1] -> uint8 (round, clip), inside jit (the samplers' last step)."""
  return jnp.clip(jnp.round((img.astype(jnp.float32) + 1.0) * 0.5 * 255.0), 0, 255).astype(
    jnp.uint8
  )
