"""HMAR: efficient hierarchical masked autoregressive image generation (Kumbong et al., 2025).

A variant of the VAR spine (`models/var.py`): the same model as NVlabs/HMAR `models/hmar.py`.

- **Stage 1** (official `NextScalePrediction`): VAR with a block-diagonal mask (a token of scale k
  attends to scale k only; its input, area(f_hat of scales < k, pn_k), already carries the
  coarser scales, so decoding needs no KV cache) and the `lognormal` scale loss (official
  `loss_reweight_type: lognorm`, `next_scale.scale_weights`). The parameters are VAR's.
- **Stage 2** (official `MaskedPrediction` fine-tuning, then `HMAR` at inference): a
  `mask_embed`, a second copy of the last `mask_depth` blocks (`mask_blocks_*`) and of the head
  (`mask_head_nm`, `mask_head`), initialised from the stage-1 ones. Scale k's input adds, to the
  stage-1 input, the scale's own tokens read at its own size (area(phi_k(bicubic(embed(idx_k))),
  pn_k)) through the word embedding's weight, `mask_embed` where a token is masked; the first
  `depth - mask_depth` blocks (shared with stage 1), the mask blocks and the mask head predict
  the masked tokens. Only these mask parameters train: the stage-1 ones are frozen params
  (`frozen_keys`) that the loop supplies from the stage-1 checkpoint (`load_frozen`), which
  `arvision train` first trains under `WORKDIR/stage1` when `model.stage1_checkpoint` is empty.
- **Sampling** (one jitted call, `refine_scale`): each scale is drawn by next-scale prediction;
  then, with `model.mask_schedule[k] = (n_0, n_1, ...)` (tokens settled per step, summing to
  pn_k^2), the sum(n_1..) least confident tokens are masked and re-predicted over len - 1 masked
  steps, each keeping the n_i most confident of the still-masked ones. Masked steps are guided
  with s = 1 + 1e-6 cfg, as the official sampler hard-codes.

Official key layout (`HMAR.state_dict()`, converted by `arvision.convert.hmar`): `base_blocks.i`
-> `blocks_i`, `ns_blocks.j` -> `blocks_{depth - mask_depth + j}`, `ns_head(_nm)` -> `head(_nm)`,
`word_embed.weight` + `word_embed_bias` -> `word_embed`, `mask_embed.weight` [1, C] -> `mask_embed`
[C], `mask_blocks.j` -> `mask_blocks_j`, `mask_head(_nm)` as named.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import linen as nn

from arvision import errors
from arvision.models import heads as heads_lib
from arvision.models import next_scale
from arvision.models import var as var_lib
from arvision.models.layers import (
  AdaLNBeforeHead,
  AdaLNSelfAttn,
  drop_path_rates,
  scaled_init,
  trunc_normal_init,
)
from arvision.ops import masks
from arvision.ops.resize import area
from arvision.parallel.logical import param_init
from arvision.sampling import guidance
from arvision.sampling.topk import filter_top_k_top_p

# Official `HMAR.generate`: masked steps guide with t = cfg * 1e-6 ("TODO: remove hard-coding").
MASK_STEP_CFG_RATIO = 1e-6


def default_mask_schedule(patch_nums) -> tuple[tuple[int, ...], ...]:
  """The official schedule (`utils/sampling_arg_util.py`), by side: 2x2 in steps (1, 3), 3x3 in
  (1, 1, 2, 5), every other scale in its one next-scale step."""
  table = {2: (1, 3), 3: (1, 1, 2, 5)}
  return tuple(table.get(int(pn), (int(pn) * int(pn),)) for pn in patch_nums)


def check_mask_schedule(schedule, patch_nums) -> tuple[tuple[int, ...], ...]:
  """`model.mask_schedule` as a tuple of tuples (empty = `default_mask_schedule`); each scale's
  steps are positive ints summing to its pn^2 tokens, and a 1x1 scale has one step."""
  if not schedule:
    return default_mask_schedule(patch_nums)
  out = tuple(tuple(int(n) for n in steps) for steps in schedule)
  if len(out) != len(patch_nums):
    raise ValueError(
      f"model.mask_schedule has {len(out)} entries; it needs one per scale ({len(patch_nums)}, "
      f"patch_nums={tuple(patch_nums)})"
    )
  for si, (pn, steps) in enumerate(zip(patch_nums, out, strict=True)):
    if not steps or min(steps) < 1 or sum(steps) != pn * pn:
      raise ValueError(
        f"model.mask_schedule[{si}]={steps}: the tokens settled per step must be positive ints "
        f"summing to the scale's {pn}x{pn}={pn * pn} tokens"
      )
  return out


def lowest(score_Bxl: jax.Array, n: int) -> jax.Array:
  """bool `[B, l]`: the `n` lowest scores of each row (ties: the lower position first)."""
  rank = jnp.argsort(jnp.argsort(score_Bxl, axis=-1), axis=-1)
  return rank < n


class HMAR(var_lib.VAR):
  """The VAR module plus HMAR's stage-2 parameters when `mask_depth > 0` (see the module doc).

  Attributes:
    mask_depth: official `n_layers_train`: how many of the last blocks have a masked-prediction
      copy; 0 = a stage-1 model (VAR's parameters only).
  """

  mask_depth: int = 0

  def setup(self):
    super().setup()
    if not self.mask_depth:
      return
    if not 0 < self.mask_depth <= self.depth:
      raise ValueError(f"model.mask_depth={self.mask_depth} must be in [1, depth={self.depth}]")
    C = self.width
    auto_std = math.sqrt(1.0 / (3 * C))
    std = self.init_std if self.init_std > 0 else auto_std
    self.mask_embed = self.param(
      "mask_embed", param_init(trunc_normal_init(auto_std), ("embed",)), (C,)
    )
    dpr = drop_path_rates(self.drop_path_rate, self.depth)
    first = self.depth - self.mask_depth
    self.mask_blocks = [
      AdaLNSelfAttn(
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        drop_path_rate=dpr[first + j],
        attn_l2_norm=self.attn_l2_norm,
        shared_aln=self.shared_aln,
        depth=self.depth,
        init_std=std,
        aln=self.aln,
        alng=self.alng,
        norm_eps=self.norm_eps,
        attn_impl=self.attn_impl,
      )
      for j in range(self.mask_depth)
    ]
    self.mask_head_nm = AdaLNBeforeHead(init_std=std, init_adaln=self.aln, norm_eps=self.norm_eps)
    self.mask_head = heads_lib.CategoricalHead(
      self.vocab_size,
      kernel_init=param_init(
        scaled_init(trunc_normal_init(std), self.init_head), ("embed", "vocab")
      ),
      bias_init=param_init(nn.initializers.zeros, ("vocab",)),
    )

  def _own_embed(self, own_BxlxCvae: jax.Array, masked_Bxl: jax.Array) -> jax.Array:
    """The word embedding's weight (no bias: official `word_embed` + `word_embed_bias`) on a
    scale's own tokens; `mask_embed` where a token is masked."""
    kernel = nn.unbox(self.word_embed.variables["params"]["kernel"])
    e = own_BxlxCvae.astype(jnp.float32) @ kernel
    return jnp.where(masked_Bxl[..., None], self.mask_embed.astype(e.dtype), e)

  def _mask_path(self, x_BxLxC, cond_BxD, mask, deterministic: bool) -> jax.Array:
    """The shared first blocks, the mask blocks and the mask head: float32 logits."""
    cond = self._block_cond(cond_BxD)
    for block in (*self.blocks[: self.depth - self.mask_depth], *self.mask_blocks):
      x_BxLxC, _ = block(x_BxLxC, cond, mask=mask, deterministic=deterministic)
    h = self.mask_head_nm(x_BxLxC.astype(jnp.float32), cond_BxD.astype(jnp.float32))
    return self.mask_head(h).astype(jnp.float32)

  def __call__(
    self,
    label_B: jax.Array,
    x_BxLm1xCvae: jax.Array,
    own_BxLm1xCvae: jax.Array | None = None,
    masked_BxLm1: jax.Array | None = None,
    *,
    train: bool = False,
  ):
    """Stage 1 (no `own`): VAR's teacher-forced logits. Stage 2: masked-prediction logits
    `[B, L, V]` given the stage-1 input, each scale's own tokens `own` (scales 1..; official
    `idxBl_to_mask_input`) and which of them are masked (`masked`, bool `[B, L - first_l]`)."""
    if own_BxLm1xCvae is None:
      return super().__call__(label_B, x_BxLm1xCvae, train=train)
    if not self.mask_depth:
      raise ValueError("masked prediction needs the stage-2 parameters (model.mask_depth > 0)")
    if self.is_initializing():  # create the stage-1 path's parameters too (its blocks and head)
      super().__call__(label_B, x_BxLm1xCvae, train=False)
    B, first_l = label_B.shape[0], self.lengths[0]
    want = (B, self.seq_len - first_l)
    if own_BxLm1xCvae.shape[:2] != want or masked_BxLm1.shape != want:
      raise ValueError(
        f"own {own_BxLm1xCvae.shape[:2]} / masked {masked_BxLm1.shape} must be [B, L - first_l] "
        f"= {list(want)}"
      )
    if train and self.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), (B,)) < self.cond_drop_rate
      label_B = jnp.where(drop, self.num_classes, label_B)
    cond_BxD = self.class_emb(label_B)
    sos = jnp.broadcast_to(cond_BxD[:, None, :] + self.pos_start, (B, first_l, self.width))
    words = self.word_embed(x_BxLm1xCvae.astype(jnp.float32))
    words = words + self._own_embed(own_BxLm1xCvae, masked_BxLm1)
    x = jnp.concatenate([sos, words], axis=1) + self._lvl_pos()
    mask = next_scale.train_mask(self.mask, self.lengths)
    return self._mask_path(x, cond_BxD, mask, not train)

  def mask_step(self, x_BxlxC, own_Bxlxcvae, masked_Bxl, cond_2BxD) -> jax.Array:
    """One masked step of a scale in decoding: `x` is the scale's stage-1 input (conditional
    half, lvl/pos included); returns the mask head's `[cond; uncond]` logits `[2B, l, V]`."""
    x = x_BxlxC + self._own_embed(own_Bxlxcvae, masked_Bxl)
    return self._mask_path(jnp.concatenate([x, x], axis=0), cond_2BxD, masks.full(), True)


def _fill(boxed, values):
  """Boxed (logically annotated) params with their values replaced by `values` (same tree)."""

  def one(box, v):
    if isinstance(box, nn.Partitioned):
      return box.replace_boxed(jnp.asarray(v, box.value.dtype))
    return jnp.asarray(v, box.dtype)

  return jax.tree.map(one, boxed, values, is_leaf=lambda x: isinstance(x, nn.Partitioned))


class HMARFamily(var_lib.VARFamily):
  """HMAR as a Family (`config.model.stage` 1 or 2; see the module docstring).

  Extra `config.model` fields: `stage`, `mask_depth` (official `n_layers_train`),
  `mask_schedule` (empty = official), `stage1_checkpoint` (stage 2: the stage-1 workdir; empty =
  train it first under `WORKDIR/stage1` for `stage1_steps` steps).
  """

  name = "hmar"
  module_class = HMAR

  def __init__(self, config, tokenizer):
    m = config.model
    if str(m.get("mask", "")) != "block_diagonal":
      raise ValueError(
        f"model.mask={m.get('mask')!r}: HMAR is Markovian, its mask is 'block_diagonal'"
      )
    if str(m.get("head", "categorical")) != "categorical" or str(m.scales) != "residual":
      raise ValueError("HMAR needs model.head='categorical' and model.scales='residual'")
    super().__init__(config, tokenizer)
    self.stage = int(m.stage)
    if self.stage not in (1, 2):
      raise ValueError(f"model.stage={self.stage} must be 1 (next-scale) or 2 (masked prediction)")
    self.mask_depth = int(m.mask_depth) if self.stage == 2 else 0
    if self.stage == 2 and not 0 < self.mask_depth <= self.module.depth:
      raise ValueError(f"model.mask_depth={self.mask_depth} must be in [1, model.depth]")
    self.module = self.module.clone(mask_depth=self.mask_depth)
    self.mask_schedule = check_mask_schedule(m.mask_schedule, self.patch_nums)
    self.mask_keys = ()
    self._stage1 = None  # stage 2: the stage-1 params, set by `load_frozen`
    if self.stage == 2:
      blocks = tuple(f"mask_blocks_{j}" for j in range(self.mask_depth))
      self.mask_keys = ("mask_embed", *blocks, "mask_head_nm", "mask_head")
      every = jax.eval_shape(lambda r: super(HMARFamily, self).init_annotated(r), jax.random.key(0))
      self.stage1_keys = tuple(sorted(k for k in every if k not in self.mask_keys))
      # The stage-1 params are supplied by the loop and never trained (official: requires_grad
      # False on everything but mask_embed, the last blocks and the head).
      self.frozen_keys = ("tokenizer", *self.stage1_keys)

  # --- params ------------------------------------------------------------------------------------

  def _vars(self, params) -> dict:
    return {"params": {k: v for k, v in params.items() if k != "tokenizer"}}

  def init_inputs(self) -> tuple:
    label, x = super().init_inputs()
    if self.stage == 1:
      return label, x
    return label, x, jnp.zeros_like(x), jnp.zeros(x.shape[:2], bool)

  def init_annotated(self, rng: jax.Array, batch=None) -> dict:
    params = super().init_annotated(rng, batch)
    if self.stage == 1:
      return params
    out = {k: params[k] for k in self.mask_keys}
    if self._stage1 is not None:  # official fine-tuning starts from the stage-1 blocks and head
      first = self.module.depth - self.mask_depth
      for j in range(self.mask_depth):
        out[f"mask_blocks_{j}"] = _fill(
          out[f"mask_blocks_{j}"], self._stage1[f"blocks_{first + j}"]
        )
      out["mask_head"] = _fill(out["mask_head"], self._stage1["head"])
      out["mask_head_nm"] = _fill(out["mask_head_nm"], self._stage1["head_nm"])
    return out

  def init_frozen(self, rng: jax.Array) -> dict:
    """Stage 2: random stage-1 params (what `load_frozen` would load), for tests and benches."""
    if self.stage == 1:
      return {}
    every = nn.unbox(super().init_annotated(rng))
    return {k: every[k] for k in self.stage1_keys}

  def stage1_config(self, workdir: str) -> mlc.ConfigDict:
    """The stage-1 run of a stage-2 config (same model, data and tokenizer)."""
    c = mlc.ConfigDict(self.config.to_dict())
    c.model.stage = 1
    c.total_steps = int(c.model.stage1_steps)
    c.checkpoint_every = c.total_steps
    if not c.tokenizer.checkpoint:
      c.tokenizer.checkpoint = os.path.join(workdir, "tokenizer")
    c.lock()
    return c

  def load_frozen(self, workdir: str) -> dict:
    """Stage 2: the stage-1 params (trained first under `WORKDIR/stage1` unless
    `model.stage1_checkpoint` names them), checked key by key and shape by shape."""
    if self.stage == 1:
      return {}
    from arvision import checkpoint as ckpt_lib  # noqa: PLC0415
    from arvision import train as train_lib  # noqa: PLC0415  (train imports the families)

    path = str(self.config.model.stage1_checkpoint)
    if not path:
      path = os.path.join(workdir, "stage1")
      train_lib.train(self.stage1_config(workdir), path)
    loaded = ckpt_lib.load_params(path)
    params = {k: v for k, v in loaded.get("ema", loaded["params"]).items() if k != "tokenizer"}
    every = jax.eval_shape(lambda r: super(HMARFamily, self).init_annotated(r), jax.random.key(0))
    missing = sorted(set(self.stage1_keys) - set(params))
    extra = sorted(set(params) - set(self.stage1_keys))
    if missing or extra:
      raise errors.UserError(
        f"model.stage1_checkpoint={path!r} is not this model's stage 1: missing {missing}, "
        f"unexpected {extra}"
      )
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(
      {k: nn.unbox(every[k]) for k in self.stage1_keys}
    ):
      src = params
      for k in key_path:
        src = src[k.key]
      if tuple(np.shape(src)) != tuple(leaf.shape):
        raise errors.UserError(
          f"model.stage1_checkpoint={path!r}: {jax.tree_util.keystr(key_path)} has shape "
          f"{tuple(np.shape(src))}, this model expects {tuple(leaf.shape)}"
        )
    self._stage1 = params
    return dict(params)

  # --- stage 2 inputs and loss -------------------------------------------------------------------

  def own_input(self, tok_p, si: int, h_BxpnxpnxC: jax.Array) -> jax.Array:
    """Scale `si`'s own tokens read at its own size, area(phi_si(bicubic(h)), pn) `[B, pn, pn,
    C]` (official `get_next_mask_input` / `idxBl_to_mask_input`), through the tokenizer's step."""
    B, pn = h_BxpnxpnxC.shape[0], h_BxpnxpnxC.shape[1]
    side = self.patch_nums[-1]
    zeros = jnp.zeros((B, side, side, h_BxpnxpnxC.shape[-1]), jnp.float32)
    f, _ = self.tokenizer.next_input(tok_p, si, zeros, h_BxpnxpnxC)
    return f if pn == side else area(f, (pn, pn))

  def own_inputs(self, tok_p, idx_list) -> jax.Array:
    """float32 `[B, L - first_l, C]`: `own_input` of scales 1.. from their codes."""
    codebook = self.tokenizer.codebook(tok_p).astype(jnp.float32)
    B, outs = idx_list[0].shape[0], []
    for si, pn in enumerate(self.patch_nums[1:], start=1):
      h = codebook[idx_list[si]].reshape(B, pn, pn, -1)
      outs.append(self.own_input(tok_p, si, h).reshape(B, pn * pn, -1))
    return jnp.concatenate(outs, axis=1)

  def train_mask(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(bool [L - first_l], p)`: one ratio p ~ U(0, 1) per step; ceil(p n) random tokens of each
    scale after the first are masked, the same for the whole batch (official `MaskTrainer`)."""
    k_p, k_pos = jax.random.split(rng)
    p = jax.random.uniform(k_p, ())
    out = []
    for si, n in enumerate(self.lengths[1:]):
      n_mask = jnp.ceil(n * p).astype(jnp.int32)
      score = jax.random.uniform(jax.random.fold_in(k_pos, si), (1, n))
      out.append(lowest(score, n_mask)[0])
    return jnp.concatenate(out), p

  def apply_masked(self, params, label_B, teacher, own, masked, rng=None, train: bool = False):
    """Stage-2 masked-prediction logits `[B, L, V]` (float32)."""
    return self.apply_module(params, label_B, teacher, own, masked, rng=rng, train=train)

  def loss(self, params, batch, rng, train: bool):
    """Stage 1: VAR's loss (block-diagonal, `lognormal` scale weights). Stage 2: mean CE over
    the masked tokens (official `mask_unweighted`). Metrics: `loss`, `ce`, `acc` (masked tokens),
    `mask_ratio`."""
    if self.stage == 1:
      return super().loss(params, batch, rng, train)
    idx_list = self.targets(params, batch)
    tok_p = params["tokenizer"]
    teacher = self.scales.teacher(tok_p, idx_list, self.tokenizer.codebook(tok_p))
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    own = jax.lax.stop_gradient(self.own_inputs(tok_p, idx_list))
    k_mask, k_drop = jax.random.split(jax.random.key(0) if rng is None else rng)
    masked_Lm1, _ = self.train_mask(k_mask)
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    B = label.shape[0]
    masked = jnp.broadcast_to(masked_Lm1, (B, masked_Lm1.shape[0]))
    logits = self.apply_masked(params, label, teacher, own, masked, rng=k_drop, train=train)
    gt_BxL = jnp.concatenate(idx_list, axis=1)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits, gt_BxL)
    obj_BxL = ce_BxL
    if self.label_smoothing > 0:
      smooth = optax.smooth_labels(jax.nn.one_hot(gt_BxL, logits.shape[-1]), self.label_smoothing)
      obj_BxL = optax.softmax_cross_entropy(logits, smooth)
    w_L = jnp.concatenate([jnp.zeros((self.lengths[0],)), masked_Lm1.astype(jnp.float32)])
    n = jnp.maximum(jnp.sum(w_L), 1.0)
    loss = jnp.mean(obj_BxL @ w_L) / n
    correct = (jnp.argmax(logits, axis=-1) == gt_BxL).astype(jnp.float32)
    metrics = {
      "loss": loss,
      "ce": jnp.mean(ce_BxL @ w_L) / n,
      "acc": jnp.mean(correct @ w_L) / n,
      "mask_ratio": n / w_L.shape[0],
    }
    return loss, metrics

  # --- sampling: masked steps inside a scale -----------------------------------------------------

  def refine_scale(self, params, si, x_2BxlxC, cond_2BxD, idx_Bl, filtered_BxlxV, rng, knobs):
    steps = self.mask_schedule[si] if self.stage == 2 else ()
    if len(steps) <= 1:
      return idx_Bl
    cfg, top_k, top_p = knobs
    B, l = idx_Bl.shape
    pn = self.sample_patch_nums[si]
    tok_p = params["tokenizer"]
    codebook = self.tokenizer.codebook(tok_p).astype(jnp.float32)
    variables = self._vars(params)

    def confidence(filtered, idx):  # the (filtered) probability of each drawn token
      probs = jax.nn.softmax(filtered, axis=-1)
      return jnp.take_along_axis(probs, idx[..., None], axis=-1)[..., 0]

    masked = lowest(confidence(filtered_BxlxV, idx_Bl), sum(steps[1:]))
    scale = 1.0 + cfg * MASK_STEP_CFG_RATIO
    for step in range(1, len(steps)):
      own = self.own_input(tok_p, si, codebook[idx_Bl].reshape(B, pn, pn, -1)).reshape(B, l, -1)
      logits_2B = self.module.apply(
        variables, x_2BxlxC[:B], own, masked, cond_2BxD, method=HMAR.mask_step
      )
      filtered = filter_top_k_top_p(
        guidance.guide(logits_2B[:B], logits_2B[B:], scale), top_k, top_p
      )
      new = jax.random.categorical(jax.random.fold_in(rng, step), filtered, axis=-1)
      idx_Bl = jnp.where(masked, new.astype(jnp.int32), idx_Bl)
      if step != len(steps) - 1:
        still = jnp.where(masked, confidence(filtered, idx_Bl), jnp.inf)
        masked = lowest(still, sum(steps[step + 1 :]))
    return idx_Bl


def official_param_count(depth: int, mask_depth: int = 8, **kw) -> int:
  """The official `HMAR`'s parameter count: VAR's plus `mask_depth` blocks, a second head and
  `mask_embed` (C = 64 depth, H = depth)."""
  C, H, V = 64 * depth, depth, kw.get("vocab_size", 4096)
  block = (3 * C * C + 2 * C + H + C * C + C) + (8 * C * C + 5 * C) + (6 * C * C + 6 * C)
  head = (2 * C * C + 2 * C) + (C * V + V)
  return var_lib.official_param_count(depth, **kw) + mask_depth * block + head + C


build = HMARFamily.build
