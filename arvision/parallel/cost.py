"""Cost model of a sharded train step: per-device memory, FLOPs and communication.

The formulas behind `experiments/scaling_model.py` (VAR-d30/d36 and LlamaGen-3B on TPU v5p
slices and H100 nodes) and `experiments/bench_sharding.py` (which checks them against the
compiled memory analysis of small runs); `docs/scaling.md` states the assumptions.

A model is a list of `Leaf(path, shape, axes)`: every parameter with its logical axis names
(`arvision.parallel.logical`), taken from the real families (`jax.eval_shape`, nothing
allocated). Shards follow the loop's own rules (`logical.spec`, which leaves a dim replicated over
a mesh axis that does not divide it).

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
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec

from arvision.parallel import logical
from arvision.parallel.mesh import BATCH_AXES

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


class MeshSizes:
  """Stands in for a `Mesh` where only axis sizes matter (`logical.spec` reads `mesh.shape`)."""

  def __init__(self, sizes: dict[str, int]):
    self.shape = {a: int(sizes.get(a, 1)) for a in ("data", "fsdp", "tensor")}


def leaf_spec(leaf: Leaf, rules, mesh: dict[str, int]):
  """The mesh `PartitionSpec` the loop gives this param (`arvision.parallel.logical.spec`)."""
  return logical.spec(leaf.axes, leaf.shape, rules, MeshSizes(mesh))


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
  rules = logical.get_rules(strategy) if rules is None else rules
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


def argument_bytes(model, fam, frozen, rules, mesh, batch_bytes_dev: int, ema: bool) -> dict:
  """Per-device argument bytes of a train step by the formulas: params, AdamW m + v (+ EMA), the
  `frozen` trees (e.g. the tokenizer, laid out by its family's logical axes) and the batch shard
  (`batch_bytes_dev`); what `compiled.memory_analysis()` calls the argument size."""
  p = param_bytes_per_device(model.leaves, rules, mesh)
  frozen_dev = 0
  for key, tree in frozen.items():
    owner = getattr(fam, key, None)
    leaves = family_leaves(owner) if owner is not None else []
    by_path = {x.path: x for x in leaves}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      name = _path_name(path)
      leaf = by_path.get(name) or Leaf(name, tuple(np.shape(x)), ())
      leaf = Leaf(name, tuple(np.shape(x)), leaf.axes)
      elems = shard_elems(x.shape, leaf_spec(leaf, rules, mesh), mesh)
      frozen_dev += elems * np.dtype(x.dtype).itemsize
  return dict(
    params=p,
    optimizer=2 * p,
    ema=p if ema else 0,
    frozen=frozen_dev,
    batch=batch_bytes_dev,
    total=p * (3 + int(ema)) + frozen_dev + batch_bytes_dev,
  )


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


def family_leaves(fam, batch=None) -> list[Leaf]:
  """`Leaf`s of a family's trainable params: shapes and logical axes, nothing allocated."""
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
    name = _path_name(path)
    out.append(Leaf(name, tuple(sd.shape), axes + (None,) * (len(sd.shape) - len(axes))))
  return out


def _path_name(path) -> str:
  """`a/b/kernel` for a jax key path (dict keys and sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def _llama_hidden(dim: int, multiple_of: int = 256, mult: float | None = None) -> int:
  hidden = int(2 * 4 * dim / 3)
  if mult is not None:
    hidden = int(mult * hidden)
  return -(-hidden // multiple_of) * multiple_of
