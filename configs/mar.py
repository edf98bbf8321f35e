"""MAR (masked autoregressive, continuous tokens, diffusion loss) on a frozen KL tokenizer.

  arvision train --config configs/mar.py:fmnist --workdir runs/mar

(the `fmnist_kl` tokenizer is trained first in `runs/mar/tokenizer` unless
`--config.tokenizer.checkpoint=DIR` names a trained one).

Variants (`configs/mar.py:<variant>`):
- `B`, `L`, `H`: the official ImageNet 256x256 models (LTH14/mar `mar_base/large/huge` with the
  README's DiffLoss MLPs 6x1024, 8x1280, 12x1536) on the `mar_kl16` tokenizer (16x16x16 latents,
  scale 0.2325, L = 256 tokens) and the official recipe: batch 2048, 400 epochs (the released
  models trained 800), AdamW (0.9, 0.95), lr = 1e-4 * batch / 256 after 100 warmup epochs then
  constant, weight decay 0.02 except biases, norms (1-D) and the diffusion MLP, clip 3.0, EMA
  0.9999, diffusion_batch_mul 4, label drop 0.1, buffer 64, mask ratio >= 0.7. Sampling defaults
  are the README's evaluation settings (256 AR steps, 100 diffusion steps, linear CFG 2.9/3.0/3.2).
- `fmnist`: a small MAR for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_kl` (8x8x4 latents, L=64)
  sized for a 2-core CPU.
- `smoke`: tiny, on a tiny KL tokenizer; runs in seconds (tests).

Deviations: attention-probability dropout (official 0.1) is not supported (0 here); the official
ADM center crop is approximated by resize_ratio 1 + center crop.
"""

import ml_collections as mlc

from arvision.config_continuous import (
  encoder_decoder,
  kl_tokenizer,
  mar_imagenet_recipe,
  small_recipe,
)
from arvision.config_util import base_config, parse_arg, pick_variant

# Official sizes: (encoder = decoder) depth / width / heads and the README's DiffLoss MLP.
MAR_MODELS = {
  "B": dict(depth=12, width=768, heads=12, diffloss_d=6, diffloss_w=1024, cfg=2.9),
  "L": dict(depth=16, width=1024, heads=16, diffloss_d=8, diffloss_w=1280, cfg=3.0),
  "H": dict(depth=20, width=1280, heads=16, diffloss_d=12, diffloss_w=1536, cfg=3.2),
}

SMALL_MODELS = {
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_kl",
    depth=3,
    width=128,
    heads=4,
    buffer_size=8,
    proj_dropout=0.0,
    diffloss_d=3,
    diffloss_w=256,
    # One noise draw per token (official 4): a quarter of the head's rows, so the 25 CPU minutes
    # hold 2100 steps instead of 1000 (train_wall_s of mar_fmnist_cpu.json vs
    # mar_fmnist_mul4_1000steps_cpu.json).
    diffusion_batch_mul=1,
    batch_size=64,
    # 2100 steps keep the whole job (tokenizer 5.5 min + MAR ~17 min + startup and a 200-sample
    # eval) under 25 minutes on 2 cores. lr: 1e-3 (2600 steps) fd_fmnist 43.1 vs 5e-4 (2300 steps)
    # 50.3 on 500 samples at cfg 4.5 / temperature 0.9 (sweep_cfg_mar_{2600steps,lr5e-4}.json).
    total_steps=2100,
    lr=1e-3,
    warmup_steps=50,
    ema_decay=0.995,
    # clip_x0: a briefly trained head's eps error at t=999 is amplified ~1e3x by the cosine
    # schedule's first step (samples with std ~800 without it); the latents lie in about [-4, 4]
    # (experiments/results/sweep_cfg_mar_800steps.json). cfg 4.5 / temperature 0.9: the best of
    # cfg {3, 4.5} x temperature {0.5, 0.7, 0.9} on a 2600-step trial
    # (sweep_cfg_mar_2600steps.json).
    sample=dict(num_iter=16, cfg=4.5, temperature=0.9, num_diffusion_steps=50, clip_x0=4.0),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    depth=1,
    width=32,
    heads=2,
    buffer_size=4,
    proj_dropout=0.0,
    diffloss_d=1,
    diffloss_w=32,
    diffusion_batch_mul=2,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    ema_decay=0.0,
    sample=dict(num_iter=4, cfg=1.5, temperature=1.0, num_diffusion_steps=4),
  ),
}

# No weight decay on biases, norms (1-D params never decay) or the diffusion MLP (official
# `add_weight_decay`: `len(shape) == 1 or name.endswith(".bias") or "diffloss" in name`).
NO_DECAY = ("bias", "diffloss")


def _model(v: dict) -> mlc.ConfigDict:
  return mlc.ConfigDict(
    dict(
      **encoder_decoder(v),
      mlp_ratio=4.0,
      patch_size=1,
      buffer_size=v.get("buffer_size", 64),
      mask_ratio_min=0.7,
      label_drop_prob=0.1,
      attn_dropout=0.0,  # official 0.1; not supported (see the module docstring)
      proj_dropout=v.get("proj_dropout", 0.1),
      diffloss_d=v["diffloss_d"],
      diffloss_w=v["diffloss_w"],
      num_sampling_steps=100,
      diffusion_batch_mul=v.get("diffusion_batch_mul", 4),
      norm_eps=1e-6,
      attn_impl="auto",
    )
  )


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  c = base_config("mar")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.no_decay = NO_DECAY
  c.optim.weight_decay = 0.02

  if args.variant in MAR_MODELS:
    v = MAR_MODELS[args.variant]
    c.model = _model(v)
    c.tokenizer = kl_tokenizer("tokenizer.py:mar_kl16")
    mar_imagenet_recipe(c, epochs=400, blr=1e-4, clip_norm=3.0)
    c.sample = mlc.ConfigDict(
      dict(num_iter=256, cfg=v["cfg"], cfg_schedule="linear", temperature=1.0)
    )
    c.sample.num_diffusion_steps = 100
    c.sample.disa = False
  else:
    v = pick_variant(SMALL_MODELS, args.variant, "mar")
    c.model = _model(v)
    c.tokenizer = kl_tokenizer(v["tokenizer"])
    small_recipe(c, v, clip_norm=3.0, smoke=args.variant == "smoke")
    c.sample = mlc.ConfigDict(dict(cfg_schedule="linear", disa=False, clip_x0=0.0))
    c.sample.update(v["sample"])
  return c
