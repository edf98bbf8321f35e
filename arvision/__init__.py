"""arvision: visual autoregressive image generation in JAX/Flax."""

__version__ = "0.1.0"


def load(path: str, use_ema: bool = True):
  """`model = arvision.load(WORKDIR_OR_CONVERTED_DIR)`; see `arvision.api.load`."""
  from arvision.api import load as _load

  return _load(path, use_ema=use_ema)
