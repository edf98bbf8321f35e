"""M-VAR (`arvision/models/mvar.py`): what is specific to it (the family contract tests run it too).

Attention stays inside a scale and Mamba2 carries the coarser scales, so (1) the logits of scale
k depend on the inputs of every scale <= k and on none after it, and (2) decoding scale by scale
with each block's Mamba2 state gives the teacher-forced logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import families
from arvision.models import var as var_lib


def _known_tokens(fam, batch, seed=0):
  r = np.random.default_rng(seed)
  V = fam.module.vocab_size
  return [jnp.asarray(r.integers(0, V, (batch, pn * pn)), jnp.int32) for pn in fam.patch_nums]


@pytest.mark.slow  # ~45 CPU-s (sampler compile); the contract tests sample mvar too
def test_scale_by_scale_decoding_with_mamba_state_matches_teacher_forcing(smoke):
  s = smoke("mvar")
  fam, params = s.family, s.params
  assert len(fam.patch_nums) >= 3
  labels = jnp.array([0, 3])
  gt = _known_tokens(fam, 2)
  tp = params["tokenizer"]
  teacher = fam.scales.teacher(tp, gt, fam.tokenizer.codebook(tp))
  full = np.asarray(fam.apply(params, labels, teacher))
  masks_all = [jnp.ones_like(i, bool) for i in gt]
  _, idx, logits = fam.sample_tokens(
    params, labels, jax.random.key(0), known_idx=gt, known_mask=masks_all,
    cfg=0.0, top_k=0, top_p=0.0, return_logits=True,
  )  # fmt: skip
  for si, (b, e) in enumerate(var_lib.scale_bounds(fam.patch_nums)):
    np.testing.assert_allclose(logits[si], full[:, b:e], atol=1e-4, rtol=1e-4, err_msg=str(si))
    np.testing.assert_array_equal(idx[si], gt[si])


@pytest.mark.slow
def test_logits_of_a_scale_see_every_earlier_scale_and_no_later_one(smoke):
  s = smoke("mvar")
  fam, params = s.family, s.params
  labels = jnp.array([1, 4])
  tp = params["tokenizer"]
  teacher = fam.scales.teacher(tp, _known_tokens(fam, 2, 1), fam.tokenizer.codebook(tp))
  # Teacher row j is the input of token j + 1 (token 0 is the class token).
  seg = np.concatenate([np.full(n, k) for k, n in enumerate(fam.lengths)])[1:]
  w = jax.random.normal(jax.random.key(2), (2, fam.seq_len, fam.module.vocab_size))
  bounds = var_lib.scale_bounds(fam.patch_nums)

  @jax.jit
  def grads(t):
    def f(t, b, e):
      return jnp.sum(fam.apply(params, labels, t)[:, b:e] * w[:, b:e])

    return [jax.grad(f)(t, b, e) for b, e in bounds]

  for k, g in enumerate(grads(teacher)):
    g = np.abs(np.asarray(g)).sum(axis=(0, 2))
    assert np.all(g[seg > k] == 0.0), k  # causal across scales
    assert np.all(g[seg <= k] > 0.0), k  # Mamba2 reaches back to every earlier input


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("model.mask", "scale_causal", "block_diagonal"),
    ("model.shared_aln", True, "shared_aln"),
    ("model.headdim", 48, "not divisible by headdim=48"),
  ],
)
def test_bad_settings_are_named(field, value, match, configs):
  config = configs.smoke("mvar", **{field: value})
  with pytest.raises(ValueError, match=match):
    families.build(config, tokenizer=families.build(config.tokenizer.config))


@pytest.mark.slow  # ~28 s alone on a quiet 2-core CPU: two sampler compiles (M-VAR's are slow)
def test_recompute_sampler_draws_the_carried_state_samplers_tokens(smoke, experiment):
  """experiments/bench_sampling.py's M-VAR baseline re-runs the whole prefix (attention and
  Mamba2 from the zero state) at every scale, as the official sampler does; with the same rng it
  must draw exactly the tokens of `MVARFamily.sample`, which carries each block's Mamba2 state."""
  s = smoke("mvar")
  fam, params = s.family, s.params
  recompute = experiment("bench_sampling").recompute_sampler(fam)
  labels = jnp.arange(3, dtype=jnp.int32)  # the contract test's batch: its compiled sampler
  guided = dict(cfg=1.5, top_k=0, top_p=0.0)
  for rng, kw in [
    (jax.random.key(3), guided),  # random draws, guided
    (jax.random.key(4), dict(cfg=0.0, top_k=1, top_p=0.0)),  # greedy
  ]:
    img_c, idx_c, _ = fam.sample_tokens(params, labels, rng, **kw)
    if kw is guided:
      guided_idx = idx_c
    img_r, idx_r = recompute(params, labels, rng, **kw)
    assert len(idx_c) == len(idx_r) == len(fam.patch_nums)
    for si, (a, b) in enumerate(zip(idx_c, idx_r, strict=True)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{kw} scale {si}")
    np.testing.assert_array_equal(np.asarray(img_c), np.asarray(img_r))
  # Another rng draws other tokens: the equality above is not vacuous.
  _, idx_o = recompute(params, labels, jax.random.key(5), **guided)
  assert not np.array_equal(np.asarray(idx_o[-1]), np.asarray(guided_idx[-1]))
