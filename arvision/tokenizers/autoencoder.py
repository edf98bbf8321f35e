"""LDM/VQGAN-style convolutional encoder and decoder (Flax linen, NHWC), and the tokenizer model.

One implementation covers the three official tokenizers:

- VAR `VQVAE` (`models/basic_vae.py`): fused `qkv` attention, `using_sa` rule (attention only at the
  last encoder level and the first decoder level, plus mid attention), 3x3 `quant_conv`s.
- LlamaGen `VQModel`: same placement, separate `q`/`k`/`v` convs, 1x1 quant convs, z 256 -> 8.
- MAR `AutoencoderKL` (LDM): attention where the feature map's side is in `attn_resolutions`
  (encoder (16,), decoder ()), separate q/k/v, `double_z`, 1x1 quant convs.

Parameter names and the PyTorch state_dict: the names mirror the LDM/VAR module tree so that a
converter maps keys mechanically:

1. split the torch key on ".", and fuse every `<name>.<int>` pair into `<name>_<int>`
   (`down.0.block.1.conv1.weight` -> `down_0/block_1/conv1/weight`); `mid.block_1`, `mid.attn_1`,
   `conv_in`, `norm_out`, `conv_out`, `quant_conv`, `post_quant_conv` keep their names;
2. the leaf: conv `weight` OIHW -> `kernel` HWIO (`w.transpose(2, 3, 1, 0)`), conv `bias` -> `bias`;
   GroupNorm `weight` -> `scale`, `bias` -> `bias`;
3. the quantizer: `quantize.embedding.weight` [V, C] -> `quantize/embedding` [V, C] (no transpose);
   VAR's phi convs `quantize.quant_resi.qresi_ls.<k>` (share_quant_resi=K),
   `quantize.quant_resi.<k>` (0: non-shared) and `quantize.quant_resi.qresi` (1: shared) ->
   `quantize/quant_resi_<k>` (k = 0 when shared). The buffer `quantize.ema_vocab_hit_SV` is
   training statistics and is dropped.

So `encoder.down.0.block.1.conv1.weight` <-> `encoder/down_0/block_1/conv1/kernel`,
`decoder.up.4.attn.2.qkv.weight` <-> `decoder/up_4/attn_2/qkv/kernel`,
`decoder.up.1.upsample.conv.bias` <-> `decoder/up_1/upsample/conv/bias`. As in LDM, `up_<i>` is
indexed by resolution level (0 = full resolution), not by execution order.

LlamaGen names its modules differently (`conv_blocks.<i>.res.<j>`, `mid.<0|1|2>`), so its converter
renames first: encoder `conv_blocks.<i>` -> `down_<i>`, decoder `conv_blocks.<k>` ->
`up_<L-1-k>` (L = len(ch_mult)), `res` -> `block`, `mid.0/1/2` -> `mid/block_1`, `mid/attn_1`,
`mid/block_2`; then the rule above.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arvision.parallel.logical import param_init
from arvision.precision import current_dtype

# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Logical axes of every conv kernel (HWIO) and bias.
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def num_groups(channels: int) -> int:
  """GroupNorm groups: 32 as in LDM, or `channels` for small configs with fewer than 32 channels."""
  g = min(32, channels)
  if channels % g:
    raise ValueError(
      f"GroupNorm: channels={channels} is not divisible by {g} groups; use a multiple of 32 "
      "(or fewer than 32 channels)"
    )
  return g


def Normalize(channels: int, name: str | None = None) -> nn.GroupNorm:  # noqa: N802 (LDM name)
  return nn.GroupNorm(
    num_groups=num_groups(channels),
    epsilon=1e-6,
    scale_init=param_init(nn.initializers.ones, ("norm",)),
    bias_init=param_init(nn.initializers.zeros, ("norm",)),
    name=name,
    dtype=current_dtype(),  # statistics in float32 whatever the compute dtype (Flax)
  )


def Conv(features: int, kernel: int, stride: int = 1, name: str | None = None, pad: bool = True):  # noqa: N802
  """A torch-style conv: explicit symmetric padding k//2 (or none), bias, torch default init."""
  p = kernel // 2 if pad else 0
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((p, p), (p, p)),
    kernel_init=param_init(torch_conv_init, CONV_AXES),
    bias_init=param_init(nn.initializers.zeros, ("conv_out",)),
    name=name,
    dtype=current_dtype(),
  )


class ResnetBlock(nn.Module):
  """norm1-SiLU-conv1-norm2-SiLU-dropout-conv2 plus a shortcut (1x1 `nin_shortcut` iff in != out)."""

  out_channels: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    c_in = x_BxHxWxC.shape[-1]
    h = Conv(self.out_channels, 3, name="conv1")(nn.silu(Normalize(c_in, "norm1")(x_BxHxWxC)))
    h = nn.silu(Normalize(self.out_channels, "norm2")(h))
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv(self.out_channels, 3, name="conv2")(h)
    if c_in != self.out_channels:
      x_BxHxWxC = Conv(self.out_channels, 1, name="nin_shortcut")(x_BxHxWxC)
    return x_BxHxWxC + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual; scale C^-0.5.

  `fused_qkv=True` is VAR's one 1x1 conv C->3C (output channels ordered q, k, v); otherwise
  separate `q`, `k`, `v` 1x1 convs (LDM, LlamaGen, MAR).
  """

  fused_qkv: bool = False

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    b, hh, ww, c = x_BxHxWxC.shape
    h = Normalize(c, "norm")(x_BxHxWxC)
    if self.fused_qkv:
      qkv = Conv(3 * c, 1, name="qkv")(h)
      q, k, v = jnp.split(qkv, 3, axis=-1)  # torch: reshape(B, 3, C, H, W).unbind(1)
    else:
      q, k, v = (Conv(c, 1, name=n)(h) for n in ("q", "k", "v"))
    q, k, v = (t.reshape(b, hh * ww, c) for t in (q, k, v))
    w_BxLxL = jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)
    w_BxLxL = jax.nn.softmax(w_BxLxL.astype(jnp.float32), axis=-1).astype(v.dtype)
    o = jnp.einsum("bij,bjc->bic", w_BxLxL, v).reshape(b, hh, ww, c)
    return x_BxHxWxC + Conv(c, 1, name="proj_out")(o)


class Downsample(nn.Module):
  """Pad (0, 1, 0, 1) (right and bottom), then a stride-2 3x3 VALID conv."""

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x = jnp.pad(x_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(x.shape[-1], 3, stride=2, pad=False, name="conv")(x)


class Upsample(nn.Module):
  """Nearest x2, then a 3x3 conv."""

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    return Conv(x.shape[-1], 3, name="conv")(x)


def _attn_here(level: int, num_levels: int, side: int, using_sa: bool, attn_resolutions) -> bool:
  """VAR's rule (last encoder level / first decoder level) or LDM's `curr_res in attn_resolutions`."""
  if using_sa and level == num_levels - 1:
    return True
  return side in tuple(attn_resolutions)


class _Level(nn.Module):
  """One resolution level: `block_<j>` (+ `attn_<j>` after each block) and an optional resampler."""

  out_channels: int
  num_blocks: int
  attn: bool
  fused_qkv: bool
  dropout: float
  resample: str  # "down" | "up" | "none"

  @nn.compact
  def __call__(self, h: jax.Array, train: bool) -> jax.Array:
    for j in range(self.num_blocks):
      h = ResnetBlock(self.out_channels, self.dropout, name=f"block_{j}")(h, train)
      if self.attn:
        h = AttnBlock(self.fused_qkv, name=f"attn_{j}")(h)
    if self.resample == "down":
      h = Downsample(name="downsample")(h)
    elif self.resample == "up":
      h = Upsample(name="upsample")(h)
    return h


class _Mid(nn.Module):
  dropout: float
  attn: bool
  fused_qkv: bool

  @nn.compact
  def __call__(self, h: jax.Array, train: bool) -> jax.Array:
    c = h.shape[-1]
    h = ResnetBlock(c, self.dropout, name="block_1")(h, train)
    if self.attn:
      h = AttnBlock(self.fused_qkv, name="attn_1")(h)
    return ResnetBlock(c, self.dropout, name="block_2")(h, train)


class Encoder(nn.Module):
  """Image [B, H, W, in] -> features [B, H/2^(L-1), W/2^(L-1), z_channels * (2 if double_z)].

  Attributes:
    ch: base width; level i has ch * ch_mult[i] channels.
    ch_mult: per-level multipliers (L levels, L-1 downsamples).
    num_res_blocks: ResnetBlocks per level.
    z_channels: output channels (doubled for KL moments when `double_z`).
    double_z: KL autoencoders output mean and logvar.
    using_sa: VAR rule, attention after every block of the last level.
    attn_resolutions: LDM rule, attention at levels whose feature side is listed.
    mid_attn: attention between the two mid blocks.
    fused_qkv: VAR's fused qkv conv instead of separate q/k/v.
    dropout: dropout rate inside ResnetBlocks (active when `train`).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  double_z: bool = False
  using_sa: bool = True
  attn_resolutions: Sequence[int] = ()
  mid_attn: bool = True
  fused_qkv: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    n = len(self.ch_mult)
    side = x_BxHxWxC.shape[1]
    h = Conv(self.ch, 3, name="conv_in")(x_BxHxWxC)
    for i in range(n):
      h = _Level(
        self.ch * self.ch_mult[i],
        self.num_res_blocks,
        _attn_here(i, n, side, self.using_sa, self.attn_resolutions),
        self.fused_qkv,
        self.dropout,
        "down" if i != n - 1 else "none",
        name=f"down_{i}",
      )(h, train)
      side //= 2
    h = _Mid(self.dropout, self.mid_attn, self.fused_qkv, name="mid")(h, train)
    h = nn.silu(Normalize(h.shape[-1], "norm_out")(h))
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return Conv(out, 3, name="conv_out")(h)


class Decoder(nn.Module):
  """Features [B, h, w, z_channels] -> image [B, h*2^(L-1), w*2^(L-1), out_channels] (unclipped).

  Attributes mirror `Encoder`; each level has `num_res_blocks + 1` blocks, and `using_sa` puts
  attention at the first decoder level (the lowest resolution, `up_<L-1>`).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  out_channels: int = 3
  using_sa: bool = True
  attn_resolutions: Sequence[int] = ()
  mid_attn: bool = True
  fused_qkv: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, z_BxhxwxC: jax.Array, train: bool = False) -> jax.Array:
    n = len(self.ch_mult)
    side = z_BxhxwxC.shape[1]
    h = Conv(self.ch * self.ch_mult[-1], 3, name="conv_in")(z_BxhxwxC)
    h = _Mid(self.dropout, self.mid_attn, self.fused_qkv, name="mid")(h, train)
    for i in reversed(range(n)):
      h = _Level(
        self.ch * self.ch_mult[i],
        self.num_res_blocks + 1,
        _attn_here(i, n, side, self.using_sa, self.attn_resolutions),
        self.fused_qkv,
        self.dropout,
        "up" if i != 0 else "none",
        name=f"up_{i}",
      )(h, train)
      side *= 2
    h = nn.silu(Normalize(h.shape[-1], "norm_out")(h))
    return Conv(self.out_channels, 3, name="conv_out")(h)


class Autoencoder(nn.Module):
  """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

  `quantize` is any quantizer module of `arvision.tokenizers.quantizers` (its params live under
  `quantize/`). `quant_conv` maps z_channels (x2 for KL) to embed_dim (x2 for KL), and
  `post_quant_conv` maps embed_dim back to z_channels.

  Attributes:
    quantize: the quantizer (VectorQuantizer, MultiScaleVQ or DiagonalGaussian).
    embed_dim: codebook / latent channels (VAR Cvae, LlamaGen codebook_embed_dim, MAR embed_dim).
    in_channels: image channels in; out_channels: image channels out.
    quant_conv_ks: kernel size of both quant convs (VAR 3, LlamaGen/MAR 1); 0: no quant convs
      (Infinity's BSQ VAE, Flux-style: the encoder's `conv_out` gives the latent itself).
    kl: whether the quantizer consumes Gaussian moments (doubles encoder/quant_conv outputs).
    Other attributes: see `Encoder`; `enc_attn_resolutions`/`dec_attn_resolutions` are the LDM
    rule per side.
  """

  quantize: nn.Module
  embed_dim: int = 32
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  using_sa: bool = True
  enc_attn_resolutions: Sequence[int] = ()
  dec_attn_resolutions: Sequence[int] = ()
  mid_attn: bool = True
  fused_qkv: bool = True
  dropout: float = 0.0
  quant_conv_ks: int = 3
  kl: bool = False

  def setup(self):
    common = dict(
      ch=self.ch,
      ch_mult=tuple(self.ch_mult),
      num_res_blocks=self.num_res_blocks,
      using_sa=self.using_sa,
      mid_attn=self.mid_attn,
      fused_qkv=self.fused_qkv,
      dropout=self.dropout,
    )
    self.encoder = Encoder(
      z_channels=self.z_channels,
      double_z=self.kl,
      attn_resolutions=tuple(self.enc_attn_resolutions),
      **common,
    )
    self.decoder = Decoder(
      out_channels=self.out_channels, attn_resolutions=tuple(self.dec_attn_resolutions), **common
    )
    mult = 2 if self.kl else 1
    if self.quant_conv_ks:
      self.quant_conv = Conv(mult * self.embed_dim, self.quant_conv_ks)
      self.post_quant_conv = Conv(self.z_channels, self.quant_conv_ks)
    elif self.z_channels != self.embed_dim:
      raise ValueError(
        f"quant_conv_ks=0 (no quant convs) needs z_channels == embed_dim; got {self.z_channels} "
        f"and {self.embed_dim}"
      )

  def encode(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    """Images in [-1, 1] -> pre-quantization features f (or KL moments) [B, h, w, (2x)embed_dim]."""
    if x_BxHxWxC.shape[-1] != self.in_channels:
      raise ValueError(
        f"images have {x_BxHxWxC.shape[-1]} channels; this tokenizer takes "
        f"in_channels={self.in_channels}"
      )
    # float32 features: quantisation (distances, codes) and KL moments are float32 math.
    h = self.encoder(x_BxHxWxC, train)
    return (self.quant_conv(h) if self.quant_conv_ks else h).astype(jnp.float32)

  def decode(self, f_BxhxwxC: jax.Array, train: bool = False) -> jax.Array:
    """(Quantized) features -> images (not clipped; callers clip for display)."""
    h = self.post_quant_conv(f_BxhxwxC) if self.quant_conv_ks else f_BxhxwxC
    return self.decoder(h, train).astype(jnp.float32)

  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Reconstruction (unclipped) and the quantizer's outputs (`loss`, codes, usage, ...)."""
    f = self.encode(x_BxHxWxC, train)
    f_q, aux = self.quantize(f, train=train)
    return self.decode(f_q, train), aux
