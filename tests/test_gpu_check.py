"""experiments/gpu_check.sh: the script parses, refuses bad arguments, and (slow) runs every
stage end to end at toy sizes on CPU (`--cpu-smoke`)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gpu_check.sh")


def _bash(*args, **kw):
  return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_script_parses_and_refuses_bad_arguments(tmp_path):
  assert _bash("-n", SCRIPT).returncode == 0
  out = _bash(SCRIPT, "--help")
  assert out.returncode == 0 and "--reference-dir" in out.stdout
  out = _bash(SCRIPT, "--no-such-flag")
  assert out.returncode == 2 and "unknown argument --no-such-flag" in out.stderr
  out = _bash(SCRIPT, "--reference-dir", str(tmp_path / "missing"))
  assert out.returncode == 2 and "is not a directory" in out.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable)
  out = _bash(SCRIPT, "--cpu-smoke", "--out-dir", str(tmp_path), env=env, timeout=4000)
  with open(tmp_path / "cpusmoke_check.json") as f:
    summary = json.load(f)
  stages = {r["stage"]: r for r in summary["stages"]}
  assert set(stages) >= {"attention", "train_var_d16", "sampling_var_d16", "sampling_llamagen_l"}
  for name, row in stages.items():
    assert row["status"] == "ok", (name, row["log_tail"], out.stdout[-3000:])
    assert os.path.exists(tmp_path / row["json"])
  assert out.returncode == 0
