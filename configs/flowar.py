"""FlowAR (next-scale prediction with a per-scale flow-matching head) on a frozen KL tokenizer.

  arvision train --config configs/flowar.py:fmnist --workdir runs/flowar

(the `fmnist_kl` tokenizer is trained first in `runs/flowar/tokenizer` unless
`--config.tokenizer.checkpoint=DIR` names a trained one).

Variants (`configs/flowar.py:<variant>`):
- `S`, `L`, `H`: the official ImageNet 256x256 models (OliverRensu/FlowAR `flowar_small/large/
  huge`: encoder = decoder depth 6/8/15, width 768/1024/1536, heads 12/16/16; flow head
  `diffloss_d x diffloss_w` 2x1024 (Attn-MLP), 12x1024 and 12x1536 (Attn-CrossAttn-MLP)) on the
  `mar_kl16` tokenizer at scales 1, 2, 4, 8, 16, with the README recipe: batch 2048, 400 epochs,
  100 warmup epochs, blr 5e-5 (lr = blr * batch / 256), constant lr, AdamW weight decay 0.02,
  clip 3.0, EMA 0.9999, label drop 0.1. Sampling: the README's evaluation settings (S: 25 steps,
  cfg 4.3, guidance 0.9; L: 25, 2.4, 0.9; H: 50, 2.4, 0.7).
- `fmnist`: a small FlowAR for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_kl` (8x8x4 latents,
  scales 1, 2, 4, 8) sized for a 2-core CPU.
- `smoke`: tiny, on a tiny KL tokenizer (8x8x8 latents); runs in seconds (tests).
"""

import ml_collections as mlc

from arvision.config_continuous import (
  encoder_decoder,
  kl_tokenizer,
  mar_imagenet_recipe,
  small_recipe,
)
from arvision.config_util import base_config, parse_arg, pick_variant

FLOWAR_MODELS = {
  "S": dict(
    depth=6,
    width=768,
    heads=12,
    head_depth=2,
    head_width=1024,
    cross=False,
    steps=25,
    cfg=4.3,
    guidance=0.9,
  ),
  "L": dict(
    depth=8,
    width=1024,
    heads=16,
    head_depth=12,
    head_width=1024,
    cross=True,
    steps=25,
    cfg=2.4,
    guidance=0.9,
  ),
  "H": dict(
    depth=15,
    width=1536,
    heads=16,
    head_depth=12,
    head_width=1536,
    cross=True,
    steps=50,
    cfg=2.4,
    guidance=0.7,
  ),
}

SMALL_MODELS = {
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_kl",
    patch_nums=(1, 2, 4, 8),
    depth=3,
    width=128,
    heads=4,
    head_depth=2,
    head_width=128,
    cross=False,
    batch_size=64,
    total_steps=2000,
    lr=1e-3,
    warmup_steps=50,
    ema_decay=0.995,
    sample=dict(num_steps=20, cfg=3.0, guidance_high=0.9),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    patch_nums=(1, 2, 4, 8),
    depth=1,
    width=32,
    heads=2,
    head_depth=1,
    head_width=64,
    cross=True,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    ema_decay=0.0,
    sample=dict(num_steps=4, cfg=1.5, guidance_high=0.9),
  ),
}


def _model(v: dict, patch_nums) -> mlc.ConfigDict:
  return mlc.ConfigDict(
    dict(
      patch_nums=tuple(patch_nums),
      **encoder_decoder(v),
      mlp_ratio=4.0,
      head_depth=v["head_depth"],  # official diffloss_d
      head_width=v["head_width"],  # official diffloss_w
      cross=v["cross"],
      buffer_size=0,
      label_drop_prob=0.1,
      norm_eps=1e-6,
      attn_impl="auto",
    )
  )


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  c = base_config("flowar")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.02
  c.sample = mlc.ConfigDict(dict(disa=False, disa_min_steps=15))

  if args.variant in FLOWAR_MODELS:
    v = FLOWAR_MODELS[args.variant]
    c.model = _model(v, (1, 2, 4, 8, 16))
    c.tokenizer = kl_tokenizer("tokenizer.py:mar_kl16")
    mar_imagenet_recipe(c, epochs=400, blr=5e-5, clip_norm=3.0)
    c.sample.update(dict(num_steps=v["steps"], cfg=v["cfg"], guidance_high=v["guidance"]))
  else:
    v = pick_variant(SMALL_MODELS, args.variant, "flowar")
    c.model = _model(v, v["patch_nums"])
    c.tokenizer = kl_tokenizer(v["tokenizer"])
    small_recipe(c, v, clip_norm=3.0, smoke=args.variant == "smoke")
    c.sample.update(v["sample"])
    c.sample.disa_min_steps = 2 if args.variant == "smoke" else 10
  return c
