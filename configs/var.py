"""VAR (next-scale prediction) on a frozen multi-scale VQ tokenizer.

  arvision train --config configs/var.py:fmnist --config.tokenizer.checkpoint=runs/tok --workdir runs/var

(train the tokenizer first: `arvision train --config configs/tokenizer.py:fmnist_msvq --workdir
runs/tok`).

Variants (`configs/var.py:<variant>`):
- `d16`, `d20`, `d24`, `d30`: the official ImageNet 256x256 models and training recipes
  (README commands of FoundationVision/VAR), on the `var_vae` tokenizer (V=4096, Cvae=32,
  patch_nums 1..16, L=680). Param counts 310,283,520 / 600,917,136 / 1,033,399,360 /
  2,010,020,356, equal to the official models.
- `d36`: VAR-d36-s, 512x512, shared AdaLN, patch_nums up to 32.
- `fmnist`: a small VAR for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_msvq` (2-core CPU).
- `smoke`: tiny, on `tokenizer.py:smoke`; runs in seconds (tests).
- `markov_smoke`: the worked example of docs/architecture.md "Adding a successor": a Markovian
  next-scale model (HMAR-style stage 1) = `smoke` + `model.mask="block_diagonal"` (scale k attends
  to scale k only; its input already summarises scales < k) + `model.scale_loss="lognormal"`
  (scale losses reweighted by a log-normal over the scale index). Pure config, no new module.

Variant hooks (`model.*`, `arvision/models/next_scale.py`; the defaults are VAR): `mask`
(scale_causal | block_diagonal), `scales` (residual | independent, FlexVAR-style inputs),
`scale_loss` (tokens | lognormal, with `scale_loss_mu`/`scale_loss_sigma`), `head` (a name in
`arvision.models.heads.HEADS`: categorical = VAR's logits; flow / diffusion model each token's
code vector, FlowAR-style, with `head_width`/`head_depth`/`head_steps`) and `sample_patch_nums`
(empty = the training schedule; VAR cannot change it, its pos_1LC / lvl_embed tables are per
scale).

Recipe notes. lr = tblr * batch / 256 (`optim.lr_scaling="batch256"`); AdamW (0.9, 0.95), wd 0.05
without decay on pos_*, lvl_embed, ada_gss, scale_mul, biases and 1-D params; clip 2.0; warmup
for ep/50 epochs, flat for 5% of the rest, then linear decay to `wpe` ("lin0"). Not reproduced:
the official warmup starts at 0.005 * peak (ours at 0) and the official weight decay is
cosine-annealed from 0.05 to `twde` (only d30 sets twde=0.08; ours stays at 0.05).
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
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

# Official hyper-parameters (utils/arg_util.py defaults + README training commands).
#   bs: global batch, ep: epochs, tblr: base lr (per 256), alng: AdaLN gamma init multiplier,
#   wpe: final lr ratio, twde: final weight decay (not applied, see the module docstring),
#   saln: shared AdaLN, reso: image side.
VAR_MODELS = {
  "d16": dict(
    depth=16, bs=768, ep=200, tblr=1e-4, alng=1e-3, wpe=0.1, twde=0.05, saln=False, reso=256
  ),
  "d20": dict(
    depth=20, bs=768, ep=250, tblr=1e-4, alng=1e-3, wpe=0.1, twde=0.05, saln=False, reso=256
  ),
  "d24": dict(
    depth=24, bs=768, ep=350, tblr=8e-5, alng=1e-4, wpe=0.01, twde=0.05, saln=False, reso=256
  ),
  "d30": dict(
    depth=30, bs=1024, ep=350, tblr=8e-5, alng=1e-5, wpe=0.01, twde=0.08, saln=False, reso=256
  ),
  "d36": dict(
    depth=36, bs=768, ep=350, tblr=1e-4, alng=5e-6, wpe=0.01, twde=0.05, saln=True, reso=512
  ),
}

# Small variants: explicit sizes (width/heads override the 64*depth / depth rule).
SMALL_MODELS = {
  "fmnist": dict(
    # ~1.3M params, L=130 tokens. 1200 steps of batch 32 (38,400 images, under one epoch): on a
    # 2-core CPU with two XLA devices (arvision/xla_flags.py) batch 32 trains more images/s than
    # 64 (2.73 steps/s vs 1.17 in the same hour) and the same images sample better than 600 steps
    # of batch 64, the previous recipe (fd_fmnist 28.9 vs 34.3); batch 16 x 2400 steps is better
    # still (23.2) but 25% slower per image (experiments/results/quickstart_batch{32,16}_cpu.json,
    # quickstart_var_2400steps_cpu.json). So the whole `make quickstart` (setup, train, 1000-sample
    # eval) stays near 10 minutes; quickstart_cpu.json records its time and what it reaches.
    tokenizer="tokenizer.py:fmnist_msvq",
    # The packaged run of that config (arvision/tokenizers/shipped.py): no tokenizer training; a
    # changed tokenizer config (or --config.tokenizer.checkpoint=) trains it in WORKDIR/tokenizer.
    tokenizer_checkpoint="shipped:fmnist_msvq",
    depth=4,
    width=128,
    heads=4,
    batch_size=32,
    total_steps=1200,
    lr=2e-3,
    warmup_steps=30,
    alng=1e-3,
    drop_path_rate=0.0,
    # cfg chosen with experiments/sweep_cfg.py on the quickstart model (results/sweep_cfg_quickstart.json).
    sample=dict(cfg=3.0, top_k=0, top_p=0.96),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:smoke",
    depth=2,
    width=32,
    heads=2,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    alng=1e-3,
    drop_path_rate=0.0,
    sample=dict(cfg=1.5, top_k=0, top_p=0.96),
  ),
}
# Variants that are another variant plus model hooks (pure config).
HOOK_VARIANTS = {
  "markov_smoke": (
    "smoke",
    dict(mask="block_diagonal", scale_loss="lognormal", scale_loss_mu=0.0, scale_loss_sigma=1.0),
  ),
}

NO_DECAY = ("pos_", "lvl_embed", "ada_gss", "scale_mul", "bias")


def _model(depth, width=0, heads=0, alng=1e-5, saln=False, drop_path_rate=None):
  return mlc.ConfigDict(
    dict(
      depth=depth,
      width=width,  # 0: 64 * depth (official rule)
      num_heads=heads,  # 0: depth (official rule, head_dim 64)
      mlp_ratio=4.0,
      drop_path_rate=0.1 * depth / 24 if drop_path_rate is None else drop_path_rate,
      cond_drop_rate=0.1,
      attn_l2_norm=True,
      shared_aln=saln,
      aln=0.5,
      alng=alng,
      init_head=0.02,
      init_std=-1.0,  # <= 0: sqrt(1 / (3 * width))
      norm_eps=1e-6,
      label_smoothing=0.0,
      attn_impl="auto",
      # Next-scale variant hooks (arvision/models/next_scale.py); these defaults are VAR.
      mask="scale_causal",
      scales="residual",
      scale_loss="tokens",
      scale_loss_mu=0.0,
      scale_loss_sigma=1.0,
      head="categorical",  # or a continuous head (flow | diffusion) over code vectors
      head_width=0,  # continuous heads: MLP width (0 = model width), depth, sampling steps
      head_depth=2,
      head_steps=25,
      sample_patch_nums=(),
    )
  )


def _tokenizer(spec: str, patch_nums=None, image_size=None) -> mlc.ConfigDict:
  tok = mlc.ConfigDict(load_config_file(spec).to_dict())  # unlocked copy
  if patch_nums is not None:
    tok.model.patch_nums = tuple(patch_nums)
  if image_size is not None:  # the 512px models: the same VQVAE on a 32x32 latent
    tok.data.image_size = image_size
  return mlc.ConfigDict(dict(config=tok, checkpoint=""))


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  base, hooks = HOOK_VARIANTS.get(args.variant, (args.variant, {}))
  c = base_config("var")
  c.variant = args.variant
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
  c.optim.no_decay = NO_DECAY
  c.optim.schedule = "linear"

  if base in VAR_MODELS:
    v = VAR_MODELS[base]
    c.model = _model(v["depth"], alng=v["alng"], saln=v["saln"])
    pn = PATCH_NUMS_512 if v["reso"] == 512 else None
    c.tokenizer = _tokenizer("tokenizer.py:var_vae", pn, v["reso"])
    c.data.source = "tfds:imagenet2012"
    c.data.image_size = v["reso"]
    c.data.channels = 3
    c.data.num_classes = 1000
    c.data.batch_size = v["bs"]
    c.data.hflip = False
    c.data.resize_ratio = 1.125
    steps_per_epoch = IMAGENET_TRAIN_SIZE / v["bs"]
    c.total_steps = math.ceil(v["ep"] * steps_per_epoch)
    c.optim.lr = v["tblr"]
    c.optim.lr_scaling = "batch256"
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 2.0
    c.optim.warmup_steps = round(c.total_steps / 50)  # ep / 50 epochs
    c.optim.hold_steps = round(0.05 * (c.total_steps - c.optim.warmup_steps))
    c.optim.end_lr_factor = v["wpe"]
    c.log_every = 100
    c.checkpoint_every = 5000
    c.eval.num_samples = 50_000  # FID protocol: 50 per class
    c.eval.batch_size = 250
    c.sample = mlc.ConfigDict(dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False))
  else:
    v = pick_variant(SMALL_MODELS, base, "var")
    c.model = _model(
      v["depth"],
      width=v["width"],
      heads=v["heads"],
      alng=v["alng"],
      drop_path_rate=v["drop_path_rate"],
    )
    c.tokenizer = _tokenizer(v["tokenizer"])
    c.tokenizer.checkpoint = v.get("tokenizer_checkpoint", "")
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
    c.sample = mlc.ConfigDict(dict(more_smooth=False, **v["sample"]))
    if base == "smoke":
      c.eval.num_batches = 1
      c.eval.num_samples = 16
      c.eval.batch_size = 16
      c.data.eval_batch_size = 16
    else:
      c.eval.num_samples = 1000
      c.eval.batch_size = 250
      c.eval_every = c.total_steps // 2  # a midway point for the eval curves (curves.png)
  c.model.update(hooks)
  return c
