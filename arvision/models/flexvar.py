"""FlexVAR: flexible visual autoregressive modeling without residual prediction (Jiao et al., 2025).

A variant of the VAR spine (`models/var.py`; same blocks, AdaLN, head and KV-cached decoding), as
the official `models/flexvar.py` (jiaosiyu1999/FlexVAR) differs from VAR in three places:

- **No residual.** Scale k's target is the code map of the latent area-downsampled to pn_k and
  quantized on its own (FlexVAE: an l2-normalised VQ, `tokenizer.type="vq"`); scale k + 1's input
  is scale k's code vectors bicubic-upsampled to pn_{k+1}. The image is decoded from the last
  scale's codes alone.
- **No level embedding.** Positions come from one learnable 2D map `pos_1LC` (32 x 32 x C,
  initialised with 2D sin/cos), area-resized to each scale's side, so any scale list has
  positions (larger than 32 too: area upsampling repeats).
- **Any scale list.** Training draws a random list every step (`ScaleDraw`, the official
  `gen_curr_patch_nums`); sampling walks any increasing list from 1 (fewer steps, more steps, or
  past the training latent side for a larger image, where scales above `max_pn` are greedy).

Training with a different list each step under ONE compiled step: the sequence is padded to
`max_tokens` and everything that depends on the list is data, gathered from tables built once
(area / bicubic weight matrices per side, the position map at every side): per-token segment ids
drive the attention mask (`masks.segment_causal`, dense xla path), targets are per-token area
weights times the latent, and the teacher input is one `[L, L]` bicubic matrix times the code
vectors. Sampling compiles once per scale list (the list is a static setting).

Parameter names = VAR's (`models/var.py`) without `lvl_embed`; `pos_1LC` is `[1, 32, 32, C]`
(official `[1, C, 32, 32]`, transposed by `arvision convert flexvar`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arvision import precision
from arvision.models import var as var_lib
from arvision.models.var import VAR, VARFamily
from arvision.ops import masks
from arvision.ops.resize import area, area_weights, bicubic, bicubic_weights
from arvision.parallel.logical import param_init
from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches
from arvision.sampling.topk import filter_top_k_top_p

_HI = jax.lax.Precision.HIGHEST
# Scales the official sampler draws with the user's top-k; any other side is greedy (top-k 1).
OFFICIAL_TOPK_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32)


def sincos_pos_map(side: int, dim: int) -> np.ndarray:
  """float32 `[side, side, dim]`: the official `generate_2d_rotary_position_embedding` (even
  channels sin(row * w_k), odd channels cos(col * w_k), w_k = 10000^(-2k / dim))."""
  if dim % 2:
    raise ValueError(f"the position map needs an even width, got {dim}")
  div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim)))
  rows = np.arange(side, dtype=np.float32)[:, None, None]
  out = np.zeros((side, side, dim), np.float32)
  out[..., 0::2] = np.sin(rows * div)
  out[..., 1::2] = np.cos(np.arange(side, dtype=np.float32)[None, :, None] * div)
  return out


class FlexVAR(VAR):
  """The FlexVAR transformer: VAR's module with the 2D position map instead of `pos_1LC [1, L,
  C]` + `lvl_embed`. `patch_nums` is the list a call runs (a clone per sampling list; the params
  do not depend on it beyond the first scale's `pos_start`)."""

  pos_side: int = 32

  def _setup_positions(self, first_l: int, auto_std: float, tn, dtype):
    del tn, dtype  # the map is a param, resized in float32 and cast with the residual stream
    C = self.width
    start_init = param_init(var_lib.trunc_normal_init(auto_std), (None, "seq", "embed"))
    self.pos_start = self.param("pos_start", start_init, (1, first_l, C))

    def sincos(key, shape, dtype=jnp.float32):
      del key
      return jnp.asarray(sincos_pos_map(shape[1], shape[3]), dtype)[None]

    map_init = param_init(sincos, (None, None, None, "embed"))
    self.pos_1LC = self.param("pos_1LC", map_init, (1, self.pos_side, self.pos_side, C))

  def pos_at(self, pn: int) -> jax.Array:
    """The position map area-resized to side `pn`, `[1, pn*pn, C]` (official `F.interpolate(
    pos_1LC, (pn, pn), mode='area')`)."""
    return area(self.pos_1LC, (pn, pn)).reshape(1, pn * pn, self.width)

  def _lvl_pos(self) -> jax.Array:
    return jnp.concatenate([self.pos_at(pn) for pn in self.patch_nums], axis=1)

  def padded(self, label_B, teacher_BxLxCvae, pos_idx_L, seg_L, max_pn: int, *, train=False):
    """Teacher-forced logits `[B, L, V]` of a padded sequence whose scale list is data.

    Args:
      label_B: int labels in [0, num_classes].
      teacher_BxLxCvae: every token's input code vector (the first token's is ignored: it is the
        class token `sos + pos_start`).
      pos_idx_L: int `[L]` row of each token in the table of positions at sides 1..max_pn.
      seg_L: int `[L]` scale index of each token, non-decreasing; padding has a larger id.
      max_pn: the largest side in the table (static).
      train: cond drop and drop path (needs a 'dropout' rng).
    """
    B, first_l = label_B.shape[0], self.lengths[0]
    if train and self.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), (B,)) < self.cond_drop_rate
      label_B = jnp.where(drop, self.num_classes, label_B)
    cond_BxD = self.class_emb(label_B)
    sos = jnp.broadcast_to(cond_BxD[:, None, :] + self.pos_start, (B, first_l, self.width))
    x = self.word_embed(teacher_BxLxCvae.astype(jnp.float32))
    x = jnp.concatenate([sos, x[:, first_l:]], axis=1)
    table = jnp.concatenate([self.pos_at(pn) for pn in range(1, max_pn + 1)], axis=1)[0]
    x = precision.cast(x + jnp.take(table, pos_idx_L, axis=0)[None])  # the compute dtype
    cond, mask = self._block_cond(cond_BxD), masks.segment_causal(seg_L)
    for block in self.blocks:
      x, _ = precision.block(block, x, cond, mask=mask, deterministic=not train)
    return self._logits(x, cond_BxD)


# ------------------------------------------------------------------------------------------------
# Scale lists


def check_patch_nums(patch_nums, first: int = 1, what: str = "patch_nums") -> tuple[int, ...]:
  """A scale list: positive ints, strictly increasing, starting at `first` (the class token's
  scale; `pos_start` is sized by it)."""
  try:
    pns = tuple(int(p) for p in patch_nums)
  except (TypeError, ValueError):
    raise ValueError(f"{what}={patch_nums!r} must be a sequence of ints") from None
  if not pns or pns[0] != first or any(b <= a for a, b in zip(pns, pns[1:], strict=False)):
    raise ValueError(f"{what}={pns} must increase strictly and start at {first} (e.g. 1,2,3,4,6,8)")
  return pns


def greedy_scales(patch_nums, max_pn: int, topk_patch_nums) -> tuple[bool, ...]:
  """Which scales sample greedily (top-k 1), as the official sampler: sides above `max_pn` (the
  training latent side; extrapolation) and sides outside `topk_patch_nums`."""
  keep = set(int(p) for p in topk_patch_nums)
  return tuple(pn > max_pn or pn not in keep for pn in patch_nums)


def cfg_scales(patch_nums, cfg, max_pn: int, schedule: str = "flexvar") -> list:
  """The guidance scale s of each scale (logits = uncond + s (cond - uncond)).

  "flexvar" (official default, its FID protocol): s = 1 + t, t = cfg * si / min(n - 1, 9), and
  t = cfg above `max_pn` (so past ten scales t exceeds cfg, as official). "llamagen" (the
  official `used_llamagen_cfg`): s = cfg at every scale.
  """
  n = len(patch_nums)
  if schedule == "llamagen":
    return [cfg for _ in patch_nums]
  if schedule != "flexvar":
    raise ValueError(f"cfg_schedule={schedule!r} is unknown; accepted: 'flexvar', 'llamagen'")
  den = min(n - 1, 9)
  return [
    1.0 + (cfg if pn > max_pn else cfg * (si / den if den else 0.0))
    for si, pn in enumerate(patch_nums)
  ]


@dataclasses.dataclass(frozen=True)
class ScaleDraw:
  """The training scale-list distribution (official `VARTrainer.gen_curr_patch_nums`).

  With probability `full_prob` the list is `full`; else one sorted draw without replacement of
  `k` sides from `lo..hi` per group `(lo, hi, k)` (official: (1,1,1), (2,2,1), (3,10,5),
  (11,15,2), (16,16,1)). Then `u ~ U(0,1)` drops one random scale, not among the first two nor
  the last, per threshold it exceeds (official 0.9, 0.95, 0.98, 0.99), and while the token count
  exceeds `max_tokens` one of the last four scales is dropped (the last one included, as
  official; the first is always kept).
  """

  groups: tuple[tuple[int, int, int], ...]
  full: tuple[int, ...]
  full_prob: float = 0.05
  drop_thresholds: tuple[float, ...] = (0.9, 0.95, 0.98, 0.99)
  max_tokens: int = 680

  def __post_init__(self):
    groups = tuple(tuple(int(x) for x in g) for g in self.groups)
    object.__setattr__(self, "groups", groups)
    object.__setattr__(self, "full", check_patch_nums(self.full, what="model.patch_nums"))
    prev = 0
    for g in groups:
      if len(g) != 3 or not (prev < g[0] <= g[1]) or not 1 <= g[2] <= g[1] - g[0] + 1:
        raise ValueError(
          f"model.train_scale_groups={groups}: each group is (lo, hi, k) with lo > the previous "
          f"hi, lo <= hi and 1 <= k <= hi - lo + 1; {g} is not"
        )
      prev = g[1]
    if not groups or groups[0] != (1, 1, 1):
      raise ValueError(f"model.train_scale_groups={groups} must start with (1, 1, 1)")
    if sum(p * p for p in self.full) > self.max_tokens:
      raise ValueError(
        f"model.max_tokens={self.max_tokens} is below the {sum(p * p for p in self.full)} "
        f"tokens of model.patch_nums={self.full}"
      )

  @property
  def slots(self) -> int:
    return max(sum(g[2] for g in self.groups), len(self.full))

  @property
  def max_side(self) -> int:
    return max(self.groups[-1][1], self.full[-1])

  def draw(self, rng: jax.Array) -> jax.Array:
    """int32 `[slots]`: the drawn list, then zeros (unused slots)."""
    S = self.slots
    k_full, k_groups, k_u, k_drop, k_cap = jax.random.split(rng, 5)
    parts = []
    for (lo, hi, k), key in zip(
      self.groups, jax.random.split(k_groups, len(self.groups)), strict=True
    ):
      pick = jax.random.choice(key, jnp.arange(lo, hi + 1, dtype=jnp.int32), (k,), replace=False)
      parts.append(jnp.sort(pick))
    rand = jnp.concatenate(parts)
    rand = jnp.pad(rand, (0, S - rand.shape[0]))
    full = jnp.asarray(self.full + (0,) * (S - len(self.full)), jnp.int32)
    pns = jnp.where(jax.random.uniform(k_full) < self.full_prob, full, rand)
    alive = pns > 0

    def kill(alive, lo, hi, key, active):
      # kill the alive entry of rank r ~ U[lo, hi) (ranks count alive entries only)
      r = jax.random.randint(key, (), lo, jnp.maximum(hi, lo + 1))
      rank = jnp.cumsum(alive) - 1
      return alive & ~(active & (rank == r) & (hi > lo))

    u = jax.random.uniform(k_u)
    for d, (thr, key) in enumerate(
      zip(
        self.drop_thresholds,
        jax.random.split(k_drop, max(len(self.drop_thresholds), 1)),
        strict=False,
      )
    ):
      del d
      cnt = jnp.sum(alive)
      alive = kill(alive, 2, cnt - 1, key, u > thr)
    for key in jax.random.split(k_cap, S):
      cnt = jnp.sum(alive)
      over = jnp.sum(jnp.where(alive, pns * pns, 0)) > self.max_tokens
      alive = kill(alive, jnp.maximum(cnt - 4, 1), cnt, key, over)
    order = jnp.argsort(~alive, stable=True)
    return jnp.where(alive[order], pns[order], 0).astype(jnp.int32)


def token_layout(pns_S: jax.Array, length: int, table_side: int) -> dict:
  """Per-token arrays of a padded sequence of `length` tokens for the list `pns_S` (zeros after
  the last scale; numpy or jnp): `valid`, `seg` (scale index; padding a larger id), `pn` (its
  scale's side), `i`, `j` (row, column in that scale), `pos_idx` (row in the table of positions
  at sides 1..table_side) and `total` (real tokens)."""
  xp = jnp if isinstance(pns_S, jax.Array) else np
  pns = pns_S.astype(xp.int32)
  S = pns.shape[0]
  sq = pns * pns
  cum = xp.cumsum(sq)
  total = cum[-1]
  t = xp.arange(length, dtype=xp.int32)
  s_t = xp.sum(t[:, None] >= cum[None, :], axis=1).astype(xp.int32)
  valid = t < total
  s_c = xp.minimum(s_t, S - 1)
  pn = xp.where(valid, pns[s_c], 1)
  r = xp.where(valid, t - (cum[s_c] - sq[s_c]), 0)
  i, j = r // pn, r % pn
  # offsets[pn] = sum_{p < pn} p^2: where side pn's positions start in the table
  sq_sides = np.arange(table_side + 1) ** 2
  offsets = xp.asarray(np.concatenate([[0], np.cumsum(sq_sides)])[: table_side + 1], xp.int32)
  pos_idx = xp.where(valid, offsets[pn] + i * pn + j, 0)
  seg = xp.where(valid, s_t, S + 1)
  return dict(valid=valid, seg=seg, pn=pn, i=i, j=j, pos_idx=pos_idx, total=total)


@functools.lru_cache(maxsize=8)
def area_table(side: int) -> np.ndarray:
  """float32 `[side + 1, side, side]`: `[pn]` is the area matrix from `side` to `pn` (rows pn..
  zero), for gathering by a side that is data."""
  out = np.zeros((side + 1, side, side), np.float32)
  for pn in range(1, side + 1):
    out[pn, :pn, :] = area_weights(side, pn)
  return out


@functools.lru_cache(maxsize=8)
def bicubic_table(side: int) -> np.ndarray:
  """float32 `[side + 1, side + 1, side, side]`: `[pin, pout]` is the bicubic matrix from `pin`
  to `pout` (zero-padded)."""
  out = np.zeros((side + 1, side + 1, side, side), np.float32)
  for a in range(1, side + 1):
    for b in range(1, side + 1):
      out[a, b, :b, :a] = bicubic_weights(a, b)
  return out


def scale_latents(f_BxPxPxC: jax.Array, lay: dict, area_tab) -> jax.Array:
  """`[B, L, C]`: each token's entry of `area(f, its scale's side)`."""
  a = jnp.asarray(area_tab)
  rows, cols = a[lay["pn"], lay["i"]], a[lay["pn"], lay["j"]]  # [L, P] each
  return jnp.einsum("lp,lq,bpqc->blc", rows, cols, f_BxPxPxC.astype(jnp.float32), precision=_HI)


def teacher_inputs(codes_BxLxC: jax.Array, lay: dict, bic_tab) -> jax.Array:
  """`[B, L, C]`: each token's input, the previous scale's code map bicubic-upsampled to its
  scale's side (token 0, the class token's slot, gets zeros)."""
  b = jnp.asarray(bic_tab)
  seg, pn, i, j, valid = (jnp.asarray(lay[k]) for k in ("seg", "pn", "i", "j", "valid"))
  prev = valid[None, :] & valid[:, None] & (seg[None, :] == seg[:, None] - 1)
  w_row = b[pn[None, :], pn[:, None], i[:, None], i[None, :]]
  w_col = b[pn[None, :], pn[:, None], j[:, None], j[None, :]]
  W_LxL = jnp.where(prev, w_row * w_col, 0.0)
  return jnp.einsum("tu,buc->btc", W_LxL, codes_BxLxC.astype(jnp.float32), precision=_HI)


# ------------------------------------------------------------------------------------------------
# Family


class FlexVARFamily(VARFamily):
  """FlexVAR on a frozen FlexVAE-style tokenizer (`tokenizer.type="vq"`, l2-normalised codebook).

  `config.model` adds to VAR's: `patch_nums` (the default list: the 5% "full" draw and the
  sampling default), `train_scale_groups`, `full_prob`, `drop_thresholds`, `max_tokens` (see
  `ScaleDraw`), `pos_side` (the position map's side), `max_pn` (0 = the latent side: above it
  sampling is greedy and fully guided), `topk_patch_nums` (sides sampled with the user's top-k)
  and `infer_patch_nums` (the sampling default; empty = `patch_nums`).
  """

  name = "flexvar"
  tokenizer_methods = ("codebook", "encode_f", "quantize_idx", "decode_fhat")
  sampler_static = ("patch_nums", "cfg_schedule", "return_logits")
  per_scale_tables = None
  module_class = FlexVAR

  def training_patch_nums(self, config, tokenizer) -> tuple[int, ...]:
    pns = check_patch_nums(config.model.patch_nums, what="model.patch_nums")
    if pns[-1] != tokenizer.latent_size:
      raise ValueError(
        f"model.patch_nums={pns} must end at the tokenizer's latent side {tokenizer.latent_size}"
      )
    return pns

  def module_extra(self, config, tokenizer) -> dict:
    del tokenizer
    return dict(pos_side=int(config.model.get("pos_side", 32)))

  def __init__(self, config, tokenizer):
    if getattr(tokenizer, "type", "vq") != "vq":
      raise ValueError(
        f"flexvar needs a FlexVAE-style tokenizer (tokenizer model.type='vq'); got "
        f"{tokenizer.type!r}"
      )
    super().__init__(config, tokenizer)
    m = config.model
    if self.continuous or self.module.mask != "scale_causal" or self.scale_weights is not None:
      raise ValueError(
        "flexvar supports head='categorical', mask='scale_causal', "
        "scale_loss='tokens' only (the official model)"
      )
    self.latent_side = int(tokenizer.latent_size)
    self.draw = ScaleDraw(
      groups=tuple(tuple(g) for g in m.train_scale_groups),
      full=self.patch_nums,
      full_prob=float(m.full_prob),
      drop_thresholds=tuple(float(t) for t in m.drop_thresholds),
      max_tokens=int(m.max_tokens),
    )
    if self.draw.max_side > self.latent_side:
      raise ValueError(
        f"model.train_scale_groups reach side {self.draw.max_side}, above the tokenizer's latent "
        f"side {self.latent_side}"
      )
    self.max_pn = int(m.get("max_pn", 0)) or self.latent_side
    self.topk_patch_nums = tuple(int(p) for p in m.get("topk_patch_nums", ())) or tuple(
      sorted(set(OFFICIAL_TOPK_PATCH_NUMS) | set(self.patch_nums))
    )
    infer = tuple(m.get("infer_patch_nums", ())) or self.patch_nums
    self.infer_patch_nums = check_patch_nums(infer, self.patch_nums[0], "model.infer_patch_nums")

  # --- training ----------------------------------------------------------------------------------

  def layout(self, pns_S) -> dict:
    """`token_layout` of a list (`[slots]`, zeros after the last scale) in `max_tokens` tokens."""
    if isinstance(pns_S, np.ndarray) and int(np.sum(pns_S.astype(np.int64) ** 2)) > (
      self.draw.max_tokens
    ):
      raise ValueError(
        f"scale list {pns_S.tolist()} has more tokens than model.max_tokens={self.draw.max_tokens}"
      )
    return token_layout(pns_S, self.draw.max_tokens, self.latent_side)

  def padded_targets(self, tok_p, images, lay):
    """`(idx [B, L] int32, teacher [B, L, Cvae])` of a padded layout: every scale quantized on
    its own from the area-downsampled latent, inputs = the previous scale's codes upsampled."""
    f = self.tokenizer.encode_f(tok_p, images).astype(jnp.float32)
    z_BxLxC = scale_latents(f, lay, area_table(self.latent_side))
    idx = self.tokenizer.quantize_idx(tok_p, z_BxLxC[:, :, None, :]).reshape(z_BxLxC.shape[:2])
    codes = self.tokenizer.codebook(tok_p)[idx]
    return jax.lax.stop_gradient(idx), jax.lax.stop_gradient(
      teacher_inputs(codes, lay, bicubic_table(self.latent_side))
    )

  def padded_logits(self, params, label, teacher, lay, rng=None, train=False):
    return self.apply_module(
      params,
      label,
      teacher,
      jnp.asarray(lay["pos_idx"]),
      jnp.asarray(lay["seg"]),
      self.latent_side,
      rng=rng,
      train=train,
      method=FlexVAR.padded,
    )

  def loss(self, params, batch, rng, train: bool):
    """A random scale list per step (drawn from `rng`), CE averaged over its tokens (1/L each,
    as official), mean over the batch. Metrics: `loss`, `ce`, `acc`, `tokens`, `num_scales`."""
    if "tokens" in batch:
      raise ValueError(
        "flexvar trains on images (its scale lists change every step); "
        "pre-tokenized `tokens` batches are not supported"
      )
    rng = jax.random.key(0) if rng is None else rng
    k_draw, k_drop = jax.random.split(rng)
    lay = self.layout(self.draw.draw(k_draw))
    idx, teacher = self.padded_targets(params["tokenizer"], batch["image"], lay)
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    logits = self.padded_logits(params, label, teacher, lay, rng=k_drop, train=train)
    V = logits.shape[-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, idx)
    obj = ce
    if self.label_smoothing > 0:
      smooth = optax.smooth_labels(jax.nn.one_hot(idx, V), self.label_smoothing)
      obj = optax.softmax_cross_entropy(logits, smooth)
    w = lay["valid"].astype(jnp.float32) / lay["total"].astype(jnp.float32)
    loss = jnp.mean(jnp.sum(obj * w, axis=1))
    correct = (jnp.argmax(logits, axis=-1) == idx).astype(jnp.float32)
    metrics = dict(
      loss=loss,
      ce=jnp.mean(jnp.sum(ce * w, axis=1)),
      acc=jnp.mean(jnp.sum(correct * w, axis=1)),
      tokens=lay["total"].astype(jnp.float32),
      num_scales=jnp.max(jnp.where(lay["valid"], lay["seg"], 0)).astype(jnp.float32) + 1,
    )
    return loss, metrics

  # --- sampling ----------------------------------------------------------------------------------

  def _sample_impl(self, params, labels, rng, knobs, *, patch_nums, cfg_schedule, return_logits):
    tok_p, var_vars = params["tokenizer"], self._vars(params)
    mod = self.module.clone(patch_nums=patch_nums)
    cfg, top_k, top_p = knobs
    B, C = labels.shape[0], mod.cvae
    x, cond_2BxD = mod.apply(var_vars, self.labels_2B(labels), method=VAR.first_tokens)
    L = sum(pn * pn for pn in patch_nums)
    caches = init_kv_caches(mod.depth, 2 * B, L, mod.num_heads, mod.width // mod.num_heads, x.dtype)
    codebook_VxC = self.tokenizer.codebook(tok_p).astype(jnp.float32)
    greedy = greedy_scales(patch_nums, self.max_pn, self.topk_patch_nums)
    scales = cfg_scales(patch_nums, cfg, self.max_pn, cfg_schedule)
    idx_out, logits_out = [], []
    for si, pn in enumerate(patch_nums):
      logits_2B, caches = mod.apply(var_vars, x, cond_2BxD, caches, si, method=VAR.step)
      logits = guidance.guide(logits_2B[:B], logits_2B[B:], scales[si])
      rng, key = jax.random.split(rng)
      if greedy[si]:
        idx = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      else:
        idx = jax.random.categorical(key, filter_top_k_top_p(logits, top_k, top_p), axis=-1)
        idx = idx.astype(jnp.int32)
      idx_out.append(idx)
      logits_out.append(logits)
      h = codebook_VxC[idx].reshape(B, pn, pn, C)
      if si != len(patch_nums) - 1:
        nxt = bicubic(h, (patch_nums[si + 1],) * 2).reshape(B, -1, C)
        x = mod.apply(var_vars, nxt, si + 1, method=VAR.embed_next)
        x = jnp.concatenate([x, x], axis=0)
    img_u8 = self.decode_images(params, h, "decode_fhat")
    return img_u8, idx_out, (logits_out if return_logits else None)

  def sample_tokens(self, params, labels, rng, **settings):
    """Samples with any scale list; returns `(images uint8 [B, 16 pn_last, ...], idx list of
    int32 [B, pn*pn], guided logits list or None)`.

    Settings (`SAMPLE_SETTINGS`): `cfg`, `top_k`, `top_p` (traced: no recompilation);
    `patch_nums` (the scale list, increasing from 1; default `model.infer_patch_nums`; its last
    side sets the image size), `cfg_schedule` ("flexvar" | "llamagen", see `cfg_scales`) and
    `return_logits` are static: one compiled sampler per list.
    """
    unknown = sorted(set(settings) - set(SAMPLE_SETTINGS))
    if unknown:
      raise ValueError(
        f"flexvar sampling settings {unknown} unknown; accepted: {list(SAMPLE_SETTINGS)}"
      )
    s = {**SAMPLE_SETTINGS, **settings}
    labels = self.check_labels(labels)
    pns = check_patch_nums(
      s["patch_nums"] or self.infer_patch_nums, self.patch_nums[0], "patch_nums"
    )
    cfg_scales(pns, 0.0, self.max_pn, str(s["cfg_schedule"]))  # fails now if unknown
    knobs = (jnp.float32(s["cfg"]), jnp.int32(s["top_k"]), jnp.float32(s["top_p"]))
    return self._sample_jit(
      params,
      labels,
      rng,
      knobs,
      patch_nums=pns,
      cfg_schedule=str(s["cfg_schedule"]),
      return_logits=bool(s["return_logits"]),
    )


# Official eval settings (eval_c2i.py): cfg 2.5, top-k 900, top-p 0.95, the "flexvar" schedule.
SAMPLE_SETTINGS = dict(
  cfg=2.5, top_k=900, top_p=0.95, patch_nums=(), cfg_schedule="flexvar", return_logits=False
)

build = FlexVARFamily.build
