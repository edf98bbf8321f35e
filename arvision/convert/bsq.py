"""FoundationVision/Infinity BSQ VAE checkpoints -> arvision: `infinity_vae_d32reg.pth` and kin.

    arvision convert infinity_vae infinity_vae_d32reg.pth --out runs/infinity_vae_d32

The official VAE (`infinity/models/bsq_vae/flux_vqgan.py::AutoEncoder`) is an LDM encoder and
decoder without attention or quant convs, whose convs and norms sit in wrappers: the module's
keys read `encoder.conv_in.conv.weight`, `...block.0.norm1.norm.weight`,
`...downsample.conv.conv.weight`, while released checkpoints may hold the plain 2D names
(`encoder.conv_in.weight`; the official `load_cnn` accepts both). Both forms convert: the wrapper
levels are dropped, then the LDM rules of `tokenizers/autoencoder.py` apply. The quantizer has no
weights: its bit-weight buffer `quantizer.lfq.mask` (also under the alias `quantize.`) is skipped.
Checkpoints saved by the official trainer keep the weights under `"vae"` (or `"ema"`); both are unwrapped (`"vae"` first). Width,
levels, blocks and bits (`d` = the encoder's output channels) are read from the shapes; the scale
schedule is not in the weights: the official 1:1 one at 1024px (`configs/tokenizer.py:
infinity_d32`) unless `image_size` is given (then the official schedule for that latent).
"""

from __future__ import annotations

import ml_collections as mlc
import numpy as np
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import config_util, errors, families
from arvision.convert import common

# The wrappers of the official `Conv` / `Normalize` modules: `<conv>.conv.<leaf>` -> `<conv>.<leaf>`
# (also `downsample.conv.conv.weight` -> `downsample.conv.weight`), `<norm>.norm.<leaf>` likewise.
RENAMES = (
  (r"\.(conv_in|conv_out|conv1|conv2|nin_shortcut|q|k|v|proj_out|conv)\.conv\.", r".\1."),
  (r"\.(norm1|norm2|norm_out|norm)\.norm\.", r".\1."),
)
SKIP = (r"quantizer?\.lfq\.mask",)  # the module registers its quantizer twice (`quantize` alias)
WRAPPERS = ("vae", "ema")


def unwrap(obj, what: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict):
    for key in WRAPPERS:
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  return common.unwrap_state_dict(obj, what)


def _conv(state_dict: dict, key: str) -> np.ndarray:
  """A conv weight under either name (`<key>.conv.weight` or `<key>.weight`)."""
  for k in (f"{key}.conv.weight", f"{key}.weight"):
    if k in state_dict:
      return state_dict[k]
  raise errors.UserError(
    f"not an Infinity BSQ VAE checkpoint: {key}.conv.weight (or {key}.weight) is missing"
  )


def infer_config(state_dict: dict, image_size: int | None = None) -> mlc.ConfigDict:
  """The `type="bsq"` tokenizer config whose shapes match the checkpoint."""
  c = mlc.ConfigDict(config_util.load_config_file("tokenizer.py:infinity_d32").to_dict())
  conv_in = _conv(state_dict, "encoder.conv_in")
  ch = int(conv_in.shape[0])
  c.data.channels = int(conv_in.shape[1])
  levels = 1 + max(
    (int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down.")), default=-1
  )
  if levels == 0:
    raise errors.UserError("not an Infinity BSQ VAE checkpoint: no 'encoder.down.<i>.' keys")
  mult = tuple(
    int(_conv(state_dict, f"encoder.down.{i}.block.0.conv1").shape[0]) // ch for i in range(levels)
  )
  blocks = 1 + max(
    int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block.")
  )
  bits = int(_conv(state_dict, "encoder.conv_out").shape[0])
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks = ch, mult, blocks
  m.z_channels = m.embed_dim = bits
  m.mid_attn = any(k.startswith("encoder.mid.attn_1.") for k in state_dict)
  down = 2 ** (levels - 1)
  if image_size is not None:
    latent = int(image_size) // down
    scales = tuple(p for p in c.model.patch_nums if p <= latent)
    if latent * down != int(image_size) or scales[-1] != latent:
      raise errors.UserError(
        f"image_size={image_size}: the official 1:1 schedules end at a latent side in "
        f"{(16, 32, 64)} (x {down} pixels)"
      )
    m.patch_nums = scales[: {16: 7, 32: 10, 64: 13}.get(latent, len(scales))]
    c.data.image_size = int(image_size)
  else:
    c.data.image_size = int(m.patch_nums[-1]) * down
  return c


def describe(c) -> str:
  m = c.model
  return (
    f"Infinity BSQ VAE ch={m.ch} ch_mult={tuple(m.ch_mult)} res_blocks={m.num_res_blocks} "
    f"bits={m.embed_dim} scales={tuple(m.patch_nums)}"
  )


def convert_vae(state_dict: dict, config=None) -> tuple[dict, mlc.ConfigDict]:
  """Official BSQ VAE state dict -> (tokenizer params `{"ae": ...}`, tokenizer config)."""
  config = config or infer_config(state_dict)
  ae = common.convert(
    state_dict,
    families.build(config).abstract_params()["ae"],
    renames=RENAMES,
    skip=SKIP,
    what="Infinity BSQ VAE checkpoint",
  )
  return {"ae": ae}, config


def main_infinity_vae(path: str, out: str) -> str:
  sd = unwrap(common.torch_load(path), path)
  config = infer_config(sd)
  logging.info("%s: inferred %s", path, describe(config))
  params, config = convert_vae(sd, config)
  ckpt_lib.save_export(out, params, {}, config)
  return out
