"""`config.model.scan_layers`: the blocks as one `nn.scan` over stacked params compute the same
loss, gradients and samples as the unrolled blocks, from params converted between the layouts.

Tolerances: the scanned and unrolled forwards run the same float32 ops per layer; XLA fuses the
scan body differently, so results agree to float32 rounding (1e-5 relative), and greedy-free
sampling draws the same tokens from the same keys.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from arvision import errors, families
from arvision.models import scan_layers
from arvision.parallel import logical

# family -> names of its stacked block groups
STACKED = {"var": ("blocks",), "raster": ("layers",), "mar": ("encoder_blocks", "decoder_blocks")}
RTOL, ATOL = 1e-5, 1e-6


def _scanned(smoke, configs, name, **fields):
  base = smoke(name)
  fields = {"model.scan_layers": True, **fields}
  return base, families.build(configs.smoke(name, **fields), tokenizer=base.tokenizer)


def _loss_and_grads(family, params, frozen, batch, train):
  def loss(p):
    return family.loss({**p, **frozen}, batch, jax.random.key(3), train)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_trees_close(a, b):
  ka = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(a)]
  kb = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(b)]
  assert ka == kb
  for k, x, y in zip(ka, jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL, err_msg=k)


# Each compiles six programs (init, loss and grads x2 layouts x eval/train, the sampler x2).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["var", "raster", "mar"])
def test_scanned_loss_grads_and_samples_equal_unrolled(name, smoke, configs):
  base, scanned = _scanned(smoke, configs, name)
  names = STACKED[name]
  params = base.trainable()
  stacked = scan_layers.stack_layers(params, names)
  # The stacked layout is the scanned model's own (same tree, same shapes).
  own = jax.eval_shape(scanned.init, jax.random.key(0))
  assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, stacked)
  # Round trip.
  _assert_trees_close(scan_layers.unstack_layers(stacked, names), params)
  batch = base.batch(4)
  frozen = base.frozen()
  # train=True: cond drop (same rng at the same scope) and drop path 0 in the smoke config.
  for train in (False, True):
    l0, g0 = _loss_and_grads(base.family, params, frozen, batch, train)
    l1, g1 = _loss_and_grads(scanned, stacked, frozen, batch, train)
    np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
    _assert_trees_close(scan_layers.unstack_layers(g1, names), g0)
  labels = np.arange(2) % int(base.config.data.num_classes)
  s0 = jax.tree.leaves(base.family.sample_tokens({**params, **frozen}, labels, jax.random.key(5)))
  s1 = jax.tree.leaves(scanned.sample_tokens({**stacked, **frozen}, labels, jax.random.key(5)))
  assert len(s0) == len(s1)
  for a, b in zip(s0, s1, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    if name == "mar" and a.dtype == np.uint8:  # continuous latents: a pixel may round apart
      assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    elif np.issubdtype(a.dtype, np.floating):  # MAR's sampled latents
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    else:  # token indices and the images decoded from them
      np.testing.assert_array_equal(b, a)


@pytest.mark.slow
def test_var_drop_path_rates_are_per_layer(smoke, configs):
  """Training with drop path: layer 0's rate is 0, so with a huge max rate only the scanned rates
  differ per layer; the loss stays finite and differs from the deterministic one."""
  base, scanned = _scanned(smoke, configs, "var", **{"model.drop_path_rate": 0.5})
  stacked = scan_layers.stack_layers(base.trainable(), STACKED["var"])
  batch = base.batch(4)
  l_eval, _ = _loss_and_grads(scanned, stacked, base.frozen(), batch, False)
  l_train, g = _loss_and_grads(scanned, stacked, base.frozen(), batch, True)
  assert np.isfinite(float(l_train)) and float(l_train) != float(l_eval)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))


@pytest.mark.parametrize("name", ["var", "raster", "mar"])
def test_stacked_params_carry_an_unsharded_layers_axis(name, smoke, configs):
  _, scanned = _scanned(smoke, configs, name)
  axes = scanned.logical_axes(None)
  shapes = jax.eval_shape(scanned.init, jax.random.key(0))
  rules = logical.get_rules("fsdp")
  mesh = jax.sharding.AbstractMesh((1, 2, 1), ("data", "fsdp", "tensor"))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  for group in STACKED[name]:
    specs = jax.tree.leaves(axes[group], is_leaf=is_spec)
    leaves = jax.tree.leaves(shapes[group])
    assert specs and all(tuple(s)[0] == scan_layers.LAYERS for s in specs), specs
    depth = leaves[0].shape[0]
    assert depth >= 1 and all(x.shape[0] == depth for x in leaves)
    out = [logical.spec(tuple(s), x.shape, rules, mesh) for s, x in zip(specs, leaves, strict=True)]
    # The layer axis is never split; fsdp still splits another dim of the weights.
    assert all(len(o) == 0 or o[0] is None for o in out), out
    assert any(len(o) > 1 for o in out), out
  for strategy in logical.STRATEGIES:
    assert scan_layers.LAYERS not in dict(logical.get_rules(strategy))


def test_to_layout_both_ways():
  p = {"blocks_0": {"w": np.zeros((2, 3))}, "blocks_1": {"w": np.ones((2, 3))}, "head": 1}
  s = scan_layers.to_layout(p, {"blocks": {}, "head": 0})
  assert sorted(s) == ["blocks", "head"] and s["blocks"]["w"].shape == (2, 2, 3)
  back = scan_layers.to_layout(s, p)
  assert sorted(back) == sorted(p)
  np.testing.assert_array_equal(back["blocks_1"]["w"], p["blocks_1"]["w"])
  assert scan_layers.to_layout(p, p) == p


# Every other registered generator (successors subclass var/raster/mar and must opt in).
OTHERS = sorted(set(families.FAMILIES) - {"tokenizer", "classifier"} - set(scan_layers.ACCEPTED))


@pytest.mark.parametrize("name", OTHERS)
def test_other_families_refuse_scan_layers(name, configs):
  with pytest.raises(errors.UserError, match=r"scan_layers.*'var'"):
    config = configs.smoke(name, **{"model.scan_layers": True})
    tok = families.build(config.tokenizer.config) if families.needs_tokenizer(config) else None
    families.build(config, tokenizer=tok)


def test_nn_partition_name_is_the_flax_one():
  # metadata_params keys the stacked axis name by flax's PARTITION_NAME.
  assert nn.PARTITION_NAME == "partition_name"


_HLO = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[16]{0} all-gather(f32[8]{0} %x), dimensions={0}
}
%body2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag2 = f32[16]{0} all-gather(f32[8]{0} %x), dimensions={0}
}
%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %w2 = (s32[], f32[8]) while(%t1), condition=%cond, body=%body2
  %ar = f32[8]{0} all-reduce(f32[8]{0} %a), to_apply=%add
}
"""


def test_collectives_in_loop_bodies_count_once_per_iteration():
  from arvision.parallel import measure

  static = measure.count_collectives(_HLO)
  assert static["count"] == 3 and static["bytes"] == 2 * 64 + 32
  mult = measure.computation_multiplicity(_HLO, unknown_trip=3)
  assert mult["main"] == 1 and mult["body"] == 4 and mult["body2"] == 3
  looped = measure.count_collectives(_HLO, unknown_trip=3)
  assert looped["count"] == 4 + 3 + 1 and looped["bytes"] == 7 * 64 + 32
  assert looped["by_kind"]["all-gather"]["count"] == 7


def test_multiplicity_of_a_compiled_scan():
  """XLA's own text: the forward scan's body runs its known trip count (5) times."""
  import jax.numpy as jnp

  from arvision.parallel import measure

  def f(w, x):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)[0].sum()

  hlo = jax.jit(jax.grad(f)).lower(jnp.ones((5, 8, 8)), jnp.ones((4, 8))).compile().as_text()
  mult = measure.computation_multiplicity(hlo, unknown_trip=5)
  loops = [line for line in hlo.splitlines() if " while(" in line]
  assert len(loops) == 2  # forward and backward scans
  bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1) for line in loops]
  assert [mult[b] for b in bodies] == [5, 5]
