"""ziqipang/RandAR checkpoints -> arvision (`arvision convert randar RandAR-L.pt --vae ... --out`).

RandAR's GPT is LlamaGen's (`convert/llamagen.py`: the same keys, sizes read from the shapes)
plus `pos_instruct_embeddings` ([1, C], the position instruction vector). Checkpoints saved by the
official trainer (`{"model": ...}` and friends) are unwrapped as for LlamaGen. The tokenizer is
LlamaGen's VQ-16 (`--vae`).
"""

from __future__ import annotations

import ml_collections as mlc
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import errors, families
from arvision.convert import common
from arvision.convert import llamagen as cl

INSTRUCT_KEY = "pos_instruct_embeddings"


def randar_config(state_dict: dict, image_size: int | None = None, num_heads: int | None = None):
  """The `randar` config whose shapes match the checkpoint (LlamaGen's rules)."""
  if INSTRUCT_KEY not in state_dict:
    raise errors.UserError(
      f"RandAR checkpoint: no {INSTRUCT_KEY!r} (the position instruction vector); a plain "
      "LlamaGen checkpoint converts with `arvision convert llamagen`"
    )
  config = mlc.ConfigDict(cl.gpt_config(state_dict, image_size, num_heads).to_dict())
  config.family = "randar"
  config.model.order = "random"
  config.model.schedule = "randar"
  tokens = (int(config.data.image_size) // 16) ** 2  # LlamaGen's VQ-16
  config.model.schedule_steps = max(1, round(tokens * 88 / 256))  # official 88 for 256
  config.sample.cfg, config.sample.cfg_start = 4.0, 1.0  # official --cfg-scales 1.0,4.0
  return config


def convert_gpt(state_dict: dict, config, tokenizer=None) -> dict:
  """RandAR GPT state dict -> randar params (every key mapped; unknown keys are errors).
  `tokenizer`: a built tokenizer family (default: built from `config.tokenizer`)."""
  tokenizer = tokenizer or families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    state_dict, family.abstract_params(), skip=cl.GPT_SKIP, what="RandAR GPT checkpoint"
  )


def to_official(params: dict) -> dict:
  """randar params -> the official state dict (names map 1:1)."""
  return common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})


def main_randar(path: str, out: str, vae=None, image_size=None, num_heads=None) -> str:
  sd = common.load_torch_state_dict(path)
  config = randar_config(sd, image_size or cl._image_size_from_name(path), num_heads)
  logging.info("%s: inferred %s", path, cl.describe_gpt(config))
  frozen = {}
  if vae:
    tok_params, tok_config = cl._tokenizer_from(vae, int(config.data.image_size))
    frozen["tokenizer"] = tok_params
    with config.unlocked():
      config.tokenizer.config = tok_config
  params = convert_gpt(sd, config)
  ckpt_lib.save_export(out, params, frozen, config)
  return out
