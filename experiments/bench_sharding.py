"""Sharding benchmark: every strategy on the current devices, through the loop's own step.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python experiments/bench_sharding.py --config configs/var.py:smoke \
        --out experiments/results/bench_sharding_cpu8.json
    python experiments/bench_sharding.py --config configs/var.py:d16 --batch 64 \
        --out experiments/results/bench_sharding_gpu.json          # on an accelerator

For each strategy (`dp`, `fsdp`, `tp`, `fsdp_tp`, `hsdp`) a mesh over all n devices:
dp data=n; fsdp fsdp=n; tp tensor=t (the largest divisor of n that divides the heads) x data=n/t;
fsdp_tp fsdp=n/2 x tensor=2; hsdp data=2 x fsdp=n/2. A strategy that does not fit (too few
devices, heads not divisible, batch not divisible by the batch shards) is skipped with the reason.

Every strategy runs `arvision.train.build(config, family, frozen, mesh)` -- the loop's sharded
init and jitted, state-donating step -- from the same init seed on the same batches (random
tokenizer weights: the frozen tokenizer only has to be identical across strategies). The step is
AOT-compiled once (`step.lower(state, batch).compile()`); that executable is analysed and timed.

Row fields:
- `step_s`: median over `--steps` timed steps after `--warmup` untimed ones (`block_until_ready`);
  `examples_per_s` = batch / step_s; `compile_s`: lower + compile.
- `loss`: the training loss of the last step; `losses`: every step's.
- `memory_bytes`: `compiled.memory_analysis()` per device: argument, output, temp, generated
  code, alias (outputs donated into arguments) and total = argument + output - alias + temp.
- `flops_per_step`: analytic model FLOPs (`arvision.parallel.cost.flops_per_step`: 6 x params x
  tokens for per-token kernels, 6 x params x batch for per-example AdaLN kernels, attention
  12 x depth x C x visible (q, k) pairs x batch -- the block-causal mask's visible pairs, not the
  full square; `flops_per_step_dense_attention` has the square). The frozen tokenizer's encoder
  is not counted. `xla_flops`: `compiled.cost_analysis()["flops"]` (XLA's count of the per-device
  program, tokenizer included) x devices, for comparison.
- `mfu` = flops_per_step / (step_s x devices x peak bf16 FLOP/s per device); null where the
  device has no entry in `arvision.parallel.measure.PEAK_FLOPS` (CPU).
- `collectives`: ops in the compiled (post-SPMD-partitioning) HLO text: all-reduce,
  all-gather, reduce-scatter, all-to-all, collective-permute (async pairs counted once, at
  `-done`); bytes = the op's per-device result shape(s). Static counts: an op inside a loop
  body counts once. The CPU backend lowers reduce-scatter as all-reduce + slice.
- `formula`: the cost model's per-device argument bytes (`arvision.parallel.cost.argument_bytes`:
  params + AdamW m, v (+ EMA) under the strategy's rules, the frozen params, the batch shard)
  against the measured argument size (`ratio` = measured / formula).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import statistics
import time

import jax
import numpy as np

from arvision import config_util, data, families, parallel, train
from arvision.parallel import aot, cost, measure

STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp")

# ------------------------------------------------------------------------------------------------
# Meshes


def mesh_for(strategy: str, n: int, heads: int, batch: int) -> tuple[dict | None, str]:
  """`(mesh sizes, "")` for `strategy` on n devices, or `(None, reason)`."""
  if strategy == "dp":
    mesh = dict(data=n, fsdp=1, tensor=1)
  elif strategy == "fsdp":
    mesh = dict(data=1, fsdp=n, tensor=1)
  elif strategy == "tp":
    t = max(d for d in range(1, n + 1) if n % d == 0 and heads % d == 0)
    if t == 1:
      return None, f"no divisor > 1 of {n} devices divides heads={heads}"
    mesh = dict(data=n // t, fsdp=1, tensor=t)
  elif strategy == "fsdp_tp":
    if n < 4 or n % 2 or heads % 2:
      return None, f"needs an even device count >= 4 and even heads (n={n}, heads={heads})"
    mesh = dict(data=1, fsdp=n // 2, tensor=2)
  elif strategy == "hsdp":
    if n < 4 or n % 2:
      return None, f"needs an even device count >= 4 (n={n})"
    mesh = dict(data=2, fsdp=n // 2, tensor=1)
  else:
    raise ValueError(f"unknown strategy {strategy!r}; accepted: {STRATEGIES}")
  if n == 1 and strategy != "dp":
    return None, "one device: identical to dp"
  shards = mesh["data"] * mesh["fsdp"]
  if batch % shards:
    return None, f"batch {batch} is not divisible by {shards} batch shards"
  return mesh, ""


# ------------------------------------------------------------------------------------------------
# Model


def set_fields(config, fields: str):
  """`config` with comma-separated `dotted.field=value` overrides (`--set`) applied."""
  for item in filter(None, fields.split(",")):
    key, _, text = item.partition("=")
    *parents, leaf = key.strip().split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare word: a string
    node[leaf] = value  # the config is locked: an unknown field raises
  return config


def build(spec: str, batch: int | None, seed: int = 0, fields: str = ""):
  """`(config, family, frozen)` for a config spec, random tokenizer weights (no training).

  `fields`: comma-separated `dotted.field=value` overrides (`--set model.dtype=bfloat16`)."""
  config = config_util.load_config_file(spec)
  with config.unlocked():
    if batch:
      config.data.batch_size = batch
  set_fields(config, fields)
  tok = families.build(config.tokenizer.config) if families.needs_tokenizer(config) else None
  fam = families.build(config, tokenizer=tok)
  frozen = {}
  if tok is not None:
    tok_params = tok.init(jax.random.key(seed + 1), None)
    frozen["tokenizer"] = {"ae": tok_params["ae"]} if "ae" in tok_params else tok_params
  # Host copies: each strategy's init places them anew (the step donates the state it gets).
  return config, fam, jax.tree.map(np.asarray, frozen)


# ------------------------------------------------------------------------------------------------
# One strategy


def run_strategy(config, fam, frozen, model, strategy, mesh_sizes, host_batches, warmup, steps):
  with config.unlocked():
    config.sharding.strategy = strategy
    for a in ("data", "fsdp", "tensor"):
      config.mesh[a] = mesh_sizes[a]
  t_start = time.perf_counter()
  mesh = parallel.make_mesh(config.mesh)
  setup = train.build(config, fam, frozen, mesh)
  state = setup.init(setup.init_rng)
  batches = [parallel.global_batch(b, mesh) for b in host_batches]
  t0 = time.perf_counter()
  print(f"  init {time.perf_counter() - t_start:.1f} s", flush=True)
  compiled = setup.step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t0
  print(f"  compile {compile_s:.1f} s", flush=True)
  times, losses = [], []
  for i, batch in enumerate(batches[: warmup + steps]):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  n = mesh.size
  B = int(config.data.batch_size)
  step_s = statistics.median(times)
  fl = cost.flops_per_step(model, B)
  fl_dense = cost.flops_per_step(model, B, dense_attention=True)
  peak = measure.peak_flops(jax.devices()[0])
  xf = measure.xla_flops(compiled)
  mem = measure.memory_bytes(compiled)
  batch_dev = sum(
    math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    for s, x in ((setup.batch_sharding, x) for x in jax.tree.leaves(batches[0]))
  )
  formula = cost.argument_bytes(
    model, fam, frozen, setup.rules, mesh_sizes, batch_dev, "ema" in setup.shardings
  )
  state_dev = sum(
    math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    for a, s in zip(
      jax.tree.leaves(setup.abstract_state), jax.tree.leaves(setup.shardings), strict=True
    )
  )
  formula["measured_argument"] = mem.get("argument")
  formula["from_shardings"] = state_dev + batch_dev
  formula["ratio"] = mem["argument"] / formula["total"] if mem else None
  del state
  return dict(
    strategy=strategy,
    mesh={k: v for k, v in mesh_sizes.items() if v > 1} or dict(data=1),
    devices=n,
    batch=B,
    step_s=step_s,
    examples_per_s=B / step_s,
    compile_s=compile_s,
    loss=losses[-1],
    losses=losses,
    memory_bytes=mem,
    flops_per_step=fl["total"],
    flops_per_step_dense_attention=fl_dense["total"],
    xla_flops=None if xf is None else xf * n,
    mfu=None if peak is None else fl["total"] / (step_s * n * peak),
    collectives=measure.count_collectives(compiled.as_text()),
    formula=formula,
  )


# ------------------------------------------------------------------------------------------------
# Output


def loss_spread(rows) -> float | None:
  losses = [r["loss"] for r in rows if "loss" in r]
  if not losses:
    return None
  return (max(losses) - min(losses)) / max(abs(statistics.mean(losses)), 1e-12)


TPU_MODELS = ("var.py:d30", "var.py:d36", "raster.py:XL", "raster.py:3B", "mar.py:H")
TPU_TOPOLOGIES = ("v5p:4x4x8", "v6e:16x16", "v5e:16x16")


def topology_row(spec, config, fam, frozen, model, topology, strategy, mesh, report=None):
  """One (model, slice, strategy): the step compiled for the slice (`parallel.aot`; or `report`,
  an `arvision compile --json` output of it) next to the analytic model
  (`parallel.cost.per_device`, flash attention, no remat)."""
  chip = aot.chip_of(topology)
  fields = {"sharding.strategy": strategy} | {f"mesh.{a}": v for a, v in mesh.items()}
  r = report or aot.compile_step(aot.with_fields(config, fields), topology)
  B = int(config.data.batch_size)
  shards = mesh["data"] * mesh["fsdp"]
  example = data.input_spec(config.data, 1)
  batch_dev = sum(x.nbytes for x in example.values()) * B // shards
  rules = parallel.get_rules(strategy)
  analytic = cost.per_device(model, strategy, mesh, rules=rules, hbm_bytes=chip.hbm_bytes)
  args = cost.argument_bytes(model, fam, frozen, rules, mesh, batch_dev, model.ema)
  acts = analytic["memory"]["activations_per_example"]["flash"] * analytic["examples_per_device"]
  formula = dict(
    arguments=args["total"],
    grads=analytic["memory"]["grads"],
    activations=acts,
    total=args["total"] + analytic["memory"]["grads"] + acts,
  )
  needed = aot.needed_bytes(r)
  formula["ratio"] = needed / formula["total"]
  if r["memory_bytes"]:
    formula["argument_ratio"] = r["memory_bytes"]["argument"] / args["total"]
  return dict(
    model=spec,
    topology=topology,
    chips=r["chips"],
    strategy=strategy,
    mesh={k: v for k, v in mesh.items() if v > 1},
    batch=B,
    per_chip_batch=B / shards,
    scan_layers=bool(config.model.get("scan_layers", False)),
    fits=r["fits"],
    needed_bytes=needed,
    hbm_bytes=chip.hbm_bytes,
    memory_bytes=r["memory_bytes"],
    out_of_memory=r.get("out_of_memory"),
    flops=r["flops"],
    bytes_accessed=r["bytes_accessed"],
    collectives=r["collectives"],
    roofline=r["roofline"],
    model_flops=r.get("model_flops"),
    formula=formula,
    compile_s=r["compile_s"],
  )


def run_topologies(args) -> dict:
  """`--topology`: every model x slice x strategy compiled for the slice; JSON after every row
  (an interrupted run resumes with the rows it has)."""
  out = dict(rows=[])
  if args.out and os.path.exists(args.out):
    with open(args.out) as f:
      out = json.load(f)
  for path in filter(None, args.merge.split(",")):  # rows of runs made in parallel
    with open(path) as f:
      have = {(r["model"], r["topology"], r["strategy"]) for r in out["rows"]}
      out["rows"] += [
        r for r in json.load(f)["rows"] if (r["model"], r["topology"], r["strategy"]) not in have
      ]
    out.update(_provenance(args))
    if args.out:  # a merge alone (no --models, no --reports) is saved too
      _write(args.out, out)
  for path in filter(None, args.reports.split(",")):  # `arvision compile --json` outputs
    with open(path) as f:
      rep = json.load(f)
    c = rep["config"]
    spec = f"{c['family']}.py:{c['variant']}"
    config = set_fields(config_util.load_config_file(os.path.join("configs", spec)), args.set)
    if c.get("scan_layers"):  # the report's layout
      set_fields(config, "model.scan_layers=True")
    fam, frozen = aot.abstract_family(config)
    model = cost.model_from_family(spec, config, fam)
    row = topology_row(
      spec, config, fam, frozen, model, rep["topology"], c["strategy"], c["mesh"], report=rep
    )
    row["from_report"] = os.path.basename(path)
    out["rows"] = [
      r
      for r in out["rows"]
      if (r["model"], r["topology"], r["strategy"]) != (spec, rep["topology"], c["strategy"])
    ] + [row]
    print(f"{spec} on {rep['topology']}, {c['strategy']} (from {path}): {topology_line(row)}")
    out.update(_provenance(args))
    if args.out:
      _write(args.out, out)
  done = {(r["model"], r["topology"], r["strategy"]) for r in out["rows"]}
  for spec in filter(None, args.models.split(",")):
    path = spec if os.path.exists(spec) else os.path.join("configs", spec)
    config = set_fields(config_util.load_config_file(path), args.set)
    fam, frozen = aot.abstract_family(config)
    model = cost.model_from_family(spec, config, fam)
    for topology in args.topology.split(","):
      n = len(aot.topology_devices(topology))
      for strategy in args.strategies.split(","):
        if (spec, topology, strategy) in done:
          continue
        mesh = aot.default_mesh(strategy, n, model.heads)
        shards = mesh["data"] * mesh["fsdp"]
        B = int(config.data.batch_size)
        if B % shards:
          row = dict(model=spec, topology=topology, strategy=strategy, mesh=mesh,
                     skip=f"batch {B} is not divisible by {shards} batch shards")  # fmt: skip
        else:
          print(f"{spec} on {topology}, {strategy} {mesh} ...", flush=True)
          try:
            row = topology_row(spec, config, fam, frozen, model, topology, strategy, mesh)
          except Exception as e:  # noqa: BLE001 (a row that fails to compile is a result)
            row = dict(model=spec, topology=topology, strategy=strategy, mesh=mesh,
                       error=f"{type(e).__name__}: {e}"[:500])  # fmt: skip
          print("  " + topology_line(row), flush=True)
        out["rows"].append(row)
        out.update(_provenance(args))
        if args.out:
          _write(args.out, out)
  return out


def _provenance(args) -> dict:
  import flax  # noqa: PLC0415

  return dict(
    command="python experiments/bench_sharding.py --topology " + args.topology
    + " --models " + args.models + " --strategies " + args.strategies
    + (" --merge " + args.merge if args.merge else "")
    + (" --reports " + args.reports if args.reports else "")
    + (" --set " + args.set if args.set else ""),
    host=platform.machine(),
    versions=dict(jax=jax.__version__, flax=flax.__version__, libtpu=aot._libtpu_version(),
                  python=platform.python_version()),
    note="compiled ahead of time on a CPU host (no TPU): memory from the TPU compiler, step "
    "time a roofline estimate from the chip table (arvision/parallel/chips.py), not measured",
  )  # fmt: skip


def _write(path, out):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(aot.to_json(out), f, indent=1)


def _gib(x):
  return f"{x / 2**30:.1f}"


def topology_line(r) -> str:
  if "skip" in r:
    return f"skipped: {r['skip']}"
  if "error" in r:
    return f"failed: {r['error']}"
  verdict = "fits" if r["fits"] else "DOES NOT FIT"
  step = r["roofline"]["step_s"] if r["roofline"] else None
  return (
    f"{_gib(r['needed_bytes'])} GiB of {_gib(r['hbm_bytes'])} ({verdict}), formula ratio "
    f"{r['formula']['ratio']:.2f}" + (f", step >= {step * 1e3:.0f} ms" if step else "")
  )


def topology_table(result: dict) -> str:
  """Markdown: one row per model x slice x strategy."""
  lines = [
    "| model | slice | strategy | mesh | batch/chip | GiB/chip (compiler) | fits | formula GiB | "
    "ratio | collectives (n, GiB) | roofline step ms (bound) | MFU at roofline |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    # A scanned program (config.model.scan_layers) is another program: its compiler memory
    # differs from the unrolled one's (docs/scaling.md), so the row says which it is.
    strategy = r["strategy"] + (" (scan_layers)" if r.get("scan_layers") else "")
    head = f"| {r['model']} | {r['topology']} | {strategy} | {mesh} |"
    if "skip" in r or "error" in r:
      lines.append(f"{head} {'skipped: ' + r['skip'] if 'skip' in r else 'failed'} |||||||")
      continue
    f = r["formula"]
    if r["roofline"]:
      c, rf = r["collectives"], r["roofline"]
      coll = f"{c['count']}, {c['bytes'] / 2**30:.2f}"
      step = f"{rf['step_s'] * 1e3:,.0f} ({rf['bound']})"
      mfu = f"{100 * rf['mfu']:.0f}%" if rf.get("mfu") else "-"
    else:
      coll, step, mfu = "-", "- (compiler: out of HBM)", "-"
    lines.append(
      f"{head} {r['per_chip_batch']:g} | {_gib(r['needed_bytes'])} | "
      f"{'yes' if r['fits'] else '**no**'} | {_gib(f['total'])} | {f['ratio']:.2f} | {coll} | "
      f"{step} | {mfu} |"
    )
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--topology",
    default="",
    help="compile for these TPU slices instead of running here, e.g. v5p:4x4x8,v6e:16x16 "
    "(needs libtpu: the aot extra); with --models",
  )
  ap.add_argument("--models", default=",".join(TPU_MODELS), help="with --topology: config specs")
  ap.add_argument("--docs", default="", help="with --topology: markdown file to update")
  ap.add_argument(
    "--merge", default="", help="with --topology: JSONs of other --topology runs to take rows from"
  )
  ap.add_argument(
    "--reports",
    default="",
    help="with --topology: `arvision compile --json` outputs to turn into rows (no recompiling)",
  )
  ap.add_argument("--config", default="configs/var.py:smoke")
  ap.add_argument("--out", default="")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per strategy")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
  ap.add_argument("--strategies", default=",".join(STRATEGIES))
  ap.add_argument("--set", default="", help="config fields, e.g. model.dtype=bfloat16,remat=block")
  args = ap.parse_args(argv)
  if args.topology:
    result = run_topologies(args)
    text = topology_table(result)
    print(text)
    if args.docs:
      from scaling_model import replace_block  # noqa: PLC0415 (a sibling script)

      replace_block(args.docs, "bench_sharding_tpu", text)
    return result

  config, fam, frozen = build(args.config, args.batch, fields=args.set)
  model = cost.model_from_family(args.config, config, fam)
  B = int(config.data.batch_size)
  it = data.make_train_iter(config.data, seed=config.seed)
  host_batches = [next(it) for _ in range(args.warmup + args.steps)]
  n = jax.device_count()
  rows = []
  for strategy in args.strategies.split(","):
    mesh, reason = mesh_for(strategy, n, model.heads, B)
    if mesh is None:
      print(f"skip {strategy}: {reason}")
      rows.append(dict(strategy=strategy, mesh={}, skip=reason))
      continue
    print(f"running {strategy} on mesh {mesh} ...", flush=True)
    rows.append(
      run_strategy(
        config, fam, frozen, model, strategy, mesh, host_batches, args.warmup, args.steps
      )
    )
  import flax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  d = jax.devices()[0]
  result = dict(
    device=dict(
      platform=d.platform, kind=d.device_kind, count=n, host=platform.machine(),
      peak_flops=measure.peak_flops(d),
    ),
    versions=dict(
      jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
      flax=flax.__version__, optax=optax.__version__, python=platform.python_version(),
    ),
    config=dict(
      spec=args.config, set=args.set, dtype=config.model.get("dtype", "float32"), batch=B,
      steps=args.steps, warmup=args.warmup,
      params=model.num_params, depth=model.depth, width=model.width, heads=model.heads,
      seq_len=model.seq_len,
    ),
    loss_rel_spread=loss_spread(rows),
    rows=rows,
  )  # fmt: skip
  text = measure.bench_table(result)
  print(text)
  print(f"loss relative spread across strategies: {result['loss_rel_spread']:.3g}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
