"""Ahead-of-time compilation of the real training step (or sampler) for a TPU slice, from any host.

    report = aot.compile_step(config, "v5p:4x4x8")          # what `arvision compile` prints
    print(aot.format_report(report))

`jax.experimental.topologies.get_topology_desc` (with `libtpu` installed: the `aot` extra) gives
the slice's devices without owning them; the loop's own `train.build` makes the mesh, shardings and
jitted step on them, the step is lowered with abstract arguments (`ShapeDtypeStruct`s carrying
`NamedSharding`s: nothing is allocated) and compiled by the real TPU compiler -- Mosaic included,
so Pallas/splash kernels are compiled for the chip (`arvision.target.target_backend("tpu")` makes
`attn_impl="auto"` pick them, as on a TPU host).

The report (per chip):
- memory: `compiled.memory_analysis()`: arguments (params, optimizer state, frozen tokenizer,
  batch shard), outputs, temporaries, aliased (donated) bytes and total = args + outputs - alias +
  temps, against the chip's HBM (`parallel.chips`);
- cost: `compiled.cost_analysis()` FLOPs and bytes accessed (XLA's count of the per-chip program;
  Mosaic kernels count what their cost estimate declares);
- collectives in the compiled HLO (`parallel.measure.count_collectives`: static op counts,
  bytes = per-chip result shapes; an op inside a loop body counts once);
- roofline: compute = FLOPs / peak, memory = bytes accessed / HBM bandwidth, collectives =
  collective bytes / (ICI bandwidth / 2); the step estimate is the largest of the three (perfect
  overlap), `step_s_serial` their sum; MFU at the estimate uses the analytic model FLOPs
  (`parallel.cost.flops_per_step`).

`find_fit` compiles alternatives (other strategies, tensor sizes, `config.remat`,
`config.optim.accum_steps` when the config has them) until one fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time

import jax
import numpy as np

from arvision import data, errors, families
from arvision.parallel import chips, cost, measure
from arvision.parallel.mesh import AXES, make_mesh

# How the analytic FLOPs relate to what XLA counts is model-specific; only report them.
STRATEGY_ORDER = ("fsdp", "fsdp_tp", "hsdp", "tp", "dp")


class NeedsLibtpu(errors.UserError):
  """libtpu (or the topology) is not available on this host."""


# ------------------------------------------------------------------------------------------------
# Topologies


def chip_of(topology: str) -> chips.Chip:
  try:
    return chips.get(topology)
  except ValueError as e:
    raise errors.UserError(f"--topology {topology!r}: {e}") from e


@functools.lru_cache(maxsize=8)
def topology_devices(topology: str) -> tuple:
  """The abstract devices of a TPU slice, e.g. "v5p:4x4x8" (128 chips) or "v6e:16x16"."""
  chip = chip_of(topology)
  if chip.platform != "tpu":
    raise errors.UserError(
      f"--topology {topology!r}: only TPU slices compile ahead of time here (v5p, v5e, v6e, e.g. "
      "v5p:4x4x8); for GPUs the kernels lower through jax.export (tests/test_kernels_aot.py)"
    )
  if ":" not in topology:
    raise errors.UserError(f"--topology {topology!r}: write <chip>:<shape>, e.g. v5p:4x4x8")
  try:
    from jax.experimental import topologies  # noqa: PLC0415

    with _quiet_libtpu(chip.name):
      desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # noqa: BLE001 (libtpu missing or the shape unknown)
    if not libtpu_available():
      raise NeedsLibtpu(
        "compiling for a TPU needs libtpu on this host: pip install -c constraints.txt -e '.[aot]'"
      ) from e
    raise errors.UserError(f"--topology {topology!r}: libtpu does not know it ({e})") from e
  return tuple(desc.devices)


def libtpu_available() -> bool:
  import importlib.util  # noqa: PLC0415

  return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _quiet_libtpu(chip: str):
  """libtpu reads the TPU metadata of the host it runs on, and warns at length when there is none;
  here it only describes a topology, so a one-host description keeps it quiet (values already in
  the environment win; restored afterwards)."""
  env = {
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": f"{chip}-8",
    # Several processes (pytest workers, a compile next to a benchmark) may describe topologies
    # at once; without this libtpu lets one process hold /tmp/libtpu_lockfile.
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
  }
  old = {k: os.environ.get(k) for k in env}
  for k, v in env.items():
    if old[k] is None:
      os.environ[k] = v
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)


def default_mesh(strategy: str, n: int, heads: int, tensor: int = 0) -> dict:
  """Mesh sizes for `strategy` on n chips: dp data=n; fsdp fsdp=n; hsdp data=2 x fsdp=n/2;
  tp / fsdp_tp: tensor = `tensor` (default the largest of 8, 4, 2 dividing n and the heads)."""
  if strategy == "dp":
    return dict(data=n, fsdp=1, tensor=1)
  if strategy == "fsdp":
    return dict(data=1, fsdp=n, tensor=1)
  if strategy == "hsdp":
    return (
      dict(data=2, fsdp=n // 2, tensor=1)
      if n % 2 == 0 and n > 2
      else dict(data=1, fsdp=n, tensor=1)
    )
  if strategy in ("tp", "fsdp_tp"):
    t = tensor or next((t for t in (8, 4, 2) if n % t == 0 and heads % t == 0), 1)
    if strategy == "tp":
      return dict(data=n // t, fsdp=1, tensor=t)
    return dict(data=1, fsdp=n // t, tensor=t)
  raise ValueError(f"unknown strategy {strategy!r}")


def _resolved_mesh(config, n: int) -> dict:
  sizes = [int(config.mesh[a]) for a in AXES]
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    sizes = [n // known if s == -1 else s for s in sizes]
  return dict(zip(AXES, sizes, strict=True))


# ------------------------------------------------------------------------------------------------
# Building and compiling


def abstract_family(config):
  """`(family, frozen)` with the frozen tokenizer as `ShapeDtypeStruct`s (nothing allocated)."""
  tok = families.build(config.tokenizer.config) if families.needs_tokenizer(config) else None
  fam = families.build(config, tokenizer=tok)
  frozen = {}
  if tok is not None:
    params = jax.eval_shape(lambda r: tok.init(r, None), jax.random.key(0))
    frozen["tokenizer"] = {"ae": params["ae"]} if "ae" in params else params
  return fam, frozen


def _model_name(config) -> str:
  return f"{config.family}:{config.get('variant', '')}"


def compile_step(config, topology: str, *, what: str = "train", sample_batch: int = 0) -> dict:
  """Compiles `config`'s training step (or one sampling call) for `topology`; returns the report.

  Args:
    config: a run config (its `mesh`, `sharding.strategy`, `data.batch_size`, model fields).
    topology: a TPU slice, e.g. "v5p:4x4x8".
    what: "train" (the loop's jitted, state-donating step) or "sample" (one jitted sampling call
      with the config's sampling defaults, params laid out by the strategy).
    sample_batch: images per sampling call (default: one per chip).
  """
  if what not in ("train", "sample"):
    raise errors.UserError(f"--what={what!r}: accepted: train, sample")
  chip = chip_of(topology)
  devices = topology_devices(topology)
  n = len(devices)
  from arvision.target import target_backend  # noqa: PLC0415

  fam, frozen = abstract_family(config)
  mesh_sizes = _resolved_mesh(config, n)
  strategy = config.sharding.strategy
  if strategy in ("tp", "fsdp_tp") and mesh_sizes["tensor"] == 1:
    # A tensor strategy on a mesh without a tensor axis would be fsdp/dp: give it one.
    mesh_sizes = default_mesh(strategy, n, _heads(fam))
    config = with_fields(config, {f"mesh.{a}": v for a, v in mesh_sizes.items()})
  try:
    mesh = make_mesh(config.mesh, devices=list(devices))
  except ValueError as e:
    raise errors.UserError(f"{e} (topology {topology} has {n} chips)") from e
  t0 = time.perf_counter()
  with target_backend(chip.platform):
    if what == "train":
      lowered, info = _lower_train(config, fam, frozen, mesh)
    else:
      lowered, info = _lower_sample(config, fam, frozen, mesh, sample_batch or n)
    lower_s = time.perf_counter() - t0
    # Scanned blocks: loop bodies run once per layer (XLA counts them once; see `analyse`).
    loop_trip = _scan_depth(fam) if bool(config.model.get("scan_layers", False)) else None
    try:
      report = analyse(lowered.compile(), chip, n, loop_trip=loop_trip)
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report = out_of_memory(str(e), chip)
  compile_s = time.perf_counter() - t0 - lower_s
  model = None
  with contextlib.suppress(ValueError, NotImplementedError, AttributeError):
    model = cost.model_from_family(_model_name(config), config, fam)
  batch = info["batch"]
  if model is not None and what == "train" and report["roofline"]:
    fl = cost.flops_per_step(model, batch)
    report["model_flops"] = fl["total"]
    if loop_trip is not None:  # the compiler saw one layer: the compute term from the model
      _use_model_flops(report, chip, fl["total"] / n)
    report["roofline"]["mfu"] = fl["total"] / (n * chip.peak_flops * report["roofline"]["step_s"])
  report.update(
    what=what,
    topology=topology,
    chips=n,
    device_kind=devices[0].device_kind,
    chip=chip.to_dict(),
    config=dict(
      family=config.family,
      variant=config.get("variant", ""),
      strategy=config.sharding.strategy,
      mesh=mesh_sizes,
      batch=batch,
      per_chip_batch=batch / (mesh_sizes["data"] * mesh_sizes["fsdp"]),
      remat=str(config.get("remat", "none")),
      accum_steps=int(config.optim.get("accum_steps", 1)),
      dtype=str(config.model.get("dtype", "float32")),
      attn_impl=str(config.model.get("attn_impl", "auto")),
      scan_layers=bool(config.model.get("scan_layers", False)),
      params=None if model is None else model.num_params,
    ),
    lower_s=lower_s,
    compile_s=compile_s,
    versions=dict(jax=jax.__version__, libtpu=_libtpu_version()),
  )
  return report


def _lower_train(config, fam, frozen, mesh):
  from arvision import train  # noqa: PLC0415 (train imports the data stack)

  example = data.input_spec(config.data, 1)
  B = int(config.data.batch_size)
  shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
  if B % shards:
    raise errors.UserError(
      f"config.data.batch_size={B} is not divisible by the {shards} batch shards of mesh "
      f"{dict(mesh.shape)}; change the batch or the mesh"
    )
  setup = train.build(config, fam, frozen, mesh, example=example)
  batch = {
    k: jax.ShapeDtypeStruct((B, *v.shape[1:]), v.dtype, sharding=setup.batch_sharding)
    for k, v in example.items()
  }
  return setup.step.lower(setup.abstract_state, batch), dict(batch=B)


def _lower_sample(config, fam, frozen, mesh, batch: int):
  from arvision import parallel  # noqa: PLC0415

  rules = parallel.get_rules(config.sharding.strategy)
  abstract = jax.eval_shape(lambda r: fam.init(r, None), jax.random.key(0))
  params_sh = parallel.tree_shardings(abstract, fam.logical_axes(None), rules, mesh)
  frozen_sh = {}
  for key, tree in frozen.items():
    owner = getattr(fam, key, None)
    logical = owner.logical_axes(None) if owner is not None else {}
    frozen_sh[key] = parallel.tree_shardings(tree, logical, rules, mesh)
  with_sh = lambda t, s: jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), t, s
  )
  params = {**with_sh(abstract, params_sh), **with_sh(frozen, frozen_sh)}
  spec = parallel.spec(("batch",), (batch,), rules, mesh)
  labels = jax.ShapeDtypeStruct((batch,), np.int32, sharding=jax.NamedSharding(mesh, spec))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
  fn = functools.partial(fam.sample, **fam.sample_defaults())

  def sample(params, labels, rng):
    with parallel.use_rules(mesh, rules):
      return fn(params, labels, rng)

  return jax.jit(sample).lower(params, labels, rng), dict(batch=batch)


def _libtpu_version():
  try:
    from importlib.metadata import version  # noqa: PLC0415

    return version("libtpu")
  except Exception:  # noqa: BLE001
    return None


_OOM_RE = re.compile(
  r"required for (?P<what>[^(]*?)\s*\((?P<req>[\d.]+)(?P<ru>[KMGT]?)\) exceeds available HBM "
  r"\((?P<avail>[\d.]+)(?P<au>[KMGT]?)\)"
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def out_of_memory(message: str, chip: chips.Chip) -> dict:
  """The report of a program the TPU compiler refused for lack of HBM (it does not compile one
  that cannot fit): what it needed and had, from its message."""
  m = _OOM_RE.search(message)
  oom = dict(message=message.strip().splitlines()[0][:500])
  if m:
    oom.update(
      what=m.group("what").strip(),
      required_bytes=float(m.group("req")) * _UNITS[m.group("ru")],
      available_bytes=float(m.group("avail")) * _UNITS[m.group("au")],
    )
  return dict(
    memory_bytes={},
    hbm_bytes=oom.get("available_bytes", chip.hbm_bytes),
    fits=False,
    out_of_memory=oom,
    flops=None,
    bytes_accessed=None,
    collectives=None,
    roofline=None,
  )


def _scan_depth(fam) -> int:
  """The layer count of a scanned model (the trip count of its layer loops)."""
  for name in ("depth", "n_layer", "encoder_depth"):
    if hasattr(fam.module, name):
      return int(getattr(fam.module, name))
  return 1


def _use_model_flops(report: dict, chip: chips.Chip, flops_per_chip: float) -> None:
  """A scanned program's compute term from the analytic model FLOPs: XLA's `cost_analysis`
  counts a while loop's body once (one layer of N), so its FLOPs and bytes are per-layer
  figures for the blocks. The compiler's numbers stay under `*_compiler`."""
  rf = report["roofline"]
  report["flops_compiler"] = report["flops"]
  report["flops"] = flops_per_chip
  report["flops_source"] = "model (scan_layers: the compiler counts a loop body once)"
  rf["compute_s"] = flops_per_chip / chip.peak_flops
  parts = dict(compute=rf["compute_s"], memory=rf["memory_s"], collectives=rf["collective_s"])
  rf["step_s"] = max(parts.values())
  rf["step_s_serial"] = sum(parts.values())
  rf["bound"] = max(parts, key=parts.get)


def analyse(compiled, chip: chips.Chip, n: int, loop_trip: int | None = None) -> dict:
  """Memory, cost, collectives and roofline of a compiled per-chip program.

  `loop_trip`: for scanned blocks (`config.model.scan_layers`), collectives inside while loops
  count once per iteration (the known trip count, else `loop_trip`, the layer count); the
  bytes-accessed (memory) term is XLA's, which sees a loop body once: a lower bound there."""
  mem = measure.memory_bytes(compiled)
  ca = compiled.cost_analysis()
  if isinstance(ca, list | tuple):
    ca = ca[0] if ca else {}
  ca = ca or {}
  flops = float(ca.get("flops", 0.0))
  bytes_accessed = float(ca.get("bytes accessed", 0.0))
  hlo = compiled.as_text()
  coll = measure.count_collectives(hlo, unknown_trip=loop_trip)
  compute_s = flops / chip.peak_flops
  memory_s = bytes_accessed / chip.hbm_bw
  collective_s = coll["bytes"] / chip.collective_bw
  parts = dict(compute=compute_s, memory=memory_s, collectives=collective_s)
  return dict(
    memory_bytes=mem,
    hbm_bytes=chip.hbm_bytes,
    fits=bool(mem) and mem["total"] <= chip.hbm_bytes,
    flops=flops,
    bytes_accessed=bytes_accessed,
    collectives=coll,
    # Pallas kernels in the program (splash attention on TPU): Mosaic custom calls.
    kernel_calls=hlo.count('custom_call_target="tpu_custom_call"'),
    roofline=dict(
      compute_s=compute_s,
      memory_s=memory_s,
      collective_s=collective_s,
      step_s=max(parts.values()),
      step_s_serial=sum(parts.values()),
      bound=max(parts, key=parts.get),
    ),
  )


# ------------------------------------------------------------------------------------------------
# Alternatives


def alternatives(config, n: int, heads: int) -> list[tuple[str, dict]]:
  """`(description, {dotted field: value})` to try when the config does not fit, likeliest first:
  fsdp over every chip; then on fsdp `config.remat` (block, full), bf16 compute
  (`config.model.dtype`) and gradient accumulation (`config.optim.accum_steps`) where the config
  has them (arvision/precision.py); then the other strategies and tensor sizes."""
  current, now = config.sharding.strategy, _resolved_mesh(config, n)
  fsdp = {"sharding.strategy": "fsdp"} | {
    f"mesh.{a}": v for a, v in default_mesh("fsdp", n, heads).items()
  }
  out = []
  if current != "fsdp":
    out.append((f"fsdp mesh {_mesh_str(default_mesh('fsdp', n, heads))}", fsdp))
  base, name = dict(fsdp), "fsdp"
  if "remat" in config:
    for mode in ("block", "full"):
      if mode != str(config.remat):
        out.append((f"{name} + remat={mode}", base | {"remat": mode}))
    base, name = base | {"remat": "full"}, f"{name} + remat=full"
  if "dtype" in config.model and str(config.model.dtype) != "bfloat16":
    out.append((f"{name} + model.dtype=bfloat16", base | {"model.dtype": "bfloat16"}))
    base, name = base | {"model.dtype": "bfloat16"}, f"{name} + bfloat16"
  if "accum_steps" in config.optim:
    B = int(config.data.batch_size)
    for k in (2, 4, 8, 16):
      if B % k == 0 and (B // k) % n == 0:
        out.append((f"{name} + accum_steps={k}", base | {"optim.accum_steps": k}))
  for strategy in STRATEGY_ORDER:
    for t in (0,) if strategy not in ("tp", "fsdp_tp") else (2, 4, 8):
      if strategy == "fsdp" or (t and (n % t or heads % t)):
        continue
      mesh = default_mesh(strategy, n, heads, t)
      if strategy == current and mesh == now:
        continue
      fields = {"sharding.strategy": strategy} | {f"mesh.{a}": v for a, v in mesh.items()}
      out.append((f"{strategy} mesh {_mesh_str(mesh)}", fields))
  return out


def with_fields(config, fields: dict):
  new = config.copy_and_resolve_references()
  with new.unlocked():
    for key, value in fields.items():
      node = new
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise errors.UserError(f"the config has no field {key!r}")
      node[leaf] = value
  return new


def find_fit(config, topology: str, *, max_tries: int = 4, log=print) -> list[dict]:
  """Compiles alternatives of a config that does not fit until one does (at most `max_tries`);
  returns `[{"change", "fields", "fits", "total_bytes", "step_s"} | {"error"}]`."""
  n = len(topology_devices(topology))
  fam, _ = abstract_family(config)
  heads = _heads(fam)
  tried = []
  for desc, fields in alternatives(config, n, heads)[:max_tries]:
    log(f"  trying {desc} ...")
    try:
      r = compile_step(with_fields(config, fields), topology)
    except Exception as e:  # noqa: BLE001 (report and go on)
      tried.append(dict(change=desc, fields=fields, error=f"{type(e).__name__}: {e}"[:300]))
      continue
    tried.append(
      dict(
        change=desc,
        fields=fields,
        fits=r["fits"],
        total_bytes=needed_bytes(r),
        step_s=r["roofline"]["step_s"] if r["roofline"] else None,
      )
    )
    if r["fits"]:
      break
  return tried


def _heads(fam) -> int:
  m = fam.module
  for name in ("num_heads", "n_head", "decoder_heads"):
    if hasattr(m, name):
      return int(getattr(m, name))
  return 1


def _mesh_str(mesh: dict) -> str:
  return "x".join(f"{a}={v}" for a, v in mesh.items() if v > 1) or "data=1"


# ------------------------------------------------------------------------------------------------
# Text


def _gib(x) -> str:
  return f"{x / 2**30:.2f} GiB"


def format_report(r: dict) -> str:
  """The human-readable report `arvision compile` prints."""
  c, m, ch = r["config"], r["memory_bytes"], r["chip"]
  lines = [
    f"{r['what']} step of {c['family']}:{c['variant']} on {r['topology']} ({r['chips']} x "
    f"{r['device_kind']}), strategy {c['strategy']}, mesh {_mesh_str(c['mesh'])}",
    f"  batch {c['batch']} ({c['per_chip_batch']:g} per chip), dtype {c['dtype']}, remat "
    f"{c['remat']}, accum_steps {c['accum_steps']}, attn_impl {c['attn_impl']}"
    + (f", {c['params'] / 1e6:,.1f}M params" if c.get("params") else ""),
    f"  compiled in {r['compile_s']:.1f} s (lowering {r['lower_s']:.1f} s), jax "
    f"{r['versions']['jax']}, libtpu {r['versions']['libtpu']}",
  ]
  if r.get("out_of_memory"):
    oom = r["out_of_memory"]
    if "required_bytes" in oom:
      lines.append(
        f"DOES NOT FIT: the compiler needs {_gib(oom['required_bytes'])} for {oom['what']} per "
        f"chip, {_gib(oom['available_bytes'])} HBM is available"
      )
    else:
      lines.append(f"DOES NOT FIT: {oom['message']}")
  else:
    args_what = (
      "params, optimizer state, frozen tokenizer, batch"
      if r["what"] == "train"
      else "params, labels, rng"
    )
    lines += [
      "memory per chip (compiler's memory_analysis):",
      f"  arguments   {_gib(m['argument'])}   ({args_what})",
      f"  outputs     {_gib(m['output'])}   ({_gib(m['alias'])} of them donated into the arguments)",
      f"  temporaries {_gib(m['temp'])}",
      f"  total       {_gib(m['total'])} of {_gib(ch['hbm_bytes'])} HBM "
      f"({100 * m['total'] / ch['hbm_bytes']:.0f}%): " + ("FITS" if r["fits"] else "DOES NOT FIT"),
      f"Pallas/Mosaic kernel calls in the program: {r['kernel_calls']}",
      "cost per chip (compiler's cost_analysis):"
      if "flops_compiler" not in r
      else "cost per chip (scan_layers: FLOPs from the model; the compiler counted "
      f"{r['flops_compiler'] / 1e12:,.2f} TFLOP, one loop body once; bytes: a lower bound):",
      f"  {r['flops'] / 1e12:,.2f} TFLOP, {r['bytes_accessed'] / 1e9:,.2f} GB accessed",
      f"collectives in the compiled HLO: {r['collectives']['count']} ops, "
      f"{r['collectives']['bytes'] / 2**20:,.1f} MiB per chip "
      + ("(static count)" if not c.get("scan_layers") else "(loop bodies x their trip count)"),
    ]
    for kind, v in r["collectives"]["by_kind"].items():
      lines.append(f"  {kind:<20} {v['count']:>5} ops  {v['bytes'] / 2**20:>10,.1f} MiB")
    rf = r["roofline"]
    lines += [
      f"roofline ({ch['name']}: {ch['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
      f"{ch['hbm_bw'] / 1e9:,.0f} GB/s HBM, {ch['collective_bw'] / 1e9:,.0f} GB/s ICI per "
      "direction):",
      f"  compute {rf['compute_s'] * 1e3:,.1f} ms, HBM {rf['memory_s'] * 1e3:,.1f} ms, "
      f"collectives {rf['collective_s'] * 1e3:,.1f} ms -> step >= {rf['step_s'] * 1e3:,.1f} ms "
      f"({rf['bound']}-bound; {rf['step_s_serial'] * 1e3:,.1f} ms without overlap)",
    ]
    if r.get("model_flops"):
      lines.append(
        f"  model FLOPs {r['model_flops'] / 1e15:,.2f} PFLOP per step -> MFU at the estimate "
        f"{100 * rf['mfu']:.0f}%, {c['batch'] / rf['step_s']:,.0f} images/s"
      )
  if r.get("alternatives"):
    lines.append("alternatives (compiled):")
    for a in r["alternatives"]:
      if "error" in a:
        lines.append(f"  {a['change']}: failed: {a['error']}")
        continue
      if a["fits"]:
        lines.append(
          f"  {a['change']}: {_gib(a['total_bytes'])} -> FITS, step >= {a['step_s'] * 1e3:,.1f} ms"
        )
      else:
        lines.append(f"  {a['change']}: does not fit ({_gib(a['total_bytes'])} needed)")
    fit = next((a for a in r["alternatives"] if a.get("fits")), None)
    if fit:
      flags = " ".join(f"--config.{k}={v}" for k, v in fit["fields"].items())
      lines.append(f"use: {flags}")
    else:
      lines.append("none of the alternatives tried fits; more chips, or a smaller batch per chip")
  return "\n".join(lines)


def needed_bytes(r: dict) -> float:
  """Per-chip bytes the program needs: the memory analysis total, or the compiler's requirement
  when it refused the program."""
  if r.get("out_of_memory"):
    return r["out_of_memory"].get("required_bytes", float("nan"))
  return float(r["memory_bytes"]["total"])


def to_json(r: dict) -> dict:
  """The report with plain JSON types."""
  return json_safe(r)


def json_safe(x):
  if isinstance(x, dict):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [json_safe(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if dataclasses.is_dataclass(x):
    return json_safe(dataclasses.asdict(x))
  return x
