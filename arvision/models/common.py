"""Helpers every generator family shares."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision.target import backend


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


@jax.custom_vjp
def _add_bias_2d(y_MxN: jax.Array, bias_N: jax.Array) -> jax.Array:
  """`y + bias` whose bias gradient is the product `ones[1, M] @ g` (float32 accumulation).

  XLA folds the reshape of a `[B, L, N]` gradient into its sum over M = B * L, and then runs
  it as the slow two-leading-axes reduction again; a product is left as it is.
  """
  return y_MxN + bias_N


def _add_bias_2d_fwd(y_MxN, bias_N):
  return y_MxN + bias_N, None


def _add_bias_2d_bwd(_, g_MxN):
  # y and bias share the compute dtype (Dense promotes both), so g's dtype is the bias's.
  ones_1xM = jnp.ones((1, g_MxN.shape[0]), g_MxN.dtype)
  g_bias = jax.lax.dot(ones_1xM, g_MxN, preferred_element_type=jnp.float32)[0]
  return g_MxN, g_bias.astype(g_MxN.dtype)


_add_bias_2d.defvjp(_add_bias_2d_fwd, _add_bias_2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_2d(x_MxK: jax.Array, w_KxN: jax.Array, precision) -> jax.Array:
  """`x @ w` whose kernel gradient is computed as `(g^T x)^T` when K > N.

  Why: XLA:CPU runs the kernel gradient `x^T g` (a product over the long M = B * L axis) on its
  own dot path, not YNNPACK's, and there its speed depends on the operand order: with the wider
  operand first (an FFN's fc2, `[M, 4C]^T [M, C]`) it is much slower than the same product with
  the narrower one first (experiments/bench_kernel_grad.py: 1.46x at VAR `fmnist`'s fc2 on 2
  cores). `g^T x` puts the narrow operand first; the barrier keeps XLA from folding the small
  `[N, K]` transpose back into the product (which would restore the slow order).
  """
  return jax.lax.dot_general(x_MxK, w_KxN, (((1,), (0,)), ((), ())), precision=precision)


def _matmul_2d_fwd(x_MxK, w_KxN, precision):
  return _matmul_2d(x_MxK, w_KxN, precision), (x_MxK, w_KxN)


def _matmul_2d_bwd(precision, res, g_MxN):
  x_MxK, w_KxN = res
  g_x = jax.lax.dot_general(g_MxN, w_KxN, (((1,), (1,)), ((), ())), precision=precision)
  contract_m = (((0,), (0,)), ((), ()))
  if w_KxN.shape[0] > w_KxN.shape[1]:
    g_w = jax.lax.optimization_barrier(
      jax.lax.dot_general(g_MxN, x_MxK, contract_m, precision=precision)
    ).T
  else:
    g_w = jax.lax.dot_general(x_MxK, g_MxN, contract_m, precision=precision)
  return g_x.astype(x_MxK.dtype), g_w.astype(w_KxN.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def add_bias(x: jax.Array, bias_N: jax.Array) -> jax.Array:
  """`x + bias` over the last axis; on CPU as `[M, N] + [N]` with the bias gradient a product
  (`_add_bias_2d`), instead of XLA:CPU's slow sum of the gradient over the leading axes."""
  if x.ndim <= 2 or backend() != "cpu":
    return x + bias_N
  return _add_bias_2d(x.reshape(-1, x.shape[-1]), bias_N).reshape(x.shape)


class Dense(nn.Dense):
  """`nn.Dense` (the same fields, params and names); on CPU a `[..., K]` input runs as one 2-D
  `[M, K] x [K, N]` product plus bias, reshaped back.

  Why: for the 3-D `[B, L, K] x [K, N]` product XLA:CPU computes the kernel gradient from a
  transposed copy of the `[B, L, N]` output gradient (one per layer, with the gradient's
  elementwise producers fused into it and recomputed per copy); the 2-D product needs no copy.
  Its bias gradient, a sum over the two leading axes, XLA:CPU's reduction emitter runs ~15x
  slower than a sum over one `[M, N]` axis (and folds a reshape back into that form), so it is
  taken as a product (`_add_bias_2d`); the kernel gradient takes the operand order that runs
  fast there (`_matmul_2d`). The reshapes are free on CPU; other backends run the
  unchanged `nn.Dense` (a TPU would pay a relayout to merge a sequence axis that is not a
  multiple of 8 into the batch).
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self.dot_general is not None or self.dot_general_cls is not None:
      raise ValueError("arvision Dense runs lax.dot_general; dot_general(_cls) is not supported")
    kernel = self.param(
      "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
    )
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    flat = inputs.ndim > 2 and backend() == "cpu"
    x = inputs.reshape(-1, inputs.shape[-1]) if flat else inputs
    if flat:
      y = _matmul_2d(x, kernel, self.precision)
    else:
      y = jax.lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision
      )
    if bias is not None:
      y = _add_bias_2d(y, bias) if flat else y + bias
    return y.reshape(*inputs.shape[:-1], self.features) if flat else y
