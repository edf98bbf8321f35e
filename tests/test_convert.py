"""Converters of official checkpoints: key coverage, layouts, round trips, and errors naming keys.

`tests/data/var_official_keys.json` holds the state-dict key -> shape tables of the official
FoundationVision/VAR modules (VQVAE vae_ch160v4096z32, VAR-d16, VAR-d30, and small models built
with the same classes), dumped by `experiments/parity_var_official.py --dump_keys` from the official
code. Numerical parity with the official code itself is `experiments/parity_var_official.py`.
"""

import json
import os

import jax
import ml_collections as mlc
import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import api, config_util, families
from arvision import checkpoint as ckpt_lib
from arvision.convert import common
from arvision.convert import var as cv

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "var_official_keys.json")) as f:
  TABLES = json.load(f)


def _random_sd(table, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}


def _small_tok_config():
  c = mlc.ConfigDict(config_util.load_config_file("tokenizer.py:var_vae").to_dict())
  c.model.update(ch=32, z_channels=8, embed_dim=8, vocab_size=64, patch_nums=(1, 2, 4))
  c.data.image_size = 64
  return c


def _small_var_config():
  c = mlc.ConfigDict(config_util.load_config_file("var.py:smoke").to_dict())
  c.model.update(depth=2, width=64, num_heads=2)
  c.data.num_classes = 10
  c.tokenizer.config = _small_tok_config()
  return c


SKIPPED_VAE = {"quantize.ema_vocab_hit_SV"}


def test_full_vae_checkpoint_maps_every_key():
  sd = _zeros_sd(TABLES["vae_full"])
  params, config = cv.convert_vae(sd)
  expected = sum(int(np.prod(s)) for k, s in TABLES["vae_full"].items() if k not in SKIPPED_VAE)
  assert _n(params) == expected == 108_948_355


@pytest.mark.parametrize("depth,count", [(16, 310_283_520), (30, 2_010_020_356)])
def test_full_var_checkpoint_maps_every_key(depth, count):
  sd = _zeros_sd(TABLES[f"var_d{depth}"])
  config = cv.var_config(sd)
  assert config.model.depth == depth
  params = cv.convert_var(sd, config)
  assert _n(params) == count


def test_layouts_of_converted_small_models():
  sd_vae = _random_sd(TABLES["vae_small"], 1)
  tok_params, _ = cv.convert_vae(sd_vae, _small_tok_config())
  ae = tok_params["ae"]
  w = sd_vae["encoder.down.0.block.1.conv1.weight"]  # OIHW
  np.testing.assert_array_equal(
    ae["encoder"]["down_0"]["block_1"]["conv1"]["kernel"], w.transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(ae["quantize"]["embedding"], sd_vae["quantize.embedding.weight"])
  np.testing.assert_array_equal(
    ae["quantize"]["quant_resi_3"]["bias"], sd_vae["quantize.quant_resi.qresi_ls.3.bias"]
  )
  np.testing.assert_array_equal(
    ae["decoder"]["norm_out"]["scale"], sd_vae["decoder.norm_out.weight"]
  )

  sd = _random_sd(TABLES["var_small"], 2)
  p = cv.convert_var(sd, _small_var_config())
  np.testing.assert_array_equal(
    p["blocks_1"]["attn"]["mat_qkv"]["kernel"], sd["blocks.1.attn.mat_qkv.weight"].T
  )
  np.testing.assert_array_equal(
    p["blocks_0"]["attn"]["scale_mul"], sd["blocks.0.attn.scale_mul_1H11"].reshape(-1)
  )
  # the fused AdaLN output keeps the official chunk order (gamma1, gamma2, scale1, ...)
  np.testing.assert_array_equal(
    p["blocks_0"]["ada_lin"]["kernel"], sd["blocks.0.ada_lin.1.weight"].T
  )
  np.testing.assert_array_equal(p["class_emb"]["embedding"], sd["class_emb.weight"])
  np.testing.assert_array_equal(p["pos_1LC"], sd["pos_1LC"])


def test_round_trip_back_to_official_keys():
  sd = _random_sd(TABLES["var_small"], 3)
  p = cv.convert_var(sd, _small_var_config())
  back = common.to_state_dict(
    p, renames=[(r"\.ada_lin\.", ".ada_lin.1."), (r"\.scale_mul$", ".scale_mul_1H11")]
  )
  for k, v in back.items():
    np.testing.assert_array_equal(v.reshape(sd[k].shape), sd[k], err_msg=k)
  assert set(sd) - set(back) == {
    k for k in sd if k.endswith(("lvl_1L", "attn_bias_for_masking", "zero_k_bias"))
  }


def test_unknown_missing_and_mismatched_keys_are_named():
  sd = _random_sd(TABLES["var_small"], 4)
  config = _small_var_config()
  with pytest.raises(ValueError, match="blocks.0.attn.extra_thing"):
    cv.convert_var({**sd, "blocks.0.attn.extra_thing": np.zeros(3, np.float32)}, config)
  missing = dict(sd)
  del missing["blocks.1.ffn.fc2.bias"]
  with pytest.raises(ValueError, match="blocks_1/ffn/fc2/bias"):
    cv.convert_var(missing, config)
  bad = dict(sd, **{"head.weight": np.zeros((5, 64), np.float32)})
  with pytest.raises(ValueError, match="shape mismatch for 'head.weight'"):
    cv.convert_var(bad, config)


def test_unwrap_layouts():
  sd = {"a.weight": np.ones(2, np.float32)}
  for wrapped in (
    sd,
    {"model": sd},
    {"module": sd},
    {"state_dict": sd},
    {"module.a.weight": sd["a.weight"]},
  ):
    assert list(common.unwrap_state_dict(wrapped)) == ["a.weight"]
  with pytest.raises(ValueError, match="state dict"):
    common.unwrap_state_dict({"epoch": 3})


def test_converted_export_loads_and_samples(tmp_path):
  """`arvision convert` output -> arvision.load -> sample (small official-shaped models)."""
  tok_params, tok_config = cv.convert_vae(_random_sd(TABLES["vae_small"], 5), _small_tok_config())
  config = _small_var_config()
  params = cv.convert_var(_random_sd(TABLES["var_small"], 6), config)
  config = config_util.from_json(config_util.to_json(config))
  ckpt_lib.save_export(str(tmp_path / "out"), params, {"tokenizer": tok_params}, config)
  model = api.load(str(tmp_path / "out"))
  imgs = model.sample([1, 2], jax.random.key(0), cfg=1.5, top_k=5, top_p=0.9)
  assert imgs.shape == (2, 64, 64, 3) and imgs.dtype == np.uint8
  again = model.sample([1, 2], jax.random.key(0), cfg=1.5, top_k=5, top_p=0.9)
  np.testing.assert_array_equal(imgs, again)
  assert families.needs_tokenizer(model.config)
