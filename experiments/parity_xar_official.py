"""xAR parity with the official PyTorch code (OliverRensu/xAR), and its state-dict key tables.

    python experiments/parity_xar_official.py --reference path/to/OliverRensu-xAR \
        --out experiments/results/parity_xar_official.json
    python experiments/parity_xar_official.py --reference path/to/OliverRensu-xAR \
        --dump_keys tests/data/xar_official_keys.json

Needs torch, scipy, einops and timm (the official MLP is timm's `SwiGLU`). The official module
imports `flash_attn` without using it: a stub stands in. The official sampler moves tensors with
`.cuda()`: on CPU that is the identity here; nothing else of the official code is replaced.

A small official xAR (the official geometry: 16x16x16 latents, 2x2 cells of 64 tokens, 1000
classes; width 64, 2 + 2 blocks) gets seeded random weights, is converted with
`arvision.convert.xar`, and compared in fp32 on CPU:
- the network (training mode: full sequence, block-causal mask) for fixed noisy tokens, per-cell
  times and labels: the velocity, max abs error;
- `sample_tokens` (Euler-Maruyama per cell, KV cache, CFG ramp over cells) with the same initial
  and per-step noise: ours draws it from its rng, and the same arrays are fed to the official
  sampler in its draw order (`torch.randn` per cell, `torch.randn_like` per step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

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
)
RELEASED = ("xar_base", "xar_large", "xar_huge")


def _official_imports(reference: str):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from parity_mar_official import _official_imports as mar_imports  # the torchvision stub

  mar_imports(reference)
  stub = types.ModuleType("flash_attn")
  stub.flash_attn_func = None  # imported by the official module, never called
  sys.modules.setdefault("flash_attn", stub)


def dump_keys(reference: str, out: str):
  import torch

  _official_imports(reference)
  from models import xar

  tables = {}
  with torch.device("meta"):
    for name in RELEASED:
      model = getattr(xar, name)(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16)
      tables[name] = {k: list(v.shape) for k, v in model.state_dict().items()}
    tables["xar_small"] = {k: list(v.shape) for k, v in xar.xAR(**SMALL).state_dict().items()}
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(f"{k} ({len(v)} keys)" for k, v in tables.items()))


def small_config():
  """Our config for `SMALL`: a fake KL tokenizer with 16x16x16 latents (never used to decode
  what is compared)."""
  import ml_collections as mlc

  from arvision import config_util

  c = mlc.ConfigDict(config_util.load_config_file("xar.py:smoke").to_dict())
  s = SMALL
  c.model.update(
    encoder_embed_dim=s["encoder_embed_dim"],
    encoder_depth=s["encoder_depth"],
    encoder_num_heads=s["encoder_num_heads"],
    decoder_embed_dim=s["decoder_embed_dim"],
    decoder_depth=s["decoder_depth"],
    decoder_num_heads=s["decoder_num_heads"],
    attn_impl="xla",
  )
  c.data.num_classes = 1000  # the official class_emb is hard-coded to 1000 + 1 rows
  tok = c.tokenizer.config
  tok.model.update(type="kl", ch=8, ch_mult=(1, 2), z_channels=16, embed_dim=16)
  tok.data.image_size = 32  # 16x16 latents
  return c


def parity(reference: str, out: str, batch: int = 2, num_steps: int = 4, cfg: float = 2.5):
  import jax
  import jax.numpy as jnp
  import torch

  from arvision import families
  from arvision.convert import common
  from arvision.convert import xar as cx
  from arvision.models import xar as xar_lib

  _official_imports(reference)
  from models import sampler, xar

  t0 = time.time()
  torch.manual_seed(0)
  torch.set_grad_enabled(False)
  ref = xar.xAR(**SMALL)
  for p in ref.parameters():  # zero biases / pos embeds would hide errors
    p.add_(0.02 * torch.randn_like(p))
  config = small_config()
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  params = cx.convert_xar(common.unwrap_state_dict(ref.state_dict()), config)
  var = {"params": params}
  rows = {}
  N, T, C, L = 4, 64, 16, 256

  # --- the network, training mode (full sequence, block-causal mask) ---------------------------
  ref.train()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, L, C)).astype(np.float32)
  t_BxN = rng.uniform(0.0, 1.0, (batch, N)).astype(np.float32)
  labels = np.array([3, 1000][:batch] + [7] * max(0, batch - 2))
  t_flat = torch.from_numpy(np.ascontiguousarray(t_BxN.T).reshape(-1))  # cell-major, official
  temb = ref.time_embed((t_flat * 1000).long()).squeeze()
  cond = ref.class_emb(torch.from_numpy(labels)).squeeze().repeat(N, 1) + temb
  h = ref.forward_mae_encoder(ref.z_proj(torch.from_numpy(x)), cond, ref.mask)
  v_t = ref.forward_mae_decoder(h, cond, ref.mask).numpy()
  v_j = np.asarray(fam.module.apply(var, jnp.asarray(x), jnp.asarray(t_BxN), jnp.asarray(labels)))
  rows["velocity_max_abs_diff"] = float(np.abs(v_j - v_t).max())
  rows["velocity_max_abs"] = float(np.abs(v_t).max())

  # --- sampling: Euler-Maruyama per cell with the KV cache and the CFG ramp --------------------
  ref.eval()
  key = jax.random.key(1)
  sample_labels = np.array([5, 9][:batch] + [2] * max(0, batch - 2))
  draws = {"randn": [], "randn_like": []}
  for s in range(N):
    init, k_steps = fam.cell_noise(key, s, batch)
    draws["randn"].append(np.asarray(init))
    for i in range(num_steps - 1):
      eps = jax.random.normal(jax.random.fold_in(k_steps, i), (batch, T, C), jnp.float32)
      draws["randn_like"].append(np.asarray(eps))
  queues = {k: list(v) for k, v in draws.items()}
  real_cuda = torch.Tensor.cuda
  real_randn, real_randn_like = xar.torch.randn, sampler.torch.randn_like

  def fake_randn(*shape, **kw):
    arr = queues["randn"].pop(0)
    assert tuple(arr.shape) == tuple(shape[0] if len(shape) == 1 else shape), shape
    return torch.from_numpy(arr.copy())

  def fake_randn_like(like, **kw):
    arr = queues["randn_like"].pop(0)
    assert tuple(arr.shape) == tuple(like.shape), like.shape
    return torch.from_numpy(arr.copy()).to(like.dtype)

  torch.Tensor.cuda = lambda self, *a, **k: self
  xar.torch.randn = fake_randn
  sampler.torch.randn_like = fake_randn_like
  try:
    tok_t = ref.sample_tokens(num_steps, cfg=cfg, label=torch.from_numpy(sample_labels)).numpy()
  finally:
    torch.Tensor.cuda = real_cuda
    xar.torch.randn, sampler.torch.randn_like = real_randn, real_randn_like
  assert not queues["randn"] and not queues["randn_like"], "unused noise: draw orders differ"
  full = dict(params, tokenizer=tok.init(jax.random.key(0), None))
  _, tok_j = fam.sample_tokens(full, jnp.asarray(sample_labels), key, num_steps=num_steps, cfg=cfg)
  tok_j = np.asarray(xar_lib.unclusterify(tok_j, 2)).transpose(0, 3, 1, 2)  # NCHW as official
  rows["sample_tokens_max_abs_diff"] = float(np.abs(tok_j - tok_t).max())
  rows["sample_tokens_max_abs"] = float(np.abs(tok_t).max())
  rec = dict(
    what="xAR official parity (small random model, CPU fp32)",
    command=(
      "python experiments/parity_xar_official.py --reference <OliverRensu/xAR checkout> "
      f"--out {out}"
    ),
    reference_commit=git_head(reference),
    small=SMALL,
    sampling=dict(batch=batch, num_steps=num_steps, cfg=cfg, labels=sample_labels.tolist()),
    rows=rows,
    jax=jax.__version__,
    torch=torch.__version__,
    device=str(jax.devices()[0]),
    seconds=round(time.time() - t0, 1),
  )
  return write_rows(out, rec, rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reference", required=True, help="a checkout of OliverRensu/xAR")
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--out", default="experiments/results/parity_xar_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.dump_keys)
  return parity(args.reference, args.out)


if __name__ == "__main__":
  main()
