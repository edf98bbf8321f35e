"""Smoke test of experiments/bench_sampling.py: the no-cache baseline and the script's code path."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(experiment):
  return experiment("bench_sampling")


@pytest.fixture(scope="module")
def var_smoke(bench):
  return bench.build("configs/var.py:smoke", seed=0)


def test_recompute_matches_kv_cache_tokens(bench, var_smoke):
  """Recomputing the prefix must sample exactly what the KV-cache sampler samples."""
  _, fam, params = var_smoke
  fns = bench.samplers(fam)
  labels = jnp.asarray([0, 3, 5], jnp.int32)
  rng = jax.random.key(7)
  # Greedy: fully deterministic, tokens and images must be identical.
  img_c, idx_c = fns["kv_cache"](params, labels, rng, cfg=1.5, top_k=1, top_p=0.0)
  img_r, idx_r = fns["recompute"](params, labels, rng, cfg=1.5, top_k=1, top_p=0.0)
  for a, b in zip(idx_c, idx_r, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(img_c), np.asarray(img_r))
  assert img_c.dtype == jnp.uint8 and img_c.shape[0] == 3
  # Random sampling with the same rng: the same draws (float noise may flip a rare token).
  _, idx_c = fns["kv_cache"](params, labels, rng, cfg=0.0, top_k=0, top_p=0.0)
  _, idx_r = fns["recompute"](params, labels, rng, cfg=0.0, top_k=0, top_p=0.0)
  agree = np.mean(
    np.concatenate([np.asarray(a) == np.asarray(b) for a, b in zip(idx_c, idx_r, strict=True)], 1)
  )
  assert agree > 0.97, agree
  # And a different rng gives different tokens (the comparison above is not vacuous).
  _, idx_o = fns["recompute"](params, labels, jax.random.key(8), cfg=0.0, top_k=0, top_p=0.0)
  other = np.mean(
    np.concatenate([np.asarray(a) == np.asarray(b) for a, b in zip(idx_o, idx_r, strict=True)], 1)
  )
  assert other < 0.9, other


def test_bf16_compute_changes_math_not_answers(bench, var_smoke):
  """`--dtype bfloat16` must actually compute the transformer in bf16 (not silently f32)."""
  _, fam, params = var_smoke
  labels = jnp.asarray([1, 2], jnp.int32)
  teacher = jax.random.normal(
    jax.random.key(0), (2, fam.seq_len - fam.lengths[0], fam.module.cvae), jnp.float32
  )
  ref = np.asarray(fam.apply(params, labels, teacher))
  p16 = bench.cast_params(params, jnp.bfloat16)
  assert p16["tokenizer"]["ae"] is params["tokenizer"]["ae"]  # tokenizer stays float32
  weights_only = np.asarray(fam.apply(p16, labels, teacher))
  with bench.compute_dtype(jnp.bfloat16):
    out = np.asarray(fam.apply(p16, labels, teacher))
  assert np.all(np.isfinite(out))
  # Casting Dense inputs changes the numbers beyond what bf16 weights alone do ...
  assert np.abs(out - weights_only).max() > 0
  # ... but stays a bf16-accurate version of the float32 forward.
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert 0 < rel < 0.1, rel


def test_script_writes_table_json(bench, tmp_path):
  out = tmp_path / "bench.json"
  args = ["--quick", "--batch", "1", "--cfg", "0,1.5", "--runs", "1", "--out", str(out)]
  bench.main(args)
  doc = json.loads(out.read_text())
  assert doc["device"].startswith(jax.devices()[0].platform)
  assert doc["versions"]["jax"] == jax.__version__
  (res,) = doc["results"]
  assert res["config"]["depth"] == 2 and res["settings"]["cfg_doubles_batch"]
  rows = res["rows"]
  assert {(r["impl"], r["cfg"]) for r in rows} == {
    (i, c) for i in ("kv_cache", "recompute") for c in (0.0, 1.5)
  }
  for r in rows:
    assert r["images_per_s"] > 0 and r["median_s"] > 0 and r["first_call_s"] > 0
    assert r["compile_s"] >= 0 and r["images_per_s"] == pytest.approx(1 / r["median_s"])
    assert len(r["runs_s"]) == 1
    if r["impl"] == "recompute":
      assert r["kv_cache_speedup"] == pytest.approx(
        r["median_s"]
        / next(x["median_s"] for x in rows if x["impl"] == "kv_cache" and x["cfg"] == r["cfg"])
      )


def test_bad_arguments(bench):
  with pytest.raises(SystemExit):
    bench.parse_args(["--impls", "kv_cache,nope"])
  with pytest.raises(SystemExit):
    bench.parse_args(["--batch", "0"])
  with pytest.raises(ValueError, match="var"):
    bench.build("configs/tokenizer.py:smoke")


def test_raster_rows_and_decode_bytes(bench, tmp_path):
  out = tmp_path / "raster.json"
  bench.main(["--config", "configs/raster.py:smoke", "--batch", "2", "--cfg", "2.0", "--runs", "1",
              "--out", str(out)])  # fmt: skip
  (res,) = json.loads(out.read_text())["results"]
  assert res["config"]["family"] == "raster"
  (row,) = res["rows"]
  _, fam, params = bench.build_family("configs/raster.py:smoke")
  n = fam.num_tokens
  assert row["tokens_per_s"] == pytest.approx(2 * n / row["median_s"])
  # Bytes per step: every transformer weight once + the whole static cache of 2B rows.
  m = fam.module
  weights = sum(
    x.size * 4 for k, v in params.items() if k != "tokenizer" for x in jax.tree.leaves(v)
  )
  kv = 2 * m.n_layer * 4 * fam.cache_length() * m.kv_heads * m.head_dim * 4
  assert row["bytes_per_step"] == {"weights": weights, "kv_cache": kv, "total": weights + kv}
  assert row["achieved_bandwidth"] == pytest.approx((weights + kv) / row["decode_step_s"])
  assert row["peak_bandwidth"] is None and row["bandwidth_fraction"] is None  # CPU: no roofline


@pytest.mark.slow  # 43 s on 2 cores; the VAR/raster rows keep the script covered
def test_mar_rows_cover_iters_steps_and_disa(bench, tmp_path):
  out = tmp_path / "mar.json"
  bench.main(["--config", "configs/mar.py:smoke", "--batch", "2", "--cfg", "1.0", "--runs", "1",
              "--num_iter", "2", "--diffusion_steps", "6,8", "--out", str(out)])  # fmt: skip
  (res,) = json.loads(out.read_text())["results"]
  got = {(r["num_iter"], r["diffusion_steps"], r["disa"]) for r in res["rows"]}
  assert got == {(2, s, d) for s in (6, 8) for d in (False, True)}
  assert all(r["images_per_s"] == pytest.approx(2 / r["median_s"]) for r in res["rows"])


def test_peak_bandwidth_table(bench):
  assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
  assert bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
  assert bench.peak_bandwidth("NVIDIA H200") == 4.8e12
  assert bench.peak_bandwidth("cpu") is None


def test_side_by_side_rows_carry_ratios_against_var(bench):
  """Every successor row (FlexVAR, M-VAR, Infinity) gets its speed and XLA bytes over the VAR row
  of its own batch and cfg (a FlexVAR row once printed "x1.00 vs VAR" for want of them)."""
  import argparse

  def make(width):  # a stand-in sampler: more work and bigger buffers for a larger width
    return lambda cfg: lambda p, lab, r: jnp.tanh(p * cfg + lab[:, None, None]) @ p

  impls = {"var": (make(8), jnp.ones((8, 8)), {}), "other": (make(64), jnp.ones((64, 64)), {})}
  args = argparse.Namespace(batch=[1, 2], cfg=[0.0, 1.5], seed=0, runs=1)
  rows = bench.side_by_side(args, impls, num_classes=10)
  assert [(r["impl"], r["batch"], r["cfg"]) for r in rows[:4]] == [
    ("var", 1, 0.0), ("other", 1, 0.0), ("var", 1, 1.5), ("other", 1, 1.5)
  ]  # fmt: skip
  assert len(rows) == 8
  for var, other in zip(rows[::2], rows[1::2], strict=True):
    assert "speed_over_var" not in var
    assert other["speed_over_var"] == pytest.approx(other["images_per_s"] / var["images_per_s"])
    assert other["xla_bytes_over_var"] == pytest.approx(other["xla_bytes"] / var["xla_bytes"])
    assert other["xla_bytes"] > var["xla_bytes"] > 0
    assert f"x{other['speed_over_var']:.2f} vs VAR" in bench._fmt_family_row(other)
