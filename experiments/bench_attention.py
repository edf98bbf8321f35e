"""Attention benchmark: scale-wise / chunked masks, our kernels against dense and cuDNN baselines.

    python experiments/bench_attention.py            # full shapes (GPU / TPU)
    python experiments/bench_attention.py --quick    # tiny shapes; checks the script runs (CPU)

Shapes: VAR-d16 / VAR-d30 self-attention at 256px (patch_nums 1..16, L = 680; 16 / 30 heads,
head dim 64) and 512px (patch_nums (1, 2, 3, 4, 6, 9, 13, 18, 24, 32), L = 2240), chunk-causal
attention and the softmax + linear hybrid (chunk 256, L = 4096).

Implementations (each where the backend supports it):
- `xla`: dense `[L, L]` mask (`arvision.ops.attention(impl="xla")`), the reference.
- `xla_per_scale`: one unmasked xla attention per segment over its visible key prefix.
- `pallas`: our block-sparse kernel (GPU: Triton). `splash`: splash with a computable mask (TPU).
- `cudnn_dense_mask`: `jax.nn.dot_product_attention(mask=dense, implementation="cudnn")` (GPU).
- `cudnn_unmasked`: cuDNN flash attention with no mask on the same shape (GPU): the speed bar.
- hybrid rows: `pallas_hybrid` (forward kernel; backward = autodiff of the scan) and `scan`.

Useful FLOPs count only visible (query, key) pairs: forward `4 * B * H * D * pairs` (QK^T and PV,
2 FLOPs per multiply-add); forward + backward `3.5x` that (backward = 2.5x forward: dV, dP, dS->dQ,
dS->dK plus the recomputed QK^T). `cudnn_unmasked` does all `L * L` pairs but is credited with
the same useful FLOPs, so its TFLOP/s compare directly. Hybrid: `4 * B * H * L * (C * D + D * Dv)`.

Times: `jax.jit`, `block_until_ready`, median of `--iters` runs after a warm-up. On CPU the Pallas
kernels run in interpret mode, which measures nothing about kernel speed: they are skipped there.
Results: a printed table and `experiments/results/bench_attention_<device>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from arvision.kernels.chunked import hybrid_chunk_attention, hybrid_chunk_attention_scan
from arvision.kernels.scalewise import per_segment_reference, scalewise_attention
from arvision.ops import attention, masks

PN_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PN_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def configs(quick: bool):
  """(name, kind, batch, heads, head_dim, mask spec or chunk, length)."""
  lens = lambda pn: tuple(p * p for p in pn)
  if quick:
    return [
      ("var-tiny-pn1..6", "mask", 2, 2, 16, masks.scale_causal(lens(PN_256[:6])), 91),
      ("chunk-causal-tiny", "mask", 2, 2, 16, masks.chunk_causal(16), 64),
      ("hybrid-tiny", "hybrid", 2, 2, 16, 16, 64),
    ]
  return [
    ("var-d16-256px", "mask", 8, 16, 64, masks.scale_causal(lens(PN_256)), 680),
    ("var-d30-256px", "mask", 8, 30, 64, masks.scale_causal(lens(PN_256)), 680),
    ("var-d16-512px", "mask", 2, 16, 64, masks.scale_causal(lens(PN_512)), 2240),
    ("var-d30-512px", "mask", 2, 30, 64, masks.scale_causal(lens(PN_512)), 2240),
    ("chunk-causal-c256", "mask", 2, 16, 64, masks.chunk_causal(256), 4096),
    ("hybrid-c256", "hybrid", 2, 16, 64, 256, 4096),
  ]


def _median_time(fn, args, iters):
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _fwd_bwd(f):
  def g(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return vjp(out)  # any cotangent of the right shape

  return jax.jit(g)


def mask_impls(spec, length, backend):
  """name -> f(q, k, v), or name -> reason it is skipped on this backend."""
  dense = spec.dense(length, length)
  impls = {
    "xla": lambda q, k, v: attention(q, k, v, mask=spec, impl="xla"),
    "xla_per_scale": lambda q, k, v: per_segment_reference(q, k, v, mask=spec),
  }
  if backend == "gpu":
    impls["pallas"] = lambda q, k, v: scalewise_attention(q, k, v, mask=spec)
    impls["cudnn_dense_mask"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=jnp.asarray(dense)[None, None], implementation="cudnn"
    )
    impls["cudnn_unmasked"] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation="cudnn"
    )
  else:
    impls["pallas"] = "GPU only here (interpret mode on CPU/TPU is not a speed measurement)"
    impls["cudnn_dense_mask"] = impls["cudnn_unmasked"] = "needs a GPU"
  if backend == "tpu":
    from arvision.kernels.scalewise.kernel_tpu import splash_scalewise_attention  # noqa: PLC0415

    impls["splash"] = lambda q, k, v: splash_scalewise_attention(q, k, v, mask=spec)
  else:
    impls["splash"] = "TPU only (interpret mode elsewhere is not a speed measurement)"
  return impls


def hybrid_impls(chunk, backend):
  impls = {
    "scan": lambda q, k, v: hybrid_chunk_attention_scan(
      q, k, v, chunk=chunk, decay=None, phi="elu1"
    )
  }
  if backend in ("gpu", "tpu"):
    impls["pallas_hybrid"] = lambda q, k, v: hybrid_chunk_attention(
      q, k, v, chunk=chunk, phi="elu1"
    )
  else:
    impls["pallas_hybrid"] = "GPU/TPU only (interpret mode on CPU is not a speed measurement)"
  return impls


def run(args):
  backend = jax.default_backend()
  dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
  rows = []
  for name, kind, b, h, d, arg, length in configs(args.quick):
    if args.batch:
      b = args.batch
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), dtype) for _ in range(3))
    if kind == "mask":
      pairs = float(arg.visible_counts(length).sum())
      fwd_flops = 4.0 * b * h * d * pairs
      impls = mask_impls(arg, length, backend)
      density = arg.density(length)
    else:
      fwd_flops = 4.0 * b * h * length * (arg * d + d * d)
      impls = hybrid_impls(arg, backend)
      density = None
    base = {}
    for impl, f in impls.items():
      row = {
        "config": name,
        "impl": impl,
        "batch": b,
        "heads": h,
        "head_dim": d,
        "length": length,
        "density": density,
        "dtype": jnp.dtype(dtype).name,
      }
      if isinstance(f, str):
        row["skipped"] = f
        rows.append(row)
        continue
      try:
        t_f = _median_time(jax.jit(f), (q, k, v), args.iters)
        t_fb = _median_time(_fwd_bwd(f), (q, k, v), args.iters)
      except Exception as e:  # noqa: BLE001 (a backend may refuse a shape; record why)
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        continue
      row.update(
        fwd_ms=1e3 * t_f,
        fwd_bwd_ms=1e3 * t_fb,
        fwd_tflops=fwd_flops / t_f / 1e12,
        fwd_bwd_tflops=3.5 * fwd_flops / t_fb / 1e12,
      )
      base[impl] = row
      rows.append(row)
    ref_name = "xla" if "xla" in base else "scan"
    for row in rows:
      if row["config"] != name or "fwd_ms" not in row:
        continue
      for other in (ref_name, "cudnn_dense_mask", "cudnn_unmasked"):
        if other in base and other != row["impl"]:
          row[f"fwd_speedup_vs_{other}"] = base[other]["fwd_ms"] / row["fwd_ms"]
          row[f"fwd_bwd_speedup_vs_{other}"] = base[other]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
  return rows


def print_table(rows):
  hdr = (
    f"{'config':20s} {'impl':17s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd TF/s':>9s} "
    f"{'f+b TF/s':>9s} {'f+b x ref':>9s}"
  )
  print(hdr)
  print("-" * len(hdr))
  for r in rows:
    if "skipped" in r:
      print(f"{r['config']:20s} {r['impl']:17s} skipped: {r['skipped']}")
      continue
    ref = r.get("fwd_bwd_speedup_vs_xla", r.get("fwd_bwd_speedup_vs_scan", 1.0))
    print(
      f"{r['config']:20s} {r['impl']:17s} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
      f"{r['fwd_tflops']:9.3f} {r['fwd_bwd_tflops']:9.3f} {ref:9.2f}"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the script)")
  parser.add_argument("--iters", type=int, default=None, help="timed runs (median)")
  parser.add_argument("--batch", type=int, default=None, help="override every batch size")
  parser.add_argument("--out", default=None, help="JSON path (default experiments/results/...)")
  args = parser.parse_args()
  args.iters = args.iters or (3 if args.quick else 20)
  backend = jax.default_backend()
  if backend == "cpu":
    print(
      "CPU backend: Pallas kernels would run in interpret mode, which measures nothing about "
      "their speed; only the xla paths are timed. Run on a GPU/TPU for kernel numbers."
    )
  rows = run(args)
  print_table(rows)
  device = jax.devices()[0]
  kind = re.sub(r"[^A-Za-z0-9]+", "_", getattr(device, "device_kind", backend)).strip("_").lower()
  out = args.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", f"bench_attention_{kind}.json"
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  meta = {
    "device": str(device),
    "device_kind": getattr(device, "device_kind", None),
    "backend": backend,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "quick": args.quick,
    "iters": args.iters,
    "flops": "useful: fwd 4*B*H*D*visible_pairs; fwd+bwd 3.5x fwd; hybrid 4*B*H*L*(C*D + D*Dv)",
  }
  with open(out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
