"""arvision's Dense: nn.Dense's params, outputs and gradients, as a 2-D product on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.models.common import Dense


# (8 -> 16): the kernel gradient as x^T g; (24 -> 16): as (g^T x)^T (`_matmul_2d`, K > N).
@pytest.mark.parametrize(
  "shape, use_bias", [((3, 5, 8), True), ((2, 3, 4, 8), False), ((3, 5, 24), True)]
)
def test_dense_matches_flax_dense(shape, use_bias):
  x = jax.random.normal(jax.random.key(0), shape)
  ours, ref = Dense(16, use_bias=use_bias), nn.Dense(16, use_bias=use_bias)
  params = ref.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
  ours_params = ours.init(jax.random.key(1), x)
  assert jax.tree.structure(ours_params) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)

  def loss(module):
    return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

  y, y_ref = ours.apply(params, x), ref.apply(params, x)
  assert y.shape == y_ref.shape == (*shape[:-1], 16)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_dense_refuses_a_custom_dot_general():
  with pytest.raises(ValueError, match="dot_general"):
    Dense(4, dot_general=jax.lax.dot_general).init(jax.random.key(0), jnp.ones((2, 3)))


def test_kernel_gradient_puts_the_narrow_operand_first():
  """K > N: the kernel gradient is the product g^T x behind a barrier, then a transpose (the
  order XLA:CPU runs fast); K <= N keeps x^T g."""

  def grad_jaxpr(k, n):
    module = Dense(n)
    x = jnp.ones((2, 3, k))
    params = module.init(jax.random.key(0), x)
    return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply(p, x))))(params))

  assert "optimization_barrier" in grad_jaxpr(24, 8)
  assert "optimization_barrier" not in grad_jaxpr(8, 24)
