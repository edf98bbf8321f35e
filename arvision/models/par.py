"""PAR: parallelized autoregressive generation (Wang et al., 2024), on the raster spine.

A port of YuqingWang1029/PAR (`autoregressive/models/gpt.py`, `generate.py`), a LlamaGen fork.
The grid is cut into `regions x regions` blocks (M = regions**2, official `ar_token_num`) and the
tokens are taken in region order (`sampling/orders.region_order`: the t-th token of every block
before the (t+1)-th). The first M tokens (one per region) are generated one at a time; then M - 1
learnable **transition tokens** (official `spe_token_num`, `spe_tok_embeddings`) follow the M-th
token, and from there M tokens, one per region, are generated per step.

The input slots (class prefix P = 1; what the official model computes for the first N slots,
whose outputs are the only ones it reads):

    slot   0        1 .. M          M+1 .. 2M-1       2M .. N-1
    holds  class    tokens 0..M-1   transitions 1..M-1  tokens M .. N-M-1

and slot j's output predicts token j. The mask is the official group mask: causal over slots
0 .. M-1, then blocks of M slots that see each other and every earlier slot
(`masks.scale_causal((1,) * M + (M,) * (N/M - 1))`). RoPE: a token turns with its own grid
position; the class and transition slots use the prefix row (zero in the official table, so their
q and k are zero). Sampling takes M + N/M - 1 model calls per image (67 for 256 tokens at M = 4):
a call feeds the slots whose outputs give this step's tokens (one slot, then M).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arvision.models.raster import (
  RasterFamily,
  RasterTransformer,
  draw_per_token,
  normal_init,
  refuse_fixed_decoding,
  write_window,
)
from arvision.ops import masks
from arvision.precision import current_dtype
from arvision.sampling import guidance, orders
from arvision.sampling.kv_cache import init_kv_caches
from arvision.sampling.topk import filter_top_k_top_p


def groups_of(regions: int) -> int:
  return regions * regions


class SpecialTokenEmbedding(nn.Module):
  """The M - 1 transition tokens (official `SpecialTokenEmbedding.special_embeddings`)."""

  num: int
  dim: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self) -> jax.Array:
    table = nn.Embed(
      self.num,
      self.dim,
      embedding_init=normal_init(self.init_std, ("vocab", "embed")),
      name="special_embeddings",
      dtype=current_dtype(),
    )
    return table(jnp.arange(self.num))


def slot_tables(grid: int, regions: int) -> dict[str, np.ndarray]:
  """Static int32 tables over the N input slots (+ M padding slots read by the sampler):
  `token` (the token fed at the slot, 0 where none), `transition` (1-based transition index, 0
  for none), `rope_row` (RoPE table row: 0 = the prefix row)."""
  M, N = groups_of(regions), grid * grid
  if N < 2 * M:
    raise ValueError(f"PAR needs at least 2 M = {2 * M} tokens (regions={regions}), grid has {N}")
  order = orders.region_order(grid, regions)
  j = np.arange(N + M)
  token = np.where(j <= M, j - 1, j - M).clip(0, N - 1)
  transition = np.where((j > M) & (j < 2 * M), j - M, 0)
  rope_row = np.where((j == 0) | (transition > 0) | (j >= N), 0, 1 + order[token])
  return dict(
    token=token.astype(np.int32),
    transition=transition.astype(np.int32),
    rope_row=rope_row.astype(np.int32),
  )


def group_mask(num_tokens: int, regions: int) -> masks.MaskSpec:
  """The official group mask over the N input slots."""
  M = groups_of(regions)
  return masks.scale_causal((1,) * M + (M,) * (num_tokens // M - 1))


class PARTransformer(RasterTransformer):
  """LlamaGen's transformer plus PAR's transition tokens (`spe_tok_embeddings`)."""

  regions: int = 2

  def setup(self):
    super().setup()
    M = groups_of(self.regions)
    self.spe_tok_embeddings = SpecialTokenEmbedding(M - 1, self.dim, self.init_std)

  def transitions(self) -> jax.Array:
    """`[M - 1, C]` transition token embeddings."""
    return self.spe_tok_embeddings()

  def embed_slots(self, label_B, tokens_BxN, slots, train=False) -> jax.Array:
    """Embeddings `[B, len(slots), C]` of input slots `slots` (static or traced int `[L]`);
    slot 0 is the class token (only when `slots` starts at 0 with label_B given)."""
    t = slot_tables(self.grid_size, self.regions)
    tok = jnp.asarray(t["token"])[slots]
    trans = jnp.asarray(t["transition"])[slots]
    h = self.embed_tokens(jnp.take(tokens_BxN, tok, axis=1))
    spe = jnp.concatenate([jnp.zeros((1, self.dim), h.dtype), self.transitions().astype(h.dtype)])
    h = jnp.where((trans > 0)[None, :, None], spe[trans][None], h)
    if label_B is not None:
      h = h.at[:, 0].set(self.embed_cond(label_B, train)[:, 0].astype(h.dtype))
    return h

  def __call__(self, label_B, idx_BxLm1, rope_rows=None, mask=None, query=None, *, train=False):
    """Teacher-forced logits `[B, N, V]` (token t read at slot t) from tokens in region order
    without the last, `[B, N - 1]` (only the first N - M are fed, as officially)."""
    del rope_rows, mask, query  # fixed by PAR
    N = self.num_tokens
    if idx_BxLm1.shape[1] != N - 1:
      raise ValueError(f"input tokens {idx_BxLm1.shape} != [B, {N - 1}] (grid {self.grid_size}^2)")
    tokens = jnp.pad(idx_BxLm1, ((0, 0), (0, 1)))
    h = self.embed_slots(label_B, tokens, np.arange(N), train)
    rows = slot_tables(self.grid_size, self.regions)["rope_row"][:N]
    logits, _ = self.run(h, rows, mask=group_mask(N, self.regions), deterministic=not train)
    return logits


class PARFamily(RasterFamily):
  """PAR as a family: region order, PAR's schedule, the transition tokens and group mask."""

  name = "par"
  module_class = PARTransformer

  def module_extra(self, model_config) -> dict:
    return dict(regions=int(model_config.get("regions", 2)))

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    if self.order_name != "regions" or str(config.model.get("schedule", "one")) != "par":
      raise ValueError(
        f"family 'par' decodes in region order with PAR's schedule: model.order must be "
        f"'regions' and model.schedule 'par', got {self.order_name!r} / "
        f"{config.model.get('schedule')!r}"
      )
    self.regions = int(config.model.regions)
    slot_tables(self.grid_size, self.regions)  # fails now on a grid too small for the regions

  def apply(self, params, label_B, tokens_BxN, rng=None, train=False, order=None, schedule=None):
    """Teacher-forced logits `[B, N, V]` for tokens in region order (`order`, `schedule` are
    PAR's own: the loss passes the model's order)."""
    del order, schedule
    return self.apply_module(params, label_B, tokens_BxN[:, :-1], rng=rng, train=train)

  def cache_length(self, max_count: int = 1) -> int:
    return int(np.ceil((self.num_tokens + groups_of(self.regions)) / 8) * 8)

  def sample_tokens(self, params, labels, rng, **kw):
    """As `RasterFamily.sample_tokens`, in PAR's own order and schedule (no `order`/`schedule`
    arguments) with plain decoding."""
    refuse_fixed_decoding("par", kw, "groups in parallel")
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
    B, N, V, M = labels.shape[0], self.num_tokens, mod.vocab_size, groups_of(self.regions)
    S = M + N // M - 1  # model calls: the prefill, M - 1 single tokens, N/M - 1 groups
    # step s >= 1 feeds slots f_s .. f_s + M - 1 (the first only while s < M: the rest are
    # padding at later slots, hidden by the mask and overwritten) and reads tokens f_s .. f_s+c_s-1
    s = np.arange(S)
    first = np.where(s < M, s, M * (s - M + 1)).astype(np.int32)
    count = np.where(s < M, 1, M).astype(np.int32)
    # official cfg_interval counter: the decode loop index, restarted by the group phase
    t = np.arange(N + M)
    cfg_step = np.where(t < M, t, M * ((t - M) // M) + 1).astype(np.int32)
    tables = slot_tables(self.grid_size, self.regions)
    rope_rows = jnp.asarray(tables["rope_row"])
    mask = group_mask(N, self.regions)
    inv_temp = 1.0 / jnp.maximum(temperature, 1e-5)
    top_p = jnp.where(top_p < 1.0, top_p, 0.0)
    labels_2B = self.labels_2B(labels)
    caches = init_kv_caches(mod.n_layer, 2 * B, self.cache_length(), mod.kv_heads, mod.head_dim)
    known = jnp.pad(known, ((0, 0), (0, M)))
    known_mask = jnp.pad(known_mask, ((0, 0), (0, M)))

    def pick(a, k, hidden_2BxKxC, seq, out_logits):
      K = hidden_2BxKxC.shape[1]
      logits_2B = mod.apply(var, hidden_2BxKxC, method="logits")
      tt = a + jnp.arange(K)
      scale = guidance.interval(cfg, jnp.asarray(cfg_step)[tt], cfg_interval)[None, :, None]
      logits = guidance.guide(logits_2B[:B], logits_2B[B:], scale, active=scale > 1.0)
      filtered = filter_top_k_top_p(logits * inv_temp, top_k, top_p)
      tok = draw_per_token(rng, tt, filtered)
      return write_window(seq, out_logits, a, k, tok, logits, known, known_mask, return_logits)

    seq = jnp.zeros((B, N + M), jnp.int32)
    out_logits = jnp.zeros((B, N + M, V) if return_logits else (0,), jnp.float32)
    h = mod.apply(var, labels_2B, method=RasterTransformer.embed_cond)
    hidden, caches = mod.apply(var, h, caches, 0, rope_rows[:1], mask, method="step")
    seq, out_logits = pick(0, 1, hidden, seq, out_logits)
    first_j, count_j = jnp.asarray(first), jnp.asarray(count)

    def body(i, carry):
      seq, caches, out_logits = carry
      f = first_j[i]
      slots = f + jnp.arange(M)
      seq_2B = jnp.concatenate([seq, seq])
      h = mod.apply(var, None, seq_2B, slots, method=PARTransformer.embed_slots)
      hidden, caches = mod.apply(var, h, caches, f, rope_rows[slots], mask, method="step")
      seq, out_logits = pick(f, count_j[i], hidden, seq, out_logits)
      return seq, caches, out_logits

    seq, _, out_logits = jax.lax.fori_loop(1, S, body, (seq, caches, out_logits))
    seq = seq[:, :N]
    images, grid = self._to_images(params, seq, order)
    calls_B = jnp.full((B,), S, jnp.int32)
    return images, grid, (out_logits[:, :N] if return_logits else None), calls_B


build = PARFamily.build
