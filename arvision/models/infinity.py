"""Infinity: bitwise next-scale prediction (Han et al., 2024; FoundationVision/Infinity).

A variant of the VAR spine (`models/var.py`): next-scale prediction under the same block-causal
mask, AdaLN blocks and KV-cached decoding, but over the d bits of a multi-scale BSQ tokenizer
(binary spherical quantisation, V = 2^d) and conditioned on text. The transformer is the official
`infinity/models/infinity.py` + `basic.py` (`Infinity`, `CrossAttnBlock`) as released:

- **Bitwise head** (official `use_bit_label=1`): the head gives 2 logits per bit, `[B, L, 2d]`
  read as `[B, L, d, 2]` (index 1 = bit set); the loss is the per-bit cross-entropy, averaged over
  the d bits, then over tokens with weight 1/L (or the official `reweight_loss_by_scale`: a token
  of a scale with side s weighs `s_last / s`, normalised to sum 1), then over the batch.
- **Text conditioning** from *given* text features `[B, T, Ct5]` with lengths `[B]` (T5 is not
  part of this code): RMS-normed (`text_norm`), attention-pooled by one learned query into the
  SOS token, which is also the AdaLN condition (`shared_ada_lin` -> every block's `ada_gss`, and
  the head's AdaLN); projected by a GELU MLP (`text_proj_for_ca`) into the keys/values of a
  cross-attention in every block. The null text is the learned `cfg_uncond [text_maxlen, Ct5]`;
  conditioning dropout swaps it in (rate `cond_drop_rate`).
- **Class conditioning** (our `cond="class"`, for Fashion-MNIST): the official constructor has a
  `class_emb` branch, but its `forward` and sampler only take text, so there is no class path to
  port. Here a class reads `class_text_len` learned text-feature vectors from `class_text`
  (`[num_classes, class_text_len * Ct5]`) and everything after that is the text path unchanged
  (label `num_classes` = the null text `cfg_uncond`).
- **Positions**: no absolute table. `pos_start` on the SOS token, `lvl_embed` (15 rows, by scale
  index) added once before the first block (`add_lvl_embeding_only_first_block=1`), and a 2D RoPE
  in every self-attention (`rope2d_each_sa_layer=1`) applied to the L2-normalised, scaled q and k
  (cosine attention). `rope_mode=2` (`rope2d_normalized_by_hw=2`, the released models): each scale's
  grid positions are stretched onto the reference grid `rope_grid` (official: the last scale of
  the 1M schedule of the aspect ratio, 64 x 64 at 1:1) and rounded; `rope_mode=0` uses the raw
  row/column. Head dim / 2 frequency pairs: the first half of the pairs turn with the row, the
  second with the column (base 10000), pairs are adjacent channels (2p, 2p + 1).
- **Bitwise self-correction** (training, `InfinityFamily.flip_requant`, official
  `BitwiseSelfCorrection.flip_requant`): the teacher input is built scale by scale from the
  tokenizer's raw features; for the first `noise_layers` scales the quantised bits are flipped with
  a probability drawn per scale from {0, 0.01, ..., noise_strength}, re-quantised, and the later
  scales' targets are the residual against this corrupted sum, so the model learns to correct.

Sampling (`InfinityFamily._sample_impl`): scale by scale with a static KV cache, CFG on the bit
logits (official `cfg_insertion_layer=0`, the CLI default: `cfg * cond + (1 - cfg) * uncond`),
temperature `tau`, top-k / top-p on each bit's 2 logits, then the codes `+-1/sqrt(d)` are
upsampled and summed into f_hat as the official sampler does (`summed_codes`; the next input is
f_hat resized to the next scale with the tokenizer's up mode).

Not ported: the hidden-state CFG insertion (`cfg_insertion_layer < 0`), `apply_spatial_patchify`,
video (t > 1), SwiGLU / RMSNorm / non-shared AdaLN variants (unused by the released models),
`rope_mode=1`.

Parameter names (flax) -> official keys (`arvision.convert.infinity`): `cfg_uncond`,
`text_norm` (`text_norm.weight`), `sos_pool/{mat_q,mat_kv,v_bias,proj}` (`text_proj_for_sos.ca.*`),
`text_proj_ca1`/`text_proj_ca2` (`text_proj_for_ca.0`/`.2`), `pos_start`, `lvl_embed`,
`word_embed`, `shared_ada_lin` (`shared_ada_lin.1`), `blocks_{i}/{sa/{mat_qkv,q_bias,v_bias,
scale_mul,proj}, ca/{mat_q,mat_kv,v_bias,proj}, ca_norm/{scale,bias}, ffn/{fc1,fc2}, ada_gss}`
(`blocks.{i}` or `block_chunks.{c}.module.{j}`), `head_nm/ada_lin` (`head_nm.ada_lin.1`), `head`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import precision
from arvision.models.generator import Generator
from arvision.models.layers import (
  FFN,
  AdaLNBeforeHead,
  drop_path,
  drop_path_rates,
  gelu_tanh,
  l2_normalize,
  layer_norm,
  scaled_init,
  trunc_normal_init,
)
from arvision.ops import masks
from arvision.ops.attention import attention
from arvision.parallel.logical import constrain, param_init
from arvision.sampling import guidance
from arvision.sampling.kv_cache import KVCache, init_kv_caches, update_kv_cache
from arvision.sampling.topk import filter_top_k_top_p

ROPE_MODES = (0, 2)
NUM_LEVELS = 15  # official `lvl_embed = nn.Embedding(15, C)`
CONDS = ("class", "text")


def scale_bounds(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
  """`[(begin, end), ...]` of each scale's tokens in the flattened sequence."""
  out, cur = [], 0
  for pn in patch_nums:
    out.append((cur, cur + pn * pn))
    cur += pn * pn
  return out


def ffn_hidden(width: int, mlp_ratio: float) -> int:
  """The official FFN width, `round(C * mlp_ratio / 256) * 256` (Python rounding)."""
  hidden = round(width * mlp_ratio / 256) * 256
  if hidden <= 0:
    raise ValueError(
      f"model.width={width} x mlp_ratio={mlp_ratio} rounds to an FFN width of 0 (official: "
      "round(C * mlp_ratio / 256) * 256); use width * mlp_ratio >= 384"
    )
  return hidden


def rope_tables(
  patch_nums: Sequence[int], head_dim: int, mode: int, grid: int, base: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
  """float32 `(cos, sin)`, each `[L, head_dim // 2]`: the 2D RoPE angles of every token of the
  scale schedule (official `precompute_rope2d_freqs_grid`, float32 like it).

  Pair p < head_dim/4 turns with the row position at frequency `base^(-2p / (head_dim / 2))`, the
  next head_dim/4 pairs with the column. mode 0: positions are the raw (row, col); mode 2: the
  scale's grid stretched onto `grid x grid` and rounded (`round(i * grid / pn)`, float32).
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
  if mode not in ROPE_MODES:
    raise ValueError(f"model.rope_mode={mode} is not supported; accepted: {ROPE_MODES}")
  half = head_dim // 2
  exps = np.arange(0, half, 2, dtype=np.int64).astype(np.float32) / np.float32(half)
  inv = (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)
  rows = []
  for pn in patch_nums:
    if mode == 2:
      pos = np.round(np.arange(pn, dtype=np.float32) * np.float32(grid / pn)).astype(np.float32)
    else:
      pos = np.arange(pn, dtype=np.float32)
    ang_h = np.outer(pos, inv).astype(np.float32)  # [pn, half/2]
    ang = np.concatenate(
      [np.repeat(ang_h[:, None, :], pn, 1), np.repeat(ang_h[None, :, :], pn, 0)], axis=-1
    )
    rows.append(ang.reshape(pn * pn, half))
  ang = np.concatenate(rows, axis=0)
  return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x_BxLxHxD: jax.Array, cos_LxP: jax.Array, sin_LxP: jax.Array) -> jax.Array:
  """Rotates adjacent channel pairs `(2p, 2p + 1)` by the angles of `(cos, sin)` (float32)."""
  B, L, H, D = x_BxLxHxD.shape
  x = x_BxLxHxD.astype(jnp.float32).reshape(B, L, H, D // 2, 2)
  c, s = cos_LxP[None, :, None, :], sin_LxP[None, :, None, :]
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([c * x0 - s * x1, s * x0 + c * x1], axis=-1)
  return out.reshape(B, L, H, D).astype(x_BxLxHxD.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """`x * rsqrt(mean(x^2) + eps) * weight` in float32 (official `FastRMSNorm`)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * weight


def bit_cross_entropy(logits_BxLx2d: jax.Array, bits_BxLxd: jax.Array) -> jax.Array:
  """Per-token mean over bits of the 2-way cross-entropy, float32 `[B, L]` (official
  `CrossEntropyLoss(reduction='none')` on `logits.reshape(B, L, d, 2)`, then `mean(-1)`)."""
  B, L, twice_d = logits_BxLx2d.shape
  lg = logits_BxLx2d.astype(jnp.float32).reshape(B, L, twice_d // 2, 2)
  picked = jnp.take_along_axis(lg, bits_BxLxd.astype(jnp.int32)[..., None], axis=-1)[..., 0]
  return jnp.mean(jax.nn.logsumexp(lg, axis=-1) - picked, axis=-1)


def token_weights(patch_nums: Sequence[int], reweight: bool) -> np.ndarray:
  """float32 `[L]` loss weights over tokens: 1/L each, or (official `reweight_loss_by_scale`) a
  token of side s weighs `s_last / s`, normalised to sum 1."""
  if not reweight:
    L = sum(pn * pn for pn in patch_nums)
    return np.full((L,), 1.0 / L, np.float32)
  last = float(patch_nums[-1])
  w = np.concatenate([np.full((pn * pn,), last / pn) for pn in patch_nums])
  return (w / w.sum()).astype(np.float32)


class AffineLayerNorm(nn.Module):
  """LayerNorm with weight and bias (official `ca_norm`), two-pass variance like torch."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    C = x.shape[-1]
    scale = self.param("scale", param_init(nn.initializers.ones, ("embed",)), (C,))
    bias = self.param("bias", param_init(nn.initializers.zeros, ("embed",)), (C,))
    return (layer_norm(x, self.eps) * scale + bias).astype(x.dtype)


class RopeSelfAttention(nn.Module):
  """Infinity `SelfAttention`: VAR's fused qkv + q/v biases and cosine attention, plus 2D RoPE
  on the normalised q and k. Same cache protocol as `layers.SelfAttention`."""

  num_heads: int
  depth: int = 1
  init_std: float = 0.02
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxC, cos_LxP, sin_LxP, *, mask, cache=None, cache_index: int = 0):
    B, L, C = x_BxLxC.shape
    H, hd = self.num_heads, C // self.num_heads
    kinit = trunc_normal_init(self.init_std)
    dtype = precision.current_dtype()
    qkv = nn.Dense(
      3 * C,
      use_bias=False,
      kernel_init=param_init(kinit, ("embed", "heads")),
      name="mat_qkv",
      dtype=dtype,
    )(x_BxLxC)
    q_bias = self.param("q_bias", param_init(nn.initializers.zeros, ("heads",)), (C,))
    v_bias = self.param("v_bias", param_init(nn.initializers.zeros, ("heads",)), (C,))
    qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    qkv = qkv.reshape(B, L, 3, H, hd)
    names = ("batch", "seq", "heads", "kv")
    q, k, v = (constrain(qkv[:, :, i], names) for i in range(3))
    scale_mul_H = self.param(
      "scale_mul", param_init(nn.initializers.constant(math.log(4.0)), ("heads",)), (H,)
    )
    scale_mul_H = jnp.exp(jnp.minimum(scale_mul_H, math.log(100.0)))
    q = apply_rope(l2_normalize(q) * scale_mul_H[:, None].astype(q.dtype), cos_LxP, sin_LxP)
    k = apply_rope(l2_normalize(k), cos_LxP, sin_LxP)
    new_cache = None
    if cache is not None:
      new_cache = update_kv_cache(cache, k, v, cache_index)
      k = new_cache[0][:, : cache_index + L].astype(q.dtype)
      v = new_cache[1][:, : cache_index + L].astype(q.dtype)
    out = attention(q, k, v, mask=mask, impl=self.attn_impl, scale=1.0, q_offset=cache_index)
    out = constrain(out, names).reshape(B, L, C)
    out = nn.Dense(
      C,
      kernel_init=param_init(
        scaled_init(kinit, 1.0 / math.sqrt(2 * self.depth)), ("heads", "embed")
      ),
      bias_init=param_init(nn.initializers.zeros, ("embed",)),
      name="proj",
      dtype=dtype,
    )(out)
    return out, new_cache


class TextCrossAttention(nn.Module):
  """Official `CrossAttention` over padded text: keys/values `mat_kv(text)` (zero k bias,
  `v_bias`), queries `mat_q(x)` or, when `pool`, one learned query per head (`mat_q [1, H, hd]`,
  the SOS attention pool); softmax scale 1/sqrt(hd); keys past `text_len` are hidden."""

  width: int
  num_heads: int
  pool: bool = False
  init_std: float = 0.02
  attn_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxC, kv_BxTxK, text_len_B):
    E, H = self.width, self.num_heads
    if E % H:
      raise ValueError(f"cross-attention width {E} is not divisible by its {H} heads")
    hd = E // H
    B, T = kv_BxTxK.shape[:2]
    kinit = trunc_normal_init(self.init_std)
    dtype = precision.current_dtype()
    kv = nn.Dense(
      2 * E,
      use_bias=False,
      kernel_init=param_init(kinit, (None, "heads")),
      name="mat_kv",
      dtype=dtype,
    )(kv_BxTxK)
    v_bias = self.param("v_bias", param_init(nn.initializers.zeros, ("heads",)), (E,))
    kv = kv + jnp.concatenate([jnp.zeros_like(v_bias), v_bias]).astype(kv.dtype)
    kv = kv.reshape(B, T, 2, H, hd)
    k, v = kv[:, :, 0], kv[:, :, 1]
    if self.pool:
      mat_q = self.param(
        "mat_q",
        param_init(trunc_normal_init(math.sqrt(1 / E / 3)), (None, "heads", "kv")),
        (1, H, hd),
      )
      q = jnp.broadcast_to(mat_q[None].astype(k.dtype), (B, 1, H, hd))
    else:
      q = nn.Dense(
        E,
        kernel_init=param_init(kinit, ("embed", "heads")),
        bias_init=param_init(nn.initializers.zeros, ("heads",)),
        name="mat_q",
        dtype=dtype,
      )(x_BxLxC)
      q = q.reshape(q.shape[0], q.shape[1], H, hd)
    mask = masks.key_length(text_len_B.astype(jnp.int32))
    out = attention(q, k, v, mask=mask, impl="xla", scale=1.0 / math.sqrt(hd))
    out = out.reshape(B, q.shape[1], E)
    return nn.Dense(
      E,
      kernel_init=param_init(kinit, ("heads", "embed")),
      bias_init=param_init(nn.initializers.zeros, ("embed",)),
      name="proj",
      dtype=dtype,
    )(out)


class CrossAttnBlock(nn.Module):
  """Official `CrossAttnBlock` with shared AdaLN (`saln=1`): gamma1, gamma2, scale1, scale2,
  shift1, shift2 = ada_gss + shared_ada_lin(cond); x += dp(sa(LN(x)(1 + scale1) + shift1) gamma1);
  x += ca(ca_norm(x), text); x += dp(ffn(LN(x)(1 + scale2) + shift2) gamma2)."""

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  depth: int = 1
  init_std: float = 0.02
  aln: float = 1e-3
  alng: float = 1e-3
  norm_eps: float = 1e-6
  attn_impl: str = "auto"

  @nn.compact
  def __call__(
    self,
    x_BxLxC,
    gss_Bx1x6xC,
    ca_kv_BxTxC,
    text_len_B,
    cos_LxP,
    sin_LxP,
    *,
    mask: Any,
    deterministic: bool = True,
    cache: KVCache | None = None,
    cache_index: int = 0,
  ):
    C = x_BxLxC.shape[-1]

    def gss_init(key, shape, dtype=jnp.float32):
      w = jax.random.normal(key, shape, dtype) / math.sqrt(C)
      return w * jnp.asarray([self.alng] * 2 + [self.aln] * 4, dtype)[None, None, :, None]

    ada_gss = self.param("ada_gss", param_init(gss_init, (None, None, None, "embed")), (1, 1, 6, C))
    ada = (ada_gss + gss_Bx1x6xC).astype(jnp.float32)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = [ada[:, :, i] for i in range(6)]
    need_rng = not deterministic and self.drop_path_rate > 0
    dt = x_BxLxC.dtype
    x = constrain(x_BxLxC, ("batch", "seq", "embed"))
    h = (layer_norm(x.astype(jnp.float32), self.norm_eps) * (1 + scale1) + shift1).astype(dt)
    h, new_cache = RopeSelfAttention(
      num_heads=self.num_heads,
      depth=self.depth,
      init_std=self.init_std,
      attn_impl=self.attn_impl,
      name="sa",
    )(h, cos_LxP, sin_LxP, mask=mask, cache=cache, cache_index=cache_index)
    rng = self.make_rng("dropout") if need_rng else None
    x = x + drop_path((h * gamma1).astype(dt), self.drop_path_rate, rng, deterministic)
    ca = TextCrossAttention(
      width=C, num_heads=self.num_heads, init_std=self.init_std, attn_impl=self.attn_impl, name="ca"
    )(AffineLayerNorm(self.norm_eps, name="ca_norm")(x), ca_kv_BxTxC, text_len_B)
    x = x + ca.astype(dt)
    h = (layer_norm(x.astype(jnp.float32), self.norm_eps) * (1 + scale2) + shift2).astype(dt)
    h = FFN(
      hidden=ffn_hidden(C, self.mlp_ratio), depth=self.depth, init_std=self.init_std, name="ffn"
    )(h)
    rng = self.make_rng("dropout") if need_rng else None
    x = x + drop_path((h * gamma2).astype(dt), self.drop_path_rate, rng, deterministic)
    return constrain(x, ("batch", "seq", "embed")), new_cache


class Infinity(nn.Module):
  """The Infinity transformer (see the module docstring).

  Attributes:
    depth, width, num_heads: blocks, C, H.
    bits: d, the BSQ code width (the head gives 2d logits per token).
    text_dim: Ct5, the text feature width (a multiple of the SOS pool's head dim, 128; 64 when
      width > 4096).
    text_maxlen: rows of the null text `cfg_uncond` (the longest text it can replace).
    patch_nums: side of each scale's square token grid.
    num_classes: 0 for text conditioning; > 0: class-conditional through `class_text`.
    class_text_len: text tokens per class (class conditioning).
    rope_mode, rope_grid: RoPE positions (see `rope_tables`); `rope_grid` 0 = the last scale.
    mlp_ratio, drop_path_rate, cond_drop_rate, norm_eps: as the official arguments.
    aln, alng: AdaLN init multipliers (official `aln`, `alng`); init_head: head weight multiplier.
    attn_impl: `arvision.ops.attention` implementation of the self-attention.
  """

  depth: int
  width: int
  num_heads: int
  bits: int
  text_dim: int
  text_maxlen: int
  patch_nums: tuple[int, ...]
  num_classes: int = 0
  class_text_len: int = 1
  rope_mode: int = 2
  rope_grid: int = 0
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  cond_drop_rate: float = 0.1
  norm_eps: float = 1e-6
  aln: float = 1e-3
  alng: float = 5e-6
  init_head: float = 0.02
  attn_impl: str = "auto"

  @property
  def lengths(self) -> tuple[int, ...]:
    return tuple(pn * pn for pn in self.patch_nums)

  @property
  def seq_len(self) -> int:
    return sum(self.lengths)

  @property
  def pool_heads(self) -> int:
    """Heads of the SOS attention pool: `Ct5 // 128` (`// 64` when width > 4096), official."""
    return self.text_dim // (64 if self.width > 4096 else 128)

  def setup(self):
    C, K = self.width, self.text_dim
    if len(self.patch_nums) > NUM_LEVELS:
      raise ValueError(f"{len(self.patch_nums)} scales > the {NUM_LEVELS} rows of lvl_embed")
    if self.pool_heads <= 0 or C % self.pool_heads:
      raise ValueError(
        f"model.text_dim={K} gives {self.pool_heads} SOS-pool heads (text_dim // 128); it must "
        f"be >= 128 and the heads must divide model.width={C}"
      )
    std = math.sqrt(1.0 / (3 * C))
    tn = trunc_normal_init(std)
    zeros = nn.initializers.zeros
    dtype = precision.current_dtype()

    def uncond_init(key, shape, dtype=jnp.float32):
      return trunc_normal_init(1.2)(key, shape, dtype) / math.sqrt(K)

    self.cfg_uncond = self.param(
      "cfg_uncond", param_init(uncond_init, ("seq", None)), (self.text_maxlen, K)
    )
    self.text_norm = self.param("text_norm", param_init(nn.initializers.ones, ("embed",)), (K,))
    if self.num_classes > 0:
      self.class_text = nn.Embed(
        self.num_classes,
        self.class_text_len * K,
        embedding_init=param_init(trunc_normal_init(1.0), ("classes", None)),
        name="class_text",
      )
    self.sos_pool = TextCrossAttention(width=C, num_heads=self.pool_heads, pool=True, init_std=std)
    self.text_proj_ca1 = nn.Dense(
      C,
      kernel_init=param_init(tn, (None, "embed")),
      bias_init=param_init(zeros, ("embed",)),
      dtype=dtype,
    )
    self.text_proj_ca2 = nn.Dense(
      C,
      kernel_init=param_init(tn, ("embed", "mlp")),
      bias_init=param_init(zeros, ("mlp",)),
      dtype=dtype,
    )
    self.pos_start = self.param("pos_start", param_init(tn, (None, "seq", "embed")), (1, 1, C))
    self.lvl_embed = nn.Embed(
      NUM_LEVELS, C, embedding_init=param_init(tn, (None, "embed")), dtype=dtype
    )
    self.word_embed = nn.Dense(
      C,
      kernel_init=param_init(tn, ("latent", "embed")),
      bias_init=param_init(zeros, ("embed",)),
      dtype=dtype,
    )
    self.shared_ada_lin = nn.Dense(
      6 * C,
      kernel_init=param_init(tn, ("embed", "mlp")),
      bias_init=param_init(zeros, ("mlp",)),
      dtype=dtype,
    )
    dpr = drop_path_rates(self.drop_path_rate, self.depth)
    self.blocks = [
      CrossAttnBlock(
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        drop_path_rate=dpr[i],
        depth=self.depth,
        init_std=std,
        aln=self.aln,
        alng=self.alng,
        norm_eps=self.norm_eps,
        attn_impl=self.attn_impl,
      )
      for i in range(self.depth)
    ]
    self.head_nm = AdaLNBeforeHead(init_std=std, init_adaln=self.aln, norm_eps=self.norm_eps)
    self.head = nn.Dense(
      2 * self.bits,
      kernel_init=param_init(scaled_init(tn, self.init_head), ("embed", "vocab")),
      bias_init=param_init(zeros, ("vocab",)),
    )
    hd = C // self.num_heads
    cos, sin = rope_tables(
      self.patch_nums, hd, self.rope_mode, self.rope_grid or self.patch_nums[-1]
    )
    self._rope = (cos, sin)

  # --- conditioning ------------------------------------------------------------------------------

  def text_of(self, label_B, text_BxTxK, text_len_B):
    """`(text [B, T, Ct5], lengths [B])`: the given text, or a class's `class_text` rows (label
    `num_classes` = the null text)."""
    if self.num_classes <= 0:
      if text_BxTxK is None or text_len_B is None:
        raise ValueError(
          "a text-conditioned Infinity needs text features [B, T, Ct5] and lengths [B]"
        )
      return text_BxTxK.astype(jnp.float32), text_len_B.astype(jnp.int32)
    B, T = label_B.shape[0], self.class_text_len
    rows = self.class_text(jnp.minimum(label_B, self.num_classes - 1)).reshape(B, T, self.text_dim)
    null = (label_B >= self.num_classes)[:, None, None]
    text = jnp.where(null, self.cfg_uncond[None, :T].astype(rows.dtype), rows)
    return text.astype(jnp.float32), jnp.full((B,), T, jnp.int32)

  def null_text(self, text_BxTxK):
    """The null text in the layout of `text` (official: `cfg_uncond[:len]` at each example)."""
    T = text_BxTxK.shape[1]
    if T > self.text_maxlen:
      raise ValueError(f"text of {T} tokens is longer than model.text_maxlen={self.text_maxlen}")
    return jnp.broadcast_to(self.cfg_uncond[None, :T], text_BxTxK.shape).astype(jnp.float32)

  def condition(self, text_BxTxK, text_len_B):
    """`(sos [B, C], ca_kv [B, T, C], gss [B, 1, 6, C])` from text features."""
    kv = rms_norm(text_BxTxK, self.text_norm, self.norm_eps)
    sos = self.sos_pool(None, kv, text_len_B)[:, 0].astype(jnp.float32)
    ca_kv = self.text_proj_ca2(gelu_tanh(self.text_proj_ca1(kv)))
    gss = self.shared_ada_lin(nn.silu(sos)).reshape(-1, 1, 6, self.width).astype(jnp.float32)
    return sos, ca_kv, gss

  def _logits(self, x_BxLxC, sos_BxC):
    h = self.head_nm(x_BxLxC.astype(jnp.float32), sos_BxC.astype(jnp.float32))
    return constrain(self.head(h).astype(jnp.float32), ("batch", "seq", "vocab"))

  def _lvl(self, si_L: np.ndarray) -> jax.Array:
    return self.lvl_embed(jnp.asarray(si_L, jnp.int32))[None]

  # --- training forward --------------------------------------------------------------------------

  def __call__(self, label_B, text_BxTxK, text_len_B, x_BxLm1xd, *, train: bool = False):
    """Teacher-forced bit logits `[B, L, 2d]` (float32).

    Args:
      label_B: int labels (class conditioning; `num_classes` = null) or None.
      text_BxTxK, text_len_B: text features and lengths (text conditioning) or None.
      x_BxLm1xd: the teacher input (f_hat of the earlier scales resized to scales 2..),
        `[B, L - 1, d]`.
      train: conditioning dropout (to the null text) and drop path; needs a 'dropout' rng.
    """
    L = self.seq_len
    if x_BxLm1xd.shape[1:] != (L - 1, self.bits):
      raise ValueError(f"teacher input {x_BxLm1xd.shape} != [B, {L - 1}, {self.bits}]")
    text, text_len = self.text_of(label_B, text_BxTxK, text_len_B)
    B = text.shape[0]
    if train and self.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), (B,)) < self.cond_drop_rate
      text = jnp.where(drop[:, None, None], self.null_text(text), text)
    sos, ca_kv, gss = self.condition(text, text_len)
    first = sos[:, None, :] + self.pos_start
    x = jnp.concatenate([first, self.word_embed(x_BxLm1xd.astype(jnp.float32))], axis=1)
    lvl = np.concatenate([np.full((n,), i) for i, n in enumerate(self.lengths)])
    x = constrain(precision.cast(x + self._lvl(lvl)), ("batch", "seq", "embed"))
    cos, sin = (jnp.asarray(t) for t in self._rope)
    mask = masks.scale_causal(self.lengths)
    ca_kv = precision.cast(ca_kv)
    for block in self.blocks:
      x, _ = precision.block(
        block, x, gss, ca_kv, text_len, cos, sin, mask=mask, deterministic=not train
      )
    return self._logits(x, sos)

  # --- cached decoding ---------------------------------------------------------------------------

  def first_tokens(self, label_B, text_BxTxK, text_len_B, null_B):
    """Scale 0's input and the conditioning for decoding: `(x [B, 1, C], sos, ca_kv, gss,
    text_len)`; rows where `null_B` is set get the null text."""
    text, text_len = self.text_of(label_B, text_BxTxK, text_len_B)
    text = jnp.where(null_B[:, None, None], self.null_text(text), text)
    sos, ca_kv, gss = self.condition(text, text_len)
    x = sos[:, None, :] + self.pos_start + self._lvl(np.zeros((1,)))
    return precision.cast(x), sos, precision.cast(ca_kv), gss, text_len

  def embed_next(self, next_Bxlxd, si: int):
    """Scale `si`'s input tokens: `word_embed(f_hat resized) + lvl_embed(si)`."""
    x = self.word_embed(next_Bxlxd.astype(jnp.float32)) + self._lvl(np.full((1,), si))
    return precision.cast(x)

  def step(self, x_Bxlxc, sos_BxC, ca_kv, text_len_B, gss, caches, si: int):
    """Scale `si` through every block with the KV cache; `(logits [B, l, 2d], caches)`."""
    b, e = scale_bounds(self.patch_nums)[si]
    if x_Bxlxc.shape[1] != e - b:
      raise ValueError(f"scale {si} expects {e - b} tokens, got {x_Bxlxc.shape[1]}")
    cos, sin = (jnp.asarray(t[b:e]) for t in self._rope)
    x, new = x_Bxlxc, []
    for i, block in enumerate(self.blocks):
      x, cache = block(
        x, gss, ca_kv, text_len_B, cos, sin, mask=masks.full(), cache=caches[i], cache_index=b
      )
      new.append(cache)
    return self._logits(x, sos_BxC), new


# ------------------------------------------------------------------------------------------------
# Family

# What the family calls on its tokenizer (the BSQ tokenizer family, `tokenizers/bsq.py`):
# `flip_requant(params, images, rng, layers, strength)` -> (target bits per scale, teacher input),
# `bsq_next_input(params, si, cum, bits)` -> (running code sum, next scale's input or None),
# `decode_fhat(params, f_hat)` -> images.
TOKENIZER_METHODS = ("flip_requant", "bsq_next_input", "decode_fhat")


class InfinityFamily(Generator):
  """Infinity as a Family on a frozen BSQ tokenizer (`params["tokenizer"]`, `TOKENIZER_METHODS`).

  `config.model` fields: depth, width, num_heads, text_dim, text_maxlen, cond (`class` | `text`),
  class_text_len, rope_mode, rope_grid, mlp_ratio, drop_path_rate, cond_drop_rate, norm_eps, aln,
  alng, init_head, attn_impl, noise_layers / noise_strength (bitwise self-correction: official
  `noise_apply_layers` / `noise_apply_strength`, with `noise_apply_requant=1`), scale_reweight
  (official `reweight_loss_by_scale`), label_smoothing (official `ls`).
  """

  name = "infinity"
  tokenizer_methods = TOKENIZER_METHODS
  sampler_static = ("return_logits",)

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    m, tm = config.model, tokenizer.config.model
    self.cond = str(m.get("cond", "class"))
    if self.cond not in CONDS:
      raise ValueError(f"model.cond={self.cond!r}; accepted: {CONDS}")
    self.patch_nums = tuple(int(p) for p in tm.patch_nums)
    depth, width, heads = int(m.depth), int(m.width), int(m.num_heads)
    if depth <= 0 or width <= 0 or heads <= 0 or width % heads:
      raise ValueError(
        f"model.depth={depth}, width={width}, num_heads={heads}: positive, heads dividing width"
      )
    self.noise_layers = int(m.get("noise_layers", 0))
    self.noise_strength = float(m.get("noise_strength", 0.0))
    if not 0.0 <= self.noise_strength <= 1.0:
      raise ValueError(f"model.noise_strength={self.noise_strength} must be in [0, 1]")
    self.label_smoothing = float(m.get("label_smoothing", 0.0))
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"model.label_smoothing={self.label_smoothing} must be in [0, 1)")
    self.weights_L = token_weights(self.patch_nums, bool(m.get("scale_reweight", False)))
    self.module = Infinity(
      depth=depth,
      width=width,
      num_heads=heads,
      bits=int(tm.embed_dim),
      text_dim=int(m.text_dim),
      text_maxlen=int(m.text_maxlen),
      patch_nums=self.patch_nums,
      num_classes=self.num_classes if self.cond == "class" else 0,
      class_text_len=int(m.get("class_text_len", 1)),
      rope_mode=int(m.get("rope_mode", 2)),
      rope_grid=int(m.get("rope_grid", 0)),
      mlp_ratio=float(m.get("mlp_ratio", 4.0)),
      drop_path_rate=float(m.get("drop_path_rate", 0.0)),
      cond_drop_rate=float(m.get("cond_drop_rate", 0.1)),
      norm_eps=float(m.get("norm_eps", 1e-6)),
      aln=float(m.get("aln", 1e-3)),
      alng=float(m.get("alng", 5e-6)),
      init_head=float(m.get("init_head", 0.02)),
      attn_impl=str(m.get("attn_impl", "auto")),
    )
    rope_tables(self.patch_nums, width // heads, self.module.rope_mode, 1)  # fails now if bad
    ffn_hidden(width, self.module.mlp_ratio)
    self.seq_len = self.module.seq_len

  def init_inputs(self) -> tuple:
    x = jnp.zeros((1, self.seq_len - 1, self.module.bits), jnp.float32)
    if self.cond == "class":
      return jnp.zeros((1,), jnp.int32), None, None, x
    text = jnp.zeros((1, 1, self.module.text_dim), jnp.float32)
    return None, text, jnp.ones((1,), jnp.int32), x

  # --- training ----------------------------------------------------------------------------------

  def flip_requant(self, tok_p, images, rng):
    """Bitwise self-correction (official `BitwiseSelfCorrection.flip_requant`, done by the
    tokenizer): per-scale target bits `[B, pn^2, d]` and the teacher input `[B, L - 1, d]`. Scale k
    quantises the raw features minus the running code sum; for k < `noise_layers` (with an `rng`)
    each bit flips with probability p_k ~ U{0, 0.01, ..., noise_strength} and the flipped codes
    enter the sum, so later targets correct them."""
    layers = self.noise_layers if rng is not None and self.noise_strength > 0 else 0
    rng = jax.random.key(0) if rng is None else rng
    bits, teacher = self.tokenizer.flip_requant(tok_p, images, rng, layers, self.noise_strength)
    bits = [jax.lax.stop_gradient(b).astype(jnp.int32) for b in bits]
    return bits, jax.lax.stop_gradient(teacher.astype(jnp.float32))

  def cond_inputs(self, batch):
    """`(label, text, text_len)` of a batch for the module (None where unused)."""
    if self.cond == "class":
      return jnp.asarray(batch["label"]).astype(jnp.int32), None, None
    if "text" not in batch or "text_len" not in batch:
      raise ValueError(
        "a text-conditioned Infinity trains on batches with 'text' [B, T, Ct5] and 'text_len' [B] "
        f"(precomputed text features); got keys {sorted(batch)}"
      )
    return None, jnp.asarray(batch["text"]), jnp.asarray(batch["text_len"])

  def apply(self, params, label, text, text_len, teacher, rng=None, train: bool = False):
    """Teacher-forced bit logits `[B, L, 2d]` (float32)."""
    return self.apply_module(params, label, text, text_len, teacher, rng=rng, train=train)

  def loss(self, params, batch, rng, train: bool):
    """The official bitwise loss: per-bit CE (label smoothing as torch's), mean over bits,
    token weights (`token_weights`) summed, mean over the batch. Metrics: `loss`, `ce`,
    `bit_acc`, `token_acc` (all d bits right) and per scale `loss_s{k}`, `bit_acc_s{k}`."""
    tok_p = params["tokenizer"]
    k_noise, k_drop = jax.random.split(jax.random.key(0) if rng is None else rng)
    bits_list, teacher = self.flip_requant(tok_p, batch["image"], k_noise if train else None)
    label, text, text_len = self.cond_inputs(batch)
    logits = self.apply(params, label, text, text_len, teacher, rng=k_drop, train=train)
    gt_BxLxd = jnp.concatenate(bits_list, axis=1)
    ce_BxL = bit_cross_entropy(logits, gt_BxLxd)
    obj_BxL = ce_BxL
    if self.label_smoothing > 0:
      B, L, d = gt_BxLxd.shape
      lg = jax.nn.log_softmax(logits.reshape(B, L, d, 2), axis=-1)
      target = jax.nn.one_hot(gt_BxLxd, 2) * (1 - self.label_smoothing) + self.label_smoothing / 2
      obj_BxL = jnp.mean(-jnp.sum(target * lg, axis=-1), axis=-1)
    loss = jnp.mean(obj_BxL @ jnp.asarray(self.weights_L))
    B, L, d = gt_BxLxd.shape
    correct = jnp.argmax(logits.reshape(B, L, d, 2), axis=-1) == gt_BxLxd
    metrics = {
      "loss": loss,
      "ce": jnp.mean(ce_BxL),
      "bit_acc": jnp.mean(correct),
      "token_acc": jnp.mean(jnp.all(correct, axis=-1)),
    }
    for k, (b, e) in enumerate(scale_bounds(self.patch_nums)):
      metrics[f"loss_s{k}"] = jnp.mean(ce_BxL[:, b:e])
      metrics[f"bit_acc_s{k}"] = jnp.mean(correct[:, b:e])
    return loss, metrics

  # --- sampling ----------------------------------------------------------------------------------

  def decode_steps(self, params, cond, rng, knobs, pick, *, return_logits=False):
    """The cached sampler over the scales: `(f_hat [B, P, P, d], bits list [B, pn^2, d], logits
    list)`. `cond = (label, text, text_len)`; `knobs = (cfg, tau, top_k, top_p)`; `pick(rng,
    logits [B, l, d, 2], top_k, top_p)` draws bits (tests and parity pass argmax)."""
    tok, mod, mv = self.tokenizer, self.module, self._vars(params)
    cfg, tau, top_k, top_p = knobs
    label, text, text_len = cond
    B = (label if label is not None else text).shape[0]
    dup = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)  # noqa: E731
    null = jnp.concatenate([jnp.zeros((B,), bool), jnp.ones((B,), bool)])
    with self.computing():
      x, sos, ca_kv, gss, tl = mod.apply(
        mv, dup(label), dup(text), dup(text_len), null, method=Infinity.first_tokens
      )
    caches = init_kv_caches(
      mod.depth, 2 * B, self.seq_len, mod.num_heads, mod.width // mod.num_heads, x.dtype
    )
    P, d = self.patch_nums[-1], mod.bits
    cum, bits_out, logits_out = jnp.zeros((B, P, P, d), jnp.float32), [], []
    for si, pn in enumerate(self.patch_nums):
      with self.computing():
        lg, caches = mod.apply(mv, x, sos, ca_kv, tl, gss, caches, si, method=Infinity.step)
      lg = lg / tau
      lg = guidance.guide(lg[:B], lg[B:], cfg).reshape(B, pn * pn, d, 2)
      rng, k = jax.random.split(rng)
      bits = pick(k, lg, top_k, top_p)
      bits_out.append(bits)
      logits_out.append(lg if return_logits else None)
      cum, nxt = tok.bsq_next_input(params.get("tokenizer"), si, cum, bits)
      if nxt is not None:
        with self.computing():
          x = mod.apply(mv, nxt.reshape(B, -1, d), si + 1, method=Infinity.embed_next)
        x = jnp.concatenate([x, x], axis=0)
    f_hat = cum
    return f_hat, bits_out, logits_out

  def _sample_impl(self, params, cond, rng, knobs, *, return_logits):
    def pick(k, lg, top_k, top_p):
      filtered = filter_top_k_top_p(lg, top_k, top_p)
      return jax.random.categorical(k, filtered, axis=-1).astype(jnp.int32)

    f_hat, bits, logits = self.decode_steps(
      params, cond, rng, knobs, pick, return_logits=return_logits
    )
    img = self.decode_images(params, f_hat, "decode_fhat")
    return img, bits, (logits if return_logits else None)

  def sample_tokens(self, params, cond, rng, **settings):
    """Samples images; returns `(images uint8 [B, H, W, C], bits list int32 [B, pn^2, d],
    logits list or None)`.

    Args:
      cond: int labels `[B]` (`model.cond="class"`; `num_classes` = unconditional) or a pair
        `(text [B, T, Ct5], text_len [B])` of precomputed text features (`cond="text"`).
      **settings: `SAMPLE_SETTINGS`: `cfg` (on the bit logits, official cfg_insertion_layer=0),
        `tau` (logits / tau), `top_k`, `top_p` (per bit, over its 2 logits; traced), and
        `return_logits` (static: the guided logits `[B, pn^2, d, 2]` per scale).
    """
    unknown = sorted(set(settings) - set(SAMPLE_SETTINGS))
    if unknown:
      raise ValueError(
        f"infinity sampling settings {unknown} unknown; accepted: {list(SAMPLE_SETTINGS)}"
      )
    s = {**SAMPLE_SETTINGS, **settings}
    if self.cond == "class":
      if isinstance(cond, tuple):
        raise ValueError(
          "this Infinity is class-conditional (model.cond='class'): pass int labels [B]"
        )
      c = (self.check_labels(cond).astype(jnp.int32), None, None)
    else:
      if not (isinstance(cond, tuple) and len(cond) == 2):
        raise ValueError(
          "this Infinity is text-conditioned (model.cond='text'): pass (text [B, T, Ct5], text_len [B])"
        )
      text, text_len = jnp.asarray(cond[0], jnp.float32), jnp.asarray(cond[1], jnp.int32)
      if (
        text.ndim != 3 or text.shape[-1] != self.module.text_dim or text_len.shape != text.shape[:1]
      ):
        raise ValueError(
          f"text {text.shape} / text_len {text_len.shape} must be [B, T, {self.module.text_dim}] / [B]"
        )
      c = (None, text, text_len)
    knobs = (
      jnp.float32(s["cfg"]),
      jnp.float32(s["tau"]),
      jnp.int32(s["top_k"]),
      jnp.float32(s["top_p"]),
    )
    return self._sample_jit(params, c, rng, knobs, return_logits=bool(s["return_logits"]))


# Official `tools/run_infinity.py` defaults: cfg 3, tau 1, top-k 900 (a no-op on 2 logits),
# top-p 0.97 (scripts/infer.sh uses cfg 4, tau 0.5).
SAMPLE_SETTINGS = dict(cfg=3.0, tau=1.0, top_k=900, top_p=0.97, return_logits=False)

build = InfinityFamily.build
