"""The platform a traced program is compiled for, when it is not this host's default backend.

`arvision.parallel.aot` compiles for a TPU (or lowers for a GPU) from a CPU host; within
`target_backend("tpu")`, `arvision.ops.attention`'s `impl="auto"` and the Pallas kernels choose as
they would on that platform (splash compiled by Mosaic, not Pallas interpret mode). No arvision
imports: the ops and the kernels both read it.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

PLATFORMS = ("tpu", "gpu", "cpu")
_TARGET: contextvars.ContextVar = contextvars.ContextVar("arvision_target_backend", default=None)


@contextlib.contextmanager
def target_backend(platform: str):
  """Within this context (while tracing), choose implementations for `platform`."""
  if platform not in PLATFORMS:
    raise ValueError(f"target_backend: platform must be one of {PLATFORMS}, got {platform!r}")
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def backend() -> str:
  """The platform implementations are chosen for: `target_backend`'s, else the default backend."""
  return _TARGET.get() or jax.default_backend()
