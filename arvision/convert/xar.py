"""OliverRensu/xAR checkpoints -> arvision (`arvision convert xar ckpt.pth --vae ... --out DIR`).

    arvision convert mar_vae kl16.ckpt --out runs/mar_vae
    arvision convert xar xAR-B.pth --vae runs/mar_vae --ema --out runs/xar_base

Key layout: torch `a.0.b` -> flax `a_0/b` (`common.convert`); Linear weights are transposed,
RMSNorm weight -> `scale`, `class_emb.weight` -> `embedding`. The names are the official ones
(`encoder_blocks_{i}/{attn/{qkv, proj}, mlp/{fc1_g, fc1_x, fc2}, ada_lin_1}`, `time_embed/mlp_0`;
see `arvision/models/xar.py`); nothing is renamed. Buffers (the cell mask and the RoPE tables)
are rebuilt, not loaded. A training checkpoint holds `model` and `model_ema` (`--ema`). Depth,
width, classes, latent grid and channels are read from the shapes; heads are the official
variant's when (depth, width) match B/L/H, else `--num_heads` (default head dim 64). The official
code always uses 2x2 cells.
"""

from __future__ import annotations

import math

import ml_collections as mlc

from arvision import config_util, errors, families
from arvision.convert import common
from arvision.convert import mar as cm

# Buffers of the official module: the block-causal mask and each attention's RoPE tables.
SKIP = (r"mask", r".*\.attn\.rope\.(freqs|freqs_cos|freqs_sin)")


def detect_config(state_dict: dict, num_heads: int | None = None) -> mlc.ConfigDict:
  """The xAR config whose shapes match the checkpoint (see the module docstring)."""
  for key in ("z_proj.weight", "class_emb.weight", "pred.weight", "encoder_pos_embed_learned"):
    if key not in state_dict:
      raise errors.UserError(f"not an xAR checkpoint: key {key!r} is missing")
  depth = cm._count(state_dict, "encoder_blocks.")
  width, token_dim = (int(x) for x in state_dict["z_proj.weight"].shape)
  found = None
  for variant in ("B", "L", "H"):
    c = config_util.load_config_file(f"xar.py:{variant}")
    if (c.model.encoder_depth, c.model.encoder_embed_dim) == (depth, width):
      found = c
  config = mlc.ConfigDict((found or config_util.load_config_file("xar.py:B")).to_dict())
  config.variant = found.variant if found else "inferred"
  m = config.model
  heads = num_heads or (m.encoder_num_heads if found else max(1, width // 64))
  dec_width = int(state_dict["decoder_embed.weight"].shape[0])
  for w in (width, dec_width):
    if w % heads:
      raise errors.UserError(f"num_heads={heads} does not divide the checkpoint's width {w}")
  seq_len = int(state_dict["encoder_pos_embed_learned"].shape[1])
  side = math.isqrt(seq_len)
  if side * side != seq_len:
    raise errors.UserError(f"xAR checkpoint: {seq_len} tokens are not a square grid")
  m.encoder_depth, m.encoder_embed_dim, m.encoder_num_heads = depth, width, heads
  m.decoder_depth = cm._count(state_dict, "decoder_blocks.")
  m.decoder_embed_dim, m.decoder_num_heads = dec_width, heads
  hidden = int(state_dict["encoder_blocks.0.mlp.fc1_g.weight"].shape[0])
  m.mlp_ratio = _mlp_ratio(hidden, width)
  config.data.num_classes = int(state_dict["class_emb.weight"].shape[0]) - 1
  tok = config.tokenizer.config
  tok.model.embed_dim = token_dim
  stride = 2 ** (len(tok.model.ch_mult) - 1)
  config.data.image_size = tok.data.image_size = side * stride
  return config


def _mlp_ratio(hidden: int, width: int) -> float:
  """A ratio r with the official `int(width * r * 2 / 3) == hidden` (4.0 for every release)."""
  exact = hidden * 3 / (2 * width)
  for r in (round(exact * 4) / 4, exact, (hidden + 0.5) * 3 / (2 * width)):
    if int(width * r * 2 / 3.0) == hidden:
      return r
  raise errors.UserError(f"xAR checkpoint: no MLP ratio gives SwiGLU width {hidden} at {width}")


def describe(c) -> str:
  m = c.model
  return (
    f"xAR encoder={m.encoder_depth}x{m.encoder_embed_dim} decoder={m.decoder_depth}x"
    f"{m.decoder_embed_dim} heads={m.encoder_num_heads} cells={m.cells}x{m.cells} "
    f"classes={c.data.num_classes} image_size={c.data.image_size}"
  )


def convert_xar(state_dict: dict, config) -> dict:
  """xAR state dict (`model` or `model_ema`) -> xAR params (the tokenizer is converted apart)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(state_dict, family.abstract_params(), skip=SKIP, what="xAR checkpoint")


def main_xar(
  path: str, out: str, vae: str | None = None, ema: bool = False, num_heads: int | None = None
) -> str:
  return cm.main_with_kl_vae(
    path, out, vae, ema, num_heads,
    what="an xAR", detect_config=detect_config, describe=describe, convert=convert_xar,
  )  # fmt: skip


def to_official_xar(params: dict) -> dict:
  """xAR params -> the official state dict without buffers (names map 1:1)."""
  return common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})
