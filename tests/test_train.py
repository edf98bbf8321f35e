"""The one loop: metrics, checkpoints, exact resume, NaN handling, preemption, config guard."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from arvision import checkpoint, metrics_writer, train

HERE = os.path.dirname(os.path.abspath(__file__))


def _losses(workdir):
  rows = metrics_writer.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _params(workdir):
  return checkpoint.load_params(workdir)["params"]


def test_train_writes_metrics_checkpoints_and_eval(tmp_path, toy_config):
  wd = str(tmp_path / "run")
  out = train.train(toy_config(), wd)
  assert sorted(_losses(wd)) == [1, 2, 3, 4, 5, 6]
  assert checkpoint.Checkpointer(wd).latest_step() == 6
  assert os.path.exists(os.path.join(wd, "config.json"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tensorboard")))
  with open(os.path.join(wd, "eval", "step_00000006", "metrics.json")) as f:
    rec = json.load(f)
  assert rec["step"] == 6 and 0.0 <= rec["metrics"]["accuracy"] <= 1.0
  assert out["accuracy"] == rec["metrics"]["accuracy"]


def test_interrupted_then_resumed_matches_uninterrupted(tmp_path, toy_config):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  train.train(toy_config(), a)
  train.train(toy_config(), b, stop_after=3)
  assert sorted(_losses(b)) == [1, 2, 3]
  train.train(toy_config(), b)  # same command again: resumes at step 3
  la, lb = _losses(a), _losses(b)
  assert sorted(lb) == [1, 2, 3, 4, 5, 6]  # steps continue, never restart
  np.testing.assert_array_equal([la[s] for s in sorted(la)], [lb[s] for s in sorted(lb)])
  jax.tree.map(np.testing.assert_array_equal, _params(a), _params(b))


def test_larger_total_steps_continues(tmp_path, toy_config):
  wd = str(tmp_path / "run")
  train.train(toy_config(), wd)
  train.train(toy_config(total_steps=8), wd)
  steps = [
    r["step"]
    for r in metrics_writer.read_jsonl(os.path.join(wd, "metrics.jsonl"))
    if "train/loss" in r
  ]
  assert steps == sorted(steps) and steps[-2:] == [7, 8] and len(steps) == len(set(steps))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, toy_config):
  wd = str(tmp_path / "run")
  with pytest.raises(train.NonFiniteLossError, match="step 5.*last good checkpoint \\(step 4\\)"):
    train.train(toy_config(**{"model.nan_at_step": 4, "checkpoint_every": 2}), wd)
  assert checkpoint.Checkpointer(wd).latest_step() == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(wd)))


def test_changed_model_config_is_refused(tmp_path, toy_config):
  wd = str(tmp_path / "run")
  train.train(toy_config(), wd)
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  with pytest.raises(ValueError, match="data.image_size"):
    train.train(toy_config(**{"data.image_size": 16}), wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before


def test_sigterm_saves_and_exits_cleanly(tmp_path, toy_family_path):
  wd = str(tmp_path / "run")
  cfg = toy_family_path
  env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "arvision.cli",
      "train",
      "--config",
      cfg,
      "--workdir",
      wd,
      "--config.total_steps=100000",
      "--config.checkpoint_every=0",
      "--config.log_every=1",
    ],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 120
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  step = checkpoint.Checkpointer(wd).latest_step()
  assert step is not None and step >= 3


def test_batch_that_does_not_split_over_the_devices_is_a_clear_error(toy_config):
  from types import SimpleNamespace  # noqa: PLC0415

  from arvision import errors  # noqa: PLC0415

  mesh = SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 1})
  train._check_batch_splits(toy_config(**{"data.batch_size": 6}), mesh, 1)  # 6 over 2: fine
  micro3 = toy_config(**{"data.batch_size": 6, "optim.accum_steps": 2})  # 3 over 2 devices
  with pytest.raises(errors.UserError, match=r"batch_size=6 \(micro-batch 3.*2 devices"):
    train._check_batch_splits(micro3, mesh, 2)
