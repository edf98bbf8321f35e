"""OliverRensu/FlowAR checkpoints -> arvision (`arvision convert flowar ckpt.pth --vae ... --out`).

    arvision convert mar_vae kl16.ckpt --out runs/mar_vae
    arvision convert flowar FlowAR-S.pth --vae runs/mar_vae --ema --out runs/flowar_s

Key layout: torch `a.0.b` -> flax `a_0/b` (`common.convert`); Linear weights are transposed,
RMSNorm weight -> `scale`, `class_emb.weight` -> `embedding`. The names are the official ones
(see `arvision/models/flowar.py`); nothing is renamed. Buffers (the scale mask, RoPE `freqs`) are
rebuilt, not loaded. A training checkpoint holds `model` and `model_ema` (`--ema`). Depths,
widths, the flow head (depth, width, cross-attention or not), classes and the scales (doubling
from 1 to the latent side, as the official `scale=(1, 2, 4, 8, 16)`) are read from the shapes;
heads are the official variant's when (depth, width) match S/L/H, else `--num_heads` (default
head dim 64).
"""

from __future__ import annotations

import ml_collections as mlc

from arvision import config_util, errors, families
from arvision.convert import common
from arvision.convert import mar as cm
from arvision.convert.xar import _mlp_ratio

SKIP = (r"mask", r".*\.(attn|crossattn)\.rope\.freqs")


def _doubling_scales(total: int) -> tuple[int, ...]:
  pns, p = [], 1
  while sum(x * x for x in pns) < total:
    pns.append(p)
    p *= 2
  if sum(x * x for x in pns) != total:
    raise errors.UserError(
      f"FlowAR checkpoint: {total} tokens are not the scales 1, 2, 4, ... (sum of squares)"
    )
  return tuple(pns)


def detect_config(state_dict: dict, num_heads: int | None = None) -> mlc.ConfigDict:
  """The FlowAR config whose shapes match the checkpoint (see the module docstring)."""
  for key in ("z_proj.weight", "class_emb.weight", "flownet.input_proj.weight"):
    if key not in state_dict:
      raise errors.UserError(f"not a FlowAR checkpoint: key {key!r} is missing")
  depth = cm._count(state_dict, "encoder_blocks.")
  width, token_dim = (int(x) for x in state_dict["z_proj.weight"].shape)
  found = None
  for variant in ("S", "L", "H"):
    c = config_util.load_config_file(f"flowar.py:{variant}")
    if (c.model.encoder_depth, c.model.encoder_embed_dim) == (depth, width):
      found = c
  config = mlc.ConfigDict((found or config_util.load_config_file("flowar.py:S")).to_dict())
  config.variant = found.variant if found else "inferred"
  m = config.model
  heads = num_heads or (m.encoder_num_heads if found else max(1, width // 64))
  dec_width = int(state_dict["decoder_embed.weight"].shape[0])
  for w in (width, dec_width):
    if w % heads:
      raise errors.UserError(f"num_heads={heads} does not divide the checkpoint's width {w}")
  m.patch_nums = _doubling_scales(int(state_dict["encoder_pos_embed_learned"].shape[1]))
  m.encoder_depth, m.encoder_embed_dim, m.encoder_num_heads = depth, width, heads
  m.decoder_depth = cm._count(state_dict, "decoder_blocks.")
  m.decoder_embed_dim, m.decoder_num_heads = dec_width, heads
  hidden = int(state_dict["encoder_blocks.0.mlp.fc1_g.weight"].shape[0])
  m.mlp_ratio = _mlp_ratio(hidden, width)
  m.head_width = int(state_dict["flownet.input_proj.weight"].shape[0])
  m.head_depth = cm._count(state_dict, "flownet.res_blocks.")
  m.cross = "flownet.res_blocks.0.crossattn.q.weight" in state_dict
  config.data.num_classes = int(state_dict["class_emb.weight"].shape[0]) - 1
  tok = config.tokenizer.config
  tok.model.embed_dim = token_dim
  stride = 2 ** (len(tok.model.ch_mult) - 1)
  config.data.image_size = tok.data.image_size = m.patch_nums[-1] * stride
  return config


def describe(c) -> str:
  m = c.model
  return (
    f"FlowAR encoder={m.encoder_depth}x{m.encoder_embed_dim} decoder={m.decoder_depth}x"
    f"{m.decoder_embed_dim} heads={m.encoder_num_heads} head={m.head_depth}x{m.head_width} "
    f"cross={m.cross} scales={tuple(m.patch_nums)} classes={c.data.num_classes}"
  )


def convert_flowar(state_dict: dict, config) -> dict:
  """FlowAR state dict (`model` or `model_ema`) -> params (the tokenizer is converted apart)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(state_dict, family.abstract_params(), skip=SKIP, what="FlowAR checkpoint")


def main_flowar(
  path: str, out: str, vae: str | None = None, ema: bool = False, num_heads: int | None = None
) -> str:
  return cm.main_with_kl_vae(
    path, out, vae, ema, num_heads,
    what="a FlowAR", detect_config=detect_config, describe=describe, convert=convert_flowar,
  )  # fmt: skip


def to_official_flowar(params: dict) -> dict:
  """FlowAR params -> the official state dict without buffers (names map 1:1)."""
  return common.to_state_dict(
    {k: v for k, v in params.items() if k != "tokenizer"},
    renames=((r"\.norm2\.(\d)\.", r".norm2_\1."),),  # Block_v2's norm2_1 / norm2_2
  )
