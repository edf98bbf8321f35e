"""Parity with the official M-VAR code: same random weights -> same logits and greedy samples.

    python experiments/parity_mvar_official.py --reference PATH_TO_OliverRensu_MVAR_CHECKOUT \
        --mamba PATH_TO_state-spaces_mamba_CHECKOUT

Builds the official VQVAE and `MVAR` (models/mvar.py + models/basic_mvar.py) from a checkout of
OliverRensu/MVAR on the CPU with seeded random weights (its code is imported from --reference,
never copied here), converts the state dicts with `arvision.convert.mvar`, and compares, fp32:

- the teacher-forced logits (`MVAR.forward` in training mode, where its attention is the
  per-scale `flash_attn_varlen_func` and Mamba2 runs over the whole sequence; cond drop 0, drop
  path 0);
- greedy (top_k=1) CFG sampling end to end (`MVAR.autoregressive_infer_cfg`, which re-runs each
  block's Mamba2 over the whole prefix at every scale; ours carries the Mamba2 state). Random
  sampling is not compared draw for draw (torch and JAX generators differ).

Substituted in the harness (the official code needs CUDA kernels), nothing else:
- `mamba_ssm.Mamba2` is the real class, `mamba_ssm/modules/mamba2.py` of the --mamba checkout,
  with `use_mem_eff_path=False` (its unfused path: the same in_proj, conv, scan, norm, out_proj;
  the fused path is one CUDA kernel of the same math); its two Triton calls are replaced by
  mamba_ssm's own pure-torch reference functions, read from the same checkout:
  `mamba_chunk_scan_combined` -> `ssd_chunk_scan_combined_ref` (ops/triton/ssd_combined.py, with
  `chunk_state_ref`, `state_passing_ref`, `chunk_scan_ref`; inputs zero-padded to a whole chunk,
  which the reference requires and which does not change the causal outputs), and the gated
  RMSNorm's `rmsnorm_fn` -> `rms_norm_ref` (ops/triton/layernorm_gated.py). `causal_conv1d` is
  absent, so Mamba2 uses its torch `nn.Conv1d` path.
- `flash_attn.flash_attn_func` / `flash_attn_varlen_func`: softmax attention written here with
  torch ops (full attention over the given tokens / block-diagonal over the cu_seqlens segments).
Writes experiments/results/parity_mvar_official.json; `--dump_keys FILE` writes the official
state-dict key -> shape tables that tests/test_convert_mvar.py checks against.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
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

SUBSTITUTIONS = {
  "mamba_ssm.Mamba2": "the real class (mamba_ssm/modules/mamba2.py) with use_mem_eff_path=False",
  "mamba_chunk_scan_combined": "mamba_ssm ssd_chunk_scan_combined_ref (pure torch, same repo)",
  "RMSNormGated rmsnorm_fn": "mamba_ssm rms_norm_ref (pure torch, same repo)",
  "causal_conv1d": "absent: Mamba2's own torch nn.Conv1d path",
  "flash_attn_func": "torch softmax attention over the scale's tokens (written in this script)",
  "flash_attn_varlen_func": "torch block-diagonal softmax attention over cu_seqlens segments "
  "(written in this script)",
}


def _functions(path: str, names, namespace: dict) -> None:
  """Executes the named top-level functions/classes of a source file in `namespace` (only those:
  the file's Triton kernels and imports are never run)."""
  with open(path) as f:
    src = f.read()
  tree = ast.parse(src)
  found = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  missing = [n for n in names if n not in found]
  if missing:
    raise SystemExit(f"{path}: {missing} not found (another mamba_ssm version?)")
  for n in names:
    exec(compile(ast.Module([found[n]], []), path, "exec"), namespace)


def _module(name: str, **attrs) -> types.ModuleType:
  m = types.ModuleType(name)
  m.__dict__.update(attrs)
  sys.modules[name] = m
  return m


def _official_imports(reference: str, mamba: str):
  import einops
  import torch
  import torch.nn.functional as F

  ns = dict(
    torch=torch, F=F, rearrange=einops.rearrange, repeat=einops.repeat, math=__import__("math")
  )
  tri = os.path.join(mamba, "mamba_ssm", "ops", "triton")
  _functions(os.path.join(tri, "layernorm_gated.py"), ["rms_norm_ref"], ns)
  ns["rmsnorm_fn"] = ns["rms_norm_ref"]
  _functions(os.path.join(tri, "layernorm_gated.py"), ["RMSNorm"], ns)
  _functions(os.path.join(tri, "ssd_chunk_state.py"), ["chunk_state_ref"], ns)
  _functions(os.path.join(tri, "ssd_state_passing.py"), ["state_passing_ref"], ns)
  _functions(os.path.join(tri, "ssd_chunk_scan.py"), ["chunk_scan_ref"], ns)
  _functions(os.path.join(tri, "ssd_combined.py"), ["ssd_chunk_scan_combined_ref"], ns)
  ref = ns["ssd_chunk_scan_combined_ref"]

  def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                dt_softplus=False, seq_idx=None, cu_seqlens=None,
                                return_final_states=False, return_varlen_states=False, **kw):  # fmt: skip
    assert seq_idx is None and cu_seqlens is None and not kw
    assert not return_final_states and not return_varlen_states
    L = x.shape[1]
    pad = (-L) % chunk_size
    if pad:  # the reference needs whole chunks; zero tokens after the end change nothing before
      x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
      dt = F.pad(dt, (0, 0, 0, pad))
      z = None if z is None else F.pad(z, (0, 0, 0, 0, 0, pad))
    return ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)[
      :, :L
    ]

  def fused(*a, **k):
    raise AssertionError("the fused CUDA path must not run (use_mem_eff_path=False)")

  for pkg in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.modules",
              "mamba_ssm.distributed"):  # fmt: skip
    _module(pkg, __path__=[])
  _module("mamba_ssm.ops.triton.layernorm_gated", RMSNorm=ns["RMSNorm"])
  _module(
    "mamba_ssm.ops.triton.ssd_combined",
    mamba_chunk_scan_combined=mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined=fused,
  )
  _module(
    "mamba_ssm.distributed.tensor_parallel", ColumnParallelLinear=None, RowParallelLinear=None
  )
  _module("mamba_ssm.distributed.distributed_utils", all_reduce=None, reduce_scatter=None)
  path = os.path.join(mamba, "mamba_ssm", "modules", "mamba2.py")
  spec = importlib.util.spec_from_file_location("mamba_ssm.modules.mamba2", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod
  spec.loader.exec_module(mod)
  assert mod.causal_conv1d_fn is None, "causal_conv1d is installed: its CUDA path would run"

  class Mamba2(mod.Mamba2):
    def __init__(self, *a, **k):
      super().__init__(*a, use_mem_eff_path=False, **k)

  sys.modules["mamba_ssm"].Mamba2 = Mamba2

  def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **kw):
    """q, k, v [B, L, H, c]: full softmax attention over the L tokens."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    attn = (q @ k.transpose(-2, -1) * softmax_scale).softmax(-1)
    return (attn @ v).transpose(1, 2).contiguous()

  def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, **kw):
    """q, k, v [total, H, c]; segment i is rows cu[i]:cu[i+1], attending within itself."""
    out = torch.empty_like(q)
    cu = cu_q.tolist()
    for b, e in zip(cu[:-1], cu[1:], strict=True):
      out[b:e] = flash_attn_func(q[None, b:e], k[None, b:e], v[None, b:e], 0.0, softmax_scale)[0]
    return out

  _module(
    "flash_attn",
    flash_attn_func=flash_attn_func,
    flash_attn_varlen_func=flash_attn_varlen_func,
    flash_attn_qkvpacked_func=None,
  )
  sys.path.insert(0, reference)


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
      elif name.endswith("weight") and p.ndim == 1:  # GroupNorm / RMSNorm scales
        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith("A_log"):  # decays A = -exp(A_log) in the official init range [1, 16]
        p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _official(reference: str, mamba: str, depth: int, l2: bool):
  import torch

  _official_imports(reference, mamba)
  from models import MVAR, VQVAE  # noqa: E402  (the official package)

  for clz in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.GroupNorm):
    clz.reset_parameters = lambda self: None  # every weight is overwritten below
  torch.manual_seed(0)
  patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
              v_patch_nums=patch_nums)  # fmt: skip
  mvar = MVAR(vae, depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.0,
              cond_drop_rate=0.0, attn_l2_norm=l2, patch_nums=patch_nums,
              flash_if_available=False, fused_if_available=False)  # fmt: skip
  _seed_weights(vae, 1)
  _seed_weights(mvar, 2)
  return vae.eval(), mvar


def dump_keys(reference: str, mamba: str, out: str):
  """Official state-dict key -> shape tables: M-VAR-d16 (attn_l2_norm=False, the README's
  setting for d16/d20), d12 (attn_l2_norm=True, the default) and a small M-VAR (depth 2, width 128)."""
  import torch

  _official_imports(reference, mamba)
  from models import MVAR, VQVAE

  for clz in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.GroupNorm):
    clz.reset_parameters = lambda self: None  # shapes only: skip the (slow) default init
  tables = {}
  vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4, test_mode=True)
  kw = dict(flash_if_available=False, fused_if_available=False)
  for name, depth, l2 in (("mvar_d16", 16, False), ("mvar_d12", 12, True)):
    m = MVAR(vae, depth=depth, embed_dim=64 * depth, num_heads=depth, attn_l2_norm=l2, **kw)
    tables[name] = {k: list(v.shape) for k, v in m.state_dict().items()}
    tables[name + "_params"] = int(sum(p.numel() for p in m.parameters()))
    del m
  small = VQVAE(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 4))
  m = MVAR(small, num_classes=10, depth=2, embed_dim=128, num_heads=2, patch_nums=(1, 2, 4),
           attn_l2_norm=True, **kw)  # fmt: skip
  tables["mvar_small"] = {k: list(v.shape) for k, v in m.state_dict().items()}
  with open(out, "w") as f:
    json.dump(tables, f, indent=0, sort_keys=True)
  print(f"wrote {out}: " + ", ".join(k for k in tables))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dump_keys", default="", help="only write the official key/shape tables here")
  ap.add_argument("--reference", required=True, help="a checkout of OliverRensu/MVAR")
  ap.add_argument("--mamba", required=True, help="a checkout of state-spaces/mamba (mamba_ssm)")
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--attn_l2_norm", type=int, default=1)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--out", default="experiments/results/parity_mvar_official.json")
  args = ap.parse_args()
  if args.dump_keys:
    return dump_keys(args.reference, args.mamba, args.dump_keys)
  import torch

  from arvision import families
  from arvision.convert import common
  from arvision.convert import mvar as cm
  from arvision.convert import var as cv

  torch.set_grad_enabled(False)
  t0 = time.time()
  vae, mvar = _official(args.reference, args.mamba, args.depth, bool(args.attn_l2_norm))
  mvar_sd = common.unwrap_state_dict(mvar.state_dict())
  tok_params, tok_config = cv.convert_vae(common.unwrap_state_dict(vae.state_dict()))
  config = cm.mvar_config(mvar_sd)
  with config.unlocked():
    config.tokenizer.config = tok_config
    config.model.attn_impl = "xla"
  params = {**cm.convert_mvar(mvar_sd, config), "tokenizer": tok_params}
  tok = families.build(tok_config)
  fam = families.build(config, tokenizer=tok)
  rows = {}

  # Ground-truth tokens of random images (the tokenizer's own parity is parity_var_official).
  rng = np.random.default_rng(0)
  img = rng.uniform(-1, 1, (args.batch, 3, 32, 32)).astype(np.float32)
  img = torch.nn.functional.interpolate(torch.from_numpy(img), size=(256, 256), mode="bilinear")
  idx_t = vae.img_to_idxBl(img)
  labels = np.arange(args.batch) * 7 % 1000
  x_in = vae.quantize.idxBl_to_var_input(idx_t)

  # 1. teacher-forced logits (training-mode forward: per-scale attention, Mamba2 over all)
  mvar.train()
  lg_t = mvar(torch.from_numpy(labels), x_in).numpy()
  mvar.eval()
  lg_j = np.asarray(fam.apply(params, jnp.asarray(labels), jnp.asarray(x_in.numpy())))
  rows["logits_max_abs_diff"] = float(np.abs(lg_j - lg_t).max())
  rows["logits_max_abs"] = float(np.abs(lg_t).max())
  rows["logits_argmax_agreement"] = float(np.mean(lg_j.argmax(-1) == lg_t.argmax(-1)))

  # 2. greedy CFG sampling (top_k=1): the official re-runs Mamba over the prefix, ours the state
  s_t = mvar.autoregressive_infer_cfg(
    args.batch, torch.from_numpy(labels), g_seed=0, cfg=1.5, top_k=1, top_p=0.0
  )
  s_t = np.round(s_t.numpy().transpose(0, 2, 3, 1) * 255).astype(np.int32)
  s_j = fam.sample(params, jnp.asarray(labels), jax.random.key(0), cfg=1.5, top_k=1, top_p=0.0)
  diff = np.abs(np.asarray(s_j).astype(np.int32) - s_t)
  rows["greedy_sample_max_abs_diff_uint8"] = int(diff.max())
  rows["greedy_sample_mean_abs_diff_uint8"] = float(diff.mean())

  n_ours = int(
    sum(np.size(x) for k, x in common.flatten(params).items() if not k.startswith("tokenizer"))
  )
  result = dict(
    what=(
      "arvision M-VAR vs official OliverRensu/MVAR, same random weights, CPU fp32; CUDA kernels "
      "substituted as listed in `substituted`"
    ),
    substituted=SUBSTITUTIONS,
    depth=args.depth,
    attn_l2_norm=bool(args.attn_l2_norm),
    batch=args.batch,
    official_mvar_params=int(sum(p.numel() for p in mvar.parameters())),
    arvision_mvar_params=n_ours,
    results=rows,
    seconds=round(time.time() - t0, 1),
    command=(
      "python experiments/parity_mvar_official.py --reference <OliverRensu/MVAR checkout> "
      f"--mamba <state-spaces/mamba checkout> --depth {args.depth} "
      f"--attn_l2_norm {args.attn_l2_norm} --batch {args.batch}"
    ),
    reference_commit=_commit(args.reference),
    mamba_commit=_commit(args.mamba),
    device=str(jax.devices()[0]),
    versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
  )
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)


def _commit(path: str) -> str:
  return subprocess.run(
    ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
  ).stdout.strip()


if __name__ == "__main__":
  main()
