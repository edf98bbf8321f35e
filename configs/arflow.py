"""ARFlow (autoregressive flow over same-class image sequences, hybrid linear attention) on a
frozen KL tokenizer.

  arvision train --config configs/arflow.py:fmnist --workdir runs/arflow

(the `fmnist_kl` tokenizer is trained first in `runs/arflow/tokenizer` unless
`--config.tokenizer.checkpoint=DIR` names a trained one).

Variants (`configs/arflow.py:<variant>`):
- `S-2` ... `XL-8` (`S`, `B`, `L`, `XL` x patch 2, 4, 8): the official models (TheFllood/ARFlow
  `ARFlow_models`: depth/width/heads 12/384/6, 12/768/12, 24/1024/16, 28/1152/16; XL/2 has 18
  heads) at 256x256 on a 32x32x4 latent, with the official `train.py` / `sample.py` settings:
  sequences of 5 same-class images, AdamW lr 1e-4 (constant), betas (0.9, 0.95), weight decay
  0.02, EMA 0.9999, label drop 0.1; sampling 250 SDE steps, last step 0.04, cfg 4.5 on the first
  3 latent channels.
- `fmnist`: a small ARFlow for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_kl` (8x8x4 latents,
  the official 4 latent channels; patch 2: 16 tokens per image) sized for a 2-core CPU.
- `smoke`: tiny, on a tiny KL tokenizer (8x8x8 latents); runs in seconds (tests).

Deviations:
- Tokenizer: the official latents are Stable Diffusion's `sd-vae-ft-ema` (diffusers
  `AutoencoderKL`, 4 channels at stride 8, scale 0.18215). The official-size variants configure
  that architecture (LDM KL-f8: ch 128, ch_mult (1, 2, 4, 4), 4 channels) in arvision's KL
  tokenizer, but there is no converter for the diffusers VAE weights.
- Clipping: the official code clips every gradient element to +-3 (`clip_grad_value_`); arvision's
  optimizer clips by global norm only, so the official variants set `clip_norm = 0` (off).
- The sequences are drawn from the batch (`arflow.same_class_sequences`: `batch_size /
  seq_images` sequences of one class each), not from the whole dataset as the official loader.
"""

import math

import ml_collections as mlc

from arvision.config_continuous import (
  IMAGENET_TRAIN_SIZE,
  imagenet_data,
  kl_tokenizer,
  small_recipe,
)
from arvision.config_util import base_config, parse_arg, pick_variant

SIZES = {
  "S": dict(depth=12, width=384, heads=6),
  "B": dict(depth=12, width=768, heads=12),
  "L": dict(depth=24, width=1024, heads=16),
  "XL": dict(depth=28, width=1152, heads=16),
}
ARFLOW_MODELS = {
  f"{size}-{patch}": dict(
    SIZES[size], patch=patch, heads=18 if (size, patch) == ("XL", 2) else SIZES[size]["heads"]
  )
  for size in SIZES
  for patch in (2, 4, 8)
}

SMALL_MODELS = {
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_kl",
    depth=4,
    width=128,
    heads=4,
    patch=2,
    seq_images=4,
    batch_size=64,
    total_steps=2000,
    lr=5e-4,
    warmup_steps=50,
    ema_decay=0.995,
    sample=dict(num_steps=50, cfg=2.0),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    depth=1,
    width=32,
    heads=2,
    patch=2,
    seq_images=2,
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
      hidden_size=v["width"],
      depth=v["depth"],
      num_heads=v["heads"],
      patch_size=v["patch"],
      mlp_ratio=4.0,
      seq_images=v.get("seq_images", 5),  # official CustomCacheFolder(n=5)
      cfg_channels=3,  # official forward_with_cfg guides channels [:3]
      label_drop_prob=0.1,
      attn_impl="auto",  # scan on CPU, the Pallas hybrid kernel on GPU/TPU
    )
  )


def _sd_vae_tokenizer() -> mlc.ConfigDict:
  """The SD-VAE (LDM KL-f8) architecture the official latents come from."""
  tokenizer = kl_tokenizer("tokenizer.py:mar_kl16")
  tok = tokenizer.config
  tok.model.ch_mult = (1, 2, 4, 4)
  tok.model.z_channels = 4
  tok.model.embed_dim = 4
  tok.model.enc_attn_resolutions = ()
  tok.model.scale_factor = 0.18215
  return tokenizer


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  c = base_config("arflow")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.02
  c.sample = mlc.ConfigDict(dict(last_step_size=0.04))

  if args.variant in ARFLOW_MODELS:
    v = ARFLOW_MODELS[args.variant]
    c.model = _model(v)
    c.tokenizer = _sd_vae_tokenizer()
    imagenet_data(c, batch_size=8 * c.model.seq_images)  # official --global-batch-size 8 sequences
    steps_per_epoch = IMAGENET_TRAIN_SIZE / 8
    c.total_steps = math.ceil(1400 * steps_per_epoch)  # official --epochs 1400
    c.optim.lr = 1e-4
    c.optim.lr_scaling = "none"
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0  # official: clip_grad_value_(3.0), not available (docstring)
    c.optim.ema_decay = 0.9999
    c.log_every = 100
    c.checkpoint_every = 10_000
    c.eval.num_samples = 50_000
    c.eval.batch_size = 64
    c.sample.num_steps = 250
    c.sample.cfg = 4.5
  else:
    v = pick_variant(SMALL_MODELS, args.variant, "arflow")
    c.model = _model(v)
    c.tokenizer = kl_tokenizer(v["tokenizer"])
    small_recipe(c, v, clip_norm=1.0, smoke=args.variant == "smoke")
    c.sample.update(v["sample"])
  return c
