"""Config parsing/locking/overrides and the optimizer recipe."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arvision import config_util, optim


def test_parse_arg_variant_and_keys():
  a = config_util.parse_arg("d16,steps=5,flag=true", variant="smoke", steps=1, flag=False)
  assert (a.variant, a.steps, a.flag) == ("d16", 5, True)
  with pytest.raises(ValueError, match="unknown.*accepted"):
    config_util.parse_arg("bogus=1", variant="smoke")


def test_locked_config_rejects_typos():
  c = config_util.base_config("tokenizer")
  c.lock()
  c.optim.lr = 3e-4  # existing field: fine
  with pytest.raises(AttributeError, match="optim.lrr|lrr"):
    c.optim.lrr = 1.0


def test_pick_variant_names_accepted():
  with pytest.raises(ValueError, match="accepted: \\['a', 'b'\\]"):
    config_util.pick_variant({"a": 1, "b": 2}, "c", "model")


def test_json_round_trip():
  c = config_util.base_config("var")
  c2 = config_util.from_json(config_util.to_json(c))
  assert c2.optim.lr == c.optim.lr and list(c2.optim.no_decay) == list(c.optim.no_decay)


@pytest.mark.parametrize("sched", ["cosine", "linear", "constant"])
def test_schedule_warmup_hold_decay(sched):
  c = config_util.base_config("x").optim
  c.lr, c.warmup_steps, c.hold_steps, c.schedule, c.end_lr_factor = 1.0, 10, 5, sched, 0.1
  f = optim.schedule(c, total_steps=115, batch_size=256)
  assert float(f(0)) == 0.0
  np.testing.assert_allclose(float(f(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(f(12)), 1.0, rtol=1e-6)
  end = float(f(115))
  np.testing.assert_allclose(end, 1.0 if sched == "constant" else 0.1, rtol=1e-5)


def test_lr_scaling_batch256_and_bad_values():
  c = config_util.base_config("x").optim
  c.lr, c.lr_scaling = 1e-4, "batch256"
  assert optim.peak_lr(c, 768) == pytest.approx(3e-4)
  c.lr_scaling = "sqrt"
  with pytest.raises(ValueError, match="lr_scaling.*accepted"):
    optim.peak_lr(c, 768)


def test_decay_mask_skips_1d_and_patterns():
  params = {
    "blk": {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}},
    "pos_1LC": jnp.ones((1, 4, 3)),
    "lvl_embed": {"embedding": jnp.ones((2, 3))},
  }
  m = optim.decay_mask(params, ("pos_", "lvl_embed"))
  assert m["blk"]["dense"]["kernel"] and not m["blk"]["dense"]["bias"]
  assert not m["pos_1LC"] and not m["lvl_embed"]["embedding"]


def test_weight_decay_applies_only_to_masked():
  c = config_util.base_config("x").optim
  c.lr, c.weight_decay, c.clip_norm, c.schedule = 0.1, 0.5, 0.0, "constant"
  tx, _ = optim.make(c, 10, 256)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["b"]).max()) == 0.0  # no decay on 1-D
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.05 * np.ones((2, 2)), rtol=1e-6)


def test_cli_override_typo_is_an_error(tmp_path):
  """`--config.optim.lrr=...` must fail naming the field; nothing is written."""
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "arvision.cli",
      "train",
      "--config",
      "configs/tokenizer.py:smoke",
      "--config.optim.lrr=0.1",
      "--workdir",
      str(tmp_path / "w"),
    ],
    capture_output=True,
    text=True,
    cwd=config_util.CONFIG_DIR + "/..",
  )
  assert r.returncode != 0
  assert "lrr" in r.stderr
  assert not (tmp_path / "w").exists()
