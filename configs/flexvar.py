"""FlexVAR (next-scale prediction without residuals, any scale list) on a FlexVAE-style VQ.

  arvision train --config configs/flexvar.py:fmnist --workdir runs/flexvar

(trains its tokenizer first, `tokenizer.py:fmnist_vq`, unless `--config.tokenizer.checkpoint`
names one). Sample with any scale list: `arvision.load("runs/flexvar").sample(labels, rng,
patch_nums=(1, 2, 4, 8))`, or past the training side for a larger image (`(1, 2, 3, 4, 6, 8,
12)`: scales above `model.max_pn` are greedy).

Variants (`configs/flexvar.py:<variant>`):
- `d16`, `d20`, `d24`: the official ImageNet 256 models and recipes (scripts/train.sh of
  jiaosiyu1999/FlexVAR: bs 768, 180 / 250 / 350 epochs, tblr 1e-4 / 1e-4 / 8e-5, alng 1e-3 /
  1e-3 / 1e-4, wpe 0.1 / 0.1 / 0.01), on the `flexvae` tokenizer (LlamaGen VQ-16 with an
  l2-normalised 8912 x 32 codebook, FlexVAE.pth); random training lists as official.
- `fmnist`: a small FlexVAR for 32x32 Fashion-MNIST (2-core CPU) on `tokenizer.py:fmnist_vq`.
  That tokenizer is FlexVAE's design scaled down (a single-scale VQ with an l2-normalised
  codebook: the scales are area-downsampled latents quantized on their own), so it fits;
  `fmnist_msvq` does not (a residual quantizer with phi convs). Lists 1..8 (8x8 latent).
- `smoke`: tiny, on a 16x16 synthetic vq tokenizer; runs in seconds (tests).

Model knobs beyond VAR's (`arvision/models/flexvar.py`): `patch_nums` (the default list),
`train_scale_groups` / `full_prob` / `drop_thresholds` / `max_tokens` (the random training lists),
`pos_side` (the 2D position map), `max_pn`, `topk_patch_nums`, `infer_patch_nums`.
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
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
# official gen_curr_patch_nums: [1, 2] + sorted(sample(3..10, 5)) + sorted(sample(11..15, 2)) + [16]
GROUPS_256 = ((1, 1, 1), (2, 2, 1), (3, 10, 5), (11, 15, 2), (16, 16, 1))

OFFICIAL = {
  "d16": dict(depth=16, ep=180, tblr=1e-4, alng=1e-3, wpe=0.1),
  "d20": dict(depth=20, ep=250, tblr=1e-4, alng=1e-3, wpe=0.1),
  "d24": dict(depth=24, ep=350, tblr=8e-5, alng=1e-4, wpe=0.01),
}
SMALL = {
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_vq",
    tok=dict(),
    depth=4,
    width=128,
    heads=4,
    batch_size=64,
    total_steps=950,
    lr=2e-3,
    warmup_steps=60,
    patch_nums=(1, 2, 3, 4, 6, 8),
    groups=((1, 1, 1), (2, 2, 1), (3, 5, 2), (6, 7, 1), (8, 8, 1)),
    sample=dict(cfg=3.0, top_k=0, top_p=0.96),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    tok=dict(type="vq", l2_norm=True, quant_conv_ks=1, fused_qkv=False),
    depth=2,
    width=32,
    heads=2,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    patch_nums=(1, 2, 4, 8),
    groups=((1, 1, 1), (2, 2, 1), (3, 5, 1), (8, 8, 1)),
    sample=dict(cfg=1.5, top_k=0, top_p=0.96),
  ),
}
NO_DECAY = ("pos_", "ada_gss", "scale_mul", "bias")


def _model(
  depth, width=0, heads=0, alng=1e-3, dpr=None, patch_nums=PATCH_NUMS_256, groups=GROUPS_256
):
  return mlc.ConfigDict(
    dict(
      depth=depth,
      width=width,  # 0: 64 * depth
      num_heads=heads,  # 0: depth
      mlp_ratio=4.0,
      drop_path_rate=0.1 * depth / 24 if dpr is None else dpr,
      cond_drop_rate=0.1,
      attn_l2_norm=True,
      shared_aln=False,
      aln=0.5,
      alng=alng,
      init_head=0.02,
      init_std=-1.0,
      norm_eps=1e-6,
      label_smoothing=0.0,
      attn_impl="auto",
      # the VAR hooks FlexVAR fixes (arvision/models/next_scale.py)
      mask="scale_causal",
      scales="independent",
      scale_loss="tokens",
      head="categorical",
      sample_patch_nums=(),
      # FlexVAR
      patch_nums=tuple(patch_nums),
      train_scale_groups=tuple(groups),
      full_prob=0.05,
      drop_thresholds=(0.9, 0.95, 0.98, 0.99),
      max_tokens=sum(p * p for p in patch_nums),  # official: 680, the default list's L
      pos_side=32,
      max_pn=0,  # 0: the latent side
      topk_patch_nums=(),  # (): the official sides plus patch_nums
      infer_patch_nums=(),  # (): patch_nums
    )
  )


def _tokenizer(spec: str, **overrides) -> mlc.ConfigDict:
  tok = mlc.ConfigDict(load_config_file(spec).to_dict())  # unlocked copy
  tok.model.update(overrides)
  if tok.model.type == "vq":
    tok.model.patch_nums = ()
  return mlc.ConfigDict(dict(config=tok, checkpoint=""))


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  c = base_config("flexvar")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.no_decay = NO_DECAY
  c.optim.schedule = "linear"
  if args.variant in OFFICIAL:
    v = OFFICIAL[args.variant]
    c.model = _model(v["depth"], alng=v["alng"])
    # FlexVAE.pth: LlamaGen's VQ-16 with an 8912 x 32 l2-normalised codebook (official V=8912)
    c.tokenizer = _tokenizer("tokenizer.py:llamagen_vq16", embed_dim=32, vocab_size=8912)
    c.data.source = "tfds:imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.batch_size = 768
    c.data.hflip = False
    c.total_steps = math.ceil(v["ep"] * IMAGENET_TRAIN_SIZE / 768)
    c.optim.lr = v["tblr"]
    c.optim.lr_scaling = "batch256"
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 2.0
    c.optim.warmup_steps = round(c.total_steps / 50)  # official wp = ep / 50 epochs
    c.optim.hold_steps = round(0.05 * (c.total_steps - c.optim.warmup_steps))  # lin0, as VAR
    c.optim.end_lr_factor = v["wpe"]
    c.log_every = 100
    c.checkpoint_every = 5000
    c.eval.num_samples = 50_000
    c.eval.batch_size = 250
    # official eval_c2i.py settings (its FID protocol)
    c.sample = mlc.ConfigDict(dict(cfg=2.5, top_k=900, top_p=0.95))
    return c
  v = pick_variant(SMALL, args.variant, "flexvar")
  c.model = _model(
    v["depth"], v["width"], v["heads"], dpr=0.0, patch_nums=v["patch_nums"], groups=v["groups"]
  )
  # every side up to the latent's takes the user's top-k; only extrapolated scales are greedy
  c.model.topk_patch_nums = tuple(range(1, v["patch_nums"][-1] + 1))
  c.tokenizer = _tokenizer(v["tokenizer"], **v["tok"])
  tok_data = c.tokenizer.config.data
  c.data.source = tok_data.source
  c.data.image_size = tok_data.image_size
  c.data.channels = tok_data.channels
  c.data.num_classes = tok_data.num_classes
  c.data.batch_size = v["batch_size"]
  set_run_length(c, v["total_steps"])
  c.optim.lr = v["lr"]
  c.optim.lr_scaling = "none"
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 2.0
  c.optim.warmup_steps = v["warmup_steps"]
  c.optim.end_lr_factor = 0.1
  c.sample = mlc.ConfigDict(dict(v["sample"]))
  if args.variant == "smoke":
    c.eval.num_batches = 1
    c.eval.num_samples = 16
    c.eval.batch_size = 16
    c.data.eval_batch_size = 16
  else:
    c.eval.num_samples = 1000
    c.eval.batch_size = 250
  return c
