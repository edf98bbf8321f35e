"""`arvision convert mvar`: every official key maps, the layout round-trips, errors name the key.

`tests/data/mvar_official_keys.json` holds the state-dict key -> shape tables of the official
OliverRensu/MVAR `MVAR` module (d16 with attn_l2_norm=False, the README's setting for d16/d20; a
small depth-2 model with attn_l2_norm=True) and the official parameter counts of d16 and d12,
dumped by `experiments/parity_mvar_official.py --dump_keys` from the official code. Numerical
parity is `experiments/parity_mvar_official.py`.
"""

import json
import os
import re

import ml_collections as mlc
import numpy as np
import pytest
from official_tables import count_params as _n

from arvision import errors
from arvision.convert import mvar as cm
from arvision.models import mvar as mvar_lib

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "mvar_official_keys.json")) as f:
  TABLES = json.load(f)
BUFFERS = re.compile(r".*(lvl_1L|attn_bias_for_masking|zero_k_bias|attn\.patch_nums)$")


def _random_sd(table, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}


def _n_official(table):
  return sum(int(np.prod(s)) for k, s in table.items() if not BUFFERS.fullmatch(k))


def _small_config(sd):
  c = cm.mvar_config(sd, tokenizer_patch_nums=(1, 2, 4))
  c = mlc.ConfigDict(c.to_dict())
  c.tokenizer.config.model.update(ch=32, z_channels=8, embed_dim=8)
  c.tokenizer.config.data.image_size = 64
  return c


def test_released_layout_maps_every_key():
  table = TABLES["mvar_d16"]
  sd = {k: np.zeros(tuple(s), np.float32) for k, s in table.items()}
  config = cm.mvar_config(sd)
  m = config.model
  assert (m.depth, m.width, m.num_heads, m.attn_l2_norm) == (16, 1024, 16, False)
  assert (m.d_state, m.d_conv, m.expand, m.headdim) == (64, 4, 2, 64)
  assert config.family == "mvar" and m.mask == "block_diagonal"
  params = cm.convert_mvar(sd, config)
  assert _n(params) == _n_official(table) == TABLES["mvar_d16_params"]
  assert TABLES["mvar_d16_params"] == mvar_lib.official_param_count(16, attn_l2_norm=False)
  assert TABLES["mvar_d12_params"] == mvar_lib.official_param_count(12, attn_l2_norm=True)


def test_round_trip_to_official_keys():
  sd = _random_sd(TABLES["mvar_small"], 1)
  config = _small_config(sd)
  m = config.model
  assert (m.depth, m.width, m.num_heads, config.data.num_classes) == (2, 128, 2, 10)
  assert (m.d_state, m.headdim, m.attn_l2_norm) == (64, 64, True)
  params = cm.convert_mvar(sd, config)
  mamba = params["blocks_1"]["mamba"]
  np.testing.assert_array_equal(
    mamba["conv1d"]["kernel"], sd["blocks.1.mamba.conv1d.weight"][:, 0, :].T
  )
  np.testing.assert_array_equal(mamba["in_proj"]["kernel"], sd["blocks.1.mamba.in_proj.weight"].T)
  np.testing.assert_array_equal(mamba["norm"]["scale"], sd["blocks.1.mamba.norm.weight"])
  np.testing.assert_array_equal(mamba["A_log"], sd["blocks.1.mamba.A_log"])
  np.testing.assert_array_equal(
    params["blocks_0"]["ada_lin"]["kernel"], sd["blocks.0.ada_lin.1.weight"].T
  )
  back = cm.to_official_mvar(params, config)
  assert set(back) == {k for k in sd if not BUFFERS.fullmatch(k)}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_mismatches_are_clear_errors():
  table = TABLES["mvar_small"]
  sd = _random_sd(table)
  config = _small_config(sd)
  with pytest.raises(errors.UserError, match=r"missing from the checkpoint.*blocks_1/mamba/D"):
    cm.convert_mvar({k: v for k, v in sd.items() if k != "blocks.1.mamba.D"}, config)
  with pytest.raises(errors.UserError, match=r"do not belong to the model.*blocks\.0\.mamba\.x"):
    cm.convert_mvar({**sd, "blocks.0.mamba.x": np.zeros(3, np.float32)}, config)
  bad = {**sd, "blocks.0.mamba.out_proj.weight": np.zeros((128, 255), np.float32)}
  with pytest.raises(errors.UserError, match=r"shape mismatch for 'blocks\.0\.mamba\.out_proj"):
    cm.convert_mvar(bad, config)
  var_like = {**sd, "blocks.0.ada_lin.1.weight": np.zeros((768, 128), np.float32)}
  with pytest.raises(errors.UserError, match=r"9 \* width = 1152.*arvision convert var"):
    cm.mvar_config(var_like)
  with pytest.raises(errors.UserError, match=r"blocks\.0\.mamba\.A_log"):
    cm.mvar_config({k: v for k, v in sd.items() if "mamba" not in k})


def test_hub_detects_an_mvar_checkpoint(tmp_path):
  """`arvision.load("hf://...")` picks the converter from the keys: M-VAR, not VAR."""
  torch = pytest.importorskip("torch")
  from arvision import hub

  path = str(tmp_path / "d2.pth")
  small = _random_sd(TABLES["mvar_small"])
  torch.save({k: torch.from_numpy(v) for k, v in small.items()}, path)
  assert hub.detect_kind(path) == "mvar"
