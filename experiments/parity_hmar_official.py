"""Parity with the official HMAR code: same random weights -> same logits and greedy samples.

    python experiments/parity_hmar_official.py --reference PATH_TO_NVlabs_HMAR_CHECKOUT

Builds the official VQVAE and `HMAR` (stage 1 + stage 2 in one module, the layout of the released
`hmar-d*.pth`) from a checkout of NVlabs/HMAR on the CPU with seeded random weights (its code is
imported from --reference, never copied here), converts the state dicts with
`arvision.convert.hmar`, and compares, fp32:

- the stage-1 (next-scale) teacher-forced logits: the official `NextScalePrediction.forward`
  holding HMAR's base + ns blocks and ns head (what stage 1 trained);
- the stage-2 (masked-prediction) teacher-forced logits: the official
  `MaskedPrediction.forward` holding HMAR's base + mask blocks, mask head and `mask_embed`, on
  `idxBl_to_mask_input`'s masked inputs;
- greedy (top_k=1) CFG sampling end to end with `HMAR.generate`: next-scale only (mask=False) and
  with the official masked-step schedule (mask=True);
- the `lognorm` scale-loss weights (`Trainer.norm_dist_equivalent`) against
  `next_scale.scale_weights("lognormal", ...)`.

Replaced in the harness, nothing else: the Triton block-sparse attention kernel (CUDA only;
`attn/block_sparse_attn_*.py`) by its documented math, softmax attention where query i sees keys
[row_starts[i], row_ends[i]) (block-diagonal: its own scale), written here with torch ops; and
the logging helpers of `utils/misc.py` (wandb, pytz, torchvision, tap, not installed) by the one
function `models/hmar.py` uses from it, `does_not_contain_substrings`.
Writes experiments/results/parity_hmar_official.json; `--dump_keys FILE` writes the official
state-dict key -> shape tables that tests/test_convert_hmar.py checks against.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np


def _official_imports(reference: str):
  import torch

  sys.path.insert(0, reference)

  class BlockSparseAttention(torch.nn.Module):
    """The kernel's math on CPU: query i attends to keys [row_starts[i], row_ends[i])."""

    def __init__(self, block_sizes, device="cpu", sparsity_pattern="block_diagonal"):
      super().__init__()
      ends = torch.cumsum(torch.tensor(block_sizes), 0)
      starts = ends - torch.tensor(block_sizes)
      self.row_ends = torch.repeat_interleave(ends, torch.tensor(block_sizes))
      self.row_starts = (
        torch.repeat_interleave(starts, torch.tensor(block_sizes))
        if sparsity_pattern == "block_diagonal"
        else torch.zeros_like(self.row_ends)
      )

    def forward(self, q, k, v, sm_scale):
      j = torch.arange(q.shape[2])[None, :]
      allowed = (j >= self.row_starts[:, None]) & (j < self.row_ends[:, None])
      logits = (q @ k.transpose(-2, -1)) * sm_scale
      logits = logits.masked_fill(~allowed, float("-inf"))
      return logits.softmax(dim=-1) @ v

  iface = types.ModuleType("attn.block_sparse_attn_interface")
  iface.BlockSparseAttention = BlockSparseAttention
  sys.modules["attn.block_sparse_attn_interface"] = iface
  misc = types.ModuleType("utils.misc")
  misc.does_not_contain_substrings = lambda s, subs: all(x not in s for x in subs)
  misc.MetricLogger = misc.WandbLogger = object
  sys.modules["utils.misc"] = misc


def _seed_weights(module, seed: int):
  """Seeded random weights for every parameter (the builders skip torch's init)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("scale_mul_1H11"):
        p.copy_(np.log(4.0) + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2 and "pos_" not in name and "embed" not in name:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      elif name.endswith("weight") and p.ndim == 1:  # GroupNorm scales
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _official(reference: str, depth: int, mask_depth: int):
  import torch

  _official_imports(reference)
  from models import build_vae_hmar  # noqa: E402  (the official package)

  torch.manual_seed(0)
  vae, hmar = build_vae_hmar(
    device="cpu", depth=depth, flash_if_available=False, fused_if_available=False,
    n_layers_train=mask_depth,
  )  # fmt: skip
  _seed_weights(vae, 1)
  _seed_weights(hmar, 2)
  hmar.cond_drop_rate = 0.0
  return vae.eval(), hmar.eval()


def _stage_model(kind: str, vae, hmar_sd: dict, depth: int, mask_depth: int):
  """The official stage-1 (`NextScalePrediction`) or stage-2 (`MaskedPrediction`) module holding
  the HMAR weights of that path (the modules whose `forward` is the teacher-forced one)."""
  from models import MaskedPrediction, NextScalePrediction  # noqa: E402

  kw = dict(
    vae_local=vae, depth=depth, embed_dim=64 * depth, num_heads=depth, attn_l2_norm=True,
    flash_if_available=False, fused_if_available=False, cond_drop_rate=0.0,
  )  # fmt: skip
  base = depth - mask_depth
  sd = {}
  for k, v in hmar_sd.items():
    if k.startswith("base_blocks."):
      sd["blocks." + k[len("base_blocks.") :]] = v
    elif k.startswith(f"{kind}_blocks."):
      i, rest = k[len(f"{kind}_blocks.") :].split(".", 1)
      sd[f"blocks.{base + int(i)}.{rest}"] = v
    elif k.startswith(f"{kind}_head"):
      sd[k[len(kind) + 1 :]] = v
    elif k in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight"):
      sd[k] = v
  if kind == "ns":
    model = NextScalePrediction(**kw)
    sd["word_embed.weight"] = hmar_sd["word_embed.weight"]
    sd["word_embed.bias"] = hmar_sd["word_embed_bias"]
    model.load_state_dict(sd, strict=False)
  else:
    model = MaskedPrediction(n_layers_train=mask_depth, **kw)
    for k in ("word_embed.weight", "word_embed_bias", "mask_embed.weight"):
      sd[k] = hmar_sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
  return model.eval()


def dump_keys(reference: str, out: str):
  """Official state-dict key -> shape tables: HMAR-d16 (released layout, n_layers_train 8), its
  stage 1 (`NextScalePrediction`, VAR's layout) and a small HMAR (depth 2, one mask block)."""
  import torch

  _official_imports(reference)
  from models import HMAR, VQVAE, NextScalePrediction

  for clz in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.GroupNorm):
    clz.reset_parameters = lambda self: None  # shapes only: skip the (slow) default init
  tables = {}
  vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True)
  common_kw = dict(attn_l2_norm=True, flash_if_available=False, fused_if_available=False)
  hmar = HMAR(vae, depth=16, embed_dim=1024, num_heads=16, n_layers_train=8, **common_kw)
  tables["hmar_d16"] = {k: list(v.shape) for k, v in hmar.state_dict().items()}
  nsp = NextScalePrediction(vae, depth=16, embed_dim=1024, num_heads=16, **common_kw)
  tables["nsp_d16"] = {k: list(v.shape) for k, v in nsp.state_dict().items()}
  small = VQVAE(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 4))
  hmar = HMAR(
    small, num_classes=10, depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 4),
    n_layers_train=1, **common_kw,
  )  # fmt: skip
  tables["hmar_small"] = {k: list(v.shape) for k, v in hmar.state_dict().items()}
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--reference", required=True, help="a checkout of NVlabs/HMAR")
  ap.add_argument("--depth", type=int, default=16)
  ap.add_argument("--mask_depth", type=int, default=8, help="official n_layers_train")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--out", default="experiments/results/parity_hmar_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.dump_keys)
  import torch

  from arvision import config_util, families
  from arvision.convert import common
  from arvision.convert import hmar as ch
  from arvision.convert import var as cv
  from arvision.models import next_scale

  torch.set_grad_enabled(False)
  t0 = time.time()
  vae, hmar = _official(args.reference, args.depth, args.mask_depth)
  hmar_sd = common.unwrap_state_dict(hmar.state_dict())
  tok_params, tok_config = cv.convert_vae(common.unwrap_state_dict(vae.state_dict()))
  config = ch.hmar_config(hmar_sd)
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.model.attn_impl = "xla"
  params = {**ch.convert_hmar(hmar_sd, config), "tokenizer": tok_params}
  tok = families.build(tok_config)
  fam = families.build(config, tokenizer=tok)
  rows = {}

  # Ground-truth tokens of random images (the tokenizer's own parity is parity_var_official).
  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32)
  img = torch.nn.functional.interpolate(torch.from_numpy(img), size=(256, 256), mode="bilinear")
  idx_t = vae.img_to_idxBl(img)
  idx_j = [jnp.asarray(i.numpy()) for i in idx_t]
  labels = np.arange(args.batch) * 7 % 1000
  x_ns = vae.quantize.idxBl_to_ns_input(idx_t)

  # 1. stage 1: next-scale logits, teacher-forced, block-diagonal mask
  nsp = _stage_model("ns", vae, hmar.state_dict(), args.depth, args.mask_depth)
  lg_t = nsp(torch.from_numpy(labels), x_ns).numpy()
  teacher = np.asarray(tok.idx_to_var_input(tok_params, idx_j))
  rows["teacher_input_max_abs_diff"] = float(np.abs(teacher - x_ns.numpy()).max())
  lg_j = np.asarray(fam.apply(params, jnp.asarray(labels), jnp.asarray(x_ns.numpy())))
  rows["stage1_logits_max_abs_diff"] = float(np.abs(lg_j - lg_t).max())
  rows["stage1_logits_max_abs"] = float(np.abs(lg_t).max())
  rows["stage1_logits_argmax_agreement"] = float(np.mean(lg_j.argmax(-1) == lg_t.argmax(-1)))

  # 2. stage 2: masked-prediction logits on the official masked inputs (p_mask 0.5)
  mp = _stage_model("mask", vae, hmar.state_dict(), args.depth, args.mask_depth)
  torch.manual_seed(3)
  x_mask, idx_to_mask = vae.quantize.idxBl_to_mask_input(idx_t, p_mask=0.5)
  idx_to_mask = torch.cat(idx_to_mask)
  lg2_t = mp(torch.from_numpy(labels), torch.cat([x_ns, x_mask]), idx_to_mask).numpy()
  own = np.asarray(fam.own_inputs(tok_params, idx_j))
  rows["stage2_own_input_max_abs_diff"] = float(np.abs(own - x_mask.numpy()).max())
  masked = np.zeros((args.batch, fam.seq_len - 1), bool)
  masked[:, idx_to_mask.numpy()] = True
  lg2_j = np.asarray(
    fam.apply_masked(params, jnp.asarray(labels), jnp.asarray(x_ns.numpy()),
                     jnp.asarray(x_mask.numpy()), jnp.asarray(masked))
  )  # fmt: skip
  rows["stage2_logits_max_abs_diff"] = float(np.abs(lg2_j - lg2_t).max())
  rows["stage2_logits_max_abs"] = float(np.abs(lg2_t).max())
  sel = idx_to_mask.numpy() + 1  # the masked tokens, where the stage-2 loss is taken
  rows["stage2_masked_argmax_agreement"] = float(
    np.mean(lg2_j[:, sel].argmax(-1) == lg2_t[:, sel].argmax(-1))
  )

  # 3. greedy CFG sampling (top_k=1), next-scale only and with the official masked steps
  schedule = [list(s) for s in fam.mask_schedule]
  for name, mask in (("greedy_nextscale", False), ("greedy_masked_steps", True)):
    s_t = hmar.generate(
      args.batch, torch.from_numpy(labels), g_seed=0, cfg=1.5, top_k=1, top_p=0.0,
      mask=mask, mask_schedule=schedule,
    )  # fmt: skip
    s_t = np.round(s_t.numpy().transpose(0, 2, 3, 1) * 255).astype(np.int32)
    c = config
    if not mask:
      c = config_util.from_json(config_util.to_json(config))
      with c.unlocked():
        c.model.mask_schedule = tuple((pn * pn,) for pn in fam.patch_nums)
    f = families.build(c, tokenizer=tok)
    s_j = f.sample(params, jnp.asarray(labels), jax.random.key(0), cfg=1.5, top_k=1, top_p=0.0)
    diff = np.abs(np.asarray(s_j).astype(np.int32) - s_t)
    rows[f"{name}_sample_max_abs_diff_uint8"] = int(diff.max())
    rows[f"{name}_sample_mean_abs_diff_uint8"] = float(diff.mean())

  # 4. the lognorm scale-loss weights, per token
  from trainer import Trainer  # noqa: E402  (official)

  w_t = np.asarray(Trainer.norm_dist_equivalent(None, list(fam.patch_nums)))
  w_s = next_scale.scale_weights("lognormal", fam.patch_nums)
  w_j = np.concatenate(
    [np.full(pn * pn, w / (pn * pn)) for pn, w in zip(fam.patch_nums, w_s, strict=True)]
  )
  rows["lognorm_weights_max_abs_diff"] = float(np.abs(w_j - w_t).max())
  rows["lognorm_scale_weights"] = [round(float(w), 6) for w in w_s]

  result = dict(
    what=(
      "arvision HMAR vs official NVlabs/HMAR, same random weights, CPU fp32; official Triton "
      "block-sparse kernel replaced by its math (block-diagonal softmax attention)"
    ),
    depth=args.depth,
    mask_depth=args.mask_depth,
    batch=args.batch,
    mask_schedule=schedule,
    official_hmar_params=int(sum(p.numel() for p in hmar.parameters())),
    arvision_hmar_params=int(sum(np.size(x) for k, x in common.flatten(params).items()
                                 if not k.startswith("tokenizer"))),
    results=rows,
    seconds=round(time.time() - t0, 1),
    command=(
      f"python experiments/parity_hmar_official.py --reference <NVlabs/HMAR checkout> "
      f"--depth {args.depth} --mask_depth {args.mask_depth} --batch {args.batch}"
    ),
    reference_commit=subprocess.run(
      ["git", "-C", args.reference, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip(),
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
  )  # fmt: skip
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
