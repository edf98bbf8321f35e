"""ARFlow: the gated hybrid attention (softmax inside an image chunk, gated linear attention across
chunks) against its float64 definition loop, forward and gradients, for the Pallas kernel and the
scan; the model's recurrent state cache against the full forward; the jitted sampler against a
loop that re-runs the whole prefix; same-class sequences. Parity with the official code itself is
`experiments/parity_arflow_official.py`; converter coverage is tests/test_convert_arflow.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.kernels.chunked import (
  decayed_hybrid_reference,
  decayed_hybrid_scan,
  gated_decays,
  gated_hybrid_chunk_attention,
)
from arvision.models import arflow as af

B, N_CHUNKS, C, H, D = 1, 3, 4, 2, 4
L = N_CHUNKS * C


def _definition(q, k, v, g, chunk):
  """The official `chunk_gate_retention` as a float64 loop over positions: softmax over the
  query's chunk, plus `exp(sum_{j <= i} g_j) q . S` with the state entering the chunk
  `S <- exp(mean_chunk g) S + sum_j k_j v_j^T` (k scaled by 1/sqrt(D) for both terms)."""
  b, length, h, d = q.shape
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for bi in range(b):
    for hi in range(h):
      state = np.zeros((d, v.shape[-1]))
      for c0 in range(0, length, chunk):
        cum = 0.0
        for t in range(c0, c0 + chunk):
          cum += g[bi, t, hi]
          qt = q[bi, t, hi]
          logits = np.array([qt @ k[bi, s, hi] for s in range(c0, c0 + chunk)]) / np.sqrt(d)
          p = np.exp(logits - logits.max())
          p /= p.sum()
          intra = sum(p[j] * v[bi, c0 + j, hi] for j in range(chunk))
          out[bi, t, hi] = intra + np.exp(cum) * (qt / np.sqrt(d)) @ state
        kv = sum(np.outer(k[bi, s, hi], v[bi, s, hi]) for s in range(c0, c0 + chunk))
        state = np.exp(np.mean(g[bi, c0 : c0 + chunk, hi])) * state + kv
  return out


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((B, L, H, D)) for _ in range(3))
  g = np.log(rng.uniform(0.5, 0.99, (B, L, H)))  # log-gates <= 0, as logsigmoid / 16
  return q, k, v, g


IMPLS = {
  "kernel": lambda q, k, v, g: gated_hybrid_chunk_attention(q, k, v, g, chunk=C, lowering="gpu"),
  "scan": lambda q, k, v, g: decayed_hybrid_scan(q, k, v, *gated_decays(g, C), chunk=C),
  "quadratic": lambda q, k, v, g: decayed_hybrid_reference(q, k, v, *gated_decays(g, C), chunk=C),
}


@functools.cache
def _definition_grads():
  """Central differences of `sum(definition * w)` in float64, per input (computed once)."""
  q, k, v, g = _inputs()
  w = np.random.default_rng(1).standard_normal((B, L, H, D))  # a random cotangent
  loss = lambda *a: float(np.sum(_definition(*a, C) * w))
  eps, grads = 1e-6, []
  for arg in range(4):
    base = [q, k, v, g]
    fd = np.zeros(base[arg].shape)
    for idx in np.ndindex(base[arg].shape):
      plus, minus = [a.copy() for a in base], [a.copy() for a in base]
      plus[arg][idx] += eps
      minus[arg][idx] -= eps
      fd[idx] = (loss(*plus) - loss(*minus)) / (2 * eps)
    grads.append(fd)
  return w, grads


@pytest.mark.parametrize(
  "impl", ["kernel", "scan", pytest.param("quadratic", marks=pytest.mark.slow)]
)
def test_gated_hybrid_equals_its_float64_definition_forward_and_grads(impl):
  q, k, v, g = _inputs()
  want = _definition(q, k, v, g, C)
  f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v, g)]
  got = np.asarray(IMPLS[impl](*f32))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  no_cross = _definition(q, k, v, np.full_like(g, -50.0), C)
  assert np.abs(want - no_cross).max() > 0.1  # the cross-chunk term is not negligible

  w, fd = _definition_grads()
  grads = jax.grad(lambda *a: jnp.sum(IMPLS[impl](*a) * w), argnums=(0, 1, 2, 3))(*f32)
  for arg, (grad, want_g) in enumerate(zip(grads, fd, strict=True)):
    np.testing.assert_allclose(np.asarray(grad), want_g, atol=2e-4, rtol=1e-3, err_msg=f"arg {arg}")


def test_carried_state_equals_one_call_over_all_chunks():
  q, k, v, g = (jnp.asarray(a, jnp.float32) for a in _inputs(2))
  full = decayed_hybrid_scan(q, k, v, *gated_decays(g, C), chunk=C)
  state = jnp.zeros((B, H, D, D))
  for c in range(N_CHUNKS):
    sl = slice(c * C, (c + 1) * C)
    out, state = decayed_hybrid_scan(
      q[:, sl], k[:, sl], v[:, sl], *gated_decays(g[:, sl], C), chunk=C, state0=state,
      return_state=True,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out), np.asarray(full[:, sl]), atol=1e-6)


def _perturbed(smoke):
  """The smoke ARFlow with every param nudged (the official init zeroes adaLN and the output)."""
  s = smoke("arflow")
  p = s.trainable()
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return s, jax.tree.unflatten(tree, leaves)


@pytest.mark.slow  # ~35 s on a quiet 2-core CPU (eager calls; the kernel-level carried-state test runs in make test)
def test_recurrent_state_cache_equals_the_full_forward(smoke):
  """Images fed one call at a time with the state carried give the full sequence's outputs, and
  the carried state matters (a fresh state changes later images)."""
  s, p = _perturbed(smoke)
  fam, mod = s.family, s.family.module
  var = fam._vars(p)
  S, side, ch = 3, fam.side, fam.channels
  x = jax.random.normal(jax.random.key(1), (2, S, side, side, ch))
  t = jnp.asarray([[0.1, 0.4, 0.8], [0.2, 0.5, 0.6]])
  lab = jnp.array([1, fam.num_classes])
  full = np.asarray(mod.apply(var, x, t, lab))
  states = fam.init_states(2)
  for i in range(S):
    cond = mod.apply(var, lab, t[:, i : i + 1], method=af.ARFlow.condition)
    v, states = mod.apply(var, x[:, i : i + 1], cond, states, method=af.ARFlow.forward)
    np.testing.assert_allclose(np.asarray(v[:, 0]), full[:, i], atol=2e-5, rtol=1e-5)
  fresh, _ = mod.apply(var, x[:, 2:], cond, fam.init_states(2), method=af.ARFlow.forward)
  assert np.abs(np.asarray(fresh[:, 0]) - full[:, 2]).max() > 1e-3


@pytest.mark.slow  # ~25 s on a quiet 2-core CPU (a full forward per prefix)
def test_sampler_equals_rerunning_the_whole_prefix(smoke):
  """The jitted sampler (one image per step, the state cache) = a loop that runs the full forward
  on every earlier step's input plus the current one, with the official SDE step and guidance on
  the first `cfg_channels` channels."""
  s, p = _perturbed(smoke)
  fam, mod = s.family, s.family.module
  var = fam._vars(p)
  steps, cfg, last, labels = 3, 2.0, 0.04, jnp.array([1, 3])
  full = dict(p, tokenizer=s.params["tokenizer"])
  _, got = fam.sample_tokens(full, labels, jax.random.key(5), num_steps=steps, cfg=cfg)
  x, noise = fam.step_noise(jax.random.key(5), 2, steps)
  ts = np.linspace(0.0, 1.0 - last, steps, dtype=np.float32)
  lab2, seen = jnp.concatenate([labels, jnp.full((2,), fam.num_classes)]), []
  cc = fam.cfg_channels
  for i in range(steps):
    seen.append(x)
    seq = jnp.stack([jnp.concatenate([a, a]) for a in seen], axis=1)  # [2B, i + 1, ...]
    tt = jnp.broadcast_to(jnp.asarray(ts[: i + 1]), (4, i + 1))
    v = mod.apply(var, seq, tt, lab2)[:, -1]
    c_v, u_v = v[:2], v[2:]
    v = jnp.concatenate([u_v[..., :cc] + cfg * (c_v[..., :cc] - u_v[..., :cc]), c_v[..., cc:]], -1)
    t = ts[i]
    drift = v + (1 - t) * (t * v - x) / ((1 - t) ** 2 + t * (1 - t))
    if i < steps - 1:
      dt = ts[1] - ts[0]
      x = x + drift * dt + np.sqrt(2 * (1 - t)) * noise[i] * np.sqrt(dt)
    else:
      x = x + drift * last
  np.testing.assert_allclose(np.asarray(got), np.asarray(x), atol=5e-5, rtol=1e-5)


@pytest.mark.slow  # ~10 s on a quiet 2-core CPU (interpret-mode kernel)
def test_pallas_kernel_model_equals_scan_model_forward_and_grads(smoke):
  s, p = _perturbed(smoke)
  fam = s.family
  x = jax.random.normal(jax.random.key(3), (1, 2, fam.side, fam.side, fam.channels))
  t, lab = jnp.asarray([[0.3, 0.7]]), jnp.array([2])
  var = fam._vars(p)
  outs = []
  for impl in ("pallas", "scan"):
    m = fam.module.clone(attn_impl=impl)
    f = lambda var, m=m: jnp.sum(m.apply(var, x, t, lab) ** 2)
    outs.append(jax.value_and_grad(f)(var))
  np.testing.assert_allclose(float(outs[0][0]), float(outs[1][0]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[0][1]), jax.tree.leaves(outs[1][1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_same_class_sequences():
  label = jnp.array([0, 1, 0, 2, 1, 0, 0, 1])
  idx = np.asarray(af.same_class_sequences(label, jax.random.key(0), 4, 3))
  lab = np.asarray(label)
  for r in range(4):
    assert np.all(lab[idx[r]] == lab[r]), (r, idx[r])
  assert len(set(idx[0])) == 3  # class 0 has 4 images: drawn without replacement
  assert set(idx[3]) == {3}  # class 2 has one image: repeated


def test_sde_grid_and_bad_settings():
  grid = af.sde_grid(250, 0.04)
  assert grid.shape == (251,) and grid[0] == 0 and grid[-1] == 1
  np.testing.assert_allclose(grid[-2], 0.96, rtol=1e-6)
  with pytest.raises(ValueError, match="num_steps=1"):
    af.sde_grid(1, 0.04)
  with pytest.raises(ValueError, match="last_step_size"):
    af.sde_grid(10, 1.5)


def test_sde_sampler_on_a_gaussian_toy_reaches_the_data_law():
  """With the exact velocity of Gaussian data N(mu, s^2) under x_t = t x_1 + (1 - t) eps
  (v = mu + (t s^2 - (1 - t)) / V_t (x - t mu), V_t = t^2 s^2 + (1 - t)^2), the official SDE grid
  and step carry N(0, 1) noise to the data's mean and spread; a wrong score (e.g. the plain
  ODE drift with the SDE's noise) does not."""
  mu, s, n, num_steps, last_step = 1.5, 0.5, 20000, 250, 0.04
  t_S = jnp.asarray(af.sde_grid(num_steps, last_step)[:-1])
  dt_em = t_S[1] - t_S[0]
  k0, k1 = jax.random.split(jax.random.key(0))
  w_S = jax.random.normal(k1, (num_steps, n))

  def velocity(x, t):
    var_t = t * t * s * s + (1.0 - t) ** 2
    return mu + (t * s * s - (1.0 - t)) / var_t * (x - t * mu)

  def run(step):
    def body(x, xs):
      i, t, w = xs
      last = i == num_steps - 1
      dt = jnp.where(last, last_step, dt_em)
      return step(x, velocity(x, t), t, dt, dt_em, w, last), None

    x, _ = jax.lax.scan(body, jax.random.normal(k0, (n,)), (jnp.arange(num_steps), t_S, w_S))
    return float(x.mean()), float(x.std())

  mean, std = run(af.sde_step)
  assert abs(mean - mu) < 0.02 and abs(std - s) < 0.02, (mean, std)

  def no_score(x, v, t, dt, dt_em, w, last):  # the ODE drift with the SDE's noise
    return x + v * dt + jnp.where(last, 0.0, jnp.sqrt(2.0 * (1.0 - t) * dt_em) * w)

  assert abs(run(no_score)[1] - s) > 0.1
