"""Infinity (FoundationVision/Infinity): bitwise next-scale prediction on a multi-scale BSQ tokenizer.

  arvision train --config configs/infinity.py:fmnist --workdir runs/infinity

trains the BSQ tokenizer (`tokenizer.py:fmnist_bsq`) under `runs/infinity/tokenizer`, then the
transformer.

Variants (`configs/infinity.py:<variant>`):
- `2b`: Infinity-2B (`infinity_2b`: 32 blocks, width 2048, 16 heads, Flan-T5-XL text features
  Ct5 = 2048, null text of 512 tokens) on `tokenizer.py:infinity_d32` (d = 32 bits, the 1:1 1M
  schedule of 13 scales up to 64 x 64, 1024 px), text-conditioned (`model.cond="text"`: training
  batches carry precomputed `text` [B, T, 2048] and `text_len` [B]; there is no T5 in arvision).
  Recipe of `scripts/train.sh`: AdamW (0.9, 0.97), clip 5, alng 5e-6, bitwise self-correction on
  all 13 scales with strength 0.3 (`noise_apply_layers 13`, `noise_apply_strength 0.3`), loss
  reweighted by scale (`reweight_loss_by_scale 1`). Sampling defaults of `tools/run_infinity.py`:
  cfg 3 on the logits, tau 1, top-k 900 (a no-op on 2 logits), top-p 0.97.
- `fmnist`: a small class-conditional Infinity for 32x32 Fashion-MNIST on `tokenizer.py:fmnist_bsq`.
  The official code has no class path (its constructor's `class_emb` branch is not used by
  `forward` or the sampler), so a class reads `class_text_len` learned text vectors and the text
  path is unchanged (`model.cond="class"`; docs in `arvision/models/infinity.py`).
- `smoke`: tiny, class-conditional, on `tokenizer.py:bsq_smoke`; runs in seconds (tests).

Knobs (`model.*`): `cond` (class | text), `text_dim`, `text_maxlen`, `class_text_len`,
`rope_mode` (2 = official `rope2d_normalized_by_hw=2`, 0 = raw positions), `rope_grid` (RoPE
reference grid; 0 = the last scale; the 2B model: 64), `noise_layers` / `noise_strength`
(bitwise self-correction; 0 layers = plain teacher forcing), `scale_reweight`, `label_smoothing`.
"""

import ml_collections as mlc

from arvision.config_util import (
  base_config,
  load_config_file,
  parse_arg,
  pick_variant,
  set_run_length,
)

MODELS = {
  "2b": dict(
    tokenizer="tokenizer.py:infinity_d32",
    depth=32,
    width=2048,
    heads=16,
    text_dim=2048,
    text_maxlen=512,
    cond="text",
    drop_path_rate=0.1,
    noise_layers=13,
    scale_reweight=True,
    rope_grid=64,
    alng=5e-6,
    batch_size=256,
    total_steps=100_000,
    lr=6e-3,  # tblr (scripts/train.sh); lr = ac * tblr * batch / 256
    warmup_steps=0,
    sample=dict(cfg=3.0, tau=1.0, top_k=900, top_p=0.97),
  ),
  "fmnist": dict(
    tokenizer="tokenizer.py:fmnist_bsq",
    depth=4,
    width=128,
    heads=4,
    text_dim=128,
    text_maxlen=4,
    cond="class",
    drop_path_rate=0.0,
    noise_layers=-1,  # every scale
    scale_reweight=True,
    rope_grid=0,
    alng=1e-3,
    batch_size=64,
    total_steps=600,
    lr=2e-3,
    warmup_steps=30,
    sample=dict(cfg=3.0, tau=1.0, top_k=0, top_p=0.0),
  ),
  "smoke": dict(
    tokenizer="tokenizer.py:bsq_smoke",
    depth=2,
    width=64,
    heads=2,
    text_dim=128,
    text_maxlen=2,
    cond="class",
    drop_path_rate=0.0,
    noise_layers=-1,
    scale_reweight=False,
    rope_grid=0,
    alng=1e-3,
    batch_size=8,
    total_steps=4,
    lr=1e-3,
    warmup_steps=0,
    sample=dict(cfg=1.5, tau=1.0, top_k=0, top_p=0.0),
  ),
}
NO_DECAY = ("pos_start", "lvl_embed", "ada_gss", "scale_mul", "cfg_uncond", "bias", "norm")


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  v = pick_variant(MODELS, args.variant, "infinity")
  c = base_config("infinity")
  c.variant = args.variant
  tok = mlc.ConfigDict(load_config_file(v["tokenizer"]).to_dict())
  c.tokenizer = mlc.ConfigDict(dict(config=tok, checkpoint=""))
  num_scales = len(tok.model.patch_nums)
  c.model = mlc.ConfigDict(
    dict(
      depth=v["depth"],
      width=v["width"],
      num_heads=v["heads"],
      text_dim=v["text_dim"],
      text_maxlen=v["text_maxlen"],
      cond=v["cond"],
      class_text_len=v["text_maxlen"],
      rope_mode=2,
      rope_grid=v["rope_grid"],
      mlp_ratio=4.0,
      drop_path_rate=v["drop_path_rate"],
      cond_drop_rate=0.1,
      norm_eps=1e-6,
      aln=1e-3,
      alng=v["alng"],
      init_head=0.02,
      attn_impl="auto",
      noise_layers=num_scales if v["noise_layers"] < 0 else v["noise_layers"],
      noise_strength=0.3,
      scale_reweight=v["scale_reweight"],
      label_smoothing=0.0,
    )
  )
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.97, 1e-8
  c.optim.no_decay = NO_DECAY
  c.optim.schedule = "linear"
  c.optim.weight_decay = 0.05
  c.optim.lr = v["lr"]
  c.optim.lr_scaling = "batch256" if args.variant == "2b" else "none"
  c.optim.warmup_steps = v["warmup_steps"]
  c.optim.end_lr_factor = 0.0 if args.variant == "2b" else 0.1
  c.optim.clip_norm = 5.0 if args.variant == "2b" else 2.0
  tok_data = tok.data
  c.data.source = tok_data.source
  c.data.image_size = tok_data.image_size
  c.data.channels = tok_data.channels
  c.data.num_classes = tok_data.num_classes
  c.data.batch_size = v["batch_size"]
  set_run_length(c, v["total_steps"])
  c.sample = mlc.ConfigDict(v["sample"])
  if args.variant == "smoke":
    c.eval.num_batches = 1
    c.eval.num_samples = 16
    c.eval.batch_size = 16
    c.data.eval_batch_size = 16
  elif args.variant == "fmnist":
    c.eval.num_samples = 1000
    c.eval.batch_size = 250
    c.eval_every = c.total_steps // 2
  return c
