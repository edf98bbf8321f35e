"""TheFllood/ARFlow checkpoints -> arvision (`arvision convert arflow ckpt.pt --vae DIR --out OUT`).

    arvision convert arflow 0400000.pt --vae runs/my_kl_tokenizer --out runs/arflow_xl2

Key layout: torch `a.0.b` -> flax `a_0/b` (`common.convert`); Linear weights are transposed, the
patch conv OIHW -> HWIO, `y_embedder.embedding_table.weight` -> `embedding`. Names are the
official ones (`blocks_{i}/{attn/{q,k,v,g,gt,out}_proj, mlp/{fc1, fc2}, adaLN_modulation_1}`,
`final_layer/...`; see `arvision/models/arflow.py`). `pos_embed` (fixed 2D sin-cos) is rebuilt,
not loaded. A `train.py` checkpoint holds `model`, `ema`, `opt`, `args`: like the official
`download.find_model`, the `ema` weights are taken when present. Depth, width, heads (from
`gt_proj`), patch, latent grid, channels and classes are read from the shapes.

The official latents come from diffusers' `sd-vae-ft-ema`, which has no converter here: `--vae`
must be an arvision KL tokenizer export (`arvision.save`/`train` workdir) with the checkpoint's
latent channels.
"""

from __future__ import annotations

import math

import ml_collections as mlc

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common

SKIP = (r"pos_embed",)  # the fixed 2D sin-cos buffer (a frozen Parameter in the official module)


def load_state_dict(path: str) -> dict:
  """The weights the official `find_model` loads: `ema` when present, else the state dict."""
  obj = common.torch_load(path)
  if isinstance(obj, dict) and "ema" in obj:
    return common.unwrap_state_dict(obj["ema"], f"{path}[ema]")
  return common.unwrap_state_dict(obj, path)


def detect_config(state_dict: dict) -> mlc.ConfigDict:
  """The ARFlow config whose shapes match the checkpoint (see the module docstring)."""
  for key in (
    "x_embedder.proj.weight",
    "y_embedder.embedding_table.weight",
    "pos_embed",
    "blocks.0.attn.gt_proj.weight",
    "final_layer.linear.weight",
  ):
    if key not in state_dict:
      raise errors.UserError(f"not an ARFlow checkpoint: key {key!r} is missing")
  depth = 0
  while f"blocks.{depth}.attn.q_proj.weight" in state_dict:
    depth += 1
  width, channels, patch, _ = (int(x) for x in state_dict["x_embedder.proj.weight"].shape)
  heads = int(state_dict["blocks.0.attn.gt_proj.weight"].shape[0])
  tokens = int(state_dict["pos_embed"].shape[1])
  grid = math.isqrt(tokens)
  if grid * grid != tokens:
    raise errors.UserError(f"ARFlow checkpoint: pos_embed has {tokens} tokens, not a square grid")
  out = int(state_dict["final_layer.linear.weight"].shape[0])
  if out != patch * patch * 2 * channels:
    raise errors.UserError(
      f"ARFlow checkpoint: final_layer.linear.weight has {out} outputs; expected "
      f"patch^2 * 2 * channels = {patch * patch * 2 * channels} (learn_sigma=True, as released)"
    )
  hidden = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0])
  found = None
  for variant in [f"{s}-{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]:
    c = config_util.load_config_file(f"arflow.py:{variant}")
    m = c.model
    if (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (depth, width, heads, patch):
      found = c
  config = mlc.ConfigDict((found or config_util.load_config_file("arflow.py:S-2")).to_dict())
  config.variant = found.variant if found else "inferred"
  m = config.model
  m.depth, m.hidden_size, m.num_heads, m.patch_size = depth, width, heads, patch
  m.mlp_ratio = hidden / width
  config.data.num_classes = int(state_dict["y_embedder.embedding_table.weight"].shape[0]) - 1
  tok = config.tokenizer.config
  tok.model.embed_dim = tok.model.z_channels = channels  # shapes only; --vae replaces it
  stride = 2 ** (len(tok.model.ch_mult) - 1)
  config.data.image_size = tok.data.image_size = grid * patch * stride
  return config


def describe(c) -> str:
  m = c.model
  return (
    f"ARFlow depth={m.depth} width={m.hidden_size} heads={m.num_heads} patch={m.patch_size} "
    f"classes={c.data.num_classes} image_size={c.data.image_size}"
  )


def convert_arflow(state_dict: dict, config) -> dict:
  """ARFlow state dict -> ARFlow params (the tokenizer is converted apart)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(state_dict, family.abstract_params(), skip=SKIP, what="ARFlow checkpoint")


def main_arflow(path: str, out: str, vae: str | None = None) -> str:
  if not vae:
    raise errors.UserError(
      "converting an ARFlow checkpoint needs --vae: an arvision KL tokenizer export with the "
      "checkpoint's latent channels (the official SD-VAE has no converter)"
    )
  sd = load_state_dict(path)
  config = detect_config(sd)
  loaded = ckpt_lib.load_params(vae)
  tok_config = ckpt_lib.read_config(vae)
  if tok_config.get("family") != "tokenizer" or tok_config.model.type != "kl":
    raise errors.UserError(f"--vae {vae}: not a KL tokenizer export")
  channels = int(sd["x_embedder.proj.weight"].shape[1])
  if int(tok_config.model.embed_dim) != channels:
    raise errors.UserError(
      f"--vae {vae}: the tokenizer has {tok_config.model.embed_dim} latent channels, the ARFlow "
      f"checkpoint {channels}"
    )
  with config.unlocked():
    config.tokenizer.config = tok_config
    stride = 2 ** (len(tok_config.model.ch_mult) - 1)
    grid = math.isqrt(int(sd["pos_embed"].shape[1])) * config.model.patch_size
    config.data.image_size = grid * stride
  params = convert_arflow(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": loaded["params"]}, config)
  return out


def to_official_arflow(params: dict, side: int, width: int) -> dict:
  """ARFlow params -> the official state dict, `pos_embed` included (names map 1:1)."""
  from arvision.models.arflow import mae_sincos_2d  # noqa: PLC0415

  sd = common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})
  sd["pos_embed"] = mae_sincos_2d(side, width)[None]
  return sd
