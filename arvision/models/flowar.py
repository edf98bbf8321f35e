"""FlowAR: scale-wise autoregressive generation with a flow-matching head (Ren et al., "FlowAR:
Scale-wise Autoregressive Image Generation Meets Flow Matching").

A port of the official `models/flowar.py` + `models/flowmodel.py` (OliverRensu/FlowAR; the code is
read from the public fork wangqiang9/FlowAR). Over the KL latent (MAR's KL-16: 16x16x16) at
scales `pn = (1, 2, 4, 8, 16)`:

- the input of scale 0 is the class embedding; the input of scale k + 1 is
  `area(bicubic(x_k, side), pn_{k+1})` of scale k's latent (ground truth in training, the sample
  in sampling), projected by `z_proj`;
- an encoder and a decoder of the same AdaLN blocks as xAR (`arvision.models.xar.Block`: weightless
  RMSNorm, AdaLN-6 from the class embedding, timm SwiGLU with the GELU gate) under the
  scale-causal mask (`ops.masks.scale_causal`), with per-scale 2D RoPE (scale k's grid at
  positions `arange(pn) / pn * side`, the official `VisionRotaryEmbeddingFast`);
- per token, the decoder output plus `diffusion_pos_embed_learned` conditions a flow head
  (`FlowNet`, official `SimpleTransformerAdaLN`): a small transformer over one scale's tokens
  (self-attention with the scale's RoPE; with `cross=True`, L/H, cross-attention to the
  condition), trained with the linear interpolant and v-prediction at a uniform t per (example,
  scale); scale k's loss is weighted by `pn_k^2 / pn_last^2`.

In `arvision.diffusion.flow`'s convention (time noise -> data) FlowAR's time is `1 - t` and its
velocity `eps - x` is `-v`: the loss is `FlowMatching("uniform")` and the sampler is
`FlowMatching.sample_on_grid` (Euler) on the official grid `linspace(1, 0.3, S//2) ++
linspace(0.25, 0, S//2 + 1)` (`linspace(1, 0, 51)` for S = 50). Guidance acts on the velocity
where the noise level is <= `guidance` (the official CFG interval; 0.9 S, 0.7 H) with the scale
ramp `1 + (cfg - 1) k / (K - 1)` over scales; decoding keeps a static KV cache (scale-causal).
DiSA-style annealing (`disa=True`) runs `num_steps` on the first scale down to `disa_min_steps`
on the last.

Parameter names (flax) -> official keys: as xAR for the AR part (`class_emb`, `z_proj`,
`z_proj_ln`, `encoder_*`, `decoder_*`), plus `diffusion_pos_embed_learned` and
`flownet/{time_embed/mlp_{0,2}, cond_embed, input_proj, res_blocks_{i}/{attn/{qkv, proj},
crossattn/{q, kv, proj}, norm2_1, norm2_2, mlp/{fc1_g, fc1_x, fc2}, ada_lin | ada_lin_attn,
ada_lin_mlp}, final_layer/{linear, adaLN_modulation_1}}`. Buffers (mask, RoPE `freqs`) are
rebuilt. The official `buffer_size` (default 0) is not supported (its RoPE segments assume 0).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import precision
from arvision.diffusion.flow import FlowMatching
from arvision.models.generator import Generator
from arvision.models.heads import TimestepEmbedder
from arvision.models.mar import disa_steps
from arvision.models.raster import RMSNorm, apply_rope
from arvision.models.xar import SwiGLU, _dense, cell_cfg, rms_norm, run_blocks, setup_ar_body
from arvision.ops import masks, resize
from arvision.ops.attention import attention
from arvision.parallel.logical import constrain, param_init
from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches

_BLE = ("batch", "seq", "embed")


# ------------------------------------------------------------------------------------------------
# RoPE, grids, scale inputs (numpy / static)


def scale_rope(pn: int, head_dim: int, side: int, theta: float = 10000.0) -> np.ndarray:
  """float32 `[pn^2, head_dim / 2, 2]` (cos, sin): the official `VisionRotaryEmbeddingFast` at a
  `pn x pn` grid whose positions are `arange(pn) / pn * side` (float32, as torch), pairs
  `< head_dim / 4` rotated by the row, the rest by the column (interleaved pairs)."""
  half = head_dim // 2
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
  exps = np.arange(0, half, 2)[: half // 2].astype(np.float32)
  freqs = (1.0 / (np.float32(theta) ** (exps / np.float32(half)))).astype(np.float32)
  t = (np.arange(pn, dtype=np.float32) / np.float32(pn) * np.float32(side)).astype(np.float32)
  f = np.outer(t, freqs).astype(np.float32)  # [pn, hd/4]
  grid = np.concatenate(
    [
      np.broadcast_to(f[:, None, :], (pn, pn, f.shape[1])),
      np.broadcast_to(f[None], (pn, pn, f.shape[1])),
    ],
    axis=-1,
  )
  return np.stack([np.cos(grid), np.sin(grid)], axis=-1).reshape(pn * pn, half, 2)


def euler_levels(num_steps: int) -> np.ndarray:
  """The official `euler_sampler` noise levels (float64, 1 -> 0): `num_steps` = 50 is
  `linspace(1, 0, 51)`; otherwise `linspace(1, 0.3, S // 2)` then `linspace(0.25, 0, S // 2 + 1)`
  (so 2 (S // 2) Euler steps)."""
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps} must be >= 2 (FlowAR's Euler grid)")
  if num_steps == 50:
    return np.linspace(1.0, 0.0, 51)
  return np.concatenate(
    [np.linspace(1.0, 0.3, num_steps // 2), np.linspace(0.25, 0.0, num_steps // 2 + 1)]
  )


def euler_grid(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """`euler_levels` as `(times, model_times)`: the flow convention `times = 1 - t` and the
  float32 levels the head is called with."""
  t = euler_levels(num_steps)
  return 1.0 - t, t[:-1].astype(np.float32)


def next_scale_input(x_BxHxWxC: jax.Array, side: int, pn_next: int) -> jax.Array:
  """`area(bicubic(x, side), pn_next)`: the official input of the next scale."""
  return resize.area(resize.bicubic(x_BxHxWxC, side), pn_next)


# ------------------------------------------------------------------------------------------------
# The flow head


class HeadAttention(nn.Module):
  """The head's self-attention (or, with `kv`, cross-attention): q/k/v without bias, RoPE on q
  and k at the scale's grid, no mask, proj with bias."""

  num_heads: int

  @nn.compact
  def __call__(self, x_BxNxW, rope, kv_BxNxZ=None):
    B, N, W = x_BxNxW.shape
    H, hd = self.num_heads, W // self.num_heads
    dense = lambda f, name: nn.Dense(
      f,
      use_bias=False,
      kernel_init=param_init(nn.initializers.xavier_uniform(), ("embed", "heads")),
      name=name,
      dtype=precision.current_dtype(),
    )
    if kv_BxNxZ is None:
      qkv = dense(3 * W, "qkv")(x_BxNxW).reshape(B, N, 3, H, hd)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = dense(W, "q")(x_BxNxW).reshape(B, N, H, hd)
      kv = dense(2 * W, "kv")(kv_BxNxZ).reshape(B, N, 2, H, hd)
      k, v = kv[:, :, 0], kv[:, :, 1]
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = attention(q, k, v, mask=masks.full(), impl="xla")
    return _dense(W, ("heads", "embed"), "proj")(out.reshape(B, N, W))


class HeadBlock(nn.Module):
  """Official `Block_v1` (`cross=False`: AdaLN-6 from `t + c` per token) or `Block_v2`
  (`cross=True`: AdaLN-3 from t for the attention, AdaLN-3 from `t + c` for the MLP, and a
  cross-attention to the AR condition between them)."""

  num_heads: int
  cross: bool = False
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, t_Bx1xW, c_BxNxW, cond_BxNxZ, rope):
    B, N, W = x.shape
    if self.cross:
      a = _dense(3 * W, ("embed", "mlp"), "ada_lin_attn")(nn.silu(t_Bx1xW)).reshape(B, 1, 3, W)
      m = _dense(3 * W, ("embed", "mlp"), "ada_lin_mlp")(nn.silu(c_BxNxW + t_Bx1xW))
      m = m.reshape(B, N, 3, W)
      (g1, s1, b1), (g2, s2, b2) = (a[:, :, i] for i in range(3)), (m[:, :, i] for i in range(3))
    else:
      ada = _dense(6 * W, ("embed", "mlp"), "ada_lin")(nn.silu(t_Bx1xW + c_BxNxW))
      g1, g2, s1, s2, b1, b2 = (ada.reshape(B, N, 6, W)[:, :, i] for i in range(6))
    h = rms_norm(x, self.norm_eps) * (1 + s1) + b1
    x = x + HeadAttention(self.num_heads, name="attn")(h, rope) * g1
    if self.cross:
      q = RMSNorm(self.norm_eps, name="norm2_1")(x)
      kv = RMSNorm(self.norm_eps, name="norm2_2")(cond_BxNxZ)
      x = x + HeadAttention(self.num_heads, name="crossattn")(q, rope, kv)
    h = rms_norm(x, self.norm_eps) * (1 + s2) + b2
    return x + SwiGLU(int(W * 4 * 2 / 3.0), name="mlp")(h) * g2


class FlowNet(nn.Module):
  """Official `SimpleTransformerAdaLN`: `x [B, N, C]` of one scale, FlowAR time `t [B]` (noise
  level), condition `[B, N, Z]` -> velocity `eps - x` `[B, N, C]`. Heads = width // 64."""

  token_dim: int
  width: int
  depth: int
  cross: bool = False
  side: int = 16

  @nn.compact
  def __call__(self, x_BxNxC, t_B, cond_BxNxZ):
    B, N, _ = x_BxNxC.shape
    W = self.width
    heads = max(W // 64, 1)
    pn = int(round(N**0.5))
    rope = jnp.asarray(scale_rope(pn, W // heads, self.side))
    steps = jnp.floor(t_B.astype(jnp.float32) * 1000.0)
    x = _dense(W, ("latent", "embed"), "input_proj")(x_BxNxC.astype(jnp.float32))
    t = TimestepEmbedder(W, name="time_embed")(steps)[:, None, :]
    c = _dense(W, (None, "embed"), "cond_embed")(cond_BxNxZ)
    for i in range(self.depth):
      x = HeadBlock(heads, self.cross, name=f"res_blocks_{i}")(x, t, c, cond_BxNxZ, rope)
    return FinalLayer(self.token_dim, name="final_layer")(x, c + t).astype(jnp.float32)


class FinalLayer(nn.Module):
  """Official `FinalLayer`: `(shift, scale) = adaLN_modulation(silu(y))`, weightless RMSNorm,
  modulate, `linear`."""

  token_dim: int

  @nn.compact
  def __call__(self, x, y):
    W = x.shape[-1]
    ada = _dense(2 * W, ("embed", "mlp"), "adaLN_modulation_1")(nn.silu(y))
    shift, scale = jnp.split(ada, 2, axis=-1)
    x = rms_norm(x, 1e-6) * (1 + scale) + shift
    return _dense(self.token_dim, ("embed", "latent"), "linear")(x)


# ------------------------------------------------------------------------------------------------
# The AR network


class FlowAR(nn.Module):
  """The FlowAR encoder/decoder and its flow head (official `FlowAR`).

  Attributes:
    patch_nums: scale sides (the last is the latent side). token_dim: latent channels.
    num_classes: classes (row `num_classes` of `class_emb` = null class).
    encoder_dim/depth/heads, decoder_dim/depth/heads, mlp_ratio: sizes.
    head_width, head_depth, cross: the flow head (official `diffloss_w`, `diffloss_d`, `cross`).
    label_drop_prob, norm_eps, attn_impl: as xAR.
  """

  patch_nums: tuple
  token_dim: int
  num_classes: int
  encoder_dim: int
  encoder_depth: int
  encoder_heads: int
  decoder_dim: int
  decoder_depth: int
  decoder_heads: int
  head_width: int
  head_depth: int
  cross: bool = False
  mlp_ratio: float = 4.0
  label_drop_prob: float = 0.1
  norm_eps: float = 1e-6
  attn_impl: str = "auto"

  @property
  def lengths(self) -> tuple:
    return tuple(p * p for p in self.patch_nums)

  @property
  def starts(self) -> tuple:
    return tuple(int(s) for s in np.cumsum((0,) + self.lengths[:-1]))

  def setup(self):
    L = sum(self.lengths)
    setup_ar_body(self, L, masks.scale_causal(self.lengths))
    self.diffusion_pos_embed_learned = self.param(
      "diffusion_pos_embed_learned",
      param_init(nn.initializers.normal(0.02), (None, "seq", "embed")),
      (1, L, self.decoder_dim),
    )
    self.flownet = FlowNet(
      self.token_dim, self.head_width, self.head_depth, self.cross, self.patch_nums[-1]
    )

  def class_embedding(self, label_B, train: bool = False):
    """`class_emb(label)` `[B, D]`; training drops labels to the null class."""
    label_B = label_B.astype(jnp.int32)
    if train and self.label_drop_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), label_B.shape) < self.label_drop_prob
      label_B = jnp.where(drop, self.num_classes, label_B)
    return self.class_emb(label_B)

  def project(self, x_BxNxC):
    """`z_proj` of latent tokens (a scale's input)."""
    return self.z_proj(x_BxNxC.astype(jnp.float32))

  def _rope(self, heads: int, dim: int, scales: range) -> jnp.ndarray:
    side = self.patch_nums[-1]
    return jnp.asarray(
      np.concatenate([scale_rope(self.patch_nums[k], dim // heads, side) for k in scales])
    )

  def forward_scales(self, h_BxQxD, cemb_BxD, first: int = 0, caches=None):
    """The AR condition z `[B, Q, Dd]` of scales `first ..` (Q tokens of embedded inputs:
    class token / `z_proj` outputs), with the caches updated (None: the whole sequence)."""
    Q = h_BxQxD.shape[1]
    start = self.starts[first]
    sl = slice(start, start + Q)
    last = first + int(np.searchsorted(np.cumsum(self.lengths[first:]), Q)) + 1
    scales = range(first, last)
    ne = self.encoder_depth
    enc_c = None if caches is None else caches[:ne]
    dec_c = None if caches is None else caches[ne:]
    cond = cemb_BxD[:, None, :]
    x = constrain(self.z_proj_ln(h_BxQxD + self.encoder_pos_embed_learned[:, sl]), _BLE)
    rope = self._rope(self.encoder_heads, self.encoder_dim, scales)
    x, enc_c = run_blocks(self.encoder_blocks, x, cond, rope, enc_c, start)
    x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[:, sl]
    rope = self._rope(self.decoder_heads, self.decoder_dim, scales)
    x, dec_c = run_blocks(self.decoder_blocks, precision.cast(x), cond, rope, dec_c, start)
    z = self.decoder_norm(x) + self.diffusion_pos_embed_learned[:, sl]
    return z, (None if caches is None else enc_c + dec_c)

  def velocity(self, x_BxNxC, t_B, z_BxNxZ, train: bool = False):
    """The flow head: FlowAR's velocity `eps - x` at noise level `t`."""
    del train  # no dropout in the head
    return self.flownet(x_BxNxC, t_B, z_BxNxZ)

  def __call__(self, inputs_BxLmxC, label_B, train: bool = False):
    """Teacher-forced condition z `[B, L, Dd]` for the scale inputs (`[B, L - 1, C]`: the
    inputs of scales 1 ..; scale 0's input is the class embedding)."""
    cemb = self.class_embedding(label_B, train)
    h = jnp.concatenate([cemb[:, None, :], self.project(inputs_BxLmxC)], axis=1)
    return self.forward_scales(h, cemb)[0]


# ------------------------------------------------------------------------------------------------
# Family


class FlowARFamily(Generator):
  """FlowAR as a Family on a frozen KL tokenizer (`encode_latent` / `decode_latent`)."""

  name = "flowar"
  tokenizer_methods = ("encode_latent", "decode_latent")
  sampler_static = ("steps_per_scale", "guided", "guidance_high")

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if getattr(tokenizer, "type", "kl") != "kl":
      raise ValueError(
        f"the flowar family needs a KL tokenizer (model.type='kl'), got {tokenizer.type!r}"
      )
    m = config.model
    self.side = int(tokenizer.latent_size)
    self.patch_nums = tuple(int(p) for p in m.patch_nums)
    if not self.patch_nums or self.patch_nums[-1] != self.side or self.patch_nums[0] != 1:
      raise ValueError(
        f"model.patch_nums={self.patch_nums} must start at 1 and end with the latent side "
        f"{self.side}"
      )
    if int(m.get("buffer_size", 0)) != 0:
      raise ValueError(
        f"model.buffer_size={m.buffer_size}: only 0 is supported (the official RoPE segments "
        "and sampler assume no buffer)"
      )
    self.token_dim = int(tokenizer.embed_dim)
    self.lengths = tuple(p * p for p in self.patch_nums)
    for which in ("encoder", "decoder"):
      dim, heads = int(m[f"{which}_embed_dim"]), int(m[f"{which}_num_heads"])
      if dim % heads or (dim // heads) % 4:
        raise ValueError(
          f"model.{which}_embed_dim={dim} / {which}_num_heads={heads} must give a head dim "
          "divisible by 4 (2D RoPE)"
        )
    hw = int(m.head_width)
    if (hw // max(hw // 64, 1)) % 4:
      raise ValueError(f"model.head_width={hw}: its head dim (width / (width // 64)) must be % 4")
    self.flow = FlowMatching("uniform")
    self.module = FlowAR(
      patch_nums=self.patch_nums,
      token_dim=self.token_dim,
      num_classes=self.num_classes,
      encoder_dim=int(m.encoder_embed_dim),
      encoder_depth=int(m.encoder_depth),
      encoder_heads=int(m.encoder_num_heads),
      decoder_dim=int(m.decoder_embed_dim),
      decoder_depth=int(m.decoder_depth),
      decoder_heads=int(m.decoder_num_heads),
      head_width=hw,
      head_depth=int(m.head_depth),
      cross=bool(m.get("cross", False)),
      mlp_ratio=float(m.get("mlp_ratio", 4.0)),
      label_drop_prob=float(m.get("label_drop_prob", 0.1)),
      norm_eps=float(m.get("norm_eps", 1e-6)),
      attn_impl=str(m.get("attn_impl", "auto")),
    )

  def init_inputs(self) -> tuple:
    x = jnp.zeros((1, sum(self.lengths) - 1, self.token_dim), jnp.float32)
    return x, jnp.zeros((1,), jnp.int32)

  def init_annotated(self, rng, batch=None):
    del batch
    k_p, k_d = jax.random.split(rng)
    mod = self.module

    def init_all(m, x, label):
      z = m(x, label)
      pn = self.patch_nums[-1]
      m.velocity(jnp.zeros((1, pn * pn, self.token_dim)), jnp.zeros((1,)), z[:, -pn * pn :])
      return z

    variables = mod.init({"params": k_p, "dropout": k_d}, *self.init_inputs(), method=init_all)
    return dict(variables["params"])

  # --- training ----------------------------------------------------------------------------------

  def latents(self, params, batch, rng=None) -> jax.Array:
    """NHWC latents: `batch["tokens"]` (raster `[B, L, C]`, as MAR's) or the tokenizer's."""
    L = self.side * self.side
    tok = self.batch_tokens(batch, (L, self.token_dim), integer=False, what="latents")
    if tok is None:
      tok = self.tokenizer.encode_latent(params["tokenizer"], batch["image"], rng=rng)
    z = jnp.asarray(tok, jnp.float32).reshape(-1, self.side, self.side, self.token_dim)
    return jax.lax.stop_gradient(z)

  def teacher_inputs(self, z_BxHxWxC):
    """(ground truth per scale `[B, pn^2, C]` list, inputs of scales 1.. `[B, L - 1, C]`)."""
    B, C = z_BxHxWxC.shape[0], self.token_dim
    gts = [resize.area(z_BxHxWxC, p) for p in self.patch_nums[:-1]] + [z_BxHxWxC]
    ins = [
      next_scale_input(g, self.side, p).reshape(B, p * p, C)
      for g, p in zip(gts[:-1], self.patch_nums[1:], strict=True)
    ]
    return [g.reshape(B, -1, C) for g in gts], jnp.concatenate(ins, axis=1)

  def loss(self, params, batch, rng, train: bool):
    """Sum over scales of the flow-matching loss (uniform t per example and scale), scale k
    weighted by `pn_k^2 / pn_last^2`."""
    k_post, k_drop, k_flow = jax.random.split(rng, 3)
    z = self.latents(params, batch, rng=k_post)
    gts, inputs = self.teacher_inputs(z)
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    cond = self.apply_module(params, inputs, label, rng=k_drop, train=train)
    total, metrics = 0.0, {}
    for k, (gt, start, n) in enumerate(zip(gts, self.module.starts, self.lengths, strict=True)):
      zk = cond[:, start : start + n]

      def model_fn(x_t, t, zk=zk):
        return -self.apply_module(params, x_t, 1.0 - t, zk, method=FlowAR.velocity)

      lk = jnp.mean(self.flow.loss(model_fn, gt, jax.random.fold_in(k_flow, k)))
      metrics[f"loss_scale{k}"] = lk
      total = total + lk * n / self.lengths[-1]
    return total, {"loss": total, "latent_std": jnp.std(z), **metrics}

  # --- sampling ----------------------------------------------------------------------------------

  def scale_noise(self, rng, k: int, batch: int):
    """Initial noise `[B, pn_k^2, C]` of scale k (the parity harness replays it)."""
    return jax.random.normal(
      jax.random.fold_in(rng, k), (batch, self.lengths[k], self.token_dim), jnp.float32
    )

  def _sample_impl(
    self, params, labels, rng, cfg, *, steps_per_scale: tuple, guided: bool, guidance_high: float
  ):
    mod, var = self.module, self._vars(params)
    B, K, C = labels.shape[0], len(self.patch_nums), self.token_dim
    lab = self.labels_2B(labels) if guided else labels.astype(jnp.int32)
    rows = lab.shape[0]
    cemb = mod.apply(var, lab, method=FlowAR.class_embedding)
    L, dt = sum(self.lengths), precision.current_dtype()
    caches = init_kv_caches(
      mod.encoder_depth, rows, L, mod.encoder_heads, mod.encoder_dim // mod.encoder_heads, dt
    ) + init_kv_caches(
      mod.decoder_depth, rows, L, mod.decoder_heads, mod.decoder_dim // mod.decoder_heads, dt
    )
    h = cemb[:, None, :]
    x = None
    for k in range(K):
      z, caches = mod.apply(var, h, cemb, k, caches, method=FlowAR.forward_scales)
      scale = cell_cfg(cfg, k, K)
      times, model_times = euler_grid(steps_per_scale[k])
      # The official CFG interval, decided on the host in float64 as the official loop does:
      # guided steps are those whose noise level is <= guidance_high.
      interval = jnp.asarray(euler_levels(steps_per_scale[k])[:-1] <= guidance_high)

      def model_fn(x, t, step, z=z, scale=scale, interval=interval):
        if not guided:
          return -mod.apply(var, x, t, z, method=FlowAR.velocity)
        x2, t2 = jnp.concatenate([x, x]), jnp.concatenate([t, t])
        v = mod.apply(var, x2, t2, z, method=FlowAR.velocity)
        active = (scale > 1.0) & interval[step]
        return -guidance.guide(v[:B], v[B:], scale, active=active)

      x = self.flow.sample_on_grid(
        model_fn, self.scale_noise(rng, k, B), times, model_times=model_times, pass_step=True
      )
      if k + 1 < K:
        pn, nxt = self.patch_nums[k], self.patch_nums[k + 1]
        up = next_scale_input(x.reshape(B, pn, pn, C), self.side, nxt).reshape(B, nxt * nxt, C)
        up = jnp.concatenate([up, up]) if guided else up
        h = mod.apply(var, up, method=FlowAR.project)
    tokens = x
    latent = tokens.reshape(B, self.side, self.side, C)
    return self.decode_images(params, latent, "decode_latent"), tokens

  def sample_tokens(
    self,
    params,
    labels,
    rng,
    *,
    num_steps=25,
    cfg=1.0,
    guidance_high=0.9,
    disa=False,
    disa_min_steps=15,
  ):
    """Samples images and returns their last-scale latent tokens.

    Args:
      params: FlowAR params plus `params["tokenizer"]`.
      labels: int `[B]` class labels (`num_classes` = unconditional).
      rng: a jax PRNG key; the result is a deterministic function of it.
      num_steps: the official `num_steps` per scale (static; see `euler_grid`).
      cfg: guidance at the last scale (ramped from 1 at the first; traced). 1.0 runs the
        conditional model alone.
      guidance_high: guidance acts where the noise level is <= this (official `--guidance`).
      disa: anneal `num_steps` (first scale) linearly to `disa_min_steps` (last scale).

    Returns:
      `(images uint8 [B, H, W, C], tokens float32 [B, L, C])` (raster order).
    """
    labels = self.check_labels(labels)
    steps = int(num_steps)
    if steps < 2:
      raise ValueError(f"num_steps={steps} must be >= 2 (FlowAR's Euler grid)")
    K = len(self.patch_nums)
    if disa:
      lower = int(disa_min_steps)
      if not 2 <= lower <= steps:
        raise ValueError(f"disa_min_steps={lower} must be in [2, num_steps={steps}]")
      per_scale = tuple(int(s) for s in disa_steps(K, steps, lower))
    else:
      per_scale = (steps,) * K
    guided = bool(float(cfg) != 1.0)
    return self._sample_jit(
      params,
      labels,
      rng,
      jnp.float32(cfg),
      steps_per_scale=per_scale,
      guided=guided,
      guidance_high=float(guidance_high),
    )


build = FlowARFamily.build
