"""JAX's persistent compilation cache, on by default: a rerun skips the compiles it already paid.

`enable()` points `jax_compilation_cache_dir` at `<cache root>/jax` (the cache root is
`$ARVISION_CACHE`, else `$XDG_CACHE_HOME/arvision`, else `~/.cache/arvision`: the same root as the
converted checkpoints, `arvision.hub.cache_root`). The CLI (`train`, `eval`, `sample`, `tokenize`,
`demo`) and `arvision.load` call it; `--no_compile_cache` or `ARVISION_COMPILE_CACHE=0` keeps it
off. Settings the user made through JAX itself win: a `jax_compilation_cache_dir` already set
(e.g. `JAX_COMPILATION_CACHE_DIR`) is kept, and so is each `JAX_PERSISTENT_CACHE_*` /
`JAX_COMPILATION_CACHE_MAX_SIZE` variable that is set.

The cache is keyed by the program, the jax/jaxlib version, the backend and the XLA flags, so a
changed model, device or version compiles afresh; the entries are trusted code (do not share
the directory with users you do not trust; JAX's documentation says the same).
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV = "ARVISION_COMPILE_CACHE"  # "0" (or false/off/no): leave the cache off
# Only compiles that took at least this long are written: below it, reading an entry back saves
# little, and the many tiny jits (rng splits, casts) would fill the directory.
MIN_COMPILE_TIME_SECS = 0.5
MAX_SIZE_BYTES = 4 << 30  # least-recently-used entries are evicted beyond this


def disabled_by_env() -> bool:
  return os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no")


def default_dir() -> str:
  from arvision import hub  # noqa: PLC0415 -- the cache root lives with the converted checkpoints

  return os.path.join(hub.cache_root(), "jax")


def enable(directory: str | None = None) -> str | None:
  """Turns on the persistent compilation cache; returns its directory (None: left off).

  Idempotent; safe after other jits ran (JAX opens the cache at the first compile that follows).
  Args:
    directory: where to keep it (default `default_dir()`); ignored when JAX already has one.
  """
  if disabled_by_env():
    return None
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  directory = directory or default_dir()
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # a read-only home: run without the cache rather than fail
    logging.warning("compilation cache off: cannot create %s (%s)", directory, e)
    return None
  settings = {
    "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_SECS,
    "jax_compilation_cache_max_size": MAX_SIZE_BYTES if _has_filelock() else -1,
  }
  for name, value in settings.items():
    if name.upper() not in os.environ:
      jax.config.update(name, value)
  jax.config.update("jax_compilation_cache_dir", directory)
  logging.info("persistent compilation cache: %s", directory)
  return directory


def _has_filelock() -> bool:
  """JAX's size-bounded cache locks its files with `filelock` (a huggingface_hub dependency)."""
  try:
    import filelock  # noqa: F401, PLC0415
  except ImportError:
    return False
  return True
