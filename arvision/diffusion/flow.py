"""Flow matching with the linear (rectified-flow) interpolant, shared by the flow-based heads.

Convention: time runs from noise to data, `t in [0, 1]`,

  x_t = (1 - t) * noise + t * x1,      velocity target  v = d x_t / dt = x1 - noise,

so t = 0 is pure noise and t = 1 is data. Models are called as `model_fn(x_t, t, **kw)` with `t`
float32 `[B]` in this convention and return the velocity (x_t's shape). Samplers integrate from
t = 0 to t = 1 on a uniform grid of `num_steps` steps.

The stochastic sampler uses the marginal-preserving SDE of this interpolant. With
`E[noise | x_t] = x_t - t v(x_t, t)` the score is `s(x, t) = -(x - t v) / (1 - t)`, and for any
g(t) the SDE `dx = [v + g^2/2 s] dt + g dW` has the same marginals as the ODE `dx = v dt`. We take
`g(t)^2 = 2 k (1 - t)` with `k = diffusion_scale`, which cancels the 1/(1 - t) singularity:

  dx = [v - k (x - t v)] dt + sqrt(2 k (1 - t)) dW,

so `k = 0` is the ODE and the noise vanishes as t -> 1. The last step adds no noise.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[..., jax.Array]


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  """`t [B]` shaped `[B, 1, ...]` against `x`."""
  return t.reshape(t.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


class FlowMatching:
  """Linear-interpolant flow matching: loss and Euler / Euler-Maruyama samplers.

  Args:
    time_dist: training-time distribution of t: "uniform" on [0, 1) or "logit_normal"
      (sigmoid of N(0, 1), the SD3 choice that favours mid-range t).
  """

  def __init__(self, time_dist: str = "uniform"):
    if time_dist not in ("uniform", "logit_normal"):
      raise ValueError(f"time_dist={time_dist!r} is not supported; use 'uniform' or 'logit_normal'")
    self.time_dist = time_dist

  def interpolate(self, x1: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """`x_t = (1 - t) noise + t x1` for `t [B]`."""
    tb = _bcast(t, x1)
    return (1.0 - tb) * noise + tb * x1

  def sample_t(self, rng: jax.Array, batch: int) -> jax.Array:
    """Training times `[B]` float32 from `time_dist`."""
    if self.time_dist == "uniform":
      return jax.random.uniform(rng, (batch,), jnp.float32)
    return jax.nn.sigmoid(jax.random.normal(rng, (batch,), jnp.float32))

  def loss(self, model_fn: ModelFn, x1: jax.Array, rng: jax.Array, **model_kwargs) -> jax.Array:
    """Per-example velocity MSE `[B]` (mean over the non-batch axes) at random t and noise."""
    rng_t, rng_n = jax.random.split(rng)
    t = self.sample_t(rng_t, x1.shape[0])
    noise = jax.random.normal(rng_n, x1.shape, x1.dtype)
    v = model_fn(self.interpolate(x1, noise, t), t, **model_kwargs)
    err = (v - (x1 - noise)) ** 2
    return jnp.mean(err, axis=tuple(range(1, x1.ndim)))

  def sample_euler(
    self, model_fn: ModelFn, noise: jax.Array, num_steps: int, **model_kwargs
  ) -> jax.Array:
    """Euler integration of `dx = v dt` from t = 0 (`noise`) to t = 1 in `num_steps` steps."""
    B, dt = noise.shape[0], 1.0 / num_steps

    def body(i, x):
      t = jnp.full((B,), i * dt, jnp.float32)
      return x + dt * model_fn(x, t, **model_kwargs)

    return jax.lax.fori_loop(0, num_steps, body, noise)

  def sample_euler_maruyama(
    self,
    model_fn: ModelFn,
    noise: jax.Array,
    num_steps: int,
    rng: jax.Array,
    diffusion_scale=1.0,
    **model_kwargs,
  ) -> jax.Array:
    """Euler-Maruyama on `dx = [v - k (x - t v)] dt + sqrt(2 k (1 - t)) dW` (module docstring),
    `k = diffusion_scale` (may be traced); step i draws from `fold_in(rng, i)`; the last step is
    noiseless."""
    B, dt = noise.shape[0], 1.0 / num_steps

    def body(i, x):
      t = jnp.full((B,), i * dt, jnp.float32)
      v = model_fn(x, t, **model_kwargs)
      tb = _bcast(t, x)
      drift = v - diffusion_scale * (x - tb * v)
      g = jnp.sqrt(2.0 * diffusion_scale * (1.0 - tb))
      dw = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype) * jnp.sqrt(dt)
      last = (i == num_steps - 1).astype(x.dtype)
      return x + dt * drift + (1.0 - last) * g * dw

    return jax.lax.fori_loop(0, num_steps, body, noise)

  def sample_on_grid(
    self,
    model_fn: ModelFn,
    noise: jax.Array,
    times,
    rng: jax.Array | None = None,
    diffusion_scale=0.0,
    model_times=None,
    pass_step: bool = False,
    **model_kwargs,
  ) -> jax.Array:
    """Euler (`diffusion_scale` 0) or Euler-Maruyama (the SDE of the module docstring) on a
    given grid `times [S + 1]` (host numpy, increasing from noise towards data): S steps, step i
    from `times[i]` to `times[i + 1]`, drawing from `fold_in(rng, i)`; the last step is
    noiseless. Step i calls `model_fn(x, model_times[i])` (default `times[i]`): a network with
    its own time convention (xAR's noise level `1 - t`) gets its own values, computed on the host
    in float64 like the official grids, so its time embedding sees the same float32 numbers.
    With `pass_step` the call is `model_fn(x, t, i)` (per-step host tables, e.g. a CFG interval)."""
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or times.size < 2 or np.any(np.diff(times) <= 0):
      raise ValueError(f"times must be an increasing 1-D grid of >= 2 points, got {times}")
    S = times.size - 1
    model_times = times[:-1] if model_times is None else np.asarray(model_times)
    if model_times.shape != (S,):
      raise ValueError(f"model_times must have {S} entries (one per step), got {model_times.shape}")
    if rng is None and not (isinstance(diffusion_scale, (int, float)) and diffusion_scale == 0):
      raise ValueError("sample_on_grid: an Euler-Maruyama run (diffusion_scale != 0) needs an rng")
    t_S = jnp.asarray(times[:-1], jnp.float32)
    dt_S = jnp.asarray(np.diff(times), jnp.float32)
    mt_S = jnp.asarray(model_times, jnp.float32)
    B = noise.shape[0]

    def body(i, x):
      t_model = jnp.full((B,), mt_S[i], jnp.float32)
      v = (
        model_fn(x, t_model, i, **model_kwargs)
        if pass_step
        else model_fn(x, t_model, **model_kwargs)
      )
      tb, dt = jnp.full((B,), t_S[i], jnp.float32), dt_S[i]
      if rng is None:
        return x + dt * v
      tb = _bcast(tb, x)
      drift = v - diffusion_scale * (x - tb * v)
      g = jnp.sqrt(2.0 * diffusion_scale * (1.0 - tb))
      dw = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype) * jnp.sqrt(dt)
      last = (i == S - 1).astype(x.dtype)
      return x + dt * drift + (1.0 - last) * g * dw

    return jax.lax.fori_loop(0, S, body, noise)


__all__ = ["FlowMatching"]
