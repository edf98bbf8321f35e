"""RandAR: decoder-only AR visual generation in random orders (Pang et al., 2024), on the raster
spine.

A port of ziqipang/RandAR (`RandAR/model/randar_gpt.py`), a LlamaGen fork. Each training example
takes its tokens in a random permutation `order` (`model.order = "random"`); before every image
token a **position instruction** token says which grid position comes next: one learned vector
(`pos_instruct_embeddings`, [1, C]) split into heads and turned by the 2D RoPE of the target
position. The input slots (class prefix P = 1):

    slot   0       1     2     3     4    ...  2i+1   2i+2
    holds  class   q_0   x_0   q_1   x_1  ...  q_i    x_i

with x_i the i-th token in decoding order, q_i its instruction; both turn with the RoPE of grid
position `order[i]`, the class slot with the prefix row. The mask is causal; the output at q_i
predicts x_i (the official model also feeds x_{N-1}, whose output it never reads).

Parallel decoding (official `generate`): step s asks for n_s tokens at once by feeding their
instructions q_a .. q_{a+n_s-1} side by side after the last known token (so q_{a+1} does not see
x_a); the next call re-feeds x_a, q_{a+1}, x_{a+1}, ..., x_{a+n_s-1} at their final slots (over
the cached queries) and then its own queries. The counts follow the official cosine rule
(`orders.randar_schedule`: 88 calls for 256 tokens). Guidance ramps linearly with the decoded
fraction, `cfg_start + (cfg - cfg_start) a / N` (official `--cfg-scales 1.0,4.0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arvision.models.raster import (
  RasterFamily,
  RasterTransformer,
  apply_rope,
  draw_per_token,
  find_multiple,
  normal_init,
  write_window,
)
from arvision.ops import masks
from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches
from arvision.sampling.topk import filter_top_k_top_p


class RandARTransformer(RasterTransformer):
  """LlamaGen's transformer plus the position instruction vector."""

  def setup(self):
    super().setup()
    self.pos_instruct_embeddings = self.param(
      "pos_instruct_embeddings", normal_init(self.init_std, (None, "embed")), (1, self.dim)
    )

  def instructions(self, order) -> jax.Array:
    """`[B, L, C]` position instruction tokens for grid positions `order` (int `[B, L]`)."""
    B, L = order.shape
    H = self.n_head
    x = jnp.broadcast_to(
      self.pos_instruct_embeddings.reshape(1, 1, H, -1), (B, L, H, self.head_dim)
    )
    rope = jnp.asarray(self.rope_table())[self.prefix + order]  # [B, L, hd/2, 2]
    return apply_rope(x.astype(jnp.float32), rope).reshape(B, L, self.dim)

  def interleaved(self, label_B, tokens_BxN, order_BxN, train=False) -> tuple:
    """Embeddings `[B, 2N, C]` of `class, q_0, x_0, ..., q_{N-1}` and their RoPE rows."""
    B, N = tokens_BxN.shape
    q = self.instructions(order_BxN)
    x = self.embed_tokens(tokens_BxN).astype(q.dtype)
    x = self.token_drop(x, deterministic=not train)  # official: dropout on the image tokens
    qx = jnp.stack([q, x], axis=2).reshape(B, 2 * N, -1)[:, :-1]
    h = jnp.concatenate([self.embed_cond(label_B, train).astype(q.dtype), qx], axis=1)
    rows = jnp.repeat(self.prefix + order_BxN, 2, axis=1)[:, :-1]
    rows = jnp.concatenate([jnp.zeros((B, 1), rows.dtype), rows], axis=1)
    return h, rows

  def __call__(self, label_B, tokens_BxN, order_BxN, *, train=False):
    """Teacher-forced logits `[B, N, V]` of tokens in decoding order `order_BxN` (`[B, N]`)."""
    N = self.num_tokens
    if tokens_BxN.shape[1] != N:
      raise ValueError(f"tokens {tokens_BxN.shape} != [B, {N}] (grid {self.grid_size}^2)")
    order_BxN = jnp.broadcast_to(jnp.asarray(order_BxN, jnp.int32), tokens_BxN.shape)
    h, rows = self.interleaved(label_B, tokens_BxN, order_BxN, train)
    # token dropout was applied to x only (above), as officially
    logits, _ = self.run(h, rows, mask=masks.causal(), deterministic=not train, drop_tokens=False)
    return logits[:, 1::2]


class RandARFamily(RasterFamily):
  """RandAR as a family: random orders, position instructions, official parallel decoding."""

  name = "randar"
  module_class = RandARTransformer

  def init_inputs(self) -> tuple:
    N = self.num_tokens
    return (
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, N), jnp.int32),
      jnp.arange(N, dtype=jnp.int32)[None],
    )

  def apply(self, params, label_B, tokens_BxN, rng=None, train=False, order=None, schedule=None):
    """Teacher-forced logits `[B, N, V]` of tokens in decoding order `order` (default: the model's
    order, raster when it is random)."""
    del schedule  # the teacher-forcing layout does not depend on it
    if order is None:
      order = self.order if self.order is not None else np.arange(self.num_tokens)
    order = jnp.broadcast_to(jnp.asarray(order, jnp.int32), tokens_BxN.shape)
    return self.apply_module(params, label_B, tokens_BxN, order, rng=rng, train=train)

  def cache_length(self, max_count: int = 1) -> int:
    return find_multiple(2 * self.num_tokens + 3 * max_count + 2, 8)

  def sample_tokens(self, params, labels, rng, *, cfg_start=1.0, **kw):
    """As `RasterFamily.sample_tokens` with RandAR's decoding: `schedule` is one count per model
    call (default `model.schedule`, e.g. `randar`: `orders.randar_schedule(N, schedule_steps)`);
    guidance ramps from `cfg_start` to `cfg` (official `--cfg-scales 1.0,4.0`); plain decoding
    only; `cfg_interval` does not apply."""
    if kw.get("decode", "plain") != "plain":
      raise ValueError(
        f"family 'randar' has its own parallel decoding; decode={kw['decode']!r} is for raster"
      )
    if kw.get("cfg_interval", -1) != -1:
      raise ValueError("family 'randar' ramps guidance with cfg_start; cfg_interval does not apply")
    kw.pop("cfg_interval", None)
    # `cfg_interval` carries cfg_start into the jitted sampler (it has no other use here)
    return super().sample_tokens(params, labels, rng, cfg_interval=cfg_start, **kw)

  def _sample_impl(
    self,
    params,
    labels,
    rng,
    cfg,
    cfg_start,
    temperature,
    top_k,
    top_p,
    known,
    known_mask,
    order,
    lantern_delta,
    *,
    schedule,
    return_logits,
    decode="plain",
    window=0,
    lantern_k=0,
  ):
    del lantern_delta, decode, window, lantern_k
    mod, var = self.module, self._vars(params)
    B, N, V = labels.shape[0], self.num_tokens, mod.vocab_size
    counts = np.asarray(schedule, np.int32)
    S, K = len(counts), int(counts.max())
    W = 3 * K - 1  # widest call: 2 n' - 1 re-fed slots + n queries
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    inv_temp = 1.0 / jnp.maximum(temperature, 1e-5)
    top_p = jnp.where(top_p < 1.0, top_p, 0.0)
    labels_2B = self.labels_2B(labels)
    mask = masks.causal()
    caches = init_kv_caches(mod.n_layer, 2 * B, self.cache_length(K), mod.kv_heads, mod.head_dim)
    order_2B = jnp.pad(jnp.concatenate([order, order]), ((0, 0), (0, K)))
    known = jnp.pad(known, ((0, 0), (0, K)))
    known_mask = jnp.pad(known_mask, ((0, 0), (0, K)))
    instr = mod.apply(var, order_2B, method=RandARTransformer.instructions)  # [2B, N + K, C]

    def pick(a, n, hidden_2BxKxC, seq, out_logits):
      logits_2B = mod.apply(var, hidden_2BxKxC, method="logits")
      scale = cfg_start + (cfg - cfg_start) * a.astype(jnp.float32) / N  # official: per step
      logits = guidance.guide(logits_2B[:B], logits_2B[B:], scale, active=cfg > 1.0)
      filtered = filter_top_k_top_p(logits * inv_temp, top_k, top_p)
      tt = a + jnp.arange(K)
      tok = draw_per_token(rng, tt, filtered)
      return write_window(seq, out_logits, a, n, tok, logits, known, known_mask, return_logits)

    # prefill: class token and q_0 at slots 0, 1
    cls = mod.apply(var, labels_2B, method=RasterTransformer.embed_cond)
    h = jnp.concatenate([cls.astype(instr.dtype), instr[:, :1]], axis=1)
    rows = jnp.concatenate([jnp.zeros((2 * B, 1), jnp.int32), mod.prefix + order_2B[:, :1]], 1)
    hidden, caches = mod.apply(var, h, caches, 0, rows, mask, method="step")
    seq = jnp.zeros((B, N + K), jnp.int32)
    out_logits = jnp.zeros((B, N + K, V) if return_logits else (0,), jnp.float32)
    hidden = jnp.pad(hidden[:, 1:], ((0, 0), (0, K - 1), (0, 0)))
    seq, out_logits = pick(jnp.int32(0), 1, hidden, seq, out_logits)
    starts_j, counts_j = jnp.asarray(starts), jnp.asarray(counts)
    i = jnp.arange(W)

    def body(s, carry):
      seq, caches, out_logits = carry
      a_prev, n_prev, a, n = starts_j[s - 1], counts_j[s - 1], starts_j[s], counts_j[s]
      # slot i: final-layout slot 2 a' + 2 + i (x then q alternating) for i < 2 n' - 1, then
      # the queries of this step's tokens a, a + 1, ...
      refed = i < 2 * n_prev - 1
      tok_idx = jnp.where(refed, a_prev + (i + 1) // 2, a + i - (2 * n_prev - 1))
      is_x = refed & (i % 2 == 0)
      tok_idx = jnp.clip(tok_idx, 0, N + K - 1)
      seq_2B = jnp.concatenate([seq, seq])
      x = mod.apply(var, jnp.take(seq_2B, tok_idx, axis=1), method="embed_tokens")
      q = jnp.take(instr, tok_idx, axis=1)
      h = jnp.where(is_x[None, :, None], x.astype(q.dtype), q)
      rows = mod.prefix + jnp.take(order_2B, tok_idx, axis=1)
      hidden, caches = mod.apply(var, h, caches, 2 * a_prev + 2, rows, mask, method="step")
      read = jax.lax.dynamic_slice_in_dim(hidden, 2 * n_prev - 1, K, axis=1)
      seq, out_logits = pick(a, n, read, seq, out_logits)
      return seq, caches, out_logits

    seq, _, out_logits = jax.lax.fori_loop(1, S, body, (seq, caches, out_logits))
    seq = seq[:, :N]
    images, grid = self._to_images(params, seq, order)
    calls_B = jnp.full((B,), S, jnp.int32)
    return images, grid, (out_logits[:, :N] if return_logits else None), calls_B


build = RandARFamily.build
