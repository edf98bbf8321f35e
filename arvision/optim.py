"""Optimizer factory: AdamW with warmup + hold + cosine/linear decay, clipping, a weight-decay mask."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")
LR_SCALINGS = ("none", "batch256")


def peak_lr(optim_config, batch_size: int) -> float:
  """`optim.lr`, scaled by batch/256 when `optim.lr_scaling="batch256"` (VAR, MAR recipes)."""
  if optim_config.lr_scaling not in LR_SCALINGS:
    raise ValueError(
      f"optim.lr_scaling={optim_config.lr_scaling!r} is unknown; accepted: {LR_SCALINGS}"
    )
  if optim_config.lr_scaling == "batch256":
    return optim_config.lr * batch_size / 256
  return optim_config.lr


def schedule(optim_config, total_steps: int, batch_size: int) -> optax.Schedule:
  """Linear warmup from 0, optional hold at the peak, then decay to `end_lr_factor * peak`."""
  if optim_config.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={optim_config.schedule!r} is unknown; accepted: {SCHEDULES}")
  peak = peak_lr(optim_config, batch_size)
  warmup, hold = int(optim_config.warmup_steps), int(optim_config.hold_steps)
  decay_steps = max(total_steps - warmup - hold, 1)
  end = peak * optim_config.end_lr_factor
  if optim_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_config.end_lr_factor)
  elif optim_config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  parts = [optax.linear_schedule(0.0, peak, warmup)] if warmup else []
  parts += [optax.constant_schedule(peak)] if hold else []
  boundaries = [warmup] if warmup else []
  boundaries += [warmup + hold] if hold else []
  return optax.join_schedules(parts + [decay], boundaries) if parts else decay


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decay_mask(params, no_decay_patterns) -> object:
  """True where weight decay applies: >= 2-D params whose path matches no `no_decay` regex."""
  regexes = [re.compile(p) for p in no_decay_patterns]

  def decays(path, leaf):
    name = _path_str(path)
    return jnp.ndim(leaf) >= 2 and not any(r.search(name) for r in regexes)

  return jax.tree_util.tree_map_with_path(decays, params)


def make(
  optim_config, total_steps: int, batch_size: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns the optimizer and its learning-rate schedule (logged as `lr`)."""
  lr = schedule(optim_config, total_steps, batch_size)
  parts = []
  if optim_config.clip_norm:
    parts.append(optax.clip_by_global_norm(optim_config.clip_norm))
  parts.append(optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps))
  if optim_config.weight_decay:
    parts.append(
      optax.add_decayed_weights(
        optim_config.weight_decay, mask=lambda p: decay_mask(p, optim_config.no_decay)
      )
    )
  parts.append(optax.scale_by_learning_rate(lr))
  return optax.chain(*parts), lr
