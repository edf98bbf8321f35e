"""Where a TPU step's memory goes beyond the cost model: the same model compiled at a few depths.

    python experiments/aot_memory_breakdown.py --config var.py:d30 --topology v5p:4x4x8 \
      --strategy fsdp --depths 2,4 --out experiments/results/aot_memory_breakdown_var_d30.json

The full-depth compile (`arvision compile`) gives one total; compiling the same width, heads,
batch and mesh at two depths splits the compiler's temporaries into a per-layer slope and a
depth-independent part, each next to the cost model (`arvision.parallel.cost`: sharded fp32
gradients + flash-attention activations per layer). The largest collectives of the compiled HLO
(per-chip result shapes) say how gradients cross the mesh: an all-reduce whose result is a full
weight means every chip holds that weight's whole fp32 gradient, which the formula (gradients
reduce-scattered to their shards) does not count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax

from arvision import config_util, data, parallel
from arvision.parallel import aot, cost, measure

GiB = 2**30


def _largest_collectives(hlo: str, top: int) -> list[dict]:
  rows = []
  for line in hlo.splitlines():
    m = measure._OP_RE.search(line)  # noqa: SLF001 (the same parser the report uses)
    if m is None or m.group("suffix") == "-start":
      continue
    rows.append(dict(op=m.group("op"), bytes=measure.shape_bytes(m.group("shape")),
                     shape=re.sub(r"\{[^}]*\}", "", m.group("shape"))[:200]))  # fmt: skip
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:top]


def one_depth(base, topology: str, strategy: str, depth: int, top: int) -> dict:
  fields = {
    "sharding.strategy": strategy,
    "model.depth": depth,
    "model.width": base["width"],
    "model.num_heads": base["heads"],
  }
  config = aot.with_fields(base["config"], fields)
  captured = {}
  analyse = aot.analyse

  def keep_hlo(compiled, chip, n):  # the report, plus the compiled HLO for the collectives
    captured["hlo"] = compiled.as_text()
    return analyse(compiled, chip, n)

  aot.analyse = keep_hlo
  try:
    t0 = time.process_time()
    r = aot.compile_step(config, topology)
    cpu_s = time.process_time() - t0
  finally:
    aot.analyse = analyse
  fam, frozen = aot.abstract_family(config)
  model = cost.model_from_family(base["spec"], config, fam)
  mesh = r["config"]["mesh"]
  rules = parallel.get_rules(strategy)
  chip = aot.chip_of(topology)
  analytic = cost.per_device(model, strategy, mesh, rules=rules, hbm_bytes=chip.hbm_bytes)
  B = int(config.data.batch_size)
  example = data.input_spec(config.data, 1)
  batch_dev = sum(x.nbytes for x in example.values()) * B // (mesh["data"] * mesh["fsdp"])
  args = cost.argument_bytes(model, fam, frozen, rules, mesh, batch_dev, model.ema)
  acts = analytic["memory"]["activations_per_example"]["flash"] * analytic["examples_per_device"]
  mem = r["memory_bytes"]
  return dict(
    depth=depth,
    params=model.num_params,
    param_bytes_fp32=4 * model.num_params,
    compile_cpu_s=round(cpu_s, 1),
    compiler=dict(arguments=mem["argument"], temporaries=mem["temp"], total=mem["total"]),
    formula=dict(arguments=args["total"], grads=analytic["memory"]["grads"], activations=acts),
    collectives=r["collectives"],
    largest_collectives=_largest_collectives(captured["hlo"], top),
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="var.py:d30")
  ap.add_argument("--topology", default="v5p:4x4x8")
  ap.add_argument("--strategy", default="fsdp")
  ap.add_argument("--depths", default="2,4")
  ap.add_argument("--top", type=int, default=8)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  config = config_util.load_config_file(os.path.join("configs", args.config))
  fam, _ = aot.abstract_family(config)
  full = cost.model_from_family(args.config, config, fam)
  base = dict(spec=args.config, config=config, width=full.width, heads=full.heads)
  rows = [one_depth(base, args.topology, args.strategy, int(d), args.top)
          for d in args.depths.split(",")]  # fmt: skip
  a, b = rows[0], rows[-1]
  per_layer = lambda key, part: (b[part][key] - a[part][key]) / (b["depth"] - a["depth"])
  fit = dict(
    temporaries_per_layer=per_layer("temporaries", "compiler"),
    formula_activations_per_layer=per_layer("activations", "formula"),
    formula_grads_per_layer=per_layer("grads", "formula"),
    param_bytes_per_layer=(b["param_bytes_fp32"] - a["param_bytes_fp32"])
    / (b["depth"] - a["depth"]),
  )
  fit["temporaries_at_0_layers"] = (
    a["compiler"]["temporaries"] - a["depth"] * fit["temporaries_per_layer"]
  )
  fit["temporaries_at_full_depth"] = (
    fit["temporaries_at_0_layers"] + full.depth * fit["temporaries_per_layer"]
  )
  out = dict(
    config=args.config,
    topology=args.topology,
    strategy=args.strategy,
    full_depth=full.depth,
    width=full.width,
    heads=full.heads,
    rows=rows,
    fit=fit,
    command="python experiments/aot_memory_breakdown.py " + " ".join(sys.argv[1:]),
    versions=dict(jax=jax.__version__, libtpu=aot._libtpu_version()),  # noqa: SLF001
  )
  for r in rows:
    c, f = r["compiler"], r["formula"]
    print(f"depth {r['depth']}: compiler temporaries {c['temporaries'] / GiB:.2f} GiB, formula "
          f"grads {f['grads'] / GiB:.2f} + activations {f['activations'] / GiB:.2f} GiB; "
          f"params fp32 {r['param_bytes_fp32'] / GiB:.2f} GiB (compile {r['compile_cpu_s']} CPU-s)")  # fmt: skip
    for x in r["largest_collectives"][:4]:
      print(f"    {x['op']:<20} {x['bytes'] / 2**20:9.1f} MiB  {x['shape']}")
  print("per layer: compiler temporaries %.3f GiB; formula activations %.3f + grads %.4f GiB; "
        "fp32 params %.3f GiB" % (fit["temporaries_per_layer"] / GiB,
        fit["formula_activations_per_layer"] / GiB, fit["formula_grads_per_layer"] / GiB,
        fit["param_bytes_per_layer"] / GiB))  # fmt: skip
  print("temporaries extrapolated to depth %d: %.2f GiB" % (full.depth,
        fit["temporaries_at_full_depth"] / GiB))  # fmt: skip
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print("wrote", args.out)
  return out


if __name__ == "__main__":
  main()
