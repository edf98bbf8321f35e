"""Sampling benchmark for every generator family (VAR, raster/LlamaGen, MAR, HMAR vs VAR).

VAR: images/s of the KV-cache sampler against recomputing the prefix (and the official sampler).
Raster (`--config configs/raster.py:...`): tokens/s and images/s of the static-KV-cache sampler;
  the decode step's achieved memory bandwidth against the device's peak (GPU; batch-1 decoding is
  bound by reading the weights and the KV cache once per token).
MAR (`--config configs/mar.py:...`): images/s against `--num_iter` and `--diffusion_steps`, with
  DiSA (diffusion-step annealing) off and on.
FlexVAR (`--config configs/flexvar.py:...`): images/s and XLA memory bytes against VAR of the same
  size and batch (`configs/var.py:<same variant>`), and with a shorter scale list, in one run.
M-VAR (`--config configs/mvar.py:...`): VAR's KV-cache sampler of the same size, M-VAR carrying
  each block's Mamba2 state across scales (ours) and M-VAR re-running the whole prefix at every
  scale (the official sampler's way; same tokens for the same rng), in one run.
Infinity (`--config configs/infinity.py:...`): against VAR of the same depth, width, heads and
  scale list (`configs/var.py:<same variant>`, overridden in code where the sizes differ; the
  rows' `var_overrides` say which), each with its own config's top-k/top-p, in one run.
Successor rows are timed interleaved (a warm-up call each, then rounds of one call each), with
`speed_over_var` and `xla_bytes_over_var` (XLA's argument + output + temp bytes of the compiled
sampler) against the VAR row of the same batch and cfg.

    python experiments/bench_sampling.py --config configs/var.py:fmnist --batch 1,8 --cfg 0,1.5 \
        --out experiments/results/bench_sampling_cpu.json
    python experiments/bench_sampling.py --preset gpu --reference /path/to/FoundationVision/VAR \
        --out experiments/results/bench_sampling_gpu.json       # VAR-d16, 256px, batch 64, bf16
    python experiments/bench_sampling.py --quick                # seconds: checks the code path
    python experiments/bench_sampling.py --config configs/raster.py:fmnist --batch 1,64 --cfg 3.0
    python experiments/bench_sampling.py --preset gpu_raster    # LlamaGen-L, 256px, bf16, batch 1/64
    python experiments/bench_sampling.py --config configs/mar.py:fmnist --batch 64 \
        --num_iter 8,16 --diffusion_steps 25,50
    python experiments/bench_sampling.py --config configs/flexvar.py:fmnist --batch 64 --cfg 3.0 \
        --runs 5 --out experiments/results/bench_sampling_cpu_flexvar_fmnist.json
    python experiments/bench_sampling.py --config configs/hmar.py:fmnist   # HMAR vs VAR, same depth
    python experiments/bench_sampling.py --config configs/mvar.py:fmnist --batch 1,8 --cfg 3.0 \
        --runs 9 --out experiments/results/bench_sampling_cpu_mvar_fmnist.json
    python experiments/bench_sampling.py --config configs/infinity.py:fmnist --batch 1,8 \
        --cfg 3.0 --runs 9 --out experiments/results/bench_sampling_cpu_infinity_fmnist.json

Random weights of the chosen config (the family's init, the tokenizer config inside the VAR
config; no checkpoint). Implementations, all end to end (class labels -> uint8 images, tokenizer
decode included):
- `kv_cache`: `VARFamily.sample` -- one jitted function, a preallocated KV cache per layer.
- `recompute`: no cache. At scale k the full transformer runs over every token of scales <= k
  under the model's training mask (VAR: `masks.scale_causal(lengths[:k+1])`); the head runs on
  scale k only. One jitted function, static shapes per scale. It draws its randomness exactly as the
  cached sampler, so with the same rng both give the same tokens (tests check this).
- `official`: with `--reference`, FoundationVision/VAR's `autoregressive_infer_cfg` with the same
  depth, width, heads, patch_nums, vocabulary, batch, cfg, top-k and top-p (torch; CUDA when
  available, else CPU), timed in the same run. For configs on `tokenizer.py:var_vae` (d16 ...) the
  official VQVAE is the same architecture as ours; for the small configs it is the official
  VQVAE with our vocabulary/latent width/channels but its fixed 16x decoder (a bigger image), so
  the ratio there includes a decoder that does more work than ours.

Raster and MAR with `--reference` (the LlamaGen or mar checkout): the official token sampler
with the config's sizes and random weights -- LlamaGen `generate` (its gpt-fast KV cache; `n_kv_head`
is left at n_head, its cache has no GQA) and MAR `sample_tokens` (same num_iter, diffusion steps,
cfg, temperature; DiSA off) -- timed in the same run. Its decoder is not timed, so the row's
`ours_over_official_without_decode` divides the official time by ours minus our decoder's median.

    python experiments/bench_sampling.py --config configs/raster.py:fmnist --batch 8 \
        --reference /path/to/FoundationVision/LlamaGen --append --out ...
    python experiments/bench_sampling.py --config configs/mar.py:fmnist --batch 8 --disa 0 \
        --reference /path/to/LTH14/mar --append --out ...     # timm on PYTHONPATH

CFG: both the official sampler and ours ALWAYS run the doubled batch (conditional + null class),
also at cfg=0, so cfg on/off costs the same; the rows show it.

dtype: `bfloat16` casts the transformer weights to bf16 and, like torch autocast, casts the
inputs of its Dense layers to bf16 (a linen method interceptor; the family has no compute-dtype
field). The tokenizer stays float32. The official sampler runs under `torch.autocast(bf16)`.

Times: `block_until_ready` (torch: `cuda.synchronize`), median of `--runs` calls after a warm-up
call; `first_call_s` is the warm-up (trace + compile + one run) and `compile_s` = first_call_s -
median_s. A table is printed and a JSON with device, versions, config and rows is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from arvision import config_util, families
from arvision.models import next_scale
from arvision.models.common import images_to_uint8, param_count
from arvision.models.var import VAR
from arvision.sampling import guidance
from arvision.sampling.topk import filter_top_k_top_p

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_models  # noqa: E402  (the official models, shared with bench_train.py)

PRESETS = {
  # The number the issue asks for on a GPU: VAR-d16 at 256px, batch 64, bf16, cfg 1.5.
  "gpu": dict(config="configs/var.py:d16", batch="64", cfg="1.5", dtype="bfloat16", runs=5),
  # Tiny: exercises every code path in seconds (CPU).
  "quick": dict(config="configs/var.py:smoke", batch="2", cfg="0,1.5", dtype="float32", runs=2),
  # LlamaGen-L (343M) at 256px: batch-1 decoding is memory-bound (bandwidth vs the device peak).
  "gpu_raster": dict(
    config="configs/raster.py:L", batch="1,64", cfg="2.0", dtype="bfloat16", runs=3
  ),
  # MAR-B at 256px: the official eval setting (64 AR steps, 100 diffusion steps) and fewer.
  "gpu_mar": dict(config="configs/mar.py:B", batch="64", cfg="2.9", dtype="bfloat16", runs=3),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------
# Model with random weights


def build(spec, seed: int = 0):
  """`(config, family, params)` for a VAR config spec (or a loaded VAR config), random weights
  (VAR and tokenizer)."""
  config = config_util.load_config_file(spec) if isinstance(spec, str) else spec
  if config.family != "var":
    raise ValueError(f"--config {spec!r} is a {config.family!r} config; this benchmark needs var")
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  k_var, k_tok = jax.random.split(jax.random.key(seed))
  tok_params = tok.init(k_tok, None)
  params = {**fam.init(k_var, None), "tokenizer": {"ae": tok_params["ae"]}}
  return config, fam, params


def cast_params(params: dict, dtype) -> dict:
  """Transformer weights to `dtype`; the tokenizer stays float32."""
  var = {k: v for k, v in params.items() if k != "tokenizer"}
  var = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, var)
  return {**var, "tokenizer": params["tokenizer"]}


def _inside(module, cls) -> bool:
  while module is not None:
    if isinstance(module, cls):
      return True
    module = module.parent if isinstance(module.parent, nn.Module) else None
  return False


@contextlib.contextmanager
def compute_dtype(dtype, cls=VAR):
  """Autocast analogue: inputs of the Dense layers inside a `cls` module (the generator's
  transformer) are cast to `dtype` (None: no-op).

  Active while the samplers are traced; the tokenizer's modules are left alone.
  """
  if dtype is None or dtype == jnp.float32:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      if _inside(context.module, cls):
        args = tuple(a.astype(dtype) if hasattr(a, "astype") else a for a in args)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


# ------------------------------------------------------------------------------------------------
# The no-cache baseline


def _prefix_logits(m: VAR, x_BxPxC, cond_BxD, num_scales: int):
  """Full forward over the tokens of scales < num_scales (the model's training mask: VAR's
  scale-causal one; M-VAR's block-diagonal attention with Mamba2 from the zero state over the
  whole prefix); logits of the last of them."""
  cond = m._block_cond(cond_BxD)
  mask = next_scale.train_mask(m.mask, m.lengths[:num_scales])
  for block in m.blocks:
    x_BxPxC, _ = block(x_BxPxC, cond, mask=mask, deterministic=True)
  begin = sum(m.lengths[: num_scales - 1])
  return m._logits(x_BxPxC[:, begin:], cond_BxD)


def recompute_sampler(fam):
  """A jitted `(params, labels, rng, cfg, top_k, top_p) -> (images uint8, idx list)` sampler that
  recomputes the whole prefix at every scale (no KV cache). Same CFG schedule, filtering and rng
  use as `VARFamily.sample` (more_smooth off). Also M-VAR's (`fam` an `MVARFamily`): re-running
  the prefix through attention and Mamba2 at every scale is what the official M-VAR sampler does,
  where `MVARFamily.sample` carries each block's Mamba2 state. `sample.jitted` is the jitted
  `(params, labels, rng, cfg, top_k, top_p)` function (for XLA's memory analysis)."""
  mod, tok = fam.module, fam.tokenizer

  def run(params, labels, rng, cfg, top_k, top_p):
    var_vars = fam._vars(params)
    tok_p = params["tokenizer"]
    B, n, Cvae = labels.shape[0], len(fam.patch_nums), mod.cvae
    labels = labels.astype(jnp.int32)
    labels_2B = jnp.concatenate([labels, jnp.full_like(labels, fam.num_classes)])
    x, cond_2BxD = mod.apply(var_vars, labels_2B, method=VAR.first_tokens)
    codebook_VxC = tok.codebook(tok_p).astype(jnp.float32)
    P = fam.patch_nums[-1]
    f_hat = jnp.zeros((B, P, P, Cvae), jnp.float32)
    inputs, idx_out = [x], []
    for si, pn in enumerate(fam.patch_nums):
      prefix = jnp.concatenate(inputs, axis=1) if len(inputs) > 1 else inputs[0]
      logits_2Bxlxv = mod.apply(var_vars, prefix, cond_2BxD, si + 1, method=_prefix_logits)
      scale = guidance.linear_excess(cfg, si, n)
      logits = guidance.guide(logits_2Bxlxv[:B], logits_2Bxlxv[B:], scale)
      rng, k_idx, _ = jax.random.split(rng, 3)  # the cached sampler's split (gumbel key unused)
      filtered = filter_top_k_top_p(logits, top_k, top_p)
      idx_Bl = jax.random.categorical(k_idx, filtered, axis=-1).astype(jnp.int32)
      idx_out.append(idx_Bl)
      h = codebook_VxC[idx_Bl].reshape(B, pn, pn, Cvae)
      f_hat, nxt = tok.next_input(tok_p, si, f_hat, h)
      if si != n - 1:
        x = mod.apply(var_vars, nxt.reshape(B, -1, Cvae), si + 1, method=VAR.embed_next)
        inputs.append(jnp.concatenate([x, x], axis=0).astype(inputs[0].dtype))
    img = tok.decode_fhat(tok_p, f_hat).astype(jnp.float32)
    img_u8 = images_to_uint8(img)
    return img_u8, idx_out

  jitted = jax.jit(run)

  def sample(params, labels, rng, *, cfg=1.5, top_k=900, top_p=0.96):
    return jitted(
      params, jnp.asarray(labels), rng, jnp.float32(cfg), jnp.int32(top_k), jnp.float32(top_p)
    )

  sample.jitted = jitted
  return sample


def samplers(fam):
  """`{name: fn(params, labels, rng, cfg, top_k, top_p) -> (images, idx list)}`."""

  def kv_cache(params, labels, rng, *, cfg, top_k, top_p):
    images, idx, _ = fam.sample_tokens(params, labels, rng, cfg=cfg, top_k=top_k, top_p=top_p)
    return images, idx

  return {"kv_cache": kv_cache, "recompute": recompute_sampler(fam)}


# ------------------------------------------------------------------------------------------------
# Timing


def time_calls(call, runs: int, sync) -> dict:
  """Warm-up call (compile) then `runs` timed calls; seconds."""
  t0 = time.perf_counter()
  sync(call())
  first = time.perf_counter() - t0
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(
    median_s=med,
    runs_s=[round(t, 4) for t in times],
    first_call_s=round(first, 3),
    compile_s=round(max(first - med, 0.0), 3),
  )


def bench_ours(fns, fam, params, batch, cfg, dtype, top_k, top_p, runs, which):
  p = cast_params(params, dtype)
  labels = jnp.arange(batch, dtype=jnp.int32) % fam.num_classes
  rows = []
  for name in which:
    with compute_dtype(dtype):
      res = time_calls(
        lambda fn=fns[name]: fn(p, labels, jax.random.key(0), cfg=cfg, top_k=top_k, top_p=top_p),
        runs,
        jax.block_until_ready,
      )
    rows.append(dict(impl=name, batch=batch, cfg=cfg, **res))
  return rows


def decode_time(fam, params, batch, runs) -> float:
  """Median seconds of our tokenizer decode alone (f_hat -> image), for the decoder-free ratio."""
  P, C = fam.patch_nums[-1], fam.module.cvae
  f_hat = jnp.zeros((batch, P, P, C), jnp.float32)
  dec = jax.jit(fam.tokenizer.decode_fhat)
  return time_calls(lambda: dec(params["tokenizer"], f_hat), runs, jax.block_until_ready)[
    "median_s"
  ]


# ------------------------------------------------------------------------------------------------
# The official sampler (FoundationVision/VAR checkout; its code is imported, never copied)


def build_official(reference: str, fam, device: str):
  """The official VQVAE + VAR with our config's sizes and random weights, in eval mode."""
  vae, var = official_models.var(reference, fam, fast_kernels=device == "cuda", random_vae=True)
  return vae.to(device).eval(), var.to(device).eval()


def bench_official(var, device, batch, cfg, dtype_name, top_k, top_p, runs):
  import torch

  labels = torch.arange(batch, device=device) % var.num_classes
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")

  def call():
    with torch.inference_mode(), autocast:
      return var.autoregressive_infer_cfg(
        batch, labels, g_seed=0, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=False
      )

  return dict(impl="official", batch=batch, cfg=cfg, **time_calls(call, runs, sync))


def official_decode_time(var, device, batch, dtype_name, runs) -> float:
  """Median seconds of the official VQVAE decode alone (`fhat_to_img`)."""
  import torch

  P = var.patch_nums[-1]
  f_hat = torch.zeros(batch, var.Cvae, P, P, device=device)
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16")

  def call():
    with torch.inference_mode(), autocast:
      return var.vae_proxy[0].fhat_to_img(f_hat)

  return time_calls(call, runs, sync)["median_s"]


# ------------------------------------------------------------------------------------------------


def _csv(text, cast):
  try:
    return [cast(t) for t in str(text).split(",") if t.strip()]
  except ValueError as e:
    raise SystemExit(f"bad comma-separated list {text!r}: {e}") from e


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), help="gpu: d16/256px/batch 64/bf16")
  ap.add_argument("--quick", action="store_true", help="same as --preset quick")
  ap.add_argument("--config", help="a VAR config, e.g. configs/var.py:fmnist")
  ap.add_argument("--batch", help="comma-separated batch sizes (default 1,8)")
  ap.add_argument("--cfg", help="comma-separated guidance scales (default 0,1.5)")
  ap.add_argument("--dtype", choices=sorted(DTYPES), help="transformer dtype (default float32)")
  ap.add_argument("--runs", type=int, help="timed calls per row (median; default 3)")
  ap.add_argument("--top_k", type=int, help="default: the config's sample.top_k")
  ap.add_argument("--top_p", type=float, help="default: the config's sample.top_p")
  ap.add_argument("--impls", default="kv_cache,recompute", help="subset of kv_cache,recompute")
  ap.add_argument(
    "--reference",
    default="",
    help="the official checkout of the config's family (VAR, LlamaGen or mar): time it too",
  )
  ap.add_argument("--num_iter", default="", help="MAR: comma-separated AR steps (default config)")
  ap.add_argument(
    "--diffusion_steps", default="", help="MAR: comma-separated diffusion steps (default config)"
  )
  ap.add_argument("--disa", default="0,1", help="MAR: DiSA off/on, comma-separated 0/1")
  ap.add_argument(
    "--decodes",
    default="",
    help="raster: rows of decoding methods side by side, comma-separated from "
    f"{','.join(RASTER_DECODES)} (default: one kv_cache row)",
  )
  ap.add_argument("--window", type=int, default=16, help="raster sjd/lantern: draft window")
  ap.add_argument("--lantern_k", type=int, default=1000, help="raster lantern: neighbours pooled")
  ap.add_argument("--lantern_delta", type=float, default=0.1, help="raster lantern: TV budget")
  ap.add_argument(
    "--head_std",
    type=float,
    default=0.1,
    help="raster --decodes on random weights: std of the (zero-initialised) head, so the "
    "distributions that drafts are tested against are not uniform",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="", help="JSON path (default bench_sampling_<device>.json)")
  ap.add_argument(
    "--append", action="store_true", help="add this config's result to an existing --out JSON"
  )
  args = ap.parse_args(argv)
  preset = PRESETS.get("quick" if args.quick else args.preset, {})
  defaults = dict(config="configs/var.py:fmnist", batch="1,8", cfg="0,1.5", dtype="float32", runs=3)
  for k, v in {**defaults, **preset}.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.batch = _csv(args.batch, int)
  args.cfg = _csv(args.cfg, float)
  args.impls = _csv(args.impls, str)
  args.num_iter = _csv(args.num_iter, int)
  args.diffusion_steps = _csv(args.diffusion_steps, int)
  args.disa = [bool(x) for x in _csv(args.disa, int)]
  for name in args.impls:
    if name not in ("kv_cache", "recompute"):
      raise SystemExit(f"--impls: unknown {name!r}; accepted: kv_cache, recompute")
  args.decodes = _csv(args.decodes, str)
  for name in args.decodes:
    if name not in RASTER_DECODES:
      raise SystemExit(f"--decodes: unknown {name!r}; accepted: {', '.join(RASTER_DECODES)}")
  if any(b <= 0 for b in args.batch):
    raise SystemExit(f"--batch must be positive ints, got {args.batch}")
  if args.runs <= 0:
    raise SystemExit(f"--runs={args.runs} must be >= 1")
  return args


def run(args) -> dict:
  """Runs the benchmark described by parsed `args`; returns the result dict (also printed)."""
  config, fam, params = build(args.config, args.seed)
  sample_kw = dict(config.get("sample", {}))
  top_k = args.top_k if args.top_k is not None else int(sample_kw.get("top_k", 0))
  top_p = args.top_p if args.top_p is not None else float(sample_kw.get("top_p", 0.0))
  dtype = DTYPES[args.dtype]
  jdev = jax.devices()[0]
  versions = dict(jax=jax.__version__, python=platform.python_version())

  official = None
  if args.reference:
    import torch

    torch.set_grad_enabled(False)
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    versions["torch"] = torch.__version__
    _, official = build_official(args.reference, fam, tdev)

  rows = []
  fns = samplers(fam)  # built once: one compilation per shape, reused across cfg values
  for batch in args.batch:
    decode_s = {}
    if official is not None:
      decode_s["ours"] = decode_time(fam, params, batch, args.runs)
      decode_s["official"] = official_decode_time(official, tdev, batch, args.dtype, args.runs)
    for cfg in args.cfg:
      group = bench_ours(fns, fam, params, batch, cfg, dtype, top_k, top_p, args.runs, args.impls)
      if official is not None:
        group.append(
          bench_official(official, tdev, batch, cfg, args.dtype, top_k, top_p, args.runs)
        )
      by = {r["impl"]: r for r in group}
      for r in group:
        r["dtype"] = args.dtype
        r["images_per_s"] = batch / r["median_s"]
        if "kv_cache" in by and r["impl"] != "kv_cache":
          r["kv_cache_speedup"] = r["median_s"] / by["kv_cache"]["median_s"]
        if r["impl"] == "official":
          r["official_torch_device"] = tdev
        if decode_s:
          r["decode_s"] = decode_s["official" if r["impl"] == "official" else "ours"]
      if "official" in by and "kv_cache" in by:
        ours, off = by["kv_cache"], by["official"]
        ours["ours_over_official"] = ours["images_per_s"] / off["images_per_s"]
        # Transformer + sampling only: each side minus its own decoder's median time.
        ours_t, off_t = ours["median_s"] - ours["decode_s"], off["median_s"] - off["decode_s"]
        if ours_t > 0 and off_t > 0:
          ours["ours_over_official_without_decode"] = off_t / ours_t
      rows.extend(group)
      for r in group:
        print(_fmt_row(r), flush=True)

  mod = fam.module
  tm = fam.tokenizer.config.model
  # The official VQVAE is fixed at ch_mult (1, 1, 2, 2, 4); ours matches it for var_vae.
  same_vae = tuple(tm.ch_mult) == (1, 1, 2, 2, 4) and int(tm.ch) % 32 == 0
  result = dict(
    device=f"{jdev.platform}: {jdev.device_kind}",
    versions=versions,
    config=dict(
      spec=args.config,
      depth=mod.depth,
      width=mod.width,
      heads=mod.num_heads,
      patch_nums=list(fam.patch_nums),
      seq_len=fam.seq_len,
      vocab_size=mod.vocab_size,
      image_size=int(config.data.image_size),
      var_params=param_count({k: v for k, v in params.items() if k != "tokenizer"}),
      tokenizer=dict(ch=int(tm.ch), ch_mult=list(tm.ch_mult), z_channels=int(tm.z_channels)),
      attn_impl=mod.attn_impl,
    ),
    settings=dict(
      dtype=args.dtype,
      top_k=top_k,
      top_p=top_p,
      runs=args.runs,
      cfg_doubles_batch=True,
      note="ours and official both run 2B rows (cond + null class) at every cfg, cfg=0 included",
    ),
    rows=rows,
  )
  if official is not None and not same_vae:
    result["settings"]["official_tokenizer_note"] = (
      "official VQVAE has a fixed 16x decoder (bigger image than ours): its time includes more "
      "decoder work"
    )
  print(table(result))
  return result


# ------------------------------------------------------------------------------------------------
# Raster (LlamaGen) and MAR

# Peak HBM bandwidth (bytes/s) by device kind, for the batch-1 decode roofline (vendor datasheets).
PEAK_BANDWIDTH = {
  "H200": 4.8e12,
  "H100 80GB HBM3": 3.35e12,  # SXM
  "H100 PCIe": 2.0e12,
  "H100": 3.35e12,
  "A100-SXM4-80GB": 2.04e12,
  "A100": 1.555e12,
  "TPU v5p": 2.765e12,
  "TPU v5 lite": 8.19e11,
  "TPU v4": 1.2e12,
}


def peak_bandwidth(device_kind: str):
  for name, bw in PEAK_BANDWIDTH.items():  # most specific first
    if name in device_kind:
      return bw
  return None


def build_family(spec: str, seed: int = 0):
  """`(config, family, params)` for any generator config, random weights (model and tokenizer)."""
  config = config_util.load_config_file(spec)
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  k_model, k_tok = jax.random.split(jax.random.key(seed))
  params = {**fam.init(k_model, None), "tokenizer": {"ae": tok.init(k_tok, None)["ae"]}}
  params.update(fam.init_frozen(k_model))  # HMAR stage 2: its (frozen) stage-1 params
  return config, fam, params


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def raster_decode_bytes(fam, params, batch: int, dtype) -> dict:
  """Bytes one decode step must read: the transformer weights and the whole static KV cache.

  The sampler attends over the preallocated cache of `cache_length()` slots for all 2B rows
  (conditional + null class) in every step, masked to the valid prefix, so it reads all of it.
  """
  mod = fam.module
  weights = _nbytes({k: v for k, v in params.items() if k != "tokenizer"})
  itemsize = jnp.dtype(dtype).itemsize
  weights = weights // 4 * itemsize  # float32 params cast to `dtype`
  kv = 2 * mod.n_layer * 2 * batch * fam.cache_length() * mod.kv_heads * mod.head_dim * itemsize
  return dict(weights=weights, kv_cache=kv, total=weights + kv)


# Raster decoding methods for `--decodes`: `plain` (a token per model call), `par` / `cosine` (the
# PAR and RandAR schedules: several tokens per call; a model trained for them is needed for good
# samples), `sjd` / `lantern` (speculative decoding: training-free, a window of drafts per call).
RASTER_DECODES = ("plain", "par", "cosine", "sjd", "lantern")


def raster_decode_kw(name: str, fam, args) -> dict:
  """`sample_tokens` keywords of a `--decodes` entry."""
  from arvision.sampling import orders

  N, regions = fam.num_tokens, int(fam.config.model.get("regions", 2))
  if name == "par":
    return dict(order=orders.region_order(fam.grid_size, regions),
                schedule=orders.par_schedule(N, regions * regions))  # fmt: skip
  if name == "cosine":  # RandAR: 88 steps for 256 tokens
    return dict(schedule=orders.cosine_schedule(N, max(1, round(N * 88 / 256))))
  if name in ("sjd", "lantern"):
    kw = dict(decode=name, window=args.window)
    if name == "lantern":
      kw.update(lantern_k=args.lantern_k, lantern_delta=args.lantern_delta)
    return kw
  return {}


def bench_raster_decodes(args, config, fam, params) -> list[dict]:
  """One row per `--decodes` method at each batch and cfg: model calls per image, tokens per
  call, images/s (the same model and sampling settings, timed in one run)."""
  from arvision.models.raster import RasterTransformer

  # Random weights: a zero head makes every distribution uniform, which any draft passes.
  kernel = params["output"]["kernel"]
  kernel = args.head_std * jax.random.normal(jax.random.key(args.seed + 1), kernel.shape)
  params = {**params, "output": {"kernel": kernel}}
  dtype = DTYPES[args.dtype]
  p = cast_params(params, dtype)
  sample_kw = dict(config.get("sample", {}))
  rows = []
  for batch in args.batch:
    labels = jnp.arange(batch, dtype=jnp.int32) % fam.num_classes
    for cfg in args.cfg:
      plain_s = None
      for name in args.decodes:
        kw = dict(sample_kw, cfg=cfg, **raster_decode_kw(name, fam, args))
        call = lambda kw=kw, labels=labels: fam.sample_tokens(  # noqa: E731
          p, labels, jax.random.key(args.seed), return_stats=True, **kw
        )
        with compute_dtype(dtype, RasterTransformer):
          res = time_calls(call, args.runs, jax.block_until_ready)
          stats = call()[3]
        calls = float(jnp.mean(stats["calls"]))
        row = dict(
          impl=name,
          batch=batch,
          cfg=cfg,
          dtype=args.dtype,
          head_std=args.head_std,
          **{k: v for k, v in kw.items() if k in ("window", "lantern_k", "lantern_delta")},
          **res,
          images_per_s=batch / res["median_s"],
          calls_per_image=calls,
          max_calls=int(jnp.max(stats["calls"])),  # the batch runs until its slowest image ends
          tokens_per_call=fam.num_tokens / calls,
        )
        plain_s = res["median_s"] if name == "plain" else plain_s
        if plain_s is not None:
          row["speedup_vs_plain"] = plain_s / res["median_s"]
        rows.append(row)
        print(_fmt_family_row(row), flush=True)
  return rows


def bench_raster(args, config, fam, params) -> list[dict]:
  from arvision.models.raster import RasterTransformer

  if args.decodes:
    return bench_raster_decodes(args, config, fam, params)
  dtype = DTYPES[args.dtype]
  p = cast_params(params, dtype)
  sample_kw = dict(config.get("sample", {}))
  dec = jax.jit(fam.tokenizer.decode_idx)
  side = fam.tokenizer.latent_size
  peak = peak_bandwidth(jax.devices()[0].device_kind)
  rows = []
  for batch in args.batch:
    labels = jnp.arange(batch, dtype=jnp.int32) % fam.num_classes
    grid = jnp.zeros((batch, side * side), jnp.int32)
    decode_s = time_calls(
      lambda g=grid: dec(params["tokenizer"], g), args.runs, jax.block_until_ready
    )
    for cfg in args.cfg:
      kw = dict(sample_kw, cfg=cfg)
      with compute_dtype(dtype, RasterTransformer):
        res = time_calls(
          lambda kw=kw, labels=labels: fam.sample(p, labels, jax.random.key(args.seed), **kw),
          args.runs,
          jax.block_until_ready,
        )
      n = fam.num_tokens
      loop_s = max(res["median_s"] - decode_s["median_s"], 1e-9)
      step_s = loop_s / n  # the prefix step is counted like a token step
      nbytes = raster_decode_bytes(fam, params, batch, dtype)
      row = dict(
        impl="kv_cache",
        batch=batch,
        cfg=cfg,
        dtype=args.dtype,
        **res,
        images_per_s=batch / res["median_s"],
        tokens_per_s=batch * n / res["median_s"],
        decode_s=decode_s["median_s"],
        decode_step_s=step_s,
        bytes_per_step=nbytes,
        achieved_bandwidth=nbytes["total"] / step_s,
        peak_bandwidth=peak,
        bandwidth_fraction=(nbytes["total"] / step_s / peak) if peak else None,
      )
      rows.append(row)
      print(_fmt_family_row(row), flush=True)
      if args.reference:
        off = official_raster_row(args, fam, batch, cfg, sample_kw)
        # Token sampling only on both sides: ours minus our decoder, the official `generate`.
        row["ours_over_official_without_decode"] = off["median_s"] / loop_s
        rows.append(off)
        print(_fmt_official(off, row), flush=True)
  return rows


def _official_sync(device):
  import torch

  return (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)


_OFFICIAL_MODELS = {}


def official_raster_row(args, fam, batch, cfg, sample_kw) -> dict:
  """FoundationVision/LlamaGen `generate` (gpt-fast KV cache) with our config's sizes: tokens only
  (its VQ decoder is not timed; compare with ours minus our decoder)."""
  import torch

  sys.path.insert(0, os.path.abspath(args.reference))
  from autoregressive.models import generate as gen  # noqa: PLC0415

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if "raster" not in _OFFICIAL_MODELS:
    _OFFICIAL_MODELS["raster"] = official_models.llamagen(args.reference, fam).to(device)
  model = _OFFICIAL_MODELS["raster"]
  labels = torch.arange(batch, device=device) % fam.num_classes
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def call():
    with torch.inference_mode(), autocast:
      return gen.generate(
        model,
        labels,
        fam.num_tokens,
        cfg_scale=cfg,
        cfg_interval=float(sample_kw.get("cfg_interval", -1)),
        temperature=float(sample_kw.get("temperature", 1.0)),
        top_k=int(sample_kw.get("top_k", 0)),
        top_p=float(sample_kw.get("top_p", 1.0)),
        sample_logits=True,
      )

  res = time_calls(call, args.runs, _official_sync(device))
  return dict(
    impl="official",
    batch=batch,
    cfg=cfg,
    dtype=args.dtype,
    official_torch_device=device,
    what="LlamaGen generate, tokens only (no VQ decode)",
    **res,
    tokens_per_s=batch * fam.num_tokens / res["median_s"],
  )


def official_mar_row(args, fam, batch, cfg, num_iter, steps, sample_kw) -> dict:
  """LTH14/mar `MAR.sample_tokens` with our config's sizes and `steps` diffusion steps: tokens
  only (its VAE decoder is not timed; compare with ours minus our decoder)."""

  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  key = ("mar", steps)
  if key not in _OFFICIAL_MODELS:
    model = official_models.mar(args.reference, fam, num_sampling_steps=steps)
    _OFFICIAL_MODELS[key] = model.to(device).eval()
  model = _OFFICIAL_MODELS[key]
  labels = torch.arange(batch, device=device) % fam.num_classes
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def call():
    with torch.inference_mode(), autocast:
      return model.sample_tokens(
        batch,
        num_iter=num_iter,
        cfg=cfg,
        cfg_schedule=str(sample_kw.get("cfg_schedule", "linear")),
        labels=labels,
        temperature=float(sample_kw.get("temperature", 1.0)),
      )

  res = time_calls(call, args.runs, _official_sync(device))
  return dict(
    impl="official",
    batch=batch,
    cfg=cfg,
    num_iter=num_iter,
    diffusion_steps=steps,
    disa=False,
    dtype=args.dtype,
    official_torch_device=device,
    what="MAR sample_tokens, tokens only (no VAE decode)",
    **res,
    images_per_s=batch / res["median_s"],
  )


def _fmt_official(off, ours) -> str:
  return (
    f"{'official':>9} b={off['batch']:<4} cfg={off['cfg']:<4} median {off['median_s']:.4f}s "
    f"(tokens only)  ours/official without decode "
    f"{ours['ours_over_official_without_decode']:.2f}x"
  )


def bench_mar(args, config, fam, params) -> list[dict]:
  from arvision.models.mar import MAR

  dtype = DTYPES[args.dtype]
  p = cast_params(params, dtype)
  sample_kw = dict(config.get("sample", {}))
  rows = []
  dec = jax.jit(fam.tokenizer.decode_latent)
  for batch in args.batch:
    labels = jnp.arange(batch, dtype=jnp.int32) % fam.num_classes
    decode_s = None
    if args.reference:
      side = fam.seq_side * fam.patch_size
      z = jnp.zeros((batch, side, side, fam.latent_channels), jnp.float32)
      decode_s = time_calls(
        lambda z=z: dec(params["tokenizer"], z), args.runs, jax.block_until_ready
      )
    for cfg in args.cfg:
      for num_iter in args.num_iter or [int(sample_kw.get("num_iter", 64))]:
        for steps in args.diffusion_steps or [int(fam.module.num_sampling_steps)]:
          for disa in args.disa:
            kw = dict(sample_kw, cfg=cfg, num_iter=num_iter, num_diffusion_steps=steps, disa=disa)
            with compute_dtype(dtype, MAR):
              res = time_calls(
                lambda kw=kw, labels=labels: fam.sample(p, labels, jax.random.key(args.seed), **kw),
                args.runs,
                jax.block_until_ready,
              )
            row = dict(
              impl="mar" + ("+disa" if disa else ""),
              batch=batch,
              cfg=cfg,
              num_iter=num_iter,
              diffusion_steps=steps,
              disa=bool(disa),
              dtype=args.dtype,
              **res,
              images_per_s=batch / res["median_s"],
            )
            rows.append(row)
            print(_fmt_family_row(row), flush=True)
            if args.reference and not disa:
              off = official_mar_row(args, fam, batch, cfg, num_iter, steps, sample_kw)
              row["decode_s"] = decode_s["median_s"]
              loop_s = max(row["median_s"] - decode_s["median_s"], 1e-9)
              row["ours_over_official_without_decode"] = off["median_s"] / loop_s
              rows.append(off)
              print(_fmt_official(off, row), flush=True)
  return rows


# ------------------------------------------------------------------------------------------------
# Next-scale successors against VAR of the same size, side by side


def same_size_var(variant: str, module, patch_nums, seed: int):
  """VAR of a successor's size: `(spec, overrides, family, params)`, random weights.

  `configs/var.py:<variant>` where it has the successor's depth, width, heads and scale list;
  otherwise that config with those four overridden (`overrides` names them; the JSON records it).
  """
  spec = f"configs/var.py:{variant}"
  config = mlc.ConfigDict(config_util.load_config_file(spec).to_dict())
  want = dict(depth=module.depth, width=module.width, num_heads=module.num_heads)
  overrides = {k: v for k, v in want.items() if config.model.get(k) != v}
  config.model.update(overrides)
  tok_model = config.tokenizer.config.model
  if tuple(tok_model.patch_nums) != tuple(patch_nums):
    tok_model.patch_nums = overrides["patch_nums"] = tuple(patch_nums)
  _, fam, params = build(config, seed)
  return spec, overrides, fam, params


def time_interleaved(calls: dict, runs: int) -> dict:
  """A warm-up call of each (trace + compile + one run), then `runs` rounds calling each once in
  turn, so a load change on a shared host hits every impl alike. `{name: timing fields}`."""
  first, times = {}, {name: [] for name in calls}
  for name, call in calls.items():
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first[name] = time.perf_counter() - t0
  for _ in range(runs):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - t0)
  out = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    out[name] = dict(
      median_s=med,
      runs_s=[round(t, 4) for t in ts],
      first_call_s=round(first[name], 3),
      compile_s=round(first[name] - med, 3),
    )
  return out


def xla_memory(jitted, *args) -> dict:
  """XLA's memory analysis of the compiled call: argument + output + temp bytes, and temp alone
  (any backend; None where the backend reports none)."""
  mem = jitted.lower(*args).compile().memory_analysis()
  if mem is None:
    return dict(xla_bytes=None, xla_temp_bytes=None)
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  return dict(xla_bytes=int(total), xla_temp_bytes=int(mem.temp_size_in_bytes))


def side_by_side(args, impls: dict, num_classes: int) -> list[dict]:
  """Rows of `impls` (`{name: (make, params, row fields)}`, `make(cfg)` -> `(params, labels, rng)
  -> images`; the first is VAR) per batch and cfg, timed interleaved. Each row: images/s, XLA
  bytes, and `speed_over_var` / `xla_bytes_over_var` against the first row of its group."""
  rows = []
  for batch in args.batch:
    labels = jnp.arange(batch, dtype=jnp.int32) % num_classes
    key = jax.random.key(args.seed)
    for cfg in args.cfg:
      fns = {name: jax.jit(make(cfg)) for name, (make, _, _) in impls.items()}
      calls = {
        name: (lambda fn=fn, p=impls[name][1], y=labels, k=key: fn(p, y, k))
        for name, fn in fns.items()
      }
      res = time_interleaved(calls, args.runs)  # first: its warm-up call includes the compile
      mem = {name: xla_memory(fn, impls[name][1], labels, key) for name, fn in fns.items()}
      group = [
        dict(impl=name, batch=batch, cfg=cfg, **impls[name][2], **res[name],
             images_per_s=batch / res[name]["median_s"], **mem[name])
        for name in fns
      ]  # fmt: skip
      base = group[0]
      for r in group[1:]:
        r["speed_over_var"] = r["images_per_s"] / base["images_per_s"]
        if r["xla_bytes"] and base["xla_bytes"]:
          r["xla_bytes_over_var"] = r["xla_bytes"] / base["xla_bytes"]
      for r in group:
        print(_fmt_family_row(r), flush=True)
      rows.extend(group)
  return rows


def _knob(args, config, name: str, cast, default=0):
  """A sampling knob: the command line's, else the config's `sample.<name>`."""
  value = getattr(args, name, None)
  return cast(value if value is not None else config.get("sample", {}).get(name, default))


def bench_flexvar(args, config, fam, params) -> list[dict]:
  """FlexVAR vs VAR at the same depth, width, heads and batch (`configs/var.py:<same variant>`),
  side by side (timed calls interleaved): images/s and XLA memory bytes for FlexVAR's default
  scale list, a shorter one and VAR's own schedule."""
  spec, overrides, var_fam, var_params = same_size_var(
    config.variant, fam.module, fam.patch_nums, args.seed
  )
  if overrides:
    raise SystemExit(f"{spec} is not FlexVAR's size ({overrides})")
  pns = fam.patch_nums
  short = pns[:2] + pns[-2:] if len(pns) > 4 else pns
  kw = dict(top_k=_knob(args, config, "top_k", int), top_p=_knob(args, config, "top_p", float))

  def make(f, **extra):
    return lambda cfg: lambda p, lab, r: f.sample(p, lab, r, cfg=cfg, **kw, **extra)

  impls = {"var": (make(var_fam), var_params, dict(patch_nums=list(var_fam.patch_nums)))}
  for name, p in {"flexvar": pns, "flexvar_short": short}.items():
    if name == "flexvar" or p != pns:
      impls[name] = (make(fam, patch_nums=p), params, dict(patch_nums=list(p)))
  return side_by_side(args, impls, fam.num_classes)


def bench_mvar(args, config, fam, params) -> list[dict]:
  """M-VAR vs VAR at the same depth, width, heads and batch (`configs/var.py:<same variant>`),
  side by side (timed calls interleaved): VAR's KV-cache sampler, M-VAR as arvision samples it
  (attention inside the scale, each block's Mamba2 state carried across scales) and M-VAR
  re-running the whole prefix at every scale (`recompute_sampler`: what the official sampler does;
  same tokens for the same rng). The carried row's `speed_over_recompute` is the state's gain."""
  spec, overrides, var_fam, var_params = same_size_var(
    config.variant, fam.module, fam.patch_nums, args.seed
  )
  if overrides:
    raise SystemExit(f"{spec} is not M-VAR's size ({overrides})")
  top_k, top_p = _knob(args, config, "top_k", int), _knob(args, config, "top_p", float)
  kw = dict(top_k=top_k, top_p=top_p)
  recompute = recompute_sampler(fam)

  def make_sample(f):
    return lambda cfg: lambda p, lab, r: f.sample(p, lab, r, cfg=cfg, **kw)

  def make_recompute(cfg):
    return lambda p, lab, r: recompute.jitted(
      p, lab, r, jnp.float32(cfg), jnp.int32(top_k), jnp.float32(top_p)
    )[0]

  impls = {
    "var_kv_cache": (make_sample(var_fam), var_params, {}),
    "mvar_carried": (make_sample(fam), params, {}),
    "mvar_recompute": (make_recompute, params, {}),
  }
  rows = side_by_side(args, impls, fam.num_classes)
  for i in range(0, len(rows), len(impls)):
    _, carried, rec = rows[i : i + len(impls)]
    carried["speed_over_recompute"] = carried["images_per_s"] / rec["images_per_s"]
    if carried["xla_bytes"] and rec["xla_bytes"]:
      carried["xla_bytes_over_recompute"] = carried["xla_bytes"] / rec["xla_bytes"]
    print(f"  b={carried['batch']} cfg={carried['cfg']}: carried Mamba2 state "
          f"{carried['speed_over_recompute']:.2f}x the recompute sampler's images/s")  # fmt: skip
  return rows


def bench_infinity(args, config, fam, params) -> list[dict]:
  """Infinity vs VAR of the same depth, width, heads, scale list and batch, side by side (timed
  calls interleaved): images/s and XLA memory bytes, each with its own config's sampling knobs
  (cfg from `--cfg`), and VAR again with Infinity's top-k/top-p where they differ (VAR's top-p
  sorts V logits per token; Infinity's filter acts on 2 logits per bit). The VAR is
  `configs/var.py:<same variant>`, with depth/width/heads/scales overridden in code where they
  differ (the rows' `var_overrides`; none for `fmnist`). Infinity's tokens are d bits (a 2-way
  softmax per bit) on its BSQ tokenizer; VAR's a V-way softmax."""
  spec, overrides, var_fam, var_params = same_size_var(
    config.variant, fam.module, fam.patch_nums, args.seed
  )
  var_config = config_util.load_config_file(spec)
  var_kw = dict(top_k=_knob(args, var_config, "top_k", int),
                top_p=_knob(args, var_config, "top_p", float))  # fmt: skip
  inf_kw = dict(top_k=_knob(args, config, "top_k", int), top_p=_knob(args, config, "top_p", float),
                tau=float(config.sample.get("tau", 1.0)))  # fmt: skip

  def make(f, kw):
    return lambda cfg: lambda p, lab, r: f.sample(p, lab, r, cfg=cfg, **kw)

  same = dict(top_k=inf_kw["top_k"], top_p=inf_kw["top_p"])
  impls = {
    "var_kv_cache": (make(var_fam, var_kw), var_params,
                     dict(var_spec=spec, var_overrides=overrides, **var_kw)),
    "infinity": (make(fam, inf_kw), params, dict(inf_kw)),
  }  # fmt: skip
  if same != var_kw:  # VAR with Infinity's filter too: the model apart from the top-k/top-p cost
    impls["var_kv_cache_infinity_knobs"] = (make(var_fam, same), var_params, dict(same))
  return side_by_side(args, impls, fam.num_classes)


def bench_hmar(args, config, fam, params) -> list[dict]:
  """HMAR against VAR at the same depth and batch, side by side (`side_by_side`: timed calls
  interleaved, XLA bytes): VAR's KV-cache sampler (`var.py:<variant>`, HMAR's stage-1 weights),
  HMAR next-scale only (block-diagonal, no cache) and HMAR with its masked steps (stage 2)."""
  base = str(config.variant).removesuffix("_stage1")
  var_config = config_util.load_config_file(f"var.py:{base}")
  var_fam = families.build(var_config, tokenizer=fam.tokenizer)
  one = mlc.ConfigDict(config.to_dict())
  one.model.mask_schedule = tuple((n,) for n in fam.lengths)
  kw = dict(top_k=_knob(args, config, "top_k", int), top_p=_knob(args, config, "top_p", float))

  def make(f):
    return lambda cfg: lambda p, lab, r: f.sample(p, lab, r, cfg=cfg, **kw)

  var_params = {k: v for k, v in params.items() if not k.startswith("mask_")}
  impls = {
    "var_kv_cache": (make(var_fam), var_params, {}),
    "hmar_nextscale": (make(families.build(one, tokenizer=fam.tokenizer)), params, {}),
  }
  if fam.stage == 2:
    impls["hmar_masked"] = (make(fam), params, {})
  return side_by_side(args, impls, fam.num_classes)


def run_family(args) -> dict:
  """The raster / MAR benchmark (same JSON layout as `run`)."""
  config, fam, params = build_family(args.config, args.seed)
  jdev = jax.devices()[0]
  versions = dict(jax=jax.__version__, python=platform.python_version())
  bench = {
    "raster": bench_raster,
    "mar": bench_mar,
    "flexvar": bench_flexvar,
    "hmar": bench_hmar,
    "mvar": bench_mvar,
    "infinity": bench_infinity,
  }.get(config.family)
  if bench is None:
    raise SystemExit(f"--config {args.config}: no benchmark for family {config.family!r}")
  rows = bench(args, config, fam, params)
  model = {k: v for k, v in params.items() if k != "tokenizer"}
  result = dict(
    device=f"{jdev.platform}: {jdev.device_kind}",
    versions=versions,
    config=dict(
      spec=args.config,
      family=config.family,
      model=config.model.to_dict(),
      image_size=int(config.data.image_size),
      params=int(sum(x.size for x in jax.tree.leaves(model))),
      sample=dict(config.get("sample", {})),
    ),
    settings=dict(dtype=args.dtype, runs=args.runs, seed=args.seed),
    rows=rows,
  )
  print(family_table(result))
  return result


def _fmt_family_row(r) -> str:
  if "calls_per_image" in r:
    sp = f"  {r['speedup_vs_plain']:.2f}x plain" if "speedup_vs_plain" in r else ""
    return (
      f"{r['impl']:>8} b={r['batch']:<4} cfg={r['cfg']:<4} {r['calls_per_image']:7.1f} calls/img "
      f"{r['tokens_per_call']:5.2f} tok/call {r['images_per_s']:8.3f} img/s{sp}"
    )
  if "xla_bytes" in r:  # a successor vs VAR
    steps = f" steps={len(r['patch_nums'])}" if "patch_nums" in r else ""
    mib = f"{r['xla_bytes'] / 2**20:8.1f} MiB" if r["xla_bytes"] else "     n/a MiB"
    return (
      f"{r['impl']:>15} b={r['batch']:<4} cfg={r['cfg']:<4}{steps} {r['images_per_s']:9.3f} img/s "
      f"{mib}  x{r.get('speed_over_var', 1.0):.2f} vs VAR"
    )
  if r["impl"] == "official":
    return f"{'official':>9} b={r['batch']:<4} cfg={r['cfg']:<4} median {r['median_s']:.4f}s"
  if "patch_nums" in r:
    return (
      f"{r['impl']:>8} b={r['batch']:<4} steps={len(r['patch_nums'])} {r['images_per_s']:.3f} img/s"
    )
  if "tokens_per_s" in r:
    bw = r["bandwidth_fraction"]
    extra = f"  {r['achieved_bandwidth'] / 1e9:.1f} GB/s" + (f" ({bw:.0%} of peak)" if bw else "")
    return (
      f"raster b={r['batch']:<4} cfg={r['cfg']:<4} {r['tokens_per_s']:10.1f} tok/s "
      f"{r['images_per_s']:8.3f} img/s  step {r['decode_step_s'] * 1e3:.3f} ms{extra}"
    )
  return (
    f"{r['impl']:>9} b={r['batch']:<4} cfg={r['cfg']:<4} iters={r['num_iter']:<3} "
    f"steps={r['diffusion_steps']:<4} {r['images_per_s']:8.3f} img/s  compile {r['compile_s']:.1f}s"
  )


def family_table(result) -> str:
  c = result["config"]
  head = f"\n{c['family']} sampling, {result['device']}, {c['spec']} ({c['params']:,} params, "
  head += f"{c['image_size']}px), {result['settings']['dtype']}\n"
  return head + "\n".join(_fmt_family_row(r) for r in result["rows"])


def _fmt_row(r) -> str:
  extra = ""
  if "kv_cache_speedup" in r:
    extra += f"  kv_cache is {r['kv_cache_speedup']:.2f}x faster"
  if "ours_over_official" in r:
    extra += f"  ours/official {r['ours_over_official']:.2f}x"
  if "ours_over_official_without_decode" in r:
    extra += f" ({r['ours_over_official_without_decode']:.2f}x without decode)"
  return (
    f"{r['impl']:>10} b={r['batch']:<4} cfg={r['cfg']:<4} {r['images_per_s']:10.3f} img/s  "
    f"median {r['median_s']:.4f}s  compile {r['compile_s']:.2f}s{extra}"
  )


def table(result) -> str:
  c = result["config"]
  head = (
    f"\nVAR sampling, {result['device']}, {c['spec']} (depth {c['depth']}, width {c['width']}, "
    f"L={c['seq_len']}, {c['image_size']}px), {result['settings']['dtype']}, "
    f"top_k={result['settings']['top_k']} top_p={result['settings']['top_p']}\n"
  )
  cols = f"{'impl':>10} {'batch':>5} {'cfg':>5} {'img/s':>10} {'median s':>10} {'compile s':>10} "
  cols += f"{'kv speedup':>10} {'ours/off':>9} {'w/o decode':>10}"
  lines = [head + cols, "-" * len(cols)]
  for r in result["rows"]:
    sp = f"{r['kv_cache_speedup']:.2f}x" if "kv_cache_speedup" in r else ""
    ro = f"{r['ours_over_official']:.2f}x" if "ours_over_official" in r else ""
    rd = r.get("ours_over_official_without_decode")
    rd = f"{rd:.2f}x" if rd else ""
    lines.append(
      f"{r['impl']:>10} {r['batch']:>5} {r['cfg']:>5} {r['images_per_s']:>10.3f} "
      f"{r['median_s']:>10.4f} {r['compile_s']:>10.2f} {sp:>10} {ro:>9} {rd:>10}"
    )
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  family = config_util.load_config_file(args.config).family
  result = run(args) if family == "var" else run_family(args)
  jdev = jax.devices()[0]
  out = args.out or f"experiments/results/bench_sampling_{jdev.platform}.json"
  doc = dict(
    what=f"{jdev.platform.upper()} run: sampling throughput, random weights, end to end "
    "(labels -> uint8 images); see experiments/bench_sampling.py",
    device=result["device"],
    num_devices=jax.device_count(),
    host=dict(
      cpu_count=os.cpu_count(),
      machine=platform.machine(),
      loadavg_at_start=[round(x, 2) for x in os.getloadavg()],  # the CPU may be shared
    ),
    versions=result["versions"],
    results=[],
  )
  if args.append and os.path.exists(out):
    with open(out) as f:
      doc = json.load(f)
    if doc.get("device") != result["device"]:
      raise SystemExit(
        f"--append: {out} is for {doc.get('device')!r}, this run is on {result['device']!r}"
      )
    doc["versions"].update(result["versions"])
  entry = {k: v for k, v in result.items() if k not in ("device", "versions")}
  argv = sys.argv[1:] if argv is None else list(argv)
  entry["command"] = " ".join(["python experiments/bench_sampling.py", *argv])
  doc["results"].append(entry)
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(doc, f, indent=2)
  print(f"wrote {out}")
  return doc


if __name__ == "__main__":
  main()
