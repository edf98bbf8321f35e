"""FoundationVision/VAR checkpoints -> arvision: `vae_ch160v4096z32.pth`, `var_d{16,...,36}.pth`.

Any size converts (e.g. a VAR-d12 trained with the official code): depth, width, heads, classes,
MLP ratio, shared AdaLN and the scale schedule are read from the checkpoint's shapes, the VQVAE's
channels, levels and codebook likewise; `--patch_nums` only where the schedule is ambiguous.
What was inferred is logged.

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
import numpy as np
from absl import logging

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


def _count(state_dict: dict, prefix: str) -> int:
  """Number of `prefix<i>.` entries (blocks, levels) in a state dict."""
  idx = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
  return 1 + max(idx) if idx else 0


def _need(state_dict: dict, keys, what: str) -> None:
  missing = [k for k in keys if k not in state_dict]
  if missing:
    raise errors.UserError(f"not a {what} checkpoint: key(s) {missing} are missing")


def infer_vae_config(state_dict: dict, patch_nums=None) -> mlc.ConfigDict:
  """The VQVAE config whose shapes match the checkpoint: channels and levels from the conv
  shapes, the codebook from `quantize.embedding`, the number of phi convs from `quant_resi`.
  The scale schedule (`patch_nums`) is not in the VAE's weights: the official one (1..16) unless
  given; `arvision convert var` sets it from the transformer's `pos_1LC`."""
  _need(
    state_dict,
    ("encoder.conv_in.weight", "quantize.embedding.weight", "quant_conv.weight"),
    "VAR VQVAE",
  )
  c = mlc.ConfigDict(vae_config().to_dict())
  ch = int(state_dict["encoder.conv_in.weight"].shape[0])
  levels = _count(state_dict, "encoder.down.")
  mult = tuple(
    int(state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels)
  )
  vocab, cvae = (int(x) for x in state_dict["quantize.embedding.weight"].shape)
  if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in state_dict):
    share = _count(state_dict, "quantize.quant_resi.qresi_ls.")
  elif any(k.startswith("quantize.quant_resi.qresi.") for k in state_dict):
    share = 1
  else:
    share = 0
  m = c.model
  m.ch, m.ch_mult = ch, mult
  m.num_res_blocks = _count(state_dict, "encoder.down.0.block.")
  m.z_channels = int(state_dict["encoder.conv_out.weight"].shape[0])
  m.embed_dim, m.vocab_size = cvae, vocab
  m.share_quant_resi = share
  m.quant_conv_ks = int(state_dict["quant_conv.weight"].shape[-1])
  m.using_sa = f"encoder.down.{levels - 1}.attn.0.qkv.weight" in state_dict
  m.mid_attn = "encoder.mid.attn_1.qkv.weight" in state_dict
  if patch_nums is not None:
    m.patch_nums = tuple(int(p) for p in patch_nums)
  c.data.image_size = int(m.patch_nums[-1]) * 2 ** (levels - 1)
  return c


def describe_vae(c) -> str:
  m = c.model
  return (
    f"VQVAE ch={m.ch} ch_mult={tuple(m.ch_mult)} res_blocks={m.num_res_blocks} "
    f"z={m.z_channels} codebook={m.vocab_size}x{m.embed_dim} phis={m.share_quant_resi}"
  )


def convert_vae(state_dict: dict, config=None) -> tuple[dict, mlc.ConfigDict]:
  """VAR's VQVAE state dict -> (tokenizer params `{"ae": ...}`, tokenizer config); the config is
  inferred from the checkpoint's shapes unless given."""
  config = config or infer_vae_config(state_dict)
  family = families.build(config)
  ae = common.convert(
    state_dict,
    family.abstract_params()["ae"],
    renames=VAE_RENAMES,
    skip=VAE_SKIP,
    what="VAR VQVAE checkpoint",
  )
  return {"ae": ae}, config


def _squares_schedule(n: int, total: int, hint=()) -> tuple | None:
  """The strictly increasing `n` scales starting at 1 whose squares sum to `total` (the token
  count of `pos_1LC`): the official 256/512 schedules or `hint` when they fit, else the unique
  solution; None when there is none or more than one."""
  for cand in (tuple(hint), PATCH_NUMS_256, PATCH_NUMS_512):
    if len(cand) == n and sum(p * p for p in cand) == total:
      return cand
  found = []

  def walk(seq, left):
    if len(found) > 1:
      return
    if len(seq) == n:
      if left == 0:
        found.append(tuple(seq))
      return
    p = seq[-1] + 1
    while p * p <= left and len(found) <= 1:
      walk(seq + [p], left - p * p)
      p += 1

  if n >= 1 and total >= 1:
    walk([1], total - 1)
  return found[0] if len(found) == 1 else None


PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def var_config(state_dict: dict, patch_nums=None, tokenizer_patch_nums=()) -> mlc.ConfigDict:
  """The VAR config whose shapes match the checkpoint: depth from the block count, width and
  classes from `class_emb`, heads from `scale_mul_1H11`, the MLP ratio from `ffn.fc1`, shared
  AdaLN from `shared_ada_lin`, the scale schedule from `pos_1LC` / `lvl_embed` (or `patch_nums`).
  The training recipe is the official one of the nearest released depth."""
  _need(state_dict, ("class_emb.weight", "pos_1LC", "lvl_embed.weight", "head.weight"), "VAR")
  depth = _count(state_dict, "blocks.")
  if depth == 0:
    raise errors.UserError("not a VAR checkpoint: no 'blocks.<i>.' keys")
  rows, width = (int(x) for x in state_dict["class_emb.weight"].shape)
  heads = int(state_dict["blocks.0.attn.scale_mul_1H11"].shape[1])
  hidden = int(state_dict["blocks.0.ffn.fc1.weight"].shape[0])
  num_scales = int(state_dict["lvl_embed.weight"].shape[0])
  total = int(state_dict["pos_1LC"].shape[1])
  if patch_nums:
    patch_nums = tuple(int(p) for p in patch_nums)
    if len(patch_nums) != num_scales or sum(p * p for p in patch_nums) != total:
      raise errors.UserError(
        f"patch_nums={patch_nums} do not fit the checkpoint: it has {num_scales} scales and "
        f"{total} tokens (pos_1LC)"
      )
  else:
    patch_nums = _squares_schedule(num_scales, total, tokenizer_patch_nums)
    if patch_nums is None:
      raise errors.UserError(
        f"cannot infer the scale schedule of a VAR checkpoint with {num_scales} scales and {total}"
        " tokens; pass --patch_nums 1,2,3,... (squares summing to the token count)"
      )
  released = [int(k[1:]) for k in VAR_DEPTHS]
  nearest = min(released, key=lambda d: abs(d - depth))
  config = mlc.ConfigDict(config_util.load_config_file(f"var.py:d{nearest}").to_dict())
  config.variant = f"d{depth}" if depth in released and width == 64 * depth else "inferred"
  m = config.model
  m.depth, m.width, m.num_heads = depth, width, heads
  m.mlp_ratio = hidden / width
  m.shared_aln = "shared_ada_lin.1.weight" in state_dict
  m.drop_path_rate = 0.1 * depth / 24
  config.data.num_classes = rows - 1
  config.tokenizer.config.model.patch_nums = patch_nums
  config.tokenizer.config.model.vocab_size = int(state_dict["head.weight"].shape[0])
  config.tokenizer.config.model.embed_dim = int(state_dict["word_embed.weight"].shape[1])
  return config


VAR_DEPTHS = ("d16", "d20", "d24", "d30", "d36")


def describe_var(c) -> str:
  m = c.model
  return (
    f"VAR depth={m.depth} width={m.width} heads={m.num_heads} mlp_ratio={m.mlp_ratio:g} "
    f"shared_aln={m.shared_aln} classes={c.data.num_classes} "
    f"patch_nums={tuple(c.tokenizer.config.model.patch_nums)}"
  )


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
  sd = common.load_torch_state_dict(path)
  config = infer_vae_config(sd)
  logging.info("%s: inferred %s", path, describe_vae(config))
  params, config = convert_vae(sd, config)
  ckpt_lib.save_export(out, params, {}, config)
  return out


def main_var(path: str, out: str, vae: str, patch_nums=None) -> str:
  sd = common.load_torch_state_dict(path)
  tok_params, tok_config = _tokenizer_from(vae)
  config = var_config(sd, patch_nums, tuple(tok_config.model.patch_nums))
  tok_config = mlc.ConfigDict(tok_config.to_dict())
  # The scale schedule belongs to the transformer (its pos_1LC); the VAE's weights fit any.
  tok_config.model.patch_nums = tuple(config.tokenizer.config.model.patch_nums)
  levels = len(tok_config.model.ch_mult)
  tok_config.data.image_size = int(tok_config.model.patch_nums[-1]) * 2 ** (levels - 1)
  logging.info("%s: inferred %s", path, describe_var(config))
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.tokenizer.checkpoint = os.path.abspath(vae)
    config.data.image_size = tok_config.data.image_size
  params = convert_var(sd, config)
  ckpt_lib.save_export(out, params, {"tokenizer": tok_params}, config)
  return out


# The inverse layout (arvision -> official state dict, `arvision export --format official`).
_LDM_MID = (r"\.mid\.(block|attn)\.(\d+)\.", r".mid.\1_\2.")  # `mid.block_1` is a name, not a list


def to_official_vae(tok_params: dict, tok_config) -> dict:
  """Tokenizer params `{"ae": ...}` -> the official VQVAE state dict (strict=True keys, the
  `ema_vocab_hit_SV` usage buffer as zeros)."""
  share = int(tok_config.model.share_quant_resi)
  resi = {0: r"quantize.quant_resi.\1.", 1: "quantize.quant_resi.qresi."}.get(
    share, r"quantize.quant_resi.qresi_ls.\1."
  )
  sd = common.to_state_dict(
    tok_params["ae"],
    renames=(
      _LDM_MID,
      (r"^quantize\.weight$", "quantize.embedding.weight"),
      (r"^quantize\.quant_resi\.(\d+)\.", resi),
    ),
  )
  m = tok_config.model
  sd["quantize.ema_vocab_hit_SV"] = np.zeros((len(m.patch_nums), m.vocab_size), np.float32)
  return sd


def to_official_var(params: dict, config) -> dict:
  """VAR params -> the official VAR state dict, with the buffers the official module registers
  (`lvl_1L`, `attn_bias_for_masking`, `zero_k_bias`) recomputed as it computes them."""
  gen = {k: v for k, v in params.items() if k != "tokenizer"}
  sd = common.to_state_dict(
    gen,
    renames=(
      (r"\.ada_lin\.", ".ada_lin.1."),
      (r"^shared_ada_lin\.", "shared_ada_lin.1."),
      (r"\.scale_mul$", ".scale_mul_1H11"),
    ),
  )
  for k in [k for k in sd if k.endswith(".scale_mul_1H11")]:
    sd[k] = sd[k].reshape(1, -1, 1, 1)
  patch_nums = tuple(config.tokenizer.config.model.patch_nums)
  lvl = np.concatenate([np.full(p * p, i, np.int64) for i, p in enumerate(patch_nums)])
  sd["lvl_1L"] = lvl[None]
  bias = np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf).astype(np.float32)
  sd["attn_bias_for_masking"] = bias[None, None]
  for i in range(int(config.model.depth)):
    sd[f"blocks.{i}.attn.zero_k_bias"] = np.zeros(int(config.model.width), np.float32)
  return sd
