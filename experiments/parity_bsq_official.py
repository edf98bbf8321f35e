"""Parity with Infinity's BSQ tokenizer: same random weights -> same features, bits, inputs, images.

    python experiments/parity_bsq_official.py --reference PATH_TO_FoundationVision_Infinity_CHECKOUT

Builds the official BSQ VAE (`infinity/models/bsq_vae/vae.py::vae_model`, the `infinity_vae_d32`
architecture: base width 128, ch_mult 1,2,4,4,4, 32 bits, no attention) from a checkout of
FoundationVision/Infinity on the CPU with seeded random weights (its code is imported from
--reference, never copied here), converts its state dict with `arvision convert infinity_vae`'s
converter, and compares on the same images, CPU fp32:
- the encoder features (`encode_for_raw_features`);
- the bits of every scale given the *official* features (exact agreement expected) against both
  official paths: the VAE's `MultiScaleBSQ.forward` (`vae.encode`) and the transformer's
  `BitwiseSelfCorrection.flip_requant`; and end to end from our own features (agreement fraction:
  a feature within float error of 0 may take the other sign);
- the transformer's teacher input (`x_BLC_wo_prefix`) and the summed codes;
- bitwise self-correction with flips: the official random draws are replaced by given ones
  (the same uniform tensor and rate reach both sides), targets and inputs compared;
- the reconstruction of the official bits (`decode_from_indices`) and of ours (max abs error).
The official package `__init__`s (which import the transformer, timm, flash-attn) are skipped, and
`imageio`/`torchvision` (imported by `flux_vqgan.py`, unused by the math) are stubbed. No op is
replaced. Writes experiments/results/parity_bsq_official.json.
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

SCALES_256 = (1, 2, 4, 6, 8, 12, 16)  # the official 1:1 schedule of a 16x16 latent


def _official_imports(reference: str):
  """Import `infinity.models.bsq_vae.*` and `bitwise_self_correction` without the package
  `__init__`s (they import the transformer and timm)."""
  sys.path.insert(0, reference)
  for name in ("infinity", "infinity.models"):
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(reference, *name.split("."))]
    sys.modules.setdefault(name, mod)
  for name in ("imageio", "torchvision", "torchvision.transforms"):
    sys.modules.setdefault(name, types.ModuleType(name))
  import infinity.models.bitwise_self_correction as bsc_mod  # noqa: E402
  import infinity.models.bsq_vae.vae as vae_mod  # noqa: E402

  return vae_mod, bsc_mod


def _official_vae(vae_mod, ch: int, bits: int):
  import torch

  make = vae_mod.AutoEncoder
  if ch != 128:  # the same official classes at another base width (CPU time)
    vae_mod.AutoEncoder = lambda args: make(argparse.Namespace(**{**vars(args), "base_ch": ch}))
  torch.manual_seed(0)
  vae = vae_mod.vae_model(None, "dynamic", bits, 2**bits, patch_size=16)
  vae_mod.AutoEncoder = make
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # seeded fan-in scaled random weights, so every layer is exercised
    for name, p in vae.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      elif name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return vae.eval()


class _Draws:
  """Stands in for `torch` / `np` inside the official BSC module: `torch.rand` returns the given
  uniforms and `np.random.randint` the given rate (in percent), everything else is the real one."""

  def __init__(self, real, **over):
    self._real, self._over = real, over

  def __getattr__(self, name):
    return self._over.get(name, getattr(self._real, name))


def _bits_nhwc(t):
  """Official bit indices [B, 1, h, w, d] -> [B, h*w, d] int32."""
  t = t.numpy()
  return t.reshape(t.shape[0], -1, t.shape[-1]).astype(np.int32)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reference", required=True, help="a checkout of FoundationVision/Infinity")
  ap.add_argument("--ch", type=int, default=128, help="VAE base width (official 128)")
  ap.add_argument("--bits", type=int, default=32, help="d (official infinity_vae_d32: 32)")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--flip_layers", type=int, default=3, help="BSC: flipped scales")
  ap.add_argument("--flip_rate", type=int, default=30, help="BSC: flip rate in percent")
  ap.add_argument("--out", default="experiments/results/parity_bsq_official.json")
  args = ap.parse_args()
  import torch

  from arvision import config_util, families
  from arvision.convert import bsq as cb
  from arvision.convert import common
  from arvision.tokenizers import bsq

  torch.set_grad_enabled(False)
  t0 = time.time()
  vae_mod, bsc_mod = _official_imports(args.reference)
  vae = _official_vae(vae_mod, args.ch, args.bits)
  sd = common.unwrap_state_dict(vae.state_dict())
  config = cb.infer_config(sd, image_size=256)
  assert tuple(config.model.patch_nums) == SCALES_256, config.model.patch_nums
  tok_params, config = cb.convert_vae(sd, config)
  tok = families.build(config)
  schedule = [(1, p, p) for p in SCALES_256]
  sides = [p * p for p in SCALES_256]

  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32)
  img = torch.nn.functional.interpolate(torch.from_numpy(img), size=(256, 256), mode="bilinear")
  img_j = jnp.asarray(img.numpy().transpose(0, 2, 3, 1))
  r = {}

  # encoder features
  h_t = vae.encode_for_raw_features(img, schedule)[0]  # [B, d, 16, 16]
  h_tn = h_t.numpy().transpose(0, 2, 3, 1)
  h_j = np.asarray(tok.encode_f(tok_params, img_j))
  r["features_max_abs_diff"] = float(np.abs(h_j - h_tn).max())
  r["features_max_abs"] = float(np.abs(h_tn).max())

  # bits from the official features: the VAE forward and the transformer's BSC path
  q_out, _, bits_fwd, _, _, _ = vae.quantizer(h_t, scale_schedule=schedule)
  bsc_args = types.SimpleNamespace(
    noise_apply_layers=-1,
    noise_apply_requant=1,
    noise_apply_strength=-1,
    apply_spatial_patchify=0,
    debug_bsc=0,
  )
  bsc = bsc_mod.BitwiseSelfCorrection(vae, bsc_args)
  x_t, gt_t = bsc.flip_requant(schedule, img, h_t, "cpu")
  ours = bsq.requantize(jnp.asarray(h_tn), SCALES_256)
  per_scale = []
  for si, p in enumerate(SCALES_256):
    mine = np.asarray(ours["bits"][si])
    fwd, gt = _bits_nhwc(bits_fwd[si]), gt_t[si].numpy().astype(np.int32)
    per_scale.append(
      dict(
        side=p,
        bits=int(mine.size),
        differing_bits_vs_vae_forward=int(np.sum(mine != fwd)),
        differing_bits_vs_bsc=int(np.sum(mine != gt)),
      )
    )
  r["bits_given_official_features"] = per_scale
  r["bits_exact_vs_vae_forward"] = all(s["differing_bits_vs_vae_forward"] == 0 for s in per_scale)
  r["bits_exact_vs_bsc"] = all(s["differing_bits_vs_bsc"] == 0 for s in per_scale)
  r["teacher_input_max_abs_diff"] = float(np.abs(np.asarray(ours["var_input"]) - x_t.numpy()).max())
  r["teacher_input_max_abs"] = float(np.abs(x_t.numpy()).max())
  r["summed_codes_max_abs_diff"] = float(
    np.abs(np.asarray(ours["f_hat"]) - q_out.numpy().transpose(0, 2, 3, 1)).max()
  )

  # end to end from our own features
  mine_e2e = tok.encode_bits(tok_params, img_j)
  agree = [float(np.mean(np.asarray(a) == gt_t[si].numpy())) for si, a in enumerate(mine_e2e)]
  r["bits_end_to_end_agreement_per_scale"] = agree
  r["bits_end_to_end_differing"] = int(
    sum(np.sum(np.asarray(a) != gt_t[si].numpy()) for si, a in enumerate(mine_e2e))
  )

  # bitwise self-correction with flips: the same draws on both sides
  g = torch.Generator().manual_seed(2)
  uniforms = [torch.rand((args.batch, 1, p, p, args.bits), generator=g) for p in SCALES_256]
  draws = iter(uniforms)
  real_torch, real_np = bsc_mod.torch, bsc_mod.np
  bsc_mod.torch = _Draws(torch, rand=lambda *shape: next(draws))
  bsc_mod.np = _Draws(np, random=_Draws(np.random, randint=lambda lo, hi: args.flip_rate))
  try:
    bsc.noise_apply_layers, bsc.noise_apply_strength = args.flip_layers, 1.0
    x_f, gt_f = bsc.flip_requant(schedule, img, h_t, "cpu")
  finally:
    bsc_mod.torch, bsc_mod.np = real_torch, real_np
  flips = [
    jnp.asarray(u.numpy().reshape(args.batch, -1, args.bits) < args.flip_rate * 0.01)
    for u in uniforms[: args.flip_layers]
  ]
  noisy = bsq.requantize(jnp.asarray(h_tn), SCALES_256, flips)
  r["bsc_flipped_bits"] = int(sum(int(jnp.sum(f)) for f in flips))
  r["bsc_targets_differing_bits"] = int(
    sum(np.sum(np.asarray(a) != gt_f[si].numpy()) for si, a in enumerate(noisy["bits"]))
  )
  r["bsc_teacher_input_max_abs_diff"] = float(
    np.abs(np.asarray(noisy["var_input"]) - x_f.numpy()).max()
  )
  r["bsc_targets_changed_by_flips"] = int(
    sum(np.sum(gt_f[si].numpy() != gt_t[si].numpy()) for si in range(len(sides)))
  )

  # reconstructions
  _, im_t = vae.decode_from_indices(bits_fwd, schedule, "bit_label")
  im_t = im_t.numpy().transpose(0, 2, 3, 1)
  official_bits = [jnp.asarray(_bits_nhwc(b)) for b in bits_fwd]
  im_j = np.asarray(tok.decode_bits(tok_params, official_bits))
  r["reconstruction_max_abs_diff"] = float(np.abs(im_j - im_t).max())
  im_e2e = np.asarray(tok.decode_bits(tok_params, mine_e2e))
  r["reconstruction_end_to_end_max_abs_diff"] = float(np.abs(im_e2e - im_t).max())

  # the released architecture's size (infinity_vae_d32reg: base width 128), built, not run
  if args.ch != 128:
    full = vae_mod.vae_model(None, "dynamic", args.bits, 2**args.bits, patch_size=16)
    official_full = int(sum(p.numel() for p in full.parameters()))
    del full
  else:
    official_full = int(sum(p.numel() for p in vae.parameters()))
  ours_full = families.build(config_util.load_config_file("tokenizer.py:infinity_d32"))
  ours_full = int(sum(np.size(x) for x in jax.tree.leaves(ours_full.abstract_params())))

  result = dict(
    what="arvision BSQ tokenizer vs official FoundationVision/Infinity BSQ VAE, same random "
    "weights, CPU fp32",
    command="python experiments/parity_bsq_official.py --reference <Infinity checkout> "
    + " ".join(
      f"--{k} {getattr(args, k)}" for k in ("ch", "bits", "batch", "flip_layers", "flip_rate")
    ),
    reference_commit=subprocess.run(
      ["git", "-C", args.reference, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip(),
    config=dict(
      ch=args.ch,
      ch_mult=list(config.model.ch_mult),
      bits=args.bits,
      image_size=256,
      scales=list(SCALES_256),
      batch=args.batch,
    ),
    official_vae_params=int(sum(p.numel() for p in vae.parameters())),
    arvision_vae_params=int(sum(np.size(x) for x in jax.tree.leaves(tok_params))),
    official_d32_params_at_width_128=official_full,
    arvision_infinity_d32_params=ours_full,
    results=r,
    replaced_ops="none (imageio/torchvision stubbed: imported, unused; BSC's torch.rand and "
    "np.random.randint given the same draws as ours)",
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
