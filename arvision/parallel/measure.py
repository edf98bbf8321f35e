"""What a compiled step costs, as XLA reports it: collectives in the (post-SPMD-partitioning) HLO
text, the memory and FLOP analyses, and the peak FLOP/s per device kind for MFU.

`experiments/bench_sharding.py` records these per sharding strategy next to the formulas of
`arvision.parallel.cost`; `bench_table` renders its result (docs/scaling.md).
"""

from __future__ import annotations

import math
import re

# Peak dense bf16 FLOP/s per device by `device_kind` substring (first match wins).
PEAK_FLOPS = (
  ("H100", 989e12),
  ("H200", 989e12),
  ("A100", 312e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v6 lite", 918e12),
  ("TPU v6e", 918e12),
  ("TPU v4", 275e12),
)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
  "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
  "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
  "f32": 4, "s32": 4, "u32": 4,
  "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
# `%name = <shape or (tuple)> <op>[-start|-done](` in HLO text.
_OP_RE = re.compile(
  r"=\s*(?P<shape>\((?:[^()]|\([^()]*\))*\)|\S+)\s+(?P<op>"
  + "|".join(COLLECTIVES)
  + r")(?P<suffix>-start|-done)?\("
)
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")


def shape_bytes(text: str) -> int:
  """Bytes of every array shape in an HLO shape string (`f32[2,3]{1,0}`, tuples too)."""
  total = 0
  for dtype, dims in _SHAPE_RE.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


# A computation's header (unindented `[ENTRY ]%name (params) -> shape {`), a while instruction's
# body and known trip count, and any computation an instruction calls.
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(")
_WHILE_RE = re.compile(r"\swhile\(.*?\bbody=%?(?P<body>[\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_CALLS_RE = re.compile(
  r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)="
  r"(?:\{(?P<names>[^}]*)\}|(?P<name>%?[\w.\-]+))"
)


def computation_multiplicity(hlo_text: str, unknown_trip: int = 1) -> dict[str, int]:
  """How many times each computation of HLO text runs per execution of the entry: a while
  loop's body runs its known trip count times (`unknown_trip` where XLA does not annotate one;
  e.g. the backward of a scan), everything else once per call. XLA's `cost_analysis` and a
  static count of the text see a loop body once; a scanned model (`config.model.scan_layers`)
  puts every layer's work there."""
  calls: dict[str, list[tuple[str, int]]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _COMP_RE.match(line)
      current = m.group("name") if m and line.rstrip().endswith("{") else None
      if current is not None:
        calls.setdefault(current, [])
        if line.startswith("ENTRY"):
          entry = current
      continue
    if current is None:
      continue
    w = _WHILE_RE.search(line)
    body = w.group("body") if w else None
    trip = _TRIP_RE.search(line)
    n = int(trip.group("n")) if trip else unknown_trip
    for m in _CALLS_RE.finditer(line):
      for name in (m.group("names") or m.group("name")).split(","):
        name = name.strip().lstrip("%")
        calls[current].append((name, n if name == body else 1))
  mult: dict[str, int] = {}
  if entry is None:
    return mult

  def visit(name: str, times: int, depth: int = 0):
    if depth > 64:  # HLO call graphs are acyclic; a guard against a misparse
      return
    mult[name] = mult.get(name, 0) + times
    for callee, k in calls.get(name, []):
      visit(callee, times * k, depth + 1)

  visit(entry, 1)
  return mult


def count_collectives(hlo_text: str, unknown_trip: int | None = None) -> dict:
  """`{count, bytes, by_kind: {kind: {count, bytes}}}` of the collectives in HLO text.

  Static count by default; with `unknown_trip` (an int), each op counts as often as its
  computation runs (`computation_multiplicity`: loop bodies times their trip count)."""
  mult = None if unknown_trip is None else computation_multiplicity(hlo_text, unknown_trip)
  by_kind = {k: dict(count=0, bytes=0) for k in COLLECTIVES}
  times, current = 1, None
  for line in hlo_text.splitlines():
    if mult is not None and line and not line[0].isspace():
      m = _COMP_RE.match(line)
      current = m.group("name") if m else None
      times = mult.get(current, 1) if current else 1
      continue
    m = _OP_RE.search(line)
    if m is None or m.group("suffix") == "-start":
      continue
    k = by_kind[m.group("op")]
    k["count"] += times
    k["bytes"] += times * shape_bytes(m.group("shape"))
  by_kind = {k: v for k, v in by_kind.items() if v["count"]}
  return dict(
    count=sum(v["count"] for v in by_kind.values()),
    bytes=sum(v["bytes"] for v in by_kind.values()),
    by_kind=by_kind,
  )


def memory_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(
    argument=int(m.argument_size_in_bytes),
    output=int(m.output_size_in_bytes),
    temp=int(m.temp_size_in_bytes),
    generated_code=int(m.generated_code_size_in_bytes),
    alias=int(m.alias_size_in_bytes),
  )
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for key, value in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return value
  return None


# ------------------------------------------------------------------------------------------------
# Reports


def bench_table(result: dict) -> str:
  """The markdown table of an `experiments/bench_sharding.py` result (one row per strategy)."""

  def mb(x):
    return f"{x / 2**20:.2f}"

  lines = [
    "| strategy | mesh | step s | ex/s | loss | arg / out / temp MiB | formula ratio | "
    "collectives (n, MiB) | by kind | MFU |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items())
    if "skip" in r:
      lines.append(f"| {r['strategy']} | {mesh} | skipped: {r['skip']} ||||||||")
      continue
    m, c = r["memory_bytes"], r["collectives"]
    kinds = ", ".join(f"{k} {v['count']}" for k, v in c["by_kind"].items())
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    ratio = r["formula"]["ratio"]
    lines.append(
      f"| {r['strategy']} | {mesh} | {r['step_s']:.4f} | {r['examples_per_s']:.1f} | "
      f"{r['loss']:.6f} | {mb(m['argument'])} / {mb(m['output'])} / {mb(m['temp'])} | "
      f"{ratio:.3f} | {c['count']}, {mb(c['bytes'])} | {kinds} | {mfu} |"
    )
  return "\n".join(lines)
