"""The worked example of docs/architecture.md "Adding a successor": a Markovian next-scale model
(HMAR-style stage 1) that is VAR plus two config hooks, trained through the one loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import config_util, families, metrics_writer, train
from arvision.ops import masks


def test_markov_config_is_var_plus_hooks():
  var = config_util.load_config_file("var.py:smoke")
  markov = config_util.load_config_file("var.py:markov_smoke")
  assert markov.model.mask == "block_diagonal" and markov.model.scale_loss == "lognormal"
  diff = {k for k in var.model if var.model[k] != markov.model[k]}
  assert diff == {"mask", "scale_loss"}
  fam = families.build(markov, tokenizer=families.build(markov.tokenizer.config))
  # Same parameter tree as VAR (checkpoints, converters and sharding rules carry over).
  var_fam = families.build(var, tokenizer=families.build(var.tokenizer.config))
  same = jax.tree.map(
    lambda a, b: a.shape == b.shape, fam.abstract_params(), var_fam.abstract_params()
  )
  assert all(jax.tree.leaves(same))
  mask = fam.module.mask
  assert mask == "block_diagonal"
  spec = masks.block_diagonal(fam.lengths)
  assert spec.density(fam.seq_len) < masks.scale_causal(fam.lengths).density(fam.seq_len)


@pytest.mark.slow  # 84 s; HMAR's tests cover the block-diagonal + lognormal path
def test_markov_variant_trains_through_the_loop(tmp_path):
  config = config_util.load_config_file("var.py:markov_smoke")
  with config.unlocked():
    config.total_steps = 12
    config.log_every = 1
    config.checkpoint_every = 12
    config.optim.lr = 3e-3
  wd = str(tmp_path / "markov")
  train.train(config, wd)
  rows = metrics_writer.read_jsonl(os.path.join(wd, "metrics.jsonl"))
  losses = np.asarray([r["train/loss"] for r in rows if "train/loss" in r])
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  assert losses[-3:].mean() < losses[:3].mean(), losses
  # The trained variant samples (cache-free block-diagonal decoding) deterministically.
  from arvision import api

  model = api.load(wd)
  a = model.sample([0, 1], jax.random.key(0))
  np.testing.assert_array_equal(a, model.sample(jnp.array([0, 1]), jax.random.key(0)))
