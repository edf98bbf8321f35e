"""jiaosiyu1999/FlexVAR checkpoints -> arvision: `FlexVAE.pth`, `FlexVARd{16,20,24}-epo*.pth`.

    arvision convert flexvar_vae FlexVAE.pth --out runs/flexvae
    arvision convert flexvar FlexVARd16-epo179.pth --vae runs/flexvae --out runs/flexvar_d16

FlexVAE is LlamaGen's VQModel (VQ-16, l2-normalised 8912 x 32 codebook): it converts with the
LlamaGen VQ rules (`convert/llamagen.py`), its sizes read from the shapes. The transformer's keys
are VAR's (`convert/var.py` renames and skipped buffers) without `lvl_embed`; `pos_1LC` is the 2D
position map `[1, C, side, side]` -> `[1, side, side, C]`. Depth, width, heads (from
`scale_mul_1H11`), MLP ratio, shared AdaLN, classes, vocabulary and the map's side are read from
the shapes. Checkpoints saved by the official trainer (`{"trainer": {"var_wo_ddp": ...}}`) are
unwrapped as the official eval script does.
"""

from __future__ import annotations

import os

import ml_collections as mlc
import numpy as np
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common
from arvision.convert import llamagen as cl
from arvision.convert import var as cv

DEPTHS = (16, 20, 24)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  obj = common.torch_load(path)
  if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict):
    obj = obj["trainer"].get("var_wo_ddp", obj["trainer"])
  return common.unwrap_state_dict(obj, path)


def convert_flexvae(state_dict: dict, image_size: int | None = None):
  """FlexVAE state dict -> (tokenizer params, tokenizer config)."""
  config = cl.infer_vq_config(state_dict, image_size)
  config.model.patch_nums = ()
  return cl.convert_vq(state_dict, config)


def flexvar_config(state_dict: dict, tok_config=None) -> mlc.ConfigDict:
  """The flexvar config whose shapes match the checkpoint (recipe of the nearest released depth)."""
  cv._need(
    state_dict,
    ("class_emb.weight", "pos_1LC", "pos_start", "head.weight", "word_embed.weight"),
    "FlexVAR",
  )
  if "lvl_embed.weight" in state_dict:
    raise errors.UserError(
      "this checkpoint has 'lvl_embed.weight': it is a VAR checkpoint; use `arvision convert var`"
    )
  depth = cv._count(state_dict, "blocks.")
  if depth == 0:
    raise errors.UserError("not a FlexVAR checkpoint: no 'blocks.<i>.' keys")
  if "blocks.0.attn.scale_mul_1H11" not in state_dict:
    raise errors.UserError(
      "FlexVAR checkpoint without 'blocks.0.attn.scale_mul_1H11' (attn_l2_norm=False): the head "
      "count is not in its shapes; not supported"
    )
  rows, width = (int(x) for x in state_dict["class_emb.weight"].shape)
  pos = state_dict["pos_1LC"]
  if pos.ndim != 4 or pos.shape[1] != width or pos.shape[2] != pos.shape[3]:
    raise errors.UserError(
      f"'pos_1LC' has shape {tuple(pos.shape)}; FlexVAR's is [1, {width}, side, side]"
    )
  nearest = min(DEPTHS, key=lambda d: abs(d - depth))
  config = mlc.ConfigDict(config_util.load_config_file(f"flexvar.py:d{nearest}").to_dict())
  config.variant = f"d{depth}" if depth in DEPTHS and width == 64 * depth else "inferred"
  m = config.model
  m.depth, m.width = depth, width
  m.num_heads = int(state_dict["blocks.0.attn.scale_mul_1H11"].shape[1])
  m.mlp_ratio = int(state_dict["blocks.0.ffn.fc1.weight"].shape[0]) / width
  m.shared_aln = "shared_ada_lin.1.weight" in state_dict
  m.drop_path_rate = 0.1 * depth / 24
  m.pos_side = int(pos.shape[-1])
  config.data.num_classes = rows - 1
  tm = config.tokenizer.config.model
  tm.vocab_size = int(state_dict["head.weight"].shape[0])
  tm.embed_dim = int(state_dict["word_embed.weight"].shape[1])
  if tok_config is not None:
    config.tokenizer.config = mlc.ConfigDict(tok_config.to_dict())
    if int(config.tokenizer.config.model.vocab_size) != tm.vocab_size:
      raise errors.UserError(
        f"the tokenizer has {config.tokenizer.config.model.vocab_size} codes, the transformer's "
        f"head {tm.vocab_size}"
      )
  return config


def describe(c) -> str:
  m = c.model
  return (
    f"FlexVAR depth={m.depth} width={m.width} heads={m.num_heads} mlp_ratio={m.mlp_ratio:g} "
    f"shared_aln={m.shared_aln} classes={c.data.num_classes} pos_side={m.pos_side} "
    f"vocab={c.tokenizer.config.model.vocab_size}"
  )


def convert_flexvar(state_dict: dict, config) -> dict:
  """FlexVAR transformer state dict -> flexvar params (the tokenizer is converted separately)."""
  sd = dict(state_dict)
  if "pos_1LC" in sd and np.ndim(sd["pos_1LC"]) == 4:
    sd["pos_1LC"] = np.transpose(sd["pos_1LC"], (0, 2, 3, 1))  # [1, C, s, s] -> [1, s, s, C]
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    sd,
    family.abstract_params(),
    renames=cv.VAR_RENAMES,
    skip=cv.VAR_SKIP,
    what="FlexVAR checkpoint",
  )


def _tokenizer_from(vae: str):
  if os.path.isdir(vae):
    return ckpt_lib.load_params(vae)["params"], ckpt_lib.read_config(vae)
  return convert_flexvae(load_state_dict(vae))


def main_flexvar_vae(path: str, out: str) -> str:
  params, config = convert_flexvae(load_state_dict(path))
  ckpt_lib.save_export(out, params, {}, config)
  return out


def main_flexvar(path: str, out: str, vae: str) -> str:
  sd = load_state_dict(path)
  tok_params, tok_config = _tokenizer_from(vae)
  config = flexvar_config(sd, tok_config)
  logging.info("%s: inferred %s", path, describe(config))
  with config.unlocked():
    config.tokenizer.checkpoint = os.path.abspath(vae)
    config.data.image_size = int(tok_config.data.image_size)
  params = convert_flexvar(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok_params}, config)
  return out
