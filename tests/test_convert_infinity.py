"""`arvision convert infinity`: every official key maps, the layout round-trips, errors name the key.

`tests/data/infinity_official_keys.json` holds the state-dict key -> shape tables of the official
FoundationVision/Infinity `Infinity` module: Infinity-2B as `tools/run_infinity.py` builds it (8
block chunks, Ct5 2048, null text 512, d 32) and the small model of the parity script (4 blocks in
2 chunks), dumped by `experiments/parity_infinity_official.py --dump_keys` from the official code.
Numerical parity is `experiments/parity_infinity_official.py`.
"""

import json
import os

import jax
import numpy as np
import pytest
from official_tables import zeros_sd as _zeros_sd

from arvision import config_util, errors
from arvision.convert import common
from arvision.convert import infinity as ci

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "infinity_official_keys.json")) as f:
  TABLES = json.load(f)


def _n(table):
  return sum(int(np.prod(s)) for k, s in table.items() if not k.endswith("zero_k_bias"))


@pytest.mark.slow  # traces the 2B model's init abstractly (~40 s on a busy 2-core CPU)
def test_infinity_2b_layout_maps_every_key_onto_configs_2b():
  """The released 2B layout converts onto `configs/infinity.py:2b` exactly (shapes only: zero-size
  broadcast arrays, nothing allocated) and the parameter counts agree."""
  sd = _zeros_sd(TABLES["infinity_2b"])
  config = ci.infinity_config(sd)
  m = config.model
  assert (m.depth, m.width, m.num_heads, m.text_dim, m.text_maxlen) == (32, 2048, 16, 2048, 512)
  assert config.tokenizer.config.model.embed_dim == 32
  two_b = config_util.load_config_file("configs/infinity.py:2b")
  assert {k: two_b.model[k] for k in m} == dict(m), "configs/infinity.py:2b = the released sizes"
  params = ci.convert_infinity(sd, config)
  n = _n(TABLES["infinity_2b"])
  assert sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)) == n
  assert n == TABLES["infinity_2b_params"] == 2_204_564_032


def test_small_model_round_trips_with_its_block_chunks():
  rng = np.random.default_rng(0)
  table = TABLES["small"]
  sd = {k: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in table.items()}
  for k in sd:
    if k.endswith("zero_k_bias"):
      sd[k] = np.zeros_like(sd[k])
  config = ci.infinity_config(sd)
  assert (config.model.depth, config.model.width, config.model.num_heads) == (4, 128, 4)
  params = ci.convert_infinity(sd, config)
  flat = common.flatten(params)
  np.testing.assert_array_equal(
    flat["blocks_3/sa/mat_qkv/kernel"], sd["block_chunks.1.module.1.sa.mat_qkv.weight"].T
  )
  np.testing.assert_array_equal(
    flat["blocks_2/sa/scale_mul"], sd["block_chunks.1.module.0.sa.scale_mul_1H11"].reshape(-1)
  )
  back = ci.to_official_infinity(params, block_chunks=2)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_errors_name_the_key():
  sd = _zeros_sd(TABLES["small"])
  config = ci.infinity_config(sd)
  missing = {k: v for k, v in sd.items() if k != "text_proj_for_sos.ca.mat_q"}
  with pytest.raises(errors.UserError, match="sos_pool/mat_q"):
    ci.convert_infinity(missing, config)
  extra = {**sd, "block_chunks.0.module.0.sa.bogus": np.zeros((3,), np.float32)}
  with pytest.raises(errors.UserError, match="bogus"):
    ci.convert_infinity(extra, config)
  with pytest.raises(errors.UserError, match="cfg_uncond"):
    ci.infinity_config({k: v for k, v in sd.items() if k != "cfg_uncond"})
