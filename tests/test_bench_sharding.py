"""experiments/bench_sharding.py and experiments/scaling_model.py: the HLO collective parser, the
FLOP / memory / communication formulas, the committed results, and (slow) a run on 8 host devices
where every strategy must reach the same loss (relative spread < 1e-3)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments")


def _load(name):
  if EXP not in sys.path:
    sys.path.insert(0, EXP)
  spec = importlib.util.spec_from_file_location(name, os.path.join(EXP, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture(scope="module")
def bench():
  return _load("bench_sharding")


@pytest.fixture(scope="module")
def sm():
  return _load("scaling_model")


# --- HLO collective parser ---------------------------------------------------------------------


def test_parser_on_handwritten_hlo(bench):
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
  out = bench.count_collectives(hlo)
  assert out["by_kind"]["all-reduce"] == dict(count=1, bytes=192 * 4 + 32 * 8 * 2 + 4)
  assert out["by_kind"]["all-gather"] == dict(count=1, bytes=8 * 3 * 4)  # -start not counted
  assert out["by_kind"]["collective-permute"] == dict(count=1, bytes=5)
  assert out["by_kind"]["reduce-scatter"] == dict(count=1, bytes=8)
  assert out["count"] == 4
  assert out["bytes"] == 192 * 4 + 512 + 4 + 96 + 5 + 8


_COMPILED_SCRIPT = textwrap.dedent(
  """
  import json, sys
  sys.path.insert(0, "experiments")
  import jax, jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  import bench_sharding as bs

  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

  def body(a, b, c):
    s = jax.lax.psum(a, "x")                            # all-reduce f32[3,8]
    g = jax.lax.all_gather(b, "x", tiled=True)          # all-gather -> f32[8,5]
    p = jax.lax.ppermute(c, "x", [(i, (i + 1) % 4) for i in range(4)])  # permute f32[6]
    return s, g, p

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("x"), P()),
                            out_specs=(P(), P(), P("x")), check_vma=False))
  args = (jnp.ones((3, 8)), jnp.ones((8, 5)), jnp.ones((6,)))
  print(json.dumps(bs.count_collectives(f.lower(*args).compile().as_text())))
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


def test_matmul_flops_match_xla_cost_analysis(sm):
  """6 x params x tokens is what XLA counts for a bias-free linear stack (fwd + bwd)."""
  B, C, H = 16, 32, 64
  leaves = [sm.Leaf("fc1/kernel", (C, H), ()), sm.Leaf("fc2/kernel", (H, C), ())]
  model = sm.Model(
    "mlp", leaves, depth=0, width=C, heads=1, mlp_hidden=H, seq_len=1, vocab=1, visible_pairs=0,
    batch=B,
  )  # fmt: skip

  def loss(w, x):
    return jnp.sum((x @ w["fc1"]) @ w["fc2"])

  w = dict(fc1=jnp.ones((C, H)), fc2=jnp.ones((H, C)))
  compiled = jax.jit(jax.value_and_grad(loss)).lower(w, jnp.ones((B, C))).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  analytic = sm.flops_per_step(model, B)["total"]
  assert analytic == 6 * (C * H * 2) * B
  # XLA skips the one matmul nobody needs, d(loss)/d(input) of fc1 (2*B*C*H), and adds the
  # loss reduction (B*C).
  assert abs(cost["flops"] - (analytic - 2 * B * C * H)) / analytic < 0.02


def test_var_visible_pairs_and_attention_flops(sm):
  """Block-causal visible pairs against a dense numpy mask; attention = 12 depth C pairs B."""
  from arvision import config_util, families

  config = config_util.load_config_file("configs/var.py:smoke")
  fam = families.build(config, tokenizer=families.build(config.tokenizer.config))
  model = sm.model_from_family("smoke", config, fam)
  scale = np.concatenate([np.full(p * p, i) for i, p in enumerate(fam.patch_nums)])
  mask = scale[:, None] >= scale[None, :]
  assert model.visible_pairs == int(mask.sum())
  assert model.num_params == sum(x.size for x in jax.tree.leaves(fam.abstract_params()))
  f, fd = sm.flops_per_step(model, 3), sm.flops_per_step(model, 3, dense_attention=True)
  C, L = model.width, model.seq_len
  assert f["attention"] == 12 * model.depth * C * int(mask.sum()) * 3
  assert fd["attention"] == 12 * model.depth * C * L * L * 3
  assert f["matmul"] == fd["matmul"]


def _toy_model(sm, ema=False):
  C, F, V = 64, 256, 128  # every dim divisible by 8
  leaves = [
    sm.Leaf("qkv/kernel", (C, 3 * C), ("embed", "heads")),
    sm.Leaf("proj/kernel", (C, C), ("heads", "embed")),
    sm.Leaf("fc1/kernel", (C, F), ("embed", "mlp")),
    sm.Leaf("fc2/kernel", (F, C), ("mlp", "embed")),
    sm.Leaf("head/kernel", (C, V), ("embed", "vocab")),
  ]
  return sm.Model(
    "toy", leaves, depth=1, width=C, heads=8, mlp_hidden=F, seq_len=16, vocab=V,
    visible_pairs=16 * 16, batch=32, ema=ema,
  )  # fmt: skip


def test_memory_and_comm_closed_forms(sm):
  model = _toy_model(sm)
  P4 = model.num_params * 4
  n = 8
  dp = sm.per_device(model, "dp", dict(data=n))
  assert dp["memory"]["params"] == P4 and dp["memory"]["state"] == 4 * P4  # p, g, m, v
  assert dp["comm_bytes"]["data"] == pytest.approx(2 * (n - 1) / n * P4)
  assert dp["comm_bytes"]["fsdp"] == 0 and dp["comm_bytes"]["tensor"] == 0

  fsdp = sm.per_device(model, "fsdp", dict(fsdp=n))
  assert fsdp["memory"]["params"] == P4 / n
  assert fsdp["comm_bytes"]["fsdp"] == pytest.approx(3 * (n - 1) / n * P4)  # 2 AG + RS
  assert fsdp["comm_bytes"]["data"] == 0

  hsdp = sm.per_device(model, "hsdp", dict(data=2, fsdp=4))
  assert hsdp["memory"]["params"] == P4 / 4
  assert hsdp["comm_bytes"]["fsdp"] == pytest.approx(3 * 3 / 4 * P4)
  assert hsdp["comm_bytes"]["data"] == pytest.approx(2 * 1 / 2 * P4 / 4)

  tp = sm.per_device(model, "tp", dict(data=2, tensor=4))
  assert tp["memory"]["params"] == P4 / 4  # every leaf has a heads / mlp / vocab dim
  b = model.batch / 2
  act = b * model.seq_len * model.width * 4
  assert tp["comm_bytes"]["tensor"] == pytest.approx(4 * model.depth * 2 * 3 / 4 * act)
  assert tp["comm_bytes"]["data"] == pytest.approx(2 * 1 / 2 * P4 / 4)

  ema = sm.per_device(_toy_model(sm, ema=True), "dp", dict(data=n))
  assert ema["memory"]["state"] == 5 * P4


def test_uneven_dims_stay_replicated(sm):
  """The loop's rules drop a mesh axis that does not divide a dim; the formula follows."""
  leaf = sm.Leaf("w", (12, 5), ("embed", "mlp"))
  assert (
    sm.shard_elems(leaf.shape, sm.leaf_spec(leaf, sm.strategy_rules("fsdp"), {"fsdp": 8}), {}) == 60
  )
  leaf = sm.Leaf("w", (16, 5), ("embed", "mlp"))
  mesh = {"fsdp": 8}
  assert sm.shard_elems(leaf.shape, sm.leaf_spec(leaf, sm.strategy_rules("fsdp"), mesh), mesh) == 10


def test_activation_estimate(sm):
  model = _toy_model(sm)
  b, L, C, H, V = 2, model.seq_len, model.width, model.heads, model.vocab
  full = sm.activation_bytes(model, b, 1, remat=False, flash=False)
  assert full == 4 * (model.depth * ((3 + 4 + 8) * b * L * C + H * L * L * b) + 2 * b * L * V)
  remat = sm.activation_bytes(model, b, 1, remat=True, flash=True)
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
