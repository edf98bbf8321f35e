"""VAR: visual autoregressive modeling by next-scale prediction (Tian et al., 2024).

A port of the official `models/var.py` (FoundationVision/VAR): the same parameters, init and
forward. Training predicts all scales at once under a block-causal mask (a token of scale k sees
scales <= k); sampling runs the scales one by one with a preallocated KV cache inside ONE jitted
function (static shapes, the ~10-scale loop unrolled).

Parameter names (flax) -> official keys: `word_embed`, `class_emb` (`embedding` = weight),
`pos_start`, `pos_1LC`, `lvl_embed`, `blocks_{i}/{attn/{mat_qkv,q_bias,v_bias,scale_mul,proj},
ffn/{fc1,fc2},ada_lin|ada_gss}`, `shared_ada_lin`, `head_nm/ada_lin`, `head`. Dense kernels are
the transposed torch weights; `scale_mul` is `scale_mul_1H11` flattened to `[H]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from arvision import precision
from arvision.models import heads as heads_lib
from arvision.models import next_scale, scan_layers
from arvision.models.common import Dense, param_count, top1_correct  # noqa: F401
from arvision.models.generator import Generator
from arvision.models.layers import (
  AdaLNBeforeHead,
  AdaLNSelfAttn,
  drop_path_rates,
  scaled_init,
  trunc_normal_init,
)
from arvision.ops import masks
from arvision.parallel.logical import constrain, param_init
from arvision.sampling import guidance
from arvision.sampling.kv_cache import init_kv_caches
from arvision.sampling.topk import filter_top_k_top_p, gumbel_softmax


def scale_bounds(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
  """`[(begin, end), ...]` of each scale's tokens in the flattened sequence."""
  out, cur = [], 0
  for pn in patch_nums:
    out.append((cur, cur + pn * pn))
    cur += pn * pn
  return out


class VAR(nn.Module):
  """The VAR transformer (official `VAR`), pure linen.

  Attributes:
    depth: number of blocks.
    width: C (official: 64 * depth).
    num_heads: H (official: depth).
    vocab_size: V of the tokenizer.
    cvae: tokenizer latent channels (teacher input width).
    num_classes: classes; index `num_classes` is the null (CFG) class.
    patch_nums: side of each scale's token grid.
    mlp_ratio: FFN hidden ratio.
    drop_path_rate: max stochastic-depth rate (linear over blocks).
    cond_drop_rate: probability of replacing the label with the null class in training.
    attn_l2_norm: L2-normalised attention (official default True).
    shared_aln: one shared AdaLN linear + per-block `ada_gss` (d36-s).
    aln, alng: AdaLN init multipliers (`init_adaln`, `init_adaln_gamma`).
    init_head: head weight multiplier.
    init_std: Dense/Embed init std; <= 0 means sqrt(1 / (3C)) as the official default.
    norm_eps: LayerNorm epsilon.
    attn_impl: implementation for `arvision.ops.attention`.
    mask: `next_scale.MASKS` name: "scale_causal" (VAR) or "block_diagonal" (Markovian).
    head_kind: `heads.HEADS` name. "categorical" (VAR: logits over the codebook) or a continuous
      head ("flow", "diffusion") that models each token's code vector given the hidden state.
    head_width, head_depth, head_steps: the continuous head's MLP and sampling steps.
    scan_layers: the blocks as one `nn.scan` over params `blocks` stacked along a leading layer
      axis (`models.scan_layers`; KV caches stacked likewise) instead of `blocks_{i}`.
  """

  depth: int
  width: int
  num_heads: int
  vocab_size: int
  cvae: int
  num_classes: int
  patch_nums: tuple[int, ...]
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  cond_drop_rate: float = 0.1
  attn_l2_norm: bool = True
  shared_aln: bool = False
  aln: float = 0.5
  alng: float = 1e-5
  init_head: float = 0.02
  init_std: float = -1.0
  norm_eps: float = 1e-6
  attn_impl: str = "auto"
  mask: str = "scale_causal"
  head_kind: str = "categorical"
  head_width: int = 0
  head_depth: int = 2
  head_steps: int = 25
  scan_layers: bool = False

  @property
  def lengths(self) -> tuple[int, ...]:
    return tuple(pn * pn for pn in self.patch_nums)

  @property
  def seq_len(self) -> int:
    return sum(self.lengths)

  def setup(self):
    C = self.width
    auto_std = math.sqrt(1.0 / (3 * C))
    std = self.init_std if self.init_std > 0 else auto_std
    tn = trunc_normal_init(std)
    zeros = nn.initializers.zeros
    first_l = self.lengths[0]
    embed_b = param_init(zeros, ("embed",))
    dtype = precision.current_dtype()  # compute dtype (params stay float32)
    self.word_embed = Dense(
      C, kernel_init=param_init(tn, ("latent", "embed")), bias_init=embed_b, dtype=dtype
    )
    self.class_emb = nn.Embed(
      self.num_classes + 1, C, embedding_init=param_init(tn, ("classes", "embed")), dtype=dtype
    )
    self._setup_positions(first_l, auto_std, tn, dtype)
    if self.shared_aln:
      self.shared_ada_lin = Dense(
        6 * C,
        kernel_init=param_init(tn, ("embed", "mlp")),
        bias_init=param_init(zeros, ("mlp",)),
        dtype=dtype,
      )
    dpr = drop_path_rates(self.drop_path_rate, self.depth)
    if self.scan_layers:  # one block whose params stack all layers; the rates are scanned inputs
      self.blocks = self._make_block(max(dpr), std)
    else:
      self.blocks = [self._make_block(dpr[i], std) for i in range(self.depth)]
    self.head_nm = AdaLNBeforeHead(init_std=std, init_adaln=self.aln, norm_eps=self.norm_eps)
    if self.head_kind != "categorical":
      self.head = heads_lib.head_class(self.head_kind)(
        self.cvae, C, self.head_width or C, self.head_depth, self.head_steps
      )
      return
    self.head = heads_lib.CategoricalHead(
      self.vocab_size,
      kernel_init=param_init(scaled_init(tn, self.init_head), ("embed", "vocab")),
      bias_init=param_init(zeros, ("vocab",)),
    )

  def _make_block(self, drop_path_rate: float, init_std: float) -> nn.Module:
    """One transformer block (VAR's `AdaLNSelfAttn`; a successor with another block, e.g.
    M-VAR's attention + Mamba2 + FFN, overrides this). The block takes `(x, cond, mask=,
    deterministic=, cache=, cache_index=)` and returns `(x, new_cache)`."""
    return AdaLNSelfAttn(
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      drop_path_rate=drop_path_rate,
      attn_l2_norm=self.attn_l2_norm,
      shared_aln=self.shared_aln,
      depth=self.depth,
      init_std=init_std,
      aln=self.aln,
      alng=self.alng,
      norm_eps=self.norm_eps,
      attn_impl=self.attn_impl,
    )

  def _setup_positions(self, first_l: int, auto_std: float, tn, dtype):
    """VAR's per-scale tables: `pos_start [1, first_l, C]`, `pos_1LC [1, L, C]`, `lvl_embed
    [num_scales, C]` (a successor with other position params overrides this and `_lvl_pos`);
    `dtype` is the compute dtype."""
    C = self.width
    # pos_* are initialised in the official constructor with the automatic std, never re-inited.
    pos_init = param_init(trunc_normal_init(auto_std), (None, "seq", "embed"))
    self.pos_start = self.param("pos_start", pos_init, (1, first_l, C))
    self.pos_1LC = self.param("pos_1LC", pos_init, (1, self.seq_len, C))
    self.lvl_embed = nn.Embed(
      len(self.patch_nums), C, embedding_init=param_init(tn, (None, "embed")), dtype=dtype
    )

  # --- pieces shared by training and cached decoding -------------------------------------------

  def _lvl_pos(self) -> jax.Array:
    """`lvl_embed(lvl_1L) + pos_1LC`, `[1, L, C]`."""
    lvl_1L = np.concatenate([np.full((n,), i, np.int32) for i, n in enumerate(self.lengths)])
    return self.lvl_embed(jnp.asarray(lvl_1L))[None] + self.pos_1LC

  def _block_cond(self, cond_BxD: jax.Array) -> jax.Array:
    if self.shared_aln:
      return self.shared_ada_lin(nn.silu(cond_BxD)).reshape(-1, 1, 6, self.width)
    return cond_BxD

  def _logits(self, x_BxLxC: jax.Array, cond_BxD: jax.Array) -> jax.Array:
    # fp32 island, as the official `get_logits` (`.float()`).
    x = self.head_nm(x_BxLxC.astype(jnp.float32), cond_BxD.astype(jnp.float32))
    if self.head_kind != "categorical":  # a continuous head's condition z, `[B, L, C]`
      if self.is_initializing():  # create the head's params
        self.head(
          jnp.zeros(x.shape[:2] + (self.cvae,)).reshape(-1, self.cvae), x.reshape(-1, self.width)
        )
      return x
    return constrain(self.head(x).astype(jnp.float32), ("batch", "seq", "vocab"))

  # --- training forward ------------------------------------------------------------------------

  def __call__(self, label_B: jax.Array, x_BxLm1xCvae: jax.Array, *, train: bool = False):
    """Teacher-forced logits for all scales.

    Args:
      label_B: int class labels in [0, num_classes] (num_classes = null class).
      x_BxLm1xCvae: teacher input (`idx_to_var_input`), `[B, L - first_l, Cvae]`.
      train: enables cond drop (label -> null with `cond_drop_rate`) and drop path; needs a
        'dropout' rng.

    Returns:
      float32 logits `[B, L, V]`.
    """
    B = label_B.shape[0]
    L, first_l = self.seq_len, self.lengths[0]
    if x_BxLm1xCvae.shape[1:] != (L - first_l, self.cvae):
      raise ValueError(
        f"teacher input shape {x_BxLm1xCvae.shape} != [B, {L - first_l}, {self.cvae}] for "
        f"patch_nums={self.patch_nums}"
      )
    if train and self.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), (B,)) < self.cond_drop_rate
      label_B = jnp.where(drop, self.num_classes, label_B)
    cond_BxD = self.class_emb(label_B)
    sos = cond_BxD[:, None, :] + self.pos_start
    sos = jnp.broadcast_to(sos, (B, first_l, self.width))
    x = jnp.concatenate([sos, self.word_embed(x_BxLm1xCvae.astype(jnp.float32))], axis=1)
    # The residual stream in the compute dtype (the fp32 position tables promote the sum).
    x = constrain(precision.cast(x + self._lvl_pos()), ("batch", "seq", "embed"))

    cond = self._block_cond(cond_BxD)
    mask = next_scale.train_mask(self.mask, self.lengths)
    if self.scan_layers:
      x, _ = self._scan(x, cond, mask=mask, deterministic=not train)
      return self._logits(x, cond_BxD)
    for block in self.blocks:
      x, _ = precision.block(block, x, cond, mask=mask, deterministic=not train)
    return self._logits(x, cond_BxD)

  def _scan(self, x, cond, caches=None, **kw):
    """The blocks as one `nn.scan` (scan_layers): each layer's drop-path rate and cache are
    scanned inputs; returns `(x, stacked new caches or None)`."""

    def layer(block, x, xs, cond):
      rate, cache = xs
      return block(x, cond, cache=cache, layer_drop_path=rate, **kw)

    xs = (jnp.asarray(drop_path_rates(self.drop_path_rate, self.depth), jnp.float32), caches)
    return scan_layers.scan_blocks(self.blocks, self.depth, layer, x, xs, cond)

  def head_loss(self, target_NxC: jax.Array, z_NxC: jax.Array) -> jax.Array:
    """A continuous head's loss (rng stream "diffusion")."""
    return self.head(target_NxC, z_NxC)

  def head_sample(self, z_2NxC: jax.Array, cfg, rng: jax.Array) -> jax.Array:
    """A continuous head's guided samples for `[cond; uncond]` rows, `[2N, cvae]`."""
    return self.head.sample(z_2NxC, 1.0, cfg, self.head_steps, rng, guided=True)

  # --- cached decoding (called through `apply(..., method=...)`) --------------------------------

  def first_tokens(self, label_B: jax.Array):
    """The first scale's input and the condition: `(x [B, first_l, C], cond [B, D])`."""
    cond_BxD = self.class_emb(label_B)
    first_l = self.lengths[0]
    x = cond_BxD[:, None, :] + self.pos_start + self._lvl_pos()[:, :first_l]
    return precision.cast(x), cond_BxD

  def embed_next(self, next_BxlxCvae: jax.Array, si: int) -> jax.Array:
    """Input tokens of scale `si`: `word_embed(next) + lvl_pos[scale si]`."""
    b, e = scale_bounds(self.patch_nums)[si]
    x = self.word_embed(next_BxlxCvae.astype(jnp.float32)) + self._lvl_pos()[:, b:e]
    return precision.cast(x)

  def step(self, x_BxlxC: jax.Array, cond_BxD: jax.Array, caches: list | None, si: int):
    """Runs scale `si` through all blocks; returns `(logits [B, l, V], caches)`.

    scale_causal: queries of scale si see every cached token (scales <= si), a full mask on the
    cache prefix. block_diagonal: they see scale si only, so `caches` is None (nothing cached).
    """
    b, e = scale_bounds(self.patch_nums)[si]
    if x_BxlxC.shape[1] != e - b:
      raise ValueError(f"scale {si} expects {e - b} tokens, got {x_BxlxC.shape[1]}")
    cond = self._block_cond(cond_BxD)
    if self.scan_layers:  # caches: one (k, v) pair stacked over layers (`scan_layers.stack_caches`)
      kw = dict(mask=masks.full(), deterministic=True, cache_index=b)
      x, new_caches = self._scan(x_BxlxC, cond, caches, **kw)
      return self._logits(x, cond_BxD), new_caches
    x, new_caches = x_BxlxC, None if caches is None else []
    for i, block in enumerate(self.blocks):
      if caches is None:
        x, _ = block(x, cond, mask=masks.full(), deterministic=True)
      else:
        x, cache = block(
          x, cond, mask=masks.full(), deterministic=True, cache=caches[i], cache_index=b
        )
        new_caches.append(cache)
    return self._logits(x, cond_BxD), new_caches


# ------------------------------------------------------------------------------------------------
# Family


class VARFamily(Generator):
  """VAR as a Family: trains on a frozen multi-scale VQ tokenizer (`params["tokenizer"]`).

  The tokenizer family must provide `codebook`, `config.model.{patch_nums, vocab_size, embed_dim
  or z_channels}` and the methods of the `model.scales` strategy (`next_scale.SCALE_INPUTS`).
  Variant hooks (`config.model`): `mask`, `scales`, `scale_loss` (see `next_scale`), `head`
  (`heads.HEADS`: `categorical` logits, or a continuous head over code vectors) and
  `sample_patch_nums` (the sampling schedule; VAR's must equal the training one, its tables are
  per scale; a subclass without per-scale tables sets `per_scale_tables = None`).
  """

  name = "var"
  accepts_scan_layers = True  # set on the class itself: a subclass must opt in (`Generator`)
  tokenizer_methods = ("codebook",)
  sampler_static = ("more_smooth", "return_logits", "cfg_schedule")
  # Params sized by the training scale schedule (a successor without them may sample another).
  per_scale_tables = "pos_1LC [1, L, C] and lvl_embed [num_scales, C]"

  def __init__(self, config, tokenizer):
    super().__init__(config, tokenizer)
    m = config.model
    tm = tokenizer.config.model
    depth = int(m.depth)
    if depth <= 0:
      raise ValueError(f"model.depth={depth} must be a positive int")
    width = int(m.get("width", 0)) or 64 * depth
    heads = int(m.get("num_heads", 0)) or depth
    if width % heads:
      raise ValueError(f"model.width={width} is not divisible by model.num_heads={heads}")
    dpr = float(m.get("drop_path_rate", -1.0))
    if dpr < 0:
      dpr = 0.1 * depth / 24
    self.patch_nums = self.training_patch_nums(config, tokenizer)
    scales = str(m.get("scales", "residual"))
    self.sample_patch_nums = next_scale.check_sample_schedule(
      self.patch_nums, m.get("sample_patch_nums", ()), self.per_scale_tables, scales
    )
    self.scales = next_scale.scale_inputs(scales, tokenizer, self.patch_nums)
    # Sampling walks `sample_patch_nums` (the training schedule unless a model can change it).
    self.sample_scales = next_scale.scale_inputs(scales, tokenizer, self.sample_patch_nums)
    self.label_smoothing = float(m.get("label_smoothing", 0.0))
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"model.label_smoothing={self.label_smoothing} must be in [0, 1)")
    self.scale_weights = next_scale.scale_weights(
      str(m.get("scale_loss", "tokens")),
      self.patch_nums,
      float(m.get("scale_loss_mu", 0.0)),
      float(m.get("scale_loss_sigma", 1.0)),
    )
    head = str(m.get("head", "categorical"))
    heads_lib.head_class(head)  # fails now on an unknown head
    # A continuous head models each token's code vector (FlowAR-style) instead of its index.
    self.continuous = head != "categorical"
    self.module = self.module_class(
      depth=depth,
      width=width,
      num_heads=heads,
      vocab_size=int(tm.vocab_size),
      # The codebook / f_hat width: `embed_dim` where the tokenizer has one (= z_channels in VAR).
      cvae=int(tm.embed_dim) if "embed_dim" in tm else int(tm.z_channels),
      num_classes=self.num_classes,
      patch_nums=self.patch_nums,
      mlp_ratio=float(m.get("mlp_ratio", 4.0)),
      drop_path_rate=dpr,
      cond_drop_rate=float(m.get("cond_drop_rate", 0.1)),
      attn_l2_norm=bool(m.get("attn_l2_norm", True)),
      shared_aln=bool(m.get("shared_aln", False)),
      aln=float(m.get("aln", 0.5)),
      alng=float(m.get("alng", 1e-5)),
      init_head=float(m.get("init_head", 0.02)),
      init_std=float(m.get("init_std", -1.0)),
      norm_eps=float(m.get("norm_eps", 1e-6)),
      attn_impl=str(m.get("attn_impl", "auto")),
      mask=str(m.get("mask", "scale_causal")),
      head_kind=head,
      head_width=int(m.get("head_width", 0)),
      head_depth=int(m.get("head_depth", 2)),
      head_steps=int(m.get("head_steps", 25)),
      scan_layers=scan_layers.enabled(config),
      **self.module_extra(config, tokenizer),
    )
    next_scale.train_mask(self.module.mask, self.module.lengths)  # fails now on an unknown mask
    self.lengths = self.module.lengths
    self.seq_len = self.module.seq_len

  # Hooks for a successor with another linen module (a `VAR` subclass) or scale schedule.
  module_class = VAR

  def training_patch_nums(self, config, tokenizer) -> tuple[int, ...]:
    """The training scale schedule: VAR's is its multi-scale tokenizer's."""
    del config
    return tuple(int(p) for p in tokenizer.config.model.patch_nums)

  def module_extra(self, config, tokenizer) -> dict:
    """Extra attributes of `module_class` (none for VAR)."""
    del config, tokenizer
    return {}

  def init_rngs(self, rng: jax.Array) -> dict:
    return {"params": rng, "diffusion": rng} if self.continuous else {"params": rng}

  def init_inputs(self) -> tuple:
    label = jnp.zeros((1,), jnp.int32)
    return label, jnp.zeros((1, self.seq_len - self.lengths[0], self.module.cvae), jnp.float32)

  # --- training ----------------------------------------------------------------------------------

  def apply(self, params, label_B, teacher_BxLm1xCvae, rng=None, train: bool = False):
    """Teacher-forced logits `[B, L, V]` (float32)."""
    return self.apply_module(params, label_B, teacher_BxLm1xCvae, rng=rng, train=train)

  def targets(self, params, batch) -> list[jax.Array]:
    """Per-scale ground-truth indices `[B, pn*pn]` from `batch["image"]` (or `batch["tokens"]`)."""
    tokens = self.batch_tokens(batch, (self.seq_len,), True, "all scales concatenated")
    if tokens is not None:
      return [tokens[:, b:e] for b, e in scale_bounds(self.patch_nums)]
    idx = self.scales.targets(params["tokenizer"], batch["image"])
    return [jax.lax.stop_gradient(i).astype(jnp.int32) for i in idx]

  def loss(self, params, batch, rng, train: bool):
    """Per-token CE, uniform 1/L weights summed over tokens, averaged over the batch (or, with
    `model.scale_loss`, per-scale mean CE weighted over scales).

    Metrics: `loss` (the objective, with label smoothing), `ce` (plain CE), `acc`, and per scale
    `loss_s{k}` (plain CE) and `acc_s{k}`.
    """
    idx_list = self.targets(params, batch)
    tok_p = params["tokenizer"]
    teacher = self.scales.teacher(tok_p, idx_list, self.tokenizer.codebook(tok_p))
    teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
    label = jnp.asarray(batch["label"]).astype(jnp.int32)
    gt_BxL = jnp.concatenate(idx_list, axis=1)
    if self.continuous:
      return self._head_loss(params, label, teacher, gt_BxL, rng, train)
    logits_BxLxV = self.apply(params, label, teacher, rng=rng, train=train)
    V = logits_BxLxV.shape[-1]
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, gt_BxL)
    if self.label_smoothing > 0:
      # torch CrossEntropyLoss(label_smoothing): target = (1 - ls) * onehot + ls / V.
      smooth = optax.smooth_labels(jax.nn.one_hot(gt_BxL, V), self.label_smoothing)
      obj_BxL = optax.softmax_cross_entropy(logits_BxLxV, smooth)
    else:
      obj_BxL = ce_BxL
    bounds = scale_bounds(self.patch_nums)
    if self.scale_weights is None:
      loss = jnp.mean(jnp.sum(obj_BxL / self.seq_len, axis=1))
    else:
      per_scale = next_scale.scale_mean(obj_BxL, bounds)
      loss = jnp.mean(per_scale @ jnp.asarray(self.scale_weights, jnp.float32))
    correct_BxL = top1_correct(logits_BxLxV, gt_BxL)
    metrics = {"loss": loss, "ce": jnp.mean(ce_BxL), "acc": jnp.mean(correct_BxL)}
    for k, (b, e) in enumerate(bounds):
      metrics[f"loss_s{k}"] = jnp.mean(ce_BxL[:, b:e])
      metrics[f"acc_s{k}"] = jnp.mean(correct_BxL[:, b:e])
    return loss, metrics

  def _head_loss(self, params, label, teacher, gt_BxL, rng, train):
    """A continuous head's loss on the ground-truth code vectors of every token."""
    k_drop, k_head = jax.random.split(jax.random.key(0) if rng is None else rng)
    z_BxLxC = self.apply(params, label, teacher, rng=k_drop, train=train)
    target = self.tokenizer.codebook(params["tokenizer"])[gt_BxL].astype(jnp.float32)
    z, target = z_BxLxC.reshape(-1, z_BxLxC.shape[-1]), target.reshape(-1, target.shape[-1])
    rngs = {"diffusion": k_head}
    target = jax.lax.stop_gradient(target)
    with self.computing():
      loss = self.module.apply(self._vars(params), target, z, method=VAR.head_loss, rngs=rngs)
    return loss, {"loss": loss}

  def _head_pick(self, params, out_2Bxlxc, scale, rng, codebook_VxC):
    """A continuous head's sampled code vectors `[B, l, C]` and their nearest codes `[B, l]`."""
    B, l, _ = out_2Bxlxc.shape
    B //= 2
    z = out_2Bxlxc.reshape(2 * B * l, -1)  # rows: the B*l conditional, then the unconditional
    with self.computing():
      h = self.module.apply(self._vars(params), z, scale, rng, method=VAR.head_sample)[: B * l]
    dist = jnp.sum(codebook_VxC**2, axis=-1) - 2.0 * h @ codebook_VxC.T  # + |h|^2, constant
    return h.reshape(B, l, -1), jnp.argmin(dist, axis=-1).astype(jnp.int32).reshape(B, l)

  # --- sampling ----------------------------------------------------------------------------------

  def _sample_impl(
    self, params, labels, rng, knobs, known, *, more_smooth, return_logits, cfg_schedule
  ):
    """knobs: traced `(cfg, top_k, top_p)`; known: None or per-scale `(idx, mask)` lists."""
    tok_p, var_vars, mod = params["tokenizer"], self._vars(params), self.module
    (cfg, top_k, top_p), (known_idx, known_mask) = knobs, known or (None, None)
    pns = self.sample_patch_nums
    B, n, Cvae = labels.shape[0], len(pns), mod.cvae
    x, cond_2BxD = mod.apply(var_vars, self.labels_2B(labels), method=VAR.first_tokens)
    caches = self.init_caches(2 * B, x.dtype)
    codebook_VxC = self.tokenizer.codebook(tok_p).astype(jnp.float32)
    state = self.sample_scales.init_state(B, Cvae)
    idx_out, logits_out = [], []
    for si, pn in enumerate(pns):
      ratio = si / (n - 1) if n > 1 else 0.0
      logits_2Bxlxv, caches = mod.apply(var_vars, x, cond_2BxD, caches, si, method=VAR.step)
      scale = next_scale.cfg_scale(cfg_schedule, cfg, si, n)
      rng, k_idx, k_gumbel = jax.random.split(rng, 3)
      h_BlC = logits = None  # h: a soft or continuous code vector, else the code's entry
      if self.continuous:  # the step's output is the head's condition z, not logits
        h_BlC, idx_Bl = self._head_pick(params, logits_2Bxlxv, scale, k_idx, codebook_VxC)
      else:
        logits = guidance.guide(logits_2Bxlxv[:B], logits_2Bxlxv[B:], scale)
        filtered = filter_top_k_top_p(logits, top_k, top_p)
        idx_Bl = jax.random.categorical(k_idx, filtered, axis=-1).astype(jnp.int32)
        idx_Bl = self.refine_scale(params, si, x, cond_2BxD, idx_Bl, filtered, k_idx, knobs)
        if more_smooth:
          tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
          h_BlC = gumbel_softmax(k_gumbel, filtered * (1 + ratio), tau) @ codebook_VxC
      if known is not None:
        idx_Bl = jnp.where(known_mask[si], known_idx[si], idx_Bl)
      if h_BlC is None:
        h_BlC = codebook_VxC[idx_Bl]
      elif known is not None:
        h_BlC = jnp.where(known_mask[si][..., None], codebook_VxC[idx_Bl], h_BlC)
      idx_out.append(idx_Bl)
      logits_out.append(logits)
      state, nxt = self.sample_scales.advance(tok_p, si, state, h_BlC.reshape(B, pn, pn, Cvae))
      if si != n - 1:
        x = mod.apply(var_vars, nxt.reshape(B, -1, Cvae), si + 1, method=VAR.embed_next)
        x = jnp.concatenate([x, x], axis=0)
    img_u8 = self.decode_images(params, state, "decode_fhat")
    return img_u8, idx_out, (logits_out if return_logits else None)

  def init_caches(self, batch: int, dtype) -> list | None:
    """The per-block decoding caches `VAR.step` threads through the scales: KV caches for
    `scale_causal`; None for `block_diagonal` (a scale sees only itself, nothing to cache). A
    successor whose blocks carry another state (M-VAR: Mamba2's) overrides this."""
    mod = self.module
    if mod.mask != "scale_causal":
      return None
    hd = mod.width // mod.num_heads
    L = sum(pn * pn for pn in self.sample_patch_nums)
    caches = init_kv_caches(mod.depth, batch, L, mod.num_heads, hd, dtype)
    return scan_layers.stack_caches(caches) if mod.scan_layers else caches

  def refine_scale(self, params, si, x_2BxlxC, cond_2BxD, idx_Bl, filtered_BxlxV, rng, knobs):
    """A successor's extra steps inside scale `si` once its tokens are drawn (HMAR: masked
    re-prediction of the least confident ones); VAR has none. Args: the scale's embedded input
    (both CFG halves), the condition, the drawn tokens, their filtered logits, the key they were
    drawn with (derive new keys with `fold_in`, VAR's stream stays as it is) and the traced
    `(cfg, top_k, top_p)`. Returns the tokens `[B, l]`."""
    del params, si, x_2BxlxC, cond_2BxD, filtered_BxlxV, rng, knobs
    return idx_Bl

  def sample_tokens(self, params, labels, rng, **settings):
    """Samples images and returns the per-scale tokens too.

    Args:
      params: VAR params plus `params["tokenizer"]`.
      labels: int `[B]` class labels in [0, num_classes] (`num_classes` = unconditional).
      rng: a jax PRNG key; the result is a deterministic function of it.
      **settings: `SAMPLE_SETTINGS` (defaults there):
        cfg: guidance; logits = uncond + s (cond - uncond) with s = 1 + t, t = cfg * si /
          (num_scales - 1) under the official "linear" `cfg_schedule` (see `next_scale.cfg_scale`).
        top_k: keep the k largest logits (0 = off). top_p: nucleus threshold (0 = off).
        more_smooth: Gumbel-softmax soft embeddings (visualisation only, as official).
        known_idx, known_mask: optional per-scale `[B, pn*pn]` tokens and bool masks; masked
          positions are teacher-forced at every scale (zero-shot inpainting/outpainting/editing).
        return_logits: also return the guided logits `[B, pn*pn, V]` per scale (unfiltered).
        cfg_schedule: "linear" (official), "constant" (s = 1 + cfg) or one s per scale (static).
      cfg, top_k and top_p are traced (no recompilation); the others are static.

    Returns:
      `(images uint8 [B, H, W, C], idx list of int32 [B, pn*pn], logits list or None)`.
    """
    unknown = sorted(set(settings) - set(SAMPLE_SETTINGS))
    if unknown:
      raise ValueError(
        f"var sampling settings {unknown} unknown; accepted: {list(SAMPLE_SETTINGS)}"
      )
    s = {**SAMPLE_SETTINGS, **settings}
    labels = self.check_labels(labels)
    known = next_scale.check_known(
      self.sample_patch_nums, labels.shape[0], s["known_idx"], s["known_mask"]
    )
    schedule = s["cfg_schedule"]
    schedule = schedule if isinstance(schedule, str) else tuple(float(v) for v in schedule)
    next_scale.cfg_scale(schedule, 0.0, 0, len(self.sample_patch_nums))  # fails now if bad
    knobs = (jnp.float32(s["cfg"]), jnp.int32(s["top_k"]), jnp.float32(s["top_p"]))
    static = dict(more_smooth=bool(s["more_smooth"]), return_logits=bool(s["return_logits"]))
    return self._sample_jit(params, labels, rng, knobs, known, cfg_schedule=schedule, **static)


# Sampling settings and their defaults (official VAR): traced ones never recompile the sampler.
TRACED_SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96)
STATIC_SETTINGS = dict(more_smooth=False, return_logits=False, cfg_schedule="linear")
SAMPLE_SETTINGS = {**TRACED_SETTINGS, **STATIC_SETTINGS, "known_idx": None, "known_mask": None}


def official_param_count(
  depth: int,
  vocab_size: int = 4096,
  cvae: int = 32,
  num_classes: int = 1000,
  patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  shared_aln: bool = False,
) -> int:
  """The official VAR's `sum(p.numel() for p in var.parameters())` from the architecture formula.

  C = 64 * depth, H = depth. Buffers (`zero_k_bias`, `lvl_1L`, `attn_bias_for_masking`) are not
  parameters and are not counted.
  """
  C, H = 64 * depth, depth
  L = sum(p * p for p in patch_nums)
  emb = (cvae * C + C) + (num_classes + 1) * C + C + L * C + len(patch_nums) * C
  attn = 3 * C * C + 2 * C + H + (C * C + C)
  ffn = (C * 4 * C + 4 * C) + (4 * C * C + C)
  ada = 6 * C if shared_aln else (C * 6 * C + 6 * C)
  shared = (C * 6 * C + 6 * C) if shared_aln else 0
  head = (C * 2 * C + 2 * C) + (C * vocab_size + vocab_size)
  return emb + depth * (attn + ffn + ada) + shared + head


build = VARFamily.build
