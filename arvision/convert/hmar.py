"""NVlabs/HMAR checkpoints -> arvision: `hmar-d{16,20,24,30}.pth` (the `HMAR` module's state
dict, stage 1 and stage 2 together) or a stage-1 `NextScalePrediction` state dict (VAR's layout).

    arvision convert var_vae vae_ch160v4096z32.pth --out runs/var_vae   # HMAR reuses VAR's VQVAE
    arvision convert hmar hmar-d16.pth --vae runs/var_vae --out runs/hmar_d16

Key layout (see `arvision/models/hmar.py`): `base_blocks.i` -> `blocks_i`, `ns_blocks.j` ->
`blocks_{depth - mask_depth + j}`, `ns_head(_nm)` -> `head(_nm)`, `word_embed.weight` and
`word_embed_bias` -> `word_embed/{kernel,bias}`, `mask_embed.weight` [1, C] -> `mask_embed` [C],
`mask_blocks.j` -> `mask_blocks_j`, `mask_head(_nm)` as named; the rest as VAR
(`arvision.convert.var`). Buffers the model recomputes are skipped (`lvl_1L`,
`attn_bias_for_masking`, `*.attn.zero_k_bias`). Depth, width, heads, classes, the scale schedule
and `mask_depth` are read from the shapes.
"""

from __future__ import annotations

import os
import re

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common
from arvision.convert import var as cv

SKIP = (r"lvl_1L", r"attn_bias_for_masking", r"(base_|ns_|mask_)?blocks\.\d+\.attn\.zero_k_bias")
DEPTHS = (16, 20, 24, 30)


def _hmar_renames(state_dict: dict) -> list[tuple[str, str]]:
  """Official combined names -> VAR-style names (`ns_blocks.j` after the shared base blocks)."""
  base = cv._count(state_dict, "base_blocks.")
  out = [
    (r"^base_blocks\.", "blocks."),
    (r"^ns_head\.", "head."),
    (r"^ns_head_nm\.", "head_nm."),
    (r"^word_embed_bias$", "word_embed.bias"),
    (r"^mask_embed\.weight$", "mask_embed"),
  ]
  return out + [
    (rf"^ns_blocks\.{j}\.", f"blocks.{base + j}.")
    for j in range(cv._count(state_dict, "ns_blocks."))
  ]


def _var_view(state_dict: dict) -> dict:
  """The state dict under VAR's official names (for `convert.var.var_config`'s inference)."""
  rules = [(re.compile(a), b) for a, b in _hmar_renames(state_dict)]
  out = {}
  for k, v in state_dict.items():
    for pattern, repl in rules:
      k = pattern.sub(repl, k)
    out[k] = v
  return out


def hmar_config(state_dict: dict, patch_nums=None, tokenizer_patch_nums=()) -> mlc.ConfigDict:
  """The HMAR config whose shapes match the checkpoint (stage 2 when it has `mask_blocks`)."""
  if "mask_embed.weight" in state_dict and "mask_blocks.0.ffn.fc1.weight" not in state_dict:
    raise errors.UserError(
      "this is a stage-2 fine-tuning checkpoint (`MaskedPrediction`: key 'mask_embed.weight' "
      "without 'mask_blocks.*'); convert the combined `HMAR` checkpoint (hmar-d*.pth) instead"
    )
  if "base_blocks.0.ffn.fc1.weight" not in state_dict and "blocks.0.ffn.fc1.weight" not in (
    state_dict
  ):
    raise errors.UserError(
      "not an HMAR checkpoint: neither 'base_blocks.0.ffn.fc1.weight' (HMAR) nor "
      "'blocks.0.ffn.fc1.weight' (stage 1, NextScalePrediction) is a key"
    )
  view = _var_view(state_dict)
  if "blocks.0.attn.scale_mul_1H11" not in view:
    raise errors.UserError(
      "HMAR checkpoint without 'base_blocks.0.attn.scale_mul_1H11': only attn_l2_norm=True "
      "(the released models) is supported"
    )
  vc = cv.var_config(view, patch_nums, tokenizer_patch_nums)
  depth = int(vc.model.depth)
  nearest = min(DEPTHS, key=lambda d: abs(d - depth))
  mask_depth = cv._count(state_dict, "mask_blocks.")
  variant = f"d{nearest}" if mask_depth else f"d{nearest}_stage1"
  c = mlc.ConfigDict(config_util.load_config_file(f"hmar.py:{variant}").to_dict())
  c.variant = vc.variant
  for k in ("depth", "width", "num_heads", "mlp_ratio", "shared_aln", "drop_path_rate"):
    c.model[k] = vc.model[k]
  c.model.mask_depth = mask_depth if mask_depth else c.model.mask_depth
  c.data.num_classes = vc.data.num_classes
  c.tokenizer.config.model.patch_nums = vc.tokenizer.config.model.patch_nums
  c.tokenizer.config.model.vocab_size = vc.tokenizer.config.model.vocab_size
  c.tokenizer.config.model.embed_dim = vc.tokenizer.config.model.embed_dim
  if mask_depth and len(c.model.mask_schedule) != len(c.tokenizer.config.model.patch_nums):
    c.model.mask_schedule = ()  # the official rule by side
  return c


def full_abstract_params(family):
  """Every param of an HMAR family (stage 2: trainable mask params and frozen stage-1 ones)."""
  return jax.eval_shape(lambda r: {**family.init(r), **family.init_frozen(r)}, jax.random.key(0))


def convert_hmar(state_dict: dict, config) -> dict:
  """HMAR state dict -> params (stage 1 and, for stage 2, the mask params; no tokenizer)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    state_dict,
    full_abstract_params(family),
    renames=_hmar_renames(state_dict) + list(cv.VAR_RENAMES),
    skip=SKIP,
    what="HMAR checkpoint",
  )


def to_official_hmar(params: dict, config) -> dict:
  """Params -> the official `HMAR` state dict (stage 2) or `NextScalePrediction` (stage 1),
  without the recomputed buffers. The inverse of `convert_hmar` (round-trip tests, export)."""
  gen = {k: v for k, v in params.items() if k != "tokenizer"}
  sd = common.to_state_dict(
    gen, renames=((r"\.ada_lin\.", ".ada_lin.1."), (r"\.scale_mul$", ".scale_mul_1H11"))
  )
  for k in [k for k in sd if k.endswith(".scale_mul_1H11")]:
    sd[k] = sd[k].reshape(1, -1, 1, 1)
  n = int(config.model.mask_depth) if int(config.model.stage) == 2 else 0
  if not n:
    return sd
  sd["mask_embed.weight"] = sd.pop("mask_embed").reshape(1, -1)
  sd["word_embed_bias"] = sd.pop("word_embed.bias")
  base = int(config.model.depth) - n
  out = {}
  for k, v in sd.items():
    if k.startswith("blocks."):
      i, rest = k[len("blocks.") :].split(".", 1)
      k = f"base_blocks.{i}.{rest}" if int(i) < base else f"ns_blocks.{int(i) - base}.{rest}"
    elif k.startswith(("head.", "head_nm.")):
      k = "ns_" + k
    out[k] = v
  return out


def main_hmar(path: str, out: str, vae: str, patch_nums=None) -> str:
  sd = common.load_torch_state_dict(path)
  tok_params, tok_config = cv._tokenizer_from(vae)
  config = hmar_config(sd, patch_nums, tuple(tok_config.model.patch_nums))
  tok_config = mlc.ConfigDict(tok_config.to_dict())
  tok_config.model.patch_nums = tuple(config.tokenizer.config.model.patch_nums)
  levels = len(tok_config.model.ch_mult)
  tok_config.data.image_size = int(tok_config.model.patch_nums[-1]) * 2 ** (levels - 1)
  m = config.model
  logging.info(
    "%s: inferred HMAR stage %d depth=%d width=%d heads=%d mask_depth=%d classes=%d",
    path, m.stage, m.depth, m.width, m.num_heads, m.mask_depth, config.data.num_classes,
  )  # fmt: skip
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.tokenizer.checkpoint = os.path.abspath(vae)
    config.data.image_size = tok_config.data.image_size
  params = convert_hmar(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok_params}, config)
  return out


def param_count(params) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))
