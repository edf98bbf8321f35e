"""Training-step benchmark: arvision against the official PyTorch code, side by side on one machine.

    python experiments/bench_train.py --reference DIR --out experiments/results/bench_train_cpu.json
    python experiments/bench_train.py --reference DIR --cases var_fmnist --rounds 4   # one case

`DIR` holds the official checkouts as `DIR/VAR` (FoundationVision/VAR), `DIR/LlamaGen`
(FoundationVision/LlamaGen) and `DIR/mar` (LTH14/mar; needs timm, e.g. on PYTHONPATH). Their code is
imported from there, never copied.

Cases (`CASES`): each family at its `fmnist` config sizes and batch, plus VAR at depth 4, width 256,
the ImageNet token layout (L=680, V=4096), batch 4. Both sides build the same model with seeded
random weights and run the same training step on the same fixed batch of codes:

- the teacher-forcing input from the codes where the family has one (VAR: the tokenizer's
  multi-scale `idx -> var input`, official `idxBl_to_var_input`, no gradient), the forward in train
  mode (the config's dropouts and class dropout), the family's loss (VAR: per-token CE weighted
  1/L; LlamaGen: mean CE; MAR: the diffusion loss on the masked tokens), backward, gradient
  clipping at the recipe's norm, AdamW with the official betas and weight decay (no decay on the
  same parameters as the official code);
- arvision: `arvision.train.build(...).step` -- the jitted, state-donating step the train loop runs;
- official: the model's `forward` + loss + `backward` + `clip_grad_norm_` + `torch.optim.AdamW`
  (`fused=True` where the official recipe uses it), `torch.set_num_threads(--threads)`.

MAR's official step also turns the image latents into patches and draws the random order and mask
on the host each step, as its `forward` does; ours does the same inside the jitted step.

Timing: a warm-up step per side (`first_step_s`: trace + compile for arvision, the first eager call
for torch), then `--rounds` rounds of `--steps` steps per side, the sides alternating (A-B, B-A,
...) so that load from other processes hits both. Per round: seconds per step of each side, their
ratio (official / arvision: > 1 means arvision is faster) and each side's CPU utilisation (process
CPU time / wall time; 2.0 = both cores busy). The JSON holds the rounds, medians, the median of the
per-round ratios, device, versions, config and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from arvision import config_util, families
from arvision import train as train_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_models  # noqa: E402

CASES = {
  # name: (config spec, batch, config overrides)
  "var_fmnist": ("configs/var.py:fmnist", 64, {}),
  "var_d4w256": (
    "configs/var.py:d16",
    4,
    {"model.depth": 4, "model.width": 256, "model.num_heads": 4, "model.drop_path_rate": 0.0},
  ),
  "raster_fmnist": ("configs/raster.py:fmnist", 64, {}),
  "mar_fmnist": ("configs/mar.py:fmnist", 64, {}),
}
OFFICIAL_DIRS = {"var": "VAR", "raster": "LlamaGen", "mar": "mar"}


# ------------------------------------------------------------------------------------------------
# arvision side


def load_case(name: str):
  spec, batch, overrides = CASES[name]
  config = config_util.load_config_file(spec)
  with config.unlocked():
    config.data.batch_size = batch
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  return config


def build_ours(config, seed: int = 0):
  """`(family, frozen tokenizer params)` with random weights."""
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  tok_params = tok.init(jax.random.key(seed + 1), None)
  return fam, {"tokenizer": {"ae": tok_params["ae"]}}


def token_batch(fam, config, seed: int = 0) -> dict:
  """A fixed batch of random codes and labels with the family's token layout."""
  rng = np.random.default_rng(seed)
  B = int(config.data.batch_size)
  label = rng.integers(0, int(config.data.num_classes), (B,)).astype(np.int32)
  if config.family == "mar":  # continuous latents [B, L, C] (the scaled tokenizer posterior)
    tokens = rng.standard_normal((B, fam.seq_len, fam.token_dim)).astype(np.float32)
    return {"tokens": tokens, "label": label}
  V = int(config.tokenizer.config.model.vocab_size)
  n = fam.seq_len if config.family == "var" else fam.num_tokens
  return {"tokens": rng.integers(0, V, (B, n)).astype(np.int32), "label": label}


def ours_step(config, fam, frozen, batch):
  """`(step(), state holder)`: one call runs one training step and blocks on its result."""
  example = {k: np.zeros_like(v) for k, v in batch.items()}
  setup = train_lib.build(config, fam, frozen, example=example)
  holder = {"state": setup.init(setup.init_rng)}
  dev_batch = jax.device_put(batch, setup.batch_sharding)

  def step():
    holder["state"], metrics = setup.step(holder["state"], dev_batch)
    return float(jax.block_until_ready(metrics["loss"]))

  return step, setup


# ------------------------------------------------------------------------------------------------
# Official side (imported from the checkouts)


def official_var_step(reference: str, config, fam, batch):
  import torch

  mod = fam.module
  vae, var = official_models.var(
    reference,
    fam,
    drop_path_rate=mod.drop_path_rate,
    cond_drop_rate=float(config.model.cond_drop_rate),
  )
  var.train()
  # Official train.py: no weight decay on these names and on 1-D params (utils/lr_control.py).
  nowd = ("pos_1LC", "pos_start", "lvl_embed", "gamma", "beta", "ada_gss", "scale_mul", "bias")
  decay, no_decay = [], []
  for name, p in var.named_parameters():
    (no_decay if p.ndim == 1 or any(k in name for k in nowd) else decay).append(p)
  o = config.optim
  opt = torch.optim.AdamW(
    [dict(params=decay, weight_decay=o.weight_decay), dict(params=no_decay, weight_decay=0.0)],
    lr=1e-4,
    betas=(o.b1, o.b2),
    eps=o.eps,
    fused=True,  # official afuse=True
  )
  tokens = torch.from_numpy(batch["tokens"]).long()
  label = torch.from_numpy(batch["label"]).long()
  bounds = np.cumsum([0] + [pn * pn for pn in fam.patch_nums])
  gt_list = [tokens[:, b:e] for b, e in zip(bounds[:-1], bounds[1:], strict=True)]
  B, L, V = tokens.shape[0], tokens.shape[1], mod.vocab_size
  loss_weight = torch.ones(1, L) / L
  ce = torch.nn.CrossEntropyLoss(reduction="none")
  params = list(var.parameters())

  def step():
    with torch.no_grad():
      x = vae.quantize.idxBl_to_var_input(gt_list)
    logits = var(label, x)
    loss = ce(logits.view(-1, V), tokens.view(-1)).view(B, -1).mul(loss_weight).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
    opt.step()
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


def _adamw(torch, decay, no_decay, o, fused):
  return torch.optim.AdamW(
    [dict(params=decay, weight_decay=o.weight_decay), dict(params=no_decay, weight_decay=0.0)],
    lr=1e-4,
    betas=(o.b1, o.b2),
    eps=o.eps,
    fused=fused,
  )


def official_raster_step(reference: str, config, fam, batch):
  """LlamaGen `autoregressive/models/gpt.py` Transformer, its `train_c2i.py` step."""
  import torch

  model = official_models.llamagen(reference, fam, train=True)
  # train_c2i.py creat_optimizer: decay on >= 2-D params, fused AdamW when available.
  params = [p for p in model.parameters() if p.requires_grad]
  o = config.optim
  opt = _adamw(
    torch, [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2], o, True
  )
  codes = torch.from_numpy(batch["tokens"]).long()
  label = torch.from_numpy(batch["label"]).long()

  def step():
    _, loss = model(cond_idx=label, idx=codes[:, :-1], targets=codes)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.clip_norm:
      torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
    opt.step()
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


def official_mar_step(reference: str, config, fam, batch):
  """LTH14/mar `models/mar.py` MAR, its `engine_mar.py` step (with the EMA update)."""

  import torch

  m = config.model
  model = official_models.mar(
    reference, fam, num_sampling_steps=int(m.get("num_sampling_steps", 100)), train=True
  )
  # util/misc.py add_weight_decay: no decay on 1-D params, biases and the diffusion MLP.
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    nd = p.dim() == 1 or name.endswith(".bias") or "diffloss" in name
    (no_decay if nd else decay).append(p)
  params = decay + no_decay
  o = config.optim
  opt = _adamw(torch, decay, no_decay, o, False)  # main_mar.py: plain AdamW
  ema = [p.detach().clone() for p in params]
  rate = float(o.ema_decay)
  # The same latents as image-shaped maps (the inverse of the official patchify).
  B, h, p, c = batch["tokens"].shape[0], fam.seq_side, fam.patch_size, fam.latent_channels
  imgs = torch.from_numpy(batch["tokens"]).reshape(B, h, h, c, p, p)
  imgs = imgs.permute(0, 3, 1, 4, 2, 5).reshape(B, c, h * p, h * p).contiguous()
  label = torch.from_numpy(batch["label"]).long()

  def step():
    loss = model(imgs, label)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.clip_norm:
      torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
    opt.step()
    if rate > 0:  # engine_mar.py update_ema
      with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
          e.mul_(rate).add_(p, alpha=1 - rate)
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


OFFICIAL_STEPS = {
  "var": official_var_step,
  "raster": official_raster_step,
  "mar": official_mar_step,
}


# ------------------------------------------------------------------------------------------------
# Timing


def _timed(step, steps: int) -> dict:
  w0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    step()
  wall, cpu = time.perf_counter() - w0, time.process_time() - c0
  return dict(s_per_step=wall / steps, cpu_util=cpu / wall)


def _first(step) -> float:
  t0 = time.perf_counter()
  step()
  return time.perf_counter() - t0


def compare(sides: dict, rounds: int, steps: int) -> dict:
  """Alternating rounds of `steps` steps per side; medians and per-round ratios."""
  names = list(sides)
  first = {n: _first(sides[n]) for n in names}
  per_round = []
  for r in range(rounds):
    order = names if r % 2 == 0 else names[::-1]
    per_round.append({n: _timed(sides[n], steps) for n in order})
  out = {"first_step_s": {n: round(first[n], 3) for n in names}, "rounds": per_round}
  for n in names:
    out[f"{n}_s_per_step"] = statistics.median(x[n]["s_per_step"] for x in per_round)
    out[f"{n}_cpu_util"] = statistics.median(x[n]["cpu_util"] for x in per_round)
  if "official" in sides:
    ratios = [x["official"]["s_per_step"] / x["arvision"]["s_per_step"] for x in per_round]
    out["official_over_arvision"] = statistics.median(ratios)
    out["ratios"] = [round(v, 4) for v in ratios]
  return out


def run_case(name: str, args) -> dict:
  config = load_case(name)
  fam, frozen = build_ours(config)
  batch = token_batch(fam, config)
  sides = {}
  sides["arvision"], setup = ours_step(config, fam, frozen, batch)
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state["params"]))
  row = dict(case=name, spec=CASES[name][0], batch=int(config.data.batch_size), params=n_ours)
  row["overrides"] = CASES[name][2]
  if args.reference:
    ref = os.path.join(args.reference, OFFICIAL_DIRS[config.family])
    sides["official"], n_off = OFFICIAL_STEPS[config.family](ref, config, fam, batch)
    row["official_params"] = int(n_off)
  row.update(compare(sides, args.rounds, args.steps))
  row["model"] = {k: v for k, v in config.model.to_dict().items() if not isinstance(v, dict)}
  row["optim"] = {k: config.optim[k] for k in ("b1", "b2", "eps", "weight_decay", "clip_norm")}
  row["optim"]["ema_decay"] = float(config.optim.get("ema_decay", 0.0))
  return row


def _fmt(row) -> str:
  s = f"{row['case']:>14} b={row['batch']:<3} arvision {row['arvision_s_per_step']:.4f} s/step"
  s += f" (cpu {row['arvision_cpu_util']:.2f})"
  if "official_s_per_step" in row:
    s += f"  official {row['official_s_per_step']:.4f} s/step (cpu {row['official_cpu_util']:.2f})"
    s += f"  official/arvision {row['official_over_arvision']:.2f}x"
  s += f"  first step {row['first_step_s']}"
  return s


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference", default="", help="folder holding VAR/, LlamaGen/, mar/ checkouts")
  ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
  ap.add_argument("--rounds", type=int, default=6)
  ap.add_argument("--steps", type=int, default=3, help="steps per side per round")
  ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  cases = [c for c in args.cases.split(",") if c]
  bad = [c for c in cases if c not in CASES]
  if bad:
    raise SystemExit(f"--cases: unknown {bad}; accepted: {list(CASES)}")
  import torch

  torch.set_num_threads(args.threads)
  rows = []
  t0 = time.time()
  for c in cases:
    rows.append(run_case(c, args))
    print(_fmt(rows[-1]), flush=True)
  jdev = jax.devices()[0]
  doc = dict(
    what="training step s/step, arvision vs official PyTorch, alternating rounds; "
    "see experiments/bench_train.py",
    device=f"{jdev.platform}: {jdev.device_kind}",
    # arvision's step splits the batch over these (arvision/xla_flags.py: 2 on a 2-core CPU).
    num_devices=jax.device_count(),
    host=dict(
      cpu_count=os.cpu_count(),
      machine=platform.machine(),
      loadavg_at_start=[round(x, 2) for x in os.getloadavg()],
    ),
    versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    settings=dict(
      rounds=args.rounds, steps=args.steps, torch_threads=args.threads, dtype="float32"
    ),
    command="python experiments/bench_train.py "
    + " ".join(
      a if not os.path.isabs(a) else "<dir>" for a in (argv if argv is not None else sys.argv[1:])
    ),
    wall_s=round(time.time() - t0, 1),
    rows=rows,
  )
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(doc, f, indent=2)
    print(f"wrote {args.out}")
  return doc


if __name__ == "__main__":
  main()
