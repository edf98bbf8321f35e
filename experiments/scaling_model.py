"""Scaling model: per-chip memory, FLOPs and communication per train step under each strategy.

    python experiments/scaling_model.py --out experiments/results/scaling_model.json \
        --bench experiments/results/bench_sharding_cpu8.json --docs docs/scaling.md

The same functions serve two purposes: `experiments/bench_sharding.py` checks them against the
compiled memory analysis of small runs (params + optimizer state per device), and this script
applies them to VAR-d30, VAR-d36 and a LlamaGen-3B-sized model on TPU v5p slices and H100 nodes.

A model is a list of `Leaf(path, shape, axes)`: every parameter with its logical axis names
(`arvision.parallel.logical`), taken from the real families (`jax.eval_shape`, nothing
allocated): `configs/var.py:d30` / `d36` (256px: L = 680; d36 also at 512px: L = 2240) and
`configs/raster.py:3B,image_size=256` (LlamaGen GPT-3B: dim 3200, 24 layers, 32 heads, SwiGLU
hidden 8704, vocab 16384; T = 256 = class token + 255 tokens). Shards follow the loop's own rules
(`arvision.parallel.rules.spec`, which leaves a dim replicated over a mesh axis that does not
divide it).

Memory per device (bytes), all state fp32 as arvision's loop keeps it:
- params: sum over leaves of the shard size under the strategy's rules;
- grads: the same as params (fp32; a transient of the step);
- optimizer: AdamW m + v = 2 x params (the count scalars are ignored);
- ema: params again when `optim.ema_decay > 0`; master weights: the fp32 params ARE the master
  copy (no bf16 shadow weights in the loop), so 0 extra;
- activations (estimate): per layer the tensors a pre-norm block keeps for backward, in units of
  b*L*C elements (b = per-device micro-batch): LN-in 1, qkv-in 1, q/k/v 3, attention-out 1,
  MLP-in 1, fc1-out r, act-out r (r = MLP ratio; SwiGLU: 3 x hidden / C) -> 15 for r = 4, plus the
  softmax probabilities H*L*L*b for dense (xla) attention (0 with a flash kernel), plus the fp32
  logits and their gradient 2*b*L*V. Heads/MLP parts are divided by the tensor size t. With
  full rematerialisation (`nothing_saveable` per block) only the block input (1) is kept per
  layer plus one block's working set.
Communication per device per step (bytes sent, bandwidth-optimal ring algorithms; S = bytes of
the full tensor): all-reduce 2(n-1)/n S, all-gather (n-1)/n S, reduce-scatter (n-1)/n S.
- per leaf split over g batch ranks (fsdp): all-gather in the forward, again in the backward
  (ZeRO-3: gathered weights are not kept), reduce-scatter of the gradient: 3 (g-1) x its shard,
  per micro-batch;
- per leaf held identically by r batch ranks (dp, or the data axis of hsdp): gradient
  all-reduce 2 (r-1)/r x its shard;
- tensor axis t (Megatron): 2 all-reduces of a [b, L, C] activation per layer forward (after
  attention proj and fc2) and 2 backward (before qkv and fc1): 4 depth 2(t-1)/t b L C a bytes.
Time = bytes / effective bandwidth of the mesh axis (figures and sources in `PLATFORMS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp")
BATCH_AXES = ("data", "fsdp")

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

DTYPE_BYTES = 4  # fp32 params / grads / optimizer moments, as the loop keeps them


@dataclasses.dataclass(frozen=True)
class Leaf:
  path: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]


@dataclasses.dataclass
class Model:
  """Everything the formulas need about a model (sizes are per example)."""

  name: str
  leaves: list[Leaf]
  depth: int
  width: int
  heads: int
  mlp_hidden: int
  seq_len: int
  vocab: int
  visible_pairs: int  # (query, key) pairs the attention mask allows, per head per example
  batch: int  # global batch of the official recipe
  mlp_tensors: float = 8.0  # saved MLP tensors in units of b*L*C (fc1-out + act-out)
  ema: bool = False
  per_example_patterns: tuple[str, ...] = ("ada_lin",)  # kernels applied once per example

  @property
  def num_params(self) -> int:
    return sum(math.prod(x.shape) for x in self.leaves)


# ------------------------------------------------------------------------------------------------
# Rules and shard sizes


def strategy_rules(strategy: str):
  """The strategy's rules table: the one arvision's loop uses (`arvision.parallel.get_rules`)."""
  from arvision import parallel  # noqa: PLC0415

  return parallel.get_rules(strategy)


class MeshSizes:
  """Stands in for a `Mesh` where only axis sizes matter (`rules.spec` reads `mesh.shape`)."""

  def __init__(self, sizes: dict[str, int]):
    self.shape = {a: int(sizes.get(a, 1)) for a in ("data", "fsdp", "tensor")}


def leaf_spec(leaf: Leaf, rules, mesh: dict[str, int]):
  """The mesh `PartitionSpec` the loop gives this param (`arvision.parallel.rules.spec`)."""
  from arvision.parallel import rules as rules_lib  # noqa: PLC0415

  return rules_lib.spec(leaf.axes, leaf.shape, rules, MeshSizes(mesh))


def shard_elems(shape, spec, mesh: dict[str, int]) -> int:
  """Elements of one device's shard of an array of `shape` laid out as `spec`."""
  n = 1
  parts = tuple(spec) + (None,) * (len(shape) - len(spec))
  for dim, s in zip(shape, parts, strict=True):
    names = () if s is None else (s,) if isinstance(s, str) else tuple(s)
    n *= -(-dim // math.prod(mesh.get(a, 1) for a in names))
  return n


def param_bytes_per_device(leaves, rules, mesh, dtype_bytes=DTYPE_BYTES) -> int:
  """Bytes of one device's shards of `leaves` (every leaf `dtype_bytes` per element)."""
  return dtype_bytes * sum(shard_elems(x.shape, leaf_spec(x, rules, mesh), mesh) for x in leaves)


# ------------------------------------------------------------------------------------------------
# FLOPs


def flops_per_step(model: Model, batch: int, *, dense_attention: bool = False) -> dict:
  """Training FLOPs (forward + backward = 3 x forward) of one step on `batch` examples.

  matmuls: 6 * params * tokens for kernels applied per token (>= 2-D leaves named `kernel`,
  the output head included; embedding lookups excluded), 6 * params * batch for kernels
  applied once per example (AdaLN `ada_lin`). attention: QK^T and PV are 2 * 2 * C FLOPs per
  (query, key) pair forward, x3 for training: 12 * depth * C * pairs * batch, with pairs the
  VISIBLE pairs of the mask (block-causal for VAR, causal for LlamaGen) by default, or the full
  L^2 square with `dense_attention` (what a dense-mask kernel really computes).
  """
  tok = sum(
    math.prod(x.shape)
    for x in model.leaves
    if x.path.endswith("kernel") and not any(p in x.path for p in model.per_example_patterns)
  )
  ex = sum(
    math.prod(x.shape)
    for x in model.leaves
    if x.path.endswith("kernel") and any(p in x.path for p in model.per_example_patterns)
  )
  pairs = model.seq_len**2 if dense_attention else model.visible_pairs
  matmul = 6 * tok * batch * model.seq_len + 6 * ex * batch
  attn = 12 * model.depth * model.width * pairs * batch
  return dict(matmul=matmul, attention=attn, total=matmul + attn)


# ------------------------------------------------------------------------------------------------
# Memory and communication


def ring_allreduce(nbytes: float, n: int) -> float:
  return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def activation_bytes(
  model: Model, micro_batch: float, t: int, *, remat: bool, flash: bool, act_bytes: int = 4
) -> float:
  """Estimated activation bytes per device (see the module docstring)."""
  b, L, C, H = micro_batch, model.seq_len, model.width, model.heads
  sharded = 3 + 1 + model.mlp_tensors  # q/k/v, attention-out, MLP tensors: split by t
  replicated = 3  # LN-in, qkv-in, MLP-in
  per_layer = (replicated + sharded / t) * b * L * C
  probs = 0.0 if flash else H * L * L * b / t
  logits = 2 * b * L * model.vocab * 4 / act_bytes  # fp32 logits + their gradient
  if remat:
    total = model.depth * b * L * C + per_layer + probs + logits
  else:
    total = model.depth * (per_layer + probs) + logits
  return total * act_bytes


def param_comm_bytes(leaves, rules, mesh: dict[str, int]) -> dict[str, float]:
  """Per-device bytes of one micro-batch's parameter/gradient collectives, leaf by leaf.

  A leaf whose spec splits it over batch axes of total size g (ZeRO sharding) is all-gathered in
  the forward and again in the backward and its gradient reduce-scattered: 3 (g-1)/g x the
  gathered size = 3 (g-1) x the shard. Over the remaining r = (data*fsdp)/g batch ranks that hold
  the same shard its gradient is all-reduced: 2 (r-1)/r x the shard. Tensor-split leaves need no
  gradient collective over `tensor` (each rank owns its slice; replicated leaves see identical
  activations on every tensor rank).
  """
  n_batch = mesh.get("data", 1) * mesh.get("fsdp", 1)
  zero = allreduce = 0.0
  for x in leaves:
    spec = leaf_spec(x, rules, mesh)
    shard = DTYPE_BYTES * shard_elems(x.shape, spec, mesh)
    axes = [a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)]
    g = math.prod(mesh.get(a, 1) for a in axes if a in BATCH_AXES)
    zero += 3 * (g - 1) * shard
    allreduce += ring_allreduce(shard, n_batch // g)
  return dict(fsdp=zero, data=allreduce)


def per_device(
  model: Model,
  strategy: str,
  mesh: dict[str, int],
  *,
  rules=None,
  act_bytes: int = 4,
  hbm_bytes: float | None = None,
) -> dict:
  """Memory and communication bytes per device for `model` under `strategy` on `mesh`.

  With `hbm_bytes`, the largest per-device micro-batch that fits next to the state is computed
  for each activation variant (dense attention, flash attention, remat + flash), and the step
  is split into `accum` micro-batches of the remat + flash variant (gradient accumulation); the
  fsdp collectives repeat per micro-batch, the tensor ones scale with tokens (unchanged), the
  data all-reduce happens once.
  """
  rules = strategy_rules(strategy) if rules is None else rules
  d, f, t = mesh.get("data", 1), mesh.get("fsdp", 1), mesh.get("tensor", 1)
  p_dev = param_bytes_per_device(model.leaves, rules, mesh)
  b = model.batch / (d * f)
  state = p_dev * (1 + 1 + 2 + int(model.ema))  # params, grads, AdamW m + v, EMA
  per_ex = {
    "dense": activation_bytes(model, 1, t, remat=False, flash=False, act_bytes=act_bytes),
    "flash": activation_bytes(model, 1, t, remat=False, flash=True, act_bytes=act_bytes),
    "remat": activation_bytes(model, 1, t, remat=True, flash=True, act_bytes=act_bytes),
  }
  mem = dict(
    params=p_dev,
    grads=p_dev,
    optimizer=2 * p_dev,
    ema=p_dev if model.ema else 0,
    master_weights=0,
    state=state,
    activations_per_example=per_ex,
    total_full_batch={k: state + v * b for k, v in per_ex.items()},
  )
  accum = 1
  if hbm_bytes is not None:
    free = hbm_bytes - state
    mem["max_micro_batch"] = {
      k: int(min(b, max(free // v, 0))) if free > 0 else 0 for k, v in per_ex.items()
    }
    mem["accum"] = {
      k: (math.ceil(b / v) if v >= 1 else None) for k, v in mem["max_micro_batch"].items()
    }
    accum = mem["accum"]["remat"]
  act = b * model.seq_len * model.width * act_bytes
  pc = param_comm_bytes(model.leaves, rules, mesh)
  comm = dict(
    data=pc["data"],
    fsdp=pc["fsdp"] * (accum or 1),
    tensor=4 * model.depth * ring_allreduce(act, t),
  )
  comm["total"] = comm["data"] + comm["fsdp"] + comm["tensor"]
  return dict(examples_per_device=b, accum=accum, memory=mem, comm_bytes=comm)


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


def model_from_family(name: str, config, fam) -> Model:
  """A `Model` of a built var, raster or mar family (leaves with the family's logical axes)."""
  m = fam.module
  ema = float(config.optim.ema_decay) > 0
  batch = int(config.data.batch_size)
  if config.family == "var":
    lengths = [p * p for p in m.patch_nums]
    ends = np.cumsum(lengths)
    return Model(
      name=name,
      leaves=family_leaves(fam),
      depth=m.depth,
      width=m.width,
      heads=m.num_heads,
      mlp_hidden=round(m.width * m.mlp_ratio),
      seq_len=m.seq_len,
      vocab=m.vocab_size,
      # block-causal: a token of scale k sees every token of scales <= k
      visible_pairs=int(sum(n * e for n, e in zip(lengths, ends, strict=True))),
      batch=batch,
      mlp_tensors=2 * m.mlp_ratio,
      ema=ema,
    )
  if config.family == "raster":
    T = m.num_tokens  # class token + tokens[:-1] (the official training input)
    hidden = _llama_hidden(m.dim, m.multiple_of, m.ffn_dim_multiplier)
    return Model(
      name=name,
      leaves=family_leaves(fam),
      depth=m.n_layer,
      width=m.dim,
      heads=m.n_head,
      mlp_hidden=hidden,
      seq_len=T,
      vocab=m.vocab_size,
      visible_pairs=T * (T + 1) // 2,  # causal
      batch=batch,
      mlp_tensors=3 * hidden / m.dim,  # w1-out, w3-out, silu(w1)*w3 (input of w2)
      ema=ema,
      per_example_patterns=(),
    )
  if config.family == "mar":
    # The MAE encoder over buffer + kept tokens and the decoder over buffer + L, full attention;
    # counted at the decoder length for both (an upper bound for the encoder). The diffusion MLP
    # (per token x diffusion_batch_mul) is not in the FLOP count: MFU for MAR is a lower bound.
    T = m.buffer_size + fam.seq_len
    return Model(
      name=name,
      leaves=family_leaves(fam),
      depth=m.encoder_depth + m.decoder_depth,
      width=m.decoder_dim,
      heads=m.decoder_heads,
      mlp_hidden=round(m.decoder_dim * m.mlp_ratio),
      seq_len=T,
      vocab=0,
      visible_pairs=T * T,
      batch=batch,
      mlp_tensors=2 * m.mlp_ratio,
      ema=ema,
      per_example_patterns=(),
    )
  raise ValueError(f"config.family={config.family!r}: the scaling model knows var, raster, mar")


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


def _var_model(variant: str, reso: int) -> Model:
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
  return model_from_family(f"VAR-{variant} {reso}px", config, fam)


def family_leaves(fam, batch=None) -> list[Leaf]:
  """`Leaf`s of a family's trainable params: shapes and logical axes, nothing allocated."""
  import jax  # noqa: PLC0415

  try:
    specs = fam.logical_axes(batch)
    shapes = jax.eval_shape(lambda r: fam.init(r, batch), jax.random.key(0))
  except NotImplementedError:  # a family without annotations: replicated everywhere
    shapes = jax.eval_shape(lambda r: fam.init(r, batch), jax.random.key(0))
    specs = jax.tree.map(lambda _: None, shapes)
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: x is None or _is_spec(x))
  if len(flat_specs) != len(flat_shapes):
    raise ValueError(f"{len(flat_specs)} logical specs for {len(flat_shapes)} params")
  out = []
  for (path, sd), spec in zip(flat_shapes, flat_specs, strict=True):
    axes = tuple(spec) if spec is not None else (None,) * len(sd.shape)
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out.append(Leaf(name, tuple(sd.shape), axes + (None,) * (len(sd.shape) - len(axes))))
  return out


def _is_spec(x) -> bool:
  from jax.sharding import PartitionSpec  # noqa: PLC0415

  return isinstance(x, PartitionSpec)


def llamagen_3b() -> Model:
  """LlamaGen GPT-3B at 256px from `configs/raster.py:3B` (official sizes: dim 3200, 24 layers,
  32 heads, SwiGLU hidden 8704, vocab 16384; T = 256 = class token + 255 tokens)."""
  config, fam = _build("configs/raster.py:3B,image_size=256")
  return model_from_family("LlamaGen-3B 256px", config, fam)


def _llama_hidden(dim: int, multiple_of: int = 256, mult: float | None = None) -> int:
  hidden = int(2 * 4 * dim / 3)
  if mult is not None:
    hidden = int(mult * hidden)
  return -(-hidden // multiple_of) * multiple_of


def models() -> list[Model]:
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


def scale_rows(model: Model) -> list[dict]:
  rows = []
  for platform, n in SCENARIOS:
    p = PLATFORMS[platform]
    fl = flops_per_step(model, model.batch)
    compute_s = fl["total"] / (n * p["peak_flops"])
    for strategy in STRATEGIES:
      mesh = scale_mesh(strategy, n, model.heads)
      d, f = mesh.get("data", 1), mesh.get("fsdp", 1)
      row = dict(model=model.name, platform=platform, chips=n, strategy=strategy, mesh=mesh)
      if model.batch < d * f:
        row["skip"] = f"global batch {model.batch} < {d * f} batch shards"
        rows.append(row)
        continue
      r = per_device(model, strategy, mesh, hbm_bytes=p["hbm_bytes"])
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
        flops_per_step=flops_per_step(m, m.batch),
        flops_per_step_dense_attention=flops_per_step(m, m.batch, dense_attention=True),
      )
      for m in ms
    ],
    rows=rows,
  )


def validation_markdown(benches: list[dict]) -> str:
  """The benchmark tables and the formula-vs-compiled argument bytes, from bench JSONs."""
  import bench_sharding  # noqa: PLC0415

  out = []
  for bench in benches:
    d, c = bench["device"], bench["config"]
    out += [
      f"#### `{c['spec']}` on {d['count']} x {d['kind']} ({c['params']:,} params, batch "
      f"{c['batch']}, L = {c['seq_len']}; {c['steps']} timed steps after {c['warmup']} warm-up; "
      f"loss relative spread {bench['loss_rel_spread']:.2g})",
      "",
      bench_sharding.markdown(bench),
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
