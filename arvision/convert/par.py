"""YuqingWang1029/PAR checkpoints -> arvision (`arvision convert par PAR-XL-4x.pt --vae ... --out`).

PAR's GPT is LlamaGen's (`convert/llamagen.py`: the same keys, sizes read from the shapes) plus
`spe_tok_embeddings.special_embeddings.weight` (M - 1 transition tokens, M = regions**2: 3 for the
`-4x` models, 15 for `-16x`). The tokenizer is LlamaGen's VQ-16 (`--vae`).
"""

from __future__ import annotations

import math

import ml_collections as mlc
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import errors, families
from arvision.convert import common
from arvision.convert import llamagen as cl

SPE_KEY = "spe_tok_embeddings.special_embeddings.weight"


def par_config(state_dict: dict, image_size: int | None = None, num_heads: int | None = None):
  """The `par` config whose shapes match the checkpoint (LlamaGen's rules + the regions)."""
  if SPE_KEY not in state_dict:
    raise errors.UserError(
      f"PAR checkpoint: no {SPE_KEY!r} (the transition tokens); a plain LlamaGen checkpoint "
      "converts with `arvision convert llamagen`"
    )
  groups = int(state_dict[SPE_KEY].shape[0]) + 1
  regions = math.isqrt(groups)
  if regions * regions != groups:
    raise errors.UserError(
      f"{SPE_KEY} has {groups - 1} rows: M = {groups} regions is not a square (PAR uses 4 or 16)"
    )
  config = mlc.ConfigDict(cl.gpt_config(state_dict, image_size, num_heads).to_dict())
  config.family = "par"
  config.model.order = "regions"
  config.model.schedule = "par"
  config.model.regions = regions
  return config


def convert_gpt(state_dict: dict, config, tokenizer=None) -> dict:
  """PAR GPT state dict -> par params (every key mapped; unknown keys are errors naming them).
  `tokenizer`: a built tokenizer family (default: built from `config.tokenizer`)."""
  tokenizer = tokenizer or families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    state_dict, family.abstract_params(), skip=cl.GPT_SKIP, what="PAR GPT checkpoint"
  )


def to_official(params: dict) -> dict:
  """par params -> the official state dict (names map 1:1, as LlamaGen's)."""
  return common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})


def main_par(path: str, out: str, vae=None, image_size=None, num_heads=None) -> str:
  sd = common.load_torch_state_dict(path)
  config = par_config(sd, image_size or cl._image_size_from_name(path), num_heads)
  logging.info("%s: inferred %s regions=%d", path, cl.describe_gpt(config), config.model.regions)
  frozen = {}
  if vae:
    tok_params, tok_config = cl._tokenizer_from(vae, int(config.data.image_size))
    frozen["tokenizer"] = tok_params
    with config.unlocked():
      config.tokenizer.config = tok_config
  params = convert_gpt(sd, config)
  ckpt_lib.save_export(out, params, frozen, config)
  return out
