"""`arvision compile` / `arvision.parallel.aot`: the real training step compiled for a TPU slice
from this host (libtpu describes the slice; the TPU compiler compiles). The toy family keeps each
compile to a few seconds; what is checked is the report: memory, FLOPs, collectives, roofline,
and a step that cannot fit reported as not fitting.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from cli_runner import run_cli

from arvision import config_util
from arvision.parallel import aot, chips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "toy_family.py")

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[aot]')",
)


def _toy(**fields):
  return aot.with_fields(config_util.load_config_file(TOY), fields)


@needs_libtpu
def test_compile_reports_memory_flops_collectives_and_roofline():
  r = aot.compile_step(_toy(**{"sharding.strategy": "fsdp"}), "v5p:2x2x1")
  assert r["chips"] == 4 and r["device_kind"].startswith("TPU v5")
  m = r["memory_bytes"]
  assert m["argument"] > 0 and m["temp"] >= 0
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
  assert r["fits"] and m["total"] < chips.CHIPS["v5p"].hbm_bytes
  assert r["flops"] > 0 and r["bytes_accessed"] > 0
  # fsdp on 4 chips: weights gathered, gradients reduced across chips.
  assert r["collectives"]["count"] > 0 and r["collectives"]["bytes"] > 0
  rf = r["roofline"]
  assert rf["step_s"] == max(rf["compute_s"], rf["memory_s"], rf["collective_s"]) > 0
  text = aot.format_report(r)
  assert "FITS" in text and "collectives in the compiled HLO" in text


@needs_libtpu
def test_a_step_that_cannot_fit_is_reported_as_not_fitting():
  # 256 images of 2048^2 x 3 per chip: the TPU compiler refuses the program on a 16 GiB v5e.
  big = {"data.image_size": 2048, "data.channels": 3, "data.batch_size": 1024}
  r = aot.compile_step(_toy(**{"sharding.strategy": "dp"}, **big), "v5e:2x2")
  assert r["fits"] is False
  oom = r["out_of_memory"]
  assert oom["required_bytes"] > oom["available_bytes"] > 10 * 2**30
  assert "DOES NOT FIT" in aot.format_report(r)


@needs_libtpu
def test_cli_compile_writes_json(tmp_path):
  out = tmp_path / "r.json"
  code, stdout, stderr = run_cli(
    "compile", "--config", TOY, "--topology", "v5p:2x2x1", "--json", out,
    "--config.sharding.strategy=fsdp",
  )  # fmt: skip
  assert code == 0, stderr
  assert "memory per chip" in stdout and "roofline" in stdout
  r = json.loads(out.read_text())
  assert r["topology"] == "v5p:2x2x1" and r["config"]["strategy"] == "fsdp"
  assert r["command"].startswith("arvision compile --config") and "v5p:2x2x1" in r["command"]
  assert r["host"]["process_cpu_s"] > 0 and r["host"]["peak_rss_gib"] > 0


def test_bad_topology_is_one_line():
  code, _, stderr = run_cli("compile", "--config", TOY, "--topology", "v9z:2x2")
  assert code == 2 and "unknown chip 'v9z'" in stderr


def test_alternatives_cover_strategies_remat_precision_and_accumulation():
  config = config_util.load_config_file(os.path.join(ROOT, "configs", "var.py:smoke"))
  config = aot.with_fields(config, {"sharding.strategy": "dp", "data.batch_size": 64})
  alts = aot.alternatives(config, n=16, heads=8)
  names = [name for name, _ in alts]
  assert names[0] == "fsdp mesh fsdp=16"  # the likeliest fix first
  assert "fsdp + remat=full" in names and "fsdp + remat=full + model.dtype=bfloat16" in names
  accum = dict(alts)["fsdp + remat=full + bfloat16 + accum_steps=4"]
  assert accum["optim.accum_steps"] == 4 and accum["remat"] == "full"
  assert dict(alts)["fsdp_tp mesh fsdp=4xtensor=4"]["mesh.tensor"] == 4
  for _, fields in alts:
    assert fields["mesh.data"] * fields["mesh.fsdp"] * fields["mesh.tensor"] == 16
    aot.with_fields(config, fields)  # every field exists in the config


def test_chip_table_has_sources():
  for name in ("v5p", "v5e", "v6e", "h100", "h200"):
    c = chips.CHIPS[name]
    assert c.peak_flops > 1e14 and c.hbm_bytes > 1e10 and c.hbm_bw > 1e11 and c.source


def test_target_backend_picks_the_kernels_of_the_target():
  import jax
  import jax.numpy as jnp

  from arvision.kernels.common import resolve_interpret
  from arvision.ops import masks
  from arvision.ops.attention import choose_impl, target_backend

  q = jax.ShapeDtypeStruct((1, 21, 2, 64), jnp.bfloat16)
  spec = masks.scale_causal((1, 4, 16))
  with target_backend("tpu"):
    assert choose_impl(q, q, q, mask=spec) == "splash"
    assert resolve_interpret(None) is False
  with target_backend("gpu"):
    assert choose_impl(q, q, q, mask=spec) == "pallas"
  assert choose_impl(q, q, q, mask=spec) == "xla"  # this host (JAX_PLATFORMS=cpu)
  assert resolve_interpret(None) is True


def test_cli_defaults_to_cpu_without_accelerators(monkeypatch):
  from arvision import cli

  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr("glob.glob", lambda pattern: [])
  cli._default_to_cpu()
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  cli._default_to_cpu()  # the user's choice stands
  assert os.environ["JAX_PLATFORMS"] == "tpu"


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("family", ["var", "raster", "mar"])
def test_every_family_compiles_with_splash_for_tpu(family):
  # The real step of each family's smoke config: splash (Mosaic) inside shard_map on 4 v5p chips.
  config = aot.with_fields(
    config_util.load_config_file(os.path.join(ROOT, "configs", f"{family}.py:smoke")),
    {"sharding.strategy": "fsdp"},
  )
  r = aot.compile_step(config, "v5p:2x2x1")
  assert r["fits"] and r["kernel_calls"] >= 3  # forward, dq and dkv kernels
  s = aot.compile_step(config, "v5p:2x2x1", what="sample")
  assert s["fits"] and s["memory_bytes"]["argument"] > 0


@needs_libtpu
def test_mesh_axes_that_split_a_physical_axis():
  # tensor=8 on a 4x4 v6e slice is no product of physical axes: jax.make_mesh refuses it, the
  # loop's make_mesh splits one (found by `arvision compile` of fsdp_tp on v6e:16x16).
  from arvision.parallel.mesh import make_mesh

  mesh = make_mesh(dict(data=1, fsdp=2, tensor=8), devices=list(aot.topology_devices("v6e:4x4")))
  assert dict(mesh.shape) == dict(data=1, fsdp=2, tensor=8)
  assert len({d.id for d in mesh.devices.flat}) == 16
