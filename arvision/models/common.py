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


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float32 1.0 where the label's logit is the largest, else 0.0 (the accuracy metric).

  `logits[label] >= max(logits)` instead of `argmax(logits) == label`: the max is the one the
  cross-entropy's log-softmax already computes (XLA shares it), while an argmax is a separate
  (value, index) reduction over the whole `[..., V]` tensor -- ~2.5% of a VAR training step on CPU
  at V=4096. The two differ only when another class ties the label's logit exactly.
  """
  label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return (label_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
