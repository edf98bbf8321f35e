"""XLA flags arvision sets by default, before jax initialises its backends.

CPU: `--xla_cpu_experimental_ynn_fusion_type=dot` -- in jaxlib 0.10 XLA:CPU hands dots,
elementwise ops and reductions to YNNPACK fusions by default; its reductions run the attention
softmax and its gradient several times slower than XLA's own loops (a VAR training step spent
~20% of its time in four such reductions), while its dots are the fast path. Keeping YNNPACK for
dots only made the `configs/var.py:fmnist` training step ~1.2x faster on a 2-core CPU
(experiments/profile_train_step.py, experiments/bench_train.py). GPU/TPU backends ignore it.

CPU: `--xla_force_host_platform_device_count=2` on a host with two or more cores -- the CPU
backend then has two devices, and the train loop's mesh (`config.mesh`, data=-1) splits each batch
over them, so two halves of the step run side by side. One XLA:CPU device keeps about 1.75 of 2
cores busy on a small model's training step (many small fusions, each with a serial tail, run
one after another); two devices fill each other's gaps (~1.9 of 2 busy), which made the
`configs/var.py:fmnist` step faster (experiments/bench_train.py; the README's performance table).
The numbers do not depend on it (up to float summation order): the batch split is the
data-parallel mesh every strategy already supports, and random draws are partitionable
(`jax_threefry_partitionable`). Two, not one per core:
on a larger host the dots already use all cores; the second device is for the gaps.

A flag the user already put in `XLA_FLAGS` is never overridden, and setting
`ARVISION_XLA_DEFAULTS=0` disables these defaults. They only take effect if arvision is imported
before jax creates its CPU client (the first computation).
"""

from __future__ import annotations

import importlib.metadata
import os

# flag name -> value; added to XLA_FLAGS unless the flag is already there.
CPU_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}
# CPU devices (see above); only on hosts with at least this many cores.
CPU_DEVICES = 2


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # not Linux
    return os.cpu_count() or 1


def defaults() -> dict[str, str]:
  """The flags `apply_defaults` adds on this host (before the user's own take precedence)."""
  out = dict(CPU_DEFAULTS)
  if _cores() >= CPU_DEVICES:
    out["xla_force_host_platform_device_count"] = str(CPU_DEVICES)
  return out


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
  extra = [f"--{k}={v}" for k, v in defaults().items() if f"--{k}" not in current]
  if extra:
    environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
  return environ.get("XLA_FLAGS", "")
