"""The sharding cost model (`arvision.parallel.cost`, `arvision.parallel.measure`) behind
experiments/bench_sharding.py and experiments/scaling_model.py: the HLO collective parser, the
FLOP / memory / communication formulas, the committed results (their formula columns recomputed),
and (slow) the benchmark script on 8 host devices where every strategy must reach the same loss
(relative spread < 1e-3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import config_util, families
from arvision.parallel import cost, logical, measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")


# --- HLO collective parser ---------------------------------------------------------------------


def test_parser_on_handwritten_hlo():
  hlo = textwrap.dedent(
    """
    %all-reduce.42 = (f32[192]{0}, bf16[32,8]{1,0}, /*index=2*/s32[]) all-reduce(%a, %b, %c), channel_id=1
    %gte = f32[192]{0} get-tuple-element(%all-reduce.42), index=0, metadata={op_name="all-reduce"}
    %ag-start = (f32[2,3]{1,0}, f32[8,3]{1,0}) all-gather-start(%x), dimensions={0}
    %ag-done = f32[8,3]{1,0} all-gather-done(%ag-start)
    ROOT %cp = u8[5]{0} collective-permute(%y), source_target_pairs={{0,1},{1,0}}
    %rs = f16[4]{0} reduce-scatter(%z), dimensions={0}, to_apply=%add
    %fusion = f32[4]{0} fusion(%all-reduce.42), kind=kLoop
    """
  )
  out = measure.count_collectives(hlo)
  assert out["by_kind"]["all-reduce"] == dict(count=1, bytes=192 * 4 + 32 * 8 * 2 + 4)
  assert out["by_kind"]["all-gather"] == dict(count=1, bytes=8 * 3 * 4)  # -start not counted
  assert out["by_kind"]["collective-permute"] == dict(count=1, bytes=5)
  assert out["by_kind"]["reduce-scatter"] == dict(count=1, bytes=8)
  assert out["count"] == 4
  assert out["bytes"] == 192 * 4 + 512 + 4 + 96 + 5 + 8


_COMPILED_SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from arvision.parallel import measure

  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

  def body(a, b, c):
    s = jax.lax.psum(a, "x")                            # all-reduce f32[3,8]
    g = jax.lax.all_gather(b, "x", tiled=True)          # all-gather -> f32[8,5]
    p = jax.lax.ppermute(c, "x", [(i, (i + 1) % 4) for i in range(4)])  # permute f32[6]
    return s, g, p

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("x"), P()),
                            out_specs=(P(), P(), P("x")), check_vma=False))
  args = (jnp.ones((3, 8)), jnp.ones((8, 5)), jnp.ones((6,)))
  print(json.dumps(measure.count_collectives(f.lower(*args).compile().as_text())))
  """
)


def test_parser_on_compiled_program():
  """Collectives of a tiny shard_map program on 4 host devices, each with a known shape."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  res = subprocess.run(
    [sys.executable, "-c", _COMPILED_SCRIPT],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  kinds = out["by_kind"]
  assert kinds["all-reduce"] == dict(count=1, bytes=3 * 8 * 4)
  assert kinds["all-gather"] == dict(count=1, bytes=8 * 5 * 4)
  assert kinds["collective-permute"] == dict(count=1, bytes=6 * 4)


# --- formulas ----------------------------------------------------------------------------------


def test_matmul_flops_match_xla_cost_analysis():
  """6 x params x tokens is what XLA counts for a bias-free linear stack (fwd + bwd)."""
  B, C, H = 16, 32, 64
  leaves = [cost.Leaf("fc1/kernel", (C, H), ()), cost.Leaf("fc2/kernel", (H, C), ())]
  model = cost.Model(
    "mlp", leaves, depth=0, width=C, heads=1, mlp_hidden=H, seq_len=1, vocab=1, visible_pairs=0,
    batch=B,
  )  # fmt: skip

  def loss(w, x):
    return jnp.sum((x @ w["fc1"]) @ w["fc2"])

  w = dict(fc1=jnp.ones((C, H)), fc2=jnp.ones((H, C)))
  compiled = jax.jit(jax.value_and_grad(loss)).lower(w, jnp.ones((B, C))).compile()
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, list | tuple) else xla
  analytic = cost.flops_per_step(model, B)["total"]
  assert analytic == 6 * (C * H * 2) * B
  # XLA skips the one matmul nobody needs, d(loss)/d(input) of fc1 (2*B*C*H), and adds the
  # loss reduction (B*C).
  assert abs(xla["flops"] - (analytic - 2 * B * C * H)) / analytic < 0.02


def test_var_visible_pairs_and_attention_flops():
  """Block-causal visible pairs against a dense numpy mask; attention = 12 depth C pairs B."""
  config = config_util.load_config_file("configs/var.py:smoke")
  fam = families.build(config, tokenizer=families.build(config.tokenizer.config))
  model = cost.model_from_family("smoke", config, fam)
  scale = np.concatenate([np.full(p * p, i) for i, p in enumerate(fam.patch_nums)])
  mask = scale[:, None] >= scale[None, :]
  assert model.visible_pairs == int(mask.sum())
  assert model.num_params == sum(x.size for x in jax.tree.leaves(fam.abstract_params()))
  f, fd = cost.flops_per_step(model, 3), cost.flops_per_step(model, 3, dense_attention=True)
  C, L = model.width, model.seq_len
  assert f["attention"] == 12 * model.depth * C * int(mask.sum()) * 3
  assert fd["attention"] == 12 * model.depth * C * L * L * 3
  assert f["matmul"] == fd["matmul"]


def _toy_model(ema=False):
  C, F, V = 64, 256, 128  # every dim divisible by 8
  leaves = [
    cost.Leaf("qkv/kernel", (C, 3 * C), ("embed", "heads")),
    cost.Leaf("proj/kernel", (C, C), ("heads", "embed")),
    cost.Leaf("fc1/kernel", (C, F), ("embed", "mlp")),
    cost.Leaf("fc2/kernel", (F, C), ("mlp", "embed")),
    cost.Leaf("head/kernel", (C, V), ("embed", "vocab")),
  ]
  return cost.Model(
    "toy", leaves, depth=1, width=C, heads=8, mlp_hidden=F, seq_len=16, vocab=V,
    visible_pairs=16 * 16, batch=32, ema=ema,
  )  # fmt: skip


def test_memory_and_comm_closed_forms():
  model = _toy_model()
  P4 = model.num_params * 4
  n = 8
  dp = cost.per_device(model, "dp", dict(data=n))
  assert dp["memory"]["params"] == P4 and dp["memory"]["state"] == 4 * P4  # p, g, m, v
  assert dp["comm_bytes"]["data"] == pytest.approx(2 * (n - 1) / n * P4)
  assert dp["comm_bytes"]["fsdp"] == 0 and dp["comm_bytes"]["tensor"] == 0

  fsdp = cost.per_device(model, "fsdp", dict(fsdp=n))
  assert fsdp["memory"]["params"] == P4 / n
  assert fsdp["comm_bytes"]["fsdp"] == pytest.approx(3 * (n - 1) / n * P4)  # 2 AG + RS
  assert fsdp["comm_bytes"]["data"] == 0

  hsdp = cost.per_device(model, "hsdp", dict(data=2, fsdp=4))
  assert hsdp["memory"]["params"] == P4 / 4
  assert hsdp["comm_bytes"]["fsdp"] == pytest.approx(3 * 3 / 4 * P4)
  assert hsdp["comm_bytes"]["data"] == pytest.approx(2 * 1 / 2 * P4 / 4)

  tp = cost.per_device(model, "tp", dict(data=2, tensor=4))
  assert tp["memory"]["params"] == P4 / 4  # every leaf has a heads / mlp / vocab dim
  b = model.batch / 2
  act = b * model.seq_len * model.width * 4
  assert tp["comm_bytes"]["tensor"] == pytest.approx(4 * model.depth * 2 * 3 / 4 * act)
  assert tp["comm_bytes"]["data"] == pytest.approx(2 * 1 / 2 * P4 / 4)

  ema = cost.per_device(_toy_model(ema=True), "dp", dict(data=n))
  assert ema["memory"]["state"] == 5 * P4


def test_uneven_dims_stay_replicated():
  """The loop's rules drop a mesh axis that does not divide a dim; the formula follows."""
  leaf = cost.Leaf("w", (12, 5), ("embed", "mlp"))
  assert (
    cost.shard_elems(leaf.shape, cost.leaf_spec(leaf, logical.get_rules("fsdp"), {"fsdp": 8}), {})
    == 60
  )
  leaf = cost.Leaf("w", (16, 5), ("embed", "mlp"))
  mesh = {"fsdp": 8}
  assert (
    cost.shard_elems(leaf.shape, cost.leaf_spec(leaf, logical.get_rules("fsdp"), mesh), mesh) == 10
  )


def test_activation_estimate():
  model = _toy_model()
  b, L, C, H, V = 2, model.seq_len, model.width, model.heads, model.vocab
  full = cost.activation_bytes(model, b, 1, remat=False, flash=False)
  assert full == 4 * (model.depth * ((3 + 4 + 8) * b * L * C + H * L * L * b) + 2 * b * L * V)
  remat = cost.activation_bytes(model, b, 1, remat=True, flash=True)
  assert remat == 4 * (model.depth * b * L * C + 15 * b * L * C + 2 * b * L * V)


# --- committed results -------------------------------------------------------------------------


def test_committed_results_agree():
  with open(os.path.join(EXP, "results", "bench_sharding_cpu8.json")) as f:
    res = json.load(f)
  rows = [r for r in res["rows"] if "skip" not in r]
  assert {r["strategy"] for r in rows} == {"dp", "fsdp", "tp", "fsdp_tp", "hsdp"}
  losses = [r["loss"] for r in rows]
  assert (max(losses) - min(losses)) / abs(np.mean(losses)) < 1e-3
  for r in rows:
    assert abs(r["formula"]["ratio"] - 1) < 0.01, r["strategy"]
  arg = {r["strategy"]: r["memory_bytes"]["argument"] for r in rows}
  assert arg["fsdp"] < arg["hsdp"] < arg["dp"]


@pytest.mark.parametrize("name", ["", "_fmnist", "_raster", "_mar"])
def test_committed_formula_columns_reproduce(name):
  """The cost model gives every formula number of a committed benchmark exactly (the formulas
  need only shapes: the frozen tokenizer is abstract, nothing is timed)."""
  with open(os.path.join(EXP, "results", f"bench_sharding_cpu8{name}.json")) as f:
    res = json.load(f)
  c = res["config"]
  config = config_util.load_config_file(c["spec"])
  with config.unlocked():
    config.data.batch_size = c["batch"]
  tok = families.build(config.tokenizer.config)
  fam = families.build(config, tokenizer=tok)
  tok_params = jax.eval_shape(lambda r: tok.init(r, None), jax.random.key(1))
  frozen = {"tokenizer": {"ae": tok_params["ae"]} if "ae" in tok_params else tok_params}
  model = cost.model_from_family(c["spec"], config, fam)
  assert model.num_params == c["params"]
  rows = [r for r in res["rows"] if "skip" not in r]
  assert rows
  for r in rows:
    mesh = {**dict(data=1, fsdp=1, tensor=1), **r["mesh"]}
    rules = logical.get_rules(r["strategy"])
    want = r["formula"]
    got = cost.argument_bytes(model, fam, frozen, rules, mesh, want["batch"], model.ema)
    assert got == {k: want[k] for k in got}, r["strategy"]
    assert want["ratio"] == want["measured_argument"] / got["total"]
    assert cost.flops_per_step(model, c["batch"])["total"] == r["flops_per_step"]
    dense = cost.flops_per_step(model, c["batch"], dense_attention=True)["total"]
    assert dense == r["flops_per_step_dense_attention"]


# --- the benchmark on 8 host devices -----------------------------------------------------------


@pytest.mark.slow
def test_benchmark_strategies_agree_on_8_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = tmp_path / "bench.json"
  cmd = [
    sys.executable, "experiments/bench_sharding.py", "--config", "configs/var.py:smoke",
    "--steps", "1", "--warmup", "1", "--out", str(out),
  ]  # fmt: skip
  res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
  result = json.loads(out.read_text())
  rows = [r for r in result["rows"] if "skip" not in r]
  assert len(rows) == 5
  assert result["loss_rel_spread"] < 1e-3
  for r in rows:
    assert abs(r["formula"]["ratio"] - 1) < 0.01
    assert r["step_s"] > 0 and np.isfinite(r["loss"])
  dp = next(r for r in rows if r["strategy"] == "dp")
  fsdp = next(r for r in rows if r["strategy"] == "fsdp")
  assert fsdp["memory_bytes"]["argument"] < dp["memory_bytes"]["argument"] / 4
  assert dp["collectives"]["by_kind"].get("all-reduce", {}).get("count", 0) >= 1
  assert fsdp["collectives"]["by_kind"].get("all-gather", {}).get("count", 0) >= 1
