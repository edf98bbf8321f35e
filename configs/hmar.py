"""HMAR (NVlabs/HMAR): Markovian next-scale prediction + masked prediction inside a scale.

  arvision train --config configs/hmar.py:fmnist --workdir runs/hmar

trains the tokenizer (VAR's `tokenizer.py:fmnist_msvq`: HMAR reuses VAR's VQVAE), then stage 1
under `runs/hmar/stage1` (`model.stage1_steps`), then stage 2 in `runs/hmar` (`total_steps`).

Variants (`configs/hmar.py:<variant>`):
- `d16`, `d20`, `d24`, `d30`: the official ImageNet 256x256 models (`config/experiment/hmar-*`):
  VAR's sizes and recipe (`configs/var.py`); stage 1 for the official `ep` epochs, stage 2
  (`hmar-finetune-mask-*`) for 100 epochs with `n_layers_train: 8`; the official sampling
  settings (`config/sample/hmar-*.yaml`: cfg 1.7/1.9/2.1/1.7, top_k 1000/950/900/1000, top_p 0.99).
- `fmnist`: a small HMAR on `tokenizer.py:fmnist_msvq` (the same model sizes as `var.py:fmnist`).
- `smoke`: tiny, on `tokenizer.py:smoke`; runs in seconds (tests).
- `<variant>_stage1`: stage 1 only (e.g. `fmnist_stage1`, `d16_stage1`).

Knobs (`model.*`, on top of VAR's): `stage` (1 | 2), `mask_depth` (official `n_layers_train`:
the last blocks that get a masked-prediction copy), `mask_schedule` (tokens settled per sampling
step at each scale; empty = official: (1, 3) at 2x2, (1, 1, 2, 5) at 3x3, one step elsewhere),
`stage1_checkpoint` (a trained stage 1; empty = train it under `WORKDIR/stage1` first) and
`stage1_steps`. Fixed by HMAR: `mask="block_diagonal"`, `scale_loss="lognormal"` (official
`lognorm`; `scale_loss_mu`/`scale_loss_sigma` 0/1 are the official weights).
"""

import math

import ml_collections as mlc

from arvision.config_util import load_config_file, parse_arg, set_run_length

IMAGENET_TRAIN_SIZE = 1_281_167
# Official sampling settings per depth (config/sample/hmar-d*.yaml).
SAMPLE = {
  16: dict(cfg=1.7, top_k=1000, top_p=0.99),
  20: dict(cfg=1.9, top_k=950, top_p=0.99),
  24: dict(cfg=2.1, top_k=900, top_p=0.99),
  30: dict(cfg=1.7, top_k=1000, top_p=0.99),
}
FINETUNE_EPOCHS = 100  # config/experiment/hmar-finetune-mask-d*.yaml
SMALL = {
  # fmnist: stage 1 950 steps (VAR's earlier quickstart recipe), stage 2 a third of it (official
  # 100 of 200-350 epochs); the last 2 of 4 blocks get a masked copy (official 8 of 16-30). Its
  # eval cadence is pinned to what experiments/results/hmar_fmnist_cpu.json ran with.
  # Batch 64 pinned: what that run used, whatever VAR's quickstart recipe trains.
  "fmnist": dict(mask_depth=2, stage1_steps=950, total_steps=320, eval_every=150, batch_size=64),
  "smoke": dict(mask_depth=1, stage1_steps=4, total_steps=4),
}


def get_config(arg=None) -> mlc.ConfigDict:
  args = parse_arg(arg, variant="fmnist")
  variant = args.variant
  base, stage = (variant[: -len("_stage1")], 1) if variant.endswith("_stage1") else (variant, 2)
  c = mlc.ConfigDict(load_config_file(f"var.py:{base}").to_dict())  # unlocked copy
  c.family = "hmar"
  c.variant = variant
  m = c.model
  m.mask = "block_diagonal"
  m.scale_loss = "lognormal"
  m.scale_loss_mu, m.scale_loss_sigma = 0.0, 1.0
  m.stage = stage
  m.mask_schedule = ()
  m.stage1_checkpoint = ""
  if base in SMALL:
    v = SMALL[base]
    m.mask_depth = v["mask_depth"]
    c.data.batch_size = v.get("batch_size", c.data.batch_size)
    if stage == 1:  # `<variant>_stage1` alone trains the stage 1 that `<variant>` trains first
      set_run_length(c, v["stage1_steps"])
    m.stage1_steps = c.total_steps if stage == 1 else v["stage1_steps"]
    if stage == 2:
      set_run_length(c, v["total_steps"])
    c.eval_every = v.get("eval_every", c.eval_every)
  else:
    depth = int(m.depth)
    if depth not in SAMPLE:
      raise ValueError(f"hmar variant {variant!r}: HMAR's official depths are {sorted(SAMPLE)}")
    m.mask_depth = 8
    m.stage1_steps = c.total_steps
    c.sample.update(SAMPLE[depth])
    if stage == 2:  # the official fine-tuning: same batch and lr rule, 100 epochs
      c.total_steps = math.ceil(FINETUNE_EPOCHS * IMAGENET_TRAIN_SIZE / c.data.batch_size)
      c.optim.warmup_steps = round(c.total_steps / 50)
      c.optim.hold_steps = round(0.05 * (c.total_steps - c.optim.warmup_steps))
  return c
