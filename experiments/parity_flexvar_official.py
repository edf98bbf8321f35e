"""Parity with the official FlexVAR code: same random weights -> same codes, inputs, logits, samples.

    python experiments/parity_flexvar_official.py --reference PATH_TO_jiaosiyu1999_FlexVAR_CHECKOUT

Builds the official FlexVAE (LlamaGen VQ-16, 8912 x 32 l2-normalised codebook) and a FlexVAR
transformer from a checkout of jiaosiyu1999/FlexVAR on the CPU with seeded random weights (its
code is imported from --reference, never copied here), converts their state dicts with
`arvision.convert.flexvar`, and compares, for the default 10-scale list and a list the official
trainer can draw (one that ends below 16 after its 680-token cap):
- the FlexVAE encode: per-scale codes and teacher inputs of the official
  `VARTrainer.encode_var_wo_firstL` vs arvision's padded training path (`padded_targets`);
- the FlexVAE decode of the last scale's codes (`vae.decode_code`);
- teacher-forced logits (`FlexVAR.forward(label, x, patch_nums)` vs `padded_logits`, fp32);
- greedy (top_k=1) CFG sampling end to end (`autoregressive_infer_cfg`) for the default list and
  an unseen one that extrapolates past the training side (1, 2, 4, 8, 12, 16, 20).
No op is replaced: on CPU the official attention is `F.scaled_dot_product_attention` (flash-attn
and xformers absent). The trainer's logging/AMP helpers (`utils.misc`, `utils.amp_sc`, which need
packages unrelated to the math) are stubbed so that `trainer.py` imports.
Writes experiments/results/parity_flexvar_official.json.
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

DEFAULT = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DRAWN = (1, 2, 3, 5, 7, 9, 10, 12, 14)  # a gen_curr_patch_nums draw after the 680 cap dropped 16
UNSEEN = (1, 2, 4, 8, 12, 16, 20)


def _official_imports(reference: str):
  sys.path.insert(0, reference)
  for name, attrs in (
    ("utils.amp_sc", ("AmpOptimizer",)),
    ("utils.misc", ("MetricLogger", "TensorboardLogger")),
  ):
    mod = types.ModuleType(name)
    for a in attrs:
      setattr(mod, a, type(a, (), {}))
    sys.modules.setdefault(name, mod)


def _official(reference: str, depth: int, vocab: int, vae_ch: int):
  import torch

  _official_imports(reference)
  from models.flexvar import FlexVAR  # noqa: E402  (the official package)
  from models.vq_llama import Decoder, Encoder, VQ_models  # noqa: E402

  torch.manual_seed(0)
  vae = VQ_models["VQ-16"](codebook_size=vocab, codebook_embed_dim=32)
  if vae_ch != 128:  # the same official Encoder/Decoder classes at another base width (CPU time)
    mult, z = vae.config.encoder_ch_mult, vae.config.z_channels
    vae.encoder = Encoder(ch=vae_ch, ch_mult=mult, z_channels=z)
    vae.decoder = Decoder(ch=vae_ch, ch_mult=vae.config.decoder_ch_mult, z_channels=z)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # seeded fan-in scaled random weights, so every layer is exercised
    for name, p in vae.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      elif name.endswith("weight"):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  var = FlexVAR(
    vae_local=vae,
    num_classes=1000,
    depth=depth,
    embed_dim=64 * depth,
    num_heads=depth,
    drop_path_rate=0.0,
    attn_l2_norm=True,
    flash_if_available=False,
    fused_if_available=False,
  )
  var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=0.02, init_std=-1)
  var.cond_drop_rate = 0.0
  return vae.eval(), var.eval()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reference", required=True, help="a checkout of jiaosiyu1999/FlexVAR")
  ap.add_argument("--depth", type=int, default=16)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--vocab", type=int, default=8912, help="FlexVAE codebook (official 8912)")
  ap.add_argument(
    "--vae_ch", type=int, default=128, help="FlexVAE base width (official 128; a multiple of 32)"
  )
  ap.add_argument("--out", default="experiments/results/parity_flexvar_official.json")
  args = ap.parse_args()
  import torch

  from arvision import config_util, families
  from arvision.convert import common
  from arvision.convert import flexvar as cf

  torch.set_grad_enabled(False)
  t0 = time.time()
  vae, var = _official(args.reference, args.depth, args.vocab, args.vae_ch)
  from trainer import VARTrainer  # noqa: E402  (official)

  tok_params, tok_config = cf.convert_flexvae(common.unwrap_state_dict(vae.state_dict()))
  sd = common.unwrap_state_dict(var.state_dict())
  config = cf.flexvar_config(sd, tok_config)
  with config.unlocked():
    config.model.attn_impl = "xla"
  params = {**cf.convert_flexvar(sd, config), "tokenizer": tok_params}
  tok = families.build(tok_config)
  fam = families.build(config, tokenizer=tok)
  del config_util
  rows = {}

  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32)
  img = torch.nn.functional.interpolate(torch.from_numpy(img), size=(256, 256), mode="bilinear")
  img_j = jnp.asarray(img.numpy().transpose(0, 2, 3, 1))
  labels = np.arange(args.batch) * 7 % 1000
  trainer = types.SimpleNamespace(vae_local=vae)
  for name, pns in (("default", DEFAULT), ("drawn", DRAWN)):
    r = rows[name] = {"patch_nums": list(pns)}
    quant_t, idx_t = VARTrainer.encode_var_wo_firstL(trainer, img, list(pns))
    quant_t, idx_t = quant_t.numpy(), idx_t.numpy()
    lay = fam.layout(np.asarray(pns + (0,) * (fam.draw.slots - len(pns)), np.int32))
    n = int(lay["total"])
    idx_j, teacher_j = fam.padded_targets(tok_params, img_j, lay)
    idx_j, teacher_j = np.asarray(idx_j), np.asarray(teacher_j)
    r["codes_agreement"] = float(np.mean(idx_j[:, :n] == idx_t))
    r["teacher_input_max_abs_diff"] = float(np.abs(teacher_j[:, 1:n] - quant_t).max())
    r["teacher_input_max_abs"] = float(np.abs(quant_t).max())
    # teacher-forced logits on the official inputs
    lg_t = var(torch.from_numpy(labels), torch.from_numpy(quant_t), list(pns)).numpy()
    x = np.zeros(teacher_j.shape, np.float32)
    x[:, 1:n] = quant_t
    lg_j = np.asarray(fam.padded_logits(params, jnp.asarray(labels), jnp.asarray(x), lay))[:, :n]
    r["logits_max_abs_diff"] = float(np.abs(lg_j - lg_t).max())
    r["logits_max_abs"] = float(np.abs(lg_t).max())
    r["logits_argmax_agreement"] = float(np.mean(lg_j.argmax(-1) == lg_t.argmax(-1)))
    # decode of the last scale's (official) codes
    pn = pns[-1]
    last = torch.from_numpy(idx_t[:, n - pn * pn : n])
    im_t = vae.decode_code(last, shape=[args.batch, 32, pn, pn]).numpy().transpose(0, 2, 3, 1)
    h = np.asarray(tok.codebook(tok_params))[idx_t[:, n - pn * pn : n]].reshape(-1, pn, pn, 32)
    im_j = np.asarray(
      tok.module.apply({"params": tok_params["ae"]}, jnp.asarray(h), method="decode")
    )
    r["decode_max_abs_diff"] = float(np.abs(im_j - im_t).max())

  for name, pns in (("sample_default", DEFAULT), ("sample_unseen_extrapolated", UNSEEN)):
    s_t = var.autoregressive_infer_cfg(
      vae,
      args.batch,
      torch.from_numpy(labels),
      list(pns),
      g_seed=0,
      cfg=2.5,
      top_k=1,
      top_p=0.0,
      max_pn=16,
    )
    s_t = s_t.clamp(-1, 1).numpy().transpose(0, 2, 3, 1)
    s_t = np.round((s_t + 1) * 0.5 * 255).astype(np.int32)
    s_j = fam.sample(
      params, jnp.asarray(labels), jax.random.key(0), cfg=2.5, top_k=1, top_p=0.0, patch_nums=pns
    )
    diff = np.abs(np.asarray(s_j).astype(np.int32) - s_t)
    rows[name] = dict(
      patch_nums=list(pns),
      image_side=int(s_t.shape[1]),
      greedy_sample_max_abs_diff_uint8=int(diff.max()),
      greedy_sample_mean_abs_diff_uint8=float(diff.mean()),
    )

  result = dict(
    what="arvision FlexVAR/FlexVAE vs official jiaosiyu1999/FlexVAR, same random weights, CPU fp32",
    command="python experiments/parity_flexvar_official.py --reference <FlexVAR checkout> "
    + " ".join(f"--{k} {getattr(args, k)}" for k in ("depth", "batch", "vocab", "vae_ch")),
    depth=args.depth,
    batch=args.batch,
    vocab=args.vocab,
    vae_ch=args.vae_ch,
    official_flexvar_params=int(sum(p.numel() for p in var.parameters())),
    arvision_flexvar_params=int(
      sum(np.size(x) for k, v in params.items() if k != "tokenizer" for x in jax.tree.leaves(v))
    ),
    results=rows,
    replaced_ops="none (CPU attention is torch SDPA; trainer logging/AMP helpers stubbed)",
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
