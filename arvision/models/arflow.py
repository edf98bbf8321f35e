"""ARFlow: autoregressive flow with hybrid linear attention (Hui et al., "ARFlow: Autoregressive
Flow with Hybrid Linear Attention").

A port of the official `models.py` / `models_infer.py` (TheFllood/ARFlow @ 6c1a5b5): a SiT-style
flow transformer over VAE latents whose sequence is several *images*. Each image is one chunk of
`(side / patch)^2` tokens; every block's attention is the official `GateRetention`: softmax
attention inside the image chunk and gated linear attention (RetNet-style, per-position gates
`logsigmoid(gt_proj(x + c)) / 16`) over all earlier images, i.e.
`arvision.kernels.chunked.gated_hybrid_chunk_attention` (the Pallas kernel, backward by autodiff
of the recurrent scan) or its `lax.scan` reference (`model.attn_impl`).

Training (official `Transport.training_losses`): a sequence is `seq_images` latents of the same
class, each noised with its own time `t` (sorted uniform draws: noisier images first, time runs
noise 0 -> data 1 as `arvision.diffusion.flow`), `x_t = t x + (1 - t) eps`, velocity target
`x - eps`, loss the per-sequence MSE. The condition of image s is `y_emb(label) + t_emb(t_s)`.

Sampling (official `sample.py`: `Sampler.sample_sde`, Euler-Maruyama, diffusion form "sigma",
last step "Mean"): every SDE step is one more image of the sequence. The network sees only the
current `x_t` as a one-chunk sequence plus a recurrent state per block (the gated-linear state of
all earlier steps' images), and appends this image to the state: generation conditions on the
previously denoised images without re-running them. On the grid `t_i = linspace(0, 1 -
last_step_size, num_steps)` the step is `x + dt (v + (1 - t) s) + sqrt(2 (1 - t) dt) w` with the
score `s = (t v - x) / (1 - t)` (the SDE of `FlowMatching.sample_euler_maruyama` with k = 1), the
last step noiseless with `dt = last_step_size`. Classifier-free guidance mixes only the first
`cfg_channels` latent channels (official `forward_with_cfg`: 3 of SD-VAE's 4; the rest are the
conditional output).

Parameter names (flax) -> official keys: `x_embedder/proj` (the patch conv), `t_embedder/mlp_{0,2}`,
`y_embedder/embedding_table` (`num_classes + 1` rows: the last is the null class),
`blocks_{i}/{attn/{q,k,v,g,gt,out}_proj, mlp/{fc1, fc2}, adaLN_modulation_1}`,
`final_layer/{adaLN_modulation_1, linear}`. `pos_embed` (fixed 2D sin-cos) is rebuilt, not loaded.
The final layer predicts `2 C` channels (official `learn_sigma=True`); the second half is unused.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import precision
from arvision.kernels.chunked import (
  decayed_hybrid_scan,
  gated_decays,
  gated_hybrid_chunk_attention,
)
from arvision.models.generator import Generator
from arvision.models.heads import TimestepEmbedder
from arvision.models.layers import gelu_tanh
from arvision.models.xar import rms_norm
from arvision.parallel.logical import param_init

ATTN_IMPLS = ("auto", "pallas", "scan")
_XAVIER = nn.initializers.xavier_uniform()
_ZEROS = nn.initializers.zeros


def _dense(features: int, names: tuple, name: str, bias: bool = True, init=_XAVIER) -> nn.Dense:
  """torch Linear with the official init (xavier-uniform weight, zero bias)."""
  return nn.Dense(
    features,
    use_bias=bias,
    kernel_init=param_init(init, names),
    bias_init=param_init(_ZEROS, (names[-1],)),
    name=name,
    dtype=precision.current_dtype(),
  )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """torch `LayerNorm(elementwise_affine=False)` in float32."""
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
  return ((x32 - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def mae_sincos_2d(side: int, dim: int) -> np.ndarray:
  """float32 `[side^2, dim]`: MAE's `get_2d_sincos_pos_embed` (the official `pos_embed`): the
  first half encodes the row, the second the column, each `[sin, cos]` of `pos / 10000^(2k/d)`."""
  if dim % 4:
    raise ValueError(f"model.hidden_size={dim} must be a multiple of 4 (2D sin-cos positions)")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

  def one(pos):
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gw, gh = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
  # official: grid = meshgrid(w, h) stacked, emb_h from grid[0] (= the column index w), emb_w
  # from grid[1] (the row index h).
  return np.concatenate([one(gw), one(gh)], axis=1).astype(np.float32)


def sde_grid(num_steps: int, last_step_size: float) -> np.ndarray:
  """The official step times: `linspace(0, 1 - last_step_size, num_steps)` (float32 like
  `th.linspace`) then 1: `num_steps` model calls, the last the noiseless "Mean" step."""
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps} must be >= 2 (ARFlow's SDE grid)")
  if not 0.0 < last_step_size < 1.0:
    raise ValueError(f"last_step_size={last_step_size} must lie in (0, 1)")
  t = np.linspace(0.0, 1.0 - last_step_size, num_steps, dtype=np.float32)
  return np.concatenate([t, np.float32([1.0])])


def sde_step(x, v, t, dt, dt_em, w, last):
  """One step of the official Euler-Maruyama sampler (`sample_sde`, diffusion form "sigma") for
  `x_t = t x_1 + (1 - t) eps`: drift `v + sigma * score` with `sigma = 1 - t` and the score
  recovered from the velocity, `(t v - x) / (sigma^2 + t sigma)`; noise `sqrt(2 sigma dt_em) w`,
  none on the `last` (noiseless "Mean") step of size `dt`."""
  sigma = 1.0 - t
  score = (t * v - x) / (sigma * sigma + t * sigma)
  drift = v + sigma * score
  return x + drift * dt + jnp.where(last, 0.0, jnp.sqrt(2.0 * sigma) * w * jnp.sqrt(dt_em))


# ------------------------------------------------------------------------------------------------
# Modules


class GateRetention(nn.Module):
  """The official `GateRetention`: q/k/v projections with weightless RMSNorm, per-head
  log-gates from `x + c`, hybrid attention over image chunks, `subln`, `silu(g_proj x) * o`,
  `out_proj`. With `state` (`[B, H, D, D]` float32) `x` is one chunk continuing a sequence whose
  earlier chunks are summarised by `state`; the updated state is returned."""

  num_heads: int
  chunk: int
  attn_impl: str = "auto"
  norm_eps: float = 1e-6
  gate_logit_normalizer: float = 16.0

  @nn.compact
  def __call__(self, x_BxLxD, c_BxLxD, state=None):
    B, L, D = x_BxLxD.shape
    H = self.num_heads
    proj = lambda n, f=D: _dense(f, ("embed", "heads"), n, bias=False)
    # official: `query_ln` etc. are built with `head_dim` but applied before the head split, so
    # they normalise over the whole width (`subln` below is per head).
    heads = lambda y: rms_norm(y.astype(jnp.float32), self.norm_eps).reshape(B, L, H, D // H)
    q, k, v = (heads(proj(n)(x_BxLxD)) for n in ("q_proj", "k_proj", "v_proj"))
    g = proj("g_proj")(x_BxLxD).astype(jnp.float32)
    gt = proj("gt_proj", H)(x_BxLxD + c_BxLxD).astype(jnp.float32)
    log_gate = jax.nn.log_sigmoid(gt) / self.gate_logit_normalizer  # [B, L, H]
    if state is not None:
      qdec, kdec, cdec = gated_decays(log_gate, L)
      o, state = decayed_hybrid_scan(
        q, k, v, qdec, kdec, cdec, chunk=L, state0=state, return_state=True
      )
    elif self._impl() == "pallas":
      o = gated_hybrid_chunk_attention(q, k, v, log_gate, chunk=self.chunk)
    else:
      o = decayed_hybrid_scan(q, k, v, *gated_decays(log_gate, self.chunk), chunk=self.chunk)
    o = rms_norm(o, self.norm_eps).reshape(B, L, D)
    o = nn.silu(g) * o
    return proj("out_proj")(o.astype(x_BxLxD.dtype)), state

  def _impl(self) -> str:
    if self.attn_impl == "auto":
      return "scan" if jax.default_backend() == "cpu" else "pallas"
    return self.attn_impl


class Mlp(nn.Module):
  """timm `Mlp`: fc1, GELU (tanh), fc2."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    h = gelu_tanh(_dense(self.hidden, ("embed", "mlp"), "fc1")(x))
    return _dense(x.shape[-1], ("mlp", "embed"), "fc2")(h)


class ARFlowBlock(nn.Module):
  """The official adaLN-Zero block over `[B, S, N, D]` (S images of N tokens), the condition
  `c [B, S, D]` per image."""

  num_heads: int
  chunk: int
  mlp_ratio: float = 4.0
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxSxNxD, c_BxSxD, state=None):
    B, S, N, D = x_BxSxNxD.shape
    ada = _dense(6 * D, ("embed", "mlp"), "adaLN_modulation_1", init=_ZEROS)(nn.silu(c_BxSxD))
    shift1, scale1, gate1, shift2, scale2, gate2 = (a[:, :, None] for a in jnp.split(ada, 6, -1))
    h = (layer_norm(x_BxSxNxD) * (1 + scale1) + shift1).reshape(B, S * N, D)
    c_tok = jnp.broadcast_to(c_BxSxD[:, :, None], (B, S, N, D)).reshape(B, S * N, D)
    attn = GateRetention(self.num_heads, self.chunk, self.attn_impl, name="attn")
    h, state = attn(h, c_tok, state)
    x = x_BxSxNxD + gate1 * h.reshape(B, S, N, D)
    h = layer_norm(x) * (1 + scale2) + shift2
    x = x + gate2 * Mlp(int(D * self.mlp_ratio), name="mlp")(h)
    return x, state


class FinalLayer(nn.Module):
  """LayerNorm (no affine) modulated per image, then the patch projection."""

  out_features: int

  @nn.compact
  def __call__(self, x_BxSxNxD, c_BxSxD):
    D = x_BxSxNxD.shape[-1]
    ada = _dense(2 * D, ("embed", "mlp"), "adaLN_modulation_1", init=_ZEROS)(nn.silu(c_BxSxD))
    shift, scale = (a[:, :, None] for a in jnp.split(ada, 2, -1))
    h = layer_norm(x_BxSxNxD) * (1 + scale) + shift
    return _dense(self.out_features, ("embed", "latent"), "linear", init=_ZEROS)(h)


class ARFlow(nn.Module):
  """The ARFlow network (official `ARFlow`): noisy latent sequences `[B, S, side, side, C]` and
  per-image times `[B, S]` -> velocities of the same shape.

  Attributes:
    side: latent side; patch: patch size; channels: latent channels.
    num_classes: classes (row `num_classes` = null class); hidden_size, depth, num_heads,
    mlp_ratio: sizes; label_drop_prob: training probability of the null class (per sequence);
    attn_impl: "pallas" (the chunked Pallas kernel), "scan" (its lax.scan reference) or "auto"
    (scan on CPU, the kernel elsewhere).
  """

  side: int
  patch: int
  channels: int
  num_classes: int
  hidden_size: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  label_drop_prob: float = 0.1
  attn_impl: str = "auto"

  @property
  def grid(self) -> int:
    return self.side // self.patch

  @property
  def chunk(self) -> int:
    return self.grid * self.grid

  def setup(self):
    D = self.hidden_size
    self.x_embedder = PatchEmbed(D, self.patch, name="x_embedder")
    self.t_embedder = TimestepEmbedder(D)
    self.y_embedder = LabelEmbed(self.num_classes, D, name="y_embedder")
    self.blocks = [
      ARFlowBlock(self.num_heads, self.chunk, self.mlp_ratio, self.attn_impl, name=f"blocks_{i}")
      for i in range(self.depth)
    ]
    self.final_layer = FinalLayer(self.patch * self.patch * 2 * self.channels)

  def condition(self, label_B, t_BxS, train: bool = False):
    """`y_emb(label) + t_emb(t)` per image `[B, S, D]`; training drops labels (per sequence) to
    the null class with `label_drop_prob`."""
    label_B = label_B.astype(jnp.int32)
    if train and self.label_drop_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), label_B.shape) < self.label_drop_prob
      label_B = jnp.where(drop, self.num_classes, label_B)
    B, S = t_BxS.shape
    temb = self.t_embedder(t_BxS.astype(jnp.float32).reshape(B * S)).reshape(B, S, -1)
    return self.y_embedder(label_B)[:, None, :] + temb

  def forward(self, x_BxSxHxWxC, c_BxSxD, states=None):
    """The network on images given their conditions: `(velocity [B, S, H, W, C], states)`;
    with `states` (one `[B, H, Dh, Dh]` per block) the S = 1 image continues a cached sequence."""
    B, S, Hs, Ws, C = x_BxSxHxWxC.shape
    p, g = self.patch, self.grid
    pos = jnp.asarray(mae_sincos_2d(g, self.hidden_size))
    x = self.x_embedder(x_BxSxHxWxC.reshape(B * S, Hs, Ws, C)).reshape(B, S, g * g, -1)
    x = precision.cast(x + pos)
    c = precision.cast(c_BxSxD)
    new = []
    for i, block in enumerate(self.blocks):
      x, st = block(x, c, None if states is None else states[i])
      new.append(st)
    out = self.final_layer(x, c).astype(jnp.float32)  # [B, S, N, p p 2C]
    out = out.reshape(B, S, g, g, p, p, 2 * C).transpose(0, 1, 2, 4, 3, 5, 6)
    v = out.reshape(B, S, g * p, g * p, 2 * C)[..., :C]  # learn_sigma: the first C channels
    return v, (None if states is None else new)

  def __call__(self, x_BxSxHxWxC, t_BxS, label_B, train: bool = False):
    """Velocities `[B, S, H, W, C]` for noisy latent sequences at per-image times."""
    return self.forward(x_BxSxHxWxC, self.condition(label_B, t_BxS, train))[0]


class PatchEmbed(nn.Module):
  """The official patch conv (`x_embedder.proj`, kernel = stride = patch), NHWC -> `[B, N, D]`."""

  hidden_size: int
  patch: int

  @nn.compact
  def __call__(self, x_BxHxWxC):
    B = x_BxHxWxC.shape[0]
    fan_in = self.patch * self.patch * x_BxHxWxC.shape[-1]

    def kernel_init(key, shape, dtype=jnp.float32):  # xavier-uniform of the [D, p p C] view
      lim = np.sqrt(6.0 / (fan_in + self.hidden_size))
      return jax.random.uniform(key, shape, dtype, -lim, lim)

    h = nn.Conv(
      self.hidden_size,
      (self.patch, self.patch),
      strides=(self.patch, self.patch),
      padding="VALID",
      kernel_init=param_init(kernel_init, (None, None, "latent", "embed")),
      bias_init=param_init(_ZEROS, ("embed",)),
      name="proj",
      dtype=precision.current_dtype(),
    )(x_BxHxWxC)
    return h.reshape(B, -1, self.hidden_size)


class LabelEmbed(nn.Module):
  """The official `LabelEmbedder` table (`num_classes + 1` rows, N(0, 0.02))."""

  num_classes: int
  hidden_size: int

  @nn.compact
  def __call__(self, label_B):
    return nn.Embed(
      self.num_classes + 1,
      self.hidden_size,
      embedding_init=param_init(nn.initializers.normal(0.02), ("classes", "embed")),
      dtype=precision.current_dtype(),
      name="embedding_table",
    )(label_B)


# ------------------------------------------------------------------------------------------------
# Family


def same_class_sequences(label_B, rng, num_seq: int, seq_images: int):
  """Indices `[num_seq, seq_images]` into the batch: sequence r takes image r's class and draws
  `seq_images` images of that class from the batch without replacement (the official loader
  draws `n` images of one random class from the dataset); a class with fewer images in the batch
  repeats them in a random order."""
  B = label_B.shape[0]
  anchors = jnp.arange(num_seq)
  same = label_B[anchors][:, None] == label_B[None, :]  # [R, B]
  scores = jnp.where(same, jax.random.uniform(rng, (num_seq, B)), -1.0)
  _, order = jax.lax.top_k(scores, seq_images)  # the class's images first, in random order
  count = jnp.sum(same, axis=1, keepdims=True)
  slot = jnp.arange(seq_images)[None, :] % count
  return jnp.take_along_axis(order, slot, axis=1)


class ARFlowFamily(Generator):
  """ARFlow as a Family on a frozen KL tokenizer (`encode_latent` / `decode_latent`)."""

  name = "arflow"
  tokenizer_methods = ("encode_latent", "decode_latent")
  sampler_static = ("num_steps", "guided")

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if getattr(tokenizer, "type", "kl") != "kl":
      raise ValueError(
        f"the arflow family needs a KL tokenizer (model.type='kl'), got {tokenizer.type!r}"
      )
    m = config.model
    self.side = int(tokenizer.latent_size)
    self.channels = int(tokenizer.embed_dim)
    patch, width, heads = int(m.patch_size), int(m.hidden_size), int(m.num_heads)
    if patch < 1 or self.side % patch:
      raise ValueError(f"model.patch_size={patch} must divide the latent side {self.side}")
    if width % heads:
      raise ValueError(f"model.hidden_size={width} must be a multiple of num_heads={heads}")
    impl = str(m.get("attn_impl", "auto"))
    if impl not in ATTN_IMPLS:
      raise ValueError(f"model.attn_impl={impl!r}; accepted: {ATTN_IMPLS}")
    self.seq_images = int(m.seq_images)
    if self.seq_images < 1 or int(config.data.batch_size) < self.seq_images:
      raise ValueError(
        f"model.seq_images={self.seq_images} must be in [1, data.batch_size="
        f"{config.data.batch_size}] (a sequence is seq_images images of one class)"
      )
    self.cfg_channels = int(m.get("cfg_channels", 3))
    if not 1 <= self.cfg_channels <= self.channels:
      raise ValueError(
        f"model.cfg_channels={self.cfg_channels} must be in [1, {self.channels}] (latent channels)"
      )
    self.module = ARFlow(
      side=self.side,
      patch=patch,
      channels=self.channels,
      num_classes=self.num_classes,
      hidden_size=width,
      depth=int(m.depth),
      num_heads=heads,
      mlp_ratio=float(m.get("mlp_ratio", 4.0)),
      label_drop_prob=float(m.get("label_drop_prob", 0.1)),
      attn_impl=impl,
    )

  def init_inputs(self) -> tuple:
    x = jnp.zeros((1, 1, self.side, self.side, self.channels), jnp.float32)
    return x, jnp.zeros((1, 1), jnp.float32), jnp.zeros((1,), jnp.int32)

  def init_rngs(self, rng: jax.Array) -> dict:
    k_p, k_d = jax.random.split(rng)
    return {"params": k_p, "dropout": k_d}

  # --- training ----------------------------------------------------------------------------------

  def latents(self, params, batch, rng=None) -> jax.Array:
    """NHWC latents `[B, side, side, C]` from `batch["tokens"]` (raster `[B, L, C]`, as MAR's) or
    the tokenizer's scaled posterior sample (official: `(mean + std eps) * 0.18215`)."""
    L = self.side * self.side
    tok = self.batch_tokens(batch, (L, self.channels), integer=False, what="latents")
    if tok is None:
      tok = self.tokenizer.encode_latent(params["tokenizer"], batch["image"], rng=rng)
    z = jnp.asarray(tok, jnp.float32).reshape(-1, self.side, self.side, self.channels)
    return jax.lax.stop_gradient(z)

  def loss(self, params, batch, rng, train: bool):
    """The official loss on `B // seq_images` same-class sequences: sorted uniform times per
    sequence, `x_t = t x + (1 - t) eps`, MSE to `x - eps`."""
    k_post, k_seq, k_t, k_n, k_drop = jax.random.split(rng, 5)
    z = self.latents(params, batch, rng=k_post)
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    R, S = max(z.shape[0] // self.seq_images, 1), self.seq_images
    idx = same_class_sequences(label, k_seq, R, S)
    x1 = z[idx]  # [R, S, H, W, C]
    x0 = jax.random.normal(k_n, x1.shape, jnp.float32)
    t = jnp.sort(jax.random.uniform(k_t, (R, S), jnp.float32), axis=1)
    tb = t[:, :, None, None, None]
    xt = tb * x1 + (1.0 - tb) * x0
    v = self.apply_module(params, xt, t, label[:R], rng=k_drop, train=train)
    loss = jnp.mean((v - (x1 - x0)) ** 2)
    return loss, {"loss": loss, "latent_std": jnp.std(z)}

  # --- sampling ----------------------------------------------------------------------------------

  def init_states(self, rows: int) -> list:
    """Zero recurrent states, one `[rows, H, Dh, Dh]` float32 per block."""
    mod = self.module
    dh = mod.hidden_size // mod.num_heads
    return [jnp.zeros((rows, mod.num_heads, dh, dh), jnp.float32) for _ in range(mod.depth)]

  def step_noise(self, rng, batch: int, num_steps: int):
    """`(initial noise [B, H, W, C], per-step noise [num_steps, B, H, W, C])` of a sample (the
    parity harness replays them into the official sampler; the last step uses none)."""
    k_init, k_steps = jax.random.split(rng)
    shape = (batch, self.side, self.side, self.channels)
    steps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_steps, i), shape))(
      jnp.arange(num_steps)
    )
    return jax.random.normal(k_init, shape, jnp.float32), steps

  def _sample_impl(self, params, labels, rng, cfg, last_step_size, *, num_steps: int, guided: bool):
    mod, var = self.module, self._vars(params)
    B = labels.shape[0]
    lab = self.labels_2B(labels) if guided else labels.astype(jnp.int32)
    rows = lab.shape[0]
    t_S = jnp.linspace(0.0, 1.0 - last_step_size, num_steps).astype(jnp.float32)
    dt_em = t_S[1] - t_S[0]
    noise, steps = self.step_noise(rng, B, num_steps)
    cc = self.cfg_channels

    def body(carry, xs):
      x, states = carry
      i, t, w = xs
      xin = jnp.concatenate([x, x]) if guided else x
      cond = mod.apply(var, lab, jnp.full((rows, 1), t), method=ARFlow.condition)
      v, states = mod.apply(var, xin[:, None], cond, states, method=ARFlow.forward)
      v = v[:, 0]
      if guided:
        c_v, u_v = v[:B], v[B:]
        v = jnp.concatenate(
          [u_v[..., :cc] + cfg * (c_v[..., :cc] - u_v[..., :cc]), c_v[..., cc:]], -1
        )
      last = i == num_steps - 1
      dt = jnp.where(last, last_step_size, dt_em)
      return (sde_step(x, v, t, dt, dt_em, w, last), states), None

    (x, _), _ = jax.lax.scan(
      body, (noise, self.init_states(rows)), (jnp.arange(num_steps), t_S, steps)
    )
    return self.decode_images(params, x, "decode_latent"), x

  def sample_tokens(self, params, labels, rng, *, num_steps=250, cfg=1.0, last_step_size=0.04):
    """Samples images and returns their latents.

    Args:
      params: ARFlow params plus `params["tokenizer"]`.
      labels: int `[B]` class labels (`num_classes` = unconditional).
      rng: a jax PRNG key; the result is a deterministic function of it.
      num_steps: model calls (= images of the generated sequence): `num_steps - 1`
        Euler-Maruyama steps on `linspace(0, 1 - last_step_size, num_steps)` and the last
        noiseless step of `last_step_size` (static, >= 2).
      cfg: guidance scale on the first `model.cfg_channels` channels (traced); 1.0 runs the
        conditional model alone.
      last_step_size: the official "Mean" last step (traced).

    Returns:
      `(images uint8 [B, H, W, C], latents float32 [B, side, side, C])`.
    """
    labels = self.check_labels(labels)
    sde_grid(int(num_steps), float(last_step_size))  # checks both
    guided = bool(float(cfg) != 1.0)
    return self._sample_jit(
      params,
      labels,
      rng,
      jnp.float32(cfg),
      jnp.float32(last_step_size),
      num_steps=int(num_steps),
      guided=guided,
    )


def official_param_count(
  depth: int,
  width: int,
  heads: int,
  patch: int,
  side: int = 32,
  channels: int = 4,
  num_classes: int = 1000,
) -> int:
  """`sum(p.numel() for p in ARFlow(...).parameters())` (with the frozen `pos_embed`)."""
  D, hidden, pp = width, int(width * 4.0), patch * patch
  block = (5 * D * D + D * heads) + (D * hidden + hidden + hidden * D + D) + (6 * D * D + 6 * D)
  return (
    (pp * channels * D + D)  # x_embedder
    + (side // patch) ** 2 * D  # pos_embed
    + (256 * D + D + D * D + D)  # t_embedder
    + (num_classes + 1) * D
    + depth * block
    + (2 * D * D + 2 * D)
    + (D * pp * 2 * channels + pp * 2 * channels)
  )


build = ARFlowFamily.build
