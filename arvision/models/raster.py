"""Raster next-token prediction: LlamaGen's class-conditional Llama over VQ codes (Sun et al., 2024).

A port of the official `autoregressive/models/gpt.py` (FoundationVision/LlamaGen): RMSNorm,
SwiGLU, fused `wqkv` with optional grouped-query attention, 2D RoPE, a class token prefix and a
zero-initialised head. Training is teacher forcing under a causal mask; sampling decodes one token
per step (or a schedule's k) with a static preallocated KV cache inside ONE jitted `fori_loop`.

Parameter names (flax) -> official keys: `tok_embeddings` (`embedding` = weight),
`cls_embedding/embedding_table`, `layers_{i}/{attention/{wqkv,wo}, feed_forward/{w1,w2,w3},
attention_norm, ffn_norm}` (RMSNorm `scale` = weight), `norm`, `output`. Dense kernels are the
transposed torch weights.

2D RoPE (official `precompute_freqs_cis_2d`): head_dim/4 frequencies; the first head_dim/4
rotation pairs turn with the token's grid row, the next head_dim/4 with its column; pairs are
interleaved `(x[2k], x[2k+1])`. The class prefix rows of the official table are ZERO (cos = sin =
0), which zeroes the prefix's q and k: official checkpoints were trained that way, so it is the
default (`rope_prefix="zero"`); `rope_prefix="identity"` (cos 1, sin 0) is the corrected variant.

Decoding order and parallel schedule are data (`arvision/sampling/orders.py`): `order` is a
permutation of the grid positions per example (`model.order`: raster = identity, random = RandAR,
regions = PAR) and `schedule` the tokens per step (`model.schedule`); sequence slot t holds grid
position `order[t]`, RoPE rows follow the grid position, and k tokens per step are an input mask
(block-causal over steps) plus the slots the tokens are read at, not new models or samplers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from arvision import precision
from arvision.models import scan_layers
from arvision.models.common import Dense, param_count, top1_correct  # noqa: F401
from arvision.models.generator import Generator
from arvision.models.layers import drop_path, drop_path_rates
from arvision.ops import masks
from arvision.ops.attention import attention
from arvision.parallel.logical import constrain, param_init
from arvision.precision import current_dtype
from arvision.sampling import guidance, orders, speculative
from arvision.sampling.kv_cache import KVCache, init_kv_caches, update_kv_cache
from arvision.sampling.topk import filter_top_k_top_p

ROPE_PREFIX = ("zero", "identity")
ACT = ("batch", "seq", "embed")


def find_multiple(n: int, k: int) -> int:
  """The smallest multiple of `k` that is >= n (official `find_multiple`)."""
  return n if n % k == 0 else n + k - n % k


def ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
  """SwiGLU hidden size: find_multiple(int(multiplier * int(2 * 4 * dim / 3)), multiple_of)."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return find_multiple(hidden, multiple_of)


def rope_2d_table(
  grid_size: int, head_dim: int, base: float = 10000.0, prefix: int = 1, prefix_rows: str = "zero"
) -> np.ndarray:
  """float32 `[prefix + grid_size**2, head_dim // 2, 2]` (cos, sin) rows, official layout.

  Row `prefix + r * grid_size + c` rotates pair k < head_dim/4 by `r * f_k` and pair
  head_dim/4 + k by `c * f_k`, f_k = base ** (-2k / (head_dim / 2)). The prefix rows are zero
  (official) or the identity rotation (`prefix_rows="identity"`).
  """
  if prefix_rows not in ROPE_PREFIX:
    raise ValueError(f"rope prefix rows {prefix_rows!r} unknown; accepted: {ROPE_PREFIX}")
  half = head_dim // 2
  exps = np.arange(0, half, 2)[: half // 2].astype(np.float32)
  if head_dim % 2 or 2 * len(exps) != half:
    raise ValueError(
      f"2D RoPE needs head_dim divisible by 4 (two axes of interleaved pairs), got {head_dim}"
    )
  freqs = (1.0 / (np.float32(base) ** (exps / np.float32(half)))).astype(np.float32)
  t = np.arange(grid_size, dtype=np.float32)
  f = np.outer(t, freqs)  # [g, hd/4]
  g = grid_size
  grid = np.concatenate(
    [
      np.broadcast_to(f[:, None, :], (g, g, len(freqs))),
      np.broadcast_to(f[None], (g, g, len(freqs))),
    ],
    axis=-1,
  )  # [g, g, hd/2]: rows then columns
  cache = np.stack([np.cos(grid), np.sin(grid)], axis=-1).reshape(g * g, half, 2)
  pre = np.zeros((prefix, half, 2), np.float32)
  if prefix_rows == "identity":
    pre[..., 0] = 1.0
  return np.concatenate([pre, cache.astype(np.float32)], axis=0)


def apply_rope(x_BxLxHxD: jax.Array, rope: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of `x` by `rope` ([L, D/2, 2] or [B, L, D/2, 2]); float32 math."""
  B, L, H, D = x_BxLxHxD.shape
  xs = x_BxLxHxD.astype(jnp.float32).reshape(B, L, H, D // 2, 2)
  rope = rope.reshape(-1, L, 1, D // 2, 2)
  cos, sin = rope[..., 0], rope[..., 1]
  x0, x1 = xs[..., 0], xs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(B, L, H, D).astype(x_BxLxHxD.dtype)


def normal_init(std: float, names):
  return param_init(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, times `scale` (official `weight`)."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("scale", param_init(nn.initializers.ones, ("norm",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * w.astype(x.dtype)


class FeedForward(nn.Module):
  """SwiGLU: dropout(w2(silu(w1 x) * w3 x)), no biases."""

  hidden: int
  init_std: float = 0.02
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    C = x.shape[-1]
    up = normal_init(self.init_std, ("embed", "mlp"))
    dtype = current_dtype()
    w1 = Dense(self.hidden, use_bias=False, kernel_init=up, name="w1", dtype=dtype)
    w3 = Dense(self.hidden, use_bias=False, kernel_init=up, name="w3", dtype=dtype)
    down = normal_init(self.init_std, ("mlp", "embed"))
    w2 = Dense(C, use_bias=False, kernel_init=down, name="w2", dtype=dtype)
    h = constrain(nn.silu(w1(x)) * w3(x), ("batch", "seq", "mlp"))
    return nn.Dropout(self.dropout)(w2(h), deterministic=deterministic)


class Attention(nn.Module):
  """Fused `wqkv` (q: H heads, k/v: Hkv heads), RoPE on q and k, causal SDPA, `wo`, dropout."""

  n_head: int
  n_kv_head: int
  init_std: float = 0.02
  resid_dropout: float = 0.0
  attn_impl: str = "auto"

  @nn.compact
  def __call__(
    self,
    x_BxLxC: jax.Array,
    rope: jax.Array,
    *,
    mask: masks.MaskSpec,
    deterministic: bool = True,
    cache: KVCache | None = None,
    cache_index: Any = 0,
  ) -> tuple[jax.Array, KVCache | None]:
    B, L, C = x_BxLxC.shape
    H, Hkv = self.n_head, self.n_kv_head
    hd = C // H
    qkv = Dense(
      (H + 2 * Hkv) * hd,
      use_bias=False,
      kernel_init=normal_init(self.init_std, ("embed", "heads")),
      name="wqkv",
      dtype=current_dtype(),
    )(x_BxLxC)
    q = qkv[..., : H * hd].reshape(B, L, H, hd)
    k = qkv[..., H * hd : (H + Hkv) * hd].reshape(B, L, Hkv, hd)
    v = qkv[..., (H + Hkv) * hd :].reshape(B, L, Hkv, hd)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    new_cache = None
    if cache is not None:
      # Attend over the whole static cache: positions past the query are masked (never written).
      new_cache = update_kv_cache(cache, k, v, cache_index)
      k, v = new_cache[0].astype(q.dtype), new_cache[1].astype(q.dtype)
    out = attention(q, k, v, mask=mask, impl=self.attn_impl, q_offset=cache_index)
    out = Dense(
      C,
      use_bias=False,
      kernel_init=normal_init(self.init_std, ("heads", "embed")),
      name="wo",
      dtype=current_dtype(),
    )(out.reshape(B, L, C))
    return nn.Dropout(self.resid_dropout)(out, deterministic=deterministic), new_cache


class TransformerBlock(nn.Module):
  """Pre-norm Llama block: h = x + attn(norm(x)); out = h + ffn(norm(h)) (with drop path)."""

  n_head: int
  n_kv_head: int
  hidden: int
  norm_eps: float = 1e-5
  init_std: float = 0.02
  resid_dropout: float = 0.0
  ffn_dropout: float = 0.0
  drop_path_rate: float = 0.0
  attn_impl: str = "auto"

  @nn.compact
  def __call__(
    self, x, rope, *, mask, deterministic=True, cache=None, cache_index=0, layer_drop_path=None
  ) -> tuple[jax.Array, KVCache | None]:
    """`layer_drop_path`: this layer's drop-path rate, traced (scanned blocks, whose attribute
    `drop_path_rate` is then the largest rate and decides whether rngs are drawn)."""
    h, new_cache = Attention(
      self.n_head,
      self.n_kv_head,
      init_std=self.init_std,
      resid_dropout=self.resid_dropout,
      attn_impl=self.attn_impl,
      name="attention",
    )(
      RMSNorm(self.norm_eps, name="attention_norm")(x),
      rope,
      mask=mask,
      deterministic=deterministic,
      cache=cache,
      cache_index=cache_index,
    )
    dp = not deterministic and self.drop_path_rate > 0
    rate = layer_drop_path if dp and layer_drop_path is not None else self.drop_path_rate
    x = x + drop_path(h, rate, self.make_rng("dropout") if dp else None, not dp)
    h = FeedForward(self.hidden, self.init_std, self.ffn_dropout, name="feed_forward")(
      RMSNorm(self.norm_eps, name="ffn_norm")(x), deterministic=deterministic
    )
    x = x + drop_path(h, rate, self.make_rng("dropout") if dp else None, not dp)
    return constrain(x, ACT), new_cache


class LabelEmbedder(nn.Module):
  """Class embedding with a null class (`num_classes`) and label dropout for CFG."""

  num_classes: int
  dim: int
  dropout_prob: float = 0.1
  init_std: float = 0.02

  @nn.compact
  def __call__(self, label_B: jax.Array, train: bool = False) -> jax.Array:
    if train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), label_B.shape) < self.dropout_prob
      label_B = jnp.where(drop, self.num_classes, label_B)
    table = nn.Embed(
      self.num_classes + 1,
      self.dim,
      embedding_init=normal_init(self.init_std, ("classes", "embed")),
      name="embedding_table",
      dtype=current_dtype(),
    )
    return table(label_B)[:, None, :]


class RasterTransformer(nn.Module):
  """LlamaGen's c2i `Transformer` (one class token prefix), pure linen.

  Attributes:
    dim, n_layer, n_head: width, depth, query heads.
    n_kv_head: key/value heads (GQA); 0 = n_head.
    vocab_size: tokenizer codebook size.
    num_classes: classes; index `num_classes` is the null (CFG) class.
    grid_size: side of the token grid (block_size = grid_size**2).
    multiple_of, ffn_dim_multiplier: SwiGLU hidden-size rule.
    rope_base: RoPE base.
    rope_prefix: "zero" (official: the prefix's q/k are zeroed) or "identity".
    norm_eps: RMSNorm epsilon.
    init_std: normal std of Dense and Embed inits (`initializer_range`).
    token_dropout, resid_dropout, ffn_dropout, drop_path_rate: regularisation (train only).
    cond_drop_rate: probability of the null class in training.
    attn_impl: implementation for `arvision.ops.attention`.
    scan_layers: the blocks as one `nn.scan` over params `layers` stacked along a leading layer
      axis (`models.scan_layers`; KV caches stacked likewise) instead of `layers_{i}`.
  """

  dim: int
  n_layer: int
  n_head: int
  vocab_size: int
  num_classes: int
  grid_size: int
  n_kv_head: int = 0
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  rope_base: float = 10000.0
  rope_prefix: str = "zero"
  norm_eps: float = 1e-5
  init_std: float = 0.02
  token_dropout: float = 0.1
  resid_dropout: float = 0.1
  ffn_dropout: float = 0.1
  drop_path_rate: float = 0.0
  cond_drop_rate: float = 0.1
  attn_impl: str = "auto"
  scan_layers: bool = False

  prefix = 1  # class tokens (official cls_token_num for c2i)

  @property
  def kv_heads(self) -> int:
    return self.n_kv_head or self.n_head

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def num_tokens(self) -> int:
    return self.grid_size * self.grid_size

  def num_blocks(self) -> int:
    """Transformer blocks built by `setup` (a successor with extra blocks overrides it)."""
    return self.n_layer

  def rope_table(self) -> np.ndarray:
    return rope_2d_table(
      self.grid_size, self.head_dim, self.rope_base, self.prefix, self.rope_prefix
    )

  def setup(self):
    std = self.init_std
    self.tok_embeddings = nn.Embed(
      self.vocab_size,
      self.dim,
      embedding_init=normal_init(std, ("vocab", "embed")),
      dtype=current_dtype(),
    )
    self.cls_embedding = LabelEmbedder(self.num_classes, self.dim, self.cond_drop_rate, std)
    hidden = ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)
    dpr = drop_path_rates(self.drop_path_rate, self.num_blocks())
    block = dict(
      norm_eps=self.norm_eps,
      init_std=std,
      resid_dropout=self.resid_dropout,
      ffn_dropout=self.ffn_dropout,
      attn_impl=self.attn_impl,
    )
    if self.scan_layers:  # one block whose params stack all layers; the rates are scanned inputs
      self.layers = TransformerBlock(
        self.n_head, self.kv_heads, hidden, drop_path_rate=max(dpr), **block
      )
    else:
      self.layers = [
        TransformerBlock(self.n_head, self.kv_heads, hidden, drop_path_rate=dpr[i], **block)
        for i in range(self.num_blocks())
      ]
    self.norm = RMSNorm(self.norm_eps)
    self.output = Dense(
      self.vocab_size,
      use_bias=False,
      kernel_init=param_init(nn.initializers.zeros, ("embed", "vocab")),
    )
    self.token_drop = nn.Dropout(self.token_dropout)

  def embed_cond(self, label_B: jax.Array, train: bool = False) -> jax.Array:
    """`[B, prefix, C]` class tokens (label dropout when training)."""
    return self.cls_embedding(label_B, train=train)

  def embed_tokens(self, idx_BxL: jax.Array) -> jax.Array:
    return self.tok_embeddings(idx_BxL)

  def run(
    self,
    h,
    rope_rows,
    *,
    mask,
    deterministic=True,
    caches=None,
    cache_index=0,
    head=True,
    drop_tokens=True,
  ):
    """Blocks + norm (+ head) over embeddings `h [B, L, C]`; `rope_rows` index the RoPE table.
    `drop_tokens=False`: no token dropout here (a successor that drops only some slots).

    Returns `(float32 logits [B, L, V], or the normed hidden [B, L, C] without head; new caches or
    None)`.
    """
    rope = jnp.asarray(self.rope_table())[rope_rows]
    if drop_tokens:
      h = self.token_drop(h, deterministic=deterministic)
    h = constrain(h, ACT)
    if self.scan_layers:  # caches: one (k, v) pair stacked over layers (`stack_caches`)
      # cache_index is closed over: an int stays static (a traced one is a constant of the scan).
      def layer(block, h, xs, rope):
        rate, cache = xs
        return block(
          h,
          rope,
          mask=mask,
          deterministic=deterministic,
          cache=cache,
          cache_index=cache_index,
          layer_drop_path=rate,
        )

      depth = self.num_blocks()
      rates = jnp.asarray(drop_path_rates(self.drop_path_rate, depth), jnp.float32)
      h, new_caches = scan_layers.scan_blocks(self.layers, depth, layer, h, (rates, caches), rope)
      h = self.norm(h)
      return (self.logits(h) if head else h), new_caches
    new_caches = [] if caches is not None else None
    for i, layer in enumerate(self.layers):
      cache = caches[i] if caches is not None else None
      h, cache = precision.block(
        layer,
        h,
        rope,
        mask=mask,
        deterministic=deterministic,
        cache=cache,
        cache_index=cache_index,
      )
      if caches is not None:
        new_caches.append(cache)
    h = self.norm(h)
    return (self.logits(h) if head else h), new_caches

  def logits(self, hidden_BxLxC: jax.Array) -> jax.Array:
    """The head on normed hidden states: float32 logits `[B, L, V]`."""
    # The head runs in float32 whatever the compute dtype (fp32 logits for the loss/sampler).
    logits = self.output(hidden_BxLxC.astype(jnp.float32)).astype(jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))

  def __call__(self, label_B, idx_BxLm1, rope_rows=None, mask=None, query=None, *, train=False):
    """Teacher-forced logits `[B, N, V]`: class prefix + tokens[:-1] predicts tokens.

    Args:
      label_B: int labels in [0, num_classes] (num_classes = null class).
      idx_BxLm1: int tokens in decoding order without the last, `[B, N - 1]`.
      rope_rows: int `[N]` or `[B, N]` RoPE table rows of the inputs; default raster
        (`0 .. N - 1`: the prefix row, then grid positions 0 .. N - 2).
      train: dropouts and label dropout (needs a 'dropout' rng).
      mask: the input mask (`sampling.orders.input_mask`); default causal.
      query: int `[N]`, the input slot read for each token (`sampling.orders.query_slots`);
        default `P - 1 + t` (next-token prediction).
    """
    N = self.num_tokens
    if idx_BxLm1.shape[1] != N - 1:
      raise ValueError(f"input tokens {idx_BxLm1.shape} != [B, {N - 1}] (grid {self.grid_size}^2)")
    h = jnp.concatenate([self.embed_cond(label_B, train), self.embed_tokens(idx_BxLm1)], axis=1)
    if rope_rows is None:
      rope_rows = jnp.arange(N)
    mask = masks.causal() if mask is None else mask
    logits, _ = self.run(h, rope_rows, mask=mask, deterministic=not train)
    return logits[:, self.prefix - 1 :] if query is None else logits[:, query]

  def step(self, h_BxLxC, caches, cache_index, rope_rows, mask=None):
    """Cached decoding of `L` new positions at `cache_index`: normed hidden `[B, L, C]`."""
    mask = masks.causal() if mask is None else mask
    return self.run(
      h_BxLxC, rope_rows, mask=mask, caches=caches, cache_index=cache_index, head=False
    )


# ------------------------------------------------------------------------------------------------
# Decoding pieces the parallel-decoding families (nar, par, randar) share


def refuse_fixed_decoding(family: str, kw: dict, decodes: str) -> None:
  """A family with its own order and schedule refuses `order=`, `schedule=` and a `decode=` other
  than plain (`decodes`: what it decodes per call, for the message)."""
  for name in ("order", "schedule"):
    if kw.get(name) is not None:
      raise ValueError(f"family {family!r} has a fixed {name}; do not pass {name}=")
  if kw.get("decode", "plain") != "plain":
    raise ValueError(f"family {family!r} decodes {decodes}; decode={kw['decode']!r} is for "
                     "one-token-per-step models")  # fmt: skip


def draw_per_token(rng: jax.Array, t_K: jax.Array, filtered_BxKxV: jax.Array) -> jax.Array:
  """Tokens `[B, K]` for positions `t`, one key `fold_in(rng, t)` per position (the keys of
  sequential decoding)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(t_K)
  return jax.vmap(lambda kk, f: jax.random.categorical(kk, f, axis=-1), (0, 1), 1)(
    keys, filtered_BxKxV
  )


def write_window(seq, out_logits, a, k, tok_BxK, logits_BxKxV, known, known_mask, return_logits):
  """Writes the drawn tokens (the `known` ones where `known_mask`) and, with `return_logits`,
  their logits at positions `a .. a + k - 1`; the window's rows past `k` keep what is there."""
  K = tok_BxK.shape[1]
  win = lambda x: jax.lax.dynamic_slice_in_dim(x, a, K, axis=1)  # noqa: E731
  tok = jnp.where(win(known_mask), win(known), tok_BxK.astype(jnp.int32))
  valid = jnp.arange(K)[None, :] < k
  seq = jax.lax.dynamic_update_slice_in_dim(seq, jnp.where(valid, tok, win(seq)), a, axis=1)
  if return_logits:
    lg = jnp.where(valid[..., None], logits_BxKxV, win(out_logits))
    out_logits = jax.lax.dynamic_update_slice_in_dim(out_logits, lg, a, axis=1)
  return seq, out_logits


# ------------------------------------------------------------------------------------------------
# Family


class RasterFamily(Generator):
  """LlamaGen-style raster AR as a Family, on a frozen VQ tokenizer (`params["tokenizer"]`).

  The tokenizer family must provide `encode_idx` (int [B, h*w], row-major), `decode_idx`,
  `config.model.vocab_size` and `latent_size`.
  """

  name = "raster"
  accepts_scan_layers = True  # set on the class itself: a subclass must opt in (`Generator`)
  tokenizer_methods = ("encode_idx", "decode_idx")
  sampler_static = ("schedule", "return_logits", "decode", "window", "lantern_k")
  module_class = RasterTransformer  # successors with new parameters subclass it (models/par.py)

  def module_extra(self, model_config) -> dict:
    """Extra keyword arguments of `module_class` (successors' own fields)."""
    return {}

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    m = config.model
    dim, n_layer, n_head = int(m.dim), int(m.n_layer), int(m.n_head)
    if dim <= 0 or n_layer <= 0 or n_head <= 0:
      raise ValueError(f"model.dim={dim}, n_layer={n_layer}, n_head={n_head} must be positive")
    if dim % n_head:
      raise ValueError(f"model.dim={dim} is not divisible by model.n_head={n_head}")
    n_kv = int(m.get("n_kv_head", 0)) or n_head
    if n_head % n_kv:
      raise ValueError(f"model.n_kv_head={n_kv} must divide model.n_head={n_head}")
    rope_prefix = str(m.get("rope_prefix", "zero"))
    if rope_prefix not in ROPE_PREFIX:
      raise ValueError(f"model.rope_prefix={rope_prefix!r} unknown; accepted: {ROPE_PREFIX}")
    mult = float(m.get("ffn_dim_multiplier", 0.0))
    self.grid_size = int(tokenizer.latent_size)
    self.module = self.module_class(
      dim=dim,
      n_layer=n_layer,
      n_head=n_head,
      n_kv_head=n_kv,
      vocab_size=int(tokenizer.config.model.vocab_size),
      num_classes=self.num_classes,
      grid_size=self.grid_size,
      multiple_of=int(m.get("multiple_of", 256)),
      ffn_dim_multiplier=mult if mult > 0 else None,
      rope_base=float(m.get("rope_base", 10000.0)),
      rope_prefix=rope_prefix,
      norm_eps=float(m.get("norm_eps", 1e-5)),
      init_std=float(m.get("init_std", 0.02)),
      token_dropout=float(m.get("token_dropout", 0.1)),
      resid_dropout=float(m.get("resid_dropout", 0.1)),
      ffn_dropout=float(m.get("ffn_dropout", 0.1)),
      drop_path_rate=float(m.get("drop_path_rate", 0.0)),
      cond_drop_rate=float(m.get("cond_drop_rate", 0.1)),
      attn_impl=str(m.get("attn_impl", "auto")),
      **self.module_extra(m),
      scan_layers=scan_layers.enabled(config),
    )
    self.module.rope_table()  # fails now on a head dim that 2D RoPE cannot split
    self.num_tokens = self.module.num_tokens
    # Decoding order and schedule (arvision/sampling/orders.py): `order` is None for `random`
    # (drawn per example from the rng); the schedule is static (the mask and slots follow it).
    self.order_name = str(m.get("order", "raster"))
    regions = int(m.get("regions", 2))
    self.order = orders.static_order(self.order_name, self.grid_size, regions)
    steps = int(m.get("schedule_steps", 0))
    self.schedule = orders.check_schedule(
      orders.schedule(str(m.get("schedule", "one")), self.num_tokens, regions, steps),
      self.num_tokens,
    )

  def init_inputs(self) -> tuple:
    return jnp.zeros((1,), jnp.int32), jnp.zeros((1, self.num_tokens - 1), jnp.int32)

  # --- training ----------------------------------------------------------------------------------

  def apply(self, params, label_B, tokens_BxN, rng=None, train=False, order=None, schedule=None):
    """Teacher-forced logits `[B, N, V]` for tokens in decoding order.

    `order` (int `[N]` or `[B, N]`, default the model's) places the RoPE rows; `schedule` (counts,
    default the model's) sets the input mask and the slot read for each token.
    """
    counts = self.schedule if schedule is None else orders.check_schedule(schedule, self.num_tokens)
    P = self.module.prefix
    mask, query = None, None
    if any(k != 1 for k in counts):
      mask, query = orders.input_mask(counts, P), jnp.asarray(orders.query_slots(counts, P))
    order = orders.draw(self.order, None, 1, self.num_tokens) if order is None else order
    rows = orders.input_rope_rows(order, P)
    return self.apply_module(
      params, label_B, tokens_BxN[:, :-1], rows, mask, query, rng=rng, train=train
    )

  def codes(self, params, batch) -> jax.Array:
    """Raster grid codes int32 `[B, N]` from `batch["tokens"]` or the frozen tokenizer."""
    tokens = self.batch_tokens(batch, (self.num_tokens,), integer=True, what="raster codes")
    if tokens is not None:
      return tokens.astype(jnp.int32)
    idx = self.tokenizer.encode_idx(params["tokenizer"], batch["image"])
    return jax.lax.stop_gradient(idx).astype(jnp.int32)

  def loss(self, params, batch, rng, train: bool):
    """Mean token CE of teacher forcing (official); metrics `loss`, `acc`."""
    codes = self.codes(params, batch)
    # RandAR: a random order per example from its own stream of the loss rng (a fixed key without
    # one, so evaluation is deterministic); static orders ignore the key.
    key = jax.random.fold_in(jax.random.key(0) if rng is None else rng, 1)
    order = orders.draw(self.order, key, codes.shape[0], self.num_tokens)
    seq = jnp.take_along_axis(codes, jnp.broadcast_to(order, codes.shape), axis=1)
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    logits = self.apply(params, label, seq, rng=rng, train=train, order=order)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, seq)
    acc = jnp.mean(top1_correct(logits, seq))
    loss = jnp.mean(ce)
    return loss, {"loss": loss, "acc": acc}

  # --- sampling ----------------------------------------------------------------------------------

  def _init_caches(self, batch: int, length: int):
    """Zero KV caches: a list per layer, or one stacked `(k, v)` pair under scan_layers."""
    mod = self.module
    caches = init_kv_caches(mod.n_layer, batch, length, mod.kv_heads, mod.head_dim)
    return scan_layers.stack_caches(caches) if mod.scan_layers else caches

  def cache_length(self, max_count: int = 1) -> int:
    """Static KV cache length: prefix + N - 1 + the largest step's count, rounded up to a multiple
    of 8 (official: prefix + N for one token per step)."""
    return find_multiple(self.module.prefix + self.num_tokens - 1 + max_count, 8)

  def _sample_impl(
    self,
    params,
    labels,
    rng,
    cfg,
    cfg_interval,
    temperature,
    top_k,
    top_p,
    known,
    known_mask,
    order,
    lantern_delta,
    *,
    schedule: tuple[int, ...],
    return_logits: bool,
    decode: str = "plain",
    window: int = 0,
    lantern_k: int = 0,
  ):
    if decode != "plain":
      settings = (cfg, cfg_interval, temperature, top_k, top_p, lantern_delta)
      return self._sample_speculative(
        params, labels, rng, order, known, known_mask, settings, decode, window, lantern_k
      )
    mod, var = self.module, self._vars(params)
    B, N, P, V = labels.shape[0], self.num_tokens, mod.prefix, mod.vocab_size
    # Steps have different counts; each runs at the largest count K with the extra slots masked,
    # so the whole decode is one `fori_loop` with static shapes (an unrolled Python loop over the
    # schedule would compile S copies of the model). Extra fed slots sit at positions of later
    # steps, which the block-causal mask hides and the next step overwrites.
    K = max(schedule)
    starts, counts = jnp.asarray(orders.step_starts(schedule)), jnp.asarray(schedule)
    mask = orders.input_mask(schedule, P)
    labels_2B = self.labels_2B(labels)
    caches = self._init_caches(2 * B, self.cache_length(K))
    inv_temp = 1.0 / jnp.maximum(temperature, 1e-5)
    top_p = jnp.where(top_p < 1.0, top_p, 0.0)  # official: top-p only below 1
    pad = ((0, 0), (0, K))
    order_2B = jnp.pad(jnp.concatenate([order, order]), pad)
    known, known_mask = jnp.pad(known, pad), jnp.pad(known_mask, pad)

    def pick(a, k, logits_2BxKxV, seq, out_logits):
      """Tokens `a .. a + k - 1` from their logits (rows past k keep what is there)."""
      t = a + jnp.arange(K)
      # official: guided only for cfg > 1, and not past `cfg_interval`
      scale = guidance.interval(cfg, t, cfg_interval)[None, :, None]
      logits = guidance.guide(logits_2BxKxV[:B], logits_2BxKxV[B:], scale, active=scale > 1.0)
      filtered = filter_top_k_top_p(logits * inv_temp, top_k, top_p)
      if K == 1:
        tok = jax.random.categorical(jax.random.fold_in(rng, a), filtered[:, 0], axis=-1)[:, None]
      else:  # one key per token, as in sequential decoding
        tok = draw_per_token(rng, t, filtered)
      return write_window(seq, out_logits, a, k, tok, logits, known, known_mask, return_logits)

    # Normed hidden states of every fed slot: token t is read at slot P + t - k_s (orders.py).
    hbuf = jnp.zeros((2 * B, P + N + K, mod.dim), jnp.float32)
    h = mod.apply(var, labels_2B, method=RasterTransformer.embed_cond)
    hidden, caches = mod.apply(var, h, caches, 0, jnp.arange(P), mask, method="step")
    hbuf = jax.lax.dynamic_update_slice_in_dim(hbuf, hidden.astype(hbuf.dtype), 0, axis=1)
    seq = jnp.zeros((B, N + K), jnp.int32)
    out_logits = jnp.zeros((B, N + K, V) if return_logits else (0,), jnp.float32)

    def read(a, k, hbuf, seq, out_logits):
      q = jax.lax.dynamic_slice_in_dim(hbuf, P + a - k, K, axis=1).astype(hidden.dtype)
      return pick(a, k, mod.apply(var, q, method="logits"), seq, out_logits)

    seq, out_logits = read(0, counts[0], hbuf, seq, out_logits)

    def body(s, carry):
      seq, caches, hbuf, out_logits = carry
      a_fed, a = starts[s - 1], starts[s]
      fed = jax.lax.dynamic_slice_in_dim(seq, a_fed, K, axis=1)  # step s-1's tokens
      h = mod.apply(var, jnp.concatenate([fed, fed]), method="embed_tokens")
      rows = P + jax.lax.dynamic_slice_in_dim(order_2B, a_fed, K, axis=1)
      hidden, caches = mod.apply(var, h, caches, P + a_fed, rows, mask, method="step")
      hbuf = jax.lax.dynamic_update_slice_in_dim(hbuf, hidden.astype(hbuf.dtype), P + a_fed, 1)
      seq, out_logits = read(a, counts[s], hbuf, seq, out_logits)
      return seq, caches, hbuf, out_logits

    seq, _, _, out_logits = jax.lax.fori_loop(
      1, len(schedule), body, (seq, caches, hbuf, out_logits)
    )
    seq = seq[:, :N]
    images, grid = self._to_images(params, seq, order)
    calls_B = jnp.full((B,), len(schedule), jnp.int32)
    return images, grid, (out_logits[:, :N] if return_logits else None), calls_B

  def _to_images(self, params, seq_BxN, order_BxN):
    """Tokens in decoding order -> (uint8 images, raster grid codes), per example."""
    B = seq_BxN.shape[0]
    grid = jnp.zeros_like(seq_BxN).at[jnp.arange(B)[:, None], order_BxN].set(seq_BxN)
    return self.decode_images(params, grid, "decode_idx"), grid

  def _sample_speculative(
    self, params, labels, rng, order, known, known_mask, settings, decode, window, lantern_k
  ):
    """Speculative Jacobi decoding (`decode="sjd"`) or LANTERN's relaxed acceptance
    (`decode="lantern"`) of a one-token-per-step model; `sampling/speculative.py` has the rules.

    Each example runs its own `while_loop` (vmapped over the batch, so examples accept different
    counts): a model call feeds the last accepted token and W - 1 drafts at slots
    `P + n - 1 .. P + n + W - 2` of a static KV cache (n = tokens accepted), reads W
    distributions, accepts m drafts plus one drawn token and moves n by m + 1. Slots of rejected
    drafts stay in the cache but lie past the next call's first slot, which overwrites them; the
    causal mask hides what is not yet overwritten. A known token's distribution is a point mass
    on it, so it is accepted (or drawn) as is. Returns calls per example (prefill included).
    """
    cfg, cfg_interval, temperature, top_k, top_p, delta = settings
    mod, var = self.module, self._vars(params)
    B, N, P, V, W = labels.shape[0], self.num_tokens, mod.prefix, mod.vocab_size, window
    inv_temp = 1.0 / jnp.maximum(temperature, 1e-5)
    top_p = jnp.where(top_p < 1.0, top_p, 0.0)  # official: top-p only below 1
    mask = masks.causal()
    cache_len = self.cache_length(W)
    codebook = None
    if decode == "lantern":
      codebook = self.tokenizer.codebook(params["tokenizer"])

    def one(label, key, order_N, known_N, known_mask_N):
      order_p = jnp.pad(order_N, (0, W))  # rows of slots past N are never read
      known_p, known_mask_p = jnp.pad(known_N, (0, W)), jnp.pad(known_mask_N, (0, W))

      def dists(logits_2xKxV, t0):
        """Sampling distributions `[K, V]` of tokens t0.. (guidance, temperature, top-k/p)."""
        K = logits_2xKxV.shape[1]
        t = t0 + jnp.arange(K)
        scale = guidance.interval(cfg, t, cfg_interval)[:, None]
        logits = guidance.guide(logits_2xKxV[0], logits_2xKxV[1], scale, active=scale > 1.0)
        p = jax.nn.softmax(filter_top_k_top_p(logits * inv_temp, top_k, top_p), axis=-1)
        kn = jax.lax.dynamic_slice_in_dim(known_p, t0, K)
        forced = jax.lax.dynamic_slice_in_dim(known_mask_p, t0, K)[:, None]
        return jnp.where(forced, jax.nn.one_hot(kn, V, dtype=p.dtype), p)

      labels_2 = jnp.stack([label, jnp.int32(self.num_classes)])
      caches = self._init_caches(2, cache_len)
      h = mod.apply(var, labels_2, method=RasterTransformer.embed_cond)
      hidden, caches = mod.apply(var, h, caches, 0, jnp.arange(P), mask, method="step")
      p0 = dists(mod.apply(var, hidden[:, P - 1 :], method="logits"), 0)[0]
      k0, k_init = jax.random.split(jax.random.fold_in(key, 0))
      seq = jnp.zeros((N + W,), jnp.int32).at[0].set(speculative.categorical(k0, p0))
      drafts = jax.random.randint(k_init, (W - 1,), 0, V, jnp.int32)  # SJD's random init
      q = jax.nn.one_hot(drafts, V, dtype=jnp.float32)

      def body(state):
        n, seq, drafts, q, caches, calls = state
        k_u, k_tok, k_fresh, k_init = jax.random.split(jax.random.fold_in(key, calls), 4)
        inp = jnp.concatenate([jax.lax.dynamic_slice_in_dim(seq, n - 1, 1), drafts])
        h = mod.apply(var, jnp.stack([inp, inp]), method="embed_tokens")
        rows = P + jax.lax.dynamic_slice_in_dim(order_p, n - 1, W)
        hidden, caches = mod.apply(var, h, caches, P + n - 1, rows, mask, method="step")
        p = dists(mod.apply(var, hidden, method="logits"), n)  # [W, V]: tokens n .. n + W - 1
        target = p[: W - 1]
        if decode == "lantern":
          nbr = speculative.nearest_codes(codebook, drafts, lantern_k)
          target = speculative.lantern_relax(target, drafts, nbr, delta)
        u = jax.random.uniform(k_u, (W - 1,))
        m, res = speculative.accept_drafts(target, q, drafts, u)
        # token n + m: the residual at the first rejection, or the last distribution (all passed)
        tok = speculative.categorical(k_tok, jnp.concatenate([res, p[W - 1 :]])[m])
        j = jnp.arange(W)
        new = jnp.where(j < m, jnp.pad(drafts, (0, 1)), tok)
        old = jax.lax.dynamic_slice_in_dim(seq, n, W)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, jnp.where(j <= m, new, old), n, axis=0)
        # next drafts (tokens n + m + 1 ..): this call's distributions past m (Jacobi update),
        # then random tokens for positions no call has scored yet
        src = m + 1 + jnp.arange(W - 1)
        seen = src < W
        src = jnp.minimum(src, W - 1)
        fresh = speculative.categorical(k_fresh, p)[src]
        init = jax.random.randint(k_init, (W - 1,), 0, V, jnp.int32)
        drafts = jnp.where(seen, fresh, init)
        q = jnp.where(seen[:, None], p[src], jax.nn.one_hot(init, V, dtype=jnp.float32))
        return n + m + 1, seq, drafts, q, caches, calls + 1

      state = (jnp.int32(1), seq, drafts, q, caches, jnp.int32(1))
      _, seq, _, _, _, calls = jax.lax.while_loop(lambda s: s[0] < N, body, state)
      return seq[:N], calls

    keys = jax.random.split(jax.random.fold_in(rng, N + 1), B)
    seq, calls_B = jax.vmap(one)(labels.astype(jnp.int32), keys, order, known, known_mask)
    images, grid = self._to_images(params, seq, order)
    return images, grid, None, calls_B

  def sample_tokens(
    self,
    params,
    labels,
    rng,
    *,
    cfg=2.0,
    cfg_interval=-1,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    known=None,
    known_mask=None,
    order=None,
    schedule=None,
    return_logits=False,
    decode="plain",
    window=16,
    lantern_k=1000,
    lantern_delta=0.1,
    return_stats=False,
  ):
    """Samples images and their raster codes.

    Args:
      params: transformer params plus `params["tokenizer"]`.
      labels: int `[B]` class labels (`num_classes` = unconditional).
      rng: a jax PRNG key; the result is a deterministic function of it.
      cfg: guidance scale; logits = uncond + (cond - uncond) * cfg when cfg > 1 (else cond).
      cfg_interval: > -1 turns guidance off for tokens t > cfg_interval + 1 (official).
      temperature: logits / max(temperature, 1e-5) before filtering.
      top_k: keep the k largest logits (0 = off).
      top_p: nucleus threshold (< 1 enables it).
      known, known_mask: optional int `[B, N]` tokens and bool mask in DECODING order; masked
        slots are teacher-forced (completion/editing; tests use it to check the cache).
      order: int `[N]` or `[B, N]` decoding order (a permutation of the grid positions per
        example; traced: new values do not recompile). Default: the model's (`model.order`;
        `random` draws one per example from `fold_in(rng, N)`).
      schedule: tokens per step, a tuple of counts summing to N (static: one compilation per
        schedule; see `sampling/orders.py`). Default: the model's (`model.schedule`).
      return_logits: also return the guided logits `[B, N, V]` (before temperature/filtering).
      decode: `plain` (the schedule's steps), `sjd` (speculative Jacobi decoding: a window of
        drafts per model call, the speculative acceptance test; same distribution as plain) or
        `lantern` (SJD with LANTERN's relaxed test; not the same distribution: within a
        total-variation budget per token). Training-free; needs a one-token-per-step schedule.
        See `sampling/speculative.py`. Static (one compilation per decode/window/lantern_k).
      window: tokens per model call of `sjd`/`lantern` (the last accepted one + window - 1
        drafts; official SJD: 16).
      lantern_k: neighbours (in the tokenizer's codebook) pooled by `lantern`, capped at V - 1
        (official 1000).
      lantern_delta: `lantern`'s total-variation budget in [0, 1] (official 0.1; 0 = `sjd`).
      return_stats: also return `{"calls": int [B] model calls per image (the prefill included),
        "tokens_per_call": float [B]}`.

    Returns:
      `(images uint8 [B, H, W, C], codes int32 [B, N] raster, logits or None)`, plus the stats
      dict when `return_stats`.
    """
    labels = self.check_labels(labels)
    B, N = labels.shape[0], self.num_tokens
    if (known is None) != (known_mask is None):
      raise ValueError("known and known_mask must be given together (or neither)")
    known = jnp.zeros((B, N), jnp.int32) if known is None else jnp.asarray(known, jnp.int32)
    known_mask = jnp.zeros((B, N), bool) if known_mask is None else jnp.asarray(known_mask, bool)
    if known.shape != (B, N) or known_mask.shape != (B, N):
      raise ValueError(
        f"known / known_mask must be [B={B}, N={N}]; got {known.shape} / {known_mask.shape}"
      )
    order = orders.draw(self.order, jax.random.fold_in(rng, N), B, N) if order is None else order
    order = jnp.asarray(order, jnp.int32)
    if order.shape not in ((N,), (B, N)):
      raise ValueError(f"order must be int [N={N}] or [B={B}, N={N}], got shape {order.shape}")
    schedule = self.schedule if schedule is None else orders.check_schedule(schedule, N)
    lantern_k = min(int(lantern_k), self.module.vocab_size - 1)
    speculative.check_decode(decode, window, lantern_k, lantern_delta)
    if decode != "plain":
      if any(k != 1 for k in schedule):
        raise ValueError(
          f"decode={decode!r} drafts one token per slot: it needs the one-token schedule, got "
          f"{len(schedule)} steps (model.schedule={self.config.model.get('schedule', 'one')!r})"
        )
      if return_logits:
        raise ValueError(f"return_logits is only available with decode='plain', not {decode!r}")
      if decode == "lantern" and not hasattr(self.tokenizer, "codebook"):
        raise ValueError(
          f"decode='lantern' needs the tokenizer's codebook; {type(self.tokenizer).__name__} has "
          "no `codebook(params)` method"
        )
    else:
      window, lantern_k = 0, 0  # unused: keep one compilation for plain decoding
    images, grid, logits, calls = self._sample_jit(
      params,
      labels,
      rng,
      jnp.float32(cfg),
      jnp.float32(cfg_interval),
      jnp.float32(temperature),
      jnp.int32(top_k),
      jnp.float32(top_p),
      known,
      known_mask,
      jnp.broadcast_to(order, (B, N)),
      jnp.float32(lantern_delta),
      schedule=schedule,
      return_logits=bool(return_logits),
      decode=decode,
      window=int(window),
      lantern_k=lantern_k,
    )
    if not return_stats:
      return images, grid, logits
    return images, grid, logits, dict(calls=calls, tokens_per_call=N / calls.astype(jnp.float32))


build = RasterFamily.build
