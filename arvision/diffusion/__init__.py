"""Diffusion processes used by the generative heads: Gaussian diffusion (MAR's diffusion loss,
cosine schedule, respacing, temperature) and linear-interpolant flow matching."""

from arvision.diffusion.flow import FlowMatching
from arvision.diffusion.gaussian import (
  GaussianDiffusion,
  create_diffusion,
  discretized_gaussian_log_likelihood,
  get_named_beta_schedule,
  normal_kl,
  space_timesteps,
)

__all__ = [
  "FlowMatching",
  "GaussianDiffusion",
  "create_diffusion",
  "discretized_gaussian_log_likelihood",
  "get_named_beta_schedule",
  "normal_kl",
  "space_timesteps",
]
