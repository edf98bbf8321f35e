"""Next-scale variant hooks, chosen by name in `config.model` (VAR and its successors).

- `mask`: which earlier tokens a scale attends to. `scale_causal` (VAR: scales <= k) or
  `block_diagonal` (Markovian variants, HMAR / M-VAR: scale k only; its input already carries
  the previous scales, so decoding needs no KV cache).
- `scales`: what a scale's input is. `residual` (VAR: the running sum f_hat of the upsampled
  residual codes, read at the next scale's size) or `independent` (FlexVAR-style: each scale is
  its own quantization of the downsampled latent; the next input is the current scale's map
  upsampled). Both run through the tokenizer's methods (`ScaleInputs.methods`).
- sampling: `cfg_scale` (the `cfg_schedule` setting) and `check_known` (teacher-forced tokens).
- `scale_loss`: how scales weigh in the loss. `tokens` (VAR: every token 1/L, so a scale weighs
  by its token count) or `lognormal` (HMAR's `loss_reweight_type: lognorm`: scale k's mean loss
  weighted by a normal density over the standardised scale sides, in reverse order; see
  `scale_weights`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arvision.ops import masks
from arvision.sampling import guidance

MASKS = {"scale_causal": masks.scale_causal, "block_diagonal": masks.block_diagonal}
SCALE_LOSSES = ("tokens", "lognormal")


def train_mask(name: str, lengths) -> masks.MaskSpec:
  """The teacher-forcing mask `model.mask=name` over scales of `lengths` tokens."""
  if name not in MASKS:
    raise ValueError(
      f"model.mask={name!r} is unknown for next-scale models; accepted: {list(MASKS)}"
    )
  return MASKS[name](lengths)


def scale_weights(name: str, patch_nums, mu: float = 0.0, sigma: float = 1.0) -> np.ndarray:
  """float64 `[num_scales]` loss weight of each scale's mean token loss (sums to 1), or None for
  `tokens` (VAR's per-token 1/L, kept as its own formula so the default loss is unchanged).

  `lognormal` is HMAR's `lognorm` (official `Trainer.norm_dist_equivalent`): with r = pn / pn_last
  and z_i = (r_{n-1-i} - mean(r)) / std(r) (sample std, ddof 1; the sides taken in *reverse*
  order, so the first, coarsest scale gets the z of the largest side), scale i weighs
  N(z_i; mu, sigma), normalised over scales. The official code is mu = 0, sigma = 1; each token
  of scale i then carries w_i / pn_i^2, which is w_i times scale i's mean loss.
  """
  if name == "tokens":
    return None
  if name != "lognormal":
    raise ValueError(f"model.scale_loss={name!r} is unknown; accepted: {list(SCALE_LOSSES)}")
  if sigma <= 0:
    raise ValueError(f"model.scale_loss_sigma={sigma} must be > 0")
  pns = np.asarray(patch_nums, np.float64)
  if len(pns) < 2:
    raise ValueError(f"model.scale_loss='lognormal' needs >= 2 scales, got patch_nums={patch_nums}")
  r = pns / pns[-1]
  z = (r[::-1] - r.mean()) / r.std(ddof=1)
  pdf = np.exp(-(((z - mu) / sigma) ** 2) / 2) / (sigma * math.sqrt(2 * math.pi))
  return pdf / pdf.sum()


class ScaleInputs:
  """What a scale's input is, through the tokenizer's `methods`: `targets` (per-scale codes of
  images), `teacher` (teacher-forcing inputs of scales 1..n-1 from the codes), and in sampling
  `state = init_state(B, C)`, `state, next_input = advance(tok_p, si, state, codes_map)` per
  scale, then the decoder's latent is the final `state`."""

  name = ""
  methods: tuple[str, ...] = ()
  encode = ""  # the tokenizer method giving per-scale codes

  def __init__(self, tokenizer, patch_nums):
    self.tok, self.patch_nums = tokenizer, tuple(patch_nums)

  def targets(self, tok_p, images):
    return getattr(self.tok, self.encode)(tok_p, images)


class ResidualScales(ScaleInputs):
  """VAR: scale k's input is `area(f_hat_{k-1}, pn_k)`, f_hat the sum of upsampled residuals."""

  name = "residual"
  methods = ("encode_idx", "idx_to_var_input", "next_input", "decode_fhat")
  encode = "encode_idx"

  def teacher(self, tok_p, idx_list, codebook):
    del codebook
    return self.tok.idx_to_var_input(tok_p, idx_list)

  def init_state(self, batch: int, channels: int):
    P = self.patch_nums[-1]
    return jnp.zeros((batch, P, P, channels), jnp.float32)

  def advance(self, tok_p, si: int, f_hat, h_BxpnxpnxC):
    """`(f_hat, next input [B, pn', pn', C] or None after the last scale)`."""
    return self.tok.next_input(tok_p, si, f_hat, h_BxpnxpnxC)


class IndependentScales(ScaleInputs):
  """FlexVAR-style: every scale quantizes the downsampled latent on its own; scale k + 1's input
  is scale k's code map upsampled (`independent_input`), and the last scale is the latent."""

  name = "independent"
  methods = ("encode_idx_independent", "independent_input", "codebook", "decode_fhat")
  encode = "encode_idx_independent"

  def teacher(self, tok_p, idx_list, codebook):
    B, outs = idx_list[0].shape[0], []
    for pn, nxt, idx in zip(self.patch_nums[:-1], self.patch_nums[1:], idx_list[:-1], strict=True):
      h = codebook[idx].reshape(B, pn, pn, -1)
      outs.append(self.tok.independent_input(tok_p, h, nxt).reshape(B, nxt * nxt, -1))
    return jnp.concatenate(outs, axis=1)

  def init_state(self, batch: int, channels: int):
    del batch, channels
    return None

  def advance(self, tok_p, si: int, state, h_BxpnxpnxC):
    del state
    if si == len(self.patch_nums) - 1:
      return h_BxpnxpnxC, None
    return h_BxpnxpnxC, self.tok.independent_input(tok_p, h_BxpnxpnxC, self.patch_nums[si + 1])


SCALE_INPUTS = {"residual": ResidualScales, "independent": IndependentScales}


def scale_inputs(name: str, tokenizer, patch_nums):
  """The `model.scales=name` strategy; a clear error when the tokenizer lacks its methods."""
  if name not in SCALE_INPUTS:
    raise ValueError(f"model.scales={name!r} is unknown; accepted: {list(SCALE_INPUTS)}")
  cls = SCALE_INPUTS[name]
  missing = [m for m in cls.methods if not hasattr(tokenizer, m)]
  if missing:
    raise ValueError(
      f"model.scales={name!r} needs tokenizer methods {list(cls.methods)}; "
      f"{type(tokenizer).__name__} lacks {missing}"
    )
  return cls(tokenizer, patch_nums)


def check_sample_schedule(
  patch_nums, sample_patch_nums, per_scale_tables: str | None, scales: str = "residual"
):
  """The sampling scale schedule: `sample_patch_nums` (empty = the training one).

  A model whose parameters have one entry per training scale (`per_scale_tables` names them)
  cannot sample another schedule; a model without such tables may, with `independent` scale
  inputs (residual ones follow the tokenizer's own schedule).
  """
  patch_nums = tuple(int(p) for p in patch_nums)
  sample = tuple(int(p) for p in sample_patch_nums) or patch_nums
  if sample != patch_nums and per_scale_tables:
    raise ValueError(
      f"model.sample_patch_nums={sample} differs from the training patch_nums={patch_nums}, but "
      f"this model has per-scale tables ({per_scale_tables}) sized by the training schedule; "
      "leave sample_patch_nums empty"
    )
  if sample != patch_nums and scales == "residual":
    raise ValueError(
      f"model.sample_patch_nums={sample} differs from the training patch_nums={patch_nums}, but "
      "model.scales='residual' follows the tokenizer's own residual schedule; use "
      "model.scales='independent'"
    )
  if list(sample) != sorted(set(sample)) or sample[-1] != patch_nums[-1]:
    raise ValueError(
      f"model.sample_patch_nums={sample} must increase strictly and end at the latent side "
      f"{patch_nums[-1]}"
    )
  return sample


def cfg_scale(schedule, cfg, si: int, num_scales: int):
  """The guidance scale s of scale `si` (`sample_tokens(cfg_schedule=...)`): "linear" (official
  VAR, s = 1 + cfg si / (n - 1)), "constant" (s = 1 + cfg) or a tuple of one s per scale."""
  if schedule == "linear":
    return guidance.linear_excess(cfg, si, num_scales)
  if schedule == "constant":
    return 1.0 + guidance.constant(cfg, si)
  if isinstance(schedule, tuple):
    return guidance.per_step(schedule, si, num_scales)
  raise ValueError(
    f"cfg_schedule={schedule!r} is unknown; accepted: 'linear', 'constant' or one scale per scale"
  )


def check_known(patch_nums, B: int, known_idx, known_mask):
  """None, or per-scale `(int32 idx, bool mask)` lists checked against `[B, pn*pn]` (tokens
  teacher-forced while sampling: zero-shot inpainting / outpainting / editing)."""
  if (known_idx is None) != (known_mask is None):
    raise ValueError("known_idx and known_mask must be given together (or neither)")
  if known_idx is None:
    return None
  lengths = [pn * pn for pn in patch_nums]
  if len(known_idx) != len(lengths) or len(known_mask) != len(lengths):
    raise ValueError(
      f"known_idx/known_mask need one entry per scale ({len(lengths)}); got "
      f"{len(known_idx)} / {len(known_mask)}"
    )
  ki = [jnp.asarray(i).astype(jnp.int32) for i in known_idx]
  km = [jnp.asarray(m).astype(bool) for m in known_mask]
  for si, (n, i, m) in enumerate(zip(lengths, ki, km, strict=True)):
    if i.shape != (B, n) or m.shape != (B, n):
      raise ValueError(
        f"known_idx[{si}] / known_mask[{si}] must be [B={B}, {n}]; got {i.shape} / {m.shape}"
      )
  return ki, km


def scale_mean(x_BxL: jax.Array, bounds) -> jax.Array:
  """`[B, num_scales]` mean of `x` over each scale's tokens."""
  return jnp.stack([jnp.mean(x_BxL[:, b:e], axis=1) for b, e in bounds], axis=1)
