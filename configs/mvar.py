"""M-VAR (OliverRensu/MVAR): VAR with attention inside each scale and Mamba2 across scales.

  arvision train --config configs/mvar.py:fmnist --workdir runs/mvar

Variants (`configs/mvar.py:<variant>`):
- `d12`, `d16`, `d20`, `d24`, `d30`: the official ImageNet 256x256 models and their README
  training commands (VAR's recipe and tokenizer `var_vae`; width 64 * depth, heads = depth).
  `d32` (the released M-VAR-d32, FID 1.78): no training command is published; it takes d30's.
  `attn_l2_norm` is False for d16/d20 (the README: "for small size model (d16, d20), please
  set attn_l2_norm=False") and, by assumption (the README names only those two), for the smaller
  d12; True (the official default) for the others. The converter reads it from the checkpoint
  (whether `scale_mul_1H11` is there), so a converted model is right either way. d16 has
  464,157,184 parameters, the official module's count (tests/test_convert_mvar.py). Sampling: cfg 1.5, top_k 900, top_p 0.96 (README, FID).
- `fmnist`: a small M-VAR for Fashion-MNIST on `tokenizer.py:fmnist_msvq` (`var.py:fmnist`'s
  sizes and recipe).
- `smoke`: tiny, on `tokenizer.py:smoke`; runs in seconds (tests).

Knobs (`model.*`, on top of VAR's): `d_state` (64), `d_conv` (4), `expand` (2), `headdim` (64):
the Mamba2 sizes of `basic_mvar.py`; `ssd_chunk` (256, Mamba2's `chunk_size`; the scan's result
does not depend on it). Fixed by M-VAR: `mask="block_diagonal"` (attention inside a scale).
"""

import math

import ml_collections as mlc

from arvision.config_util import load_config_file, parse_arg, set_run_length

IMAGENET_TRAIN_SIZE = 1_281_167
# README training commands: depth, global batch, epochs, tblr (default 1e-4), alng, wpe.
MVAR_MODELS = {
  "d12": dict(depth=12, bs=768, ep=200, tblr=1e-4, alng=1e-3, wpe=0.1),
  "d16": dict(depth=16, bs=768, ep=200, tblr=1e-4, alng=1e-3, wpe=0.1),
  "d20": dict(depth=20, bs=768, ep=250, tblr=1e-4, alng=1e-3, wpe=0.1),
  "d24": dict(depth=24, bs=768, ep=350, tblr=8e-5, alng=1e-4, wpe=0.01),
  "d30": dict(depth=30, bs=1024, ep=350, tblr=8e-5, alng=1e-5, wpe=0.01),
  "d32": dict(depth=32, bs=1024, ep=350, tblr=8e-5, alng=1e-5, wpe=0.01),  # d30's (unpublished)
}
SMALL = {
  # Mamba2 at width 128: d_inner 256 = 4 heads of 64; smoke: width 32 -> 4 heads of 16.
  # fmnist keeps the 300 steps of batch 64 its measured run used
  # (experiments/results/mvar_fmnist_cpu.json), whatever VAR's quickstart recipe trains.
  "fmnist": dict(d_state=64, headdim=64, ssd_chunk=256, total_steps=300, batch_size=64),
  "smoke": dict(d_state=8, headdim=16, ssd_chunk=16),
}
L2_NORM_OFF = ("d12", "d16", "d20")


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  variant = args.variant
  if variant in SMALL:
    c = mlc.ConfigDict(load_config_file(f"var.py:{variant}").to_dict())  # unlocked copy
    mamba = SMALL[variant]
    if "total_steps" in mamba:  # and the schedule var.py derives from it (a midway eval)
      set_run_length(c, mamba["total_steps"])
      c.eval_every = c.total_steps // 2
    c.data.batch_size = mamba.get("batch_size", c.data.batch_size)
  elif variant in MVAR_MODELS:
    v = MVAR_MODELS[variant]
    c = mlc.ConfigDict(load_config_file("var.py:d16").to_dict())
    m = c.model
    m.depth, m.width, m.num_heads = v["depth"], 0, 0  # 64 * depth, depth heads
    m.alng = v["alng"]
    m.drop_path_rate = 0.1 * v["depth"] / 24
    m.attn_l2_norm = variant not in L2_NORM_OFF
    c.data.batch_size = v["bs"]
    c.total_steps = math.ceil(v["ep"] * IMAGENET_TRAIN_SIZE / v["bs"])
    c.optim.lr = v["tblr"]
    c.optim.warmup_steps = round(c.total_steps / 50)
    c.optim.hold_steps = round(0.05 * (c.total_steps - c.optim.warmup_steps))
    c.optim.end_lr_factor = v["wpe"]
    c.sample.update(dict(cfg=1.5, top_k=900, top_p=0.96))
    mamba = dict(d_state=64, headdim=64, ssd_chunk=256)
  else:
    raise ValueError(
      f"mvar variant {variant!r} is unknown; accepted: {sorted(SMALL) + sorted(MVAR_MODELS)}"
    )
  c.family = "mvar"
  c.variant = variant
  m = c.model
  m.mask = "block_diagonal"
  m.d_state = mamba["d_state"]
  m.d_conv = 4
  m.expand = 2
  m.headdim = mamba["headdim"]
  m.ssd_chunk = mamba["ssd_chunk"]
  return c
