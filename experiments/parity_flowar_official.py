"""FlowAR parity with the official PyTorch code (OliverRensu/FlowAR, read from the public fork
wangqiang9/FlowAR), and its state-dict key tables.

    python experiments/parity_flowar_official.py --reference path/to/FlowAR \
        --out experiments/results/parity_flowar_official.json
    python experiments/parity_flowar_official.py --reference path/to/FlowAR \
        --dump_keys tests/data/flowar_official_keys.json

Needs torch, scipy, einops and timm (timm's `SwiGLU`). The official code moves tensors with
`.cuda()`: on CPU that is the identity here; nothing else of the official code is replaced.

Small official FlowARs (the official geometry: 16x16x16 latents, scales 1, 2, 4, 8, 16, 1000
classes; width 64, 2 + 2 blocks; flow head 2 x 128) get seeded random weights, are converted with
`arvision.convert.flowar` and compared in fp32 on CPU:
- the teacher-forced AR condition z for fixed latents and labels (our scale inputs: area /
  bicubic resampling as the official `forward`), max abs error;
- the flow head's velocity (Attn-CrossAttn-MLP, `cross=True`, and Attn-MLP, `cross=False`);
- the training loss (all scales, pn^2/256 weights) with the same t and noise per scale;
- `sample_tokens` (KV cache, Euler on the official grid, CFG interval and ramp) with the same
  initial noise per scale (ours drawn from its rng and fed to the official `torch.randn`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the scripts are not a package
from parity_common import git_head, write_rows  # noqa: E402

SMALL = dict(
  img_size=256,
  vae_stride=16,
  patch_size=1,
  encoder_embed_dim=64,
  encoder_depth=2,
  encoder_num_heads=4,
  decoder_embed_dim=64,
  decoder_depth=2,
  decoder_num_heads=4,
  vae_embed_dim=16,
  diffloss_d=2,
  diffloss_w=128,
)
# The README's released models: (official builder, diffloss_d, diffloss_w).
RELEASED = {"flowar_small": (2, 1024), "flowar_large": (12, 1024), "flowar_huge": (12, 1536)}


def _official_imports(reference: str):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from parity_mar_official import _official_imports as mar_imports  # the torchvision stub

  mar_imports(reference)


def dump_keys(reference: str, out: str):
  import torch

  _official_imports(reference)
  from models import flowar

  tables = {}
  with torch.device("meta"):
    for name, (d, w) in RELEASED.items():
      model = getattr(flowar, name)(vae_embed_dim=16, diffloss_d=d, diffloss_w=w)
      tables[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    for cross in (False, True):
      model = flowar.FlowAR(**SMALL, cross=cross)
      tables[f"flowar_small_cross{int(cross)}"] = {
        k: list(v.shape) for k, v in model.state_dict().items()
      }
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def small_config(cross: bool):
  """Our config for `SMALL`: a fake KL tokenizer with 16x16x16 latents."""
  import ml_collections as mlc

  from arvision import config_util

  c = mlc.ConfigDict(config_util.load_config_file("flowar.py:smoke").to_dict())
  s = SMALL
  c.model.update(
    patch_nums=(1, 2, 4, 8, 16),
    encoder_embed_dim=s["encoder_embed_dim"],
    encoder_depth=s["encoder_depth"],
    encoder_num_heads=s["encoder_num_heads"],
    decoder_embed_dim=s["decoder_embed_dim"],
    decoder_depth=s["decoder_depth"],
    decoder_num_heads=s["decoder_num_heads"],
    head_depth=s["diffloss_d"],
    head_width=s["diffloss_w"],
    cross=cross,
    attn_impl="xla",
  )
  c.data.num_classes = 1000  # the official class_emb is hard-coded to 1000 + 1 rows
  tok = c.tokenizer.config
  tok.model.update(type="kl", ch=8, ch_mult=(1, 2), z_channels=16, embed_dim=16)
  tok.data.image_size = 32  # 16x16 latents
  return c


def _build(cross: bool, seed: int):
  import torch
  from models import flowar

  from arvision import families
  from arvision.convert import common
  from arvision.convert import flowar as cf

  torch.manual_seed(seed)
  ref = flowar.FlowAR(**SMALL, cross=cross)
  for p in ref.parameters():  # zero-initialised output layers would hide errors
    p.add_(0.02 * torch.randn_like(p))
  config = small_config(cross)
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  params = cf.convert_flowar(common.unwrap_state_dict(ref.state_dict()), config)
  return ref, fam, tok, params


def parity(reference: str, out: str, batch: int = 2, num_steps: int = 4, cfg: float = 2.5):
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as F

  from arvision.models import flowar as flowar_lib

  _official_imports(reference)
  from models import flowar

  t0 = time.time()
  torch.set_grad_enabled(False)
  real_cuda = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *a, **k: self
  rows = {}
  rng = np.random.default_rng(0)
  C, side, pns = 16, 16, (1, 2, 4, 8, 16)
  try:
    # --- the flow head alone, both block types -----------------------------------------------
    for cross in (False, True):
      ref, fam, tok, params = _build(cross, seed=int(cross))
      var = {"params": params}
      x = rng.standard_normal((batch, 16, C)).astype(np.float32)
      t = rng.uniform(0, 1, batch).astype(np.float32)
      cond = rng.standard_normal((batch, 16, SMALL["decoder_embed_dim"])).astype(np.float32)
      v_t = ref.flownet(*(torch.from_numpy(a) for a in (x, t, cond))).numpy()
      v_j = np.asarray(
        fam.module.apply(
          var, *(jnp.asarray(a) for a in (x, t, cond)), method=flowar_lib.FlowAR.velocity
        )
      )
      rows[f"head_velocity_cross{int(cross)}_max_abs_diff"] = float(np.abs(v_j - v_t).max())
      rows[f"head_velocity_cross{int(cross)}_max_abs"] = float(np.abs(v_t).max())

    # --- teacher-forced condition z (cross=True model) -----------------------------------------
    ref.train()
    imgs = rng.standard_normal((batch, C, side, side)).astype(np.float32)
    labels = np.array([3, 1000][:batch] + [7] * max(0, batch - 2))
    it = torch.from_numpy(imgs)
    gts = [F.interpolate(it, (p, p), mode="area") for p in pns[:-1]] + [it]
    ins = [
      F.interpolate(F.interpolate(g, (side, side), mode="bicubic"), (p, p), mode="area")
      for g, p in zip(gts[:-1], pns[1:], strict=True)
    ]
    ins = torch.cat([ref.patchify(i) for i in ins], dim=1)
    cemb = ref.class_emb(torch.from_numpy(labels))
    h = torch.cat([cemb.unsqueeze(1), ref.z_proj(ins)], dim=1)
    z_t = ref.forward_mae_decoder(ref.forward_mae_encoder(h, cemb, ref.mask), cemb, ref.mask)
    z_nhwc = jnp.asarray(imgs.transpose(0, 2, 3, 1))
    _, inputs = fam.teacher_inputs(z_nhwc)
    z_j = np.asarray(fam.module.apply(var, inputs, jnp.asarray(labels)))
    rows["teacher_z_max_abs_diff"] = float(np.abs(z_j - z_t.numpy()).max())
    rows["teacher_z_max_abs"] = float(np.abs(z_t.numpy()).max())
    rows["scale_inputs_max_abs_diff"] = float(np.abs(np.asarray(inputs) - ins.numpy()).max())

    # --- the training loss with the same t and noise per scale --------------------------------
    key = jax.random.key(5)
    k_flow = jax.random.split(key, 3)[2]
    draws = {"rand": [np.ones(batch, np.float32)], "randn_like": []}  # no label drop
    for k, p in enumerate(pns):
      k_t, k_n = jax.random.split(jax.random.fold_in(k_flow, k))
      t_o = np.asarray(jax.random.uniform(k_t, (batch,), jnp.float32))
      draws["rand"].append((np.float32(1.0) - t_o).reshape(batch, 1, 1))
      draws["randn_like"].append(np.asarray(jax.random.normal(k_n, (batch, p * p, C), jnp.float32)))
    queues = {k: list(v) for k, v in draws.items()}
    real_rand, real_randn_like = torch.rand, torch.randn_like
    torch.rand = lambda *a, **k: torch.from_numpy(queues["rand"].pop(0).copy())
    torch.randn_like = lambda like, **k: torch.from_numpy(queues["randn_like"].pop(0).copy())
    try:
      loss_t = float(ref(it, torch.from_numpy(labels)))
    finally:
      torch.rand, torch.randn_like = real_rand, real_randn_like
    assert not queues["rand"] and not queues["randn_like"], "unused draws: orders differ"
    full = dict(params, tokenizer=tok.init(jax.random.key(0), None))
    tokens_raster = imgs.transpose(0, 2, 3, 1).reshape(batch, side * side, C)
    loss_j = float(fam.loss(full, {"tokens": tokens_raster, "label": labels}, key, False)[0])
    rows["loss_official"] = loss_t
    rows["loss_abs_diff"] = abs(loss_j - loss_t)

    # --- sampling ------------------------------------------------------------------------------
    ref.eval()
    skey = jax.random.key(1)
    sample_labels = np.array([5, 9][:batch] + [2] * max(0, batch - 2))
    noise = [np.asarray(fam.scale_noise(skey, k, batch)) for k in range(len(pns))]
    queue = [np.concatenate([n, n]) for n in noise]  # rows [cond; uncond], as official
    real_randn = flowar.torch.randn
    flowar.torch.randn = lambda *a, **k: torch.from_numpy(queue.pop(0).copy())
    try:
      tok_t = ref.sample_tokens(
        num_steps=num_steps, guidance=0.9, cfg=cfg, labels=torch.from_numpy(sample_labels)
      ).numpy()
    finally:
      flowar.torch.randn = real_randn
    assert not queue, "unused noise"
    _, tok_j = fam.sample_tokens(
      full, jnp.asarray(sample_labels), skey, num_steps=num_steps, cfg=cfg, guidance_high=0.9
    )
    tok_j = np.asarray(tok_j).reshape(batch, side, side, C).transpose(0, 3, 1, 2)
    rows["sample_tokens_max_abs_diff"] = float(np.abs(tok_j - tok_t).max())
    rows["sample_tokens_max_abs"] = float(np.abs(tok_t).max())
  finally:
    torch.Tensor.cuda = real_cuda
  rec = dict(
    what="FlowAR official parity (small random models, CPU fp32)",
    command=(
      f"python experiments/parity_flowar_official.py --reference <FlowAR checkout> --out {out}"
    ),
    reference_commit=git_head(reference),
    small=SMALL,
    sampling=dict(
      batch=batch, num_steps=num_steps, cfg=cfg, guidance=0.9, labels=sample_labels.tolist()
    ),
    rows=rows,
    jax=jax.__version__,
    torch=torch.__version__,
    device=str(jax.devices()[0]),
    seconds=round(time.time() - t0, 1),
  )
  return write_rows(out, rec, rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reference", required=True, help="a checkout of FlowAR (wangqiang9/FlowAR)")
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--out", default="experiments/results/parity_flowar_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.dump_keys)
  return parity(args.reference, args.out)


if __name__ == "__main__":
  main()
