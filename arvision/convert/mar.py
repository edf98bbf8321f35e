"""LTH14/mar checkpoints -> arvision: the KL-16 VAE `kl16.ckpt` and `checkpoint-last.pth`.

    arvision convert mar_vae kl16.ckpt --out runs/mar_vae
    arvision convert mar checkpoint-last.pth --vae runs/mar_vae --ema --out runs/mar_base

Key layout: torch `a.0.b` -> flax `a_0/b` (`common.convert`); Linear weights are transposed, conv
weights go OIHW -> HWIO, LayerNorm weight -> `scale`, `class_emb.weight` -> `embedding`. The MAR
names are the official ones (`encoder_blocks_{i}/attn/qkv`, `diffloss/net/res_blocks_{i}/...`,
see `arvision/models/mar.py` and `heads.py`); nothing is renamed. `checkpoint-last.pth` holds
`model` and `model_ema` (EMA, what the paper evaluates: `--ema`). The variant (B/L/H), the
DiffLoss MLP size and the number of classes are read from the checkpoint's shapes, for any size;
heads are the official variant's, else `--num_heads` (default head dim 64).
"""

from __future__ import annotations

import math
import os

import ml_collections as mlc
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common

# Training-only keys some LDM-style VAE checkpoints carry (discriminator / LPIPS of the loss).
VAE_SKIP = (r"loss\..*",)


def vae_config(variant: str = "mar_kl16") -> mlc.ConfigDict:
  return config_util.load_config_file(f"tokenizer.py:{variant}")


def infer_vae_config(state_dict: dict) -> mlc.ConfigDict:
  """The KL-VAE config whose shapes match the checkpoint: channels and levels from the encoder's
  convs, residual blocks per level, latent width (`post_quant_conv`), and the encoder levels
  that attend (as feature sides at the config's image size)."""
  for key in ("encoder.conv_in.weight", "post_quant_conv.weight"):
    if key not in state_dict:
      raise errors.UserError(f"not a KL-VAE checkpoint: key {key!r} is missing")
  c = mlc.ConfigDict(vae_config().to_dict())
  ch = int(state_dict["encoder.conv_in.weight"].shape[0])
  levels = _count(state_dict, "encoder.down.")
  m = c.model
  m.ch = ch
  m.ch_mult = tuple(
    int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels)
  )
  m.num_res_blocks = _count(state_dict, "encoder.down.0.block.")
  m.z_channels, m.embed_dim = (int(x) for x in state_dict["post_quant_conv.weight"].shape[:2])
  m.quant_conv_ks = int(state_dict["quant_conv.weight"].shape[-1])
  side = int(c.data.image_size)
  m.enc_attn_resolutions = tuple(
    side >> i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state_dict
  )
  m.dec_attn_resolutions = tuple(
    side >> i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state_dict
  )
  return c


def convert_vae(state_dict: dict, config=None) -> tuple[dict, mlc.ConfigDict]:
  """MAR's `AutoencoderKL` state dict -> (tokenizer params `{"ae": ...}`, tokenizer config); the
  config is inferred from the checkpoint's shapes unless given."""
  config = config or infer_vae_config(state_dict)
  family = families.build(config)
  ae = common.convert(
    state_dict, family.abstract_params()["ae"], skip=VAE_SKIP, what="MAR KL-VAE checkpoint"
  )
  return {"ae": ae}, config


def _count(state_dict: dict, prefix: str) -> int:
  idx = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
  return 1 + max(idx) if idx else 0


def detect_config(state_dict: dict, num_heads: int | None = None) -> mlc.ConfigDict:
  """The MAR config whose shapes match the checkpoint: encoder/decoder depth from the block
  counts, widths from `z_proj` / `decoder_embed`, the MLP ratio from `mlp.fc1`, the class-prefix
  buffer and the token count from the position embeddings, the DiffLoss MLP (depth, width) and
  the number of classes. Heads are not in the shapes: the official variant's when (depth,
  width) match B/L/H, else `num_heads` (default: head dim 64)."""
  for key in ("z_proj.weight", "class_emb.weight", "diffloss.net.input_proj.weight"):
    if key not in state_dict:
      raise errors.UserError(f"not a MAR checkpoint: key {key!r} is missing")
  depth = _count(state_dict, "encoder_blocks.")
  width, token_dim = (int(x) for x in state_dict["z_proj.weight"].shape)
  found = None
  for variant in ("B", "L", "H"):
    c = config_util.load_config_file(f"mar.py:{variant}")
    if (c.model.encoder_depth, c.model.encoder_embed_dim) == (depth, width):
      found = c
  config = mlc.ConfigDict((found or config_util.load_config_file("mar.py:B")).to_dict())
  config.variant = found.variant if found else "inferred"
  m = config.model
  heads = num_heads or (m.encoder_num_heads if found else max(1, width // 64))
  dec_width = int(state_dict["decoder_embed.weight"].shape[0])
  for w in (width, dec_width):
    if w % heads:
      raise errors.UserError(f"num_heads={heads} does not divide the checkpoint's width {w}")
  seq_len = int(state_dict["diffusion_pos_embed_learned"].shape[1])
  m.encoder_depth, m.encoder_embed_dim, m.encoder_num_heads = depth, width, heads
  m.decoder_depth = _count(state_dict, "decoder_blocks.")
  m.decoder_embed_dim, m.decoder_num_heads = dec_width, heads
  m.mlp_ratio = int(state_dict["encoder_blocks.0.mlp.fc1.weight"].shape[0]) / width
  m.buffer_size = int(state_dict["encoder_pos_embed_learned"].shape[1]) - seq_len
  m.diffloss_d = _count(state_dict, "diffloss.net.res_blocks.")
  m.diffloss_w = int(state_dict["diffloss.net.input_proj.weight"].shape[0])
  config.data.num_classes = int(state_dict["class_emb.weight"].shape[0])
  side = math.isqrt(seq_len)
  if side * side != seq_len or token_dim % (m.patch_size**2):
    raise errors.UserError(f"MAR checkpoint: {seq_len} tokens are not a square grid")
  tok = config.tokenizer.config
  tok.model.embed_dim = token_dim // (m.patch_size**2)
  stride = 2 ** (len(tok.model.ch_mult) - 1)
  config.data.image_size = tok.data.image_size = side * m.patch_size * stride
  return config


def describe(c) -> str:
  m = c.model
  return (
    f"MAR encoder={m.encoder_depth}x{m.encoder_embed_dim} decoder={m.decoder_depth}x"
    f"{m.decoder_embed_dim} heads={m.encoder_num_heads} mlp_ratio={m.mlp_ratio:g} "
    f"buffer={m.buffer_size} diffloss={m.diffloss_d}x{m.diffloss_w} classes={c.data.num_classes} "
    f"image_size={c.data.image_size}"
  )


def convert_mar(state_dict: dict, config) -> dict:
  """MAR state dict (`model` or `model_ema`) -> MAR params (the tokenizer is converted apart)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(state_dict, family.abstract_params(), what="MAR checkpoint")


def load_mar_state_dict(path: str, ema: bool = False) -> dict:
  """`model` (or with `ema` the `model_ema`) of an official `checkpoint-*.pth`, as numpy."""
  obj = common.torch_load(path)
  if ema:
    if not isinstance(obj, dict) or "model_ema" not in obj:
      keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise errors.UserError(f"{path}: --ema needs a 'model_ema' entry; the checkpoint has {keys}")
    return common.unwrap_state_dict(obj["model_ema"], f"{path}[model_ema]")
  return common.unwrap_state_dict(obj, path)


def _tokenizer_from(vae: str):
  """`--vae` is an `arvision convert mar_vae` output dir or the official `kl16.ckpt`."""
  if os.path.isdir(vae):
    loaded = ckpt_lib.load_params(vae)
    return loaded["params"], ckpt_lib.read_config(vae)
  return convert_vae(common.load_torch_state_dict(vae))


def main_mar_vae(path: str, out: str) -> str:
  params, config = convert_vae(common.load_torch_state_dict(path))
  ckpt_lib.save_export(out, params, {}, config)
  return out


def main_with_kl_vae(
  path, out, vae, ema, num_heads, *, what: str, detect_config, describe, convert
) -> str:
  """Converts a checkpoint of a model on MAR's KL-16 VAE (MAR, xAR, FlowAR: the same
  `model`/`model_ema` state-dict layout) with the VAE given by `--vae` and saves the export.
  `what`: the article and name for the error ("a MAR"); the three callables are the family's."""
  if not vae:
    raise errors.UserError(
      f"converting {what} checkpoint needs --vae (kl16.ckpt or a mar_vae export)"
    )
  sd = load_mar_state_dict(path, ema=ema)
  config = detect_config(sd, num_heads)
  logging.info("%s: inferred %s", path, describe(config))
  tok_params, tok_config = _tokenizer_from(vae)
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.tokenizer.checkpoint = os.path.abspath(vae)
  params = convert(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok_params}, config)
  return out


def main_mar(
  path: str, out: str, vae: str | None = None, ema: bool = False, num_heads: int | None = None
) -> str:
  return main_with_kl_vae(
    path, out, vae, ema, num_heads,
    what="a MAR", detect_config=detect_config, describe=describe, convert=convert_mar,
  )  # fmt: skip


def to_official_vae(tok_params: dict, tok_config) -> dict:
  """Tokenizer params -> the official `AutoencoderKL` state dict."""
  return common.to_state_dict(
    tok_params["ae"], renames=((r"\.mid\.(block|attn)\.(\d+)\.", r".mid.\1_\2."),)
  )


def to_official_mar(params: dict, config) -> dict:
  """MAR params -> the official MAR state dict (names map 1:1)."""
  return common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})
