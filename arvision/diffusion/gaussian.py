"""Gaussian diffusion (DDPM / improved DDPM) as used by MAR's diffusion loss, in pure JAX.

A port of the official `diffusion/` package of LTH14/mar (itself from DiT / IDDPM):
- beta schedules ("cosine": the improved-DDPM alpha_bar with max_beta 0.999; "linear": Ho et al.
  scaled to the number of steps), computed in float64 numpy at construction;
- eps prediction; with `learn_sigma` the model outputs `[eps, v]` along the last axis and the
  log-variance interpolates between the clipped posterior log-variance and log(beta)
  ("learned range"); without it the variance is the official "fixed large";
- the hybrid loss of `LossType.MSE` with a learned variance: `mse(eps) + vb`, where `vb` (in bits)
  sees the eps prediction through a stop-gradient, and is the decoder NLL at t = 0;
- timestep respacing for sampling (`space_timesteps`): the kept steps get betas that recompose the
  original alphas_cumprod, and the model is called with the ORIGINAL timestep index (the official
  `_WrappedModel` mapping);
- ancestral sampling whose added noise is scaled by a temperature (MAR's `p_sample`).

Coefficients are gathered as float32, as the official `_extract_into_tensor(...).float()`.
Timestep indices `t` index this (possibly respaced) process: 0 is the least noisy step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ModelFn = Callable[..., jax.Array]


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
  """float64 betas `[num_steps]` of the named schedule ("cosine" or "linear")."""
  if name == "linear":
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
  if name == "cosine":
    return betas_for_alpha_bar(
      num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    )
  raise ValueError(f"schedule={name!r} is not supported; use 'cosine' or 'linear'")


def betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
  """Betas discretising a continuous alpha_bar(t) on [0, 1], each capped at `max_beta`."""
  betas = []
  for i in range(num_steps):
    t1, t2 = i / num_steps, (i + 1) / num_steps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas, dtype=np.float64)


def space_timesteps(num_steps: int, section_counts: str | int | list[int]) -> list[int]:
  """The kept timesteps (sorted) of the official `space_timesteps`.

  `section_counts` is a comma-separated string of step counts per equal section ("100",
  "10,15,20"), an int, a list of ints, or "ddimN" (a fixed integer stride giving N steps).
  """
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim") :])
      for i in range(1, num_steps):
        if len(range(0, num_steps, i)) == desired:
          return list(range(0, num_steps, i))
      raise ValueError(f"cannot create exactly {desired} steps from {num_steps} with a stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per, extra = divmod(num_steps, len(section_counts))
  start, steps = 0, []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide a section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      steps.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the official code."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood (nats) of `x` under a Gaussian discretised into 1/255-wide bins on [-1, 1]
  (the official decoder term; the edge bins take the tails)."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch axes."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class GaussianDiffusion:
  """A (possibly respaced) discrete Gaussian diffusion with the official MAR settings.

  Attributes (float64 numpy, length `num_timesteps`): `betas`, `alphas_cumprod`,
  `alphas_cumprod_prev`, `posterior_variance`, `posterior_log_variance_clipped`,
  `posterior_mean_coef1/2`, ... exactly as the official `GaussianDiffusion`; `timestep_map` (int)
  maps a step index of this process to the original timestep the model is called with.
  """

  def __init__(
    self,
    num_steps: int = 1000,
    schedule: str = "cosine",
    learn_sigma: bool = True,
    sampling_steps: int | str | None = None,
  ):
    self.original_num_steps = int(num_steps)
    self.schedule = schedule
    self.learn_sigma = bool(learn_sigma)
    base_betas = get_named_beta_schedule(schedule, self.original_num_steps)
    if sampling_steps is None or sampling_steps == "" or sampling_steps == num_steps:
      kept = list(range(self.original_num_steps))
      betas = base_betas
    else:
      kept = space_timesteps(self.original_num_steps, sampling_steps)
      # Respacing: betas whose cumulative products equal the original alphas_cumprod at `kept`.
      base_ac = np.cumprod(1.0 - base_betas)
      last, new = 1.0, []
      for i in kept:
        new.append(1.0 - base_ac[i] / last)
        last = base_ac[i]
      betas = np.array(new, dtype=np.float64)
    self.timestep_map = np.asarray(kept, dtype=np.int32)
    self._set_betas(betas)

  def _set_betas(self, betas: np.ndarray):
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must be 1-D and in (0, 1]")
    self.betas = betas
    self.num_timesteps = int(betas.shape[0])
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    if self.num_timesteps > 1:
      # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
      self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:])
      )
    else:
      # One step only (the official code leaves this empty): never used for noise (t = 0 adds
      # none); log(beta) keeps the learned-range interpolation finite.
      self.posterior_log_variance_clipped = np.log(betas)
    self.posterior_mean_coef1 = (
      betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    )
    self.posterior_mean_coef2 = (
      (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
    )
    # "Fixed large" variance (used without learn_sigma).
    fixed_large = np.append(self.posterior_variance[1:2], betas[1:])[: self.num_timesteps]
    self.fixed_large_variance = fixed_large if self.num_timesteps > 1 else betas

  # -- helpers --------------------------------------------------------------------------------

  @staticmethod
  def _extract(arr: np.ndarray, t: jax.Array, x: jax.Array) -> jax.Array:
    """`arr[t]` as float32, shaped `[B, 1, ...]` to broadcast against `x`."""
    res = jnp.asarray(arr, jnp.float32)[t]
    return res.reshape(res.shape + (1,) * (x.ndim - 1))

  def model_output(self, model_fn: ModelFn, x_t: jax.Array, t: jax.Array, **model_kwargs):
    """Calls `model_fn(x_t, original_timestep, **kw)` (the official `_WrappedModel`)."""
    return model_fn(x_t, jnp.asarray(self.timestep_map)[t], **model_kwargs)

  # -- forward process ------------------------------------------------------------------------

  def q_mean_variance(self, x0: jax.Array, t: jax.Array):
    """`(mean, variance, log_variance)` of q(x_t | x_0)."""
    mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
    var = self._extract(1.0 - self.alphas_cumprod, t, x0) * jnp.ones_like(x0)
    log_var = self._extract(self.log_one_minus_alphas_cumprod, t, x0) * jnp.ones_like(x0)
    return mean, var, log_var

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw of q(x_t | x_0) with the given standard normal `noise`."""
    return (
      self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
      + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )

  def q_posterior_mean_variance(self, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """`(mean, variance, log_variance_clipped)` of q(x_{t-1} | x_t, x_0)."""
    mean = (
      self._extract(self.posterior_mean_coef1, t, x_t) * x0
      + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
    )
    var = self._extract(self.posterior_variance, t, x_t) * jnp.ones_like(x_t)
    log_var = self._extract(self.posterior_log_variance_clipped, t, x_t) * jnp.ones_like(x_t)
    return mean, var, log_var

  # -- reverse process ------------------------------------------------------------------------

  def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return (
      self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
      - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )

  def p_mean_variance(
    self, model_out: jax.Array, x_t: jax.Array, t: jax.Array, clip_denoised: float = False
  ) -> dict[str, jax.Array]:
    """p(x_{t-1} | x_t) from a model output (`[eps, v]` with learn_sigma, else `eps`).

    `clip_denoised` (static): False/0 = off (MAR), True = clip the predicted x_0 to [-1, 1]
    (images, official), a float c > 0 = clip to [-c, c] (latents with a known range).

    Returns a dict with `mean`, `variance`, `log_variance`, `pred_xstart`.
    """
    if self.learn_sigma:
      C = x_t.shape[-1]
      if model_out.shape[-1] != 2 * C:
        raise ValueError(
          f"learn_sigma needs a model output of width {2 * C}, got {model_out.shape}"
        )
      eps, var_values = model_out[..., :C], model_out[..., C:]
      min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
      max_log = self._extract(np.log(self.betas), t, x_t)
      frac = (var_values + 1) / 2  # v in [-1, 1] spans [min_var, max_var]
      log_var = frac * max_log + (1 - frac) * min_log
      var = jnp.exp(log_var)
    else:
      eps = model_out
      var = self._extract(self.fixed_large_variance, t, x_t) * jnp.ones_like(x_t)
      log_var = self._extract(np.log(self.fixed_large_variance), t, x_t) * jnp.ones_like(x_t)
    pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
    if clip_denoised:
      bound = float(clip_denoised)
      pred_xstart = jnp.clip(pred_xstart, -bound, bound)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(mean=mean, variance=var, log_variance=log_var, pred_xstart=pred_xstart)

  def vb_terms_bpd(self, model_out: jax.Array, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """The variational-bound term in bits per dim `[B]`: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0,
    the discretised decoder NLL of x_0 at t = 0."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
    out = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
    kl = kl / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(
      x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
    )
    nll = mean_flat(nll) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)

  def training_losses(
    self, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array, **model_kwargs
  ) -> dict[str, jax.Array]:
    """The official `LossType.MSE` losses, each `[B]`: `mse` on eps, `vb` (learned variance only,
    the mean path frozen), and `loss = mse + vb`."""
    x_t = self.q_sample(x0, t, noise)
    out = self.model_output(model_fn, x_t, t, **model_kwargs)
    if self.learn_sigma:
      C = x0.shape[-1]
      eps, var_values = out[..., :C], out[..., C:]
      # The VB term learns the variance only: the mean sees the eps prediction as a constant.
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
      vb = self.vb_terms_bpd(frozen, x0, x_t, t)
    else:
      eps = out
      vb = jnp.zeros(x0.shape[:1], jnp.float32)
    mse = mean_flat((noise - eps) ** 2)
    return dict(loss=mse + vb, mse=mse, vb=vb)

  def p_sample(
    self,
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    temperature=1.0,
    clip_denoised: float = False,
    **model_kwargs,
  ) -> dict[str, jax.Array]:
    """One ancestral step x_t -> x_{t-1}; the added noise is scaled by `temperature` and absent
    at t = 0. Returns `sample` and `pred_xstart`."""
    out = self.p_mean_variance(
      self.model_output(model_fn, x, t, **model_kwargs), x, t, clip_denoised=clip_denoised
    )
    nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature
    return dict(sample=sample, pred_xstart=out["pred_xstart"])

  def p_sample_loop(
    self,
    model_fn: ModelFn,
    noise: jax.Array,
    rng: jax.Array,
    temperature=1.0,
    clip_denoised: float = False,
    **model_kwargs,
  ) -> jax.Array:
    """Ancestral sampling from x_T = `noise` down to x_0 over this process's steps (a `fori_loop`;
    step i draws its noise from `fold_in(rng, i)`). `temperature` may be traced."""
    B = noise.shape[0]
    T = self.num_timesteps

    def body(i, x):
      t = jnp.full((B,), T - 1 - i, jnp.int32)
      z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      out = self.p_sample(model_fn, x, t, z, temperature, clip_denoised, **model_kwargs)
      return out["sample"]

    return jax.lax.fori_loop(0, T, body, noise)


@functools.lru_cache(maxsize=64)
def create_diffusion(
  num_steps: int = 1000,
  schedule: str = "cosine",
  learn_sigma: bool = True,
  sampling_steps: int | str | None = None,
) -> GaussianDiffusion:
  """A cached `GaussianDiffusion` (modules rebuild it at every apply; the schedules are static)."""
  return GaussianDiffusion(num_steps, schedule, learn_sigma, sampling_steps)


__all__ = [
  "GaussianDiffusion",
  "betas_for_alpha_bar",
  "create_diffusion",
  "discretized_gaussian_log_likelihood",
  "get_named_beta_schedule",
  "mean_flat",
  "normal_kl",
  "space_timesteps",
]
