"""Model calls (sampling steps) per image of the raster successors, next to the papers' speed-ups.

    python experiments/sampling_steps.py --grids 8,16 --batch 4 \
        --out experiments/results/sampling_steps.json

For each token grid (8 x 8: the Fashion-MNIST models; 16 x 16: the official ImageNet 256 models)
every method samples a batch with its own jitted sampler and reports the model calls per image it
counted (`return_stats=True`; the class-token prefill included): raster (LlamaGen, a token per
call), PAR-4x / PAR-16x (`configs/par.py`), RandAR (`configs/randar.py`: N * 88 / 256 calls),
NAR (`configs/nar.py`), and speculative Jacobi decoding / LANTERN on the raster model
(`decode="sjd" | "lantern"`, window 16, LANTERN k = 1000, delta 0.1, on LlamaGen's codebook
size 16384 so that k pools the same fraction of it as in the paper). Step counts
of raster, PAR, RandAR and NAR are fixed by their schedules (random weights suffice); SJD and
LANTERN accept a number of drafts that depends on the model's distributions, so theirs are
measured on random weights with a non-zero head (`--head_std`) and say nothing about a trained
model. The models are the `smoke` sizes (tiny) with the tokenizer's image size set to the grid:
counts do not depend on the width. Step counts do not depend on CPU load; with `--runs R > 0`
the median wall-clock of R calls per row is also written, labelled with the load average it ran
under (the numbers of a loaded machine are not speed-ups of a quiet one).

The papers' figures (from the official READMEs and papers; `PAPERS` below) are speed-ups in
latency or throughput at comparable quality, not step counts; they sit next to ours for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from arvision import config_util, families

# method -> (what the paper reports, against what)
PAPERS = {
  "randar": "RandAR: ~2.5x faster with parallel decoding (88 steps for 256 tokens), FID 2.55 (L)",
  "par_4x": "PAR-4x: 3.6x speed-up at comparable quality (XL-4x FID 2.61)",
  "par_16x": "PAR-16x: up to 9.5x speed-up (3B-16x FID 2.88 vs 2.29 at 4x)",
  "nar": "NAR: 2.4x higher throughput than PAR-4x on ImageNet 256 with better FID",
  "lantern": "LANTERN: 1.75x (greedy) / 1.82x (random sampling) over plain speculative decoding",
}


SPEC_VOCAB = 16384  # LlamaGen's VQ-16 codebook


def family_for(name: str, grid: int):
  """`(config, family, params)`: the method's smoke config at a `grid` x `grid` token map."""
  spec = {"par_16x": "par.py:smoke_16x"}.get(name, f"{name.split('_')[0]}.py:smoke")
  if name in ("raster", "sjd", "lantern"):
    spec = "raster.py:smoke"
  c = mlc.ConfigDict(config_util.load_config_file(spec).to_dict())
  side = grid * 2 ** (len(c.tokenizer.config.model.ch_mult) - 1)
  c.tokenizer.config.data.image_size = side
  c.tokenizer.config.model.patch_nums = ()
  c.data.image_size = side
  if name == "randar":
    c.model.schedule_steps = max(1, round(grid * grid * 88 / 256))
  if name in ("sjd", "lantern"):  # LlamaGen's codebook size, so LANTERN pools 1000 of 16384
    c.tokenizer.config.model.vocab_size = SPEC_VOCAB
  tok = families.build(c.tokenizer.config)
  fam = families.build(c, tokenizer=tok)
  k_model, k_tok = jax.random.split(jax.random.key(0))
  params = {**fam.init(k_model, None), "tokenizer": {"ae": tok.init(k_tok, None)["ae"]}}
  return c, fam, params


def measure(name, grid, batch, runs, head_std) -> dict:
  config, fam, params = family_for(name, grid)
  kernel = params["output"]["kernel"]  # zero-initialised head: give the distributions a shape
  params["output"]["kernel"] = head_std * jax.random.normal(jax.random.key(1), kernel.shape)
  kw = dict(cfg=2.0, top_k=0, top_p=1.0, temperature=1.0)
  if name in ("sjd", "lantern"):
    kw.update(decode=name, window=16)
    if name == "lantern":
      kw.update(lantern_k=1000, lantern_delta=0.1)
  labels = jnp.arange(batch, dtype=jnp.int32) % fam.num_classes

  def call(seed=0):
    return fam.sample_tokens(params, labels, jax.random.key(seed), return_stats=True, **kw)

  stats = jax.block_until_ready(call()[3])
  calls = np.asarray(stats["calls"])
  N = fam.num_tokens
  row = dict(
    method=name,
    family=config.family,
    grid=grid,
    tokens=N,
    batch=batch,
    calls_per_image=float(calls.mean()),
    calls_min=int(calls.min()),
    calls_max=int(calls.max()),
    tokens_per_call=float(N / calls.mean()),
    sampling=kw,
  )
  row["vocab_size"] = fam.module.vocab_size
  if name in ("sjd", "lantern"):
    row["head_std"] = head_std
  if name == "lantern":
    row["lantern_k_effective"] = min(1000, fam.module.vocab_size - 1)
  if runs:
    times = []
    for r in range(runs):
      t0 = time.perf_counter()
      jax.block_until_ready(call(r + 1)[0])
      times.append(time.perf_counter() - t0)
    row["median_s"] = statistics.median(times)
    row["loadavg_1min"] = os.getloadavg()[0]
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--grids", default="8,16", help="comma-separated token grid sides")
  ap.add_argument(
    "--methods",
    default="raster,par_4x,par_16x,randar,nar,sjd,lantern",
    help="comma-separated subset of raster,par_4x,par_16x,randar,nar,sjd,lantern",
  )
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--runs", type=int, default=0, help="timed calls per row (0: steps only)")
  ap.add_argument("--head_std", type=float, default=0.1, help="std of the random head")
  ap.add_argument("--out", default="experiments/results/sampling_steps.json")
  args = ap.parse_args()
  grids = [int(g) for g in args.grids.split(",") if g]
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in ("raster", "par_4x", "par_16x", "randar", "nar", "sjd", "lantern"):
      raise SystemExit(f"--methods: unknown {m!r}")
  rows = []
  for grid in grids:
    for m in methods:
      if m == "par_16x" and grid % 4:
        continue
      row = measure(m, grid, args.batch, args.runs, args.head_std)
      rows.append(row)
      print(
        f"grid {grid:2d} {m:8s} {row['calls_per_image']:7.1f} calls/image "
        f"{row['tokens_per_call']:5.2f} tokens/call",
        flush=True,
      )
  by = {(r["grid"], r["method"]): r for r in rows}
  for r in rows:  # reductions against the baselines the papers use
    base = by.get((r["grid"], "raster"))
    if base:
      r["step_reduction_vs_raster"] = base["calls_per_image"] / r["calls_per_image"]
    if r["method"] == "nar" and (r["grid"], "par_4x") in by:
      r["step_reduction_vs_par_4x"] = (
        by[(r["grid"], "par_4x")]["calls_per_image"] / r["calls_per_image"]
      )
    if r["method"] == "lantern" and (r["grid"], "sjd") in by:
      r["step_reduction_vs_sjd"] = by[(r["grid"], "sjd")]["calls_per_image"] / r["calls_per_image"]
    if r["method"] in PAPERS:
      r["paper"] = PAPERS[r["method"]]
  rec = dict(
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
    platform=platform.platform(),
    cpu_count=os.cpu_count(),
    command="python experiments/sampling_steps.py "
    + f"--grids {args.grids} --methods {args.methods} --batch {args.batch} --runs {args.runs} "
    + f"--head_std {args.head_std} --out {args.out}",
    note="calls per image are counted by the samplers (load-independent); median_s, where "
    "present, ran on a shared, loaded 2-core CPU (loadavg_1min) and is not a speed-up",
    rows=rows,
    time=time.strftime("%Y-%m-%d %H:%M:%S"),
  )
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(rec, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
