"""xAR: next-cell prediction with flow matching (Ren et al., "Beyond Next-Token: Next-X Prediction
for Autoregressive Visual Generation").

A port of the official `models/xar.py` (OliverRensu/xAR). The latent grid (KL-16: 16x16x16) is cut
into `cells x cells` square cells (official 2x2 cells of 8x8 tokens); the sequence is the cells in
raster order, each cell's tokens in raster order (`cell_order`). An encoder and a decoder stack of
AdaLN blocks (weightless RMSNorm, 2D RoPE over the grid, timm `SwiGLU` with the official GELU gate)
attend block-causally over cells (`ops.masks.chunk_causal(tokens per cell)`), and a linear `pred`
gives a velocity per token. There is no separate diffusion head.

Noisy Context Learning (training): every cell is noised with its own time `t ~ sigmoid(N(0, 1))`,
`x_t = (1 - t) x + t eps`, and the model predicts `v = eps - x` for all cells at once; the AdaLN
condition of a cell is `class_emb(label) + time_embed(floor(1000 t))`. In `arvision.diffusion.flow`'s
convention (time runs noise -> data) this is `FlowMatching("logit_normal")` over cells with
`t_flow = 1 - t` and velocity `-v`, which is how the loss is computed here (`XARFamily.loss`).

Sampling (official `sample_tokens` + `euler_maruyama_sampler`): cell by cell, Euler-Maruyama from
noise on the official grid `t = linspace(1, 0.04, S)` then 0 (the last step noiseless), with the
diffusion `2 t`: that SDE is `FlowMatching.sample_on_grid` with `diffusion_scale = 1`. Earlier
cells are context at t = 0 through a static KV cache: before cell s's steps, cell s - 1 runs once
at t = 0 and writes its keys/values (the official first step, which recomputes that cell and caches
all but the last cell); each step then runs cell s alone against the cache. Guidance (on the
velocity, equivalent to the official drift mix) ramps linearly over cells, `1 + (cfg - 1) s /
(N - 1)`, and is active where that scale exceeds 1 (official). DiSA-style step annealing
(`disa=True`) runs `num_steps` flow steps on the first cell down to `disa_min_steps` on the last.

Parameter names (flax) -> official keys: `class_emb` (`embedding`; `num_classes + 1` rows, the
last the null class), `time_embed/mlp_{0,2}`, `z_proj`, `z_proj_ln` (RMSNorm `scale` = weight),
`encoder_pos_embed_learned`, `encoder_blocks_{i}/{attn/{qkv, proj}, mlp/{fc1_g, fc1_x, fc2},
ada_lin_1}`, `encoder_norm`, `decoder_embed`, `decoder_pos_embed_learned`, `decoder_blocks_{i}`,
`decoder_norm`, `pred`. Buffers (`mask`, RoPE tables) are rebuilt, not loaded.

Generalised from the official constants: the grid side, cells per side and token width are config
(the official code hard-codes 16x16 grids, 2x2 cells, 64 tokens per cell and 16 channels).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import precision
from arvision.diffusion.flow import FlowMatching
from arvision.models.generator import Generator
from arvision.models.heads import TimestepEmbedder
from arvision.models.layers import gelu_erf
from arvision.models.mar import disa_steps
from arvision.models.raster import RMSNorm, apply_rope, rope_2d_table
from arvision.ops import masks
from arvision.ops.attention import attention
from arvision.parallel.logical import constrain, param_init
from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches, update_kv_cache

_BLE = ("batch", "seq", "embed")
_XAVIER = nn.initializers.xavier_uniform()


def _dense(features: int, names: tuple, name: str) -> nn.Dense:
  """torch Linear with the official init: xavier-uniform weight, zero bias."""
  return nn.Dense(
    features,
    kernel_init=param_init(_XAVIER, names),
    bias_init=param_init(nn.initializers.zeros, (names[-1],)),
    name=name,
    dtype=precision.current_dtype(),
  )


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
  """The official weightless RMSNorm: float32 statistics, cast back."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Cells and schedules (numpy, static)


def cell_order(side: int, cells: int) -> np.ndarray:
  """`order[j]` = raster index of the j-th token of the cell sequence (official `clusterify`):
  cells in raster order, each cell's `(side / cells)^2` tokens in raster order."""
  if cells < 1 or side % cells:
    raise ValueError(f"model.cells={cells} must divide the latent side {side}")
  n = side // cells
  ch, cw, p, q = np.meshgrid(*(np.arange(k) for k in (cells, cells, n, n)), indexing="ij")
  return ((ch * n + p) * side + cw * n + q).reshape(-1)


def clusterify(z_BxHxWxC: jax.Array, cells: int) -> jax.Array:
  """NHWC latent -> `[B, L, C]` tokens in cell order."""
  B, H, W, C = z_BxHxWxC.shape
  return z_BxHxWxC.reshape(B, H * W, C)[:, cell_order(H, cells)]


def unclusterify(x_BxLxC: jax.Array, cells: int) -> jax.Array:
  """Inverse of `clusterify`: cell-ordered tokens -> NHWC latent."""
  B, L, C = x_BxLxC.shape
  side = math.isqrt(L)
  inv = np.argsort(cell_order(side, cells))
  return x_BxLxC[:, inv].reshape(B, side, side, C)


def em_grid(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The official Euler-Maruyama grid as `(times [S+1], model_times [S])`: xAR's noise levels
  `linspace(1, 0.04, S)` then 0 (float64, as the official sampler), given in the flow convention
  `times = 1 - t`, and the float32 noise levels the network is called with."""
  if num_steps < 2:
    raise ValueError(f"num_steps={num_steps}: xAR's Euler-Maruyama grid needs at least 2 steps")
  t_x = np.concatenate([np.linspace(1.0, 0.04, num_steps), [0.0]])
  return 1.0 - t_x, t_x[:-1].astype(np.float32)


def cell_cfg(cfg, cell: int, num_cells: int):
  """The official linear ramp over cells: `1 + (cfg - 1) s / (N - 1)` (1 for a single cell)."""
  return 1.0 + (cfg - 1.0) * (cell / (num_cells - 1) if num_cells > 1 else 0.0)


# ------------------------------------------------------------------------------------------------
# Modules


class SwiGLU(nn.Module):
  """timm `SwiGLU` as xAR builds it: `fc2(act(fc1_g x) * fc1_x x)` with act = exact GELU (the
  official blocks pass timm's default `act_layer=nn.GELU`), biases on."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    g = _dense(self.hidden, ("embed", "mlp"), "fc1_g")(x)
    h = gelu_erf(g) * _dense(self.hidden, ("embed", "mlp"), "fc1_x")(x)
    return _dense(x.shape[-1], ("mlp", "embed"), "fc2")(constrain(h, ("batch", "seq", "mlp")))


class Attention(nn.Module):
  """Fused qkv (bias), 2D RoPE on q and k, attention under `mask` (xAR: chunk-causal over
  cells; FlowAR: scale-causal), proj.

  With `cache` the queries are the tokens at positions `index ..`, written into the static
  `cache` there; keys are the whole cache (positions past the query's segment are masked)."""

  num_heads: int
  mask: masks.MaskSpec
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxC, rope, cache=None, index: int = 0):
    B, L, C = x_BxLxC.shape
    H = self.num_heads
    qkv = _dense(3 * C, ("embed", "heads"), "qkv")(x_BxLxC).reshape(B, L, 3, H, C // H)
    q, k, v = apply_rope(qkv[:, :, 0], rope), apply_rope(qkv[:, :, 1], rope), qkv[:, :, 2]
    if cache is not None:
      cache = update_kv_cache(cache, k, v, index)
      k, v = cache[0].astype(q.dtype), cache[1].astype(q.dtype)
    out = attention(q, k, v, mask=self.mask, impl=self.attn_impl, q_offset=index)
    return _dense(C, ("heads", "embed"), "proj")(out.reshape(B, L, C)), cache


class Block(nn.Module):
  """The official AdaLN block: `(gamma1, gamma2, scale1, scale2, shift1, shift2)` from
  `ada_lin(silu(cond))` per cell, `x + gamma1 attn(norm1(x) (1 + scale1) + shift1)`, the same
  with the SwiGLU MLP. `cond` is per segment `[B, N, D]` (N divides the tokens: xAR's cells) or
  one vector `[B, 1, D]` (FlowAR's class embedding)."""

  num_heads: int
  mask: masks.MaskSpec
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x, cond_BxNxD, rope, cache=None, index: int = 0):
    B, L, C = x.shape
    ada = _dense(6 * C, ("embed", "mlp"), "ada_lin_1")(nn.silu(cond_BxNxD))
    ada = jnp.repeat(ada.reshape(B, -1, 6, C), L // cond_BxNxD.shape[1], axis=1)  # per token
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))
    h = rms_norm(x, self.norm_eps) * (1 + scale1) + shift1
    h, cache = Attention(self.num_heads, self.mask, self.attn_impl, name="attn")(
      h, rope, cache, index
    )
    x = x + h * gamma1
    h = rms_norm(x, self.norm_eps) * (1 + scale2) + shift2
    x = x + SwiGLU(int(C * self.mlp_ratio * 2 / 3.0), name="mlp")(h) * gamma2
    return constrain(x, _BLE), cache


def setup_ar_body(m: nn.Module, seq_len: int, mask: masks.MaskSpec) -> None:
  """The AR body xAR and FlowAR share, set on `m` from its `setup()`: `class_emb` (with the null
  class), `z_proj`, `z_proj_ln`, `encoder_pos_embed_learned`, `encoder_blocks_{i}`,
  `encoder_norm`, `decoder_embed`, `decoder_pos_embed_learned`, `decoder_blocks_{i}`,
  `decoder_norm` (the official names; `m`'s own params come after these, in this order, so the
  initialisation is unchanged). `m` has the sizes (`num_classes`, `encoder_*`, `decoder_*`) and
  `mlp_ratio`, `norm_eps`, `attn_impl`."""
  D, Dd, L = m.encoder_dim, m.decoder_dim, seq_len
  normal = nn.initializers.normal(0.02)
  m.class_emb = nn.Embed(
    m.num_classes + 1,
    D,
    embedding_init=param_init(normal, ("classes", "embed")),
    dtype=precision.current_dtype(),
  )
  m.z_proj = _dense(D, ("latent", "embed"), "z_proj")
  m.z_proj_ln = RMSNorm(m.norm_eps)
  pos = (None, "seq", "embed")
  m.encoder_pos_embed_learned = m.param(
    "encoder_pos_embed_learned", param_init(normal, pos), (1, L, D)
  )
  blk = dict(mask=mask, mlp_ratio=m.mlp_ratio, norm_eps=m.norm_eps, attn_impl=m.attn_impl)
  m.encoder_blocks = [
    Block(m.encoder_heads, **blk, name=f"encoder_blocks_{i}") for i in range(m.encoder_depth)
  ]
  m.encoder_norm = RMSNorm(m.norm_eps)
  m.decoder_embed = _dense(Dd, (None, "embed"), "decoder_embed")
  m.decoder_pos_embed_learned = m.param(
    "decoder_pos_embed_learned", param_init(normal, pos), (1, L, Dd)
  )
  m.decoder_blocks = [
    Block(m.decoder_heads, **blk, name=f"decoder_blocks_{i}") for i in range(m.decoder_depth)
  ]
  m.decoder_norm = RMSNorm(m.norm_eps)


def run_blocks(blocks, x, cond, rope, caches, index: int):
  """`blocks` in turn (under the remat mode without a cache; with one, the queries at positions
  `index ..` and each block's cache updated): `(x, new caches)`."""
  new = []
  for i, block in enumerate(blocks):
    cache = None if caches is None else caches[i]
    if cache is None:
      x, _ = precision.block(block, x, cond, rope)
    else:
      x, cache = block(x, cond, rope, cache, index)
    new.append(cache)
  return x, new


class XAR(nn.Module):
  """The xAR network (official `xAR`): cell-ordered noisy tokens + per-cell times -> velocity.

  Attributes:
    side: latent grid side; cells: cells per side (`L = side^2` tokens, `cells^2` cells).
    token_dim: channels per token. num_classes: classes (row `num_classes` = null class).
    encoder_dim, encoder_depth, encoder_heads, decoder_dim, decoder_depth, decoder_heads: sizes.
    mlp_ratio: MLP ratio (SwiGLU hidden `int(dim * ratio * 2 / 3)`).
    label_drop_prob: training probability of the null class.
    norm_eps: RMSNorm epsilon. attn_impl: `arvision.ops.attention` implementation.
  """

  side: int
  cells: int
  token_dim: int
  num_classes: int
  encoder_dim: int
  encoder_depth: int
  encoder_heads: int
  decoder_dim: int
  decoder_depth: int
  decoder_heads: int
  mlp_ratio: float = 4.0
  label_drop_prob: float = 0.1
  norm_eps: float = 1e-6
  attn_impl: str = "auto"

  @property
  def seq_len(self) -> int:
    return self.side * self.side

  @property
  def chunk(self) -> int:
    return self.seq_len // (self.cells * self.cells)

  def setup(self):
    setup_ar_body(self, self.seq_len, masks.chunk_causal(self.chunk))
    self.time_embed = TimestepEmbedder(self.encoder_dim)
    self.pred = _dense(self.token_dim, ("embed", "latent"), "pred")

  def _rope(self, heads: int, dim: int) -> np.ndarray:
    """Official `VisionRotaryEmbeddingFast` rows in cell order (the LlamaGen 2D layout)."""
    table = rope_2d_table(self.side, dim // heads, prefix=0)
    return table[cell_order(self.side, self.cells)]

  def condition(self, label_B, t_BxN, train: bool = False):
    """`class_emb(label) + time_embed(floor(1000 t))` per cell `[B, N, D]`; training drops
    labels to the null class with `label_drop_prob`."""
    label_B = label_B.astype(jnp.int32)
    if train and self.label_drop_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), label_B.shape) < self.label_drop_prob
      label_B = jnp.where(drop, self.num_classes, label_B)
    B, N = t_BxN.shape
    steps = jnp.floor(t_BxN.astype(jnp.float32) * 1000.0).reshape(B * N)
    temb = self.time_embed(steps).reshape(B, N, -1)
    return self.class_emb(label_B)[:, None, :] + temb

  def forward_cells(self, x_BxQxC, cond_BxNqxD, first: int = 0, caches=None):
    """The network on cells `first ..` (`Q` tokens) given `cond [B, Q / chunk, D]`: the velocity
    `[B, Q, C]` in xAR's convention (`eps - x`) and the updated caches (encoder blocks then
    decoder blocks; None without a cache: then `first = 0` and Q = L)."""
    Q = x_BxQxC.shape[1]
    sl = slice(first * self.chunk, first * self.chunk + Q)
    D, Dd = self.encoder_dim, self.decoder_dim
    ne = self.encoder_depth
    enc_c = None if caches is None else caches[:ne]
    dec_c = None if caches is None else caches[ne:]
    x = self.z_proj(x_BxQxC.astype(jnp.float32)) + self.encoder_pos_embed_learned[:, sl]
    x = constrain(self.z_proj_ln(x), _BLE)
    rope = jnp.asarray(self._rope(self.encoder_heads, D)[sl])
    x, enc_c = run_blocks(self.encoder_blocks, x, cond_BxNqxD, rope, enc_c, sl.start)
    x = self.decoder_embed(self.encoder_norm(x)) + self.decoder_pos_embed_learned[:, sl]
    rope = jnp.asarray(self._rope(self.decoder_heads, Dd)[sl])
    x, dec_c = run_blocks(
      self.decoder_blocks, precision.cast(x), cond_BxNqxD, rope, dec_c, sl.start
    )
    v = self.pred(self.decoder_norm(x)).astype(jnp.float32)
    return v, (None if caches is None else enc_c + dec_c)

  def __call__(self, x_BxLxC, t_BxN, label_B, train: bool = False):
    """Velocity `eps - x` `[B, L, C]` for cell-ordered noisy tokens at per-cell times `t`."""
    return self.forward_cells(x_BxLxC, self.condition(label_B, t_BxN, train))[0]


# ------------------------------------------------------------------------------------------------
# Family


class XARFamily(Generator):
  """xAR as a Family on a frozen KL tokenizer (`encode_latent` / `decode_latent`)."""

  name = "xar"
  tokenizer_methods = ("encode_latent", "decode_latent")
  sampler_static = ("steps_per_cell", "guided")

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if getattr(tokenizer, "type", "kl") != "kl":
      raise ValueError(
        f"the xar family needs a KL tokenizer (model.type='kl'), got {tokenizer.type!r}"
      )
    m = config.model
    self.side = int(tokenizer.latent_size)
    self.cells = int(m.get("cells", 2))
    cell_order(self.side, self.cells)  # checks that the cells divide the grid
    self.num_cells = self.cells**2
    self.seq_len = self.side**2
    self.chunk = self.seq_len // self.num_cells
    self.token_dim = int(tokenizer.embed_dim)
    for which in ("encoder", "decoder"):
      dim, heads = int(m[f"{which}_embed_dim"]), int(m[f"{which}_num_heads"])
      if dim % heads or (dim // heads) % 4:
        raise ValueError(
          f"model.{which}_embed_dim={dim} / {which}_num_heads={heads} must give a head dim "
          "divisible by 4 (2D RoPE)"
        )
    self.flow = FlowMatching("logit_normal")
    self.module = XAR(
      side=self.side,
      cells=self.cells,
      token_dim=self.token_dim,
      num_classes=self.num_classes,
      encoder_dim=int(m.encoder_embed_dim),
      encoder_depth=int(m.encoder_depth),
      encoder_heads=int(m.encoder_num_heads),
      decoder_dim=int(m.decoder_embed_dim),
      decoder_depth=int(m.decoder_depth),
      decoder_heads=int(m.decoder_num_heads),
      mlp_ratio=float(m.get("mlp_ratio", 4.0)),
      label_drop_prob=float(m.get("label_drop_prob", 0.1)),
      norm_eps=float(m.get("norm_eps", 1e-6)),
      attn_impl=str(m.get("attn_impl", "auto")),
    )

  def init_inputs(self) -> tuple:
    x = jnp.zeros((1, self.seq_len, self.token_dim), jnp.float32)
    return x, jnp.zeros((1, self.num_cells), jnp.float32), jnp.zeros((1,), jnp.int32)

  def init_rngs(self, rng: jax.Array) -> dict:
    k_p, k_d = jax.random.split(rng)
    return {"params": k_p, "dropout": k_d}

  # --- training ----------------------------------------------------------------------------------

  def tokens(self, params, batch, rng=None) -> jax.Array:
    """Cell-ordered latent tokens `[B, L, C]` from `batch["tokens"]` (raster `[B, L, C]`, as
    MAR's) or the tokenizer's scaled posterior sample."""
    tok = self.batch_tokens(batch, (self.seq_len, self.token_dim), integer=False, what="latents")
    if tok is None:
      tok = self.tokenizer.encode_latent(params["tokenizer"], batch["image"], rng=rng)
    z = jnp.asarray(tok, jnp.float32).reshape(-1, self.side, self.side, self.token_dim)
    return jax.lax.stop_gradient(clusterify(z, self.cells))

  def velocity_fn(self, params, label_B, train: bool = False, rng=None):
    """`model_fn(x_t, t)` in the flow convention over cells: `x_t [B N, chunk, C]`, `t [B N]`
    (noise 0 -> data 1) -> the flow velocity `-(eps - x)`."""
    B, N = label_B.shape[0], self.num_cells

    def model_fn(x_t, t):
      v = self.apply_module(
        params,
        x_t.reshape(B, -1, self.token_dim),
        (1.0 - t).reshape(B, N),
        label_B,
        rng=rng,
        train=train,
      )
      return -v.reshape(x_t.shape)

    return model_fn

  def loss(self, params, batch, rng, train: bool):
    """Noisy Context Learning: flow matching with an independent logit-normal t per cell."""
    k_post, k_drop, k_flow = jax.random.split(rng, 3)
    tokens = self.tokens(params, batch, rng=k_post)
    B = tokens.shape[0]
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    cells = tokens.reshape(B * self.num_cells, self.chunk, self.token_dim)
    model_fn = self.velocity_fn(params, label, train=train, rng=k_drop)
    loss = jnp.mean(self.flow.loss(model_fn, cells, k_flow))
    return loss, {"loss": loss, "latent_std": jnp.std(tokens)}

  # --- sampling ----------------------------------------------------------------------------------

  def cell_noise(self, rng, cell: int, batch: int):
    """`(initial noise [B, chunk, C], step rng)` of cell `cell` (the parity harness replays
    them into the official sampler)."""
    k_init, k_steps = jax.random.split(jax.random.fold_in(rng, cell))
    shape = (batch, self.chunk, self.token_dim)
    return jax.random.normal(k_init, shape, jnp.float32), k_steps

  def _sample_impl(self, params, labels, rng, cfg, *, steps_per_cell: tuple, guided: bool):
    mod, var = self.module, self._vars(params)
    B, N = labels.shape[0], self.num_cells
    lab = self.labels_2B(labels) if guided else labels.astype(jnp.int32)
    rows = lab.shape[0]
    ne, nd = mod.encoder_depth, mod.decoder_depth
    caches = init_kv_caches(
      ne,
      rows,
      self.seq_len,
      mod.encoder_heads,
      mod.encoder_dim // mod.encoder_heads,
      precision.current_dtype(),
    ) + init_kv_caches(
      nd,
      rows,
      self.seq_len,
      mod.decoder_heads,
      mod.decoder_dim // mod.decoder_heads,
      precision.current_dtype(),
    )
    zero_t = jnp.zeros((rows, 1), jnp.float32)
    cells = []
    for s in range(N):
      if s > 0:  # the previous cell, clean (t = 0), joins the cache
        prev = cells[-1]
        prev = jnp.concatenate([prev, prev]) if guided else prev
        cond = mod.apply(var, lab, zero_t, method=XAR.condition)
        _, caches = mod.apply(var, prev, cond, s - 1, caches, method=XAR.forward_cells)
      scale = cell_cfg(cfg, s, N)

      def model_fn(x, t, s=s, scale=scale, caches=caches):
        xin = jnp.concatenate([x, x]) if guided else x
        cond = mod.apply(var, lab, jnp.broadcast_to(t[:1, None], (rows, 1)), method=XAR.condition)
        v, _ = mod.apply(var, xin, cond, s, caches, method=XAR.forward_cells)
        if guided:
          v = guidance.guide(v[:B], v[B:], scale, active=scale > 1.0)
        return -v  # flow convention

      noise, k_steps = self.cell_noise(rng, s, B)
      times, model_times = em_grid(steps_per_cell[s])
      cells.append(
        self.flow.sample_on_grid(
          model_fn, noise, times, rng=k_steps, diffusion_scale=1.0, model_times=model_times
        )
      )
    tokens = jnp.concatenate(cells, axis=1)
    latent = unclusterify(tokens, self.cells)
    return self.decode_images(params, latent, "decode_latent"), tokens

  def sample_tokens(
    self, params, labels, rng, *, num_steps=50, cfg=1.0, disa=False, disa_min_steps=15
  ):
    """Samples images and returns their cell-ordered latent tokens.

    Args:
      params: xAR params plus `params["tokenizer"]`.
      labels: int `[B]` class labels (`num_classes` = unconditional).
      rng: a jax PRNG key; the result is a deterministic function of it.
      num_steps: Euler-Maruyama steps per cell (static, >= 2).
      cfg: guidance scale at the last cell (ramped linearly from 1 at the first cell); 1.0 runs
        the conditional model alone (traced otherwise: no recompilation per value).
      disa: anneal the steps linearly from `num_steps` (first cell) to `disa_min_steps` (last).

    Returns:
      `(images uint8 [B, H, W, C], tokens float32 [B, L, C] in cell order)`.
    """
    labels = self.check_labels(labels)
    steps = int(num_steps)
    if steps < 2:
      raise ValueError(f"num_steps={steps} must be >= 2 (xAR's Euler-Maruyama grid)")
    if disa:
      lower = int(disa_min_steps)
      if not 2 <= lower <= steps:
        raise ValueError(f"disa_min_steps={lower} must be in [2, num_steps={steps}]")
      per_cell = tuple(int(s) for s in disa_steps(self.num_cells, steps, lower))
    else:
      per_cell = (steps,) * self.num_cells
    guided = bool(float(cfg) != 1.0)
    return self._sample_jit(
      params, labels, rng, jnp.float32(cfg), steps_per_cell=per_cell, guided=guided
    )


def official_param_count(
  depth: int, width: int, seq_len: int = 256, token_dim: int = 16, num_classes: int = 1000
) -> int:
  """`sum(p.numel() for p in xAR(...).parameters())` from the architecture (encoder = decoder)."""
  D = width
  hidden = int(D * 4 * 2 / 3.0)
  block = (3 * D * D + 3 * D) + (D * D + D) + 2 * (D * hidden + hidden) + (hidden * D + D)
  block += 6 * D * D + 6 * D
  return (
    (num_classes + 1) * D
    + (256 * D + D + D * D + D)  # time_embed
    + (token_dim * D + D)
    + D  # z_proj_ln
    + 2 * seq_len * D
    + 2 * depth * block
    + D  # encoder_norm
    + (D * D + D)  # decoder_embed
    + D  # decoder_norm
    + (D * token_dim + token_dim)
  )


build = XARFamily.build
