"""Parity with the official VAR code: same random weights -> same tokens, inputs, logits, samples.

    python experiments/parity_var_official.py --reference PATH_TO_FoundationVision_VAR_CHECKOUT

Builds the official VQVAE (vae_ch160v4096z32 shapes) and VAR-d16 from a checkout of
FoundationVision/VAR on the CPU with random weights (its code is imported from --reference, never
copied here), converts their state dicts with `arvision.convert.var`, and compares:
multi-scale token indices of the same images, the teacher-forcing input, the decoded images,
the teacher-forced logits of the transformer, and greedy (top_k=1) CFG sampling end to end.
Writes experiments/results/parity_var_official.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np


def _official_imports(reference: str):
  sys.path.insert(0, reference)
  hub = types.ModuleType("huggingface_hub")  # only used for the Hub mixin (downloads)
  hub.PyTorchModelHubMixin = type(
    "PyTorchModelHubMixin", (), {"__init_subclass__": classmethod(lambda cls, **kw: None)}
  )
  sys.modules.setdefault("huggingface_hub", hub)


def _official(reference: str, depth: int):
  import torch

  _official_imports(reference)
  from models import build_vae_var  # noqa: E402  (the official package)

  torch.manual_seed(0)
  vae, var = build_vae_var(
    device="cpu",
    depth=depth,
    shared_aln=False,
    init_adaln_gamma=0.5,
    flash_if_available=False,
    fused_if_available=False,
  )
  # build_vae_var disables torch's default init for speed and loads weights afterwards; give the
  # VAE seeded random weights (fan-in scaled) so every layer is exercised.
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
      elif name.endswith("weight"):  # GroupNorm scales
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  var.cond_drop_rate = 0.0
  return vae.eval(), var.eval()


def dump_keys(reference: str, out: str):
  """Writes the official state-dict key -> shape tables that tests/test_convert.py checks against.

  VAR is built as `build_vae_var` builds the released models (attn_l2_norm=True).
  """
  import torch

  _official_imports(reference)
  from models import VAR, VQVAE

  for clz in (
    torch.nn.Linear,
    torch.nn.LayerNorm,
    torch.nn.Conv2d,
    torch.nn.Embedding,
    torch.nn.GroupNorm,
  ):
    clz.reset_parameters = lambda self: None  # shapes only: skip the (slow) default init
  tables = {}
  for name, kw in dict(
    vae_full=dict(
      vocab_size=4096,
      z_channels=32,
      ch=160,
      share_quant_resi=4,
      v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    ),
    vae_small=dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 4)),
  ).items():
    vae = VQVAE(test_mode=True, **kw)
    tables[name] = {k: list(v.shape) for k, v in vae.state_dict().items()}
    if name == "vae_full":
      for depth in (16, 30):
        var = VAR(
          vae,
          num_classes=1000,
          depth=depth,
          embed_dim=64 * depth,
          num_heads=depth,
          attn_l2_norm=True,
          flash_if_available=False,
          fused_if_available=False,
        )
        tables[f"var_d{depth}"] = {k: list(v.shape) for k, v in var.state_dict().items()}
    else:
      var = VAR(
        vae,
        num_classes=10,
        depth=2,
        embed_dim=64,
        num_heads=2,
        patch_nums=(1, 2, 4),
        attn_l2_norm=True,
        flash_if_available=False,
        fused_if_available=False,
      )
      tables["var_small"] = {k: list(v.shape) for k, v in var.state_dict().items()}
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--reference", required=True, help="a checkout of FoundationVision/VAR")
  ap.add_argument("--depth", type=int, default=16)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--out", default="experiments/results/parity_var_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.dump_keys)
  import torch

  from arvision import config_util, families
  from arvision.convert import common
  from arvision.convert import var as cv

  torch.set_grad_enabled(False)
  t0 = time.time()
  vae, var = _official(args.reference, args.depth)
  tok_params, tok_config = cv.convert_vae(common.unwrap_state_dict(vae.state_dict()))
  config = config_util.load_config_file(f"var.py:d{args.depth}")
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.model.attn_impl = "xla"
  var_params = cv.convert_var(common.unwrap_state_dict(var.state_dict()), config)
  tok = families.build(tok_config)
  fam = families.build(config, tokenizer=tok)
  params = {**var_params, "tokenizer": tok_params}
  rows = {}

  # 1. tokenizer: image -> multi-scale indices
  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32)
  img = torch.nn.functional.interpolate(
    torch.from_numpy(img), size=(256, 256), mode="bilinear"
  ).numpy()
  idx_t = vae.img_to_idxBl(torch.from_numpy(img))
  idx_j = tok.encode_idx(tok_params, jnp.asarray(img.transpose(0, 2, 3, 1)))
  agree = [float(np.mean(np.asarray(a) == b.numpy())) for a, b in zip(idx_j, idx_t, strict=True)]
  rows["token_agreement_per_scale"] = agree

  # 2. teacher-forcing input from the official indices
  x_t = vae.quantize.idxBl_to_var_input(idx_t).numpy()
  idx_np = [jnp.asarray(i.numpy()) for i in idx_t]
  x_j = np.asarray(tok.idx_to_var_input(tok_params, idx_np))
  rows["teacher_input_max_abs_diff"] = float(np.abs(x_j - x_t).max())
  rows["teacher_input_max_abs"] = float(np.abs(x_t).max())

  # 3. decode the official indices
  im_t = vae.idxBl_to_img(idx_t, same_shape=True, last_one=True).numpy().transpose(0, 2, 3, 1)
  f_hat = tok.idx_to_fhat(tok_params, idx_np)
  im_j = np.asarray(tok.decode_fhat(tok_params, f_hat))
  rows["decode_max_abs_diff"] = float(np.abs(im_j - im_t).max())

  # 4. transformer logits, teacher-forced
  labels = np.arange(args.batch) * 7 % 1000
  lg_t = var(torch.from_numpy(labels), torch.from_numpy(x_t)).numpy()
  lg_j = np.asarray(fam.apply(params, jnp.asarray(labels), jnp.asarray(x_t)))
  rows["logits_max_abs_diff"] = float(np.abs(lg_j - lg_t).max())
  rows["logits_max_abs"] = float(np.abs(lg_t).max())
  rows["logits_argmax_agreement"] = float(np.mean(lg_j.argmax(-1) == lg_t.argmax(-1)))

  # 5. greedy CFG sampling end to end (top_k=1 makes both samplers deterministic)
  s_t = var.autoregressive_infer_cfg(
    args.batch, torch.from_numpy(labels), g_seed=0, cfg=1.5, top_k=1, top_p=0.0, more_smooth=False
  )
  s_t = np.round(s_t.numpy().transpose(0, 2, 3, 1) * 255).astype(np.int32)
  s_j = fam.sample(params, jnp.asarray(labels), jax.random.key(0), cfg=1.5, top_k=1, top_p=0.0)
  diff = np.abs(np.asarray(s_j).astype(np.int32) - s_t)
  rows["greedy_sample_max_abs_diff_uint8"] = int(diff.max())
  rows["greedy_sample_mean_abs_diff_uint8"] = float(diff.mean())

  n_params = sum(p.numel() for p in var.parameters())
  result = dict(
    what="arvision VAR/VQVAE vs official FoundationVision/VAR, same random weights, CPU fp32",
    depth=args.depth,
    batch=args.batch,
    official_var_params=int(n_params),
    arvision_var_params=int(sum(np.size(x) for x in jax.tree.leaves(var_params))),
    results=rows,
    seconds=round(time.time() - t0, 1),
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
