"""FoundationVision/VAR checkpoints -> arvision: `vae_ch160v4096z32.pth` and `var_d{16,20,24,30,36}.pth`.

    arvision convert var_vae vae_ch160v4096z32.pth --out runs/var_vae
    arvision convert var var_d16.pth --vae runs/var_vae --out runs/var_d16

Key layout (see docs/parity.md): torch `a.0.b` -> flax `a_0/b`; Linear weights are transposed, conv
weights go OIHW -> HWIO; AdaLN linears (`ada_lin.1`) keep their fused 6C (2C for the head) output in
the official chunk order; `scale_mul_1H11` [1,H,1,1] -> `scale_mul` [H]. Buffers that
the model recomputes are skipped: `lvl_1L`, `attn_bias_for_masking`, `zero_k_bias`,
`quantize.ema_vocab_hit_SV`.
"""

from __future__ import annotations

import os

import ml_collections as mlc

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common

VAE_RENAMES = (
  (r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.", r"quantize.quant_resi_\1."),  # share_quant_resi=K
  (r"^quantize\.quant_resi\.qresi\.", r"quantize.quant_resi_0."),  # 1: fully shared
  (r"^quantize\.quant_resi\.(\d+)\.", r"quantize.quant_resi_\1."),  # 0: one per scale
  (r"^quantize\.embedding\.weight$", r"quantize.embedding"),
)
VAE_SKIP = (r"quantize\.ema_vocab_hit_SV",)

VAR_RENAMES = (
  (r"\.ada_lin\.1\.", ".ada_lin."),
  (r"^shared_ada_lin\.1\.", "shared_ada_lin."),
  (r"\.scale_mul_1H11$", ".scale_mul"),
)
VAR_SKIP = (r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias")


def vae_config(variant: str = "var_vae") -> mlc.ConfigDict:
  return config_util.load_config_file(f"tokenizer.py:{variant}")


def convert_vae(state_dict: dict, config=None) -> tuple[dict, mlc.ConfigDict]:
  """VAR's VQVAE state dict -> (tokenizer params `{"ae": ...}`, tokenizer config)."""
  config = config or vae_config()
  family = families.build(config)
  ae = common.convert(
    state_dict,
    family.abstract_params()["ae"],
    renames=VAE_RENAMES,
    skip=VAE_SKIP,
    what="VAR VQVAE checkpoint",
  )
  return {"ae": ae}, config


def var_config(state_dict: dict) -> mlc.ConfigDict:
  """The `configs/var.py` variant whose shapes match the checkpoint (depth from its blocks)."""
  depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
  variant = f"d{depth}"
  try:
    return config_util.load_config_file(f"var.py:{variant}")
  except ValueError as e:
    raise errors.UserError(
      f"checkpoint has {depth} blocks; no official VAR variant {variant!r}"
    ) from e


def convert_var(state_dict: dict, config) -> dict:
  """VAR transformer state dict -> VAR params (the tokenizer is converted separately)."""
  tokenizer = families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    state_dict, family.abstract_params(), renames=VAR_RENAMES, skip=VAR_SKIP, what="VAR checkpoint"
  )


def _tokenizer_from(vae: str):
  """`--vae` is an `arvision convert var_vae` output dir or the official `.pth`."""
  if os.path.isdir(vae):
    loaded = ckpt_lib.load_params(vae)
    return loaded["params"], ckpt_lib.read_config(vae)
  return convert_vae(common.load_torch_state_dict(vae))


def main_var_vae(path: str, out: str) -> str:
  params, config = convert_vae(common.load_torch_state_dict(path))
  ckpt_lib.save_export(out, params, {}, config)
  return out


def main_var(path: str, out: str, vae: str) -> str:
  sd = common.load_torch_state_dict(path)
  config = var_config(sd)
  tok_params, tok_config = _tokenizer_from(vae)
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.tokenizer.checkpoint = os.path.abspath(vae)
  params = convert_var(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok_params}, config)
  return out
