"""The generator base: what every generator family shares, so a family file holds only its model,
its loss and its sampling step.

A subclass sets the class attributes and implements `init_inputs`, `loss`, `_sample_impl` and
`sample_tokens`:

```python
class MyFamily(Generator):
  name = "mine"                                  # for error messages
  tokenizer_methods = ("encode_idx", "decode_idx")   # checked at build time
  sampler_static = ("return_logits",)            # static argnames of `_sample_impl`

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)          # checks, num_classes, the jitted sampler
    self.module = ...                            # a linen module
  def init_inputs(self): ...                     # dummy args of `module.init`
  def loss(self, params, batch, rng, train): ...
  def _sample_impl(self, params, labels, rng, ...): ...  # traced once per static setting
  def sample_tokens(self, params, labels, rng, **kw):
    labels = self.check_labels(labels)
    return self._sample_jit(params, labels, rng, ...)   # (images uint8, tokens, ...)

build = MyFamily.build
```

Labels are int `[B]` in `[0, num_classes]`; `num_classes` is the null (unconditional) class that
classifier-free guidance runs against (`labels_2B`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from arvision import errors, precision
from arvision.family import Family
from arvision.models import scan_layers
from arvision.models.common import images_to_uint8


def check_label_range(labels: np.ndarray, num_classes: int) -> None:
  """Raises `errors.UserError` naming every label outside `[0, num_classes]` (`num_classes` =
  the null class). Host-side on purpose: inside jit the embedding gather clamps an out-of-range
  index and would silently sample another class."""
  bad = sorted({int(x) for x in np.asarray(labels).ravel() if not 0 <= x <= num_classes})
  if bad:
    raise errors.UserError(
      f"labels {bad} are out of range for this {num_classes}-class model; accepted: "
      f"0..{num_classes - 1}, or {num_classes} for unconditional samples"
    )


class Generator(Family):
  """Base class of generator families on a frozen tokenizer (`params["tokenizer"]`).

  Attributes:
    name: the family's name in error messages.
    tokenizer_methods: methods the tokenizer family must have (checked at build time).
    sampler_static: static argnames of `_sample_impl` (everything else is traced).
    tokenizer: the frozen tokenizer family.
    num_classes: classes; label `num_classes` is the null class.
    trace_count: how many times the sampler was traced (tests check for recompiles).
  """

  kind = "generator"
  frozen_keys = ("tokenizer",)
  name = "generator"
  tokenizer_methods: tuple[str, ...] = ()
  sampler_static: tuple[str, ...] = ()

  def __init__(self, config, tokenizer):
    super().__init__(config)
    if tokenizer is None:
      raise ValueError(
        f"the {self.name} family needs a tokenizer family (build(config, tokenizer=...))"
      )
    for meth in self.tokenizer_methods:
      if not hasattr(tokenizer, meth):
        raise ValueError(
          f"tokenizer {type(tokenizer).__name__} lacks {meth!r}, needed by {self.name} "
          f"(needs {list(self.tokenizer_methods)})"
        )
    self.tokenizer = tokenizer
    # `config.model.scan_layers` needs a model written for it: a class opts in by setting
    # `accepts_scan_layers = True` on itself (not inherited: a subclass may change the blocks).
    if not type(self).__dict__.get("accepts_scan_layers", False):
      scan_layers.refuse(config, self.name)
    self.num_classes = int(config.data.num_classes)
    self.trace_count = 0

    # functools.wraps keeps `_sample_impl`'s signature, which jit reads for `static_argnames`.
    @functools.wraps(self._sample_impl)
    def counted(*args, **kwargs):
      self.trace_count += 1  # runs only while tracing
      # The family's compute dtype; no remat (nothing is differentiated while sampling).
      with precision.compute(self.policy.dtype):
        return self._sample_impl(*args, **kwargs)

    self._sample_jit = jax.jit(counted, static_argnames=self.sampler_static)

  @classmethod
  def build(cls, config, tokenizer=None):
    """Builds the family from its config and the (frozen) tokenizer family."""
    return cls(config, tokenizer)

  # --- params ------------------------------------------------------------------------------------

  def _vars(self, params) -> dict:
    """The module's variables: `params` without the frozen (loop-supplied) trees."""
    return {"params": {k: v for k, v in params.items() if k not in self.frozen_keys}}

  def init_inputs(self) -> tuple:
    """Positional dummy inputs of `self.module.init` (batch 1)."""
    raise NotImplementedError

  def init_rngs(self, rng: jax.Array) -> dict:
    """The rng streams `self.module.init` needs."""
    return {"params": rng}

  def init_annotated(self, rng: jax.Array, batch=None) -> dict:
    """The family's params boxed with logical axis names (the loop adds `params["tokenizer"]`)."""
    del batch  # the shapes come from the config
    variables = self.module.init(self.init_rngs(rng), *self.init_inputs(), train=False)
    return dict(variables["params"])

  def abstract_params(self):
    """Param shapes (`jax.eval_shape`, nothing allocated)."""
    return jax.eval_shape(lambda r: self.init(r, None), jax.random.key(0))

  def apply_module(self, params, *args, rng=None, train: bool = False, method=None):
    """`self.module.apply` on the family's variables; training needs a dropout `rng`."""
    if train and rng is None:
      raise ValueError(f"{type(self).__name__}.apply(train=True) needs an rng")
    rngs = {"dropout": rng} if train else {}
    with self.computing():
      return self.module.apply(self._vars(params), *args, train=train, rngs=rngs, method=method)

  # --- data --------------------------------------------------------------------------------------

  def batch_tokens(self, batch, shape: tuple, integer: bool, what: str):
    """`batch["tokens"]` checked against `[B, *shape]` (int or float), or None for an image
    batch (the caller encodes `batch["image"]` with the tokenizer)."""
    if "tokens" in batch:
      tokens = jnp.asarray(batch["tokens"])
      kind_ok = jnp.issubdtype(tokens.dtype, jnp.integer) or not integer
      if tokens.shape[1:] != tuple(shape) or tokens.ndim != 1 + len(shape) or not kind_ok:
        dims = ", ".join(str(d) for d in shape)
        raise ValueError(
          f"batch['tokens'] must be {'int' if integer else 'float'} [B, {dims}] ({what}), got "
          f"{tokens.dtype} {tokens.shape}"
        )
      return tokens
    if "image" not in batch:
      raise ValueError(f"{self.name} batch needs 'image' or 'tokens'; got keys {sorted(batch)}")
    return None

  # --- sampling ----------------------------------------------------------------------------------

  def check_labels(self, labels) -> jax.Array:
    """Labels as an int array `[B]` in `[0, num_classes]` (`num_classes` = the null class).

    Concrete labels are range-checked; traced labels (a caller's own jit) only shape-checked.
    """
    if not isinstance(labels, jax.core.Tracer):
      arr = np.asarray(labels)
      if arr.ndim == 1 and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be int class indices, got dtype {arr.dtype}")
      if arr.ndim == 1:
        check_label_range(arr, self.num_classes)
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
      raise ValueError(f"labels must be int [B], got shape {labels.shape}")
    return labels

  def labels_2B(self, labels: jax.Array) -> jax.Array:
    """`[labels; null class]`, int32 `[2B]`: the conditional and unconditional halves of CFG."""
    labels = labels.astype(jnp.int32)
    return jnp.concatenate([labels, jnp.full_like(labels, self.num_classes)])

  def decode_images(self, params, latent, method: str) -> jax.Array:
    """uint8 NHWC images from the tokenizer's `method(params["tokenizer"], latent)`."""
    img = getattr(self.tokenizer, method)(params["tokenizer"], latent)
    return images_to_uint8(img.astype(jnp.float32))

  def _sample_impl(self, params, labels, rng, *args, **kwargs):
    """The whole sampler, traced once per static setting; returns `(images uint8, ...)`."""
    raise NotImplementedError

  def sample_tokens(self, params, labels, rng, **kw):
    """`(images uint8 [B, H, W, C], tokens, ...)` for int labels `[B]`."""
    raise NotImplementedError

  def sample(self, params, cond, rng, **kw) -> jax.Array:
    """uint8 NHWC images for int labels `cond [B]` (keywords: see `sample_tokens`)."""
    return self.sample_tokens(params, cond, rng, **kw)[0]
