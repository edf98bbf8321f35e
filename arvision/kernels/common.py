"""Small helpers shared by the Pallas kernels."""

import jax


def cdiv(a, b):
  """Ceiling division (ints or numpy arrays)."""
  return -(-a // b)


def resolve_interpret(interpret: bool | None) -> bool:
  """None means Pallas interpret mode exactly when the default backend is the CPU."""
  return jax.default_backend() == "cpu" if interpret is None else bool(interpret)
