"""Guidance: the one mixing formula and each family's schedule against its official form, written
out here independently of `arvision.sampling.guidance`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision.models import mar
from arvision.sampling import guidance


def _pair(seed, shape=(3, 7)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape), jax.random.normal(k2, shape)


def test_mix_is_llamagen_form_and_guide_keeps_unguided_exact():
  c, u = _pair(0)
  np.testing.assert_array_equal(guidance.mix(c, u, 2.5), u + 2.5 * (c - u))
  np.testing.assert_array_equal(guidance.guide(c, u, 1.0), c)  # scale 1: cond itself, bit-exact
  np.testing.assert_array_equal(guidance.guide(c, u, 3.0, active=False), c)
  np.testing.assert_array_equal(guidance.guide(c, u, 3.0), guidance.mix(c, u, 3.0))


def test_var_linear_schedule_matches_official():
  # Official VAR autoregressive_infer_cfg: t = cfg * si / (n - 1); (1 + t) cond - t uncond.
  c, u = _pair(1)
  n, cfg = 10, 1.5
  for si in range(n):
    t = cfg * si / (n - 1)
    official = (1 + t) * c - t * u
    s = guidance.linear_excess(jnp.float32(cfg), si, n)
    np.testing.assert_allclose(guidance.guide(c, u, s), official, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(guidance.guide(c, u, guidance.linear_excess(cfg, 0, n)), c)
  # All scales at once (numpy steps) and a traced step give the same scales.
  steps = np.arange(n)
  np.testing.assert_allclose(guidance.linear_excess(cfg, steps, n), 1 + cfg * steps / (n - 1))
  traced = jax.jit(lambda k: guidance.linear_excess(cfg, k, n))(jnp.int32(4))
  np.testing.assert_allclose(traced, 1 + cfg * 4 / 9, rtol=1e-6)
  assert float(guidance.linear_excess(cfg, 0, 1)) == 1.0


def _official_mar_cfg_iters(seq_len, num_iter, cfg, schedule):
  """LTH14/mar `sample_tokens`: the cfg of each step, from the mask lengths of the loop."""
  out, mask_sum = [], seq_len
  for step in range(num_iter):
    mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = np.floor(seq_len * mask_ratio)
    mask_len = max(1, min(mask_sum - 1, mask_len))
    if schedule == "linear":
      out.append(1 + (cfg - 1) * (seq_len - mask_len) / seq_len)
    else:
      out.append(cfg)
    mask_sum = mask_len if step < num_iter - 1 else 0
  return np.asarray(out)


@pytest.mark.parametrize("seq_len,num_iter", [(256, 64), (16, 4), (64, 1)])
def test_mar_schedules_match_official(seq_len, num_iter):
  cfg = 2.9
  sched = mar.mask_schedule(seq_len, num_iter)
  progress = guidance.mar_progress(sched["mask_len"], seq_len)
  np.testing.assert_allclose(
    guidance.linear_progress(cfg, progress),
    _official_mar_cfg_iters(seq_len, num_iter, cfg, "linear"),
    rtol=1e-12,
  )
  np.testing.assert_allclose(
    guidance.constant(cfg, np.arange(num_iter)),
    _official_mar_cfg_iters(seq_len, num_iter, cfg, "constant"),
    rtol=1e-6,
  )


@pytest.mark.parametrize("cfg_interval", [-1, 0, 3])
def test_llamagen_interval_matches_official(cfg_interval):
  # Official LlamaGen generate: token 0 from the prefill is guided; decode step i (token i + 1)
  # stops guidance once cfg_interval > -1 and i > cfg_interval; guided = uncond + (c - u) * s.
  c, u = _pair(2)
  cfg, N = 4.0, 8
  for t in range(N):
    guided = not (t >= 1 and cfg_interval > -1 and t - 1 > cfg_interval)
    official = u + (c - u) * cfg if guided else c
    s = guidance.interval(jnp.float32(cfg), t, cfg_interval)
    np.testing.assert_array_equal(guidance.guide(c, u, s), official)
  traced = jax.jit(lambda t: guidance.interval(cfg, t, cfg_interval))(jnp.int32(5))
  assert float(traced) == (1.0 if cfg_interval in (0, 3) else cfg)


def test_per_step_and_constant():
  c, u = _pair(3)
  scales = (1.0, 2.0, 3.5)
  for k, s in enumerate(scales):
    np.testing.assert_array_equal(
      guidance.guide(c, u, guidance.per_step(scales, k, 3)), c if s == 1.0 else u + s * (c - u)
    )
  with pytest.raises(ValueError, match="one scale per step"):
    guidance.per_step(scales, 0, 4)
  assert float(guidance.constant(jnp.float32(2.0), 5)) == 2.0
