"""A generator workdir end to end: tokenizer stage, VAR training, load, sample, eval, resume."""

import json
import os

import jax
import numpy as np

from arvision import api, checkpoint, config_util, train
from arvision.evaluation import evaluate


def test_var_smoke_workdir_trains_loads_samples_and_evaluates(tmp_path):
  wd = str(tmp_path / "var")
  config = config_util.load_config_file("var.py:smoke")
  train.train(config, wd)
  assert checkpoint.Checkpointer(os.path.join(wd, "tokenizer")).latest_step() is not None
  # the checkpoint is self-contained: it carries the frozen tokenizer params
  loaded = checkpoint.load_params(wd)
  assert "tokenizer" in loaded["frozen"]
  model = api.load(wd)
  imgs = model.sample([0, 1, 2], jax.random.key(0))
  assert imgs.shape == (3, config.data.image_size, config.data.image_size, config.data.channels)
  assert imgs.dtype == np.uint8
  np.testing.assert_array_equal(imgs, model.sample([0, 1, 2], jax.random.key(0)))
  out = str(tmp_path / "eval")
  evaluate.run(
    model.family, model.params, model.config, wd, step=model.step, out_dir=out, num_samples=8
  )
  with open(os.path.join(out, "metrics.json")) as f:
    rec = json.load(f)
  assert "heldout_loss" in rec["metrics"] and rec["sampling"]["cfg"] == config.sample.cfg
  arr = np.load(os.path.join(out, "samples.npz"))
  assert arr["arr_0"].shape[0] == 8 and sorted(set(arr["labels"].tolist())) == list(
    range(min(8, config.data.num_classes))
  )
  # running the same command again continues (here: nothing left to do) without retraining
  before = checkpoint.Checkpointer(wd).latest_step()
  train.train(config, wd)
  assert checkpoint.Checkpointer(wd).latest_step() == before
