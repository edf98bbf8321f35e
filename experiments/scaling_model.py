"""Scaling model: per-chip memory, FLOPs and communication per train step under each strategy.

    python experiments/scaling_model.py --out experiments/results/scaling_model.json \
        --bench experiments/results/bench_sharding_cpu8.json --docs docs/scaling.md

Applies the cost model of `arvision.parallel.cost` (its docstring states the formulas; the same
functions give `experiments/bench_sharding.py` its formula column, checked there against the
compiled memory analysis of small runs) to VAR-d30, VAR-d36 and a LlamaGen-3B-sized model on TPU
v5p slices and H100 nodes. Each model's leaves come from the real families (`jax.eval_shape`,
nothing allocated): `configs/var.py:d30` / `d36` (256px: L = 680; d36 also at 512px: L = 2240)
and `configs/raster.py:3B,image_size=256` (LlamaGen GPT-3B: dim 3200, 24 layers, 32 heads, SwiGLU
hidden 8704, vocab 16384; T = 256 = class token + 255 tokens).

Time = bytes / effective bandwidth of the mesh axis (figures and sources in `PLATFORMS`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from arvision.parallel import cost, measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` (not a package) for the official patch schedules
  sys.path.insert(0, ROOT)

STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp")

# Peak dense bf16 FLOP/s per chip, HBM bytes per chip, and effective collective bandwidth
# (bytes/s per device, one direction) for a mesh axis placed as described.
PLATFORMS = {
  "tpu_v5p": dict(
    name="TPU v5p",
    peak_flops=459e12,
    hbm_bytes=95e9,
    # Cloud TPU v5p docs: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s, 3D torus, 1200 GB/s
    # bidirectional ICI per chip (4800 Gbps) = 6 links x 100 GB/s per direction. A bidirectional
    # ring along one torus dimension drives 2 links per direction: 200 GB/s; an axis spanning k
    # torus dimensions: k x 200 GB/s. The tensor axis gets 1 dimension, fsdp 2 (or 3 alone), data
    # 1 next to fsdp (3 alone).
    link_bw=100e9,
    source="cloud.google.com/tpu/docs/v5p (459 TF bf16, 95 GB, 1200 GB/s bidirectional ICI)",
  ),
  "h100": dict(
    name="8xH100 nodes",
    peak_flops=989e12,
    hbm_bytes=80e9,
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 with sparsity), 80 GB HBM3,
    # NVLink 4 900 GB/s bidirectional = 450 GB/s per direction through NVSwitch within a node.
    # Between nodes: 8 x 400 Gb/s InfiniBand NDR per node = 50 GB/s per GPU per direction.
    nvlink_bw=450e9,
    ib_bw=50e9,
    source="NVIDIA H100 SXM datasheet (989 TF bf16 dense, 80 GB, NVLink 900 GB/s); 400G IB/GPU",
  ),
}


def axis_bandwidth(platform: str, mesh: dict[str, int]) -> dict[str, float]:
  """Effective per-device bandwidth (bytes/s, one direction) of each mesh axis."""
  p = PLATFORMS[platform]
  used = [a for a in ("data", "fsdp", "tensor") if mesh.get(a, 1) > 1]
  if platform == "tpu_v5p":
    dims = {a: 0 for a in ("data", "fsdp", "tensor")}
    left = 3
    if "tensor" in used:
      dims["tensor"], left = 1, 2
    rest = [a for a in ("fsdp", "data") if a in used]
    if len(rest) == 1:
      dims[rest[0]] = left
    elif len(rest) == 2:
      dims["fsdp"], dims["data"] = left - 1, 1
    return {a: 2 * p["link_bw"] * max(k, 1) for a, k in dims.items()}
  # H100: the innermost axes fill a node (8 GPUs, NVLink); an axis that leaves the node is IB-bound.
  out, inner = {}, 1
  for a in ("tensor", "fsdp", "data"):
    inner *= mesh.get(a, 1)
    out[a] = p["nvlink_bw"] if inner <= 8 else p["ib_bw"]
  return out


# ------------------------------------------------------------------------------------------------
# Models


def _build(spec: str, **overrides):
  from arvision import config_util, families  # noqa: PLC0415

  config = config_util.load_config_file(spec)
  with config.unlocked():
    for key, value in overrides.items():
      target = config
      *parents, leaf = key.split(".")
      for p in parents:
        target = target[p]
      target[leaf] = value
  tok = families.build(config.tokenizer.config)
  return config, families.build(config, tokenizer=tok)


def _var_model(variant: str, reso: int) -> cost.Model:
  """VAR-dN at `reso` from `configs/var.py:<variant>` (the real family's leaves)."""
  from configs import var as var_cfg  # noqa: PLC0415

  pn = var_cfg.PATCH_NUMS_512 if reso == 512 else var_cfg.PATCH_NUMS_256
  config, fam = _build(
    f"configs/var.py:{variant}",
    **{
      "tokenizer.config.model.patch_nums": pn,
      "tokenizer.config.data.image_size": reso,
      "data.image_size": reso,
    },
  )
  return cost.model_from_family(f"VAR-{variant} {reso}px", config, fam)


def llamagen_3b() -> cost.Model:
  """LlamaGen GPT-3B at 256px from `configs/raster.py:3B` (official sizes: dim 3200, 24 layers,
  32 heads, SwiGLU hidden 8704, vocab 16384; T = 256 = class token + 255 tokens)."""
  config, fam = _build("configs/raster.py:3B,image_size=256")
  return cost.model_from_family("LlamaGen-3B 256px", config, fam)


def models() -> list[cost.Model]:
  return [_var_model("d30", 256), _var_model("d36", 256), _var_model("d36", 512), llamagen_3b()]


# ------------------------------------------------------------------------------------------------
# Meshes at scale


def tensor_size(heads: int, n: int, cap: int = 8) -> int:
  """The largest t <= cap dividing both the heads and the device count."""
  return max(t for t in range(1, cap + 1) if heads % t == 0 and n % t == 0)


def scale_mesh(strategy: str, n: int, heads: int, fsdp_group: int = 8) -> dict[str, int]:
  """The mesh a strategy uses on n devices (tensor parallelism inside a node / torus dimension)."""
  t = tensor_size(heads, n)
  if strategy == "dp":
    return dict(data=n)
  if strategy == "fsdp":
    return dict(fsdp=n)
  if strategy == "tp":
    return dict(data=n // t, tensor=t)
  if strategy == "fsdp_tp":
    return dict(fsdp=n // t, tensor=t)
  if strategy == "hsdp":
    f = min(fsdp_group, n)
    return dict(data=n // f, fsdp=f)
  raise ValueError(f"unknown strategy {strategy!r}; accepted: {STRATEGIES}")


SCENARIOS = (("tpu_v5p", 64), ("tpu_v5p", 512), ("h100", 8), ("h100", 64))


def scale_rows(model: cost.Model) -> list[dict]:
  rows = []
  for platform, n in SCENARIOS:
    p = PLATFORMS[platform]
    fl = cost.flops_per_step(model, model.batch)
    compute_s = fl["total"] / (n * p["peak_flops"])
    for strategy in STRATEGIES:
      mesh = scale_mesh(strategy, n, model.heads)
      d, f = mesh.get("data", 1), mesh.get("fsdp", 1)
      row = dict(model=model.name, platform=platform, chips=n, strategy=strategy, mesh=mesh)
      if model.batch < d * f:
        row["skip"] = f"global batch {model.batch} < {d * f} batch shards"
        rows.append(row)
        continue
      r = cost.per_device(model, strategy, mesh, hbm_bytes=p["hbm_bytes"])
      bw = axis_bandwidth(platform, mesh)
      comm_s = sum(r["comm_bytes"][a] / bw[a] for a in ("data", "fsdp", "tensor"))
      row.update(r)
      row.update(compute_s_at_peak=compute_s, comm_s=comm_s, comm_over_compute=comm_s / compute_s)
      rows.append(row)
  return rows


# ------------------------------------------------------------------------------------------------
# Output


def _gb(x) -> str:
  return f"{x / 1e9:.1f}"


def markdown(result: dict) -> str:
  out = []
  for m in result["models"]:
    fl = m["flops_per_step"]
    out.append(
      f"#### {m['name']}: {m['params'] / 1e9:.3f} B params, L = {m['seq_len']}, global batch "
      f"{m['batch']}, {fl['total'] / 1e15:.1f} PFLOP/step "
      f"(attention {100 * fl['attention'] / fl['total']:.0f}%)"
    )
    out.append("")
    out.append(
      "| platform | chips | strategy | mesh | ex/dev | state GB | act GB/ex (dense / flash / "
      "remat) | max micro-batch (dense / flash / remat) | accum (flash / remat) | comm GB/dev (data, fsdp, "
      "tensor) | comm s | compute s @peak |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
      if r["model"] != m["name"]:
        continue
      mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items())
      plat = PLATFORMS[r["platform"]]["name"]
      if "skip" in r:
        out.append(
          f"| {plat} | {r['chips']} | {r['strategy']} | {mesh} | skip: {r['skip']} |||||||"
        )
        continue
      mem, c = r["memory"], r["comm_bytes"]
      ape, mmb = mem["activations_per_example"], mem["max_micro_batch"]
      acc = " / ".join(
        "-" if mem["accum"][k] is None else str(mem["accum"][k]) for k in ("flash", "remat")
      )
      out.append(
        f"| {plat} | {r['chips']} | {r['strategy']} | {mesh} | {r['examples_per_device']:g} | "
        f"{_gb(mem['state'])} | {ape['dense'] / 1e9:.2f} / {ape['flash'] / 1e9:.2f} / "
        f"{ape['remat'] / 1e9:.2f} | {mmb['dense']} / {mmb['flash']} / {mmb['remat']} | "
        f"{acc} | {_gb(c['total'])} ({_gb(c['data'])}, {_gb(c['fsdp'])}, "
        f"{_gb(c['tensor'])}) | {r['comm_s']:.3f} | {r['compute_s_at_peak']:.3f} |"
      )
    out.append("")
  return "\n".join(out)


def replace_block(path: str, tag: str, text: str) -> None:
  """Replaces the text between `<!-- BEGIN tag -->` and `<!-- END tag -->` in `path`."""
  with open(path) as f:
    doc = f.read()
  begin, end = f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->"
  if begin not in doc or end not in doc:
    raise ValueError(f"{path} has no {begin} ... {end} block")
  head, rest = doc.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")


def run() -> dict:
  ms = models()
  rows = [r for m in ms for r in scale_rows(m)]
  return dict(
    platforms=PLATFORMS,
    assumptions=dict(
      state_dtype="fp32 params, grads, AdamW m and v (arvision's loop)",
      activation_bytes=4,
      collectives="ring: all-reduce 2(n-1)/n S, all-gather / reduce-scatter (n-1)/n S; fsdp "
      "gathers the weights in forward and again in backward",
      batch="official global batch; examples per device = batch / (data*fsdp), split into "
      "`accum` micro-batches of the largest remat + flash micro-batch that fits in HBM",
      tensor="largest divisor of the heads and the chip count <= 8",
      hsdp="fsdp groups of 8 chips, data-parallel across groups",
    ),
    models=[
      dict(
        name=m.name,
        params=m.num_params,
        depth=m.depth,
        width=m.width,
        heads=m.heads,
        mlp_hidden=m.mlp_hidden,
        seq_len=m.seq_len,
        vocab=m.vocab,
        batch=m.batch,
        visible_pairs=m.visible_pairs,
        flops_per_step=cost.flops_per_step(m, m.batch),
        flops_per_step_dense_attention=cost.flops_per_step(m, m.batch, dense_attention=True),
      )
      for m in ms
    ],
    rows=rows,
  )


def validation_markdown(benches: list[dict]) -> str:
  """The benchmark tables and the formula-vs-compiled argument bytes, from bench JSONs."""
  out = []
  for bench in benches:
    d, c = bench["device"], bench["config"]
    out += [
      f"#### `{c['spec']}` on {d['count']} x {d['kind']} ({c['params']:,} params, batch "
      f"{c['batch']}, L = {c['seq_len']}; {c['steps']} timed steps after {c['warmup']} warm-up; "
      f"loss relative spread {bench['loss_rel_spread']:.2g})",
      "",
      measure.bench_table(bench),
      "",
      "| strategy | mesh | params | AdamW m+v | frozen | batch | formula total | compiled "
      "argument | ratio |",
      "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["rows"]:
      if "skip" in r:
        continue
      f = r["formula"]
      mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items())
      out.append(
        f"| {r['strategy']} | {mesh} | {f['params']:,} | {f['optimizer']:,} | {f['frozen']:,} | "
        f"{f['batch']:,} | {f['total']:,} | {f['measured_argument']:,} | {f['ratio']:.5f} |"
      )
    out.append("")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="experiments/results/scaling_model.json")
  ap.add_argument("--docs", default="", help="markdown file whose generated blocks to update")
  ap.add_argument(
    "--bench", action="append", default=[], help="bench_sharding JSON(s) validating the formulas"
  )
  args = ap.parse_args(argv)
  result = run()
  benches = []
  for path in args.bench:
    with open(path) as f:
      benches.append(json.load(f))
  result["validation"] = [
    dict(
      source=os.path.relpath(os.path.abspath(path), ROOT),
      config=bench["config"]["spec"],
      rows=[
        dict(strategy=r["strategy"], mesh=r["mesh"], **r["formula"])
        for r in bench["rows"]
        if "skip" not in r
      ],
    )
    for path, bench in zip(args.bench, benches, strict=True)
  ]
  text = markdown(result)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")
  if args.docs:
    replace_block(args.docs, "scaling_model", text)
    if benches:
      replace_block(args.docs, "bench_sharding", validation_markdown(benches))
    print(f"updated {args.docs}")


if __name__ == "__main__":
  main()
