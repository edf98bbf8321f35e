"""The quickstart path at smoke size: train (with in-training evals) -> eval -> summary, the files it
writes (samples.png, curves.png, metrics.json, summary.json) and the printed summary; and the
shipped-tokenizer mechanism (`config.tokenizer.checkpoint = "shipped:<name>"`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import jax
import numpy as np
import pytest
from cli_runner import run_cli

from arvision import config_util, summary
from arvision import train as train_lib
from arvision.tokenizers import shipped


@pytest.mark.slow  # ~170 CPU-seconds (compiles of a tokenizer, VAR, two evals): minutes on 2 cores
def test_quickstart_path_writes_samples_curves_metrics_and_summary(tmp_path):
  wd = str(tmp_path / "qs")
  job_start = summary.time.time()
  # A timed stage: runs the command, records its wall time and exit status.
  assert summary.run_stage(wd, "setup-check", [sys.executable, "-c", "pass"]) == 0
  code, _, err = run_cli(
    "train", "--config", "configs/var.py:smoke", "--workdir", wd,
    "--config.total_steps=4", "--config.log_every=1", "--config.eval_every=2",
  )  # fmt: skip
  assert code == 0, err
  code, _, err = run_cli("eval", "--workdir", wd, "--num_samples", "16", "--out", f"{wd}/eval")
  assert code == 0, err
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = summary.main(["report", "--workdir", wd, "--eval", f"{wd}/eval", "--job_start",
                       str(job_start)])  # fmt: skip
  assert rc == 0
  for name in ("samples.png", "curves.png", "metrics.json"):
    assert os.path.getsize(os.path.join(wd, "eval", name)) > 0, name
  with open(os.path.join(wd, "summary.json")) as f:
    s = json.load(f)
  assert s["samples"] == os.path.join(wd, "eval", "samples.png")
  assert s["curves"] == os.path.join(wd, "eval", "curves.png")
  assert s["step"] == 4 and s["num_samples"] == 16
  assert [st["name"] for st in s["stages"]] == ["setup", "setup-check"]
  assert s["total_wall_s"] >= s["stages"][1]["wall_s"]
  text = out.getvalue()
  assert f"samples: {s['samples']}" in text and f"curves:  {s['curves']}" in text
  assert "setup-check" in text
  # curves.png: one loss panel + the tokenizer's (trained in this job): a real PNG.
  from PIL import Image

  with Image.open(s["curves"]) as im:
    assert im.size[0] > im.size[1] > 100


def test_report_writes_curves_and_summary_of_a_finished_job(tmp_path):
  """The report alone (fast): a job's metrics.jsonl, eval metrics and stage times -> curves.png,
  summary.json and the printed summary, with the metrics beside the floor of the same N."""
  wd = tmp_path / "W"
  (wd / "eval").mkdir(parents=True)
  rows = [{"step": s, "train/loss": 6.0 - s / 100} for s in range(10, 110, 10)]
  rows += [{"step": s, "eval/class_accuracy": 0.5 + s / 500, "eval/fd_fmnist": 40 - s / 10}
           for s in (50, 100)]  # fmt: skip
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  final = dict(step=100, num_samples=1000, metrics={"class_accuracy": 0.71, "fd_fmnist": 30.5})
  (wd / "eval" / "metrics.json").write_text(json.dumps(final))
  (wd / "eval" / "samples.png").write_bytes(b"")
  stages = [dict(name="train", wall_s=300.0, start=1000.0, rc=0),
            dict(name="eval", wall_s=60.0, start=1300.0, rc=0)]  # fmt: skip
  (wd / summary.STAGES).write_text(json.dumps(stages))
  floor = tmp_path / "floor.json"
  floor.write_text(json.dumps({"floor_train_vs_test": {"1000": {"class_accuracy": 0.92,
                                                               "fd_fmnist": 2.78}}}))  # fmt: skip
  s = summary.summarize(
    str(wd), str(wd / "eval"), job_start=820.0, floor_json=str(floor), now=1370.0
  )
  assert os.path.getsize(wd / "eval" / "curves.png") > 0
  assert json.loads((wd / "summary.json").read_text()) == s
  assert [st["name"] for st in s["stages"]] == ["setup", "train", "eval"]
  assert s["stages"][0]["wall_s"] == 180.0 and s["total_wall_s"] == 550.0
  assert s["floor"]["fd_fmnist"] == 2.78 and s["metrics"]["fd_fmnist"] == 30.5
  text = summary.render(s)
  assert "Done in 9m10s." in text and "setup 3m00s, train 5m00s, eval 1m00s" in text


def test_summary_puts_metrics_beside_the_real_floor():
  s = dict(
    total_wall_s=600.0, stages=[dict(name="train", wall_s=500.0)], tokenizer="shipped:x",
    samples="W/eval/samples.png", curves="W/eval/curves.png", num_samples=1000, step=300,
    metrics=dict(class_accuracy=0.812, fd_fmnist=9.25, precision_fmnist=0.7, recall_fmnist=0.55),
    floor=dict(class_accuracy=0.921, fd_fmnist=2.78, precision_fmnist=0.85, recall_fmnist=0.88),
  )  # fmt: skip
  lines = summary.render(s).splitlines()
  assert lines[0] == "Done in 10m00s."
  acc = next(line for line in lines if line.strip().startswith("class accuracy"))
  assert "0.812" in acc and "0.921" in acc and "higher" in acc
  fd = next(line for line in lines if "FD" in line)
  assert "9.250" in fd and "2.780" in fd and "lower" in fd


def _tokenizer_run(tmp_path):
  config = config_util.load_config_file("tokenizer.py:smoke")
  wd = str(tmp_path / "tok")
  train_lib.train(config, wd)
  return config, wd


@pytest.mark.slow  # trains two smoke tokenizers (~1 CPU-minute)
def test_shipped_tokenizer_is_used_while_its_config_matches(tmp_path, monkeypatch):
  tok_config, tok_wd = _tokenizer_run(tmp_path)
  monkeypatch.setattr(shipped, "DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setattr(shipped, "NAMES", ("smoke",))
  shipped.export(tok_wd, "smoke")
  info = shipped.info("shipped:smoke")
  assert info["step"] == tok_config.total_steps and "psnr" in info["metrics"]
  config, params = shipped.load("shipped:smoke")
  from arvision import checkpoint as ckpt_lib

  want = ckpt_lib.load_params(tok_wd)["params"]
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, want)
  assert all(jax.tree.leaves(same))

  # A generator whose tokenizer config matches: loaded, nothing trained in WORKDIR/tokenizer.
  gen = config_util.from_json(config_util.to_json(config_util.load_config_file("var.py:smoke")))
  with gen.unlocked():
    gen.tokenizer.checkpoint = "shipped:smoke"
  family, frozen = train_lib.build_family(gen, str(tmp_path / "gen"))
  assert not os.path.exists(tmp_path / "gen" / "tokenizer")
  assert jax.tree.structure(frozen["tokenizer"]) == jax.tree.structure(want)

  # A changed tokenizer config: the shipped weights do not fit; the tokenizer is trained.
  assert not shipped.resolve("shipped:smoke", _with_steps(gen.tokenizer.config, 3))
  with gen.unlocked():
    gen.tokenizer.config.total_steps = 3
  train_lib.build_family(gen, str(tmp_path / "gen2"))
  assert os.path.isdir(tmp_path / "gen2" / "tokenizer")


def _with_steps(config, n):
  c = config_util.from_json(config_util.to_json(config))
  with c.unlocked():
    c.total_steps = n
  return c


def test_unknown_shipped_tokenizer_is_a_clear_error():
  from arvision import errors

  with pytest.raises(errors.UserError, match="accepted"):
    shipped.load("shipped:nope")


def test_packaged_tokenizer_fits_its_config():
  """The shipped fmnist_msvq weights are a run of today's `configs/tokenizer.py:fmnist_msvq`
  (else the quickstart would silently train the tokenizer: refresh the .npz, see shipped.py)."""
  from arvision import families

  want = config_util.load_config_file("tokenizer.py:fmnist_msvq")
  assert shipped.resolve("shipped:fmnist_msvq", want)
  config, params = shipped.load("shipped:fmnist_msvq")
  abstract = families.build(want).abstract_params()
  shapes = jax.tree.map(lambda a, b: np.shape(a) == tuple(b.shape), params, abstract)
  assert all(jax.tree.leaves(shapes))
  info = shipped.info("shipped:fmnist_msvq")
  assert info["step"] == want.total_steps and info["metrics"]["psnr"] > 20


def test_shipped_match_ignores_fields_added_later_but_not_changed_ones():
  want = config_util.load_config_file("tokenizer.py:fmnist_msvq")
  old = config_util.from_json(config_util.to_json(want))
  with old.unlocked():
    del old.model["dtype"]  # a run from before `model.dtype` existed
  assert shipped.differences(old, want) == []
  with old.unlocked():
    old.optim.lr = 1e-3
  assert shipped.differences(old, want) == [f"optim.lr: shipped 0.001 vs wanted {want.optim.lr!r}"]


def test_packaged_domain_classifier_fits_todays_config():
  """The quickstart's eval needs the shipped classifier: fields added to every config later (e.g.
  model.dtype) must not invalidate its weights (they did once: the eval then refused to run)."""
  from arvision.evaluation import domain_classifiers as dc

  with np.load(dc.SHIPPED["fmnist"].weights) as f:
    packaged = str(f["__config_sha__"])
  assert dc.config_sha(dc.classifier_config("fmnist")) == packaged
