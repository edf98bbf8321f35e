"""experiments/fmnist_job.py's pure parts: the recorded commands and the split of the train stage."""

import json
import os

import pytest


@pytest.fixture
def job(experiment):
  return experiment("fmnist_job")


def test_commands_pass_overrides_and_refuse_machine_paths(job):
  cmds = job.commands("configs/hmar.py:fmnist", "runs/h", ["total_steps=130"], 1000)
  assert cmds["train"] == ["arvision", "train", "--config", "configs/hmar.py:fmnist",
                           "--workdir", "runs/h", "--config.eval.num_samples=250",
                           "--config.total_steps=130"]  # fmt: skip
  assert cmds["eval"] == ["arvision", "eval", "--workdir", "runs/h", "--num_samples", "1000",
                          "--out", os.path.join("runs/h", "eval")]  # fmt: skip
  with pytest.raises(SystemExit, match="relative path"):
    job.commands("configs/hmar.py:fmnist", "/abs/h", [], 1000)
  with pytest.raises(SystemExit, match="key=value"):
    job.commands("configs/hmar.py:fmnist", "runs/h", ["total_steps"], 1000)


def test_substages_split_train_time_at_nested_runs_last_writes(job, tmp_path):
  wd = str(tmp_path)
  for name, end in (("tokenizer", 130.0), ("stage1", 400.0)):
    os.makedirs(os.path.join(wd, name))
    path = os.path.join(wd, name, "metrics.jsonl")
    with open(path, "w") as f:
      f.write(json.dumps({"step": 1, "train/steps_per_s": 2.0}) + "\n")
      f.write(json.dumps({"step": 2, "train/steps_per_s": 4.0}) + "\n")
    os.utime(path, (end, end))
  assert job.substages(wd, 100.0, 500.0) == dict(
    tokenizer_s=30.0, stage1_s=270.0, generator_s=200.0
  )
  # the first logged window holds compilation: left out of the mean
  assert job._mean_steps_per_s(os.path.join(wd, "stage1", "metrics.jsonl")) == 4.0


def test_in_training_evals_keep_only_eval_rows_and_their_domain_metrics(job, tmp_path):
  wd = str(tmp_path)
  rows = [
    {"step": 50, "train/loss": 4.0},
    {"step": 100, "eval/fd_fmnist": 30.0, "eval/recall_fmnist": 0.2, "eval/num_samples": 1000.0,
     "eval/heldout_acc_s0": 0.4},
    {"step": 200, "eval/fd_fmnist": 20.0, "eval/class_accuracy": 0.9},
  ]  # fmt: skip
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  assert job.in_training_evals(wd) == [
    dict(step=100, num_samples=1000.0, fd_fmnist=30.0, recall_fmnist=0.2),
    dict(step=200, class_accuracy=0.9, fd_fmnist=20.0),
  ]
  assert job.in_training_evals(str(tmp_path / "missing")) == []
