"""FoundationVision/Infinity transformer checkpoints -> arvision (`infinity_2b_reg.pth`, or any
`Infinity` state dict with shared AdaLN, bit labels and cross-attention blocks).

    arvision convert infinity infinity_2b_reg.pth --vae runs/infinity_vae_d32 --out runs/infinity_2b

`--vae` is a converted BSQ tokenizer directory (its `embed_dim` must equal the checkpoint's d).
Key layout (see `arvision/models/infinity.py`): `blocks.{i}` or `block_chunks.{c}.module.{j}`
(the released 2B: 8 chunks of 4) -> `blocks_{c * per_chunk + j}`; `text_proj_for_sos.ca.*` ->
`sos_pool/*`; `text_proj_for_ca.{0,2}` -> `text_proj_ca{1,2}`; `shared_ada_lin.1` and
`head_nm.ada_lin.1` drop the SiLU index; `*.scale_mul_1H11` [1, H, 1, 1] -> `scale_mul` [H];
`text_norm.weight` -> `text_norm`. The zero k-bias buffers are skipped. Depth, width, heads, d,
Ct5, the null-text length and the FFN width are read from the shapes.
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

SKIP = (r"(.*\.)?zero_k_bias",)
BASE_RENAMES = (
  (r"^text_norm\.weight$", "text_norm"),
  (r"^text_proj_for_sos\.ca\.", "sos_pool."),
  (r"^text_proj_for_ca\.0\.", "text_proj_ca1."),
  (r"^text_proj_for_ca\.2\.", "text_proj_ca2."),
  (r"^shared_ada_lin\.1\.", "shared_ada_lin."),
  (r"^head_nm\.ada_lin\.1\.", "head_nm.ada_lin."),
  (r"\.scale_mul_1H11$", ".scale_mul"),
)


def _chunk_renames(state_dict: dict) -> list[tuple[str, str]]:
  """`block_chunks.{c}.module.{j}.` -> `blocks.{c * per_chunk + j}.` (chunks hold equal counts)."""
  chunks = cv._count(state_dict, "block_chunks.")
  if not chunks:
    return []
  per = cv._count(state_dict, "block_chunks.0.module.")
  return [
    (rf"^block_chunks\.{c}\.module\.{j}\.", f"blocks.{c * per + j}.")
    for c in range(chunks)
    for j in range(per)
  ]


def renames(state_dict: dict) -> list[tuple[str, str]]:
  return _chunk_renames(state_dict) + list(BASE_RENAMES)


def _flat_view(state_dict: dict) -> dict:
  rules = [(re.compile(a), b) for a, b in _chunk_renames(state_dict)]
  out = {}
  for k, v in state_dict.items():
    for pattern, repl in rules:
      k = pattern.sub(repl, k)
    out[k] = v
  return out


def infinity_config(state_dict: dict, tok_config=None) -> mlc.ConfigDict:
  """The `configs/infinity.py:2b` config with every size read from the checkpoint's shapes."""
  sd = _flat_view(state_dict)
  need = (
    "cfg_uncond",
    "pos_start",
    "head.weight",
    "blocks.0.sa.scale_mul_1H11",
    "blocks.0.ada_gss",
  )
  missing = [k for k in need if k not in sd]
  if missing:
    raise errors.UserError(
      f"not a text-conditioned Infinity checkpoint with shared AdaLN (the released models): "
      f"key(s) {missing} missing (after `block_chunks.c.module.j` -> `blocks.i`)"
    )
  if "blocks.0.ffn.fcg.weight" in sd:
    raise errors.UserError("SwiGLU Infinity checkpoints (ffn.fcg) are not supported")
  c = mlc.ConfigDict(config_util.load_config_file("infinity.py:2b").to_dict())
  width = int(sd["pos_start"].shape[-1])
  hidden = int(sd["blocks.0.ffn.fc1.weight"].shape[0])
  m = c.model
  m.depth = cv._count(sd, "blocks.")
  m.width = width
  m.num_heads = int(np.prod(sd["blocks.0.sa.scale_mul_1H11"].shape))
  m.text_maxlen, m.text_dim = (int(s) for s in sd["cfg_uncond"].shape)
  m.mlp_ratio = hidden / width
  bits = int(sd["head.weight"].shape[0]) // 2
  if tok_config is not None:
    if int(tok_config.model.embed_dim) != bits:
      raise errors.UserError(
        f"the checkpoint predicts {bits} bits per token but the tokenizer's embed_dim is "
        f"{tok_config.model.embed_dim}; pass the BSQ tokenizer it was trained with (--vae)"
      )
    with c.unlocked():
      c.tokenizer.config = mlc.ConfigDict(tok_config.to_dict())
  else:  # the official VAE of that width (`tokenizer.py:infinity_d32` has d = 32)
    c.tokenizer.config.model.embed_dim = c.tokenizer.config.model.z_channels = bits
  return c


def describe(config) -> str:
  m = config.model
  return (
    f"Infinity depth={m.depth} width={m.width} heads={m.num_heads} text_dim={m.text_dim} "
    f"text_maxlen={m.text_maxlen} mlp_ratio={m.mlp_ratio:g} bits={config.tokenizer.config.model.embed_dim}"
  )


def family_of(config):
  tokenizer = families.build(config.tokenizer.config)
  return families.build(config, tokenizer=tokenizer)


def convert_infinity(state_dict: dict, config, family=None) -> dict:
  """Infinity state dict -> params (every key covered, every param filled; no tokenizer)."""
  family = family or family_of(config)
  abstract = jax.eval_shape(family.init, jax.random.key(0))
  return common.convert(
    state_dict, abstract, renames=renames(state_dict), skip=SKIP, what="Infinity checkpoint"
  )


def to_official_infinity(params: dict, block_chunks: int = 1) -> dict:
  """Params -> the official state dict (`blocks.i`, or `block_chunks.c.module.j` when
  `block_chunks > 1`), with the zero k-bias buffers. The inverse of `convert_infinity`."""
  gen = {k: v for k, v in params.items() if k != "tokenizer"}
  sd = common.to_state_dict(
    gen,
    renames=(
      (r"^text_norm$", "text_norm.weight"),
      (r"^sos_pool\.", "text_proj_for_sos.ca."),
      (r"^text_proj_ca1\.", "text_proj_for_ca.0."),
      (r"^text_proj_ca2\.", "text_proj_for_ca.2."),
      (r"^shared_ada_lin\.", "shared_ada_lin.1."),
      (r"^head_nm\.ada_lin\.", "head_nm.ada_lin.1."),
      (r"\.scale_mul$", ".scale_mul_1H11"),
    ),
  )
  for k in [k for k in sd if k.endswith(".scale_mul_1H11")]:
    sd[k] = sd[k].reshape(1, -1, 1, 1)
  for k in [k for k in sd if k.endswith((".sa.v_bias", ".ca.v_bias"))]:
    sd[k.replace(".v_bias", ".zero_k_bias")] = np.zeros_like(sd[k])
  depth = cv._count(sd, "blocks.")
  if block_chunks <= 1:
    return sd
  if depth % block_chunks:
    raise ValueError(f"depth {depth} does not split into {block_chunks} block chunks")
  per, out = depth // block_chunks, {}
  for k, v in sd.items():
    if k.startswith("blocks."):
      i, rest = k[len("blocks.") :].split(".", 1)
      k = f"block_chunks.{int(i) // per}.module.{int(i) % per}.{rest}"
    out[k] = v
  return out


def main_infinity(path: str, out: str, vae: str) -> str:
  sd = common.load_torch_state_dict(path)
  if not os.path.isdir(vae):
    raise errors.UserError(
      f"--vae {vae!r}: pass the directory of a converted BSQ tokenizer (arvision convert of the "
      "official infinity_vae_*.pth)"
    )
  tok = ckpt_lib.load_params(vae)
  tok_config = ckpt_lib.read_config(vae)
  config = infinity_config(sd, tok_config)
  logging.info("%s: inferred %s", path, describe(config))
  with config.unlocked():
    config.tokenizer.checkpoint = os.path.abspath(vae)
    config.data.image_size = tok_config.data.image_size
  params = convert_infinity(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok["params"]}, config)
  return out
