"""`arvision convert hmar`: every official key maps, the layout round-trips, errors name the key.

`tests/data/hmar_official_keys.json` holds the state-dict key -> shape tables of the official
NVlabs/HMAR modules (`HMAR` d16 with n_layers_train 8 = the released `hmar-d16.pth` layout, its
stage-1 `NextScalePrediction` d16, and a small `HMAR`), dumped by
`experiments/parity_hmar_official.py --dump_keys` from the official code. Numerical parity is
`experiments/parity_hmar_official.py`.
"""

import json
import os
import re

import ml_collections as mlc
import numpy as np
import pytest
from official_tables import count_params as _n
from official_tables import zeros_sd as _zeros_sd

from arvision import config_util, errors
from arvision.convert import hmar as ch
from arvision.models import hmar as hmar_lib

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "hmar_official_keys.json")) as f:
  TABLES = json.load(f)
BUFFERS = re.compile(r".*(lvl_1L|attn_bias_for_masking|zero_k_bias)$")


def _random_sd(table, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}


def _n_official(table):
  return sum(int(np.prod(s)) for k, s in table.items() if not BUFFERS.fullmatch(k))


def _small_config(sd):
  c = ch.hmar_config(sd, tokenizer_patch_nums=(1, 2, 4))
  c = mlc.ConfigDict(c.to_dict())
  c.tokenizer.config.model.update(ch=32, z_channels=8, embed_dim=8)
  c.tokenizer.config.data.image_size = 64
  return c


def test_released_layout_maps_every_key():
  sd = _zeros_sd(TABLES["hmar_d16"])
  config = ch.hmar_config(sd)
  m = config.model
  assert (m.stage, m.depth, m.width, m.num_heads, m.mask_depth) == (2, 16, 1024, 16, 8)
  assert config.family == "hmar" and m.mask == "block_diagonal" and m.scale_loss == "lognormal"
  params = ch.convert_hmar(sd, config)
  assert _n(params) == _n_official(TABLES["hmar_d16"]) == hmar_lib.official_param_count(16, 8)


def test_stage1_layout_converts_as_stage1():
  sd = _zeros_sd(TABLES["nsp_d16"])
  config = ch.hmar_config(sd)
  assert config.model.stage == 1
  assert _n(ch.convert_hmar(sd, config)) == _n_official(TABLES["nsp_d16"])


def test_round_trip_to_official_keys():
  sd = _random_sd(TABLES["hmar_small"], 1)
  config = _small_config(sd)
  assert (config.model.depth, config.model.mask_depth, config.data.num_classes) == (2, 1, 10)
  params = ch.convert_hmar(sd, config)
  np.testing.assert_array_equal(
    params["blocks_1"]["attn"]["mat_qkv"]["kernel"], sd["ns_blocks.0.attn.mat_qkv.weight"].T
  )
  np.testing.assert_array_equal(params["mask_embed"], sd["mask_embed.weight"][0])
  np.testing.assert_array_equal(params["word_embed"]["bias"], sd["word_embed_bias"])
  back = ch.to_official_hmar(params, config)
  assert set(back) == {k for k in sd if not BUFFERS.fullmatch(k)}
  for k, v in back.items():
    np.testing.assert_array_equal(v.reshape(sd[k].shape), sd[k], err_msg=k)


def test_unknown_missing_and_wrong_kind_are_named():
  sd = _random_sd(TABLES["hmar_small"], 2)
  config = _small_config(sd)
  with pytest.raises(errors.UserError, match=r"mask_blocks\.0\.attn\.extra"):
    ch.convert_hmar({**sd, "mask_blocks.0.attn.extra": np.zeros(3, np.float32)}, config)
  missing = dict(sd)
  del missing["ns_blocks.0.ffn.fc2.bias"]
  with pytest.raises(errors.UserError, match="blocks_1/ffn/fc2/bias"):
    ch.convert_hmar(missing, config)
  stage2_only = {k: v for k, v in sd.items() if not k.startswith("mask_blocks.")}
  with pytest.raises(errors.UserError, match="MaskedPrediction"):
    ch.hmar_config(stage2_only)
  with pytest.raises(errors.UserError, match="not an HMAR checkpoint"):
    ch.hmar_config({"foo.weight": np.zeros(2)})


def test_official_configs_build():
  for d in (16, 20, 24, 30):
    c = config_util.load_config_file(f"hmar.py:d{d}")
    assert (c.model.depth, c.model.mask_depth, c.model.stage) == (d, 8, 2)
    assert c.sample.top_p == 0.99
  with pytest.raises(ValueError, match="official depths"):
    config_util.load_config_file("hmar.py:d36")
