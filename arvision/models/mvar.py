"""M-VAR: decoupled scale-wise autoregressive modeling (Ren et al., 2024; OliverRensu/MVAR).

A variant of the VAR spine (`models/var.py`) with another block. Each M-VAR block
(official `models/basic_mvar.py` `AdaLNSelfAttn`) decouples the two kinds of dependency:

- **intra-scale**: bidirectional self-attention inside each scale (the official
  `flash_attn_varlen_func` with one segment per scale = our `mask="block_diagonal"`);
- **inter-scale**: a Mamba2 mixer (`models/mamba2.py`, d_state 64, expand 2, conv 4) over the
  whole sequence, causal in the flattened (scale, row, column) order;
- the FFN;

each AdaLN-modulated, with 9 AdaLN chunks in the official order (gamma1, gamma2, gamma3, scale1,
scale2, scale3, shift1, shift2, shift3; init: the first 2C columns x `alng`, the rest x `aln`):

  x += attn(LN(x)(1 + scale1) + shift1) gamma1
  x += mamba(LN(x)(1 + scale2) + shift2) gamma2
  x += ffn(LN(x)(1 + scale3) + shift3) gamma3

The rest (embeddings, per-scale position tables, head, loss, sampler, VAR's tokenizer) is VAR's.
Decoding runs scale by scale: attention sees the scale alone (no KV cache) and each block's
Mamba2 continues from its `(conv, ssm)` state (`MVARFamily.init_caches`), which gives the full
forward's outputs; the official sampler gets the same numbers by re-running Mamba over the whole
prefix at every scale ("not fast enough now").

Official keys (`MVAR.state_dict()`, converted by `arvision.convert.mvar`): VAR's, plus
`blocks.i.mamba.{in_proj.weight, conv1d.{weight,bias}, dt_bias, A_log, D, norm.weight,
out_proj.weight}` -> `blocks_i/mamba/...` (see `models/mamba2.py`), and `ada_lin.1` with 9C rows.
The official code's `shared_aln` path cannot run (it unbinds 9 chunks from a 6-chunk `ada_gss`),
so it is refused here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from arvision.models import var as var_lib
from arvision.models.layers import (
  FFN,
  SelfAttention,
  adaln_kernel_init,
  drop_path,
  layer_norm,
)
from arvision.models.mamba2 import Mamba2, Mamba2State
from arvision.parallel.logical import constrain, param_init
from arvision.precision import current_dtype

ADALN_CHUNKS = 9


class MVARBlock(nn.Module):
  """Attention inside a scale, Mamba2 across scales, FFN (see the module docstring).

  Attributes: VAR's `AdaLNSelfAttn` ones (no `shared_aln`) plus the Mamba2 sizes.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  attn_l2_norm: bool = True
  depth: int = 1
  init_std: float = 0.02
  aln: float = 0.5
  alng: float = 1e-5
  norm_eps: float = 1e-6
  attn_impl: str = "auto"
  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ssd_chunk: int = 256

  def mamba(self) -> Mamba2:
    return Mamba2(
      d_state=self.d_state,
      d_conv=self.d_conv,
      expand=self.expand,
      headdim=self.headdim,
      chunk=self.ssd_chunk,
      init_std=self.init_std,
      name="mamba",
    )

  @nn.compact
  def __call__(
    self,
    x_BxLxC: jax.Array,
    cond_BxD: jax.Array,
    *,
    mask: Any,
    deterministic: bool = True,
    cache: Mamba2State | None = None,
    cache_index: int = 0,
  ) -> tuple[jax.Array, Mamba2State | None]:
    """Applies the block.

    Args:
      x_BxLxC: tokens (training: the whole sequence; decoding: one scale).
      cond_BxD: the class condition.
      mask: the attention mask spec (training: block-diagonal over scales; decoding: full).
      deterministic: disables drop path.
      cache: decoding: this block's Mamba2 state before `x` (None: start of the sequence).
      cache_index: unused (the state knows where it is); kept for `VAR.step`'s call.

    Returns:
      `(x_BxLxC, new Mamba2 state or None)`.
    """
    del cache_index
    C = x_BxLxC.shape[-1]
    ada = nn.Dense(
      ADALN_CHUNKS * C,
      kernel_init=param_init(
        adaln_kernel_init(self.init_std, self.aln, self.alng, ADALN_CHUNKS), ("embed", "mlp")
      ),
      bias_init=param_init(nn.initializers.zeros, ("mlp",)),
      name="ada_lin",
      dtype=current_dtype(),
    )(nn.silu(cond_BxD)).reshape(-1, 1, ADALN_CHUNKS, C)
    gamma1, gamma2, gamma3, scale1, scale2, scale3, shift1, shift2, shift3 = (
      ada[:, :, i] for i in range(ADALN_CHUNKS)
    )
    need_rng = not deterministic and self.drop_path_rate > 0

    def residual(x, h, gamma):
      rng = self.make_rng("dropout") if need_rng else None
      return x + drop_path(h * gamma, self.drop_path_rate, rng, deterministic)

    x = constrain(x_BxLxC, ("batch", "seq", "embed"))
    h = layer_norm(x, self.norm_eps) * (1 + scale1) + shift1
    h, _ = SelfAttention(
      num_heads=self.num_heads,
      attn_l2_norm=self.attn_l2_norm,
      depth=self.depth,
      init_std=self.init_std,
      attn_impl=self.attn_impl,
      name="attn",
    )(h, mask=mask)
    x = residual(x, h, gamma1)
    h = layer_norm(x, self.norm_eps) * (1 + scale2) + shift2
    h, state = self.mamba()(h, cache)
    x = residual(x, h, gamma2)
    h = layer_norm(x, self.norm_eps) * (1 + scale3) + shift3
    h = FFN(hidden=round(C * self.mlp_ratio), depth=self.depth, init_std=self.init_std, name="ffn")(
      h
    )
    x = residual(x, h, gamma3)
    return constrain(x, ("batch", "seq", "embed")), (state if cache is not None else None)


class MVAR(var_lib.VAR):
  """The VAR module with M-VAR blocks (attributes: VAR's plus the Mamba2 sizes)."""

  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ssd_chunk: int = 256

  def _make_block(self, drop_path_rate: float, init_std: float) -> nn.Module:
    if self.shared_aln:
      raise ValueError("model.shared_aln=True: M-VAR blocks have their own 9-chunk ada_lin")
    return MVARBlock(
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      drop_path_rate=drop_path_rate,
      attn_l2_norm=self.attn_l2_norm,
      depth=self.depth,
      init_std=init_std,
      aln=self.aln,
      alng=self.alng,
      norm_eps=self.norm_eps,
      attn_impl=self.attn_impl,
      d_state=self.d_state,
      d_conv=self.d_conv,
      expand=self.expand,
      headdim=self.headdim,
      ssd_chunk=self.ssd_chunk,
    )


# Knobs of `config.model` on top of VAR's, with the official values (Mamba2 in basic_mvar.py).
MAMBA_DEFAULTS = dict(d_state=64, d_conv=4, expand=2, headdim=64, ssd_chunk=256)


class MVARFamily(var_lib.VARFamily):
  """M-VAR as a Family. `config.model` adds `d_state`, `d_conv`, `expand`, `headdim` and
  `ssd_chunk` (the Mamba2 sizes and the scan's chunk length) to VAR's fields; `mask` must be
  `block_diagonal` (attention inside a scale) and `shared_aln` False."""

  name = "mvar"
  module_class = MVAR

  def __init__(self, config, tokenizer):
    m = config.model
    if str(m.get("mask", "")) != "block_diagonal":
      raise ValueError(
        f"model.mask={m.get('mask')!r}: M-VAR's attention stays inside a scale (Mamba2 carries "
        "the coarser scales); it needs 'block_diagonal'"
      )
    if bool(m.get("shared_aln", False)):
      raise ValueError("model.shared_aln=True is not supported by M-VAR (9-chunk ada_lin)")
    for k in MAMBA_DEFAULTS:
      if int(m.get(k, MAMBA_DEFAULTS[k])) < 1:
        raise ValueError(f"model.{k}={m.get(k)} must be a positive int")
    super().__init__(config, tokenizer)
    self._mamba_layer().dims(self.module.width)  # fails now on sizes that do not divide

  def module_extra(self, config, tokenizer) -> dict:
    del tokenizer
    return {k: int(config.model.get(k, v)) for k, v in MAMBA_DEFAULTS.items()}

  def _mamba_layer(self) -> Mamba2:
    """A standalone copy of the blocks' Mamba2 (for its sizes and state shapes)."""
    m = self.module
    return Mamba2(d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim)

  def init_caches(self, batch: int, dtype) -> list:
    """Every block's zero Mamba2 state `(conv, ssm)` (attention keeps no cache)."""
    layer = self._mamba_layer()
    return [layer.init_state(batch, self.module.width, dtype) for _ in range(self.module.depth)]


def official_param_count(
  depth: int,
  vocab_size: int = 4096,
  cvae: int = 32,
  num_classes: int = 1000,
  patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
  attn_l2_norm: bool = True,
  d_state: int = 64,
  d_conv: int = 4,
  expand: int = 2,
  headdim: int = 64,
) -> int:
  """`sum(p.numel() for p in mvar.parameters())` of the official MVAR (C = 64 depth, H = depth)."""
  C, H = 64 * depth, depth
  L = sum(p * p for p in patch_nums)
  d_inner = expand * C
  nh = d_inner // headdim
  conv_dim = d_inner + 2 * d_state
  emb = (cvae * C + C) + (num_classes + 1) * C + C + L * C + len(patch_nums) * C
  attn = 3 * C * C + 2 * C + (H if attn_l2_norm else 0) + (C * C + C)
  mamba = C * (2 * d_inner + 2 * d_state + nh) + conv_dim * (d_conv + 1) + 3 * nh + d_inner
  mamba += d_inner * C
  ffn = (C * 4 * C + 4 * C) + (4 * C * C + C)
  ada = C * 9 * C + 9 * C
  head = (C * 2 * C + 2 * C) + (C * vocab_size + vocab_size)
  return emb + depth * (attn + mamba + ffn + ada) + head


build = MVARFamily.build
