"""Gaussian diffusion and flow matching against closed forms (schedules, respacing, posterior,
hybrid loss, decoder NLL, samplers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.diffusion import FlowMatching, GaussianDiffusion, space_timesteps
from arvision.diffusion.gaussian import create_diffusion


def _cos_f(u, s=0.008):
  return np.cos((u + s) / (1 + s) * np.pi / 2) ** 2


def _abar_cosine(T):
  """Closed-form alpha_bar at steps 0..T-1 (step i ends at time (i+1)/T)."""
  return _cos_f(np.arange(1, T + 1) / T) / _cos_f(0.0)


# -- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 200])
def test_cosine_schedule_closed_form(T):
  d = GaussianDiffusion(T, "cosine")
  # Away from the clipped last step, the betas telescope to f(t)/f(0).
  np.testing.assert_allclose(d.alphas_cumprod[:-1], _abar_cosine(T)[:-1], rtol=1e-9)
  assert d.betas[-1] == pytest.approx(0.999)  # f(1) = 0: clipped at max_beta
  assert np.all(d.betas <= 0.999) and np.all(np.diff(d.betas[:-1]) > 0)
  np.testing.assert_allclose(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
  assert d.alphas_cumprod_prev[0] == 1.0


@pytest.mark.parametrize("T", [1000, 250])
def test_linear_schedule_closed_form(T):
  d = GaussianDiffusion(T, "linear", learn_sigma=False)
  s = 1000 / T
  i = np.arange(T)
  expected = s * 1e-4 + (s * 0.02 - s * 1e-4) * i / (T - 1)
  np.testing.assert_allclose(d.betas, expected, rtol=1e-12)
  np.testing.assert_allclose(d.alphas_cumprod, np.exp(np.cumsum(np.log1p(-expected))), rtol=1e-10)


def test_unknown_schedule_errors():
  with pytest.raises(ValueError, match="schedule"):
    GaussianDiffusion(10, "sigmoid")


# -- respacing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [100, 25, 10])
def test_space_timesteps_single_section(count):
  kept = space_timesteps(1000, str(count))
  stride = 999 / (count - 1)
  assert kept == sorted({round(k * stride) for k in range(count)})
  assert len(kept) == count and kept[0] == 0 and kept[-1] == 999
  if count == 25:
    # stride 41.625 is exact in binary: 4 * stride = 166.5 rounds half-to-even (Python round).
    assert 166 in kept and 167 not in kept


def test_space_timesteps_sections_and_ddim():
  kept = space_timesteps(300, "10,15,20")
  assert kept[:10] == list(range(0, 100, 11))
  assert len(kept) == 45 and kept[10] == 100 and kept[24] == 199 and kept[25] == 200
  assert kept[-1] == 299
  assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  with pytest.raises(ValueError):
    space_timesteps(10, "11")


@pytest.mark.parametrize("steps", [100, 25, 7])
def test_respaced_betas_recompose_alphas_cumprod(steps):
  base = GaussianDiffusion(1000, "cosine")
  d = GaussianDiffusion(1000, "cosine", sampling_steps=steps)
  kept = np.asarray(space_timesteps(1000, str(steps)))
  assert d.num_timesteps == steps
  np.testing.assert_array_equal(d.timestep_map, kept)
  np.testing.assert_allclose(np.cumprod(1 - d.betas), base.alphas_cumprod[kept], rtol=1e-6)
  # The model sees the ORIGINAL timestep indices.
  seen = d.model_output(lambda x, t: t, jnp.zeros((steps, 1)), jnp.arange(steps))
  np.testing.assert_array_equal(np.asarray(seen), kept)


# -- forward process and posterior -------------------------------------------------------------


def test_q_sample_mean_and_variance():
  d = GaussianDiffusion(1000, "cosine")
  abar = _abar_cosine(1000)
  t = jnp.array([0, 10, 500, 990])
  x0 = jnp.array([[1.0, -2.0], [0.5, 0.3], [-1.0, 2.0], [3.0, 0.0]])
  np.testing.assert_allclose(
    d.q_sample(x0, t, jnp.zeros_like(x0)), np.sqrt(abar[t])[:, None] * x0, rtol=1e-5, atol=1e-7
  )
  noise = jax.random.normal(jax.random.key(0), (4000, 4, 2))
  xs = jax.vmap(lambda n: d.q_sample(x0, t, n))(noise)
  np.testing.assert_allclose(xs.mean(0), np.sqrt(abar[t])[:, None] * x0, atol=0.06)
  np.testing.assert_allclose(xs.var(0), np.broadcast_to(1 - abar[t][:, None], (4, 2)), atol=0.06)
  mean, var, log_var = d.q_mean_variance(x0, t)
  np.testing.assert_allclose(var[:, 0], 1 - abar[t], rtol=1e-5)
  np.testing.assert_allclose(log_var[:, 0], np.log(1 - abar[t]), rtol=1e-5)


@pytest.mark.parametrize("steps", [None, 20])
def test_posterior_by_gaussian_conditioning(steps):
  """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
  d = GaussianDiffusion(1000, "cosine", sampling_steps=steps)
  t = np.array([1, 5, d.num_timesteps - 2])
  ab = d.alphas_cumprod
  ab_prev, a = ab[t - 1], 1 - d.betas[t]
  x0 = np.array([[0.7], [-1.2], [2.0]])
  xt = np.array([[0.1], [0.9], [-0.4]])
  cov = np.sqrt(a) * (1 - ab_prev)  # Cov(x_{t-1}, x_t | x_0)
  var_t = a * (1 - ab_prev) + (1 - a)
  np.testing.assert_allclose(var_t, 1 - ab[t], rtol=1e-10)
  exp_mean = np.sqrt(ab_prev)[:, None] * x0 + (cov / var_t)[:, None] * (
    xt - np.sqrt(ab[t])[:, None] * x0
  )
  exp_var = (1 - ab_prev) - cov**2 / var_t
  mean, var, log_var = d.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(t))
  np.testing.assert_allclose(mean, exp_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var[:, 0], exp_var, rtol=1e-5)
  np.testing.assert_allclose(log_var[:, 0], np.log(exp_var), rtol=1e-5, atol=1e-5)
  # At t = 0 the variance is 0 and its log is clipped to the t = 1 value.
  _, var0, log_var0 = d.q_posterior_mean_variance(
    jnp.ones((1, 1)), jnp.ones((1, 1)), jnp.zeros(1, int)
  )
  assert float(var0[0, 0]) == 0.0
  assert float(log_var0[0, 0]) == pytest.approx(np.log(d.posterior_variance[1]), rel=1e-5)


# -- training loss -----------------------------------------------------------------------------


def _oracle(d, x0, noise, eps_offset=0.0, v=-1.0):
  """A model returning (true eps + offset, v): v = -1 is the (clipped) posterior log-variance."""

  def model_fn(x_t, t):
    return jnp.concatenate([noise + eps_offset, jnp.full_like(x_t, v)], axis=-1)

  return model_fn


def _setup(B=6, C=3, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x0 = jax.random.uniform(k1, (B, C), minval=-0.9, maxval=0.9)
  noise = jax.random.normal(k2, (B, C))
  return x0, noise


def test_training_losses_exact_model_is_zero():
  d = GaussianDiffusion(1000, "cosine")
  x0, noise = _setup()
  t = jnp.array([1, 3, 100, 500, 900, 998])
  out = d.training_losses(_oracle(d, x0, noise), x0, t, noise)
  np.testing.assert_allclose(out["mse"], 0.0, atol=1e-10)
  np.testing.assert_allclose(out["vb"], 0.0, atol=2e-4)
  np.testing.assert_allclose(out["loss"], out["mse"] + out["vb"])


def test_training_losses_closed_form_kl_and_mse():
  d = GaussianDiffusion(1000, "cosine")
  x0, noise = _setup()
  t = np.array([1, 3, 100, 500, 900, 998])
  delta = 0.3
  out = d.training_losses(_oracle(d, x0, noise, eps_offset=delta, v=1.0), x0, jnp.asarray(t), noise)
  np.testing.assert_allclose(out["mse"], delta**2, rtol=1e-5)
  # v = 1: the model variance is beta_t; the mean is off by coef1 * sqrt(1/abar - 1) * delta.
  ab = d.alphas_cumprod[t]
  post_var = np.exp(d.posterior_log_variance_clipped[t])
  beta = d.betas[t]
  dmu = d.posterior_mean_coef1[t] * np.sqrt(1 / ab - 1) * delta
  kl = 0.5 * (-1 + np.log(beta) - np.log(post_var) + post_var / beta + dmu**2 / beta)
  np.testing.assert_allclose(out["vb"], kl / math.log(2), rtol=2e-3, atol=1e-5)


def test_vb_does_not_train_the_mean():
  """The VB term sees eps through a stop-gradient: d loss / d eps is the MSE gradient only."""
  d = GaussianDiffusion(1000, "cosine")
  x0, noise = _setup(B=4, C=2)
  t = jnp.array([2, 50, 400, 0])
  out0 = jnp.concatenate([noise + 0.5, jnp.full_like(noise, 0.2)], axis=-1)

  def total(out):
    return jnp.sum(d.training_losses(lambda x_t, tt: out, x0, t, noise)["loss"])

  g = jax.grad(total)(out0)
  np.testing.assert_allclose(g[:, :2], 2 * 0.5 / 2 * np.ones((4, 2)), rtol=1e-5)
  assert float(jnp.abs(g[:, 2:]).sum()) > 0  # the variance output is trained by VB


def _np_disc_loglik(x, mean, log_scale):
  """Official discretised Gaussian log-likelihood (tanh CDF approximation), float64 numpy."""

  def cdf(u):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))

  inv = np.exp(-log_scale)
  cp, cm = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
  lo = np.log(np.maximum(cp, 1e-12))
  hi = np.log(np.maximum(1 - cm, 1e-12))
  mid = np.log(np.maximum(cp - cm, 1e-12))
  return np.where(x < -0.999, lo, np.where(x > 0.999, hi, mid))


def test_t0_uses_decoder_nll():
  d = GaussianDiffusion(1000, "cosine")
  x0 = jnp.array([[-1.0, 0.2, 1.0], [0.5, -0.3, 0.999], [0.1, 0.1, 0.1]])
  noise = jnp.array([[0.4, -1.0, 2.0], [1.0, 0.0, -0.5], [0.3, 0.3, 0.3]])
  t = jnp.array([0, 0, 5])
  v = 0.3
  delta = 3.0  # the model mean misses x0 by coef1 * sqrt(1/abar - 1) * delta at t = 0
  out = d.training_losses(_oracle(d, x0, noise, delta, v), x0, t, noise)
  ab0 = d.alphas_cumprod[0]
  mean = np.asarray(x0, np.float64) - np.sqrt(1 / ab0 - 1) * delta  # coef1 = 1, coef2 = 0 at t=0
  frac = (v + 1) / 2
  log_var = frac * np.log(d.betas[0]) + (1 - frac) * d.posterior_log_variance_clipped[0]
  nll = -_np_disc_loglik(np.asarray(x0, np.float64), mean, 0.5 * log_var).mean(-1) / math.log(2)
  np.testing.assert_allclose(out["vb"][:2], nll[:2], rtol=1e-3)
  assert nll[0] > 0.1  # a real, non-degenerate value (the tails and the interior both enter)
  # t > 0 rows take the KL instead.
  xt = d.q_sample(x0, t, noise)
  kl_row = d.vb_terms_bpd(_oracle(d, x0, noise, delta, v)(xt, t), x0, xt, jnp.array([5, 5, 5]))
  np.testing.assert_allclose(out["vb"][2], kl_row[2], rtol=1e-6)


def test_fixed_variance_without_learn_sigma():
  d = GaussianDiffusion(100, "linear", learn_sigma=False)
  x0, noise = _setup(B=3, C=2)
  out = d.training_losses(lambda x_t, t: noise + 0.1, x0, jnp.array([0, 4, 50]), noise)
  np.testing.assert_allclose(out["mse"], 0.01, rtol=1e-5)
  np.testing.assert_array_equal(out["vb"], 0.0)
  pm = d.p_mean_variance(noise, x0, jnp.array([0, 4, 50]))
  np.testing.assert_allclose(
    pm["variance"][:, 0], [d.posterior_variance[1], d.betas[4], d.betas[50]], rtol=1e-5
  )


# -- sampling ----------------------------------------------------------------------------------


def _known_x0_model(x0):
  """Predicts the exact eps of x_t for a known x0, indexing the ORIGINAL 1000-step schedule."""
  abar = jnp.asarray(GaussianDiffusion(1000, "cosine").alphas_cumprod, jnp.float32)

  def model_fn(x, t):
    ab = abar[t][:, None]
    eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)

  return model_fn


@pytest.mark.parametrize("steps", [None, 10])
def test_p_sample_loop_recovers_known_x0(steps):
  d = create_diffusion(1000, "cosine", True, steps)
  x0 = jnp.array([[0.3, -0.5, 1.5], [2.0, 0.0, -1.0]])
  model_fn = _known_x0_model(x0)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  out = jax.jit(lambda n: d.p_sample_loop(model_fn, n, jax.random.key(2), temperature=0.0))(noise)
  np.testing.assert_allclose(out, x0, atol=2e-3)
  # Mid-chain, the x0 prediction is exact only if the model got the original timestep.
  t = jnp.full((2,), d.num_timesteps // 2, jnp.int32)
  xt = d.q_sample(x0, t, noise)
  step = d.p_sample(model_fn, xt, t, jnp.zeros_like(x0), temperature=0.0)
  np.testing.assert_allclose(step["pred_xstart"], x0, atol=1e-3)


def test_p_sample_temperature_scales_noise():
  d = GaussianDiffusion(1000, "cosine", sampling_steps=10)
  x = jnp.array([[0.5, -0.2]])
  t = jnp.array([4])
  z = jnp.array([[1.0, -2.0]])
  model_fn = lambda x, t: jnp.concatenate([0.3 * x, jnp.full_like(x, 0.4)], -1)
  a = d.p_sample(model_fn, x, t, z, temperature=0.0)["sample"]
  b = d.p_sample(model_fn, x, t, z, temperature=0.7)["sample"]
  frac = 0.7
  log_var = frac * np.log(d.betas[4]) + (1 - frac) * d.posterior_log_variance_clipped[4]
  np.testing.assert_allclose(b - a, 0.7 * np.exp(0.5 * log_var) * np.asarray(z), rtol=1e-5)
  at0 = d.p_sample(model_fn, x, jnp.array([0]), z, temperature=1.0)["sample"]
  np.testing.assert_allclose(at0, d.p_sample(model_fn, x, jnp.array([0]), z, 0.0)["sample"])


def test_p_sample_loop_matches_numpy_reference():
  """The jitted loop against a float64 numpy ancestral sampler with the same noise draws."""
  d = GaussianDiffusion(1000, "cosine", sampling_steps=8)
  temp = 0.8

  def model_fn(x, t):
    tt = t.astype(jnp.float32)[:, None] / 1000
    return jnp.concatenate([0.5 * x + tt, jnp.tanh(x) * 0.5], -1)

  noise = jax.random.normal(jax.random.key(0), (3, 2))
  rng = jax.random.key(7)
  out = d.p_sample_loop(model_fn, noise, rng, temperature=temp)

  x = np.asarray(noise, np.float64)
  for i in range(8):
    t = 7 - i
    # one step of the official p_sample, written from its formulas
    orig = d.timestep_map[t]
    eps = 0.5 * x + orig / 1000
    frac = (np.tanh(x) * 0.5 + 1) / 2
    log_var = frac * np.log(d.betas[t]) + (1 - frac) * d.posterior_log_variance_clipped[t]
    ab = d.alphas_cumprod[t]
    x0 = np.sqrt(1 / ab) * x - np.sqrt(1 / ab - 1) * eps
    mean = d.posterior_mean_coef1[t] * x0 + d.posterior_mean_coef2[t] * x
    z = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x.shape), np.float64)
    x = mean + (t != 0) * np.exp(0.5 * log_var) * z * temp
  np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-4)


# -- flow matching -----------------------------------------------------------------------------


def _straight_velocity(x1):
  return lambda x, t: (x1 - x) / (1 - t)[:, None]


def test_flow_interpolant_and_zero_loss():
  fm = FlowMatching()
  x1 = jax.random.normal(jax.random.key(0), (64, 3))
  noise = jax.random.normal(jax.random.key(1), (64, 3))
  t = jnp.linspace(0, 1, 64)
  xt = fm.interpolate(x1, noise, t)
  np.testing.assert_allclose(xt[0], noise[0], atol=1e-6)
  np.testing.assert_allclose(xt[-1], x1[-1], atol=1e-6)
  np.testing.assert_allclose(xt[10], (1 - t[10]) * noise[10] + t[10] * x1[10], atol=1e-6)
  rng = jax.random.key(3)
  loss = fm.loss(_straight_velocity(x1), x1, rng)
  assert loss.shape == (64,)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  off = fm.loss(lambda x, t: _straight_velocity(x1)(x, t) + 0.5, x1, rng)
  np.testing.assert_allclose(off, 0.25, rtol=1e-3)
  lt = FlowMatching("logit_normal").sample_t(jax.random.key(4), 1000)
  assert 0 < float(lt.min()) and float(lt.max()) < 1 and abs(float(lt.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("num_steps", [1, 4])
def test_euler_exact_for_straight_paths(num_steps):
  fm = FlowMatching()
  x1 = jax.random.normal(jax.random.key(0), (5, 3))
  noise = jax.random.normal(jax.random.key(1), (5, 3))
  out = fm.sample_euler(_straight_velocity(x1), noise, num_steps)
  np.testing.assert_allclose(out, x1, atol=1e-5)


def test_euler_maruyama_zero_scale_is_euler():
  fm = FlowMatching()
  model_fn = lambda x, t, a: jnp.sin(x) * (1 + t[:, None]) * a
  noise = jax.random.normal(jax.random.key(1), (4, 2))
  e = fm.sample_euler(model_fn, noise, 7, a=1.5)
  em = fm.sample_euler_maruyama(model_fn, noise, 7, jax.random.key(2), 0.0, a=1.5)
  np.testing.assert_allclose(em, e, rtol=1e-6, atol=1e-6)
  em1 = fm.sample_euler_maruyama(model_fn, noise, 7, jax.random.key(2), 1.0, a=1.5)
  assert float(jnp.abs(em1 - e).max()) > 1e-2


def test_euler_maruyama_preserves_gaussian_marginal():
  """For N(m, s^2) data the exact velocity is affine; the SDE must still end at N(m, s^2)."""
  m, s = 1.5, 0.5

  def velocity(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 + t**2 * s**2
    return m + (t * s**2 - (1 - t)) / var * (x - t * m)

  fm = FlowMatching()
  noise = jax.random.normal(jax.random.key(0), (20000, 1))
  for scale in (0.0, 1.0):
    out = jax.jit(
      lambda n, k=scale: fm.sample_euler_maruyama(velocity, n, 200, jax.random.key(1), k)
    )(noise)
    assert abs(float(out.mean()) - m) < 0.02, scale
    assert abs(float(out.std()) - s) < 0.02, scale


def test_clip_denoised_bound_tames_an_inexact_first_step():
  """An eps error at t = 999 is amplified by 1 / sqrt(alpha_bar_999) in the predicted x_0 (MAR's
  `clip_x0` bounds it to the data's range); True keeps the official [-1, 1]."""
  d = GaussianDiffusion(1000, "cosine", True, sampling_steps=50)
  ab999 = float(GaussianDiffusion(1000, "cosine", True).alphas_cumprod[999])
  x0 = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (64, 4)), jnp.float32)
  t = jnp.full((64,), 999, jnp.int32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = d.q_sample(x0, t, noise)
  out = jnp.concatenate([noise + 0.05, jnp.zeros_like(noise)], -1)  # eps off by 0.05
  free = d.p_mean_variance(out, x_t, t)["pred_xstart"]
  expect = 0.05 * np.sqrt(1 - ab999) / np.sqrt(ab999)  # the error the first step divides up
  np.testing.assert_allclose(np.asarray(x0 - free), expect, rtol=1e-2)
  assert expect > 500
  for bound, want in ((True, 1.0), (2.0, 2.0)):
    pred = d.p_mean_variance(out, x_t, t, clip_denoised=bound)["pred_xstart"]
    assert float(jnp.abs(pred).max()) == pytest.approx(want)
  # And a whole clipped loop stays in range with that model error at every step.
  ab = jnp.asarray(GaussianDiffusion(1000, "cosine", True).alphas_cumprod, jnp.float32)

  def model(x, tt):
    a = ab[tt][:, None]
    return jnp.concatenate([(x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a) + 0.05, 0 * x], -1)

  tamed = d.p_sample_loop(model, noise, jax.random.key(1), clip_denoised=2.0)
  assert float(jnp.abs(tamed).max()) <= 2.5
