"""Raster next-token AR (LlamaGen) on a frozen VQ tokenizer.

  arvision train --config configs/raster.py:fmnist --workdir runs/raster

(the tokenizer, `tokenizer.py:fmnist_vq`, is trained first into `runs/raster/tokenizer` unless
`--config.tokenizer.checkpoint` names a trained one).

Variants (`configs/raster.py:<variant>[,image_size=384]`):
- `B`, `L`, `XL`, `XXL`, `3B`: the official c2i GPT sizes (`GPT_models` of FoundationVision/LlamaGen)
  on the `llamagen_vq16` tokenizer (V=16384, 16x downsampling); image size 256 (B, L) or 384
  (XL, XXL, 3B) unless `image_size=` is given. Param counts 110,888,448 (B) / 342,910,976
  (L) / 3,096,659,200 (3B), equal to the official state dicts.
- `fmnist`: a small model for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_vq` (8x8 codes; 2-core
  CPU). Its 2400 steps see 2.6 epochs, so codes extracted once pay off a little: a step on codes
  costs ~16% less CPU than on images (experiments/results/profile_quickstart.json, raster_fmnist:
  780 vs 925 CPU-ms): ~3 CPU-minutes saved net of the one encode pass. Not the default: the
  extracted views (`center_flip`) replace the random crops, a recipe change not yet measured:
    arvision train --config configs/tokenizer.py:fmnist_vq --workdir runs/tok_vq
    arvision tokenize --workdir runs/tok_vq --out runs/tok_vq_codes --views center_flip
    arvision train --config configs/raster.py:fmnist --workdir runs/raster \
      --config.tokenizer.checkpoint=runs/tok_vq --config.data.source=tokens:runs/tok_vq_codes
- `smoke`: tiny, on a VQ version of `tokenizer.py:smoke`; runs in seconds (tests).

Successors are config fields, not variants (arvision/sampling/orders.py): RandAR-style random
orders `--config.model.order=random`; PAR-style region groups `--config.model.order=regions
--config.model.schedule=par` (`model.regions` blocks per side); a cosine parallel schedule
`--config.model.schedule=cosine --config.model.schedule_steps=S`.

Recipe (official `train_c2i.py`): AdamW betas (0.9, 0.95), weight decay 0.05 on >= 2-D params
only, grad clip 1.0, constant lr 1e-4 (2e-4 for XL/XXL/3B, maintainers in issue #8), batch 256
(512 for XXL/3B), 300 epochs, dropouts 0.1 (token, residual, FFN), class dropout 0.1. The official
large runs train on codes pre-extracted with crops and flips (`tokens:` sources); with images the
frozen tokenizer encodes each batch inside the loss. Sampling defaults are the official eval
settings: cfg 2.0 (B, L), 1.75 (XL, XXL), 1.65 (3B), top_k 0, top_p 1.0, temperature 1.0.
"""

import math

import ml_collections as mlc

from arvision.config_util import (
  base_config,
  load_config_file,
  parse_arg,
  pick_variant,
  set_run_length,
)

IMAGENET_TRAIN_SIZE = 1_281_167

# Official sizes (gpt.py) and recipe. bs: global batch, lr: constant lr, cfg: eval guidance,
# reso: default image side (the released c2i checkpoints).
RASTER_MODELS = {
  "B": dict(n_layer=12, n_head=12, dim=768, bs=256, lr=1e-4, cfg=2.0, reso=256),
  "L": dict(n_layer=24, n_head=16, dim=1024, bs=256, lr=1e-4, cfg=2.0, reso=256),
  "XL": dict(n_layer=36, n_head=20, dim=1280, bs=256, lr=2e-4, cfg=1.75, reso=384),
  "XXL": dict(n_layer=48, n_head=24, dim=1536, bs=512, lr=2e-4, cfg=1.75, reso=384),
  "3B": dict(n_layer=24, n_head=32, dim=3200, bs=512, lr=2e-4, cfg=1.65, reso=384),
}

SMALL_MODELS = {
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_vq",
    n_layer=4,
    n_head=4,
    dim=128,
    multiple_of=32,
    batch_size=64,
    # 2400 steps: class accuracy 0.80 -> 0.89, fd_fmnist 25.1 -> 21.2 against 1200 steps (2000
    # samples; experiments/results/raster_fmnist{,_1200steps}_cpu.json); the whole job takes 20
    # minutes on a 2-core CPU. Sampling settings barely move fd_fmnist
    # (experiments/results/sweep_cfg_raster_1200steps.json); cfg 3.0 is the best of 2/3/4.
    total_steps=2400,
    lr=2e-3,
    warmup_steps=50,
    dropout=0.1,
    sample=dict(cfg=3.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    n_layer=2,
    n_head=2,
    dim=32,
    multiple_of=16,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    dropout=0.0,
    sample=dict(cfg=2.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0),
  ),
}


def _model(n_layer, n_head, dim, multiple_of=256, dropout=0.1):
  return mlc.ConfigDict(
    dict(
      dim=dim,
      n_layer=n_layer,
      n_head=n_head,
      n_kv_head=0,  # 0: n_head (no GQA)
      multiple_of=multiple_of,
      ffn_dim_multiplier=0.0,  # 0: None (official default)
      rope_base=10000.0,
      rope_prefix="zero",  # official: the class token's q/k are zeroed; "identity" corrects it
      norm_eps=1e-5,
      init_std=0.02,
      token_dropout=dropout,
      resid_dropout=dropout,
      ffn_dropout=dropout,
      drop_path_rate=0.0,
      cond_drop_rate=0.1,
      # Decoding order and tokens per step (arvision/sampling/orders.py): order raster | random
      # (a permutation per example, RandAR) | regions (PAR's interleaving of regions x regions
      # blocks); schedule one (a token per step) | par (regions**2 per step after the first
      # regions**2) | cosine (schedule_steps steps). Training and sampling use the same.
      order="raster",
      regions=2,
      schedule="one",
      schedule_steps=0,
      attn_impl="auto",
    )
  )


def _tokenizer(spec: str, image_size=None, vq=False) -> mlc.ConfigDict:
  tok = mlc.ConfigDict(load_config_file(spec).to_dict())  # unlocked copy
  if image_size is not None:
    tok.data.image_size = image_size
  if vq:  # the smoke tokenizer is multi-scale; raster needs single-scale l2 VQ codes
    tok.model.update(type="vq", l2_norm=True, quant_conv_ks=1, fused_qkv=False)
  return mlc.ConfigDict(dict(config=tok, checkpoint=""))


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist", image_size=0)
  c = base_config("raster")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.weight_decay = 0.05
  c.optim.no_decay = ()  # official: decay exactly the >= 2-D params
  c.optim.clip_norm = 1.0
  c.optim.lr_scaling = "none"

  if args.variant in RASTER_MODELS:
    v = RASTER_MODELS[args.variant]
    reso = args.image_size or v["reso"]
    if reso % 16:
      raise ValueError(f"image_size={reso} must be a multiple of 16 (VQ-16 tokenizer)")
    c.model = _model(v["n_layer"], v["n_head"], v["dim"])
    c.tokenizer = _tokenizer("tokenizer.py:llamagen_vq16", image_size=reso)
    c.data.source = "tfds:imagenet2012"
    c.data.image_size = reso
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.batch_size = v["bs"]
    c.data.hflip = True
    c.data.resize_ratio = 1.1  # official --crop-range 1.1
    c.total_steps = math.ceil(300 * IMAGENET_TRAIN_SIZE / v["bs"])
    c.optim.lr = v["lr"]
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.log_every = 100
    c.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    c.eval.batch_size = 250
    c.sample = mlc.ConfigDict(
      dict(cfg=v["cfg"], cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0)
    )
  else:
    v = pick_variant(SMALL_MODELS, args.variant, "raster")
    c.model = _model(v["n_layer"], v["n_head"], v["dim"], v["multiple_of"], v["dropout"])
    c.tokenizer = _tokenizer(v["tokenizer"], vq=args.variant == "smoke")
    tok_data = c.tokenizer.config.data
    c.data.source = tok_data.source
    c.data.image_size = tok_data.image_size
    c.data.channels = tok_data.channels
    c.data.num_classes = tok_data.num_classes
    c.data.batch_size = v["batch_size"]
    set_run_length(c, v["total_steps"])
    c.optim.lr = v["lr"]
    c.optim.warmup_steps = v["warmup_steps"]
    c.optim.schedule = "cosine"
    c.optim.end_lr_factor = 0.1
    c.sample = mlc.ConfigDict(v["sample"])
    if args.variant == "smoke":
      c.eval.num_batches = 1
      c.eval.num_samples = 16
      c.eval.batch_size = 16
      c.data.eval_batch_size = 16
    else:
      c.eval.num_samples = 200  # at the end of training; `arvision eval` does the full evaluation
      c.eval.batch_size = 250
  return c
