"""Notebook API: `model = arvision.load(path)`; `images = model.sample(labels, rng, cfg=1.5)`."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from arvision import checkpoint as ckpt_lib
from arvision import errors, families
from arvision.models.generator import check_label_range


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

  @property
  def num_classes(self) -> int:
    return int(getattr(self.family, "num_classes", self.config.data.num_classes))

  def check_labels(self, labels) -> np.ndarray:
    """int32 `[B]` labels, each in `[0, num_classes]` (`num_classes` = unconditional).

    Checked on the host: inside jit an out-of-range index is clamped by the gather, which would
    silently sample another class.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
      raise errors.UserError(
        f"labels must be a non-empty 1-D list of int class indices, got {arr.dtype} {arr.shape}"
      )
    check_label_range(arr, self.num_classes)
    return arr.astype(np.int32)

  def sample_options(self) -> list[str] | None:
    """The keyword arguments `sample` accepts, read from the family's sampler signatures
    (`sample`, then `sample_tokens` when `sample` forwards `**kw`); None when no signature
    names them."""
    names = set(self.family.sample_defaults())
    for fn in (self.family.sample, getattr(self.family, "sample_tokens", None)):
      if fn is None:
        return None
      params = list(inspect.signature(fn).parameters.values())
      names |= {
        p.name
        for p in params[3:]  # after (params, labels, rng)
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
      }
      if not any(p.kind == p.VAR_KEYWORD for p in params):
        return sorted(names)
    return None

  def check_sample_kw(self, kw: dict) -> dict:
    """`kw` itself; an error naming the unknown keys and the accepted ones."""
    options = self.sample_options()
    unknown = sorted(set(kw) - set(options)) if options is not None else []
    if unknown:
      raise errors.UserError(
        f"sampling option(s) {unknown} are unknown to family {self.config.family!r}; accepted: "
        f"{options}"
      )
    return kw

  def sample(self, labels, rng=None, progress: bool = False, **kw) -> np.ndarray:
    """uint8 NHWC images for int `labels`; `kw` overrides the config's sampling settings.

    `progress` shows a bar with the compile and sample phases (the sampler is one jitted call,
    so its steps have no finer progress to report)."""
    labels = self.check_labels(labels)
    self.check_sample_kw(kw)
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(rng, int):
      rng = jax.random.key(rng)
    kw = dict(self.family.sample_defaults(), **kw)
    fn, args = self._fn("sample", **kw), (self.params, jnp.asarray(labels, jnp.int32), rng)
    if not progress:
      return np.asarray(fn(*args))
    from tqdm.auto import tqdm  # noqa: PLC0415

    with tqdm(total=2, desc="compile", unit="phase") as bar:
      compiled = fn.lower(*args).compile()
      bar.update(1)
      bar.set_description(f"sample {len(labels)}")
      out = np.asarray(compiled(*args))
      bar.update(1)
    return out

  def reconstruct(self, images):
    """Tokenizers: (reconstruction in [-1, 1], codes) for images in [-1, 1]."""
    return self._fn("reconstruct")(self.params, jnp.asarray(images, jnp.float32))

  def __repr__(self):
    n = sum(x.size for x in jax.tree.leaves(self.params))
    return f"Model(family={self.config.family!r}, step={self.step}, params={n:,})"


def load(path: str, use_ema: bool = True, tokenizer: str | None = None) -> Model:
  """Loads a workdir, an `arvision convert` / `arvision export` output dir, a zoo model
  (`"var-d16"`, see `arvision zoo`) or an official file on the Hub (`"hf://<repo>/<file>"`).

  Zoo and Hub models are downloaded (huggingface_hub's cache), converted once and cached
  (`arvision.hub`); `tokenizer` names the tokenizer of an `hf://` generator (a zoo name, an
  `hf://` file or a converted dir; default: the family's official one). For a workdir, a damaged
  newest step is moved aside and the newest step that restores is used (with a warning; see
  `arvision.checkpoint`). Turns on the persistent compilation cache (`arvision.compile_cache`;
  `ARVISION_COMPILE_CACHE=0` keeps it off).
  """
  from arvision import compile_cache, export, hub  # noqa: PLC0415

  compile_cache.enable()  # a notebook restart loads the sampler instead of compiling it again
  path = hub.resolve(path, tokenizer=tokenizer)
  if export.is_safetensors_export(path):
    return from_params(*export.read_safetensors(path))
  loaded = ckpt_lib.load_params(path)
  config = ckpt_lib.read_config(path, loaded["step"])
  params = loaded["ema"] if use_ema and "ema" in loaded else loaded["params"]
  params = {**params, **loaded.get("frozen", {})}
  return from_params(params, config, loaded["step"])


def from_params(params, config, step: int = 0) -> Model:
  """A `Model` over a full param tree (trainable + frozen entries) and its config."""
  tokenizer = families.build(config.tokenizer.config) if families.needs_tokenizer(config) else None
  family = families.build(config, tokenizer=tokenizer)
  params = jax.tree.map(jnp.asarray, params)
  return Model(family, params, config, step)
