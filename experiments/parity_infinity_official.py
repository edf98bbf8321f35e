"""Parity with the official Infinity transformer: same random weights and text -> same bit logits
and greedy samples.

    python experiments/parity_infinity_official.py --reference PATH_TO_FoundationVision_Infinity \
        --out experiments/results/parity_infinity_official.json

Builds the official `Infinity` (infinity/models/infinity.py, imported from --reference, never
copied) on the CPU with the released inference settings (`tools/run_infinity.py load_infinity`:
shared AdaLN, cosine attention, bit labels, `rope2d_each_sa_layer=1`,
`rope2d_normalized_by_hw=2`, lvl embedding only before the first block, fused AdaLN norm,
`pad_to_multiplier=128`, block chunks) at a small size, fills every parameter with seeded random
values, converts the state dict with `arvision.convert.infinity` and compares, fp32, on random text
features of different lengths:

- the teacher-forced bit logits `[B, L, 2d]` (official `Infinity.forward`, the training path) on a
  random teacher input, over the 0.06M 1:1 schedule (1, 2, 4, 6, 8, 12, 16; L = 521) whose RoPE
  positions are stretched onto the 1M grid (64 x 64), as the released model;
- greedy sampling end to end (official `autoregressive_infer_cfg`, `cfg_insertion_layer=[0]`,
  top_k=1 per bit, cfg 3, tau 1 and tau 0.5): the bits drawn at every scale, the final summed
  codes, and the guided logits of every scale.

Replaced in the harness, nothing else: flash-attn (CUDA only), whose two functions the model calls
are written here with torch ops (`flash_attn_varlen_kvpacked_func`: softmax attention per packed
sequence; `flash_attn_func` is unused without `--flash`); the official cross-attention casts its
fp32 inputs to bfloat16 only because flash-attn has no fp32 kernel, so `basic.py` sees a `torch`
whose `bfloat16` is float32 (the comparison is fp32 throughout); timm's `register_model` /
`DropPath` (drop path 0) and `SoftTargetCrossEntropy` (unused) by stand-ins (timm needs
torchvision); `torch.compile` of the fused norm is disabled (it runs eagerly); the BSQ VAE by what
the official sampler calls on it: `indices_to_codes(bits)` = (2 bits - 1) / sqrt(d) (BSQ codes,
l2-normed) and `decode`, which records the summed codes. Our side steps with the BSQ tokenizer's own
`arvision.tokenizers.bsq.next_input` (no VAE weights are involved in either).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import types

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the fused norm's torch.compile runs eagerly

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

SCHEDULE = (1, 2, 4, 6, 8, 12, 16)  # official dynamic_resolution_h_w[1.0]["0.06M"]
ROPE_GRID = 64  # the last scale of the 1M schedule at 1:1


def _official_imports(reference: str):
  import torch

  def varlen_kvpacked(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0,
                      softmax_scale=None):  # fmt: skip
    """flash-attn's packed variable-length attention, fp32 torch ops: q [Nq, H, c], kv [Nk, 2, H,
    c]; sequence b is q[cu_q[b]:cu_q[b+1]] against kv[cu_k[b]:cu_k[b+1]]."""
    outs = []
    for b in range(len(cu_seqlens_q) - 1):
      qb = q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]].transpose(0, 1)  # H, lq, c
      kb, vb = kv[cu_seqlens_k[b] : cu_seqlens_k[b + 1]].unbind(1)
      att = (qb @ kb.permute(1, 2, 0)) * softmax_scale
      outs.append((att.softmax(-1) @ vb.transpose(0, 1)).transpose(0, 1))
    return torch.cat(outs, 0)

  def flash_attn_func(*args, **kwargs):
    raise NotImplementedError("flash_attn_func is used only with --flash (customized kernels)")

  fa = types.ModuleType("flash_attn")
  fa.flash_attn_func = flash_attn_func
  fa.flash_attn_varlen_kvpacked_func = varlen_kvpacked
  sys.modules["flash_attn"] = fa

  class DropPath(torch.nn.Module):
    def __init__(self, p=0.0):
      super().__init__()

    def forward(self, x):
      return x

  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  loss = types.ModuleType("timm.loss")
  models.register_model = lambda f: f
  layers.DropPath, layers.drop_path = DropPath, None
  loss.SoftTargetCrossEntropy = type("SoftTargetCrossEntropy", (torch.nn.Module,), {})
  timm.models, models.layers, timm.loss = models, layers, loss
  sys.modules.update(
    {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.loss": loss}
  )
  sys.path.insert(0, reference)
  import infinity.models.basic as basic

  fp32_torch = types.ModuleType("torch")
  fp32_torch.__getattr__ = lambda name: getattr(torch, name)
  fp32_torch.bfloat16 = torch.float32
  basic.torch = fp32_torch
  import infinity.models.infinity as official

  return official


class StubVAE:
  """What the official sampler reads from its VAE (`vae_type != 0`, bit labels)."""

  def __init__(self, bits: int):
    import torch

    self.embed_dim, self.vocab_size = bits, 2**bits
    lfq = types.SimpleNamespace(mask=2 ** torch.arange(bits - 1, -1, -1))
    lfq.indices_to_codes = self.indices_to_codes
    self.quantizer = types.SimpleNamespace(lfq=lfq, z_interplote_up="trilinear")
    self.bits, self.summed = bits, None

  def indices_to_codes(self, idx_Bthwd, label_type="bit_label"):
    assert label_type == "bit_label"
    codes = (idx_Bthwd.float() * 2 - 1) / math.sqrt(self.bits)
    return codes.permute(0, 4, 1, 2, 3)  # [B, d, t, h, w]

  def decode(self, summed_Bdhw):
    import torch

    self.summed = summed_Bdhw.clone()
    B, _, h, w = summed_Bdhw.shape
    return torch.zeros(B, 3, h, w)


class CodesTokenizer:
  """Our side: the BSQ tokenizer's sampling step (`arvision.tokenizers.bsq.next_input`: codes
  added to the running sum with the official trilinear-on-one-frame resize), without a VAE."""

  def __init__(self, bits: int, patch_nums):
    self.config = mlc.ConfigDict(dict(model=dict(patch_nums=tuple(patch_nums), embed_dim=bits)))
    self.patch_nums = tuple(patch_nums)

  def bsq_next_input(self, params, si, cum, bits):
    from arvision.tokenizers import bsq

    del params
    return bsq.next_input(si, cum, bits, self.patch_nums)

  def _unused(self, *a, **k):
    raise NotImplementedError

  flip_requant = decode_fhat = _unused


def _seed_weights(module, seed: int):
  """Seeded random values for every parameter (biases and AdaLN tables included)."""
  import torch

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("scale_mul_1H11"):
        p.copy_(math.log(4.0) + 0.3 * torch.randn(p.shape, generator=g))
      elif (
        p.ndim >= 2 and "embed" not in name and "pos_start" not in name and "ada_gss" not in name
      ):
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
      elif name.endswith(("norm.weight", "ca_norm.weight")):
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.2 * torch.randn(p.shape, generator=g))


def official_greedy(model, vae, sched3, text_tuple, B: int, cfg: float, tau: float):
  """Runs the official sampler greedily (top_k=1 per bit); returns the raw logits of every
  scale (`get_logits`, both CFG halves, before tau) and the bits it drew."""
  import torch

  raw, bits = [], []
  get_logits, to_codes = model.get_logits, vae.quantizer.lfq.indices_to_codes

  def recording_logits(h, c):
    raw.append(get_logits(h, c))
    return raw[-1]

  def recording_codes(idx, label_type):
    bits.append(idx.clone())
    return to_codes(idx, label_type)

  model.get_logits, vae.quantizer.lfq.indices_to_codes = recording_logits, recording_codes
  try:
    with torch.no_grad():
      model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=sched3, label_B_or_BLT=text_tuple, B=B, g_seed=0,
        cfg_list=[cfg] * len(sched3), tau_list=[tau] * len(sched3), top_k=1, top_p=0.0,
        returns_vemb=1, cfg_insertion_layer=[0], vae_type=32, ret_img=True, inference_mode=True,
      )  # fmt: skip
  finally:
    model.get_logits, vae.quantizer.lfq.indices_to_codes = get_logits, to_codes
  return raw, bits


def build_official(official, args):
  import torch

  torch.manual_seed(0)
  model = official.Infinity(
    vae_local=StubVAE(args.bits), text_channels=args.text_dim, text_maxlen=args.text_maxlen,
    shared_aln=True, raw_scale_schedule=None, checkpointing=None, customized_flash_attn=False,
    fused_norm=True, pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1,
    use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="0.06M",
    apply_spatial_patchify=0, inference_mode=True, train_h_div_w_list=[1.0], depth=args.depth,
    embed_dim=args.width, num_heads=args.heads, mlp_ratio=4, drop_path_rate=0.0,
    block_chunks=args.block_chunks, cond_drop_rate=0.0,
  )  # fmt: skip
  _seed_weights(model, 1)
  return model.eval()


def ours(state_dict: dict, args):
  from arvision.convert import infinity as conv
  from arvision.models import infinity as inf

  config = mlc.ConfigDict(
    dict(
      family="infinity",
      data=dict(num_classes=1),
      model=dict(
        depth=args.depth,
        width=args.width,
        num_heads=args.heads,
        text_dim=args.text_dim,
        text_maxlen=args.text_maxlen,
        cond="text",
        rope_mode=2,
        rope_grid=ROPE_GRID,
        mlp_ratio=4.0,
        drop_path_rate=0.0,
        cond_drop_rate=0.0,
        attn_impl="xla",
        dtype="float32",
      ),  # fmt: skip
    )
  )
  family = inf.InfinityFamily(config, CodesTokenizer(args.bits, SCHEDULE))
  params = conv.convert_infinity(state_dict, config, family=family)
  return family, jax.tree.map(jnp.asarray, params)


def dump_keys(official, args, out: str):
  """Official state-dict key -> shape tables for tests/test_convert_infinity.py: Infinity-2B
  (`tools/run_infinity.py` `infinity_2b`: 8 block chunks, Ct5 2048, text_maxlen 512, d 32; built on
  the meta device, shapes only) and the small model of this script."""
  import torch

  tables = {
    "small": {k: list(v.shape) for k, v in build_official(official, args).state_dict().items()}
  }
  two_b = argparse.Namespace(**{**vars(args), "bits": 32, "text_dim": 2048, "text_maxlen": 512})
  init, linspace, tensor = torch.nn.init.trunc_normal_, torch.linspace, torch.tensor
  torch.nn.init.trunc_normal_ = lambda t, *a, **k: t  # meta tensors: shapes only
  # the constructor reads these with .item(): keep them on the CPU
  torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
  torch.tensor = lambda *a, **k: tensor(*a, **{"device": "cpu", **k})
  with torch.device("meta"):
    model = official.Infinity(
      vae_local=StubVAE(32), text_channels=2048, text_maxlen=512, shared_aln=True,
      raw_scale_schedule=None, checkpointing=None, customized_flash_attn=False, fused_norm=True,
      pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1,
      use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="1M",
      apply_spatial_patchify=0, inference_mode=True, train_h_div_w_list=[1.0], depth=32,
      embed_dim=2048, num_heads=16, mlp_ratio=4, drop_path_rate=0.1, block_chunks=8,
    )  # fmt: skip
  torch.nn.init.trunc_normal_, torch.linspace, torch.tensor = init, linspace, tensor
  del two_b
  tables["infinity_2b"] = {k: list(v.shape) for k, v in model.state_dict().items()}
  tables["infinity_2b_params"] = int(sum(p.numel() for p in model.parameters()))
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: small ({len(tables['small'])} keys), 2b ({len(tables['infinity_2b'])} keys)")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--reference", required=True, help="a checkout of FoundationVision/Infinity")
  ap.add_argument("--out", default="experiments/results/parity_infinity_official.json")
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--block_chunks", type=int, default=2)
  ap.add_argument("--width", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--bits", type=int, default=16)
  ap.add_argument("--text_dim", type=int, default=256)
  ap.add_argument("--text_maxlen", type=int, default=12)
  ap.add_argument("--text_lens", default="7,3", help="text tokens of each example")
  args = ap.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  import torch

  t0 = time.time()
  official = _official_imports(args.reference)
  if args.dump_keys:
    dump_keys(official, args, args.dump_keys)
    return
  model = build_official(official, args)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  family, params = ours(sd, args)
  lens = [int(x) for x in args.text_lens.split(",")]
  B, T, K, d = len(lens), max(lens), args.text_dim, args.bits
  g = torch.Generator().manual_seed(5)
  text_BTK = torch.randn(B, T, K, generator=g)
  for b, n in enumerate(lens):
    text_BTK[b, n:] = 0
  kv_compact = torch.cat([text_BTK[b, :n] for b, n in enumerate(lens)], 0)
  cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
  text_tuple = (kv_compact, lens, cu, T)
  text_j, lens_j = jnp.asarray(text_BTK.numpy()), jnp.asarray(lens, jnp.int32)
  sched3 = [(1, p, p) for p in SCHEDULE]
  L = sum(p * p for p in SCHEDULE)
  rows = {}

  # 1. Teacher-forced logits.
  x_wo = torch.randn(B, L - 1, d, generator=g) / math.sqrt(d)
  with torch.no_grad():
    ref = model(text_tuple, x_wo.clone(), scale_schedule=sched3).numpy()
  got = np.asarray(
    family.apply(params, None, text_j, lens_j, jnp.asarray(x_wo.numpy()), train=False)
  )
  rows["teacher_forced"] = dict(
    logits_shape=list(ref.shape),
    max_abs_err=float(np.max(np.abs(ref - got))),
    max_abs_logit=float(np.max(np.abs(ref))),
    bit_argmax_agreement=float(
      np.mean(ref.reshape(B, L, d, 2).argmax(-1) == got.reshape(B, L, d, 2).argmax(-1))
    ),
  )

  # 2. Greedy sampling (top_k=1 per bit), CFG on logits.
  def argmax_pick(k, lg, top_k, top_p):
    del k, top_k, top_p
    return jnp.argmax(lg, axis=-1).astype(jnp.int32)

  vae = StubVAE(d)
  for cfg, tau in ((3.0, 1.0), (3.0, 0.5)):
    raw, bits_rec = official_greedy(model, vae, sched3, text_tuple, B, cfg, tau)
    f_hat, bits, logits = family.decode_steps(
      params, (None, text_j, lens_j), jax.random.key(0),
      (jnp.float32(cfg), jnp.float32(tau), jnp.int32(1), jnp.float32(0.0)), argmax_pick,
      return_logits=True,
    )  # fmt: skip
    per_scale, first_diff = [], None
    for si, p in enumerate(SCHEDULE):
      ref_bits = bits_rec[si].reshape(B, p * p, d).numpy()
      agree = float(np.mean(ref_bits == np.asarray(bits[si])))
      r = raw[si].numpy() / tau
      ref_lg = cfg * r[:B] + (1 - cfg) * r[B:]
      err = float(np.max(np.abs(ref_lg.reshape(B, p * p, d, 2) - np.asarray(logits[si]))))
      per_scale.append(dict(side=p, bit_agreement=agree, guided_logits_max_abs_err=err))
      if agree < 1.0 and first_diff is None:
        first_diff = si
    ref_fhat = vae.summed.permute(0, 2, 3, 1).numpy()
    rows[f"greedy_cfg{cfg:g}_tau{tau:g}"] = dict(
      bit_agreement=float(np.mean([s["bit_agreement"] for s in per_scale])),
      all_bits_equal=first_diff is None,
      first_scale_with_a_different_bit=first_diff,
      summed_codes_max_abs_err=float(np.max(np.abs(ref_fhat - np.asarray(f_hat)))),
      per_scale=per_scale,
    )

  from arvision.convert import common

  result = dict(
    what=(
      "arvision Infinity transformer vs official FoundationVision/Infinity, same random weights "
      "and random text features, CPU fp32; flash-attn replaced by fp32 torch attention, the BSQ VAE "
      "by BSQ codes of bits"
    ),
    config=dict(
      depth=args.depth,
      block_chunks=args.block_chunks,
      width=args.width,
      heads=args.heads,
      bits=d,
      text_dim=K,
      text_maxlen=args.text_maxlen,
      text_lens=lens,
      scale_schedule=SCHEDULE,
      rope_grid=ROPE_GRID,
      rope2d_normalized_by_hw=2,
      seq_len=L,
    ),  # fmt: skip
    official_params=int(sum(p.numel() for p in model.parameters())),
    arvision_params=int(sum(np.size(x) for x in common.flatten(params).values())),
    results=rows,
    seconds=round(time.time() - t0, 1),
    command=(
      "python experiments/parity_infinity_official.py --reference <FoundationVision/Infinity "
      f"checkout> --depth {args.depth} --block_chunks {args.block_chunks} --width {args.width} "
      f"--heads {args.heads} --bits {d} --text_dim {K} --text_maxlen {args.text_maxlen} "
      f"--text_lens {args.text_lens}"
    ),
    reference_commit=subprocess.run(
      ["git", "-C", args.reference, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip(),
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
