"""NAR (ThisisBillhe/NAR): neighbouring autoregression on LlamaGen.

  arvision train --config configs/nar.py:fmnist --workdir runs/nar

Variants (`configs/nar.py:<variant>[,image_size=...]`): every `configs/raster.py` variant (the
official sizes `L`, `XL`, `XXL` among them; the official `GPT-M`, 18 blocks of 1024, is not a
raster variant), `fmnist`, `smoke`, with one anti-diagonal per model call (2H - 1 calls for an
H x H grid) and the second ("below") head on `model.medusa_attention_num` extra blocks (official
default 1). The model is `arvision/models/nar.py`; recipe and sampling settings are raster's (the
official NAR trains with LlamaGen's `train_c2i.py` recipe).
"""

import ml_collections as mlc

from arvision.config_util import load_config_file, parse_arg


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist", image_size=0)
  spec = args.variant + (f",image_size={args.image_size}" if args.image_size else "")
  c = mlc.ConfigDict(load_config_file(f"raster.py:{spec}").to_dict())  # unlocked copy
  c.family = "nar"
  c.variant = args.variant
  c.model.medusa_attention_num = 1
  return c
