"""ThisisBillhe/NAR checkpoints -> arvision (`arvision convert nar NAR-L.pt --vae ... --out`).

NAR's GPT is LlamaGen's (`convert/llamagen.py`: the same keys, sizes read from the shapes) with
`medusa_attention_num` extra blocks (`layers.{n_layer + i}`, official default 1: the number is
not in the shapes) and the second head `medusa_norm.weight`, `medusa_output.weight`.
"""

from __future__ import annotations

import ml_collections as mlc
from absl import logging

from arvision import checkpoint as ckpt_lib
from arvision import errors, families
from arvision.convert import common
from arvision.convert import llamagen as cl

HEAD_KEYS = ("medusa_norm.weight", "medusa_output.weight")


def nar_config(state_dict: dict, image_size=None, num_heads=None, medusa_attention_num: int = 1):
  """The `nar` config whose shapes match the checkpoint (LlamaGen's rules; the last
  `medusa_attention_num` blocks feed the second head)."""
  missing = [k for k in HEAD_KEYS if k not in state_dict]
  if missing:
    raise errors.UserError(
      f"NAR checkpoint: no {missing} (the second head); a plain LlamaGen checkpoint converts with "
      "`arvision convert llamagen`"
    )
  config = mlc.ConfigDict(cl.gpt_config(state_dict, image_size, num_heads).to_dict())
  blocks = int(config.model.n_layer)
  if not 1 <= medusa_attention_num < blocks:
    raise errors.UserError(
      f"medusa_attention_num={medusa_attention_num} must be in [1, {blocks - 1}] (the checkpoint "
      f"has {blocks} blocks)"
    )
  config.family = "nar"
  config.model.n_layer = blocks - medusa_attention_num
  config.model.medusa_attention_num = medusa_attention_num
  return config


def convert_gpt(state_dict: dict, config, tokenizer=None) -> dict:
  """NAR GPT state dict -> nar params (every key mapped; unknown keys are errors naming them).
  `tokenizer`: a built tokenizer family (default: built from `config.tokenizer`)."""
  tokenizer = tokenizer or families.build(config.tokenizer.config)
  family = families.build(config, tokenizer=tokenizer)
  return common.convert(
    state_dict, family.abstract_params(), skip=cl.GPT_SKIP, what="NAR GPT checkpoint"
  )


def to_official(params: dict) -> dict:
  """nar params -> the official state dict (names map 1:1)."""
  return common.to_state_dict({k: v for k, v in params.items() if k != "tokenizer"})


def main_nar(path: str, out: str, vae=None, image_size=None, num_heads=None) -> str:
  sd = common.load_torch_state_dict(path)
  config = nar_config(sd, image_size or cl._image_size_from_name(path), num_heads)
  logging.info("%s: inferred %s (+1 below-head block)", path, cl.describe_gpt(config))
  frozen = {}
  if vae:
    tok_params, tok_config = cl._tokenizer_from(vae, int(config.data.image_size))
    frozen["tokenizer"] = tok_params
    with config.unlocked():
      config.tokenizer.config = tok_config
  params = convert_gpt(sd, config)
  ckpt_lib.save_export(out, params, frozen, config)
  return out
