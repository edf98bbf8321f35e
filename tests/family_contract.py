"""The checks of the family contract (tests/test_family_contract*.py run them per family)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from arvision import families
from arvision.family import KINDS
from arvision.parallel.logical import LOGICAL_AXES

# The spine's families (and the tokenizer/classifier kinds); every other registered family is a
# successor. Two test files split them so `pytest -n 2 --dist loadfile` runs them on both workers.
CORE = ("tokenizer", "classifier", "var", "raster", "mar")
SUCCESSORS = tuple(sorted(set(families.FAMILIES) - set(CORE)))

# Sampling settings that are traced values (not static) in every generator that takes them, and a
# different value for each: changing them must reuse the compiled sampler.
TRACED_SETTINGS = {
  "cfg": lambda v: float(v) + 1.0,
  "temperature": lambda v: 0.8 * float(v),
  "top_k": lambda v: 3 if int(v) != 3 else 5,
  "top_p": lambda v: 0.9 if float(v) != 0.9 else 0.8,
  "cfg_interval": lambda v: 2 if int(v) != 2 else 3,
}


def _is_box(x):
  return isinstance(x, nn.Partitioned)


def check_init(name, smoke):
  s = smoke(name)
  fam = s.family
  assert fam.kind in KINDS
  trainable = s.trainable()
  leaves = jax.tree.leaves(trainable)
  assert leaves and not set(trainable) & set(fam.frozen_keys)
  for x in leaves:
    assert np.all(np.isfinite(np.asarray(x))), name
  boxed = jax.eval_shape(fam.init_annotated, jax.random.key(0), s.batch(2))
  boxed_leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=_is_box)
  for path, leaf in boxed_leaves:
    key = jax.tree_util.keystr(path)
    assert _is_box(leaf), f"{name}: param {key} has no logical axis names"
    names = tuple(leaf.names)
    assert len(names) == leaf.value.ndim, f"{name}: {key} names {names} vs {leaf.value.shape}"
    named = [n for n in names if n is not None]
    assert named or not names, f"{name}: param {key} {leaf.value.shape} names no dimension"
    bad = [n for n in named if n not in LOGICAL_AXES]
    assert not bad, f"{name}: {key} uses unknown logical names {bad}"
    assert len(set(named)) == len(named), f"{name}: {key} repeats a logical name: {names}"
  # `init` returns the same tree unboxed (what checkpoints and converters see), and
  # `logical_axes` has one spec per param.
  assert jax.tree.structure(trainable) == jax.tree.structure(nn.unbox(boxed))
  specs = jax.tree.leaves(
    fam.logical_axes(s.batch(2)), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
  )
  assert len(specs) == len(leaves)


def check_loss(name, smoke):
  """Ten Adam steps on one synthetic batch with a fixed rng (a deterministic objective) take at
  least 10% off the loss (smoke configs: 12-86% at lr 3e-3)."""
  s = smoke(name)
  fam, frozen = s.family, s.frozen()
  batch = s.batch(4, seed=1)
  rng = jax.random.key(3)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(trainable, state):
    def loss_fn(trainable):
      return fam.loss({**trainable, **frozen}, batch, rng, True)

    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    upd, state = opt.update(g, state, trainable)
    return optax.apply_updates(trainable, upd), state, loss, metrics

  trainable = s.trainable()
  state = opt.init(trainable)
  losses = []
  for _ in range(11):  # the 11th loss is the one after 10 updates
    trainable, state, loss, metrics = step(trainable, state)
    losses.append(float(loss))
    for k, v in metrics.items():
      assert np.shape(v) == () and np.isfinite(float(v)), (name, k, v)
  assert np.all(np.isfinite(losses)), (name, losses)
  assert losses[-1] < 0.9 * losses[0], (name, losses)


def check_sampling(name, smoke):
  s = smoke(name)
  fam, d = s.family, s.config.data
  labels = np.arange(3, dtype=np.int32) % int(d.num_classes)
  if fam.kind != "generator":
    with pytest.raises(NotImplementedError):
      fam.sample(s.params, labels, jax.random.key(0))
    return
  settings = fam.sample_defaults()
  a = np.asarray(fam.sample(s.params, labels, jax.random.key(0), **settings))
  assert a.dtype == np.uint8 and a.shape == (3, d.image_size, d.image_size, d.channels)
  traces = fam.trace_count
  np.testing.assert_array_equal(a, fam.sample(s.params, labels, jax.random.key(0), **settings))
  other = np.asarray(fam.sample(s.params, labels, jax.random.key(1), **settings))
  assert not np.array_equal(a, other), f"{name}: the rng does not reach the sampler"
  changed = {k: TRACED_SETTINGS[k](v) if k in TRACED_SETTINGS else v for k, v in settings.items()}
  assert changed != settings, f"{name}: no traced sampling setting in {settings}"
  fam.sample(s.params, labels, jax.random.key(0), **changed)
  assert fam.trace_count == traces, f"{name}: changing {settings} -> {changed} retraced"
