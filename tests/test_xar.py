"""xAR: cell order, the block-causal cell mask by gradient, the KV-cached cell forward = the full
forward, Noisy Context Learning's per-cell times (zero loss for the exact velocity), the official
Euler-Maruyama grid on a Gaussian toy, bf16 stability. Parity with the official code itself is
`experiments/parity_xar_official.py`; converter coverage is tests/test_convert_xar.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.diffusion import FlowMatching
from arvision.models import xar as xar_lib


def _perturbed(smoke):
  """The smoke xAR with every param nudged (zero-initialised biases would hide wiring errors)."""
  s = smoke("xar")
  p = s.trainable()
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return s, jax.tree.unflatten(tree, leaves)


def test_cell_order_matches_the_official_clusterify():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  # official: NCHW reshape (b, c, 2, 8, 2, 8), einsum nchpwq->nhwpqc, [b, 4 * 64, c]
  x = z.transpose(0, 3, 1, 2).reshape(2, 3, 2, 8, 2, 8)
  official = np.einsum("nchpwq->nhwpqc", x).reshape(2, 256, 3)
  ours = np.asarray(xar_lib.clusterify(jnp.asarray(z), 2))
  np.testing.assert_array_equal(ours, official)
  np.testing.assert_array_equal(np.asarray(xar_lib.unclusterify(jnp.asarray(ours), 2)), z)
  with pytest.raises(ValueError, match="model.cells=3"):
    xar_lib.cell_order(16, 3)


@pytest.mark.slow  # ~160 s on a loaded 2-core CPU (a jacobian over every cell): make test-slow
def test_cell_mask_by_gradient(smoke):
  """d v[cell j] / d x[cell k] is nonzero exactly for k <= j (block-causal over cells)."""
  s, p = _perturbed(smoke)
  fam = s.family
  N, T, C = fam.num_cells, fam.chunk, fam.token_dim
  x = jax.random.normal(jax.random.key(0), (1, fam.seq_len, C))
  t = jnp.full((1, N), 0.5)
  lab = jnp.array([1])

  def out_cells(x):  # [N]: one scalar per output cell
    v = fam.apply_module(p, x, t, lab)
    return jnp.sum(v.reshape(N, T, C) ** 2, axis=(1, 2))

  jac = np.asarray(jax.jit(jax.jacrev(out_cells))(x)).reshape(N, N, T, C)  # [out, in, ...]
  per_cell = np.abs(jac).sum(axis=(2, 3))
  for j in range(N):
    assert np.all(per_cell[j, : j + 1] > 0), (j, per_cell)
    assert np.all(per_cell[j, j + 1 :] == 0), (j, per_cell)


@pytest.mark.slow  # ~50 s on a loaded 2-core CPU (eager cached calls)
def test_cached_cell_forward_equals_the_full_forward(smoke):
  """The sampler's cache (clean cells < s at t = 0, each written once) then cell s alone gives
  the full forward's cell-s output on [clean cells < s; cell s at t]."""
  from arvision.sampling.kv_cache import init_kv_caches

  s, p = _perturbed(smoke)
  fam, mod = s.family, s.family.module
  var = fam._vars(p)
  N, T, C, B = fam.num_cells, fam.chunk, fam.token_dim, 2
  x = jax.random.normal(jax.random.key(1), (B, fam.seq_len, C))
  lab = jnp.array([2, fam.num_classes])
  hd = mod.encoder_dim // mod.encoder_heads
  caches = init_kv_caches(mod.encoder_depth + mod.decoder_depth, B, fam.seq_len, 2, hd)
  zero = mod.apply(var, lab, jnp.zeros((B, 1)), method=xar_lib.XAR.condition)
  for cell in range(N):
    t_cell = 0.3 + 0.1 * cell
    cond = mod.apply(var, lab, jnp.full((B, 1), t_cell), method=xar_lib.XAR.condition)
    xs = x[:, cell * T : (cell + 1) * T]
    v_cached, _ = mod.apply(var, xs, cond, cell, caches, method=xar_lib.XAR.forward_cells)
    t_full = jnp.asarray([[0.0] * cell + [t_cell] * (N - cell)] * B)
    v_full = fam.apply_module(p, x, t_full, lab)[:, cell * T : (cell + 1) * T]
    np.testing.assert_allclose(np.asarray(v_cached), np.asarray(v_full), rtol=1e-4, atol=1e-5)
    _, caches = mod.apply(var, xs, zero, cell, caches, method=xar_lib.XAR.forward_cells)


def test_noisy_context_loss_is_zero_for_the_exact_velocity(smoke, monkeypatch):
  """Every cell has its own t: a network that returns `(x_t - x) / t` per cell (the exact
  `eps - x` given the clean tokens) has loss 0, and a constant offset 0.5 has loss 0.25."""
  s = smoke("xar")
  fam = s.family
  B, N, T = 3, fam.num_cells, fam.chunk
  tokens = jax.random.normal(jax.random.key(2), (B, fam.seq_len, fam.token_dim))
  raster = np.asarray(xar_lib.unclusterify(tokens, fam.cells)).reshape(B, fam.seq_len, -1)
  batch = {"tokens": raster, "label": np.array([0, 1, 2])}
  seen = []

  def exact(params, x_t, t_BxN, label, rng=None, train=False, offset=0.0):
    seen.append(t_BxN)
    t_tok = jnp.repeat(t_BxN, T, axis=1)[:, :, None]
    return (x_t - tokens) / t_tok + offset

  for offset, want in ((0.0, 0.0), (0.5, 0.25)):
    monkeypatch.setattr(fam, "apply_module", lambda *a, o=offset, **k: exact(*a, offset=o, **k))
    loss, _ = fam.loss(s.params, batch, jax.random.key(3), True)
    np.testing.assert_allclose(float(loss), want, atol=2e-4)
  t = np.asarray(seen[-1])
  assert t.shape == (B, N) and np.unique(t).size == B * N  # one t per cell


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_official_grid_sampler_on_a_gaussian_toy(scale):
  """xAR's grid (noise levels linspace(1, 0.04, S) then 0) with the exact velocity of N(m, s^2)
  data ends at N(m, s^2) for Euler (k = 0) and the official Euler-Maruyama (k = 1)."""
  m, s = 1.5, 0.5

  def velocity(x, t):  # flow convention: x_t = (1 - t) noise + t x1
    t = t[:, None]
    var = (1 - t) ** 2 + t**2 * s**2
    return m + (t * s**2 - (1 - t)) / var * (x - t * m)

  times, model_times = xar_lib.em_grid(100)
  np.testing.assert_allclose(1.0 - times[:-1], model_times, atol=1e-7)
  assert times[-2] == pytest.approx(0.96) and times[-1] == 1.0
  noise = jax.random.normal(jax.random.key(0), (20000, 1))
  fm = FlowMatching()
  out = jax.jit(
    lambda n: fm.sample_on_grid(
      velocity, n, times, jax.random.key(1), scale, model_times=times[:-1]
    )
  )(noise)
  assert abs(float(out.mean()) - m) < 0.03, scale
  assert abs(float(out.std()) - s) < 0.03, scale


@pytest.mark.slow  # two value_and_grad compiles: ~2 min on a loaded 2-core CPU
def test_bf16_loss_is_finite_and_close(smoke, configs):
  """The official README warns of NaNs in mixed precision; ours keeps norms, the time embedding
  and the loss in float32."""
  from arvision import families

  s = smoke("xar")
  bf16 = families.build(configs.smoke("xar", **{"model.dtype": "bfloat16"}), tokenizer=s.tokenizer)
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
