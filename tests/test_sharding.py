"""Sharding strategies: rules tables, divisibility fallback, and (on 8 host devices, one
subprocess) equal loss/gradients across dp/fsdp/hsdp/tp/fsdp_tp, the real param layouts, applied
activation constraints, and a checkpoint saved under fsdp resumed under tp. Every family's logical
axis names: tests/test_family_contract.py.

Tolerances (fp32, CPU): loss rtol 1e-5; gradients rtol 1e-4 with atol 1e-6 (cross-device
reductions reorder the sums).
"""

import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from arvision.parallel import logical as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), ("data", "fsdp", "tensor"))


def test_unknown_strategy_names_accepted_ones():
  with pytest.raises(ValueError, match="accepted.*'dp'.*'fsdp'.*'hsdp'.*'tp'.*'fsdp_tp'"):
    R.get_rules("zero3")


def test_tables_use_known_names_and_shard_batch_everywhere():
  for strategy in R.STRATEGIES:
    table = R.get_rules(strategy)
    R.check_names(table)
    assert table[0] == ("batch", ("data", "fsdp"))
  with pytest.raises(ValueError, match="unknown logical axes"):
    R.check_names((("embd", "fsdp"),))


def test_rules_mapping_per_strategy():
  qkv, fc2 = (("embed", "heads"), (32, 96)), (("mlp", "embed"), (128, 32))
  act = (("batch", "seq", "embed"), (8, 5, 32))
  expect = {
    # strategy, mesh: (qkv kernel, fc2 kernel, residual activation)
    ("dp", (8, 1, 1)): (P(), P(), P("data")),
    ("fsdp", (1, 8, 1)): (P("fsdp"), P(None, "fsdp"), P("fsdp")),
    ("fsdp", (2, 4, 1)): (P(("data", "fsdp")), P(None, ("data", "fsdp")), P(("data", "fsdp"))),
    ("hsdp", (2, 4, 1)): (P("fsdp"), P(None, "fsdp"), P(("data", "fsdp"))),
    ("tp", (4, 1, 2)): (P(None, "tensor"), P("tensor"), P("data")),
    ("fsdp_tp", (1, 4, 2)): (P("fsdp", "tensor"), P("tensor", "fsdp"), P("fsdp")),
  }
  for (strategy, shape), want in expect.items():
    mesh, table = _mesh(*shape), R.get_rules(strategy)
    got = tuple(R.spec(n, s, table, mesh) for n, s in (qkv, fc2, act))
    assert got == want, (strategy, shape, got)


def test_divisibility_fallback_replicates_or_moves():
  mesh = _mesh(2, 4, 2)
  fsdp, tp = R.get_rules("fsdp"), R.get_rules("tp")
  # 12 is not divisible by data*fsdp=8: keep "data" (2 | 12), drop "fsdp".
  assert R.spec(("embed", "mlp"), (12, 64), fsdp, mesh) == P("data", "fsdp")
  # embed=3 takes nothing; the next preferred name (mlp) takes both axes.
  assert R.spec(("embed", "mlp"), (3, 64), fsdp, mesh) == P(None, ("data", "fsdp"))
  # An RGB output conv under tp: conv_out=3 is not split, conv_in takes the tensor axis.
  conv = ("conv_h", "conv_w", "conv_in", "conv_out")
  assert R.spec(conv, (3, 3, 64, 3), tp, mesh) == P(None, None, "tensor")
  # Nothing divides: fully replicated; a batch of 1 stays whole.
  assert R.spec(conv, (3, 3, 5, 3), tp, mesh) == P()
  assert R.spec(("batch", "seq"), (1, 7), fsdp, mesh) == P()
  # Size-1 mesh axes never appear; unannotated leaves are replicated.
  assert R.spec(("heads",), (4,), tp, _mesh(8, 1, 1)) == P()
  assert R.spec((), (4, 4), tp, mesh) == P()
  with pytest.raises(ValueError, match="more entries"):
    R.spec(("embed", "mlp"), (4,), fsdp, mesh)


_SCRIPT = textwrap.dedent(
  r"""
  import os
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np

  from arvision import checkpoint as ckpt_lib
  from arvision import families, parallel, train
  from arvision.config_util import load_config_file

  assert jax.device_count() == 8
  base = load_config_file("configs/var.py:smoke")
  tok = families.build(base.tokenizer.config)
  frozen = {"tokenizer": jax.jit(tok.init, static_argnums=1)(jax.random.key(1), None)}
  family = families.build(base, tokenizer=tok)
  d = base.data
  rng = np.random.default_rng(0)
  batches = [
    dict(
      image=rng.uniform(-1, 1, (8, d.image_size, d.image_size, d.channels)).astype(np.float32),
      label=rng.integers(0, d.num_classes, (8,)).astype(np.int32),
    )
    for _ in range(3)
  ]
  MESHES = {
    "dp": dict(data=8, fsdp=1, tensor=1),
    "fsdp": dict(data=1, fsdp=8, tensor=1),
    "hsdp": dict(data=2, fsdp=4, tensor=1),
    "tp": dict(data=4, fsdp=1, tensor=2),
    "fsdp_tp": dict(data=1, fsdp=4, tensor=2),
  }

  def setup(strategy):
    config = load_config_file("configs/var.py:smoke")
    with config.unlocked():
      config.mesh.update(MESHES[strategy])
      config.sharding.strategy = strategy
    return train.build(config, family, frozen)

  def put(s, batch):
    return jax.device_put(batch, s.batch_sharding)

  def grads(s, state, batch):
    def f(params, frozen_, batch):
      with parallel.use_rules(s.mesh, s.rules):
        loss_fn = lambda p: family.loss({**p, **frozen_}, batch, jax.random.key(7), True)[0]
        return jax.value_and_grad(loss_fn)(params)

    sh = s.shardings
    fn = jax.jit(f, in_shardings=(sh["params"], sh["frozen"], s.batch_sharding))
    return jax.device_get(fn(state["params"], state["frozen"], put(s, batch)))

  def spec(x):
    return tuple(x.sharding.spec)

  # --- same loss and gradients; one optimizer step agrees too ----------------------------------
  ref = None
  for strategy in os.environ["STRATEGIES"].split(","):  # the first is the reference
    s = setup(strategy)
    state = s.init(s.init_rng)
    loss, g = grads(s, state, batches[0])
    state, m0 = s.step(state, put(s, batches[0]))
    state, m1 = s.step(state, put(s, batches[1]))
    got = (float(loss), g, float(m0["loss"]), float(m1["loss"]))
    if ref is None:
      ref = got
    else:
      for a, b in ((got[0], ref[0]), (got[2], ref[2]), (got[3], ref[3])):
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=strategy)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=strategy),
        got[1],
        ref[1],
      )
    p, opt = state["params"], state["opt"]
    qkv = p["blocks_0"]["attn"]["mat_qkv"]["kernel"]
    fc1, fc2 = p["blocks_0"]["ffn"]["fc1"]["kernel"], p["blocks_0"]["ffn"]["fc2"]["kernel"]
    emb = p["class_emb"]["embedding"]
    want = {
      "dp": ((), (), (), ()),
      "fsdp": (("fsdp",), ("fsdp",), (None, "fsdp"), (None, "fsdp")),
      "hsdp": (("fsdp",), ("fsdp",), (None, "fsdp"), (None, "fsdp")),
      "tp": ((None, "tensor"), (None, "tensor"), ("tensor",), ()),
      "fsdp_tp": (("fsdp", "tensor"), ("fsdp", "tensor"), ("tensor", "fsdp"), (None, "fsdp")),
    }[strategy]
    assert (spec(qkv), spec(fc1), spec(fc2), spec(emb)) == want, (strategy, spec(qkv))
    # Really split: each device holds 1/n of the kernel.
    n = int(np.prod([s.mesh.shape[a] for a in ("fsdp", "tensor") if a in str(want[0])] or [1]))
    assert qkv.addressable_shards[0].data.size * n == qkv.size, strategy
    # Adam moments follow their params; the step counter is replicated.
    mus = [x for x in jax.tree.leaves(opt) if x.shape == qkv.shape]
    assert mus and all(m.sharding.spec == qkv.sharding.spec for m in mus), strategy
    assert spec(state["step"]) == ()
    print("ok", strategy, float(loss))

  if os.environ.get("EXTRAS") != "1":
    print("ALL OK")
    raise SystemExit(0)

  # --- activation constraints are in the program, not no-ops -----------------------------------
  s = setup("tp")
  state = s.init(s.init_rng)
  hlo = s.step.lower(state, put(s, batches[0])).as_text()
  count = lambda text: text.count("sdy.sharding_constraint") + text.count("@Sharding")
  n_constraints = count(hlo)
  assert n_constraints >= 10, n_constraints
  family_loss = lambda p, b: family.loss({**p, **frozen}, b, jax.random.key(7), True)[0]
  plain = jax.jit(family_loss).lower(state["params"], put(s, batches[0])).as_text()
  assert count(plain) == 0  # outside `use_rules`, `constrain` adds nothing
  print("ok constraints", n_constraints)

  # --- save under fsdp, restore under tp: same continuation ------------------------------------
  with tempfile.TemporaryDirectory() as tmp:
    sf = setup("fsdp")
    state = sf.init(sf.init_rng)
    state, _ = sf.step(state, put(sf, batches[0]))
    ck = ckpt_lib.Checkpointer(tmp, keep=1, async_save=False)
    ck.save(1, state, base)
    ck.close()
    _, m_fsdp = sf.step(state, put(sf, batches[1]))
    st = setup("tp")
    restored = ckpt_lib.Checkpointer(tmp, keep=1).restore(st.abstract_state)
    qkv = restored["params"]["blocks_0"]["attn"]["mat_qkv"]["kernel"]
    assert spec(qkv) == (None, "tensor"), spec(qkv)
    assert int(restored["step"]) == 1
    _, m_tp = st.step(restored, put(st, batches[1]))
    np.testing.assert_allclose(float(m_tp["loss"]), float(m_fsdp["loss"]), rtol=1e-5)
    print("ok restore", float(m_fsdp["loss"]), float(m_tp["loss"]))
  print("ALL OK")
  """
)


def _run_on_8_devices(strategies, extras):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    STRATEGIES=",".join(strategies),
    EXTRAS="1" if extras else "0",
  )
  res = subprocess.run(
    [sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
  )
  assert res.returncode == 0 and "ALL OK" in res.stdout, res.stdout[-3000:] + res.stderr[-6000:]
  for line in [f"ok {s} " for s in strategies] + (
    ["ok constraints", "ok restore"] if extras else []
  ):
    assert line in res.stdout, res.stdout[-3000:]


def test_strategies_agree_on_8_devices():
  """fsdp (the reference) and fsdp_tp: every kind of split (batch, weights over fsdp, heads over
  tensor, both at once); plus the constraints and the fsdp -> tp restore (which builds tp)."""
  _run_on_8_devices(("fsdp", "fsdp_tp"), extras=True)


@pytest.mark.slow  # ~80 s more on 2 cores; tp alone, dp and hsdp regroup the axes checked above
def test_tp_dp_and_hsdp_agree_with_fsdp_on_8_devices():
  _run_on_8_devices(("fsdp", "tp", "dp", "hsdp"), extras=False)
