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

import math

import ml_collections as mlc

from arvision.config_util import base_config, load_config_file, parse_arg, pick_variant

IMAGENET_TRAIN_SIZE = 1_281_167

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
      encoder_embed_dim=v["width"],
      encoder_depth=v["depth"],
      encoder_num_heads=v["heads"],
      decoder_embed_dim=v["width"],
      decoder_depth=v["depth"],
      decoder_num_heads=v["heads"],
      mlp_ratio=4.0,
      cells=2,  # cells per side: 2x2 cells (official `clusters=4`)
      label_drop_prob=0.1,
      norm_eps=1e-6,
      attn_impl="auto",
    )
  )


def _tokenizer(spec: str) -> mlc.ConfigDict:
  tok = mlc.ConfigDict(load_config_file(spec).to_dict())  # unlocked copy
  if spec.endswith(":smoke"):
    tok.model.type = "kl"  # the tiny tokenizer as a KL autoencoder
  return mlc.ConfigDict(dict(config=tok, checkpoint=""))


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
    c.tokenizer = _tokenizer("tokenizer.py:mar_kl16")
    c.data.source = "tfds:imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.batch_size = 2048
    c.data.hflip = True
    c.data.resize_ratio = 1.0
    c.data.random_crop = False
    steps_per_epoch = IMAGENET_TRAIN_SIZE / c.data.batch_size
    c.total_steps = math.ceil(800 * steps_per_epoch)
    c.optim.lr = 5e-5  # blr
    c.optim.lr_scaling = "batch256"
    c.optim.schedule = "constant"
    c.optim.warmup_steps = round(100 * steps_per_epoch)
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = 0.9999
    c.log_every = 100
    c.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    c.eval.batch_size = 256
    c.sample.num_steps = v["num_steps"]
    c.sample.cfg = v["cfg"]
  else:
    v = pick_variant(SMALL_MODELS, args.variant, "xar")
    c.model = _model(v)
    c.tokenizer = _tokenizer(v["tokenizer"])
    tok_data = c.tokenizer.config.data
    c.data.source = tok_data.source
    c.data.image_size = tok_data.image_size
    c.data.channels = tok_data.channels
    c.data.num_classes = tok_data.num_classes
    c.data.batch_size = v["batch_size"]
    c.total_steps = v["total_steps"]
    c.optim.lr = v["lr"]
    c.optim.lr_scaling = "none"
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.1
    c.optim.warmup_steps = v["warmup_steps"]
    c.optim.clip_norm = 1.0
    c.optim.ema_decay = v["ema_decay"]
    c.log_every = max(c.total_steps // 20, 1)
    c.checkpoint_every = c.total_steps
    c.sample.update(v["sample"])
    if args.variant == "smoke":
      c.sample.disa_min_steps = 2
      c.eval.num_batches = 1
      c.eval.num_samples = 16
      c.eval.batch_size = 16
      c.data.eval_batch_size = 16
    else:
      c.sample.disa_min_steps = 10
      c.eval.num_samples = 200  # at the end of training; `arvision eval` does the full evaluation
      c.eval.batch_size = 250
  return c
