"""Small helpers shared by the Pallas kernels."""

from arvision.target import backend


def cdiv(a, b):
  """Ceiling division (ints or numpy arrays)."""
  return -(-a // b)


def resolve_interpret(interpret: bool | None) -> bool:
  """None means Pallas interpret mode exactly when the target is the CPU: the default backend, or
  the platform of an active `arvision.target.target_backend` (ahead-of-time compiles)."""
  if interpret is not None:
    return bool(interpret)
  return backend() == "cpu"
