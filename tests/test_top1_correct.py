"""The accuracy metric's `top1_correct` equals `argmax == label` (no exact ties in random logits)."""

import jax
import jax.numpy as jnp
import numpy as np

from arvision.models.common import top1_correct


def test_top1_correct_is_argmax_equality():
  logits = jax.random.normal(jax.random.key(0), (3, 50, 7))
  labels = jax.random.randint(jax.random.key(1), (3, 50), 0, 7)
  labels = labels.at[:, :10].set(jnp.argmax(logits[:, :10], axis=-1))  # some rows are right
  want = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  got = jax.jit(top1_correct)(logits, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  assert 0 < float(got.mean()) < 1
