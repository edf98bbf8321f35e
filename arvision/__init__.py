"""arvision: visual autoregressive image generation in JAX/Flax."""

from arvision import xla_flags as _xla_flags

__version__ = "0.1.0"

_xla_flags.apply_defaults()  # before jax creates a backend; never overrides the user's XLA_FLAGS


def load(path: str, use_ema: bool = True):
  """`model = arvision.load(WORKDIR_OR_CONVERTED_DIR)`; see `arvision.api.load`."""
  from arvision.api import load as _load

  return _load(path, use_ema=use_ema)
