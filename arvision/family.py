"""The Family interface: one shape for every model the loop trains.

A family is built from its config by `arvision.families.build`. The loop only ever calls the methods
below, so adding a model never touches `train.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from arvision import precision

Params = Any
Batch = dict[str, jax.Array]

KINDS = ("tokenizer", "generator", "classifier")


class Family:
  """Base class for model families (generators, tokenizers, classifiers).

  Attributes:
    kind: one of `KINDS`; decides which evaluation the loop runs.
    frozen_keys: top-level param keys that the loop supplies (e.g. "tokenizer") and never trains.
    config: the family's resolved config.
  """

  kind: str = "generator"
  frozen_keys: tuple[str, ...] = ()

  def __init__(self, config):
    self.config = config
    # Compute dtype and remat mode of this family's forward (`config.model.dtype`,
    # `config.remat`), checked now; `computing()` applies them while a forward is traced.
    self.policy = precision.policy_of(config)

  def computing(self):
    """Context for tracing this family's forward in its compute dtype and remat mode."""
    return precision.compute(self.policy.dtype, self.policy.remat)

  def init(self, rng: jax.Array, batch: Batch | None = None) -> Params:
    """Returns the trainable params (without `frozen_keys`) as plain arrays. Families whose shapes
    come from the config alone (generators, tokenizers) take `batch=None`."""
    return nn.unbox(self.init_annotated(rng, batch))

  def init_annotated(self, rng: jax.Array, batch: Batch) -> Params:
    """The params of `init`, with leaves boxed (`nn.Partitioned`) by their logical axis names
    (`arvision.parallel.logical`). Families override this; unannotated leaves are replicated."""
    raise NotImplementedError

  def logical_axes(self, batch: Batch) -> Params:
    """A `PartitionSpec` of logical axis names per param leaf (nothing is allocated)."""
    abstract = jax.eval_shape(self.init_annotated, jax.random.key(0), batch)
    return nn.get_partition_spec(abstract)

  def load_frozen(self, workdir: str) -> dict:
    """Frozen params the family needs beyond its tokenizer, keyed by top-level param name (e.g.
    HMAR stage 2: its stage-1 model); the loop adds them to the state's frozen params."""
    del workdir
    return {}

  def init_frozen(self, rng: jax.Array) -> dict:
    """Random stand-ins for `load_frozen`'s params (tests, benchmarks)."""
    del rng
    return {}

  def loss(self, params: Params, batch: Batch, rng: jax.Array, train: bool):
    """Returns `(loss, metrics)`: a scalar and a dict of scalars. Must be jit-able."""
    raise NotImplementedError

  def sample(self, params: Params, cond: jax.Array, rng: jax.Array, **kw) -> jax.Array:
    """Generators: images (uint8 NHWC) for int labels `cond`. Static shapes, jit-able."""
    raise NotImplementedError(f"{type(self).__name__} does not sample")

  def sample_defaults(self) -> dict:
    """Sampling keyword arguments taken from the config (`config.sample`)."""
    return dict(self.config.get("sample", {}))
