"""FlowAR: the scale-causal mask by gradient, the KV-cached scale forward = the teacher-forced
forward, the per-scale loss weights (zero loss for the exact velocity, pn^2/pn_last^2 weights), the
official Euler grid on a Gaussian toy, bf16 stability. Parity with the official code itself is
`experiments/parity_flowar_official.py`; converter coverage is tests/test_convert_flowar.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.diffusion import FlowMatching
from arvision.models import flowar as flowar_lib


def _perturbed(smoke):
  s = smoke("flowar")
  p = s.trainable()
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return s, jax.tree.unflatten(tree, leaves)


@pytest.mark.slow  # a jacrev compile of the smoke model: ~1-2 min on a loaded 2-core CPU
def test_scale_mask_by_gradient(smoke):
  """z of scale j depends on the inputs of scales 1..j only (scale 0's input is the class)."""
  s, p = _perturbed(smoke)
  fam = s.family
  K, C = len(fam.patch_nums), fam.token_dim
  starts, lengths = fam.module.starts, fam.lengths
  inputs = jax.random.normal(jax.random.key(0), (1, sum(lengths) - 1, C))
  lab = jnp.array([1])

  def per_scale(x):
    z = fam.apply_module(p, x, lab)
    return jnp.stack([jnp.sum(z[:, a : a + n] ** 2) for a, n in zip(starts, lengths, strict=True)])

  jac = np.abs(np.asarray(jax.jit(jax.jacrev(per_scale))(inputs)))[:, 0].sum(-1)  # [K, L - 1]
  for j in range(K):
    for k in range(1, K):
      seen = jac[j, starts[k] - 1 : starts[k] - 1 + lengths[k]].sum()
      assert (seen > 0) == (k <= j), (j, k, seen)


@pytest.mark.slow  # eager cached calls: ~1 min on a loaded 2-core CPU
def test_cached_scale_forward_equals_teacher_forcing(smoke):
  from arvision.sampling.kv_cache import init_kv_caches

  s, p = _perturbed(smoke)
  fam, mod = s.family, s.family.module
  var = fam._vars(p)
  B, C = 2, fam.token_dim
  inputs = jax.random.normal(jax.random.key(1), (B, sum(fam.lengths) - 1, C))
  lab = jnp.array([2, fam.num_classes])
  z_full = fam.apply_module(p, inputs, lab)
  cemb = mod.apply(var, lab, method=flowar_lib.FlowAR.class_embedding)
  hd = mod.encoder_dim // mod.encoder_heads
  caches = init_kv_caches(mod.encoder_depth + mod.decoder_depth, B, sum(fam.lengths), 2, hd)
  for k, (a, n) in enumerate(zip(mod.starts, fam.lengths, strict=True)):
    if k == 0:
      h = cemb[:, None, :]
    else:
      h = mod.apply(var, inputs[:, a - 1 : a - 1 + n], method=flowar_lib.FlowAR.project)
    z, caches = mod.apply(var, h, cemb, k, caches, method=flowar_lib.FlowAR.forward_scales)
    np.testing.assert_allclose(np.asarray(z), np.asarray(z_full[:, a : a + n]), atol=2e-5)


@pytest.mark.slow  # eager loss of the smoke model: ~50 s on a loaded 2-core CPU
def test_loss_is_weighted_per_scale_and_zero_for_the_exact_velocity(smoke, monkeypatch):
  """A head returning the exact `eps - x = (x_t - x) / t` gives loss 0; an offset of 0.5 gives
  0.25 per scale, summed with weights pn^2 / pn_last^2."""
  s = smoke("flowar")
  fam = s.family
  B = 3
  z = jax.random.normal(jax.random.key(2), (B, fam.side, fam.side, fam.token_dim))
  gts, _ = fam.teacher_inputs(z)
  by_len = {g.shape[1]: g for g in gts}
  batch = {"tokens": np.asarray(z).reshape(B, -1, fam.token_dim), "label": np.array([0, 1, 2])}
  real = fam.apply_module

  def oracle(params, *args, offset=0.0, method=None, **kw):
    if method is not flowar_lib.FlowAR.velocity:
      return real(params, *args, method=method, **kw)
    x_t, t, _ = args
    return (x_t - by_len[x_t.shape[1]]) / t[:, None, None] + offset

  weights = sum(fam.lengths) / fam.lengths[-1]
  for offset, want in ((0.0, 0.0), (0.5, 0.25 * weights)):
    monkeypatch.setattr(fam, "apply_module", lambda *a, o=offset, **k: oracle(*a, offset=o, **k))
    loss, metrics = fam.loss(s.params, batch, jax.random.key(3), False)
    np.testing.assert_allclose(float(loss), want, rtol=1e-3, atol=2e-4)
    assert len([k for k in metrics if k.startswith("loss_scale")]) == len(fam.patch_nums)


@pytest.mark.parametrize("num_steps", [25, 50])
def test_official_euler_grid_on_a_gaussian_toy(num_steps):
  m, s = 1.5, 0.5

  def velocity(x, t):  # flow convention: x_t = (1 - t) noise + t x1
    t = t[:, None]
    var = (1 - t) ** 2 + t**2 * s**2
    return m + (t * s**2 - (1 - t)) / var * (x - t * m)

  levels = flowar_lib.euler_levels(num_steps)
  assert levels[0] == 1.0 and levels[-1] == 0.0 and np.all(np.diff(levels) < 0)
  assert len(levels) == (51 if num_steps == 50 else 2 * (num_steps // 2) + 1)
  times, model_times = flowar_lib.euler_grid(num_steps)
  noise = jax.random.normal(jax.random.key(0), (20000, 1))
  fm = FlowMatching()
  out = jax.jit(lambda n: fm.sample_on_grid(velocity, n, times, model_times=times[:-1]))(noise)
  assert abs(float(out.mean()) - m) < 0.03 and abs(float(out.std()) - s) < 0.03
  np.testing.assert_allclose(model_times, levels[:-1].astype(np.float32))


def test_scale_rope_positions_follow_the_last_side():
  """The official per-scale RoPE: a pn-grid at positions arange(pn) / pn * side (so every scale
  spans the last scale's range); at pn = side it is the plain integer grid."""
  from arvision.models.raster import rope_2d_table

  np.testing.assert_allclose(
    flowar_lib.scale_rope(16, 16, 16), rope_2d_table(16, 16, prefix=0), atol=1e-6
  )
  r2 = flowar_lib.scale_rope(2, 16, 16)  # positions 0 and 8
  np.testing.assert_allclose(r2[3], rope_2d_table(16, 16, prefix=0)[8 * 16 + 8], atol=1e-6)


@pytest.mark.slow  # two value_and_grad compiles: ~2 min on a loaded 2-core CPU
def test_bf16_loss_is_finite_and_close(smoke, configs):
  from arvision import families

  s = smoke("flowar")
  bf16 = families.build(
    configs.smoke("flowar", **{"model.dtype": "bfloat16"}), tokenizer=s.tokenizer
  )
  batch = s.batch(4)

  def run(fam):
    f = lambda p: fam.loss({**p, **s.frozen()}, batch, jax.random.key(3), True)[0]
    return jax.jit(jax.value_and_grad(f))(s.trainable())

  l32, g32 = run(s.family)
  l16, g16 = run(bf16)
  flat = lambda g: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(g)])
  assert np.isfinite(float(l16)) and np.all(np.isfinite(flat(g16)))
  assert abs(float(l16) - float(l32)) <= 2e-2 * abs(float(l32))
  a, b = flat(g32), flat(g16)
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98
