"""HMAR (`arvision/models/hmar.py`, `configs/hmar.py:smoke`): the Markovian mask by gradient,
the stage-2 masked-step schedule, decoding = teacher forcing, the block-sparse kernel path.
The family contract (init, loss, deterministic sampling, no retrace) is test_family_contract."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from arvision import config_util, families
from arvision.models import hmar as hmar_lib
from arvision.models import var as var_lib

OFFICIAL_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# utils/sampling_arg_util.py of NVlabs/HMAR
OFFICIAL_SCHEDULE = [[1], [1, 3], [1, 1, 2, 5], [16], [25], [36], [64], [100], [169], [256]]


def test_mask_schedule_counts_and_errors():
  sched = hmar_lib.default_mask_schedule(OFFICIAL_PN)
  assert [list(s) for s in sched] == OFFICIAL_SCHEDULE
  for pn, steps in zip(OFFICIAL_PN, sched, strict=True):
    assert sum(steps) == pn * pn and min(steps) >= 1
  assert hmar_lib.check_mask_schedule((), (1, 2, 4)) == ((1,), (1, 3), (16,))
  mine = ((1,), (2, 2), (4, 4, 8))
  assert hmar_lib.check_mask_schedule([list(s) for s in mine], (1, 2, 4)) == mine
  with pytest.raises(ValueError, match=r"mask_schedule\[2\].*4x4=16"):
    hmar_lib.check_mask_schedule(((1,), (1, 3), (8, 7)), (1, 2, 4))
  with pytest.raises(ValueError, match="one per scale"):
    hmar_lib.check_mask_schedule(((1,), (4,)), (1, 2, 4))
  # `lowest` masks exactly n tokens per row, the least confident ones.
  conf = jnp.asarray([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
  np.testing.assert_array_equal(
    hmar_lib.lowest(conf, 2), [[False, True, False, True], [True, False, False, True]]
  )


def test_training_mask_counts(smoke):
  """Stage-2 training masks ceil(p n) tokens of every scale after the first (one p per step)."""
  fam = smoke("hmar").family
  for seed in range(3):
    m, p = fam.train_mask(jax.random.key(seed))
    counts = [int(c.sum()) for c in np.split(np.asarray(m), np.cumsum(fam.lengths[1:-1]))]
    assert counts == [int(np.ceil(n * float(p))) for n in fam.lengths[1:]], (counts, p)


def _inputs(s, B=2, seed=0):
  fam = s.family
  tp = s.params["tokenizer"]
  rng = np.random.default_rng(seed)
  idx = [
    jnp.asarray(rng.integers(0, fam.module.vocab_size, (B, n)), jnp.int32) for n in fam.lengths
  ]
  teacher = fam.scales.teacher(tp, idx, fam.tokenizer.codebook(tp))
  own = fam.own_inputs(tp, idx)
  masked = jnp.asarray(rng.random((B, fam.seq_len - 1)) < 0.5)
  return idx, teacher, own, masked


def test_block_diagonal_mask_by_gradient(smoke):
  """d logits(scale k) / d inputs is nonzero exactly on scale k's own inputs, for the stage-1
  (next-scale) and stage-2 (masked) paths."""
  s = smoke("hmar")
  fam, params = s.family, s.params
  _, teacher, own, masked = _inputs(s)
  labels = jnp.array([1, 4])
  seg = np.concatenate([np.full(n, k) for k, n in enumerate(fam.lengths)])[1:]
  bounds = var_lib.scale_bounds(fam.patch_nums)

  @jax.jit
  def grads(t, o):
    def ns(t, b, e):
      return jnp.sum(fam.apply(params, labels, t)[:, b:e])

    def mp(t, o, b, e):
      return jnp.sum(fam.apply_masked(params, labels, t, o, masked)[:, b:e])

    return [(jax.grad(ns)(t, b, e), *jax.grad(mp, argnums=(0, 1))(t, o, b, e)) for b, e in bounds]

  m = np.asarray(masked)
  for k, (g_ns, g_teacher, g_own) in enumerate(grads(teacher, own)):
    for g in (g_ns, g_teacher, g_own):
      g = np.abs(np.asarray(g)).sum(axis=2)  # [B, L - 1]
      assert np.all(g[:, seg != k] == 0.0), k
    if k:
      assert np.all(np.abs(np.asarray(g_ns)).sum(axis=2)[:, seg == k] > 0), k
      assert np.all(np.abs(np.asarray(g_teacher)).sum(axis=2)[:, seg == k] > 0), k
      # a masked token's own code is replaced by mask_embed: only unmasked ones reach the logits
      g = np.abs(np.asarray(g_own)).sum(axis=2)[:, seg == k]
      np.testing.assert_array_equal(g > 0, ~m[:, seg == k])


def test_decoding_equals_teacher_forcing(smoke):
  """The sampler's next-scale logits are the teacher-forced stage-1 logits of its own samples,
  and a masked decoding step is the teacher-forced stage-2 forward restricted to its scale."""
  s = smoke("hmar")
  fam, params = s.family, s.params
  labels = jnp.array([0, 3])
  _, idx, logits = fam.sample_tokens(
    params, labels, jax.random.key(0), cfg=0.0, top_k=0, top_p=0.0, return_logits=True
  )
  teacher = fam.scales.teacher(params["tokenizer"], idx, None)
  full = fam.apply(params, labels, teacher)
  for si, (b, e) in enumerate(var_lib.scale_bounds(fam.patch_nums)):
    np.testing.assert_allclose(logits[si], full[:, b:e], atol=1e-4, rtol=1e-4)

  _, teacher, own, masked = _inputs(s, seed=1)
  tf = fam.apply_masked(params, labels, teacher, own, masked)
  variables = fam._vars(params)
  cond = fam.module.apply(variables, fam.labels_2B(labels), method=var_lib.VAR.first_tokens)[1]
  for si in (1, 2):
    b, e = var_lib.scale_bounds(fam.patch_nums)[si]
    x = fam.module.apply(variables, teacher[:, b - 1 : e - 1], si, method=var_lib.VAR.embed_next)
    step = fam.module.apply(
      variables, x, own[:, b - 1 : e - 1], masked[:, b - 1 : e - 1], cond,
      method=hmar_lib.HMAR.mask_step,
    )  # fmt: skip
    np.testing.assert_allclose(step[:2], tf[:, b:e], atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # 27 s; decoding = teacher forcing stays fast
def test_masked_steps_change_only_masked_tokens(smoke):
  """With schedule (1, 3) at 2x2, the masked step re-predicts 3 tokens and keeps the most
  confident one; with one step per scale the sampler is the next-scale one (same rng)."""
  s = smoke("hmar")
  c = mlc.ConfigDict(s.config.to_dict())
  c.model.mask_schedule = tuple((n,) for n in s.family.lengths)
  plain = families.build(c, tokenizer=s.tokenizer)
  labels = jnp.array([0, 1, 2, 3])
  kw = dict(cfg=1.0, top_k=0, top_p=0.0)
  _, a, _ = s.family.sample_tokens(s.params, labels, jax.random.key(5), **kw)
  _, b, _ = plain.sample_tokens(s.params, labels, jax.random.key(5), **kw)
  np.testing.assert_array_equal(a[0], b[0])
  changed = np.asarray(a[1] != b[1]).sum(axis=1)
  assert np.all(changed <= 3) and changed.sum() > 0, changed


@pytest.mark.slow
def test_kernel_path_equals_reference(smoke):
  """The block-diagonal mask through ops.attention's block-sparse Pallas kernel (interpret mode
  on CPU) gives the reference (xla) logits, both paths."""
  s = smoke("hmar")
  c = mlc.ConfigDict(s.config.to_dict())
  c.model.attn_impl = "pallas"
  kern = families.build(config_util.from_json(config_util.to_json(c)), tokenizer=s.tokenizer)
  _, teacher, own, masked = _inputs(s, seed=2)
  labels = jnp.array([2, 5])
  np.testing.assert_allclose(
    kern.apply(s.params, labels, teacher), s.family.apply(s.params, labels, teacher), atol=2e-5
  )
  np.testing.assert_allclose(
    kern.apply_masked(s.params, labels, teacher, own, masked),
    s.family.apply_masked(s.params, labels, teacher, own, masked),
    atol=2e-5,
  )
