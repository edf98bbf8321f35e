"""OliverRensu/MVAR checkpoints -> arvision: `d{12,...,32}.pth` (the `MVAR` module's state dict).

    arvision convert var_vae vae_ch160v4096z32.pth --out runs/var_vae   # M-VAR uses VAR's VQVAE
    arvision convert mvar d32.pth --vae runs/var_vae --out runs/mvar_d32

Key layout (see `arvision/models/mvar.py` and `models/mamba2.py`): VAR's
(`arvision.convert.var`), plus per block `mamba.in_proj.weight` / `mamba.out_proj.weight`
(transposed), `mamba.conv1d.weight [conv_dim, 1, d_conv]` -> `mamba/conv1d/kernel
[d_conv, conv_dim]`, `mamba.conv1d.bias`, `mamba.{dt_bias, A_log, D}`, `mamba.norm.weight` ->
`mamba/norm/scale`; `ada_lin.1` has 9C outputs. Buffers the model recomputes are skipped
(`lvl_1L`, `attn_bias_for_masking`, `blocks.i.attn.{zero_k_bias, patch_nums}`). Depth, width,
heads, classes, the scale schedule, `attn_l2_norm` (whether `scale_mul_1H11` is there) and the
Mamba2 sizes (d_state, headdim, d_conv, expand) are read from the shapes.
"""

from __future__ import annotations

import os

import ml_collections as mlc
import numpy as np
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common
from arvision.convert import var as cv

SKIP = (*cv.VAR_SKIP, r"blocks\.\d+\.attn\.patch_nums")
DEPTHS = (12, 16, 20, 24, 30, 32)
_CONV = ".mamba.conv1d.weight"


def mvar_config(state_dict: dict, patch_nums=None, tokenizer_patch_nums=()) -> mlc.ConfigDict:
  """The M-VAR config whose shapes match the checkpoint."""
  cv._need(
    state_dict,
    (
      "class_emb.weight",
      "pos_1LC",
      "lvl_embed.weight",
      "head.weight",
      "blocks.0.ffn.fc1.weight",
      "blocks.0.mamba.in_proj.weight",
      "blocks.0.mamba.A_log",
      "blocks.0.mamba.conv1d.weight",
      "blocks.0.ada_lin.1.weight",
    ),
    "M-VAR",
  )
  width = int(state_dict["class_emb.weight"].shape[1])
  ada_rows = int(state_dict["blocks.0.ada_lin.1.weight"].shape[0])
  if ada_rows != 9 * width:
    raise errors.UserError(
      f"blocks.0.ada_lin.1.weight has {ada_rows} rows; an M-VAR block has 9 * width = "
      f"{9 * width} (a VAR checkpoint has 6 * width: use `arvision convert var`)"
    )
  l2 = "blocks.0.attn.scale_mul_1H11" in state_dict
  view = dict(state_dict)
  if not l2:  # var_config reads the head count from scale_mul; without it, width / 64
    if width % 64:
      raise errors.UserError(
        f"M-VAR checkpoint without 'blocks.0.attn.scale_mul_1H11' (attn_l2_norm=False) and width "
        f"{width} not a multiple of 64: the head count cannot be read from the shapes"
      )
    view["blocks.0.attn.scale_mul_1H11"] = np.zeros((1, width // 64, 1, 1), np.float32)
  vc = cv.var_config(view, patch_nums, tokenizer_patch_nums)
  depth = int(vc.model.depth)
  nearest = min(DEPTHS, key=lambda d: abs(d - depth))
  c = mlc.ConfigDict(config_util.load_config_file(f"mvar.py:d{nearest}").to_dict())
  c.variant = vc.variant
  for k in ("depth", "width", "num_heads", "mlp_ratio", "drop_path_rate"):
    c.model[k] = vc.model[k]
  c.model.attn_l2_norm = l2
  # Mamba2 sizes: A_log [H], conv1d [d_inner + 2 N, 1, W], in_proj [2 d_inner + 2 N + H, C].
  nheads = int(state_dict["blocks.0.mamba.A_log"].shape[0])
  conv_dim, _, d_conv = (int(x) for x in state_dict["blocks.0" + _CONV].shape)
  d_inner = int(state_dict["blocks.0.mamba.out_proj.weight"].shape[1])
  d_state = (conv_dim - d_inner) // 2
  if d_inner % width or d_inner % nheads or d_state < 1:
    raise errors.UserError(
      f"M-VAR checkpoint: Mamba2 shapes do not fit (d_inner {d_inner}, heads {nheads}, conv "
      f"channels {conv_dim}, width {width})"
    )
  c.model.update(
    dict(d_state=d_state, d_conv=d_conv, expand=d_inner // width, headdim=d_inner // nheads)
  )
  c.data.num_classes = vc.data.num_classes
  for k in ("patch_nums", "vocab_size", "embed_dim"):
    c.tokenizer.config.model[k] = vc.tokenizer.config.model[k]
  return c


def describe_mvar(c) -> str:
  m = c.model
  return (
    f"M-VAR depth={m.depth} width={m.width} heads={m.num_heads} mlp_ratio={m.mlp_ratio:g} "
    f"attn_l2_norm={m.attn_l2_norm} mamba(d_state={m.d_state}, d_conv={m.d_conv}, "
    f"expand={m.expand}, headdim={m.headdim}) classes={c.data.num_classes} "
    f"patch_nums={tuple(c.tokenizer.config.model.patch_nums)}"
  )


def _conv_to_2d(state_dict: dict) -> dict:
  """`conv1d.weight [D, 1, W]` -> `[D, W]` (the common Linear rule then transposes it)."""
  out = dict(state_dict)
  for k, v in state_dict.items():
    if k.endswith(_CONV):
      if v.ndim != 3 or v.shape[1] != 1:
        raise errors.UserError(f"{k}: expected a depthwise conv weight [D, 1, W], got {v.shape}")
      out[k] = v[:, 0, :]
  return out


def convert_mvar(state_dict: dict, config) -> dict:
  """M-VAR state dict -> params (the tokenizer is converted separately)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    _conv_to_2d(state_dict),
    family.abstract_params(),
    renames=cv.VAR_RENAMES,
    skip=SKIP,
    what="M-VAR checkpoint",
  )


def to_official_mvar(params: dict, config) -> dict:
  """Params -> the official `MVAR` state dict without the recomputed buffers (round trips)."""
  del config
  gen = {k: v for k, v in params.items() if k != "tokenizer"}
  sd = common.to_state_dict(
    gen, renames=((r"\.ada_lin\.", ".ada_lin.1."), (r"\.scale_mul$", ".scale_mul_1H11"))
  )
  for k in list(sd):
    if k.endswith(".scale_mul_1H11"):
      sd[k] = sd[k].reshape(1, -1, 1, 1)
    elif k.endswith(_CONV):
      sd[k] = sd[k][:, None, :]
  return sd


def main_mvar(path: str, out: str, vae: str, patch_nums=None) -> str:
  sd = common.load_torch_state_dict(path)
  tok_params, tok_config = cv._tokenizer_from(vae)
  config = mvar_config(sd, patch_nums, tuple(tok_config.model.patch_nums))
  tok_config = mlc.ConfigDict(tok_config.to_dict())
  tok_config.model.patch_nums = tuple(config.tokenizer.config.model.patch_nums)
  levels = len(tok_config.model.ch_mult)
  tok_config.data.image_size = int(tok_config.model.patch_nums[-1]) * 2 ** (levels - 1)
  logging.info("%s: inferred %s", path, describe_mvar(config))
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.tokenizer.checkpoint = os.path.abspath(vae)
    config.data.image_size = tok_config.data.image_size
  params = convert_mvar(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok_params}, config)
  return out
