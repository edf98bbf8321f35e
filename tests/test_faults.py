"""The fault table of docs/reliability.md, driven: each `test_<row id>` makes that fault happen and
checks what the user sees and what is kept. `test_every_doc_row_has_a_test` ties the two together.

Most checks run the CLI in-process (`cli_runner.run_cli`: same code path as `arvision ...`, without paying a JAX
import per call); `test_issue_transcripts` runs the issue's transcripts as real
processes, and the SIGKILL row kills a real training process.
"""

import ast
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import toy_family  # tests/ is on sys.path (conftest.py)
from cli_runner import run_cli
from PIL import Image

import arvision
from arvision import checkpoint, config_util, errors, metrics_writer, train
from arvision.data import sources
from arvision.family import Family
from arvision.workdir_lock import LOCK_NAME

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TOY_CONFIG = os.path.join(HERE, "toy_family.py")
ENV = dict(
  os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
)


# --------------------------------------------------------------------------------------------
# Helpers: a toy generator (this module is its family), toy runs, the CLI in-process.
class ToyGenerator(Family):
  """Class k's image is a learned 4x4 table entry: enough to see which class was sampled."""

  kind = "generator"

  def __init__(self, config):
    super().__init__(config)
    self.num_classes = int(config.data.num_classes)

  def init_annotated(self, rng, batch):
    return {"table": jax.random.uniform(rng, (self.num_classes + 1, 4, 4, 1))}

  def loss(self, params, batch, rng, train):
    return jnp.mean(params["table"] ** 2), {}

  def sample(self, params, cond, rng, *, brightness=1.0):
    return (params["table"][cond] * 255 * brightness).astype(jnp.uint8)


def build(config, tokenizer=None):
  return ToyGenerator(config)


def _generator_export(path) -> str:
  c = config_util.base_config("test_faults")  # config.family: this module
  c.data.num_classes = 10
  c.lock()
  family = build(c)
  checkpoint.save_export(path, family.init(jax.random.key(0), None), {}, c)
  return str(path)


def _config(**kw):
  c = toy_family.get_config()
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  c.lock()
  return c


def _params(workdir):
  return checkpoint.load_params(workdir)["params"]


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _damage(workdir, step):
  """What the issue did: overwrite the largest file of a step's state with 100 random bytes."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "wb") as f:
    f.write(os.urandom(100))
  return target


def _listing(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _one_line_error(code, err, cmd, *patterns):
  """Exit status 2, no traceback, the last stderr line `arvision <cmd>: error: ...` matching."""
  assert code == 2, err
  assert "Traceback" not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"arvision {cmd}: error: "), err
  for p in patterns:
    assert re.search(p, last), (p, last)
  return last


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  """A finished toy run (checkpoints 2, 4, 6), copied per test that damages it."""
  wd = str(tmp_path_factory.mktemp("toy") / "run")
  train.train(_config(), wd)
  return wd


def _copy(run, tmp_path, name="run"):
  dst = str(tmp_path / name)
  shutil.copytree(run, dst)
  return dst


# --------------------------------------------------------------------------------------------
# The doc table and the tests are one list.
def _doc_rows():
  with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
    rows = [line for line in f if line.startswith("| `")]
  return {re.match(r"\| `([a-z0-9-]+)`", r).group(1): r for r in rows}


def _tests_in(path):
  with open(path) as f:
    tree = ast.parse(f.read())
  return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test")}


def test_every_doc_row_has_a_test():
  rows = _doc_rows()
  assert len(rows) >= 20
  mine = _tests_in(__file__)
  for row_id, line in rows.items():
    name = "test_" + row_id.replace("-", "_")
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", line)
    assert named, f"row {row_id!r} names no test"
    for file, test in named:
      assert test in _tests_in(os.path.join(HERE, file)), (row_id, file, test)
    if all(file == "test_faults.py" for file, _ in named):
      assert name in mine, f"row {row_id!r}: expected {name} in this file"
  rows_as_tests = {"test_" + r.replace("-", "_") for r in rows}
  helpers = {"test_every_doc_row_has_a_test"}
  assert mine - helpers <= rows_as_tests, mine - helpers - rows_as_tests


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2.
def test_issue_transcripts(tmp_path):
  """The issue's transcripts as real processes: one stderr line each, status 2."""
  smoke = os.path.join(ROOT, "configs", "tokenizer.py") + ":smoke"
  cases = [
    (
      [
        "train",
        "--config",
        smoke,
        "--workdir",
        tmp_path / "w",
        "--config.this_field_does_not_exist=1",
      ],
      "train",
      r"this_field_does_not_exist",
    ),
    (["eval", "--workdir", tmp_path / "DIR_THAT_DOES_NOT_EXIST"], "eval", r"does not exist"),
    (
      ["train", "--config", "configs/no_such_config.py", "--workdir", tmp_path / "w"],
      "train",
      r"no_such_config.py.*does not exist",
    ),
  ]
  for args, cmd, pattern in cases:
    p = subprocess.run(
      [sys.executable, "-m", "arvision.cli", *map(str, args)],
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    _one_line_error(p.returncode, p.stderr, cmd, pattern)


def test_unknown_config_field():
  code, _, err = run_cli(
    "train", "--config", TOY_CONFIG, "--workdir", "/tmp/x", "--config.data.sorce=1"
  )
  _one_line_error(code, err, "train", r"no field 'data.sorce'", r"did you mean source")


def test_missing_config_file(tmp_path):
  code, _, err = run_cli("train", "--config", tmp_path / "nope.py:smoke", "--workdir", tmp_path)
  _one_line_error(code, err, "train", r"nope.py' does not exist", r"var.py")
  code, _, err = run_cli("train", "--config", "tokenizer.py:no_such_variant", "--workdir", tmp_path)
  _one_line_error(code, err, "train", r"variant 'no_such_variant' is unknown; accepted: .*smoke")


def test_missing_or_empty_workdir(tmp_path):
  for cmd in ("eval", "sample", "verify"):
    code, _, err = run_cli(cmd, "--workdir", tmp_path / "missing")
    _one_line_error(code, err, cmd, r"does not exist")
  code, _, err = run_cli("sample", "--workdir", tmp_path)
  _one_line_error(code, err, "sample", r"holds no arvision checkpoints", r"arvision train")


def test_unknown_family(tmp_path):
  wd = tmp_path / "run"
  code, _, err = run_cli(
    "train", "--config", TOY_CONFIG, "--workdir", wd, "--config.family=no_such_family"
  )
  _one_line_error(code, err, "train", r"'no_such_family' is not a known family; accepted")


def test_verbose_shows_traceback(tmp_path):
  code, _, err = run_cli("eval", "--workdir", tmp_path / "missing", "--verbose")
  assert code == 2 and "Traceback" in err and "arvision.errors.NotFound" in err
  code, _, err = run_cli("eval", "--workdir", tmp_path / "missing", env={"ARVISION_DEBUG": "1"})
  assert code == 2 and "Traceback" in err


def test_label_out_of_range(tmp_path):
  export = _generator_export(tmp_path / "gen")
  model = arvision.load(export)
  ok = model.sample([0, 9, 10], jax.random.key(0))  # 10 = unconditional
  np.testing.assert_array_equal(ok, model.sample([0, 9, 10], jax.random.key(0)))
  for bad in ([0, 999], [-1]):
    with pytest.raises(errors.UserError, match=r"out of range .*10-class.*accepted: 0\.\.9"):
      model.sample(bad, jax.random.key(0))
  out = tmp_path / "grid.png"
  code, _, err = run_cli("sample", "--workdir", export, "--labels", "0,999", "--out", out)
  _one_line_error(code, err, "sample", r"labels \[999\] are out of range")
  assert not out.exists()  # nothing written, nothing substituted
  code, _, err = run_cli("sample", "--workdir", export, "--labels", "0,x", "--out", out)
  _one_line_error(code, err, "sample", r"--labels='0,x'")
  code, stdout, _ = run_cli("sample", "--workdir", export, "--labels", "3", "--out", out)
  assert code == 0 and out.exists(), stdout


def test_bad_sample_kw(tmp_path):
  export = _generator_export(tmp_path / "gen")
  out = tmp_path / "grid.png"
  code, _, err = run_cli(
    "sample", "--workdir", export, "--sample_kw", "brightnes=0.5", "--out", out
  )
  _one_line_error(code, err, "sample", r"\['brightnes'\] are unknown.*accepted: \['brightness'\]")
  code, _, err = run_cli("sample", "--workdir", export, "--sample_kw", "brightness", "--out", out)
  _one_line_error(code, err, "sample", r"'brightness' is not key=value")
  code, _, _ = run_cli("sample", "--workdir", export, "--sample_kw", "brightness=0.5", "--out", out)
  assert code == 0
  code, _, err = run_cli("eval", "--workdir", export, "--sample_kw", "brightnes=0.5")
  _one_line_error(code, err, "eval", r"\['brightnes'\] are unknown.*accepted: \['brightness'\]")


@pytest.mark.torch
def test_incompatible_checkpoint(tmp_path):
  """`arvision convert` of a file that is not the named model's checkpoint (or is missing)."""
  torch = pytest.importorskip("torch")  # the `convert` extra, installed by `make setup`

  wrong = tmp_path / "not_var_vae.pth"
  torch.save({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, wrong)
  code, _, err = run_cli("convert", "var_vae", wrong, "--out", tmp_path / "out")
  _one_line_error(code, err, "convert", r"encoder\.conv_in\.weight|missing|shape")
  assert not (tmp_path / "out").exists()
  code, _, err = run_cli("convert", "var_vae", tmp_path / "missing.pth", "--out", tmp_path / "out")
  _one_line_error(code, err, "convert", r"missing.pth' does not exist")


def test_missing_dataset(tmp_path):
  code, _, err = run_cli(
    "train",
    "--config",
    TOY_CONFIG,
    "--workdir",
    tmp_path / "run",
    f"--config.data.source=folder:{tmp_path / 'no_images_here'}",
  )
  _one_line_error(code, err, "train", r"no_images_here does not exist; expected <path>/<split>")
  code, _, err = run_cli(
    "train",
    "--config",
    TOY_CONFIG,
    "--workdir",
    tmp_path / "run",
    "--config.data.source=fashion_mnist",
    f"--config.data.data_dir={tmp_path / 'empty_cache'}",  # not converted yet: needs the IDX files
    env={"ARVISION_FASHION_MNIST_DIR": str(tmp_path / "no_idx_here")},
  )
  _one_line_error(code, err, "train", r"IDX files not found.*apt-get install -y dataset-fashion")


# --------------------------------------------------------------------------------------------
# Damaged checkpoints.
def test_damaged_newest_step(toy_run, tmp_path, caplog):
  """The issue's reproduction: step 6 damaged; rerun with more steps resumes from step 4, moves 6
  aside, and ends where an undamaged run ends."""
  wd = _copy(toy_run, tmp_path)
  _damage(wd, 6)
  with caplog.at_level("WARNING"):
    train.train(_config(total_steps=8), wd)
  said = caplog.text
  assert re.search(r"checkpoint step 6 in .* does not restore \(.*\); trying an older step", said)
  assert re.search(r"moved damaged checkpoint step 6 aside to .*6\.damaged-\d{8}T\d{6}Z", said)
  assert "using step 4, the newest step that restores" in said
  listing = _listing(wd)
  assert [d for d in listing if d.startswith("6.damaged-")], listing  # kept, never deleted
  assert checkpoint.committed_steps(wd)[-1] == 8
  clean = str(tmp_path / "clean")
  train.train(_config(total_steps=8), clean)
  _same_params(_params(clean), _params(wd))  # steps 5-6 were redone with the same batches


def test_no_step_restores(toy_run, tmp_path):
  wd = _copy(toy_run, tmp_path)
  for step in (2, 4, 6):
    _damage(wd, step)
  before = _listing(wd)
  with pytest.raises(errors.CheckpointError, match=r"step 6: .*step 4: .*step 2: .*nothing was"):
    train.train(_config(total_steps=8), wd)
  assert _listing(wd) == before  # nothing moved or deleted
  code, _, err = run_cli("train", "--config", TOY_CONFIG, "--workdir", wd)
  _one_line_error(code, err, "train", r"no checkpoint step in .* restores")


def test_damaged_step_on_load(toy_run, tmp_path):
  wd = _copy(toy_run, tmp_path)
  _damage(wd, 6)
  model = arvision.load(wd)
  assert model.step == 4
  assert any(d.startswith("6.damaged-") for d in _listing(wd))
  step4 = checkpoint._read_state(checkpoint.checkpoint_dir(toy_run), 4)["params"]
  _same_params(model.params, step4)


def test_verify(toy_run, tmp_path):
  wd = _copy(toy_run, tmp_path)
  code, out, _ = run_cli("verify", "--workdir", wd)
  ok = re.findall(r"checkpoints/[246]: OK \(\d+ arrays, .* MB, files match their digest\)", out)
  assert code == 0 and len(ok) == 3, out
  _damage(wd, 4)
  os.makedirs(os.path.join(wd, "checkpoints", "8.orbax-checkpoint-tmp"))
  code, out, err = run_cli("verify", "--workdir", wd)
  assert code == 1, out + err
  assert re.search(r"checkpoints/4: DAMAGED: .*changed since the step was saved: state/", out)
  assert re.search(r"checkpoints/6: OK", out) and "8.orbax-checkpoint-tmp: ignored" in out
  assert "4" in _listing(wd)  # verify moves nothing


def test_bit_flip(toy_run, tmp_path, caplog):
  """Bytes changed in place (same size): TensorStore reads them without error, so only the digest
  written at save time catches it; with the digest removed the step restores with wrong values."""
  wd = _copy(toy_run, tmp_path)
  state = os.path.join(wd, "checkpoints", "6", "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs]
  target = max(files, key=os.path.getsize)
  size = os.path.getsize(target)
  with open(target, "r+b") as f:
    f.seek(size // 2)
    byte = f.read(1)
    f.seek(size // 2)
    f.write(bytes([byte[0] ^ 0xFF]))
  assert os.path.getsize(target) == size
  undigested = _copy(wd, tmp_path, "undigested")
  os.remove(os.path.join(undigested, "checkpoints", "6", "arvision_digest.json"))
  assert arvision.load(undigested).step == 6  # what Orbax alone gives: no error
  with caplog.at_level("WARNING"):
    model = arvision.load(wd)
  assert model.step == 4
  assert re.search(r"step 6 .*does not restore \(CheckpointError: files changed since", caplog.text)
  assert any(d.startswith("6.damaged-") for d in _listing(wd))


# --------------------------------------------------------------------------------------------
# Interrupted and failed saves.
def test_kill_during_save(toy_run, tmp_path):
  """Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when complete; a process killed
  mid-save leaves that directory. It is ignored: the previous step restores, and the step is
  saved again."""
  wd = _copy(toy_run, tmp_path)
  ckpts = os.path.join(wd, "checkpoints")
  shutil.copytree(os.path.join(ckpts, "6"), os.path.join(ckpts, "8.orbax-checkpoint-tmp"))
  os.remove(os.path.join(ckpts, "8.orbax-checkpoint-tmp", "commit_success.txt"))
  _damage(wd, "8.orbax-checkpoint-tmp")
  assert checkpoint.committed_steps(wd) == [2, 4, 6]
  train.train(_config(total_steps=10), wd)
  assert checkpoint.committed_steps(wd)[-2:] == [8, 10]
  clean = str(tmp_path / "clean")
  train.train(_config(total_steps=10), clean)
  _same_params(_params(clean), _params(wd))


def test_sigkill_then_resume(tmp_path, caplog):
  """A real SIGKILL while the run saves a checkpoint every step: the rerun takes over the dead
  run's lock (with a message), resumes from the newest committed step, and finishes."""
  wd = str(tmp_path / "run")
  proc = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "arvision.cli",
      "train",
      f"--config={TOY_CONFIG}",
      f"--workdir={wd}",
      "--config.total_steps=100000",
      "--config.checkpoint_every=1",
      "--config.log_every=1",
    ],
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 180
  while len(checkpoint.committed_steps(wd)) < 3:
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert os.path.exists(os.path.join(wd, LOCK_NAME))  # the dead run's lock stays behind
  newest = checkpoint.committed_steps(wd)[-1]
  with caplog.at_level("WARNING"):
    code, _, err = run_cli(
      "train", "--config", TOY_CONFIG, "--workdir", wd, f"--config.total_steps={newest + 2}"
    )
  assert code == 0, err
  assert re.search(rf"taking over .*train.lock: its owner \(pid {proc.pid},", caplog.text)
  assert checkpoint.committed_steps(wd)[-1] == newest + 2
  assert not os.path.exists(os.path.join(wd, LOCK_NAME))  # released at the end


def test_disk_full_during_save(toy_run, tmp_path):
  """The save of step 8 fails for a full disk, as a failing writer would: an OSError(ENOSPC)
  from the save call, or (async saves) TensorStore's report of one at the next wait, in the
  form TensorStore 0.1.86 gives it on a full tmpfs. One line; step 6 is kept and resumes."""
  real_save = checkpoint.ocp.CheckpointManager.save
  real_wait = checkpoint.ocp.CheckpointManager.wait_until_finished
  clean = str(tmp_path / "clean")
  train.train(_config(total_steps=10), clean)
  for mode in ("sync", "async"):
    wd = _copy(toy_run, tmp_path, mode)
    failed = []

    def full_disk(self, step, *a, mode=mode, failed=failed, **kw):
      if step != 8:
        return real_save(self, step, *a, **kw)
      tmp = os.path.join(self.directory, "8.orbax-checkpoint-tmp")
      if mode == "sync":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
      failed.append(
        ValueError(
          f'RESOURCE_EXHAUSTED: Failed writing: "{tmp}/state/d/0": Failed to write 1582 bytes '
          "to file 9: No space left on device [os_error_code='28']"
        )
      )
      return True

    def wait(self, failed=failed):
      if failed:
        raise failed.pop()
      return real_wait(self)

    with (
      mock.patch.object(checkpoint.ocp.CheckpointManager, "save", full_disk),
      mock.patch.object(checkpoint.ocp.CheckpointManager, "wait_until_finished", wait),
    ):
      code, _, err = run_cli(
        "train", "--config", TOY_CONFIG, "--workdir", wd, "--config.total_steps=10"
      )
    _one_line_error(
      code,
      err,
      "train",
      r"saving a checkpoint to .* failed \(.*No space left on device.*newest complete step "
      r"\(6\) is kept",
      r"Free some space, then rerun the same command",
    )
    assert checkpoint.committed_steps(wd) == [2, 4, 6], mode
    assert not os.path.exists(os.path.join(wd, LOCK_NAME))
    train.train(_config(total_steps=10), wd)  # space is back: resumes from step 6
    _same_params(_params(clean), _params(wd))


# --------------------------------------------------------------------------------------------
# Two writers.
def test_second_writer(toy_run, tmp_path):
  wd = _copy(toy_run, tmp_path)
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(os.path.join(wd, LOCK_NAME), "w") as f:
      json.dump(dict(host=socket.gethostname(), pid=live.pid, since="earlier"), f)
    before = _listing(wd)
    code, _, err = run_cli(
      "train", "--config", TOY_CONFIG, "--workdir", wd, "--config.total_steps=8"
    )
    _one_line_error(code, err, "train", rf"in use by a live run \(pid {live.pid} on this host")
    assert _listing(wd) == before
    with open(os.path.join(wd, LOCK_NAME), "w") as f:
      json.dump(dict(host="another-host", pid=1, since="earlier"), f)
    code, _, err = run_cli(
      "train", "--config", TOY_CONFIG, "--workdir", wd, "--config.total_steps=8"
    )
    _one_line_error(code, err, "train", r"locked by a run on host 'another-host'", LOCK_NAME)
  finally:
    live.kill()
    live.wait()


def test_stale_lock(toy_run, tmp_path, caplog):
  wd = _copy(toy_run, tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(wd, LOCK_NAME), "w") as f:
    json.dump(dict(host=socket.gethostname(), pid=dead.pid, since="earlier"), f)
  with caplog.at_level("WARNING"):
    train.train(_config(total_steps=8), wd)
  assert f"its owner (pid {dead.pid}, since earlier) is no longer running" in caplog.text
  assert checkpoint.committed_steps(wd)[-1] == 8
  assert not os.path.exists(os.path.join(wd, LOCK_NAME))


# --------------------------------------------------------------------------------------------
# Data faults (folder: sources).
def _image_tree(root, classes_by_split, n=4, size=8):
  for split, classes in classes_by_split.items():
    for k, cls in enumerate(classes):
      d = os.path.join(root, split, cls)
      os.makedirs(d, exist_ok=True)
      for i in range(n):
        Image.fromarray(np.full((size, size), 30 * k + i, np.uint8), "L").save(f"{d}/{i}.png")


def _break_images(root):
  """One truncated PNG and one text file named .png."""
  good = os.path.join(root, "train", "a", "0.png")
  with open(good, "rb") as f:
    head = f.read(40)
  truncated = os.path.join(root, "train", "a", "1.png")
  with open(truncated, "wb") as f:
    f.write(head)
  not_image = os.path.join(root, "train", "b", "2.png")
  with open(not_image, "w") as f:
    f.write("not an image")
  return sorted([truncated, not_image])


def test_bad_image_skipped(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_SKIPPED", {})
  root = str(tmp_path / "data")
  _image_tree(root, {"train": ["a", "b"], "test": ["a", "b"]})
  bad = _break_images(root)
  wd = str(tmp_path / "run")
  cfg = _config(**{"data.source": f"folder:{root}", "data.num_classes": 2, "total_steps": 2})
  train.train(cfg, wd)
  with open(os.path.join(wd, sources.SKIPPED_LIST)) as f:
    listed = sorted(line.split("\t")[0] for line in f)
  assert listed == bad
  rows = metrics_writer.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["train/skipped_images"] for r in rows if "train/loss" in r] == [2, 2]
  src = sources.get_source(cfg.data, "train")
  assert src[1]["label"] == 0 and (src[1]["image"] == 2).all()  # a/1.png -> a/2.png


def test_bad_image_error(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_SKIPPED", {})
  root = str(tmp_path / "data")
  _image_tree(root, {"train": ["a", "b"], "test": ["a", "b"]})
  bad = _break_images(root)
  code, _, err = run_cli(
    "train",
    "--config",
    TOY_CONFIG,
    "--workdir",
    tmp_path / "run",
    f"--config.data.source=folder:{root}",
    "--config.data.num_classes=2",
    "--config.data.on_bad_image=error",
  )
  either = "|".join(map(re.escape, bad))  # the shuffle decides which one is read first
  _one_line_error(code, err, "train", f"cannot decode ({either}) ", r"on_bad_image='skip'")
  assert sources.skipped_images() == {}


def test_split_class_mismatch(tmp_path):
  root = str(tmp_path / "data")
  _image_tree(root, {"train": ["a", "b", "c"], "test": ["a", "c", "d"]})
  cfg = _config(**{"data.source": f"folder:{root}", "data.num_classes": 4})
  for split in ("train", "test"):
    with pytest.raises(errors.UserError, match=r"class folders of splits .* differ") as e:
      sources.get_source(cfg.data, split)
    assert "only in train: ['b']" in str(e.value) and "only in test: ['d']" in str(e.value)
  os.makedirs(os.path.join(root, "test", "b"))  # empty folders are fine: labels line up again
  os.makedirs(os.path.join(root, "train", "d"))
  assert sources.get_source(cfg.data, "test").classes == ["a", "b", "c", "d"]


# --------------------------------------------------------------------------------------------
# Config between runs.
def test_new_config_field(toy_run, tmp_path):
  """A run saved before a config field existed resumes (the field takes its current value)."""
  wd = _copy(toy_run, tmp_path)
  path = os.path.join(wd, "config.json")
  with open(path) as f:
    saved = json.load(f)
  del saved["data"]["on_bad_image"]
  with open(path, "w") as f:
    json.dump(saved, f)
  train.train(_config(total_steps=8), wd)
  assert checkpoint.committed_steps(wd)[-1] == 8
