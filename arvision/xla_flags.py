"""XLA flags arvision sets by default, before jax initialises its backends.

CPU: `--xla_cpu_experimental_ynn_fusion_type=dot` -- in jaxlib 0.10 XLA:CPU hands dots,
elementwise ops and reductions to YNNPACK fusions by default; its reductions run the attention
softmax and its gradient several times slower than XLA's own loops (a VAR training step spent
~20% of its time in four such reductions), while its dots are the fast path. Keeping YNNPACK for
dots only made the `configs/var.py:fmnist` training step ~1.2x faster on a 2-core CPU
(experiments/profile_train_step.py, experiments/bench_train.py). GPU/TPU backends ignore it.

A flag the user already put in `XLA_FLAGS` is never overridden, and setting
`ARVISION_XLA_DEFAULTS=0` disables these defaults. They only take effect if arvision is imported
before jax creates its CPU client (the first computation).
"""

from __future__ import annotations

import importlib.metadata
import os

# flag name -> value; added to XLA_FLAGS unless the flag is already there.
CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}
# The jaxlib versions whose XLA knows these flags (an unknown flag aborts the process).
MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
  try:
    text = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return ()
  parts = []
  for p in text.split(".")[:2]:
    digits = "".join(c for c in p if c.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def apply_defaults(environ=os.environ) -> str:
  """Adds the default flags missing from `environ["XLA_FLAGS"]`; returns the new value."""
  current = environ.get("XLA_FLAGS", "")
  if environ.get("ARVISION_XLA_DEFAULTS", "1") == "0" or _jaxlib_version() < MIN_JAXLIB:
    return current
  extra = [f"--{k}={v}" for k, v in CPU_DEFAULTS.items() if f"--{k}" not in current]
  if extra:
    environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return environ.get("XLA_FLAGS", "")
