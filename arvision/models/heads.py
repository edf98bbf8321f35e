"""Per-token output heads, one registry (`HEADS`) that families name in `config.model.head`:

- `categorical`: logits over a codebook (VAR, LlamaGen); a Dense, params `kernel`, `bias`.
- `diffusion`: MAR's diffusion loss (`DiffusionHead`) over continuous tokens given a condition z.
- `flow`: the same MLP trained by flow matching (`FlowHead`, `arvision.diffusion.flow`).

A port of the official `models/diffloss.py` (LTH14/mar): `SimpleMLPAdaLN` (time embedding + cond
embedding summed into y, AdaLN residual MLP blocks, AdaLN final layer) and `DiffLoss`, which trains
with a 1000-step cosine Gaussian diffusion (eps prediction, learned-range variance, MSE + VB) and
samples with a respaced copy of it.

Parameter names (flax, under the head) -> official state_dict keys (under `diffloss.`):

  net/time_embed/mlp_0/{kernel,bias}            net.time_embed.mlp.0.{weight,bias}
  net/time_embed/mlp_2/{kernel,bias}            net.time_embed.mlp.2.{weight,bias}
  net/cond_embed/{kernel,bias}                  net.cond_embed.{weight,bias}
  net/input_proj/{kernel,bias}                  net.input_proj.{weight,bias}
  net/res_blocks_{i}/in_ln/{scale,bias}         net.res_blocks.{i}.in_ln.{weight,bias}
  net/res_blocks_{i}/mlp_0/{kernel,bias}        net.res_blocks.{i}.mlp.0.{weight,bias}
  net/res_blocks_{i}/mlp_2/{kernel,bias}        net.res_blocks.{i}.mlp.2.{weight,bias}
  net/res_blocks_{i}/adaLN_modulation_1/...     net.res_blocks.{i}.adaLN_modulation.1.{weight,bias}
  net/final_layer/linear/{kernel,bias}          net.final_layer.linear.{weight,bias}
  net/final_layer/adaLN_modulation_1/...        net.final_layer.adaLN_modulation.1.{weight,bias}

i.e. "." -> "/", a Sequential index `.k.` -> `_k`, `weight` -> `kernel` (transposed, torch Linear
is `[out, in]`) for Dense and -> `scale` for LayerNorm. `final_layer.norm_final` has no params.
Logical axes: the head width W is `embed`, expanded hidden outputs (time MLP hidden, the W->W
block MLP hidden, the 3W / 2W AdaLN outputs) are `mlp`, the token dim is `latent`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.diffusion.flow import FlowMatching
from arvision.diffusion.gaussian import create_diffusion
from arvision.models.common import Dense
from arvision.models.layers import layer_norm
from arvision.parallel.logical import param_init
from arvision.precision import current_dtype
from arvision.sampling.guidance import mix

_ZEROS = nn.initializers.zeros
_ONES = nn.initializers.ones
_XAVIER = nn.initializers.xavier_uniform()


def _dense(features: int, names: tuple, name: str, kernel_init=_XAVIER) -> Dense:
  """A Dense with a zero bias, both annotated with logical `names` (kernel `[in, out]`)."""
  return Dense(
    features,
    kernel_init=param_init(kernel_init, names),
    bias_init=param_init(_ZEROS, (names[1],)),
    name=name,
    dtype=current_dtype(),
  )


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding `[B, dim]` of (possibly fractional) timesteps, `[cos, sin]` order."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """Sinusoidal frequencies -> Dense -> SiLU -> Dense (weights N(0, 0.02), official init)."""

  hidden_size: int
  frequency_embedding_size: int = 256

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)
    h = timestep_embedding(t, self.frequency_embedding_size)
    h = _dense(self.hidden_size, (None, "mlp"), "mlp_0", init)(h)
    return _dense(self.hidden_size, ("mlp", "embed"), "mlp_2", init)(nn.silu(h))


class ResBlock(nn.Module):
  """x + gate * MLP(LN(x) * (1 + scale) + shift); (shift, scale, gate) = Dense(SiLU(y))."""

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    C = x.shape[-1]
    ada = _dense(3 * C, ("embed", "mlp"), "adaLN_modulation_1", _ZEROS)(nn.silu(y))
    shift, scale, gate = jnp.split(ada, 3, axis=-1)
    h = nn.LayerNorm(
      epsilon=1e-6,
      use_fast_variance=False,
      scale_init=param_init(_ONES, ("norm",)),
      bias_init=param_init(_ZEROS, ("norm",)),
      name="in_ln",
      dtype=current_dtype(),
    )(x)
    h = h * (1 + scale) + shift
    h = _dense(C, ("embed", "mlp"), "mlp_0")(h)
    h = _dense(C, ("mlp", "embed"), "mlp_2")(nn.silu(h))
    return x + gate * h


class FinalLayer(nn.Module):
  """LN (no affine) modulated by (shift, scale) = Dense(SiLU(y)), then a Dense (zero init)."""

  out_channels: int

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    C = x.shape[-1]
    ada = _dense(2 * C, ("embed", "mlp"), "adaLN_modulation_1", _ZEROS)(nn.silu(y))
    shift, scale = jnp.split(ada, 2, axis=-1)
    x = layer_norm(x, 1e-6) * (1 + scale) + shift
    return _dense(self.out_channels, ("embed", "latent"), "linear", _ZEROS)(x)


class SimpleMLPAdaLN(nn.Module):
  """The official diffusion-loss MLP: `net(x [B, in], t [B], c [B, z]) -> [B, out]`.

  Attributes:
    in_channels: token dim.
    model_channels: width W.
    out_channels: output dim (2 * in_channels with a learned variance).
    z_channels: dim of the condition c (the AR decoder width).
    num_res_blocks: number of `ResBlock`s.
  """

  in_channels: int
  model_channels: int
  out_channels: int
  z_channels: int
  num_res_blocks: int

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
    W = self.model_channels
    x = _dense(W, ("latent", "embed"), "input_proj")(x)
    t_emb = TimestepEmbedder(W, name="time_embed")(t)
    # c's dim is the AR model's own `embed`; it is left unsharded here to keep the names distinct.
    c_emb = _dense(W, (None, "embed"), "cond_embed")(c)
    y = t_emb + c_emb
    for i in range(self.num_res_blocks):
      x = ResBlock(name=f"res_blocks_{i}")(x, y)
    # float32 out: the diffusion / flow losses and sampler steps are float32 math.
    return FinalLayer(self.out_channels, name="final_layer")(x, y).astype(jnp.float32)


def cfg_model_output(out: jax.Array, cfg, token_dim: int) -> jax.Array:
  """The official `forward_with_cfg` mix for rows `[cond; uncond]` of `out [2N, 2C or C]`.

  Returns `[N, ...]`: guided eps `uncond + cfg * (cond - uncond)` and, with a learned variance,
  the conditional half's variance output (untouched by guidance).
  """
  n = out.shape[0] // 2
  eps, rest = out[:, :token_dim], out[:, token_dim:]
  return jnp.concatenate([mix(eps[:n], eps[n:], cfg), rest[:n]], axis=-1)


class DiffusionHead(nn.Module):
  """MAR's diffusion loss (official `DiffLoss`) over per-token targets given conditions z.

  Attributes:
    token_dim: C, the token (target) dim.
    z_dim: D, the condition dim.
    width: W of the MLP.
    depth: number of residual blocks.
    num_sampling_steps: respaced diffusion steps at sampling.
    learn_sigma: predict the variance too (output 2C) and add the VB term.
  """

  token_dim: int
  z_dim: int
  width: int
  depth: int
  num_sampling_steps: int = 100
  learn_sigma: bool = True

  def setup(self):
    self.net = SimpleMLPAdaLN(
      in_channels=self.token_dim,
      model_channels=self.width,
      out_channels=self.token_dim * (2 if self.learn_sigma else 1),
      z_channels=self.z_dim,
      num_res_blocks=self.depth,
    )

  @property
  def train_diffusion(self):
    return create_diffusion(1000, "cosine", self.learn_sigma, None)

  def gen_diffusion(self, num_steps: int | None = None):
    """The respaced sampling diffusion (`num_steps` overrides `num_sampling_steps`)."""
    steps = self.num_sampling_steps if num_steps is None else int(num_steps)
    return create_diffusion(1000, "cosine", self.learn_sigma, steps)

  def __call__(self, target: jax.Array, z: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scalar loss: `loss(t, noise)` per token with t uniform over the 1000 steps (rng stream
    "diffusion"), averaged over the tokens where `mask` is set (all when None)."""
    diffusion = self.train_diffusion
    rng_t, rng_n = jax.random.split(self.make_rng("diffusion"))
    t = jax.random.randint(rng_t, target.shape[:1], 0, diffusion.num_timesteps, jnp.int32)
    noise = jax.random.normal(rng_n, target.shape, jnp.float32)
    loss = diffusion.training_losses(self.net, target.astype(jnp.float32), t, noise, c=z)["loss"]
    if mask is None:
      return jnp.mean(loss)
    mask = mask.astype(loss.dtype)
    # Official `(loss * mask).sum() / mask.sum()`; the floor only matters for an empty mask.
    return jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1e-8)

  def sample(
    self,
    z: jax.Array,
    temperature=1.0,
    cfg=1.0,
    num_steps: int | None = None,
    rng: jax.Array | None = None,
    *,
    guided: bool | None = None,
    clip_x0: float = 0.0,
  ) -> jax.Array:
    """Samples one token per row of `z` (official `DiffLoss.sample`), `[N, C]`.

    Args:
      z: `[N, D]` conditions; with guidance the rows are `[cond; uncond]` halves.
      temperature: scales the per-step noise (may be traced).
      cfg: guidance scale on eps only (may be traced).
      num_steps: static override of the sampling steps (DiSA-style annealing).
      rng: the sampling key (split into the initial-noise key and the `p_sample_loop` key);
        defaults to the "diffusion" rng stream.
      guided: whether `z` holds `[cond; uncond]` halves. None infers `cfg != 1` from a concrete
        `cfg`; pass it explicitly when `cfg` is traced (e.g. a per-step CFG schedule).
      clip_x0: static; > 0 clips each step's predicted x_0 to [-clip_x0, clip_x0] (0 = off, the
        official MAR). With the cosine schedule the first step divides the eps error by
        sqrt(alpha_bar_999) ~ 5e-5, so a briefly trained head needs it (see configs/mar.py).

    Returns:
      `[N, C]`. With guidance both halves hold the conditional samples (the official code returns
      the uncond half from a discarded trajectory; callers keep the first half either way). The
      noise is shared by the halves, and the same rng gives the unguided sample at cfg = 1.
    """
    if guided is None:
      if isinstance(cfg, jax.core.Tracer):
        raise ValueError(
          "cfg is traced: pass guided=True/False to say whether z has cond/uncond halves"
        )
      guided = float(cfg) != 1.0
    if rng is None:
      rng = self.make_rng("diffusion")
    diffusion = self.gen_diffusion(num_steps)
    rng_init, rng_loop = jax.random.split(rng)
    C = self.token_dim
    if guided:
      if z.shape[0] % 2:
        raise ValueError(f"guided sampling needs [cond; uncond] halves, got {z.shape[0]} rows")

      def model_fn(x, t, c):
        both = self.net(jnp.concatenate([x, x]), jnp.concatenate([t, t]), c)
        return cfg_model_output(both, cfg, C)

      n = z.shape[0] // 2
    else:
      model_fn, n = self.net, z.shape[0]
    noise = jax.random.normal(rng_init, (n, C), jnp.float32)
    x = diffusion.p_sample_loop(
      model_fn, noise, rng_loop, temperature, clip_denoised=float(clip_x0), c=z
    )
    return jnp.concatenate([x, x]) if guided else x


class CategoricalHead(Dense):
  """Logits over a vocabulary: a Dense (`features` = vocabulary size) with `kernel` and `bias`,
  so families that name it keep their parameter trees (VAR's `head`)."""


class FlowHead(nn.Module):
  """A flow-matching head over per-token targets given conditions z (`SimpleMLPAdaLN` net).

  The net sees `t * 1000` so its sinusoidal time embedding has the diffusion head's range.

  Attributes:
    token_dim, z_dim, width, depth: as `DiffusionHead`.
    num_sampling_steps: Euler steps at sampling.
    time_dist: training-time distribution ("uniform" or "logit_normal").
  """

  token_dim: int
  z_dim: int
  width: int
  depth: int
  num_sampling_steps: int = 50
  time_dist: str = "uniform"

  def setup(self):
    self.net = SimpleMLPAdaLN(
      in_channels=self.token_dim,
      model_channels=self.width,
      out_channels=self.token_dim,
      z_channels=self.z_dim,
      num_res_blocks=self.depth,
    )

  def velocity(self, x, t, c):
    return self.net(x, t * 1000.0, c)

  def __call__(self, target: jax.Array, z: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scalar velocity MSE (rng stream "diffusion", as the diffusion head), masked mean."""
    flow = FlowMatching(self.time_dist)
    loss = flow.loss(self.velocity, target.astype(jnp.float32), self.make_rng("diffusion"), c=z)
    if mask is None:
      return jnp.mean(loss)
    mask = mask.astype(loss.dtype)
    return jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1e-8)

  def sample(self, z, temperature=1.0, cfg=1.0, num_steps=None, rng=None, *, guided=False):
    """Euler samples `[N, C]` (noise times `temperature`); with `guided` the rows of z are
    `[cond; uncond]` halves, the velocity is mixed by `cfg` and both halves hold the result."""
    steps = self.num_sampling_steps if num_steps is None else int(num_steps)
    rng = self.make_rng("diffusion") if rng is None else rng
    n = z.shape[0] // 2 if guided else z.shape[0]

    def model_fn(x, t, c):
      if not guided:
        return self.velocity(x, t, c)
      both = self.velocity(jnp.concatenate([x, x]), jnp.concatenate([t, t]), c)
      return mix(both[:n], both[n:], cfg)

    noise = jax.random.normal(rng, (n, self.token_dim), jnp.float32) * temperature
    x = FlowMatching(self.time_dist).sample_euler(model_fn, noise, steps, c=z)
    return jnp.concatenate([x, x]) if guided else x


HEADS = {"categorical": CategoricalHead, "diffusion": DiffusionHead, "flow": FlowHead}


def head_class(name: str) -> type[nn.Module]:
  """The head class `config.model.head=name` names."""
  if name not in HEADS:
    raise ValueError(f"model.head={name!r} is unknown; accepted: {list(HEADS)}")
  return HEADS[name]


__all__ = [
  "HEADS",
  "CategoricalHead",
  "DiffusionHead",
  "FlowHead",
  "head_class",
  "FinalLayer",
  "ResBlock",
  "SimpleMLPAdaLN",
  "TimestepEmbedder",
  "cfg_model_output",
  "timestep_embedding",
]
