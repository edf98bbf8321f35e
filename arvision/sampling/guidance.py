"""Classifier-free guidance: the one mixing formula and the schedules the families use.

Every family mixes a conditional and an unconditional prediction (logits, or a diffusion head's
eps) the LlamaGen way, `uncond + s * (cond - uncond)`; the families differ only in how the scale
`s` moves over the decoding steps:

- VAR: `(1 + t) cond - t uncond` with `t = cfg * k / (n - 1)` over the n scales is this formula
  with `s = 1 + t` (`linear_excess`); the first scale is unguided.
- MAR: `s_k = 1 + (cfg - 1) (L - mask_len_k) / L` over the AR steps (`linear_progress` of
  `mar_progress`), or `constant`.
- LlamaGen: a constant `s = cfg`, switched off after `cfg_interval` decode steps (`interval`).
- any per-step list of scales (`per_step`).

Schedules take the step index as an int, a numpy array (all steps at once) or a traced scalar
(inside a `fori_loop`), and `cfg` may be traced, so changing it never recompiles a sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def mix(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
  """The guidance formula of every family: `uncond + scale * (cond - uncond)`."""
  return uncond + scale * (cond - uncond)


def guide(cond: jax.Array, uncond: jax.Array, scale, active=None) -> jax.Array:
  """`mix(cond, uncond, scale)` where `active`, else `cond` itself.

  `active` defaults to `scale != 1`: at scale 1 the mix equals `cond` in exact arithmetic, and
  returning `cond` keeps unguided steps bit-exact (float `u + (c - u)` is not always `c`).
  """
  if active is None:
    active = jnp.asarray(scale) != 1.0
  return jnp.where(active, mix(cond, uncond, scale), cond)


def constant(cfg, step):
  """`s_k = cfg` at every step."""
  return jnp.asarray(cfg, jnp.float32) + jnp.zeros(np.shape(step), jnp.float32)


def linear_excess(cfg, step, num_steps: int):
  """VAR's schedule: `s_k = 1 + cfg * k / (n - 1)` (`cfg` is the excess `t` at the last step;
  the first step is unguided; n = 1 gives s = 1)."""
  ratio = step / (num_steps - 1) if num_steps > 1 else step * 0.0
  return 1.0 + cfg * ratio


def mar_progress(mask_len: Sequence[int] | np.ndarray, seq_len: int) -> np.ndarray:
  """MAR's guidance progress per AR step, `(L - mask_len_k) / L` (numpy, static)."""
  return (seq_len - np.asarray(mask_len)) / seq_len


def linear_progress(cfg, progress):
  """MAR's linear schedule: `s_k = 1 + (cfg - 1) * progress_k` (progress in [0, 1])."""
  return 1.0 + (cfg - 1.0) * progress


def interval(cfg, step, cfg_interval):
  """LlamaGen's `cfg_interval`: `s = cfg`, but 1 (unguided) for token `step` (0-based) once the
  decode step `step - 1` exceeds `cfg_interval`, when `cfg_interval > -1`. The first token is
  always guided."""
  off = jnp.logical_and(cfg_interval > -1, jnp.asarray(step) - 1 > cfg_interval)
  return jnp.where(off, 1.0, jnp.asarray(cfg, jnp.float32))


def per_step(scales: Sequence[float], step, num_steps: int):
  """A given scale per step: `s_k = scales[k]`; `len(scales)` must equal `num_steps`."""
  scales = tuple(float(s) for s in scales)
  if len(scales) != num_steps:
    raise ValueError(
      f"a per-step guidance schedule needs one scale per step ({num_steps}); got {len(scales)}: "
      f"{scales}"
    )
  return jnp.asarray(scales, jnp.float32)[step]
