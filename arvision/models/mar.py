"""MAR: autoregressive image generation without vector quantization (Li et al., 2024).

A port of the official `models/mar.py` (LTH14/mar): an MAE-style encoder/decoder over continuous
KL-VAE latent tokens in a random order, each masked token's distribution modelled by a small
diffusion MLP (`arvision.models.heads.DiffusionHead`, the official `DiffLoss`).

Static shapes. The official encoder gathers the unmasked tokens (`x[(1 - mask).nonzero()]`), whose
number is data dependent (a random mask rate per batch in training; the step in sampling). Here the
kept tokens (buffer first, then unmasked ones in position order, as the official gather) are moved
to the front of a fixed-capacity sequence, the rest is padding that no query attends to (the
`ops.masks.key_length` spec, through `ops.attention` like every model), and the decoder scatters
the outputs back. The capacity is `buffer + L - floor(L * mask_ratio_min)` in training and
`buffer + L` in sampling; padding changes
no output (tests/test_mar.py checks this and that masked tokens get no gradient via the encoder).

Sampling runs the official `sample_tokens` schedule inside one jitted function: the per-step mask
lengths depend only on `(L, num_iter)`, so they are precomputed in numpy and the steps run in a
`lax.scan` whose diffusion head sees a fixed number of token slots per step (the largest count of
its segment; empty slots are ignored). DiSA (`disa=True`) anneals the diffusion steps linearly from
`num_diffusion_steps` at the first AR step to `disa_min_steps` at the last (rounded); AR steps with
the same count share one scan, so a run compiles one scan per distinct count.

Parameter names (flax) -> official keys: `class_emb` (`embedding` = weight), `fake_latent`, `z_proj`,
`z_proj_ln`, `encoder_pos_embed_learned`, `encoder_blocks_{i}/{norm1, attn/{qkv, proj}, norm2,
mlp/{fc1, fc2}}`, `encoder_norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed_learned`,
`decoder_blocks_{i}/...`, `decoder_norm`, `diffusion_pos_embed_learned`, `diffloss/net/...`
(see `heads.py`). Dense kernels are the transposed torch weights; LayerNorm weight = `scale`.

Not reproduced: attention-probability dropout (official 0.1; `arvision.ops.attention` has no
dropout), so `attn_dropout` must be 0; projection/MLP dropout (`proj_dropout`) is applied.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import precision
from arvision.models import scan_layers
from arvision.models.common import Dense, param_count  # noqa: F401
from arvision.models.generator import Generator
from arvision.models.heads import DiffusionHead
from arvision.models.layers import gelu_erf
from arvision.ops import masks
from arvision.ops.attention import attention
from arvision.parallel.logical import constrain, param_init
from arvision.sampling import guidance

_BLE = ("batch", "seq", "embed")


def _dense(features: int, names: tuple, name: str, use_bias: bool = True) -> Dense:
  """torch Linear with the official MAR init: xavier-uniform weight, zero bias."""
  return Dense(
    features,
    use_bias=use_bias,
    kernel_init=param_init(nn.initializers.xavier_uniform(), names),
    bias_init=param_init(nn.initializers.zeros, (names[-1],)),
    name=name,
    dtype=precision.current_dtype(),
  )


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Flax computes the statistics in float32 whatever `dtype` (the output's) is.
  return nn.LayerNorm(
    epsilon=eps,
    scale_init=param_init(nn.initializers.ones, ("norm",)),
    bias_init=param_init(nn.initializers.zeros, ("norm",)),
    name=name,
    dtype=precision.current_dtype(),
  )


# ------------------------------------------------------------------------------------------------
# Schedules (numpy, static)


def mask_schedule(seq_len: int, num_iter: int) -> dict[str, np.ndarray]:
  """The official `sample_tokens` mask lengths, as static per-step arrays.

  Step k starts with the first `masked[k]` positions of the random order masked, predicts order
  positions `[after[k], masked[k])` and leaves `after[k]` masked. `mask_len[k]` is the clipped
  official `mask_len` (what the linear CFG schedule reads), also at the last step.

  Returns:
    dict of int arrays `[num_iter]`: `masked`, `after`, `count` (= masked - after), `mask_len`.
  """
  if num_iter < 1:
    raise ValueError(f"num_iter={num_iter} must be a positive int")
  masked, after, mask_len = [], [], []
  m = seq_len
  for step in range(num_iter):
    ml = math.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
    ml = max(1, min(m - 1, ml))
    nxt = 0 if step >= num_iter - 1 else ml
    masked.append(m)
    after.append(nxt)
    mask_len.append(ml)
    m = nxt
  masked, after = np.asarray(masked, np.int32), np.asarray(after, np.int32)
  return dict(masked=masked, after=after, count=masked - after, mask_len=np.asarray(mask_len))


def disa_steps(num_iter: int, upper: int, lower: int) -> np.ndarray:
  """DiSA's linear annealing: diffusion steps per AR step, `upper` first, `lower` last."""
  if num_iter == 1:
    return np.asarray([upper], np.int32)
  frac = np.arange(num_iter) / (num_iter - 1)
  return np.round(upper - (upper - lower) * frac).astype(np.int32)


def truncnorm_mask_rate(rng: jax.Array, mask_ratio_min: float) -> jax.Array:
  """scipy `truncnorm((min - 1) / 0.25, 0, loc=1, scale=0.25)`: one rate in [min, 1]."""
  lower = (mask_ratio_min - 1.0) / 0.25
  return 1.0 + 0.25 * jax.random.truncated_normal(rng, lower, 0.0, (), jnp.float32)


# ------------------------------------------------------------------------------------------------
# Modules


class Attention(nn.Module):
  """timm `Attention` (fused qkv with bias, proj); optional key padding `kv_len [B]`."""

  num_heads: int
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxC: jax.Array, kv_len: jax.Array | None = None) -> jax.Array:
    B, L, C = x_BxLxC.shape
    H = self.num_heads
    hd = C // H
    qkv = _dense(3 * C, ("embed", "heads"), "qkv")(x_BxLxC).reshape(B, L, 3, H, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Keys past `kv_len` (the encoder's padding after the kept tokens) are hidden per example.
    mask = masks.full() if kv_len is None else masks.key_length(kv_len)
    out = attention(q, k, v, mask=mask, impl=self.attn_impl)
    return _dense(C, ("heads", "embed"), "proj")(out.reshape(B, L, C))


class Mlp(nn.Module):
  """timm `Mlp`: fc1, exact GELU, dropout, fc2, dropout."""

  hidden: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    drop = nn.Dropout(self.dropout, deterministic=deterministic)
    h = drop(gelu_erf(_dense(self.hidden, ("embed", "mlp"), "fc1")(x)))
    return drop(_dense(x.shape[-1], ("mlp", "embed"), "fc2")(h))


class Block(nn.Module):
  """timm `Block`: pre-LN attention and GELU MLP (ratio 4), projection dropout."""

  num_heads: int
  mlp_ratio: float = 4.0
  proj_dropout: float = 0.0
  norm_eps: float = 1e-6
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x, kv_len=None, deterministic: bool = True):
    C = x.shape[-1]
    drop = nn.Dropout(self.proj_dropout, deterministic=deterministic)
    h = Attention(self.num_heads, self.attn_impl, name="attn")(
      _layer_norm(self.norm_eps, "norm1")(x), kv_len
    )
    x = x + drop(h)
    h = Mlp(int(C * self.mlp_ratio), self.proj_dropout, name="mlp")(
      _layer_norm(self.norm_eps, "norm2")(x), deterministic
    )
    return constrain(x + h, _BLE)


class MAR(nn.Module):
  """The MAR encoder/decoder plus its diffusion head (official `MAR`), pure linen.

  Attributes:
    seq_len: L, latent tokens (`(latent side / patch_size)^2`).
    token_dim: C of a token (`vae_embed_dim * patch_size^2`).
    num_classes: classes; label `num_classes` (or a dropped label) uses `fake_latent`.
    encoder_dim, encoder_depth, encoder_heads, decoder_dim, decoder_depth, decoder_heads: sizes.
    mlp_ratio: block MLP ratio.
    buffer_size: class-embedding prefix slots.
    label_drop_prob: training probability of the null class (CFG).
    proj_dropout: block projection / MLP dropout.
    diffloss_d, diffloss_w: diffusion MLP blocks and width.
    num_sampling_steps: default diffusion steps at sampling.
    norm_eps: LayerNorm epsilon.
    attn_impl: implementation for `arvision.ops.attention`.
    scan_layers: each block stack as one `nn.scan` over params `encoder_blocks` /
      `decoder_blocks` stacked along a leading layer axis (`models.scan_layers`) instead of
      `encoder_blocks_{i}` / `decoder_blocks_{i}`.
  """

  seq_len: int
  token_dim: int
  num_classes: int
  encoder_dim: int
  encoder_depth: int
  encoder_heads: int
  decoder_dim: int
  decoder_depth: int
  decoder_heads: int
  mlp_ratio: float = 4.0
  buffer_size: int = 64
  label_drop_prob: float = 0.1
  proj_dropout: float = 0.1
  diffloss_d: int = 3
  diffloss_w: int = 1024
  num_sampling_steps: int = 100
  norm_eps: float = 1e-6
  attn_impl: str = "auto"
  scan_layers: bool = False

  def setup(self):
    D, Dd, L, P = self.encoder_dim, self.decoder_dim, self.seq_len, self.buffer_size
    normal = nn.initializers.normal(0.02)
    self.class_emb = nn.Embed(
      self.num_classes,
      D,
      embedding_init=param_init(normal, ("classes", "embed")),
      dtype=precision.current_dtype(),
    )
    self.fake_latent = self.param("fake_latent", param_init(normal, (None, "embed")), (1, D))
    self.z_proj = _dense(D, ("latent", "embed"), "z_proj")
    self.z_proj_ln = _layer_norm(self.norm_eps, "z_proj_ln")
    pos = (None, "seq", "embed")
    self.encoder_pos_embed_learned = self.param(
      "encoder_pos_embed_learned", param_init(normal, pos), (1, L + P, D)
    )
    blk = dict(
      mlp_ratio=self.mlp_ratio,
      proj_dropout=self.proj_dropout,
      norm_eps=self.norm_eps,
      attn_impl=self.attn_impl,
    )
    if self.scan_layers:  # one block per stack whose params stack all its layers
      self.encoder_blocks = Block(self.encoder_heads, **blk, name="encoder_blocks")
    else:
      self.encoder_blocks = [
        Block(self.encoder_heads, **blk, name=f"encoder_blocks_{i}")
        for i in range(self.encoder_depth)
      ]
    self.encoder_norm = _layer_norm(self.norm_eps, "encoder_norm")
    self.decoder_embed = _dense(Dd, (None, "embed"), "decoder_embed")
    self.mask_token = self.param(
      "mask_token", param_init(normal, (None, None, "embed")), (1, 1, Dd)
    )
    self.decoder_pos_embed_learned = self.param(
      "decoder_pos_embed_learned", param_init(normal, pos), (1, L + P, Dd)
    )
    if self.scan_layers:
      self.decoder_blocks = Block(self.decoder_heads, **blk, name="decoder_blocks")
    else:
      self.decoder_blocks = [
        Block(self.decoder_heads, **blk, name=f"decoder_blocks_{i}")
        for i in range(self.decoder_depth)
      ]
    self.decoder_norm = _layer_norm(self.norm_eps, "decoder_norm")
    self.diffusion_pos_embed_learned = self.param(
      "diffusion_pos_embed_learned", param_init(normal, pos), (1, L, Dd)
    )
    self.diffloss = DiffusionHead(
      token_dim=self.token_dim,
      z_dim=Dd,
      width=self.diffloss_w,
      depth=self.diffloss_d,
      num_sampling_steps=self.num_sampling_steps,
    )

  def class_embedding(self, label_B: jax.Array, train: bool = False) -> jax.Array:
    """`class_emb(label)`, `fake_latent` for the null class and (training) dropped labels."""
    label_B = label_B.astype(jnp.int32)
    null = label_B >= self.num_classes
    if train and self.label_drop_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), label_B.shape) < self.label_drop_prob
      null = null | drop
    emb = self.class_emb(jnp.clip(label_B, 0, self.num_classes - 1))
    return jnp.where(null[:, None], self.fake_latent.astype(emb.dtype), emb)

  def encode(self, tokens_BxLxC, mask_BxL, cemb_BxD, capacity: int, train: bool = False):
    """MAE encoder over the buffer and the unmasked tokens.

    Returns:
      `(x [B, capacity, D], idx [B, capacity], n_keep [B])`: encoder outputs of the kept
      positions (buffer + unmasked, in position order) followed by padding; `idx` are their
      positions in the `[buffer + L]` sequence (padding rows point at masked positions).
    """
    B, P = tokens_BxLxC.shape[0], self.buffer_size
    x = self.z_proj(tokens_BxLxC.astype(jnp.float32))
    buf = jnp.broadcast_to(cemb_BxD[:, None, :], (B, P, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([buf, x], axis=1) + self.encoder_pos_embed_learned
    x = self.z_proj_ln(x)
    masked = jnp.concatenate([jnp.zeros((B, P), bool), mask_BxL.astype(bool)], axis=1)
    # Stable sort: kept positions first in position order (the official nonzero() order).
    idx = jnp.argsort(masked.astype(jnp.int32), axis=1, stable=True)[:, :capacity]
    n_keep = jnp.sum(~masked, axis=1).astype(jnp.int32)
    x = constrain(jnp.take_along_axis(x, idx[:, :, None], axis=1), _BLE)
    x = self._blocks(self.encoder_blocks, self.encoder_depth, x, n_keep, train)
    return self.encoder_norm(x), idx, n_keep

  def decode(self, x_BxKxD, idx_BxK, n_keep_B, train: bool = False):
    """MAE decoder: mask tokens everywhere, encoder outputs scattered back; `[B, L, Dd]` z."""
    B, K = idx_BxK.shape
    x = self.decoder_embed(x_BxKxD)
    mask_tok = self.mask_token.astype(x.dtype)
    valid = (jnp.arange(K)[None, :] < n_keep_B[:, None])[:, :, None]
    x = jnp.where(valid, x, mask_tok)  # padding rows write a mask token where one already is
    full = jnp.broadcast_to(mask_tok, (B, self.seq_len + self.buffer_size, x.shape[-1]))
    full = full.at[jnp.arange(B)[:, None], idx_BxK].set(x)
    x = constrain(precision.cast(full + self.decoder_pos_embed_learned), _BLE)
    x = self._blocks(self.decoder_blocks, self.decoder_depth, x, None, train)
    x = self.decoder_norm(x)[:, self.buffer_size :]
    return x + self.diffusion_pos_embed_learned

  def _blocks(self, blocks, depth: int, x, kv_len, train: bool):
    """A block stack: unrolled, or one `nn.scan` (scan_layers; `kv_len` is closed over)."""
    if not self.scan_layers:
      for block in blocks:
        x = precision.block(block, x, kv_len, deterministic=not train)
      return x

    def layer(block, x, _):
      return block(x, kv_len, deterministic=not train), None

    return scan_layers.scan_blocks(blocks, depth, layer, x)[0]

  def cond(self, tokens_BxLxC, mask_BxL, cemb_BxD, capacity: int, train: bool = False):
    """Per-token diffusion condition z `[B, L, Dd]` (encoder then decoder)."""
    x, idx, n_keep = self.encode(tokens_BxLxC, mask_BxL, cemb_BxD, capacity, train)
    return self.decode(x, idx, n_keep, train)

  def __call__(
    self,
    tokens_BxLxC,
    mask_BxL,
    label_B,
    *,
    capacity: int | None = None,
    diffusion_batch_mul: int = 1,
    train: bool = False,
    target_BxLxC=None,
  ):
    """The diffusion loss over masked tokens (official `forward`); `target` defaults to tokens.

    Needs rng streams "diffusion" (always) and "dropout" (train).
    """
    B, L, C = tokens_BxLxC.shape
    capacity = self.seq_len + self.buffer_size if capacity is None else capacity
    cemb = self.class_embedding(label_B, train)
    z = self.cond(tokens_BxLxC, mask_BxL, cemb, capacity, train)
    target = tokens_BxLxC if target_BxLxC is None else target_BxLxC
    # torch `.repeat(mul, 1)`: the whole batch tiled `mul` times.
    target = jnp.tile(target.reshape(B * L, C), (diffusion_batch_mul, 1))
    z = jnp.tile(z.reshape(B * L, -1), (diffusion_batch_mul, 1))
    mask = jnp.tile(mask_BxL.reshape(B * L).astype(jnp.float32), (diffusion_batch_mul,))
    return self.diffloss(target.astype(jnp.float32), z, mask)

  def head_sample(
    self, z_NxD, temperature, cfg, rng, num_steps: int | None, guided: bool, clip_x0: float = 0.0
  ):
    """`diffloss.sample`; with `guided` the rows of z are `[cond; uncond]` halves."""
    return self.diffloss.sample(
      z_NxD, temperature, cfg, num_steps=num_steps, rng=rng, guided=guided, clip_x0=clip_x0
    )


# ------------------------------------------------------------------------------------------------
# Family


def patchify(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """NHWC latent -> `[B, (H/p)(W/p), C p p]` tokens, the official (c, p, q) feature order."""
  B, H, W, C = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x_BxLxD: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
  """Inverse of `patchify`: tokens -> NHWC latent `[B, h p, w p, c]`."""
  B = x_BxLxD.shape[0]
  x = x_BxLxD.reshape(B, h, w, c, p, p).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(B, h * p, w * p, c)


class MARFamily(Generator):
  """MAR as a Family on a frozen KL tokenizer (`params["tokenizer"]`, `encode_latent`)."""

  name = "mar"
  accepts_scan_layers = True  # set on the class itself: a subclass must opt in (`Generator`)
  tokenizer_methods = ("encode_latent", "decode_latent")
  sampler_static = ("num_iter", "guided", "cfg_schedule", "steps_per_iter", "clip_x0")

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if getattr(tokenizer, "type", "kl") != "kl":
      raise ValueError(
        f"the mar family needs a KL tokenizer (model.type='kl'), got {tokenizer.type!r}"
      )
    m = config.model
    self.patch_size = int(m.get("patch_size", 1))
    side = int(tokenizer.latent_size)
    if side % self.patch_size:
      raise ValueError(f"model.patch_size={self.patch_size} does not divide the latent side {side}")
    self.latent_side = side
    self.latent_channels = int(tokenizer.embed_dim)
    self.seq_side = side // self.patch_size
    self.seq_len = self.seq_side**2
    self.token_dim = self.latent_channels * self.patch_size**2
    self.buffer_size = int(m.get("buffer_size", 64))
    self.mask_ratio_min = float(m.get("mask_ratio_min", 0.7))
    if not 0.0 < self.mask_ratio_min <= 1.0:
      raise ValueError(f"model.mask_ratio_min={self.mask_ratio_min} must be in (0, 1]")
    self.diffusion_batch_mul = int(m.get("diffusion_batch_mul", 4))
    if float(m.get("attn_dropout", 0.0)) != 0.0:
      raise ValueError(
        f"model.attn_dropout={m.attn_dropout}: attention-probability dropout is not supported "
        "(arvision.ops.attention has none); set it to 0"
      )
    for which in ("encoder", "decoder"):
      dim, heads = int(m[f"{which}_embed_dim"]), int(m[f"{which}_num_heads"])
      if dim % heads:
        raise ValueError(
          f"model.{which}_embed_dim={dim} is not divisible by {which}_num_heads={heads}"
        )
    self.module = MAR(
      seq_len=self.seq_len,
      token_dim=self.token_dim,
      num_classes=self.num_classes,
      encoder_dim=int(m.encoder_embed_dim),
      encoder_depth=int(m.encoder_depth),
      encoder_heads=int(m.encoder_num_heads),
      decoder_dim=int(m.decoder_embed_dim),
      decoder_depth=int(m.decoder_depth),
      decoder_heads=int(m.decoder_num_heads),
      mlp_ratio=float(m.get("mlp_ratio", 4.0)),
      buffer_size=self.buffer_size,
      label_drop_prob=float(m.get("label_drop_prob", 0.1)),
      proj_dropout=float(m.get("proj_dropout", 0.1)),
      diffloss_d=int(m.diffloss_d),
      diffloss_w=int(m.diffloss_w),
      num_sampling_steps=int(m.get("num_sampling_steps", 100)),
      norm_eps=float(m.get("norm_eps", 1e-6)),
      attn_impl=str(m.get("attn_impl", "auto")),
      scan_layers=scan_layers.enabled(config),
    )
    # Kept tokens are at most buffer + L - ceil(L * r) with r >= mask_ratio_min.
    self.train_capacity = (
      self.buffer_size + self.seq_len - math.floor(self.seq_len * self.mask_ratio_min)
    )

  def init_inputs(self) -> tuple:
    tokens = jnp.zeros((1, self.seq_len, self.token_dim), jnp.float32)
    return tokens, jnp.ones((1, self.seq_len), jnp.float32), jnp.zeros((1,), jnp.int32)

  def init_rngs(self, rng: jax.Array) -> dict:
    k_p, k_d = jax.random.split(rng)
    return {"params": k_p, "diffusion": k_d, "dropout": k_d}

  # --- training ----------------------------------------------------------------------------------

  def tokens(self, params, batch, rng=None) -> jax.Array:
    """Latent tokens `[B, L, C]`: `batch["tokens"]` or the tokenizer's scaled posterior sample."""
    tok = self.batch_tokens(batch, (self.seq_len, self.token_dim), integer=False, what="latents")
    if tok is not None:
      return tok.astype(jnp.float32)
    z = self.tokenizer.encode_latent(params["tokenizer"], batch["image"], rng=rng)
    return jax.lax.stop_gradient(patchify(z.astype(jnp.float32), self.patch_size))

  def random_mask(self, rng, batch_size: int):
    """(mask [B, L] float, mask_rate): one truncated-normal rate per batch, random orders."""
    k_rate, k_order = jax.random.split(rng)
    L = self.seq_len
    rate = truncnorm_mask_rate(k_rate, self.mask_ratio_min)
    num_masked = jnp.ceil(L * rate).astype(jnp.int32)
    orders = jnp.argsort(jax.random.uniform(k_order, (batch_size, L)), axis=1)
    first = (jnp.arange(L)[None, :] < num_masked).astype(jnp.float32)
    mask = jnp.zeros((batch_size, L), jnp.float32)
    mask = mask.at[jnp.arange(batch_size)[:, None], orders].set(jnp.broadcast_to(first, mask.shape))
    return mask, rate

  def loss(self, params, batch, rng, train: bool):
    """The diffusion loss averaged over masked tokens (x `diffusion_batch_mul` noise draws)."""
    k_post, k_mask, k_drop, k_diff = jax.random.split(rng, 4)
    tokens = self.tokens(params, batch, rng=k_post)
    B = tokens.shape[0]
    mask, rate = self.random_mask(k_mask, B)
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    with self.computing():
      loss = self.module.apply(
        self._vars(params),
        tokens,
        mask,
        label,
        capacity=self.train_capacity,
        diffusion_batch_mul=self.diffusion_batch_mul,
        train=train,
        rngs={"dropout": k_drop, "diffusion": k_diff},
      )
    return loss, {"loss": loss, "mask_rate": rate, "latent_std": jnp.std(tokens)}

  # --- sampling ----------------------------------------------------------------------------------

  def _sample_impl(
    self,
    params,
    labels,
    rng,
    cfg,
    temperature,
    *,
    num_iter: int,
    guided: bool,
    cfg_schedule: str,
    steps_per_iter: tuple[int, ...],
    clip_x0: float = 0.0,
  ):
    mod, var = self.module, self._vars(params)
    B, L, C = labels.shape[0], self.seq_len, self.token_dim
    sched = mask_schedule(L, num_iter)
    k_order, k_steps = jax.random.split(rng)
    orders = jnp.argsort(jax.random.uniform(k_order, (B, L)), axis=1)
    # rank[b, pos] = place of `pos` in the order: pos is masked at a step iff rank < masked.
    rank = jnp.zeros((B, L), jnp.int32).at[jnp.arange(B)[:, None], orders].set(jnp.arange(L))
    lab = self.labels_2B(labels) if guided else labels.astype(jnp.int32)
    cemb = mod.apply(var, lab, method=MAR.class_embedding)
    step_keys = jax.random.split(k_steps, num_iter)
    if cfg_schedule == "linear":
      cfg_frac = guidance.mar_progress(sched["mask_len"], L)
    elif cfg_schedule == "constant":
      # progress held at 1: `linear_progress` gives 1 + (cfg - 1), the float value this sampler
      # has always used (`guidance.constant`'s cfg itself can differ in the last bit)
      cfg_frac = np.ones(num_iter)
    else:
      raise ValueError(f"cfg_schedule={cfg_schedule!r} is unknown; accepted: linear, constant")
    tokens = jnp.zeros((B, L, C), jnp.float32)
    rows = jnp.arange(B)[:, None]

    # One scan per run of AR steps with the same diffusion step count (one run without DiSA).
    start = 0
    while start < num_iter:
      end = start
      while end < num_iter and steps_per_iter[end] == steps_per_iter[start]:
        end += 1
      width = max(int(sched["count"][start:end].max()), 1)
      n_steps = int(steps_per_iter[start])
      orders_pad = jnp.concatenate([orders, orders[:, :width]], axis=1)

      def body(tokens, xs, width=width, n_steps=n_steps, orders_pad=orders_pad):
        masked, after, count, frac, key = xs
        mask = (rank < masked).astype(jnp.float32)
        tok_in, mask_in = tokens, mask
        if guided:
          tok_in, mask_in = jnp.concatenate([tokens] * 2), jnp.concatenate([mask] * 2)
        z = mod.apply(var, tok_in, mask_in, cemb, L + self.buffer_size, method=MAR.cond)
        sel = jax.lax.dynamic_slice_in_dim(orders_pad, after, width, axis=1)  # [B, width]
        valid = jnp.arange(width)[None, :] < count
        zsel = jnp.take_along_axis(z[:B], sel[:, :, None], axis=1).reshape(B * width, -1)
        if guided:
          zu = jnp.take_along_axis(z[B:], sel[:, :, None], axis=1).reshape(B * width, -1)
          zsel = jnp.concatenate([zsel, zu])
        step_cfg = guidance.linear_progress(cfg, frac) if guided else 1.0
        out = mod.apply(
          var,
          zsel,
          temperature,
          step_cfg,
          key,
          n_steps,
          guided,
          clip_x0,
          method=MAR.head_sample,
        )[: B * width].reshape(B, width, C)
        old = jnp.take_along_axis(tokens, sel[:, :, None], axis=1)
        new = jnp.where(valid[:, :, None], out.astype(tokens.dtype), old)
        return tokens.at[rows, sel].set(new), None

      xs = (
        jnp.asarray(sched["masked"][start:end]),
        jnp.asarray(sched["after"][start:end]),
        jnp.asarray(sched["count"][start:end]),
        jnp.asarray(cfg_frac[start:end], jnp.float32),
        step_keys[start:end],
      )
      tokens, _ = jax.lax.scan(body, tokens, xs)
      start = end

    latent = unpatchify(tokens, self.patch_size, self.seq_side, self.seq_side, self.latent_channels)
    return self.decode_images(params, latent, "decode_latent"), tokens

  def sample_tokens(
    self,
    params,
    labels,
    rng,
    *,
    num_iter=64,
    cfg=1.0,
    cfg_schedule="linear",
    temperature=1.0,
    num_diffusion_steps=None,
    disa=False,
    disa_min_steps=5,
    clip_x0=0.0,
  ):
    """Samples images and returns their latent tokens too.

    Args:
      params: MAR params plus `params["tokenizer"]`.
      labels: int `[B]` class labels (`num_classes` = unconditional).
      rng: a jax PRNG key; the result is a deterministic function of it.
      num_iter: AR steps (static: one compilation per value).
      cfg: guidance scale. 1.0 runs the conditional model alone (as the official code); any other
        value runs conditional and `fake_latent` halves (traced: no recompilation per value).
      cfg_schedule: "linear" (cfg_k = 1 + (cfg - 1) (L - mask_len_k) / L) or "constant".
      temperature: diffusion sampling temperature (traced).
      num_diffusion_steps: respaced diffusion steps (None: `model.num_sampling_steps`).
      disa: anneal diffusion steps linearly from `num_diffusion_steps` (first AR step) to
        `disa_min_steps` (last AR step).
      clip_x0: > 0 clips the diffusion head's predicted x_0 to [-clip_x0, clip_x0] at every step
        (static; 0 = off, the official behaviour). See `DiffusionHead.sample`.

    Returns:
      `(images uint8 [B, H, W, C], tokens float32 [B, L, token_dim])`.
    """
    labels = self.check_labels(labels)
    num_iter = int(num_iter)
    if num_iter < 1:
      raise ValueError(f"num_iter={num_iter} must be a positive int")
    steps = int(num_diffusion_steps or self.module.num_sampling_steps)
    if disa:
      lower = int(disa_min_steps)
      if not 1 <= lower <= steps:
        raise ValueError(f"disa_min_steps={lower} must be in [1, num_diffusion_steps={steps}]")
      per_iter = tuple(int(s) for s in disa_steps(num_iter, steps, lower))
    else:
      per_iter = (steps,) * num_iter
    guided = bool(float(cfg) != 1.0)
    return self._sample_jit(
      params,
      labels,
      rng,
      jnp.float32(cfg),
      jnp.float32(temperature),
      num_iter=num_iter,
      guided=guided,
      cfg_schedule=str(cfg_schedule),
      steps_per_iter=per_iter,
      clip_x0=float(clip_x0),
    )


def official_param_count(
  depth: int,
  width: int,
  diffloss_d: int,
  diffloss_w: int,
  seq_len: int = 256,
  token_dim: int = 16,
  buffer_size: int = 64,
  num_classes: int = 1000,
) -> int:
  """`sum(p.numel() for p in MAR(...).parameters())` from the architecture formula (enc = dec)."""
  D, Wd = width, diffloss_w
  block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
  mar = (
    num_classes * D
    + D
    + (token_dim * D + D)
    + 2 * D
    + 2 * (seq_len + buffer_size) * D
    + 2 * depth * block
    + 2 * 2 * D
    + (D * D + D)
    + D
    + seq_len * D
  )
  res = 2 * Wd + 2 * (Wd * Wd + Wd) + (Wd * 3 * Wd + 3 * Wd)
  head = (
    (256 * Wd + Wd + Wd * Wd + Wd)  # time_embed
    + (D * Wd + Wd)  # cond_embed
    + (token_dim * Wd + Wd)  # input_proj
    + diffloss_d * res
    + (Wd * 2 * Wd + 2 * Wd)  # final adaLN
    + (Wd * 2 * token_dim + 2 * token_dim)  # final linear
  )
  return mar + head


build = MARFamily.build
