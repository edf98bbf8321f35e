"""xAR (next-cell prediction, flow matching, Noisy Context Learning) on a frozen KL tokenizer.

  arvision train --config configs/xar.py:fmnist --workdir runs/xar

(the `fmnist_kl` tokenizer is trained first in `runs/xar/tokenizer` unless
`--config.tokenizer.checkpoint=DIR` names a trained one).

Variants (`configs/xar.py:<variant>`):
- `B`, `L`, `H`: the official ImageNet 256x256 models (OliverRensu/xAR `xar_base/large/huge`:
  encoder = decoder depth 8/16/20, width 768/1024/1280, heads 12/16/16; 2x2 cells of 8x8 tokens)
  on the `mar_kl16` tokenizer, with the README recipe: batch 2048, 800 epochs, 100 warmup epochs,
  blr 5e-5 (lr = blr * batch / 256), constant lr, AdamW weight decay 0.02, clip 1.0, EMA 0.9999,
  label drop 0.1. Sampling: the README's evaluation settings (B: 40 steps cfg 2.7; L, H: 50 steps,
  cfg 2.3 / 2.2).
- `fmnist`: a small xAR for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_kl` (8x8x4 latents:
  2x2 cells of 4x4 tokens) sized for a 2-core CPU.
- `smoke`: tiny, on a tiny KL tokenizer (8x8x8 latents); runs in seconds (tests).

Deviations: the official blocks have attention/projection dropout 0 (their defaults are never
passed), as here.
"""

import ml_collections as mlc

from arvision.config_continuous import (
  encoder_decoder,
  kl_tokenizer,
  mar_imagenet_recipe,
  small_recipe,
)
from arvision.config_util import base_config, parse_arg, pick_variant

XAR_MODELS = {
  "B": dict(depth=8, width=768, heads=12, num_steps=40, cfg=2.7),
  "L": dict(depth=16, width=1024, heads=16, num_steps=50, cfg=2.3),
  "H": dict(depth=20, width=1280, heads=16, num_steps=50, cfg=2.2),
}

SMALL_MODELS = {
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_kl",
    depth=3,
    width=128,
    heads=4,
    batch_size=64,
    total_steps=2000,
    lr=1e-3,
    warmup_steps=50,
    ema_decay=0.995,
    sample=dict(num_steps=25, cfg=3.0),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    depth=1,
    width=32,
    heads=2,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    ema_decay=0.0,
    sample=dict(num_steps=3, cfg=1.5),
  ),
}


def _model(v: dict) -> mlc.ConfigDict:
  return mlc.ConfigDict(
    dict(
      **encoder_decoder(v),
      mlp_ratio=4.0,
      cells=2,  # cells per side: 2x2 cells (official `clusters=4`)
      label_drop_prob=0.1,
      norm_eps=1e-6,
      attn_impl="auto",
    )
  )


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  c = base_config("xar")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.02
  c.sample = mlc.ConfigDict(dict(disa=False, disa_min_steps=15))

  if args.variant in XAR_MODELS:
    v = XAR_MODELS[args.variant]
    c.model = _model(v)
    c.tokenizer = kl_tokenizer("tokenizer.py:mar_kl16")
    mar_imagenet_recipe(c, epochs=800, blr=5e-5, clip_norm=1.0)
    c.sample.num_steps = v["num_steps"]
    c.sample.cfg = v["cfg"]
  else:
    v = pick_variant(SMALL_MODELS, args.variant, "xar")
    c.model = _model(v)
    c.tokenizer = kl_tokenizer(v["tokenizer"])
    small_recipe(c, v, clip_norm=1.0, smoke=args.variant == "smoke")
    c.sample.update(v["sample"])
    c.sample.disa_min_steps = 2 if args.variant == "smoke" else 10
  return c
