"""Notebook API: `model = arvision.load(path)`; `images = model.sample(labels, rng, cfg=1.5)`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from arvision import checkpoint as ckpt_lib
from arvision import families


class Model:
  """A trained (or converted) family with its params, ready to sample or reconstruct."""

  def __init__(self, family, params, config, step: int):
    self.family, self.params, self.config, self.step = family, params, config, step
    self._jitted = {}

  def _fn(self, name: str, **kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in self._jitted:  # one compilation per (method, settings); shapes cached by jit
      self._jitted[key] = jax.jit(functools.partial(getattr(self.family, name), **kw))
    return self._jitted[key]

  def sample(self, labels, rng=None, **kw) -> np.ndarray:
    """uint8 NHWC images for int `labels`; `kw` overrides the config's sampling settings."""
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    kw = dict(self.family.sample_defaults(), **kw)
    out = self._fn("sample", **kw)(self.params, jnp.asarray(labels, jnp.int32), rng)
    return np.asarray(out)

  def reconstruct(self, images):
    """Tokenizers: (reconstruction in [-1, 1], codes) for images in [-1, 1]."""
    return self._fn("reconstruct")(self.params, jnp.asarray(images, jnp.float32))

  def __repr__(self):
    n = sum(x.size for x in jax.tree.leaves(self.params))
    return f"Model(family={self.config.family!r}, step={self.step}, params={n:,})"


def load(path: str, use_ema: bool = True) -> Model:
  """Loads the newest checkpoint of a workdir or of an `arvision convert` output dir."""
  config = ckpt_lib.read_config(path)
  loaded = ckpt_lib.load_params(path)
  params = loaded["ema"] if use_ema and "ema" in loaded else loaded["params"]
  params = {**params, **loaded.get("frozen", {})}
  tokenizer = families.build(config.tokenizer.config) if families.needs_tokenizer(config) else None
  family = families.build(config, tokenizer=tokenizer)
  params = jax.tree.map(jnp.asarray, params)
  return Model(family, params, config, loaded["step"])
