"""Where a training step's time goes: arvision's XLA ops next to the official PyTorch ops.

    python experiments/profile_train_step.py --reference DIR --cases var_fmnist \
        --out experiments/results/profile_train_step_cpu.json

Same cases, models, batches and steps as experiments/bench_train.py (imported from it). Each side
runs a warm-up step, then `--steps` profiled steps:

- arvision: `jax.profiler.trace` of the jitted step; the trace's per-op events (XLA thunks: one per
  fusion / dot / copy / custom call) are summed by HLO instruction and grouped by kind with the
  optimized HLO of the compiled step (`dot`: GEMMs, fused or not; `reduce`, `loop` (elementwise),
  `copy/transpose`, `other`);
- official: `torch.profiler` (CPU), self time per aten op, grouped the same way (`dot`: mm, bmm,
  addmm, the SDPA kernels; `optimizer`: the AdamW kernels; ...).

With several XLA:CPU devices (two by default on a 2-core host), `collective` is the gradients'
all-reduce (the op's time includes each device waiting for the other), `collective_buffers` how
many buffers it moves and `rendezvous_per_step` how many cross-device waits the trace shows.

Times are per step (ms). They are wall time inside each op on the thread that ran it; XLA may run
independent thunks concurrently, so its op times can sum to more than the step. The JSON holds the
top ops of each side and the per-kind totals; `--label` names a run (e.g. before / after a change)
and `--append` adds it to an existing JSON.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402

# Cross-device ops: with several XLA:CPU devices (`arvision/xla_flags.py`), the gradients'
# all-reduce of the data-parallel split.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collective_buffers(hlo_text: str) -> int:
  """How many buffers the entry's collectives move (a tuple all-reduce counts each operand)."""
  n = 0
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\(", line)
    if m and m.group(2).removesuffix("-start") in COLLECTIVES:
      shape = m.group(1)
      n += shape.count("[") if shape.startswith("(") else 1
  return n


def hlo_kinds(hlo_text: str) -> dict:
  """`{instruction name: kind}` for the entry computation's instructions and fusions."""
  kinds = {}
  comps, cur = {}, None
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and "=" not in line.split("{")[0]:
      cur = m.group(1)
      comps[cur] = []
      continue
    if cur is not None:
      comps[cur].append(line)
  ops_of = {c: " ".join(lines) for c, lines in comps.items()}
  for _comp, lines in comps.items():
    for line in lines:
      m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(", line)
      if not m:
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\(.*?\)\s+([\w\-]+)\(", line)
      if not m:
        continue
      name, op = m.group(1), m.group(2)
      if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = ops_of.get(called.group(1), "") if called else ""
        kind = re.search(r"kind=(\w+)", line)
        if " dot(" in body or " convolution(" in body:
          kinds[name] = "dot"
        elif "__xnn" in line or "xnn" in (kind.group(1) if kind else ""):
          kinds[name] = "dot"
        elif " reduce(" in body or " reduce-window(" in body:
          kinds[name] = "reduce"
        elif " transpose(" in body and " copy(" not in body and body.count("(") < 6:
          kinds[name] = "copy/transpose"
        else:
          kinds[name] = "loop"
      elif op in ("dot", "convolution"):
        kinds[name] = "dot"
      elif op.removesuffix("-start") in COLLECTIVES:
        kinds[name] = "collective"
      elif op in ("copy", "transpose", "copy-start", "copy-done"):
        kinds[name] = "copy/transpose"
      elif op in ("reduce", "reduce-window"):
        kinds[name] = "reduce"
      elif op == "custom-call":
        kinds[name] = "dot" if re.search(r"xnn|onednn|matmul|dot", line, re.I) else "other"
      else:
        kinds.setdefault(name, "other")
  return kinds


def hlo_sources(hlo_text: str) -> dict:
  """`{instruction name: the jax op it came from}` (the HLO `op_name` metadata, shortened)."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]+)"', line)
    if m:
      out[m.group(1)] = m.group(2).replace("jit(train_step)/", "")
  return out


def profile_ours(config, fam, frozen, batch, steps: int) -> dict:
  step, setup = bench_train.ours_step(config, fam, frozen, batch)
  step()
  state = setup.init(setup.init_rng)
  dev_batch = jax.device_put(batch, setup.batch_sharding)
  hlo = setup.step.lower(state, dev_batch).compile().as_text()
  kinds = hlo_kinds(hlo)
  del state
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
      for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  rendezvous = 0  # XLA:CPU's cross-device waits (one per collective buffer and device)
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      for ev in line.events:
        name = ev.name
        if name in kinds:
          per_op[name] += ev.duration_ns
        elif name == "Rendezvous":
          rendezvous += 1
  ops_ms = {k: v / 1e6 / steps for k, v in per_op.items()}
  out = _summary(ops_ms, lambda n: kinds.get(n, "other"), wall, hlo_sources(hlo))
  out["devices"] = jax.device_count()
  out["collective_buffers"] = collective_buffers(hlo)
  out["rendezvous_per_step"] = rendezvous / steps
  return out


TORCH_KINDS = (
  (
    "dot",
    (
      "aten::mm",
      "aten::bmm",
      "aten::addmm",
      "aten::matmul",
      "aten::linear",
      "_scaled_dot_product",
      "aten::baddbmm",
      "aten::_flash",
      "aten::convolution",
    ),
  ),
  ("optimizer", ("adam", "Optimizer", "_foreach", "fused_adam")),
  ("reduce", ("sum", "mean", "norm", "softmax", "layer_norm", "max", "cross_entropy", "nll")),
  ("copy/transpose", ("copy_", "contiguous", "clone", "cat", "transpose", "permute", "to_copy")),
)


def _torch_kind(name: str) -> str:
  for kind, keys in TORCH_KINDS:
    if any(k in name for k in keys):
      return kind
  return "loop"


def profile_official(config, fam, batch, steps: int, reference: str) -> dict:
  import torch

  ref = os.path.join(reference, bench_train.OFFICIAL_DIRS[config.family])
  step, _ = bench_train.OFFICIAL_STEPS[config.family](ref, config, fam, batch)
  step()
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  wall = (time.perf_counter() - t0) / steps
  ops_ms = {}
  for e in prof.key_averages():
    if e.self_cpu_time_total > 0:
      ops_ms[e.key] = e.self_cpu_time_total / 1e3 / steps
  return _summary(ops_ms, _torch_kind, wall)


def _summary(ops_ms: dict, kind_of, wall_s: float, sources=None) -> dict:
  by_kind = collections.Counter()
  for n, ms in ops_ms.items():
    by_kind[kind_of(n)] += ms
  top = sorted(ops_ms.items(), key=lambda kv: -kv[1])[:40]
  return dict(
    step_ms_while_profiled=round(wall_s * 1e3, 1),
    op_ms_total=round(sum(ops_ms.values()), 1),
    by_kind_ms={k: round(v, 1) for k, v in by_kind.most_common()},
    top_ops_ms=[(n, kind_of(n), round(ms, 2), (sources or {}).get(n, "")) for n, ms in top],
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reference", default="")
  ap.add_argument("--cases", default="var_fmnist")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--label", default="")
  ap.add_argument("--append", action="store_true")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  import torch

  torch.set_num_threads(args.threads)
  rows = []
  for case in args.cases.split(","):
    config = bench_train.load_case(case)
    fam, frozen = bench_train.build_ours(config)
    batch = bench_train.token_batch(fam, config)
    row = dict(case=case, label=args.label, xla_flags=os.environ.get("XLA_FLAGS", ""))
    row["arvision"] = profile_ours(config, fam, frozen, batch, args.steps)
    if args.reference:
      row["official"] = profile_official(config, fam, batch, args.steps, args.reference)
    rows.append(row)
    print(json.dumps(row, indent=1), flush=True)
  doc = dict(
    what="per-op time of one training step (ms/step), arvision XLA vs official torch; see "
    "experiments/profile_train_step.py",
    device=f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
    host=dict(cpu_count=os.cpu_count(), loadavg_at_start=[round(x, 2) for x in os.getloadavg()]),
    versions=dict(jax=jax.__version__, torch=torch.__version__, python=platform.python_version()),
    command="python experiments/profile_train_step.py "
    + " ".join(a if not os.path.isabs(a) else "<dir>" for a in (argv or sys.argv[1:])),
    runs=rows,
  )
  if args.out:
    if args.append and os.path.exists(args.out):
      with open(args.out) as f:
        old = json.load(f)
      old["runs"].extend(rows)
      old["versions"], old["host"] = doc["versions"], doc["host"]
      doc = old
    with open(args.out, "w") as f:
      json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
