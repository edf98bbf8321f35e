"""RandAR (ziqipang/RandAR): LlamaGen in random orders with position instruction tokens.

  arvision train --config configs/randar.py:fmnist --workdir runs/randar

Variants (`configs/randar.py:<variant>[,image_size=...]`): every `configs/raster.py` variant (the
official sizes `L` (RandAR-L 0.3B) and `XL` (RandAR-XL 0.7B) among them, at 256 px unless
`image_size=` says otherwise; `fmnist`, `smoke`) with
a random order per example (`model.order = "random"`), RandAR's parallel decoding
(`model.schedule = "randar"`: 88 calls for 256 tokens, the official `num_inference_steps`; the
same fraction, N * 88 / 256 calls, for smaller grids) and guidance ramping from
`sample.cfg_start` 1.0 to `sample.cfg` (official `--cfg-scales 1.0,4.0` for the ImageNet
models). The model is LlamaGen's plus the position instruction vector
(`arvision/models/randar.py`). Recipe: raster's; the official ImageNet recipe differs (lr 4e-4,
cosine with 50k warm-up iterations, min lr ratio 0.05, bf16): not reproduced here.
"""

import ml_collections as mlc

from arvision.config_util import load_config_file, parse_arg

OFFICIAL_STEPS, OFFICIAL_TOKENS = 88, 256


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist", image_size=0)
  official = args.variant in ("B", "L", "XL", "XXL", "3B")
  size = args.image_size or (256 if official else 0)  # every released RandAR is ImageNet 256
  spec = args.variant + (f",image_size={size}" if size else "")
  c = mlc.ConfigDict(load_config_file(f"raster.py:{spec}").to_dict())  # unlocked copy
  c.family = "randar"
  c.model.order = "random"
  c.model.schedule = "randar"
  side = c.tokenizer.config.data.image_size // 2 ** (len(c.tokenizer.config.model.ch_mult) - 1)
  c.model.schedule_steps = max(1, round(side * side * OFFICIAL_STEPS / OFFICIAL_TOKENS))
  c.sample.cfg_start = 1.0
  del c.sample["cfg_interval"]  # RandAR ramps guidance (cfg_start -> cfg) instead
  if official:
    c.sample.cfg = 4.0
  return c
