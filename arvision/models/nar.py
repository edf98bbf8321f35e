"""NAR: neighbouring autoregressive modelling (He et al., 2025), on the raster spine.

A port of ThisisBillhe/NAR (`NAR-images/autoregressive/models/gpt.py`, `generate.py`), a LlamaGen
fork. Tokens at the same Manhattan distance c = h + w from the top-left token (an anti-diagonal)
are generated together: 2H - 1 model calls for an H x H grid. The official **proximity mask**
lets a token see the class token and every token on its own or an earlier anti-diagonal. Two
**dimension-oriented heads** read each token's output: the main stack (`n_layer` blocks, `norm`,
`output`) predicts its right neighbour, the same stack continued through
`medusa_attention_num` more blocks (`medusa_norm`, `medusa_output`) the neighbour below. A
token's logits are the mean of the two predictions where both neighbours exist (the left one
gives "right", the upper one "below"), else the one that does; the first token's are the mean of
both heads on the class token.

Attention does not depend on the order of the keys, so the official raster slots are laid out
here in anti-diagonal order (`diagonal_order`: by c, then by row): slot 0 the class token, slot
1 + p the p-th token of that order, each turning with the RoPE of its own grid position; the
proximity mask becomes block-causal over the anti-diagonals (`masks.scale_causal((1, 1, 2, ...,
H, ..., 2, 1))`), so decoding feeds one anti-diagonal per call as a contiguous block of a static
KV cache. The model's decoding order is `diagonal_order` (teacher forcing and `sample_tokens`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision import precision
from arvision.models.raster import (
  ACT,
  RasterFamily,
  RasterTransformer,
  RMSNorm,
  draw_per_token,
  find_multiple,
  normal_init,
  refuse_fixed_decoding,
  write_window,
)
from arvision.ops import masks
from arvision.parallel.logical import constrain
from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches
from arvision.sampling.topk import filter_top_k_top_p


def diagonal_order(grid: int) -> np.ndarray:
  """int32 `[grid**2]`: raster positions by anti-diagonal c = h + w, then by row h."""
  h, w = np.divmod(np.arange(grid * grid), grid)
  return np.lexsort((h, h + w)).astype(np.int32)


def diagonal_lengths(grid: int) -> tuple[int, ...]:
  return tuple(min(c + 1, 2 * grid - 1 - c) for c in range(2 * grid - 1))


def proximity_mask(grid: int) -> masks.MaskSpec:
  """The official proximity mask over the slots (class, then anti-diagonal order)."""
  return masks.scale_causal((1,) + diagonal_lengths(grid))


def neighbour_slots(grid: int) -> tuple[np.ndarray, np.ndarray]:
  """int32 `[N]` each, per token in anti-diagonal order: the slot whose main head predicts it
  (its left neighbour; the class slot 0 for the first token) and the slot whose second head
  predicts it (its upper neighbour; 0 for the first token); -1 where there is none."""
  order = diagonal_order(grid)
  slot = np.empty(grid * grid, np.int32)
  slot[order] = 1 + np.arange(grid * grid)
  h, w = np.divmod(order, grid)
  right_of = np.where(w > 0, slot[np.maximum(order - 1, 0)], -1)
  below_of = np.where(h > 0, slot[np.maximum(order - grid, 0)], -1)
  right_of[0] = below_of[0] = 0
  return right_of.astype(np.int32), below_of.astype(np.int32)


def combine(right_V, below_V, has_right, has_below):
  """The official mix of the two heads' logits for one token."""
  both = (right_V + below_V) / 2
  return jnp.where(has_right & has_below, both, jnp.where(has_right, right_V, below_V))


class NARTransformer(RasterTransformer):
  """LlamaGen's transformer with NAR's second ("below") head on extra blocks."""

  medusa_attention_num: int = 1

  def num_blocks(self) -> int:
    return self.n_layer + self.medusa_attention_num

  def setup(self):
    super().setup()
    self.medusa_norm = RMSNorm(self.norm_eps)
    self.medusa_output = nn.Dense(
      self.vocab_size, use_bias=False, kernel_init=normal_init(self.init_std, ("embed", "vocab"))
    )

  def run_two(self, h, rope_rows, *, mask, deterministic=True, caches=None, cache_index=0):
    """All blocks over `h [B, L, C]`: `((normed main hidden, normed hidden after the extra
    blocks), new caches or None)`."""
    rope = jnp.asarray(self.rope_table())[rope_rows]
    h = constrain(self.token_drop(h, deterministic=deterministic), ACT)
    new_caches = [] if caches is not None else None
    main = h
    for i, layer in enumerate(self.layers):
      cache = caches[i] if caches is not None else None
      h, cache = precision.block(
        layer, h, rope, mask=mask, deterministic=deterministic, cache=cache, cache_index=cache_index
      )
      if caches is not None:
        new_caches.append(cache)
      if i == self.n_layer - 1:
        main = h
    return (self.norm(main), self.medusa_norm(h)), new_caches

  def heads(self, hidden_pair):
    """float32 logits `([B, L, V] right-neighbour, [B, L, V] below-neighbour)`."""
    main, below = hidden_pair
    right = self.logits(main)
    below = self.medusa_output(below.astype(jnp.float32)).astype(jnp.float32)
    return right, constrain(below, ("batch", "seq", "vocab"))

  def step_two(self, h, caches, cache_index, rope_rows, mask):
    return self.run_two(h, rope_rows, mask=mask, caches=caches, cache_index=cache_index)

  def __call__(self, label_B, tokens_BxN, *, train=False):
    """Teacher-forced logits `[B, N, V]` of tokens in anti-diagonal order (all N fed)."""
    N, g = self.num_tokens, self.grid_size
    if tokens_BxN.shape[1] != N:
      raise ValueError(f"tokens {tokens_BxN.shape} != [B, {N}] (grid {g}^2)")
    h = jnp.concatenate([self.embed_cond(label_B, train), self.embed_tokens(tokens_BxN)], axis=1)
    return self.logits_from_embeddings(h, train=train)

  def logits_from_embeddings(self, h_BxN1xC, train=False):
    """Teacher-forced logits `[B, N, V]` from the slot embeddings (class, then the tokens in
    anti-diagonal order)."""
    g, h = self.grid_size, h_BxN1xC
    rows = np.concatenate([[0], 1 + diagonal_order(g)])
    pair, _ = self.run_two(h, rows, mask=proximity_mask(g), deterministic=not train)
    right, below = self.heads(pair)
    r_src, b_src = neighbour_slots(g)
    return combine(
      right[:, np.maximum(r_src, 0)],
      below[:, np.maximum(b_src, 0)],
      jnp.asarray(r_src >= 0)[None, :, None],
      jnp.asarray(b_src >= 0)[None, :, None],
    )


class NARFamily(RasterFamily):
  """NAR as a family: anti-diagonal order, proximity mask, two heads, 2H - 1 calls per image."""

  name = "nar"
  module_class = NARTransformer

  def module_extra(self, model_config) -> dict:
    n = int(model_config.get("medusa_attention_num", 1))
    if n < 1:
      raise ValueError(f"model.medusa_attention_num={n} must be >= 1 (the below head's blocks)")
    return dict(medusa_attention_num=n)

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    self.order = diagonal_order(self.grid_size)
    self.order_name = "diagonal"

  def init_inputs(self) -> tuple:
    return jnp.zeros((1,), jnp.int32), jnp.zeros((1, self.num_tokens), jnp.int32)

  def apply(self, params, label_B, tokens_BxN, rng=None, train=False, order=None, schedule=None):
    """Teacher-forced logits `[B, N, V]` of tokens in anti-diagonal order."""
    del order, schedule  # NAR's own
    return self.apply_module(params, label_B, tokens_BxN, rng=rng, train=train)

  def cache_length(self, max_count: int = 1) -> int:
    return find_multiple(1 + self.num_tokens + self.grid_size, 8)

  def sample_tokens(self, params, labels, rng, **kw):
    """As `RasterFamily.sample_tokens`, one anti-diagonal per model call (no `order`/`schedule`
    arguments; plain decoding)."""
    refuse_fixed_decoding("nar", kw, "anti-diagonals")
    return super().sample_tokens(params, labels, rng, **kw)

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
    schedule,
    return_logits,
    decode="plain",
    window=0,
    lantern_k=0,
  ):
    del lantern_delta, decode, window, lantern_k, schedule
    mod, var = self.module, self._vars(params)
    B, N, V, g = labels.shape[0], self.num_tokens, mod.vocab_size, self.grid_size
    K = g  # the longest anti-diagonal
    lengths = np.asarray(diagonal_lengths(g), np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    S = len(lengths)
    # per call s >= 1 (feeds anti-diagonal s - 1 at slots 1 + starts[s-1] ..): for each target
    # k of anti-diagonal s, the window index of the slot that predicts it with each head (-1: none)
    r_src, b_src = neighbour_slots(g)
    r_win = np.full((S, K), -1, np.int32)
    b_win = np.full((S, K), -1, np.int32)
    for s in range(1, S):
      first = 1 + starts[s - 1]
      for k in range(lengths[s]):
        t = starts[s] + k
        r_win[s, k] = r_src[t] - first if r_src[t] >= 0 else -1
        b_win[s, k] = b_src[t] - first if b_src[t] >= 0 else -1
    rope_rows = jnp.asarray(np.concatenate([[0], 1 + diagonal_order(g), np.zeros(K, np.int32)]))
    mask = proximity_mask(g)
    inv_temp = 1.0 / jnp.maximum(temperature, 1e-5)
    top_p = jnp.where(top_p < 1.0, top_p, 0.0)
    labels_2B = self.labels_2B(labels)
    n_blocks = mod.num_blocks()
    caches = init_kv_caches(n_blocks, 2 * B, self.cache_length(), mod.kv_heads, mod.head_dim)
    known = jnp.pad(known, ((0, 0), (0, K)))
    known_mask = jnp.pad(known_mask, ((0, 0), (0, K)))

    def pick(a, n, logits_2BxKxV, seq, out_logits):
      # official: unguided once more than cfg_interval tokens were generated before the call
      scale = guidance.interval(cfg, a + 1, cfg_interval)
      logits = guidance.guide(logits_2BxKxV[:B], logits_2BxKxV[B:], scale, active=scale > 1.0)
      filtered = filter_top_k_top_p(logits * inv_temp, top_k, top_p)
      tt = a + jnp.arange(K)
      tok = draw_per_token(rng, tt, filtered)
      return write_window(seq, out_logits, a, n, tok, logits, known, known_mask, return_logits)

    seq = jnp.zeros((B, N + K), jnp.int32)
    out_logits = jnp.zeros((B, N + K, V) if return_logits else (0,), jnp.float32)
    h = mod.apply(var, labels_2B, method=RasterTransformer.embed_cond)
    pair, caches = mod.apply(var, h, caches, 0, rope_rows[:1], mask, method="step_two")
    right, below = mod.apply(var, pair, method="heads")
    first = jnp.pad((right + below) / 2, ((0, 0), (0, K - 1), (0, 0)))  # official prefill
    seq, out_logits = pick(jnp.int32(0), 1, first, seq, out_logits)
    starts_j, lengths_j = jnp.asarray(starts), jnp.asarray(lengths)
    r_win_j, b_win_j = jnp.asarray(r_win), jnp.asarray(b_win)

    def body(s, carry):
      seq, caches, out_logits = carry
      fed_at = starts_j[s - 1]
      fed = jax.lax.dynamic_slice_in_dim(seq, fed_at, K, axis=1)
      h = mod.apply(var, jnp.concatenate([fed, fed]), method="embed_tokens")
      rows = jax.lax.dynamic_slice_in_dim(rope_rows, 1 + fed_at, K)
      pair, caches = mod.apply(var, h, caches, 1 + fed_at, rows, mask, method="step_two")
      right, below = mod.apply(var, pair, method="heads")
      ri, bi = r_win_j[s], b_win_j[s]
      logits = combine(
        right[:, jnp.maximum(ri, 0)],
        below[:, jnp.maximum(bi, 0)],
        (ri >= 0)[None, :, None],
        (bi >= 0)[None, :, None],
      )
      seq, out_logits = pick(starts_j[s], lengths_j[s], logits, seq, out_logits)
      return seq, caches, out_logits

    seq, _, out_logits = jax.lax.fori_loop(1, S, body, (seq, caches, out_logits))
    seq = seq[:, :N]
    images, grid = self._to_images(params, seq, order)
    calls_B = jnp.full((B,), S, jnp.int32)
    return images, grid, (out_logits[:, :N] if return_logits else None), calls_B


build = NARFamily.build
