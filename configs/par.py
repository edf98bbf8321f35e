"""PAR (YuqingWang1029/PAR): parallelized autoregressive generation on LlamaGen.

  arvision train --config configs/par.py:fmnist --workdir runs/par

Variants (`configs/par.py:<variant>[,image_size=384]`): every `configs/raster.py` variant (the
official GPT sizes `L`, `XL`, `XXL`, `3B`, and `fmnist`, `smoke`) with PAR's 4 regions (2 x 2
blocks: `ar_token_num` 4, the official `PAR-*-4x`); `<variant>_16x` for 16 regions (4 x 4,
`PAR-*-16x`). The model is LlamaGen's plus M - 1 transition tokens (`arvision/models/par.py`);
recipe and sampling settings are raster's (the official PAR trains with LlamaGen's
`train_c2i.py` recipe).
"""

import ml_collections as mlc

from arvision.config_util import load_config_file, parse_arg


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist", image_size=0)
  variant = args.variant
  base, regions = (variant[: -len("_16x")], 4) if variant.endswith("_16x") else (variant, 2)
  spec = base + (f",image_size={args.image_size}" if args.image_size else "")
  c = mlc.ConfigDict(load_config_file(f"raster.py:{spec}").to_dict())  # unlocked copy
  c.family = "par"
  c.variant = variant
  c.model.order = "regions"
  c.model.schedule = "par"
  c.model.regions = regions
  return c
